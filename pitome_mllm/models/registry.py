"""The registry of model families: which adapter class patches a model, and its parts for the tools."""

from __future__ import annotations

from torch import nn

from ..geometry import TowerGeometry
from .llava_hf import LlavaHFAdapter
from .llava_next import LlavaNextAdapter
from .llava_original import LlavaOriginalAdapter
from .protocol import ModelAdapter, ModelParts
from .qwen_vl import QwenVLAdapter
from .vllm_llava import VllmLlavaAdapter

# Asked in this order; the first class whose `matches` says yes patches the model.
ADAPTERS: tuple[type[ModelAdapter], ...] = (
    VllmLlavaAdapter,
    LlavaNextAdapter,
    LlavaHFAdapter,
    LlavaOriginalAdapter,
    QwenVLAdapter,
)


def supported_families() -> str:
    return "; ".join(adapter.supported for adapter in ADAPTERS)


def find_adapter(model: nn.Module) -> type[ModelAdapter]:
    """The adapter class for ``model`` (a `ModelAdapter` subclass).

    Raises:
        ValueError: no adapter supports it; the message names what is supported.
    """
    for adapter in ADAPTERS:
        if adapter.matches(model):
            return adapter
    raise ValueError(f"unsupported model {type(model).__name__}; supported: {supported_families()}")


def model_parts(model: nn.Module) -> ModelParts:
    """The vision tower, projector, feature layer, ... of ``model``, patched or not.

    Raises:
        ValueError: an unsupported model (the message names what is supported).
    """
    return find_adapter(model).parts(model)


def model_geometry(model: nn.Module) -> TowerGeometry:
    """The token geometry of ``model``'s tower at its native image size (anyres families: of one crop).

    Counts for tools that hold a model but no patch: ``native_visual_tokens`` (what the projector
    receives unpatched), ``default_num_tokens`` (what enters the tower), ``num_layers``, ``last_layer``.

    Raises:
        ValueError: an unsupported model (the message names what is supported).
    """
    adapter = find_adapter(model)
    return adapter.geometry(adapter.parts(model))
