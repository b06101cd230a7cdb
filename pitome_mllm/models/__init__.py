"""Model adapters: one module per model family; the only place that knows attribute paths."""

from __future__ import annotations

from torch import nn

from . import llava_hf, llava_next, llava_original

ADAPTER_MODULES = (llava_next, llava_hf, llava_original)


def supported_families() -> str:
    return "; ".join(module.SUPPORTED for module in ADAPTER_MODULES)


def find_adapter(model: nn.Module):
    """The adapter class for ``model``.

    Each adapter module exposes ``SUPPORTED`` (a description), ``matches(model)`` and
    ``ADAPTER``, a class constructed as ``ADAPTER(model, processor, config)`` that validates
    and plans without touching the model, with ``install()`` / ``remove()``,
    ``num_visual_tokens``, ``tower_keep_ratio``, ``plan(num_tokens)``, ``default_num_tokens``,
    ``layers``, ``tower`` (a `TowerMerger`) and ``projector_merger``.

    Raises:
        ValueError: no adapter supports it; the message names what is supported.
    """
    for module in ADAPTER_MODULES:
        if module.matches(model):
            return module.ADAPTER
    raise ValueError(f"unsupported model {type(model).__name__}; supported: {supported_families()}")
