"""Models the package builds for its own commands and tests: tiny random LLaVA models (the offline
demo, `serve tiny`), real architectures with random weights (`profile --arch`), and a CLIP tower
with real (DINOv2) weights (the proxy benchmarks). Model-specific construction lives here and in
`pitome_mllm.models` only."""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .tiny import DEMO_SPEC, tiny_llava_checkpoint

# Loaded on first use: the builders import transformers, and the light modules here (architecture specs) do not.
_LAZY = {"tiny_llava_checkpoint": "tiny", "DEMO_SPEC": "tiny"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DEMO_SPEC", "tiny_llava_checkpoint"]
