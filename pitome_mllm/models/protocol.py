"""The adapter contract: what every model family implements, and what the rest of the package may ask.

An adapter class knows one family's attribute paths. `pitome_mllm.models.registry` finds
the class for a model (`ModelAdapter.matches`); `pitome_mllm.patch` builds it, which
validates and plans without touching the model, then calls `install` (and the handle
`remove`). Tools that measure or show a model, patched or not, ask the class for the
model's `ModelParts` instead of reading attributes themselves.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import ALL_METHODS, PRESETS, PiToMeConfig
from ..geometry import ImageResize, PatchGrid, TowerGeometry
from ..hooks.base import Hook, install_in_order, remove_in_reverse
from ..hooks.state import PatchState
from ..methods import method_label
from ..schedule import LayerStep

logger = logging.getLogger("pitome_mllm")

# Boolean settings an adapter must declare in `ModelAdapter.options` to accept them switched on.
OPTIONS = ("llm_prop_attn",)
# Where an adapter can run merging (`ModelAdapter.merge_sites`).
MERGE_SITES = ("tower", "projector", "packed")


@dataclass(frozen=True)
class DecoderShape:
    """The sizes of a model's language model that cost formulas need (read once from its config)."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int

    @classmethod
    def from_config(cls, text_config: Any) -> DecoderShape:
        """From a transformers decoder config (Llama, Mistral, Qwen2 names); absent optional fields are derived."""
        num_heads = text_config.num_attention_heads
        return cls(
            num_layers=text_config.num_hidden_layers,
            hidden_size=text_config.hidden_size,
            intermediate_size=text_config.intermediate_size,
            num_heads=num_heads,
            # Multi-head attention configs leave these out (or None): one key/value head per head.
            num_kv_heads=getattr(text_config, "num_key_value_heads", None) or num_heads,
            head_dim=getattr(text_config, "head_dim", None) or text_config.hidden_size // num_heads,
            vocab_size=text_config.vocab_size,
        )


@dataclass(frozen=True)
class ModelParts:
    """The pieces of a multimodal model the tools work with, found by its adapter.

    Attributes:
        tower: the vision encoder (a transformers ``CLIPVisionModel`` or
            ``SiglipVisionModel``); its parameters' device and dtype are the images'.
        projector: the module mapping the selected vision features to the LLM width.
        language_model: the decoder the visual tokens go into (None where the family
            does not expose one).
        encoder_layers: the vision encoder's layers, in order.
        feature_layer: the hidden-state index the model reads (``hidden_states[i]`` is
            the output of encoder layer ``i - 1``; negative counts from the end).
        last_layer: the index of the encoder layer whose output that is.
        drops_class_token: the model drops the class token before the projector.
        encode_images: ``pixel_values -> [features of each image]`` as the model computes them
            for the language model (vision tower, feature selection, projector stage).
        vision_hidden_states: ``pixel_values -> (every hidden state of the tower)`` (index 0:
            embeddings; ``l + 1``: output of layer ``l``), as the model's own call computes them.
        image_feature_owner: the module whose ``encode_images`` call a forward makes (a
            timer may shadow `image_feature_method` on it), or None.
        image_feature_method: the name of that method on ``image_feature_owner``.
        decoder: the language model's sizes (None where the family does not say).
        output_head: the module mapping the last hidden state to vocabulary logits (None where
            the family does not expose one); its weight dtype is the one the KV cache holds.
    """

    tower: nn.Module
    projector: nn.Module
    language_model: nn.Module | None
    encoder_layers: nn.ModuleList
    feature_layer: int
    last_layer: int
    drops_class_token: bool
    encode_images: Callable[..., list]
    vision_hidden_states: Callable[[torch.Tensor], tuple] | None = None
    image_feature_owner: nn.Module | None = None
    image_feature_method: str | None = None
    decoder: DecoderShape | None = None
    output_head: nn.Module | None = None

    @property
    def vision_dtype(self) -> torch.dtype:
        """dtype of the vision tower's weights, which pixel values must match (the LLM may be quantised)."""
        return next(self.tower.parameters()).dtype

    @property
    def vision_device(self) -> torch.device:
        return next(self.tower.parameters()).device


