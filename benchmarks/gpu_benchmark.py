"""LLaVA-1.5-7B on one NVIDIA GPU: what PiToMe saves at 576 / 192 / 128 / 64 visual tokens, eager and compiled.

Run it through ``bash benchmarks/gpu.sh`` (benchmarks/PROFILING.md says what it measures and needs). The
model has LLaVA-1.5-7B's shapes (CLIP ViT-L/14-336, MLP projector, Vicuna-7B) with random weights in fp16,
SDPA attention, built directly on the GPU by `pitome_mllm.zoo.architectures.build_arch`: latency and
memory at a token budget depend on the shapes, not on the weight values, and building in place takes
seconds where saving 13.5 GB of weights and loading them back would take minutes of the run's budget
and 14 GB of disk while measuring nothing more.

For every cell (mode x visual tokens x batch), one prefill forward (``logits_to_keep=1``) per pass:

* ``ttft``: the whole forward (time to first token); ``vision_tower``, ``projector`` and ``llm_prefill``
  (projector output to logits) on the same clock, between forward hooks on the tower and projector;
* ``merge_share``: the merge steps' share of the tower time (eager only: inside a compiled graph the
  merge is fused with the layers and cannot be timed apart);
* peak memory of one extra pass (CUDA: ``max_memory_allocated``; CPU: peak RSS) and the KV cache's bytes;
* compiled cells: the vision tower's forward under ``torch.compile`` (``mode="reduce-overhead"``: CUDA
  graphs, on CUDA), the language model eager; the graphs and graph breaks Dynamo made and the first
  pass's time (compilation included).

576 tokens is the unpatched model; fewer is PiToMe (``--method``) with ``target_tokens``. Cells run eager
first, then compiled; a cell that would start after ``--budget-s`` seconds is recorded as skipped, one
that fails is recorded with its error and the run goes on, and the results are rewritten after every
cell, so a run cut short still leaves what it measured.

``--device cpu --tiny`` runs the same code on a tiny random LLaVA (`pitome_mllm.zoo.tiny`, 24 layers at
576 tower tokens, narrow widths) in seconds: the test of this script.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
# Import name -> what to install. The package itself goes in with ``pip install --no-deps``; the rest is
# what transformers brings (tokenizers, numpy, safetensors) plus Pillow for the processor's images.
REQUIRED_PACKAGES = {
    "torch": "torch>=2.11",
    "transformers": "transformers",
    "tokenizers": "tokenizers",
    "numpy": "numpy",
    "safetensors": "safetensors",
    "PIL": "pillow",
    "pitome_mllm": "pitome-mllm (pip install --no-deps -e .)",
}
STAGES = ("ttft", "vision_tower", "projector", "llm_prefill", "merge_tower")


def missing_packages() -> list[str]:
    """What to install for each required package that cannot be imported."""
    return [wanted for name, wanted in REQUIRED_PACKAGES.items() if importlib.util.find_spec(name) is None]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="default cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny random LLaVA instead of LLaVA-1.5-7B shapes")
    parser.add_argument("--arch", default="llava-1.5-7b", help="real-size architecture (default llava-1.5-7b)")
    parser.add_argument(
        "--tokens",
        type=int,
        nargs="+",
        default=[576, 64, 192, 128],
        help="visual tokens per image, in the order run (default 576 64 192 128: the compiled cells most "
        "worth having first, should the time budget run out); the model's own count is the unpatched model",
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="default 1 8")
    parser.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=("eager", "compiled"))
    parser.add_argument("--method", default="pitome", help="reduction method below 576 tokens (default pitome)")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per cell (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed passes per cell, the first compiles")
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode (default: reduce-overhead on cuda)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default inductor)")
    parser.add_argument("--budget-s", type=float, default=360.0, help="start no cell after this many seconds")
    parser.add_argument("--output", type=Path, default=RESULTS, help="folder for the .json and .md results")
    parser.add_argument("--stem", default=None, help="file name stem (default gpu_benchmark_<device name>)")
    args = parser.parse_args(argv)
    if args.compile_mode is None and args.device == "cuda":
        args.compile_mode = "reduce-overhead"
    return args


def build_model(args: argparse.Namespace):
    """``(model, processor, description)`` on ``args.device``: fp16 real shapes, or the fp32 tiny model."""
    import torch

    if args.tiny:
        from pitome_mllm.zoo.tiny import TEST_SPEC, build_tiny_llava

        model, processor = build_tiny_llava(TEST_SPEC)
        return model.to(args.device), processor, "tiny random LLaVA (zoo.tiny.TEST_SPEC: 64 visual tokens), fp32"
    from pitome_mllm.zoo.architectures import build_arch

    dtype = torch.float16 if args.device == "cuda" else torch.float32
    model, processor = build_arch(args.arch, device=args.device, dtype=dtype)
    return model, processor, f"{args.arch} shapes, random weights, {str(dtype).replace('torch.', '')}, SDPA"


def model_inputs(processor, batch: int, device: str, dtype) -> dict:
    """``batch`` copies of one LLaVA-1.5 prompt with the bundled astronaut image (placeholders per the patch)."""
    from pitome_mllm.assets import load_image

    image = load_image("astronaut")
    prompt = f"USER: {processor.image_token}\nDescribe the image in detail. ASSISTANT:"
    inputs = processor(images=[image] * batch, text=[prompt] * batch, return_tensors="pt", padding=True)
    moved = {name: tensor.to(device) for name, tensor in inputs.items()}
    moved["pixel_values"] = moved["pixel_values"].to(dtype)
    return moved


class PeakMemory:
    """Peak memory of one pass: CUDA's allocator peak, or the process's peak RSS on CPU."""

    def __init__(self, device: str) -> None:
        self.cuda = device == "cuda"

    def start(self) -> None:
        import torch

        from pitome_mllm.tools.profiling import reset_peak_rss

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            reset_peak_rss()

    def peak_bytes(self) -> int:
        import torch

        from pitome_mllm.tools.profiling import peak_rss_bytes

        if self.cuda:
            torch.cuda.synchronize()
            return int(torch.cuda.max_memory_allocated())
        return peak_rss_bytes()


def prefill_pass(model, inputs: dict, clock) -> Any:
    """One prefill forward with stamps at its start and end (the hooks stamp the stages in between)."""
    clock.mark("start")
    output = model(**inputs, use_cache=True, logits_to_keep=1)
    output.logits[:, -1].argmax(dim=-1)
    clock.mark("prefill_end")
    clock.stopwatch.synchronize()
    return output


def output_cache(output):
    """The KV cache of a forward's output (transformers 5.24 names it ``cache``, earlier ``past_key_values``)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def pass_seconds(clock) -> dict[str, float | None]:
    return {
        "ttft": clock.interval("start", "prefill_end"),
        "vision_tower": clock.interval("vision_tower_start", "vision_tower_end"),
        "projector": clock.interval("projector_start", "projector_end"),
        "llm_prefill": clock.interval("projector_end", "prefill_end"),
        "merge_tower": clock.merge_seconds("decide", "apply", "trace"),
    }


