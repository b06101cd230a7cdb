"""Where the time and memory of a LLaVA forward go, with and without token merging.

`profile` runs a transformers LLaVA model on one prompt + image (batch ``B``) for a list of
configurations (`RunSpec`: unpatched, or `pitome_mllm.patch` keyword arguments) and
measures, for each:

* **latency per stage**, each on its own clock interval inside the same pass:
  ``vision_tower`` (CLIP forward, merges included), ``merge_tower`` (the merge steps'
  share of it; split into ``merge_tower_decide`` (similarities, energy, matching),
  ``merge_tower_apply`` (reducing the hidden states) and ``merge_tower_trace`` (size and
  source bookkeeping)), ``projector`` (projector + projector-stage merge), ``merge_projector``,
  ``llm_prefill`` (from the projector's output to the first token's logits: scatter into
  the placeholders, decoder, LM head), ``ttft`` (time to first token: the whole prefill
  forward), ``decode_per_token`` (one cached decoder step, greedy), ``decode_total`` and
  ``total``. Warm-up passes are discarded; the ``repeats`` measured passes give medians
  and inter-quartile ranges. Measured passes go round-robin over the runs by default,
  so a change in machine load affects every run alike. On CUDA every boundary is a CUDA event on the current
  stream, read after one synchronisation per pass; on CPU it is ``time.perf_counter``.
  The stage intervals of one pass are disjoint (merges lie inside their stage), so
  ``vision_tower + projector + llm_prefill <= ttft`` and ``ttft + decode_total <= total``
  hold pass by pass.
* **memory per stage**, in one extra pass (the last warm-up pass) so the probes cannot
  disturb the timings: on CUDA the peak allocated / reserved bytes
  (``reset_peak_memory_stats`` at the stage start, ``max_memory_allocated`` at its end);
  on CPU the peak resident set size. Linux's peak RSS (``VmHWM``) is process-wide and
  only grows; writing ``5`` to ``/proc/self/clear_refs`` resets it to the current RSS,
  which gives a true per-stage peak. Where that reset is not allowed, stage peaks are
  the process's peak so far and are flagged ``monotone``. Either way a stage's
  ``peak_increase_bytes`` (peak minus the RSS at its start) is a lower bound when the C
  allocator hands out memory an earlier stage freed without returning it to the OS.
* **KV-cache bytes** after prefill, summed over the cache object's key/value tensors,
  next to the formula ``layers x 2 x kv_heads x head_dim x seq x batch x bytes``.
* **FLOPs**, analytic, from the token counts that actually flow (see `vision_layer_macs`,
  `merge_macs`, `projector_macs`, `llm_prefill_macs`, `llm_decode_macs`), and the ratio
  of measured speed-up to FLOPs speed-up against the unpatched run.

The merge steps are timed by a `MergeTimer`, an observer of the patch
(``handle.add_observer``, `pitome_mllm.hooks.observers`): the hooks announce every
decide / apply / trace step and the projector stage, and nothing in them is replaced.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import inspect
import json
import logging
import math
import os
import platform
import resource
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..hooks.base import remove_hooks
from ..hooks.observers import Observer
from ..models import ModelParts, model_parts
from ..runtime.terminal import plural

logger = logging.getLogger("pitome_mllm")

TIMED_STAGES = (
    "vision_tower",
    "merge_tower",
    "merge_tower_decide",
    "merge_tower_apply",
    "merge_tower_trace",
    "projector",
    "merge_projector",
    "llm_prefill",
    "ttft",
    "decode_per_token",
    "decode_total",
    "total",
)
MEMORY_STAGES = ("vision_tower", "projector", "llm_prefill", "decode")
# Stages compared with the unpatched run (measured speed-up vs FLOPs speed-up).
SPEEDUP_STAGES = ("vision_tower", "llm_prefill", "ttft", "decode_per_token")
DEFAULT_PROMPT = "Describe the image in detail."


# =============================================================================== FLOPs
# Counts are multiply-accumulates (MACs) of the matrix products; FLOPs = 2 x MACs.
# Norms, activations, softmax, residual adds and gathers are left out: they are linear in
# the token count and a few percent of the total.


def vision_layer_macs(num_tokens: int, hidden: int, intermediate: int) -> int:
    """MACs of one ViT encoder layer on ``N`` tokens of width ``C`` with MLP width ``I``.

    ``4NC² + 2N²C + 2NCI``: Q, K, V and output projections (``4NC²``), attention scores
    ``QKᵀ`` and the weighted sum ``AV`` (``N²C`` each, summed over heads), and the two
    MLP matrices (``2NCI``). FLOPs are twice this.
    """
    n, c = num_tokens, hidden
    return 4 * n * c * c + 2 * n * n * c + 2 * n * c * intermediate


def patch_embedding_macs(num_patches: int, hidden: int, patch_size: int, channels: int = 3) -> int:
    """MACs of the patch-embedding convolution: ``patches x (channels x p²) x C``."""
    return num_patches * channels * patch_size * patch_size * hidden


def tome_macs(num_tokens: int, hidden: int) -> int:
    """Similarity MACs of one bipartite-matching step: ``ceil(N/2) x floor(N/2) x C``."""
    return math.ceil(num_tokens / 2) * (num_tokens // 2) * hidden


def pitome_macs(num_graph_tokens: int, r: int, hidden: int) -> int:
    """Similarity MACs of one PiToMe step on ``n`` graph tokens: ``n²C`` for the energy
    graph plus ``r²C`` for the A-to-B matching."""
    return (num_graph_tokens * num_graph_tokens + r * r) * hidden


def merge_macs(steps: Sequence, hidden: int, class_token: bool = True) -> int:
    """Similarity MACs of the tower's merge steps (`LayerStep` list)."""
    total = 0
    for step in steps:
        if step.method == "tome":
            total += tome_macs(step.tokens_in, hidden)
        elif step.method == "pitome":
            total += pitome_macs(step.tokens_in - (1 if class_token else 0), step.r, hidden)
    return total