class ModelAdapter(ABC):
    """One model family behind the patch API.

    Construction (``Adapter(model, processor, config)``) checks the config against what the
    class declares it supports (`check_supported`, first, in this base class), validates the
    model and plans every token count without changing anything. `install` changes the model
    (and processor) by installing the adapter's ordered `hooks` under one rollback, and
    `remove` takes them out in reverse order.

    What a family supports is class data, checked in one place (`check_supported`):
        methods: the ``method`` values it runs.
        presets: the ``preset`` values it runs.
        options: the switches of `OPTIONS` it can apply (e.g. ``"llm_prop_attn"``).
        merge_sites: where merging runs (of `MERGE_SITES`), for the reader and the tools.
        display_name: how refusals name the family (its ``family`` when empty).
        limits: why the family runs fewer methods or presets than the package has (quoted in refusals).
        method_refusals: for a method the family refuses for a reason of its own, that reason.

    Attributes every adapter sets in ``__init__``:
        model, processor, config: what it patches, with which settings.
        state: the `PatchState` its hooks share (trace, final map and sizes, observers).
        layers: the vision encoder layers (the handle checks none is already patched).
        default_num_tokens: tower tokens of one image at the model's native size.
        tower_keep_ratio: the keep ratio the tower merges with (1.0: not at all).
    """

    family: ClassVar[str]
    supported: ClassVar[str]
    methods: ClassVar[tuple[str, ...]] = ALL_METHODS
    presets: ClassVar[tuple[str, ...]] = PRESETS
    options: ClassVar[frozenset[str]] = frozenset()
    merge_sites: ClassVar[tuple[str, ...]] = ("tower", "projector")
    limits: ClassVar[str] = ""
    display_name: ClassVar[str] = ""
    method_refusals: ClassVar[dict[str, str]] = {}
    # Whether the prompt's image placeholders come from the processor (so patching without it
    # leaves the user to emit the merged count); False where the model counts features itself.
    processor_counts_placeholders: ClassVar[bool] = True

    model: nn.Module
    processor: Any
    config: PiToMeConfig
    state: PatchState
    layers: nn.ModuleList
    default_num_tokens: int
    tower_keep_ratio: float

    def __init__(self, model: nn.Module, processor, config: PiToMeConfig) -> None:
        self.check_supported(config)
        self.model = model
        self.processor = processor
        self.config = config
        self._installed: list[Hook] = []

    @classmethod
    def check_supported(cls, config: PiToMeConfig) -> None:
        """Refuse a method, preset or option this family does not declare (before anything is touched).

        Raises:
            ValueError: naming the bad value and what the family supports.
        """
        why = f" ({cls.limits})" if cls.limits else ""
        name = cls.display_name or cls.family
        if config.method in cls.method_refusals:
            raise ValueError(
                f"method={config.method!r} {cls.method_refusals[config.method]}; supported: {', '.join(cls.methods)}"
            )
        if config.method not in cls.methods:
            raise ValueError(
                f"{method_label(config.method, config.preset)} is not supported on {name}{why}; supported: "
                f"{', '.join(cls.methods)}; supported presets here: {', '.join(cls.presets)}"
            )
        if config.preset not in cls.presets:
            raise ValueError(
                f"preset={config.preset!r} is not supported on {name}{why}; supported presets here: "
                f"{', '.join(cls.presets)}"
            )
        for option in OPTIONS:
            if getattr(config, option) and option not in cls.options:
                others = sorted({adapter.family for adapter in _adapter_classes() if option in adapter.options})
                raise ValueError(
                    f"{option}=True is not supported for the {cls.family} family; only "
                    f"{', '.join(others) or 'no family'} supports it"
                )

    @classmethod
    @abstractmethod
    def matches(cls, model: nn.Module) -> bool:
        """Whether ``model`` belongs to this family (must not import optional packages)."""

    @classmethod
    @abstractmethod
    def parts(cls, model: nn.Module) -> ModelParts:
        """The `ModelParts` of a model of this family, patched or not."""

    @classmethod
    @abstractmethod
    def geometry(cls, parts: ModelParts, resize: ImageResize | None = None) -> TowerGeometry:
        """The token geometry of the model's tower (anyres families: of one crop), from its parts alone.

        ``resize``: the processor's rule from an original image to the tower's pixels (None: the
        tower's native size). What every count of the family is built on.
        """

    @abstractmethod
    def plan(self, num_tokens: int) -> list[LayerStep]:
        """Merge steps of the tower layers the model reads, for ``num_tokens`` tower inputs."""

    @property
    @abstractmethod
    def num_visual_tokens(self) -> int:
        """Visual tokens per image the language model receives at the native image size."""

    @abstractmethod
    def image_grids(self, height: int, width: int) -> tuple[PatchGrid, ...]:
        """The patch grid(s) the tower sees for one original ``height x width`` image.

        One grid for LLaVA-1.5 (the processed image) and for a Qwen-VL tower (``t x h x w``);
        LLaVA-NeXT: the base crop's grid, then the grid its high-resolution crops tile.
        """

    @abstractmethod
    def visual_tokens_for_image(self, height: int, width: int) -> int:
        """Placeholders the prompt needs for one original (unprocessed) image of ``height x width`` pixels.

        The family applies its own resize rule (the processor's), so the answer is the count the
        patched processor emits. Raises ValueError for a side that is not a positive integer.
        """

    def record_merges(self, enabled: bool) -> None:
        """Keep every tower step's `Merge` in the trace (families whose tower is not merged: nothing)."""
        del enabled  # overridden by adapters whose tower merges

    @abstractmethod
    def hooks(self) -> list[Hook]:
        """Every change the patch makes, in installation order (built in ``__init__``, nothing installed).

        A unit that depends on an earlier one (wraps what it installed, reads what it records in the
        same call) comes after it; removal runs in reverse.
        """

    def install(self) -> None:
        """Install `hooks` in order; on any failure everything already installed is removed, last first."""
        hooks = self.hooks()
        install_in_order(hooks)
        self._installed = hooks
        logger.info("patched %s: %s", type(self.model).__name__, self.describe())

    def remove(self) -> None:
        """Remove what `install` installed, last first, and forget the per-forward state. Idempotent."""
        installed, self._installed = self._installed, []
        remove_in_reverse(installed)
        self.state.clear()

    def describe(self) -> str:
        """One line for the log: method, keep ratio, visual tokens."""
        return (
            f"{self.config.method}, keep_ratio={self.tower_keep_ratio:.4f}, "
            f"{self.num_visual_tokens} visual tokens per image"
        )


def _adapter_classes() -> list[type[ModelAdapter]]:
    """Every concrete adapter class defined so far (for refusals that name who supports what)."""
    found, pending = [], list(ModelAdapter.__subclasses__())
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if "family" in vars(cls) and not getattr(cls, "__abstractmethods__", None):
            found.append(cls)
    return found


__all__ = ["MERGE_SITES", "OPTIONS", "DecoderShape", "ModelAdapter", "ModelParts"]
