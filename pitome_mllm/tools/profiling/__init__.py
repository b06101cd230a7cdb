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

from .clock import (
    PassClock,
    Stopwatch,
    summarize,
)
from .compiled import compiled_forward, dynamo_counts
from .flops import (
    LLMShape,
    kv_cache_bytes_formula,
    llm_decode_macs,
    llm_prefill_macs,
    merge_macs,
    patch_embedding_macs,
    patch_merger_macs,
    pitome_macs,
    projector_macs,
    projector_merge_macs,
    tome_macs,
    vision_layer_macs,
)
from .machine import machine_info
from .memory import (
    CudaMemoryProbe,
    MemoryProbe,
    RssMemoryProbe,
    current_rss_bytes,
    kv_cache_bytes,
    memory_probe_for,
    peak_rss_bytes,
    release_free_heap,
    reset_peak_rss,
)
from .report import (
    CSV_COLUMNS,
    METHOD_COLOURS,
    latency_rows,
    markdown_table,
    method_colour,
    plot_report,
    print_table,
    publish_report,
    resource_rows,
    write_csv,
    write_json,
    write_report,
)
from .runner import (
    DEFAULT_PROMPT,
    MEMORY_STAGES,
    SPEEDUP_STAGES,
    TIMED_STAGES,
    MergeTimer,
    ProfileReport,
    ProfileSettings,
    RunResult,
    RunSpec,
    StageHooks,
    model_shapes,
    plan_runs,
    profile,
)

__all__ = [
    "CSV_COLUMNS",
    "CudaMemoryProbe",
    "DEFAULT_PROMPT",
    "LLMShape",
    "MEMORY_STAGES",
    "METHOD_COLOURS",
    "MemoryProbe",
    "MergeTimer",
    "PassClock",
    "ProfileReport",
    "ProfileSettings",
    "RssMemoryProbe",
    "RunResult",
    "RunSpec",
    "SPEEDUP_STAGES",
    "StageHooks",
    "Stopwatch",
    "TIMED_STAGES",
    "compiled_forward",
    "current_rss_bytes",
    "kv_cache_bytes",
    "kv_cache_bytes_formula",
    "latency_rows",
    "dynamo_counts",
    "llm_decode_macs",
    "llm_prefill_macs",
    "machine_info",
    "markdown_table",
    "memory_probe_for",
    "merge_macs",
    "method_colour",
    "model_shapes",
    "patch_embedding_macs",
    "patch_merger_macs",
    "peak_rss_bytes",
    "pitome_macs",
    "plan_runs",
    "plot_report",
    "print_table",
    "profile",
    "projector_macs",
    "projector_merge_macs",
    "publish_report",
    "release_free_heap",
    "reset_peak_rss",
    "resource_rows",
    "summarize",
    "tome_macs",
    "vision_layer_macs",
    "write_csv",
    "write_json",
    "write_report",
]
