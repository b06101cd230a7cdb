"""Memory probes: peak CUDA memory or peak resident set size per stage, and the bytes a KV cache holds."""

from __future__ import annotations

import contextlib
import resource
from pathlib import Path
from typing import Any

import torch


def kv_cache_bytes(cache) -> int:
    """Bytes held by the key and value tensors of a transformers cache (or legacy tuples)."""

    def size(tensor) -> int:
        return tensor.numel() * tensor.element_size() if isinstance(tensor, torch.Tensor) else 0

    layers = getattr(cache, "layers", None)
    if layers is not None:  # transformers >= 4.56 Cache with per-layer objects
        return sum(size(getattr(layer, "keys", None)) + size(getattr(layer, "values", None)) for layer in layers)
    if hasattr(cache, "key_cache"):  # older DynamicCache
        return sum(size(t) for t in cache.key_cache) + sum(size(t) for t in cache.value_cache)
    if isinstance(cache, (tuple, list)):  # legacy ((key, value), ...) per layer
        return sum(size(t) for layer in cache for t in layer)
    raise TypeError(f"cannot read the tensors of a {type(cache).__name__} cache")


_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def _status_kib(field_name: str) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return None


def reset_peak_rss() -> bool:
    """Reset the process's peak RSS (``VmHWM``) to its current RSS; False if not allowed."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def current_rss_bytes() -> int:
    kib = _status_kib("VmRSS")
    return kib * 1024 if kib is not None else 0


def peak_rss_bytes() -> int:
    """``VmHWM`` (peak RSS since start or the last reset); ``ru_maxrss`` where /proc is absent."""
    kib = _status_kib("VmHWM")
    if kib is None:
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib * 1024


class MemoryProbe:
    """Per-stage peaks for sequential stages: ``begin(stage)`` ... ``end(stage)``."""

    kind = "none"

    def __init__(self) -> None:
        self.stages: dict[str, dict[str, Any]] = {}

    def begin(self, stage: str) -> None:  # pragma: no cover - overridden
        pass

    def end(self, stage: str) -> None:  # pragma: no cover - overridden
        pass


class CudaMemoryProbe(MemoryProbe):
    """Peak allocated / reserved bytes per stage from the CUDA caching allocator."""

    kind = "cuda"

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self._before = 0

    def begin(self, stage: str) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)
        self._before = torch.cuda.memory_allocated(self.device)

    def end(self, stage: str) -> None:
        # Allocation happens when a kernel is launched, so the host-side peak is final here.
        peak = torch.cuda.max_memory_allocated(self.device)
        self.stages[stage] = {
            "allocated_before_bytes": self._before,
            "peak_allocated_bytes": peak,
            "peak_reserved_bytes": torch.cuda.max_memory_reserved(self.device),
            "peak_increase_bytes": peak - self._before,
        }


def release_free_heap() -> bool:
    """Return the C heap's free pages to the OS (glibc ``malloc_trim(0)``); False elsewhere.

    Memory that an earlier stage (or run) freed stays resident in the heap, and a later
    stage that reuses it never raises the RSS: its peak increase would read as zero.
    Trimming first makes the increase count the pages the stage really touches.
    """
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            import ctypes

            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if not _MALLOC_TRIM:
        return False
    _MALLOC_TRIM(0)
    return True


_MALLOC_TRIM = None


class RssMemoryProbe(MemoryProbe):
    """Peak resident set size per stage (Linux ``VmHWM``, reset per stage where allowed).

    At each stage start the heap's free pages go back to the OS (`release_free_heap`)
    and the peak is reset to the current RSS; at the end, ``VmHWM`` is the stage's peak.
    """

    kind = "rss"

    def __init__(self) -> None:
        super().__init__()
        self.resettable = reset_peak_rss()
        self._before = 0

    def begin(self, stage: str) -> None:
        release_free_heap()
        if self.resettable:
            reset_peak_rss()
        self._before = current_rss_bytes()

    def end(self, stage: str) -> None:
        peak = peak_rss_bytes()
        self.stages[stage] = {
            "rss_before_bytes": self._before,
            "peak_rss_bytes": peak,
            "peak_increase_bytes": max(0, peak - self._before),
            "monotone": not self.resettable,
        }


def memory_probe_for(device: torch.device) -> MemoryProbe:
    return CudaMemoryProbe(device) if device.type == "cuda" else RssMemoryProbe()