def native_visual_tokens(model) -> int:
    """Visual tokens per image of the unpatched model (576 for LLaVA-1.5)."""
    from pitome_mllm.models import model_geometry, model_parts

    return model_geometry(model).default_num_tokens - (1 if model_parts(model).drops_class_token else 0)


def run_cell(
    model, processor, tokens: int, native_tokens: int, batch: int, mode: str, args: argparse.Namespace
) -> dict[str, Any]:
    """Patch for ``tokens`` (not at ``native_tokens``), maybe compile the tower, warm up, measure memory, time."""
    import contextlib

    import torch

    import pitome_mllm
    from pitome_mllm.models import model_parts
    from pitome_mllm.tools.profiling import PassClock, Stopwatch, compiled_forward, dynamo_counts, kv_cache_bytes
    from pitome_mllm.tools.profiling.runner import MergeTimer, StageHooks

    parts = model_parts(model)
    overrides = {"method": args.method, "target_tokens": tokens} if tokens < native_tokens else None
    handle = pitome_mllm.patch(model, processor, **overrides) if overrides is not None else None
    hooks, merge_timer = StageHooks(parts), MergeTimer()
    compiled = mode == "compiled"
    try:
        if handle is not None and not compiled:
            handle.add_observer(merge_timer)  # its clock stamps would break a compiled graph
        hooks.install()
        inputs = model_inputs(processor, batch, args.device, parts.vision_dtype)
        compile_options = {"backend": args.compile_backend, "dynamic": False}
        if args.compile_mode:
            compile_options["mode"] = args.compile_mode
        if compiled:
            torch._dynamo.reset()  # each compiled cell compiles from scratch, as a fresh process would
        compiling = compiled_forward(parts.tower, **compile_options) if compiled else contextlib.nullcontext()
        stopwatch, memory = Stopwatch(torch.device(args.device)), PeakMemory(args.device)
        samples: dict[str, list[float]] = {stage: [] for stage in STAGES}
        counts_before = dynamo_counts()
        with compiling, torch.inference_mode():
            first_pass_s = None
            for index in range(max(args.warmup, 1) + 1 + args.repeats):
                measuring_memory = index == max(args.warmup, 1)
                if compiled and args.compile_mode == "reduce-overhead":
                    torch.compiler.cudagraph_mark_step_begin()
                clock = PassClock(stopwatch)
                hooks.clock, merge_timer.clock = clock, clock
                if measuring_memory:
                    memory.start()
                begin = time.perf_counter()
                output = prefill_pass(model, inputs, clock)
                if index == 0:
                    first_pass_s = time.perf_counter() - begin
                if measuring_memory:
                    peak_bytes = memory.peak_bytes()
                    kv_bytes = kv_cache_bytes(output_cache(output))
                elif index > max(args.warmup, 1):
                    for stage, value in pass_seconds(clock).items():
                        if value is not None:
                            samples[stage].append(value)
                hooks.clock, merge_timer.clock = None, None
                del output
        counts_after = dynamo_counts()
        medians = {f"{stage}_ms": statistics.median(values) * 1e3 for stage, values in samples.items() if values}
        merge_share = None
        if handle is not None and not compiled:
            merge_share = medians["merge_tower_ms"] / medians["vision_tower_ms"]
        else:
            medians.pop("merge_tower_ms", None)
        return {
            "mode": mode,
            "tokens": tokens,
            "batch": batch,
            "visual_tokens": hooks.visual_tokens,
            "visual_tokens_expected": handle.num_visual_tokens if handle is not None else None,
            "sequence_length": int(inputs["input_ids"].shape[1]),
            **medians,
            "merge_share": merge_share,
            "peak_memory_bytes": peak_bytes,
            "kv_cache_bytes": kv_bytes,
            "first_pass_s": first_pass_s,
            "graphs": counts_after["graphs"] - counts_before["graphs"] if compiled else None,
            "graph_breaks": counts_after["graph_breaks"] - counts_before["graph_breaks"] if compiled else None,
            "samples_ms": {stage: [value * 1e3 for value in values] for stage, values in samples.items()},
        }
    finally:
        hooks.remove()
        if handle is not None:
            handle.unpatch()


