"""pitome-mllm: spectrum-preserving token merging (PiToMe) for LLaVA-style multimodal LLMs.

>>> import pitome_mllm
>>> handle = pitome_mllm.patch(model, processor, keep_ratio=0.9)   # doctest: +SKIP
>>> handle.num_visual_tokens                                        # doctest: +SKIP
54

The merge algorithms (`pitome_mllm.merge`) and schedules (`pitome_mllm.schedule`)
import no transformers; the patching API loads lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

from .config import PiToMeConfig  # noqa: E402  (light: no transformers)

if TYPE_CHECKING:
    from .api import PatchHandle, get_patch, patch, patched

_LAZY = {"patch", "patched", "get_patch", "PatchHandle"}


def __getattr__(name: str):
    if name in _LAZY:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'pitome_mllm' has no attribute {name!r}")


__all__ = ["PatchHandle", "PiToMeConfig", "__version__", "get_patch", "patch", "patched"]
