"""Model adapters: one module per model family; the only place that knows attribute paths."""

from __future__ import annotations

from torch import nn

from . import llava_hf

ADAPTER_MODULES = (llava_hf,)


def supported_families() -> str:
    return "; ".join(module.SUPPORTED for module in ADAPTER_MODULES)


def find_adapter(model: nn.Module):
    """The adapter class for ``model``.

    Raises:
        ValueError: no adapter supports it; the message names what is supported.
    """
    for module in ADAPTER_MODULES:
        if module.matches(model):
            return module.LlavaHFAdapter
    raise ValueError(f"unsupported model {type(model).__name__}; supported: {supported_families()}")