def run_cell_or_error(model, processor, tokens, native_tokens, batch, mode, args) -> dict[str, Any]:
    """`run_cell`, or the error it raised: one failing cell (a compile error, out of memory) must not cost
    the cells after it their only chance on a lent machine."""
    import torch

    try:
        cell = run_cell(model, processor, tokens, native_tokens, batch, mode, args)
    except Exception as error:  # noqa: BLE001 - recorded in the results and printed
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        message = f"{type(error).__name__}: {error}".splitlines()[0][:300]
        print(f"{mode:>8} tokens={tokens:>3} B={batch}: failed: {message}", flush=True)
        return {"mode": mode, "tokens": tokens, "batch": batch, "error": message}
    print(
        f"{mode:>8} tokens={cell['visual_tokens']:>3} B={batch}: TTFT {cell['ttft_ms']:.1f} ms, "
        f"tower {cell['vision_tower_ms']:.1f} ms, graph breaks {cell['graph_breaks']}",
        flush=True,
    )
    return cell


def fmt(value, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def markdown(report: dict[str, Any]) -> str:
    """One table of every cell, with the machine and the model above it."""
    machine = report["machine"]
    where = machine.get("gpu") or machine["cpu"]
    lines = [
        f"Machine: {where}; torch {machine['torch']}, transformers {machine['transformers']}, CUDA "
        f"{machine.get('cuda', '-')}. Model: {report['model']}. {report['settings']['repeats']} timed passes per "
        f"cell (medians); compiled: the vision tower under torch.compile (mode {report['settings']['compile_mode']}).",
        "",
        "| mode | tokens | B | TTFT ms | tower ms | merge share | projector ms | prefill ms | peak GiB | KV MiB "
        "| graphs | breaks | first pass s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for cell in report["cells"]:
        if "skipped" in cell or "error" in cell:
            why = f"skipped: {cell['skipped']}" if "skipped" in cell else f"failed: {cell['error']}"
            lines.append(f"| {cell['mode']} | {cell['tokens']} | {cell['batch']} | {why.replace('|', '/')} |")
            continue
        lines.append(
            f"| {cell['mode']} | {cell['visual_tokens']} | {cell['batch']} | {fmt(cell.get('ttft_ms'))} "
            f"| {fmt(cell.get('vision_tower_ms'))} | {fmt(cell['merge_share'], '.1%')} "
            f"| {fmt(cell.get('projector_ms'), '.2f')} | {fmt(cell.get('llm_prefill_ms'))} "
            f"| {cell['peak_memory_bytes'] / 2**30:.2f} | {cell['kv_cache_bytes'] / 2**20:.0f} "
            f"| {fmt(cell['graphs'], 'd')} | {fmt(cell['graph_breaks'], 'd')} | {fmt(cell['first_pass_s'])} |"
        )
    return "\n".join(lines) + "\n"


def write_results(report: dict[str, Any], output: Path, stem: str) -> None:
    output.mkdir(parents=True, exist_ok=True)
    (output / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (output / f"{stem}.md").write_text(markdown(report))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = missing_packages()
    if missing:
        print(f"gpu_benchmark: missing packages: {', '.join(missing)}", file=sys.stderr)
        return 2
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_benchmark: --device cuda, but torch sees no CUDA device (use --device cpu --tiny)", file=sys.stderr)
        return 2
    from pitome_mllm.tools.profiling import machine_info

    started = time.perf_counter()
    model, processor, description = build_model(args)
    machine = machine_info(args.device)
    name = machine.get("gpu") or "cpu"
    stem = args.stem or "gpu_benchmark_" + "".join(c if c.isalnum() else "_" for c in name).strip("_").lower()
    report = {
        "benchmark": "gpu_benchmark",
        "machine": machine,
        "model": description,
        "build_s": time.perf_counter() - started,
        "settings": {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()},
        "cells": [],
    }
    print(f"{name}: {description}, built in {report['build_s']:.1f} s", flush=True)
    native_tokens = native_visual_tokens(model)
    for tokens in args.tokens:
        if not 1 <= tokens <= native_tokens:
            print(
                f"gpu_benchmark: --tokens must be in [1, {native_tokens}] for this model, got {tokens}", file=sys.stderr
            )
            return 2
    for mode in args.modes:
        for tokens in args.tokens:
            for batch in args.batch_sizes:
                elapsed = time.perf_counter() - started
                if elapsed > args.budget_s:
                    cell = {"mode": mode, "tokens": tokens, "batch": batch, "skipped": f"{elapsed:.0f} s > budget"}
                else:
                    cell = run_cell_or_error(model, processor, tokens, native_tokens, batch, mode, args)
                report["cells"].append(cell)
                report["total_s"] = time.perf_counter() - started
                write_results(report, args.output, stem)
    print(markdown(report))
    print(f"wrote {args.output / stem}.json and .md in {report['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