def projector_merge_macs(num_tokens: int, target_tokens: int | None, width: int) -> int:
    """Similarity MACs of the projector-stage PiToMe steps from ``num_tokens`` down to
    ``target_tokens`` (each step removes at most half; no class token)."""
    total = 0
    while target_tokens is not None and num_tokens > target_tokens:
        r = min(num_tokens - target_tokens, num_tokens // 2)
        total += pitome_macs(num_tokens, r, width)
        num_tokens -= r
    return total


def projector_macs(num_tokens: int, vision_hidden: int, text_hidden: int) -> int:
    """MACs of LLaVA's two-layer MLP projector: ``N x (C_v x D + D x D)``."""
    return num_tokens * (vision_hidden * text_hidden + text_hidden * text_hidden)


@dataclass(frozen=True)
class LLMShape:
    """What the FLOPs and KV-cache formulas need from a decoder config."""

    num_layers: int
    hidden: int
    intermediate: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int

    @classmethod
    def from_config(cls, text_config) -> LLMShape:
        num_heads = text_config.num_attention_heads
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // num_heads
        return cls(
            num_layers=text_config.num_hidden_layers,
            hidden=text_config.hidden_size,
            intermediate=text_config.intermediate_size,
            num_heads=num_heads,
            num_kv_heads=getattr(text_config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            vocab_size=text_config.vocab_size,
        )

    @property
    def projection_macs_per_token(self) -> int:
        """Q, K, V, O projections of one token in one layer: ``H x (2 x heads x d + 2 x kv x d)``."""
        return self.hidden * (2 * self.num_heads * self.head_dim + 2 * self.num_kv_heads * self.head_dim)

    @property
    def mlp_macs_per_token(self) -> int:
        """Gated MLP (gate, up, down) of one token in one layer: ``3HI``."""
        return 3 * self.hidden * self.intermediate


def llm_prefill_macs(shape: LLMShape, seq_len: int, logits_tokens: int = 1) -> int:
    """MACs of a Llama prefill over ``S`` tokens (one sequence), logits for the last token.

    Per layer: ``S x (H(2·h·d + 2·kv·d) + 3HI) + 2 x S² x h·d``, i.e. projections and
    gated MLP, plus ``QKᵀ`` and ``AV`` over the full ``S x S`` score matrix (what the SDPA
    math and memory-efficient kernels compute; flash kernels skip the masked half).
    Plus the LM head on ``logits_tokens`` positions: ``H x V`` each.
    """
    per_layer = (
        seq_len * (shape.projection_macs_per_token + shape.mlp_macs_per_token)
        + 2 * seq_len * seq_len * shape.num_heads * shape.head_dim
    )
    return shape.num_layers * per_layer + logits_tokens * shape.hidden * shape.vocab_size


def llm_decode_macs(shape: LLMShape, context_len: int) -> int:
    """MACs of one cached decode step attending to ``T`` positions (the new one included).

    Per layer: ``H(2·h·d + 2·kv·d) + 3HI + 2 x T x h·d``; plus the LM head ``H x V``.
    """
    per_layer = (
        shape.projection_macs_per_token + shape.mlp_macs_per_token + 2 * context_len * shape.num_heads * shape.head_dim
    )
    return shape.num_layers * per_layer + shape.hidden * shape.vocab_size


def kv_cache_bytes_formula(shape: LLMShape, seq_len: int, batch_size: int, bytes_per_value: int) -> int:
    """``layers x 2 x kv_heads x head_dim x seq x batch x bytes``."""
    return shape.num_layers * 2 * shape.num_kv_heads * shape.head_dim * seq_len * batch_size * bytes_per_value


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


# ===================================================================== machine, stats
def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _mem_total_bytes() -> int | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return None


def machine_info(device: torch.device | str = "cpu") -> dict[str, Any]:
    """The machine a figure was measured on: CPU, threads, memory, GPU, library versions,
    load average (other processes competing for the CPU make CPU timings slower)."""
    import transformers

    device = torch.device(device)
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_bytes": _mem_total_bytes(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "load_average_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info.update(
            gpu=properties.name,
            gpu_memory_bytes=properties.total_memory,
            gpu_capability=f"{properties.major}.{properties.minor}",
            cuda=torch.version.cuda,
        )
    return info


def summarize(samples: Sequence[float]) -> dict[str, float] | None:
    """Median, quartiles, IQR, min, max and count of ``samples`` (None when empty)."""
    if not samples:
        return None
    import numpy as np

    values = np.asarray(samples, dtype=float)
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return {
        "median": float(median),
        "q1": float(q1),
        "q3": float(q3),
        "iqr": float(q3 - q1),
        "min": float(values.min()),
        "max": float(values.max()),
        "n": int(values.size),
    }


# ============================================================================= clocks
class Stopwatch:
    """Time stamps on the host (CPU) or on the CUDA stream (events, read after a sync)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def stamp(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, start, end) -> float:
        if self.cuda:
            return start.elapsed_time(end) / 1000.0
        return end - start

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


class PassClock:
    """Named stamps of one pass, plus the merge intervals recorded during it."""

    def __init__(self, stopwatch: Stopwatch) -> None:
        self.stopwatch = stopwatch
        self.marks: dict[str, Any] = {}
        self.decode_marks: list[Any] = []
        # decide / apply / trace: the three parts of a tower merge step; projector: its stage.
        self.merge_intervals: dict[str, list[tuple[Any, Any]]] = {
            kind: [] for kind in ("decide", "apply", "trace", "projector")
        }

    def mark(self, name: str) -> None:
        self.marks[name] = self.stopwatch.stamp()

    def interval(self, start: str, end: str) -> float | None:
        if start not in self.marks or end not in self.marks:
            return None
        return self.stopwatch.seconds(self.marks[start], self.marks[end])

    def merge_seconds(self, *kinds: str) -> float:
        return sum(self.stopwatch.seconds(a, b) for kind in kinds for a, b in self.merge_intervals[kind])


# ============================================================================= memory
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


# ===================================================================== merge timing
class MergeTimer(Observer):
    """Times every merge stage the patch announces into ``clock`` (when one is set).

    The stages (``decide``, ``apply``, ``trace`` of the tower steps, ``projector``) are the
    kinds of `PassClock.merge_intervals`. Attach with ``handle.add_observer(timer)``.
    """

    def __init__(self) -> None:
        self.clock: PassClock | None = None
        self._starts: list[Any] = []

    def stage_started(self, stage: str, layer_idx: int | None) -> None:
        if self.clock is not None:
            self._starts.append(self.clock.stopwatch.stamp())

    def stage_finished(self, stage: str, layer_idx: int | None) -> None:
        if self.clock is not None and self._starts:
            start = self._starts.pop()
            self.clock.merge_intervals[stage].append((start, self.clock.stopwatch.stamp()))


# ========================================================================= run specs
@dataclass(frozen=True)
class RunSpec:
    """One configuration to profile.

    Attributes:
        label: short name for tables and plots.
        method: ``"unpatched"``, ``"none"``, ``"tome"`` or ``"pitome"``.
        overrides: `pitome_mllm.patch` keyword arguments; None profiles the model as is.
    """

    label: str
    method: str
    overrides: dict[str, Any] | None = None

    @property
    def patched(self) -> bool:
        return self.overrides is not None

    @classmethod
    def unpatched(cls) -> RunSpec:
        return cls("unpatched", "unpatched", None)


def plan_runs(
    methods: Sequence[str] = ("none", "tome", "pitome"),
    budgets: Sequence[int] = (),
    keep_ratios: Sequence[float] = (),
    native_tokens: int = 576,
    preset: str = "reference",
) -> list[RunSpec]:
    """The unpatched baseline, then every method at every budget and keep ratio.

    A budget at or above ``native_tokens`` and a keep ratio of 1.0 are the unpatched
    model (merging nothing costs nothing but the hooks), so they map to the baseline.
    ``method="none"`` merges only at the projector, so it takes budgets, not keep ratios.
    """
    runs = [RunSpec.unpatched()]
    for method in methods:
        for budget in budgets:
            if budget < native_tokens:
                overrides = {"method": method, "target_tokens": int(budget), "preset": preset}
                runs.append(RunSpec(f"{method} k={budget}", method, overrides))
        for keep_ratio in keep_ratios:
            if keep_ratio < 1.0 and method != "none":
                overrides = {"method": method, "keep_ratio": float(keep_ratio), "preset": preset}
                runs.append(RunSpec(f"{method} r={keep_ratio:g}", method, overrides))
    unique: dict[tuple, RunSpec] = {}
    for run in runs:
        key = (run.method, tuple(sorted((run.overrides or {}).items())))
        unique.setdefault(key, run)
    return list(unique.values())


# =========================================================================== settings
@dataclass
class ProfileSettings:
    """How to profile.

    Attributes:
        batch_size: images (and prompts) per pass.
        new_tokens: tokens generated per pass (greedy, EOS ignored so every pass does the
            same work); ``new_tokens - 1`` cached decode steps follow the prefill.
        repeats: measured passes per run.
        warmup: discarded passes per run before the measured ones; the last one also
            measures memory (at least one memory pass always runs).
        vision_only: run only the vision tower and projector (the model's image encoding).
        prompt: the question about the image.
        image: a bundled image name (``astronaut``, ``chelsea``, ``coffee``).
        interleave: measure round-robin (repeat 1 of every run, then repeat 2, ...) so
            that a change in machine load during the profile spreads over all runs
            instead of favouring some; False measures each run's passes back to back.
        progress: show a progress bar.
    """

    batch_size: int = 1
    new_tokens: int = 8
    repeats: int = 5
    warmup: int = 1
    vision_only: bool = False
    prompt: str = DEFAULT_PROMPT
    image: str = "astronaut"
    interleave: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        for name, low in (("batch_size", 1), ("new_tokens", 1), ("repeats", 1), ("warmup", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


# ============================================================================ results
@dataclass
class RunResult:
    """Everything measured for one `RunSpec` (seconds, bytes, MACs)."""

    label: str
    method: str
    config: dict[str, Any] | None
    keep_ratio: float | None
    visual_tokens: int
    visual_tokens_expected: int
    sequence_length: int | None
    tower_tokens_in: list[int]
    observed_layer_tokens: list[int]
    merge_token_counts: list[int]
    merge_token_counts_expected: list[int]
    samples: dict[str, list[float]]
    timings: dict[str, dict[str, float] | None]
    memory: dict[str, dict[str, Any]]
    kv_cache: dict[str, Any] | None
    flops: dict[str, float]
    speedup: dict[str, dict[str, float]] = field(default_factory=dict)

    def median_ms(self, stage: str) -> float | None:
        stats = self.timings.get(stage)
        return None if stats is None else stats["median"] * 1e3


@dataclass
class ProfileReport:
    """A profile: the machine, the settings, the model's shapes and one result per run."""

    machine: dict[str, Any]
    settings: dict[str, Any]
    model: dict[str, Any]
    runs: list[RunResult]

    def to_dict(self) -> dict[str, Any]:
        return {
            "machine": self.machine,
            "settings": self.settings,
            "model": self.model,
            "runs": [dataclasses.asdict(run) for run in self.runs],
        }

    def baseline(self) -> RunResult | None:
        return next((run for run in self.runs if run.method == "unpatched"), None)


# ========================================================================= the model


def _cache_keyword(model: nn.Module) -> str:
    """transformers 5.24 calls the cache argument ``cache``; earlier versions ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _output_cache(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def _build_prompt(processor, question: str) -> str:
    try:
        from ..runtime.loading import build_prompt
    except ImportError:  # the loading helpers are optional here
        build_prompt = None
    if build_prompt is not None:
        return build_prompt(processor, question)
    return f"USER: {getattr(processor, 'image_token', '<image>')}\n{question} ASSISTANT:"


def _model_inputs(model: nn.Module, processor, settings: ProfileSettings, device: torch.device) -> dict:
    from ..assets import load_image

    image = load_image(settings.image)
    prompt = _build_prompt(processor, settings.prompt)
    batch = settings.batch_size
    inputs = processor(images=[image] * batch, text=[prompt] * batch, return_tensors="pt", padding=True)
    moved = {name: tensor.to(device) for name, tensor in inputs.items()}
    moved["pixel_values"] = moved["pixel_values"].to(model_parts(model).vision_dtype)
    return moved


def model_shapes(model: nn.Module) -> dict[str, Any]:
    """The vision and language-model shapes the FLOPs formulas use."""
    config = model.config
    parts = model_parts(model)
    vision = parts.tower.config
    shapes = {
        "vision": {
            "hidden": vision.hidden_size,
            "intermediate": vision.intermediate_size,
            "layers": vision.num_hidden_layers,
            "heads": vision.num_attention_heads,
            "patch_size": vision.patch_size,
            "image_size": vision.image_size,
            "tokens": (vision.image_size // vision.patch_size) ** 2 + 1,
        },
        "llm": dataclasses.asdict(LLMShape.from_config(config.text_config)),
        "vision_feature_layer": parts.feature_layer,
        "vision_feature_select_strategy": "default" if parts.drops_class_token else "full",
    }
    counts: dict[str, int] = {}
    for name, part in (("vision_tower", parts.tower), ("projector", parts.projector)):
        counts[name] = sum(p.numel() for p in part.parameters())
    counts["language_model"] = sum(p.numel() for p in parts.language_model.parameters())
    if hasattr(model, "lm_head"):
        counts["language_model"] += sum(p.numel() for p in model.lm_head.parameters())
    shapes["parameters"] = counts
    return shapes


# ======================================================================== stage hooks
class StageHooks:
    """Forward hooks that stamp the vision tower's and the projector's boundaries.

    Install after patching, so the projector's end stamp follows the projector-stage
    merge hook (forward hooks run in registration order).
    """

    def __init__(self, parts: ModelParts) -> None:
        self.parts = parts
        self.clock: PassClock | None = None
        self.memory: MemoryProbe | None = None
        self.visual_tokens: int | None = None
        self.layer_tokens: list[int] = []
        self.record_layer_tokens = False  # append each layer's input length to layer_tokens
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def install(self) -> None:
        tower, projector = self.parts.tower, self.parts.projector
        self._handles += [
            tower.register_forward_pre_hook(self._stage_start("vision_tower"), prepend=True),
            tower.register_forward_hook(self._stage_end("vision_tower")),
            projector.register_forward_pre_hook(self._stage_start("projector"), prepend=True),
            projector.register_forward_hook(self._projector_end),
        ]
        for layer in self.parts.encoder_layers:
            self._handles.append(layer.register_forward_pre_hook(self._count_layer_tokens, prepend=True))

    def remove(self) -> None:
        remove_hooks(self._handles)

    def _stage_start(self, stage: str) -> Callable:
        def hook(module, args) -> None:
            if self.memory is not None:
                self.memory.begin(stage)
            if self.clock is not None:
                self.clock.mark(f"{stage}_start")

        return hook

    def _stage_end(self, stage: str) -> Callable:
        def hook(module, args, output) -> None:
            if self.clock is not None:
                self.clock.mark(f"{stage}_end")
            if self.memory is not None:
                self.memory.end(stage)

        return hook

    def _projector_end(self, module, args, output) -> None:
        self._stage_end("projector")(module, args, output)
        self.visual_tokens = int(output.shape[1])
        if self.memory is not None:
            self.memory.begin("llm_prefill")

    def _count_layer_tokens(self, module, args) -> None:
        if self.record_layer_tokens and args:
            self.layer_tokens.append(int(args[0].shape[1]))


# ============================================================================= passes
@dataclass
class _PassOutput:
    seconds: dict[str, float]
    decode_steps: list[float]
    kv_cache_bytes: int | None = None
    kv_sequence_length: int | None = None


def _vision_pass(parts: ModelParts, inputs: dict, clock: PassClock) -> _PassOutput:
    clock.mark("start")
    parts.encode_images(inputs["pixel_values"])
    clock.mark("end")
    clock.stopwatch.synchronize()
    seconds = {
        "vision_tower": clock.interval("vision_tower_start", "vision_tower_end"),
        "projector": clock.interval("projector_start", "projector_end"),
        "total": clock.interval("start", "end"),
    }
    return _PassOutput(seconds, [])


def _generation_pass(
    model: nn.Module,
    inputs: dict,
    clock: PassClock,
    new_tokens: int,
    cache_keyword: str,
    memory: MemoryProbe | None,
) -> _PassOutput:
    """Prefill, then ``new_tokens - 1`` greedy cached decode steps, stamping each boundary."""
    clock.mark("start")
    output = model(**inputs, use_cache=True, logits_to_keep=1)
    next_ids = output.logits[:, -1:].argmax(dim=-1)  # [B, 1]
    clock.mark("prefill_end")
    if memory is not None:
        memory.end("llm_prefill")
    cache = _output_cache(output)
    kv_bytes = kv_cache_bytes(cache) if memory is not None else None
    kv_length = cache.get_seq_length() if memory is not None and hasattr(cache, "get_seq_length") else None
    attention_mask = inputs["attention_mask"]
    if memory is not None and new_tokens > 1:
        memory.begin("decode")
    for _ in range(new_tokens - 1):
        attention_mask = torch.cat([attention_mask, torch.ones_like(next_ids)], dim=1)
        output = model(
            input_ids=next_ids,
            attention_mask=attention_mask,
            use_cache=True,
            logits_to_keep=1,
            **{cache_keyword: cache},
        )
        next_ids = output.logits[:, -1:].argmax(dim=-1)
        clock.decode_marks.append(clock.stopwatch.stamp())
    if memory is not None and new_tokens > 1:
        memory.end("decode")
    clock.mark("end")
    clock.stopwatch.synchronize()
    return _PassOutput(_generation_seconds(clock), _decode_steps(clock), kv_bytes, kv_length)


def _decode_steps(clock: PassClock) -> list[float]:
    stamps = [clock.marks["prefill_end"], *clock.decode_marks]
    return [clock.stopwatch.seconds(a, b) for a, b in zip(stamps, stamps[1:], strict=False)]


def _generation_seconds(clock: PassClock) -> dict[str, float]:
    return {
        "vision_tower": clock.interval("vision_tower_start", "vision_tower_end"),
        "projector": clock.interval("projector_start", "projector_end"),
        "llm_prefill": clock.interval("projector_end", "prefill_end"),
        "ttft": clock.interval("start", "prefill_end"),
        "decode_total": clock.interval("prefill_end", "end"),
        "total": clock.interval("start", "end"),
    }


# ============================================================================ profile
@dataclass
class _RunState:
    """One run between its warm-up and its result.

    Attributes:
        spec: what is profiled.
        inputs: the processor's output for this run (placeholders follow the patch).
        samples: seconds per stage of every measured pass.
        probe, memory_output: the memory pass's probe and its output (KV-cache bytes).
        facts: what the patch handle knew (schedule, config, expected token counts) and
            what the hooks saw during the memory pass (visual tokens, layer lengths).
    """

    spec: RunSpec
    inputs: dict
    samples: dict[str, list[float]]
    probe: MemoryProbe | None = None
    memory_output: _PassOutput | None = None
    facts: dict[str, Any] = field(default_factory=dict)


class _Profiler:
    """Holds the model, inputs and clocks while the runs of one `profile` call execute."""

    def __init__(self, model: nn.Module, processor, settings: ProfileSettings, progress: Callable[[], None]) -> None:
        self.model = model
        self.processor = processor
        self.settings = settings
        self.parts = model_parts(model)
        self.device = self.parts.vision_device
        self.stopwatch = Stopwatch(self.device)
        self.cache_keyword = _cache_keyword(model)
        self.merge_timer = MergeTimer()
        self.progress = progress
        self.shapes = model_shapes(model)
        self.llm_shape = LLMShape(**self.shapes["llm"])

    def run_all(self, specs: Sequence[RunSpec]) -> list[RunResult]:
        """Warm up and measure every run; interleaved, the measured passes go round-robin."""
        repeats = self.settings.repeats
        states = []
        if self.settings.interleave:
            states = [self.prepare(spec) for spec in specs]
            for round_index in range(repeats):
                # Rotate the order so no run always follows the same neighbour.
                shift = round_index % len(states)
                for state in states[shift:] + states[:shift]:
                    self.measure(state, passes=1)
        else:
            for spec in specs:
                states.append(self.prepare(spec))
                self.measure(states[-1], passes=repeats)
        return [self._result(state) for state in states]

    # ------------------------------------------------------------------ phases
    @contextlib.contextmanager
    def _applied(self, spec: RunSpec) -> Iterator[tuple[Any, StageHooks]]:
        """The model patched for ``spec`` (or not), with the stage hooks installed after the patch."""
        import pitome_mllm

        handle = pitome_mllm.patch(self.model, self.processor, **spec.overrides) if spec.patched else None
        hooks = StageHooks(self.parts)
        try:
            if handle is not None:
                handle.add_observer(self.merge_timer)
            hooks.install()
            yield handle, hooks
        finally:
            hooks.remove()
            if handle is not None:
                handle.unpatch()

    def prepare(self, spec: RunSpec) -> _RunState:
        """Build the inputs and run the warm-up passes; the last one measures memory."""
        with self._applied(spec) as (handle, hooks):
            inputs = _model_inputs(self.model, self.processor, self.settings, self.device)
            state = _RunState(spec, inputs, {stage: [] for stage in TIMED_STAGES})
            num_warmup = max(self.settings.warmup, 1)
            for index in range(num_warmup):
                measuring_memory = index == num_warmup - 1
                hooks.record_layer_tokens = measuring_memory
                probe = memory_probe_for(self.device) if measuring_memory else None
                output = self._one_pass(inputs, hooks, probe)
                self.progress()
            state.probe, state.memory_output = probe, output
            state.facts = self._facts(handle, hooks)
        return state

    def measure(self, state: _RunState, passes: int) -> None:
        """``passes`` timed passes of one run, appended to its samples."""
        with self._applied(state.spec) as (_, hooks):
            for _ in range(passes):
                output = self._one_pass(state.inputs, hooks, None)
                for stage, value in output.seconds.items():
                    if value is not None:
                        state.samples[stage].append(value)
                # Decode steps of all measured passes are pooled: one sample per token.
                state.samples["decode_per_token"] += output.decode_steps
                self.progress()

    def _one_pass(self, inputs: dict, hooks: StageHooks, probe: MemoryProbe | None) -> _PassOutput:
        clock = PassClock(self.stopwatch)
        hooks.clock, hooks.memory = clock, probe
        self.merge_timer.clock = clock
        try:
            with torch.inference_mode():
                if self.settings.vision_only:
                    result = _vision_pass(self.parts, inputs, clock)
                else:
                    result = _generation_pass(
                        self.model, inputs, clock, self.settings.new_tokens, self.cache_keyword, probe
                    )
        finally:
            hooks.clock, hooks.memory = None, None
            self.merge_timer.clock = None
        result.seconds["merge_tower"] = clock.merge_seconds("decide", "apply", "trace")
        for part in ("decide", "apply", "trace"):
            result.seconds[f"merge_tower_{part}"] = clock.merge_seconds(part)
        result.seconds["merge_projector"] = clock.merge_seconds("projector")
        return result

    # ------------------------------------------------------------ bookkeeping
    def _facts(self, handle, hooks: StageHooks) -> dict[str, Any]:
        """Token counts and config of a run, from the handle (expected) and the hooks (observed)."""
        vision = self.shapes["vision"]
        observed = {
            "visual_tokens": hooks.visual_tokens if hooks.visual_tokens is not None else -1,
            "observed_layer_tokens": list(hooks.layer_tokens),
        }
        if handle is None:
            return observed | {
                "config": None,
                "keep_ratio": 1.0,
                "steps": [],
                "tower_tokens_in": [vision["tokens"]] * vision["layers"],
                "merge_token_counts": [],
                "visual_tokens_expected": self._unpatched_visual_tokens(),
            }
        steps = handle.schedule
        return observed | {
            "config": handle.config.to_dict(),
            "keep_ratio": handle.keep_ratio,
            "steps": steps,
            # Layers after the one LLaVA reads pass their input through: no cost.
            "tower_tokens_in": [step.tokens_in for step in steps],
            "merge_token_counts": list(handle.trace.token_counts) if handle.trace is not None else [],
            "visual_tokens_expected": handle.num_visual_tokens,
        }

    def _result(self, state: _RunState) -> RunResult:
        facts, spec = state.facts, state.spec
        steps = facts["steps"]
        if spec.patched and facts["visual_tokens"] != facts["visual_tokens_expected"]:
            logger.warning(
                "%s: the LLM received %d visual tokens, the handle expected %d",
                spec.label,
                facts["visual_tokens"],
                facts["visual_tokens_expected"],
            )
        seq_len = None if self.settings.vision_only else int(state.inputs["input_ids"].shape[1])
        target = (facts["config"] or {}).get("target_tokens")
        flops = self._flops(steps, facts["tower_tokens_in"], target, seq_len)
        kv = None if self.settings.vision_only else self._kv_cache(state.memory_output, seq_len)
        probe = state.probe
        return RunResult(
            label=spec.label,
            method=spec.method,
            config=facts["config"],
            keep_ratio=facts["keep_ratio"],
            visual_tokens=facts["visual_tokens"],
            visual_tokens_expected=facts["visual_tokens_expected"],
            sequence_length=seq_len,
            tower_tokens_in=facts["tower_tokens_in"],
            observed_layer_tokens=facts["observed_layer_tokens"],
            merge_token_counts=facts["merge_token_counts"],
            merge_token_counts_expected=[step.tokens_out for step in steps if step.method != "none"],
            samples=state.samples,
            timings={stage: summarize(values) for stage, values in state.samples.items()},
            memory={stage: probe.stages[stage] for stage in MEMORY_STAGES if stage in probe.stages}
            | {"probe": probe.kind},
            kv_cache=kv,
            flops=flops,
        )

    def _unpatched_visual_tokens(self) -> int:
        vision = self.shapes["vision"]
        drop = 1 if self.shapes["vision_feature_select_strategy"] == "default" else 0
        return vision["tokens"] - drop

    def _flops(self, steps, tower_tokens_in: list[int], target: int | None, seq_len: int | None) -> dict[str, float]:
        vision, llm = self.shapes["vision"], self.llm_shape
        batch = self.settings.batch_size
        num_patches = vision["tokens"] - 1
        tower_layers = sum(vision_layer_macs(n, vision["hidden"], vision["intermediate"]) for n in tower_tokens_in)
        embed = patch_embedding_macs(num_patches, vision["hidden"], vision["patch_size"])
        tower_merges = merge_macs(steps, vision["hidden"])
        drop = 1 if self.shapes["vision_feature_select_strategy"] == "default" else 0
        tower_out = (steps[-1].tokens_out if steps else vision["tokens"]) - drop
        projector = projector_macs(tower_out, vision["hidden"], llm.hidden)
        projector_merges = projector_merge_macs(tower_out, target, llm.hidden)
        macs = {
            "vision_tower": batch * (tower_layers + embed + tower_merges),
            "merge_tower": batch * tower_merges,
            "projector": batch * (projector + projector_merges),
            "merge_projector": batch * projector_merges,
        }
        if seq_len is not None:
            macs["llm_prefill"] = batch * llm_prefill_macs(llm, seq_len)
            macs["ttft"] = macs["vision_tower"] + macs["projector"] + macs["llm_prefill"]
            decode_steps = self.settings.new_tokens - 1
            if decode_steps:
                # Step i attends to seq_len + i + 1 positions; report the mean step.
                mean_context = seq_len + (decode_steps + 1) / 2
                macs["decode_per_token"] = batch * llm_decode_macs(llm, round(mean_context))
        return {f"{stage}_flops": 2.0 * value for stage, value in macs.items()}

    def _kv_cache(self, memory_output: _PassOutput, seq_len: int) -> dict[str, Any]:
        dtype = self.model.get_output_embeddings().weight.dtype
        bytes_per_value = torch.empty((), dtype=dtype).element_size()
        formula = kv_cache_bytes_formula(self.llm_shape, seq_len, self.settings.batch_size, bytes_per_value)
        return {
            "bytes": memory_output.kv_cache_bytes,
            "formula_bytes": formula,
            "sequence_length": memory_output.kv_sequence_length,
            "bytes_per_value": bytes_per_value,
        }


def _add_speedups(runs: list[RunResult]) -> None:
    """Measured speed-up / FLOPs speed-up of every run against the unpatched one."""
    baseline = next((run for run in runs if run.method == "unpatched"), None)
    if baseline is None:
        return
    for run in runs:
        for stage in SPEEDUP_STAGES:
            base_time, time_ = baseline.timings.get(stage), run.timings.get(stage)
            base_flops, flops = baseline.flops.get(f"{stage}_flops"), run.flops.get(f"{stage}_flops")
            if not (base_time and time_ and base_flops and flops):
                continue
            measured = base_time["median"] / time_["median"]
            by_flops = base_flops / flops
            run.speedup[stage] = {"measured": measured, "flops": by_flops, "measured_over_flops": measured / by_flops}


def profile(
    model: nn.Module,
    processor,
    runs: Sequence[RunSpec] | None = None,
    settings: ProfileSettings | None = None,
    source: str = "",
) -> ProfileReport:
    """Profile ``model`` (a transformers LLaVA, unpatched) under every run in ``runs``.

    Args:
        model, processor: the model and its processor; each patched run patches and
            unpatches them.
        runs: what to profile (default: the unpatched model only); see `plan_runs`.
        settings: batch size, repeats, warm-up, new tokens, vision-only.
        source: a description of the model for the report (``--arch`` name or path).

    Returns:
        A `ProfileReport`; `write_report` saves it as JSON, CSV and plots.

    The model should sit on one device: CUDA stamps are events on that device's current
    stream, and one synchronisation per pass makes them readable.
    """
    from tqdm.auto import tqdm

    import pitome_mllm

    settings = settings or ProfileSettings()
    runs = list(runs or [RunSpec.unpatched()])
    if pitome_mllm.get_patch(model) is not None:
        raise ValueError("profile() needs an unpatched model; call handle.unpatch() first")
    passes_per_run = max(settings.warmup, 1) + settings.repeats
    with tqdm(total=len(runs) * passes_per_run, desc="profiling", unit="pass", disable=not settings.progress) as bar:
        profiler = _Profiler(model, processor, settings, progress=lambda: bar.update(1))
        device = profiler.device
        machine = machine_info(device)
        # CUDA events record on the current device's stream: make it the model's device.
        on_device = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
        with on_device:
            results = profiler.run_all(runs)
    machine["load_average_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    _add_speedups(results)
    settings_dict = dataclasses.asdict(settings)
    settings_dict.update(dtype=str(profiler.parts.vision_dtype).replace("torch.", ""))
    model_info = {"source": source, **profiler.shapes}
    return ProfileReport(machine, settings_dict, model_info, results)


# ============================================================================ output
CSV_COLUMNS = (
    "label",
    "method",
    "keep_ratio",
    "target_tokens",
    "visual_tokens",
    "sequence_length",
)


def _csv_row(run: RunResult) -> dict[str, Any]:
    row: dict[str, Any] = {
        "label": run.label,
        "method": run.method,
        "keep_ratio": round(run.keep_ratio, 6) if run.keep_ratio is not None else "",
        "target_tokens": (run.config or {}).get("target_tokens") or "",
        "visual_tokens": run.visual_tokens,
        "sequence_length": run.sequence_length if run.sequence_length is not None else "",
    }
    for stage in TIMED_STAGES:
        stats = run.timings.get(stage)
        row[f"{stage}_median_ms"] = round(stats["median"] * 1e3, 4) if stats else ""
        row[f"{stage}_iqr_ms"] = round(stats["iqr"] * 1e3, 4) if stats else ""
    tower = run.timings.get("vision_tower")
    merge = run.timings.get("merge_tower")
    row["merge_share_of_tower"] = round(merge["median"] / tower["median"], 4) if tower and merge else ""
    for stage in MEMORY_STAGES:
        entry = run.memory.get(stage)
        row[f"{stage}_peak_increase_bytes"] = entry["peak_increase_bytes"] if entry else ""
        peak_key = "peak_allocated_bytes" if run.memory.get("probe") == "cuda" else "peak_rss_bytes"
        row[f"{stage}_peak_bytes"] = entry[peak_key] if entry else ""
    row["kv_cache_bytes"] = run.kv_cache["bytes"] if run.kv_cache else ""
    row["kv_cache_formula_bytes"] = run.kv_cache["formula_bytes"] if run.kv_cache else ""
    for key, value in run.flops.items():
        row[key] = value
    for stage, ratios in run.speedup.items():
        for key, value in ratios.items():
            row[f"{stage}_speedup_{key}"] = round(value, 4)
    return row


def write_csv(report: ProfileReport, path: str | Path) -> Path:
    rows = [_csv_row(run) for run in report.runs]
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    path = Path(path)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_json(report: ProfileReport, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(report.to_dict(), indent=1, default=str) + "\n")
    return path


def _series(report: ProfileReport) -> dict[str, list[RunResult]]:
    """Runs per method, by visual tokens; every method's line ends at the unpatched run
    (the native token count, where no method merges anything)."""
    baseline = report.baseline()
    by_method: dict[str, list[RunResult]] = {}
    for run in report.runs:
        if run is not baseline:
            by_method.setdefault(run.method, []).append(run)
    for runs in by_method.values():
        if baseline is not None:
            runs.append(baseline)
        runs.sort(key=lambda run: run.visual_tokens)
    if baseline is not None:
        by_method["unpatched"] = [baseline]
    return by_method


# One colour per method in every plot, whichever methods a run profiled (matplotlib's cycle
# would hand them out in the order they happen to appear).
METHOD_COLOURS = {"unpatched": "black", "pitome": "C0", "tome": "C1", "none": "C7", "random": "C2", "pool": "C4",
                  "dominant": "C5"}  # fmt: skip


def method_colour(method: str) -> str:
    return METHOD_COLOURS.get(method, "C9")


def _plot_stages(report: ProfileReport, stages: list[str], value, ylabel: str, title: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(stages), figsize=(4.2 * len(stages), 3.6), squeeze=False)
    for axis, stage in zip(axes[0], stages, strict=True):
        for method, runs in _series(report).items():
            points = [(run.visual_tokens, *value(run, stage)) for run in runs if value(run, stage)[0] is not None]
            if not points:
                continue
            xs, ys, errors = zip(*points, strict=True)
            style = {"marker": "*", "markersize": 12, "linestyle": "none"} if method == "unpatched" else {"marker": "o"}
            axis.errorbar(
                xs,
                ys,
                yerr=[[e[0] for e in errors], [e[1] for e in errors]],
                label=method,
                capsize=3,
                color=method_colour(method),
                **style,
            )
        axis.set_title(stage.replace("_", " "))
        axis.set_xlabel("visual tokens per image")
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    figure.suptitle(
        f"{title} - {report.model.get('source') or 'model'} ({_where(report)}, {report.settings['dtype']})",
        fontsize=10,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _latency_point(run: RunResult, stage: str):
    stats = run.timings.get(stage)
    if not stats:
        return None, None
    median = stats["median"] * 1e3
    return median, (median - stats["q1"] * 1e3, stats["q3"] * 1e3 - median)


def _memory_point(run: RunResult, stage: str):
    if stage == "kv_cache":
        if not run.kv_cache or run.kv_cache["bytes"] is None:
            return None, None
        return run.kv_cache["bytes"] / 2**20, (0.0, 0.0)
    entry = run.memory.get(stage)
    if not entry:
        return None, None
    return entry["peak_increase_bytes"] / 2**20, (0.0, 0.0)


def plot_report(report: ProfileReport, output_dir: str | Path, stem: str = "profile") -> dict[str, Path]:
    """``<stem>_latency.png`` and ``<stem>_memory.png``: stages against visual tokens, one line per method.

    Latency points are medians with IQR error bars; memory points are the stage's peak
    increase (and the KV-cache bytes after prefill).
    """
    output_dir = Path(output_dir)
    vision_only = report.settings.get("vision_only")
    latency_stages = (
        ["vision_tower", "merge_tower", "projector"]
        if vision_only
        else ["vision_tower", "llm_prefill", "ttft", "decode_per_token"]
    )
    memory_stages = ["vision_tower", "projector"] if vision_only else ["vision_tower", "llm_prefill", "kv_cache"]
    latency = output_dir / f"{stem}_latency.png"
    memory = output_dir / f"{stem}_memory.png"
    _plot_stages(report, latency_stages, _latency_point, "ms (median, IQR)", "latency", latency)
    _plot_stages(report, memory_stages, _memory_point, "MiB (peak increase / bytes)", "memory", memory)
    return {"latency_png": latency, "memory_png": memory}


def write_report(report: ProfileReport, output_dir: str | Path, stem: str = "profile") -> dict[str, Path]:
    """Write ``<stem>.json``, ``<stem>.csv``, ``<stem>_latency.png`` and ``<stem>_memory.png``."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": write_json(report, output_dir / f"{stem}.json"),
        "csv": write_csv(report, output_dir / f"{stem}.csv"),
    }
    paths.update(plot_report(report, output_dir, stem))
    return paths


def _ms(stats: dict[str, float] | None) -> str:
    if not stats:
        return "-"
    return f"{stats['median'] * 1e3:.1f} ±{stats['iqr'] * 1e3 / 2:.1f}"


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.0f}"


def _gflops(flops: float) -> str:
    return f"{flops / 1e9:.4g}"


def _speedup_cell(run: RunResult, stage: str) -> str:
    ratio = run.speedup.get(stage)
    return f"{ratio['measured']:.2f}x / {ratio['flops']:.2f}x" if ratio else "-"


def _memory_cell(run: RunResult, stage: str) -> str:
    entry = run.memory.get(stage)
    return _mib(entry["peak_increase_bytes"] if entry else None)


def latency_rows(report: ProfileReport) -> tuple[list[str], list[list[str]]]:
    """Columns and rows of the latency table (ms, median ± half the IQR)."""
    vision_only = report.settings.get("vision_only")
    columns = ["run", "visual tokens", "keep ratio", "tower", "merge share", "projector"]
    if not vision_only:
        columns += ["LLM prefill", "TTFT", "decode / token", "total"]
    rows = []
    for run in report.runs:
        tower, merge = run.timings.get("vision_tower"), run.timings.get("merge_tower")
        share = f"{merge['median'] / tower['median']:.1%}" if tower and merge and tower["median"] else "-"
        row = [
            run.label,
            str(run.visual_tokens),
            f"{run.keep_ratio:.4f}",
            _ms(tower),
            share,
            _ms(run.timings.get("projector")),
        ]
        if not vision_only:
            row += [_ms(run.timings.get(stage)) for stage in ("llm_prefill", "ttft", "decode_per_token", "total")]
        rows.append(row)
    return columns, rows


def resource_rows(report: ProfileReport) -> tuple[list[str], list[list[str]]]:
    """Columns and rows of the memory / FLOPs / speed-up table."""
    vision_only = report.settings.get("vision_only")
    memory_unit = "peak +MiB" if report.runs and report.runs[0].memory.get("probe") == "cuda" else "peak RSS +MiB"
    columns = ["run", "visual tokens", f"tower {memory_unit}", "tower GFLOPs", "tower speed-up meas / FLOPs"]
    if not vision_only:
        columns += ["seq", f"prefill {memory_unit}", "KV-cache MiB", "prefill GFLOPs", "TTFT speed-up meas / FLOPs"]
    rows = []
    for run in report.runs:
        row = [
            run.label,
            str(run.visual_tokens),
            _memory_cell(run, "vision_tower"),
            _gflops(run.flops["vision_tower_flops"]),
            _speedup_cell(run, "vision_tower"),
        ]
        if not vision_only:
            row += [
                str(run.sequence_length),
                _memory_cell(run, "llm_prefill"),
                _mib(run.kv_cache["bytes"] if run.kv_cache else None),
                _gflops(run.flops["llm_prefill_flops"]),
                _speedup_cell(run, "ttft"),
            ]
        rows.append(row)
    return columns, rows


def _where(report: ProfileReport) -> str:
    machine = report.machine
    return machine.get("gpu") or f"{machine['cpu']}, {plural(machine['torch_threads'], 'thread')}"


def publish_report(report: ProfileReport, output_dir: str | Path, stem: str) -> dict[str, Path]:
    """Print the table, the machine and the markdown table, and write the report files (benchmark scripts)."""
    print_table(report)
    paths = write_report(report, output_dir, stem)
    machine = report.machine
    print(
        f"\nmachine: {machine.get('gpu') or machine['cpu']}, {machine['torch_threads']} torch threads, "
        f"torch {machine['torch']}, load average before/after {machine['load_average_1_5_15']} / "
        f"{machine['load_average_after']}"
    )
    print(markdown_table(report))
    print("\nwrote " + ", ".join(str(path) for path in paths.values()))
    return paths


def print_table(report: ProfileReport, stream=None) -> None:
    """The latency table and the memory / FLOPs table, fitted to the terminal (`terminal.render_table`)."""
    from ..runtime.terminal import output_width, render_table

    stream = stream or sys.stdout
    settings = report.settings
    header = (
        f"{report.model.get('source') or 'model'} on {_where(report)} ({settings['dtype']}, batch "
        f"{settings['batch_size']}, {plural(settings['repeats'], 'repeat')})"
    )
    for title, (columns, rows) in (
        (f"latency, ms (median ± IQR/2) - {header}", latency_rows(report)),
        ("memory, FLOPs, speed-up against the unpatched model", resource_rows(report)),
    ):
        print(render_table(columns, rows, title=title, width=output_width(stream)) + "\n", file=stream)


def markdown_table(report: ProfileReport) -> str:
    """Both tables as GitHub markdown."""
    parts = []
    for columns, rows in (latency_rows(report), resource_rows(report)):
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


__all__ = [
    "LLMShape",
    "ProfileReport",
    "ProfileSettings",
    "RunResult",
    "RunSpec",
    "tome_macs",
    "kv_cache_bytes",
    "kv_cache_bytes_formula",
    "latency_rows",
    "llm_decode_macs",
    "llm_prefill_macs",
    "machine_info",
    "markdown_table",
    "merge_macs",
    "MergeTimer",
    "patch_embedding_macs",
    "pitome_macs",
    "plan_runs",
    "plot_report",
    "print_table",
    "profile",
    "projector_macs",
    "projector_merge_macs",
    "resource_rows",
    "summarize",
    "vision_layer_macs",
    "write_csv",
    "write_json",
    "write_report",
]
