"""LLaVA-1.5-7B and Qwen2.5-VL-7B on one NVIDIA GPU: what PiToMe saves at 576 / 192 / 128 / 64 visual tokens,
eager and compiled.

Run it through ``bash benchmarks/gpu.sh`` (benchmarks/PROFILING.md says what it measures and needs). Each
``--arch`` is built with its real shapes and random weights in fp16, SDPA attention, directly on the GPU by
`pitome_mllm.zoo.architectures.build_arch`: LLaVA-1.5-7B (CLIP ViT-L/14-336, MLP projector, Vicuna-7B) or
Qwen2.5-VL-7B (a 32-block window-attention ViT/14 with its 2 x 2 patch merger, Qwen2-7B). Latency and
memory at a token budget depend on the shapes, not on the weight values, and building in place takes
seconds where saving 14-17 GB of weights and loading them back would take minutes of the run's budget
and as much disk while measuring nothing more. Several ``--arch`` run one after the other in one process,
on one clock and one ``--budget-s``, each into its own results files.

The image: LLaVA-1.5 the bundled astronaut photo (336 x 336, 576 tokens); Qwen2.5-VL the same photo at
672 x 672, which its tower sees as 48 x 48 = 2304 patches and its patch merger turns into 576 tokens, the
count LLaVA-1.5 has.

For every cell (mode x visual tokens x batch), one prefill forward (``logits_to_keep=1``) per pass:

* ``ttft``: the whole forward (time to first token), and disjoint stages inside it on the same clock:
  LLaVA ``vision_tower``, ``projector`` and ``llm_prefill`` (projector output to logits), between forward
  hooks on the tower and projector; Qwen-VL ``vision_tower`` (the tower with its patch merger),
  ``reduction`` (the patch's per-image reduction of the merged tokens, from the tower's output to the
  return of the model's image encoding) and ``llm_prefill`` (from there to logits), every stamp outside
  the tower's forward;
* ``merge_share``: LLaVA the merge steps' share of the tower time (eager only: inside a compiled graph the
  merge is fused with the layers and cannot be timed apart); Qwen-VL the reduction's share of the time to
  first token (eager and compiled: the reduction runs after the tower, outside its graph);
* the visual tokens checked against the budget: the image placeholders in the prompt, the tokens per image
  the language model received and the patch's own count (`PatchHandle.visual_tokens_for_image`) all
  equal ``tokens``, or the cell fails;
* peak memory of one extra pass (CUDA: ``max_memory_allocated``; CPU: peak RSS) and the KV cache's bytes;
* compiled cells: the vision tower's forward under ``torch.compile`` (``mode="reduce-overhead"``: CUDA
  graphs, on CUDA), the language model eager; the graphs and graph breaks Dynamo made and the first
  pass's time (compilation included).

576 tokens is the unpatched model; fewer is PiToMe (``--method``) with ``target_tokens``, through
`pitome_mllm.patch`. Cells run eager first, then compiled; a cell that would start after ``--budget-s``
seconds is recorded as skipped, one that fails is recorded with its error and the run goes on, and the
results are rewritten after every cell, so a run cut short still leaves what it measured.

``--device cpu --tiny`` runs the same code on a tiny random model of each architecture's family in seconds
(`pitome_mllm.zoo.tiny`: LLaVA with 64 visual tokens; `pitome_mllm.zoo.tiny_qwen`: Qwen-VL with a 224 x 224
image, 16 x 16 patches, 64 merged tokens): the test of this script.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from dataclasses import dataclass
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
QUESTION = "Describe the image in detail."
# Qwen-VL: the square image side. 672 px is 48 x 48 patches of 14 px (2304 in Qwen2.5-VL-7B's tower), 24 x 24 = 576
# tokens after the 2 x 2 patch merger: LLaVA-1.5's count, so both models start from the same budget. The tiny
# model's processor caps images at 280 px; 224 px gives it 16 x 16 patches, 64 merged tokens (the tiny LLaVA's).
QWEN_IMAGE_SIDE = 672
TINY_QWEN_IMAGE_SIDE = 224


@dataclass(frozen=True)
class StagePlan:
    """The disjoint stages one family's forward is split into, each between two clock marks, and the merge share.

    Attributes:
        intervals: ``stage -> (start mark, end mark)``, in forward order; all lie inside ``ttft``.
        share: ``(part, whole)``: ``merge_share`` is the median of ``part`` over the median of ``whole``.
        merge_observed: the share's part is the patch's merge steps, timed by a `MergeTimer` (eager only).
        columns: the table's stage columns after TTFT, ``(header, cell key, format)``.
    """

    intervals: dict[str, tuple[str, str]]
    share: tuple[str, str]
    merge_observed: bool
    columns: tuple[tuple[str, str, str], ...]

    @property
    def stages(self) -> tuple[str, ...]:
        """Every timed stage: ``ttft``, the intervals, and the observed merge steps where there are some."""
        return ("ttft", *self.intervals, *(("merge_tower",) if self.merge_observed else ()))


# LLaVA: the projector is its own module after the tower; the merge steps run inside the tower's layers.
LLAVA_STAGES = StagePlan(
    intervals={
        "vision_tower": ("vision_tower_start", "vision_tower_end"),
        "projector": ("projector_start", "projector_end"),
        "llm_prefill": ("projector_end", "prefill_end"),
    },
    share=("merge_tower", "vision_tower"),
    merge_observed=True,
    columns=(
        ("tower ms", "vision_tower_ms", ".1f"),
        ("merge share", "merge_share", ".1%"),
        ("projector ms", "projector_ms", ".2f"),
        ("prefill ms", "llm_prefill_ms", ".1f"),
    ),
)
# Qwen-VL: the patch merger sits inside the tower, and the patch reduces each image's merged tokens after it.
QWEN_STAGES = StagePlan(
    intervals={
        "vision_tower": ("vision_tower_start", "vision_tower_end"),
        "reduction": ("vision_tower_end", "reduction_end"),
        "llm_prefill": ("reduction_end", "prefill_end"),
    },
    share=("reduction", "ttft"),
    merge_observed=False,
    columns=(
        ("tower + merger ms", "vision_tower_ms", ".1f"),
        ("reduction ms", "reduction_ms", ".2f"),
        ("reduction share of TTFT", "merge_share", ".1%"),
        ("prefill ms", "llm_prefill_ms", ".1f"),
    ),
)


def missing_packages() -> list[str]:
    """What to install for each required package that cannot be imported."""
    return [wanted for name, wanted in REQUIRED_PACKAGES.items() if importlib.util.find_spec(name) is None]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="default cuda")
    parser.add_argument(
        "--tiny", action="store_true", help="a tiny random model of each architecture's family instead of its shapes"
    )
    parser.add_argument(
        "--arch",
        nargs="+",
        default=["llava-1.5-7b"],
        help="real-size architectures, run in this order on one clock and budget (default llava-1.5-7b; "
        "qwen2.5-vl-7b: Qwen2.5-VL-7B with one 672 x 672 image)",
    )
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
    parser.add_argument(
        "--stem",
        default=None,
        help="file name stem (default gpu_benchmark_<arch>_<device name>; with several --arch, <stem>_<arch>)",
    )
    args = parser.parse_args(argv)
    if args.compile_mode is None and args.device == "cuda":
        args.compile_mode = "reduce-overhead"
    return args


@dataclass
class Bench:
    """One architecture as the cells run it: the model, its processor, the image and how its forward is split."""

    model: object
    processor: object
    description: str
    image: object  # PIL.Image
    stages: StagePlan


def build_bench(arch: str, args: argparse.Namespace) -> Bench:
    """``arch`` on ``args.device``: fp16 real shapes (fp32 on CPU), or with ``--tiny`` its family's fp32 tiny model."""
    import torch

    from pitome_mllm.assets import load_image
    from pitome_mllm.zoo.architectures import QwenVLArchSpec, build_arch, get_arch

    spec = get_arch(arch)
    if args.tiny and isinstance(spec, QwenVLArchSpec):
        from pitome_mllm.zoo.tiny_qwen import tiny_qwen_vl

        model, processor = tiny_qwen_vl(spec.family)
        model = model.to(args.device)
        description = f"tiny random {spec.family} (zoo.tiny_qwen), fp32"
    elif args.tiny:
        from pitome_mllm.zoo.tiny import TEST_SPEC, build_tiny_llava

        model, processor = build_tiny_llava(TEST_SPEC)
        model = model.to(args.device)
        description = "tiny random LLaVA (zoo.tiny.TEST_SPEC: 64 visual tokens), fp32"
    else:
        dtype = torch.float16 if args.device == "cuda" else torch.float32
        model, processor = build_arch(spec, device=args.device, dtype=dtype)
        description = f"{arch} shapes, random weights, {str(dtype).replace('torch.', '')}, SDPA"
    image = load_image("astronaut")
    if stage_plan(arch) is QWEN_STAGES:
        side = TINY_QWEN_IMAGE_SIDE if args.tiny else QWEN_IMAGE_SIDE
        image = image.convert("RGB").resize((side, side))
        description += f", one {side} x {side} image"
        return Bench(model, processor, description, image, QWEN_STAGES)
    return Bench(model, processor, description, image, LLAVA_STAGES)


def processor_inputs(bench: Bench, batch: int) -> dict:
    """``batch`` copies of one single-image prompt (the processor's chat template, or LLaVA-1.5's form without
    one) with ``bench.image``, on the CPU; the placeholders follow the patch when one is applied."""
    from pitome_mllm.runtime.loading import build_prompt

    prompt = build_prompt(bench.processor, QUESTION)
    return bench.processor(images=[bench.image] * batch, text=[prompt] * batch, return_tensors="pt", padding=True)


def model_inputs(bench: Bench, batch: int, device: str, dtype) -> dict:
    """`processor_inputs` on ``device``, the pixels in ``dtype``."""
    inputs = processor_inputs(bench, batch)
    moved = {name: tensor.to(device) for name, tensor in inputs.items()}
    moved["pixel_values"] = moved["pixel_values"].to(dtype)
    return moved


def prompt_image_tokens(processor, input_ids) -> int:
    """Image placeholders in each prompt of ``input_ids`` ``[B, S]`` (one image per prompt, every row alike).

    Raises:
        ValueError: the rows hold different counts.
    """
    from pitome_mllm.runtime.loading import count_image_tokens

    counts = {count_image_tokens(processor, row) for row in input_ids}
    if len(counts) != 1:
        raise ValueError(f"the prompts of one batch hold different image placeholder counts: {sorted(counts)}")
    return counts.pop()


class EncodingStamps:
    """Stage stamps of a model whose projector sits inside the tower (Qwen-VL's patch merger), all outside the
    tower's forward: its start, its end (the merger included) and the return of the model's image encoding,
    which the patch's per-image reduction precedes; and the tokens per image that encoding returned.

    Outside, so that a compiled tower holds none of them: a stamp inside the graph would break it, and the
    breaks counted would be the benchmark's rather than the model's. Same use as `StageHooks`: set ``clock``
    per pass, `install` after patching (the encoding it wraps is then the patched one), `remove`.
    """

    def __init__(self, parts, model) -> None:
        from pitome_mllm.hooks.base import InstanceOverrides

        self.parts = parts
        self.model = model
        self.clock = None
        self.visual_tokens: int | None = None
        self._handles: list = []
        self._encoding = InstanceOverrides(parts.image_feature_owner)

    def install(self) -> None:
        tower, method = self.parts.tower, self.parts.image_feature_method
        self._handles += [
            tower.register_forward_pre_hook(self._mark_hook("vision_tower_start"), prepend=True),
            tower.register_forward_hook(self._mark_hook("vision_tower_end")),
        ]
        self._encoding.set(method, self._stamped_encoding(getattr(self._encoding.target, method)))

    def remove(self) -> None:
        from pitome_mllm.hooks.base import remove_hooks

        remove_hooks(self._handles)
        self._encoding.restore()

    def _mark_hook(self, name: str):
        def hook(module, *args) -> None:
            if self.clock is not None:
                self.clock.mark(name)

        return hook

    def _stamped_encoding(self, original):
        import functools

        from pitome_mllm.models.qwen_tools import encoded_tokens_per_image

        @functools.wraps(original)  # generate() reads the signature
        def encode(*args, **kwargs):
            output = original(*args, **kwargs)
            if self.clock is not None:
                self.clock.mark("reduction_end")
            per_image = encoded_tokens_per_image(self.model, output)
            if len(set(per_image)) != 1:
                raise ValueError(f"the images of one batch were reduced to different counts: {per_image}")
            self.visual_tokens = per_image[0]
            return output

        return encode


def stage_plan(arch: str) -> StagePlan:
    """How ``arch``'s forward is split into stages: `QWEN_STAGES` for a Qwen-VL architecture, else `LLAVA_STAGES`."""
    from pitome_mllm.zoo.architectures import QwenVLArchSpec, get_arch

    return QWEN_STAGES if isinstance(get_arch(arch), QwenVLArchSpec) else LLAVA_STAGES


def stage_hooks(bench: Bench, parts):
    """The stamps of ``bench``'s stage plan: `EncodingStamps` for Qwen-VL, the profiler's `StageHooks` for LLaVA."""
    from pitome_mllm.tools.profiling.runner import StageHooks

    return EncodingStamps(parts, bench.model) if bench.stages is QWEN_STAGES else StageHooks(parts)


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


def pass_seconds(clock, stages: StagePlan) -> dict[str, float | None]:
    """Seconds of every stage of ``stages`` in one pass (None where a mark is missing)."""
    seconds = {"ttft": clock.interval("start", "prefill_end")}
    seconds |= {stage: clock.interval(start, end) for stage, (start, end) in stages.intervals.items()}
    if stages.merge_observed:
        seconds["merge_tower"] = clock.merge_seconds("decide", "apply", "trace")
    return seconds


def native_visual_tokens(bench: Bench) -> int:
    """Visual tokens of ``bench``'s image in the unpatched model (576 for LLaVA-1.5 and for Qwen2.5-VL at 672 px):
    the placeholders its processor writes, before any patch."""
    return prompt_image_tokens(bench.processor, processor_inputs(bench, 1)["input_ids"])


def check_counts(tokens: int, counts: dict[str, int | None]) -> None:
    """The cell measures the budget it names: every count of ``counts`` (what it counts -> the count per image;
    None where nothing was counted) equals ``tokens``.

    Raises:
        ValueError: naming each count that differs.
    """
    wrong = {name: count for name, count in counts.items() if count != tokens}
    if wrong:
        raise ValueError(f"budget {tokens}, but " + ", ".join(f"{name}: {count}" for name, count in wrong.items()))


def run_cell(bench: Bench, tokens: int, native_tokens: int, batch: int, mode: str, args: argparse.Namespace) -> dict:
    """Patch for ``tokens`` (not at ``native_tokens``), maybe compile the tower, warm up, measure memory, time."""
    import contextlib

    import torch

    import pitome_mllm
    from pitome_mllm.models import model_parts
    from pitome_mllm.tools.profiling import PassClock, Stopwatch, compiled_forward, dynamo_counts, kv_cache_bytes
    from pitome_mllm.tools.profiling.runner import MergeTimer

    model, processor, stages = bench.model, bench.processor, bench.stages
    parts = model_parts(model)
    overrides = {"method": args.method, "target_tokens": tokens} if tokens < native_tokens else None
    handle = pitome_mllm.patch(model, processor, **overrides) if overrides is not None else None
    hooks, merge_timer = stage_hooks(bench, parts), MergeTimer()
    compiled = mode == "compiled"
    try:
        if handle is not None and not compiled and stages.merge_observed:
            handle.add_observer(merge_timer)  # its clock stamps would break a compiled graph
        hooks.install()
        inputs = model_inputs(bench, batch, args.device, parts.vision_dtype)
        prompt_tokens = prompt_image_tokens(processor, inputs["input_ids"])
        height, width = bench.image.size[::-1]
        expected_tokens = handle.visual_tokens_for_image(height, width) if handle is not None else None
        # The prompt's placeholders and the patch's count for the image (unpatched: none), before any pass runs.
        counts = {"image placeholders in the prompt": prompt_tokens}
        if handle is not None:
            counts["tokens the patch planned for the image"] = expected_tokens
        check_counts(tokens, counts)
        compile_options = {"backend": args.compile_backend, "dynamic": False}
        if args.compile_mode:
            compile_options["mode"] = args.compile_mode
        if compiled:
            torch._dynamo.reset()  # each compiled cell compiles from scratch, as a fresh process would
        compiling = compiled_forward(parts.tower, **compile_options) if compiled else contextlib.nullcontext()
        stopwatch, memory = Stopwatch(torch.device(args.device)), PeakMemory(args.device)
        samples: dict[str, list[float]] = {stage: [] for stage in stages.stages}
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
                    for stage, value in pass_seconds(clock, stages).items():
                        if value is not None:
                            samples[stage].append(value)
                hooks.clock, merge_timer.clock = None, None
                del output
        counts_after = dynamo_counts()
        check_counts(tokens, counts | {"tokens the language model received": hooks.visual_tokens})
        medians = {f"{stage}_ms": statistics.median(values) * 1e3 for stage, values in samples.items() if values}
        part, whole = stages.share
        merge_share = None
        if handle is not None and not (compiled and stages.merge_observed):
            merge_share = medians[f"{part}_ms"] / medians[f"{whole}_ms"]
        else:
            medians.pop("merge_tower_ms", None)
        return {
            "mode": mode,
            "tokens": tokens,
            "batch": batch,
            "visual_tokens": hooks.visual_tokens,
            "visual_tokens_expected": expected_tokens,
            "prompt_image_tokens": prompt_tokens,
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


def run_cell_or_error(bench: Bench, tokens, native_tokens, batch, mode, args) -> dict[str, Any]:
    """`run_cell`, or the error it raised: one failing cell (a compile error, out of memory, a count that is not
    the budget) must not cost the cells after it their only chance on a lent machine."""
    import torch

    try:
        cell = run_cell(bench, tokens, native_tokens, batch, mode, args)
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
    columns = report["columns"]
    lines = [
        f"Machine: {where}; torch {machine['torch']}, transformers {machine['transformers']}, CUDA "
        f"{machine.get('cuda', '-')}. Model: {report['model']}. {report['settings']['repeats']} timed passes per "
        f"cell (medians); compiled: the vision tower under torch.compile (mode {report['settings']['compile_mode']}).",
        "",
        "| mode | tokens | B | TTFT ms | " + " | ".join(header for header, _, _ in columns) + " | peak GiB | KV MiB "
        "| graphs | breaks | first pass s |",
        "|---|---:|---:|---:|" + "---:|" * len(columns) + "---:|---:|---:|---:|---:|",
    ]
    for cell in report["cells"]:
        if "skipped" in cell or "error" in cell:
            why = f"skipped: {cell['skipped']}" if "skipped" in cell else f"failed: {cell['error']}"
            lines.append(f"| {cell['mode']} | {cell['tokens']} | {cell['batch']} | {why.replace('|', '/')} |")
            continue
        stages = "".join(f"| {fmt(cell.get(key), spec)} " for _, key, spec in columns)
        lines.append(
            f"| {cell['mode']} | {cell['visual_tokens']} | {cell['batch']} | {fmt(cell.get('ttft_ms'))} {stages}"
            f"| {cell['peak_memory_bytes'] / 2**30:.2f} | {cell['kv_cache_bytes'] / 2**20:.0f} "
            f"| {fmt(cell['graphs'], 'd')} | {fmt(cell['graph_breaks'], 'd')} | {fmt(cell['first_pass_s'])} |"
        )
    return "\n".join(lines) + "\n"


def write_results(report: dict[str, Any], output: Path, stem: str) -> None:
    output.mkdir(parents=True, exist_ok=True)
    (output / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (output / f"{stem}.md").write_text(markdown(report))


def slug(text: str) -> str:
    """``text`` as a file-name part: lower case, every run of other characters than letters and digits one ``_``."""
    return "_".join("".join(c if c.isalnum() else " " for c in text).split()).lower()


def results_stem(args: argparse.Namespace, arch: str, device_name: str) -> str:
    """``gpu_benchmark_<arch>_<device>`` (``tiny_<arch>`` with --tiny), or ``--stem`` (``<stem>_<arch>`` when
    several architectures run)."""
    if args.stem:
        return args.stem if len(args.arch) == 1 else f"{args.stem}_{slug(arch)}"
    return f"gpu_benchmark_{slug(('tiny ' if args.tiny else '') + arch)}_{slug(device_name)}"


def cells(args: argparse.Namespace):
    """``(mode, tokens, batch)`` of every cell, in the order run: eager first, tokens as given, then batch."""
    return [(mode, tokens, batch) for mode in args.modes for tokens in args.tokens for batch in args.batch_sizes]


def skipped_cell(mode: str, tokens: int, batch: int, elapsed: float) -> dict[str, Any]:
    return {"mode": mode, "tokens": tokens, "batch": batch, "skipped": f"{elapsed:.0f} s > budget"}


def run_arch(arch: str, args: argparse.Namespace, started: float, machine: dict[str, Any]) -> int:
    """Every cell of ``arch``, its results rewritten after each; 2 for --tokens the model cannot take.

    ``started``: the run's start, for ``--budget-s``. An architecture reached past the budget is not built, and
    its cells are all recorded as skipped.
    """
    import gc

    import torch

    name = machine.get("gpu") or "cpu"
    stem = results_stem(args, arch, name)
    report = {
        "benchmark": "gpu_benchmark",
        "arch": arch,
        "tiny": args.tiny,
        "machine": machine,
        "settings": {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()},
        "cells": [],
    }
    if time.perf_counter() - started > args.budget_s:
        report |= {"model": f"{arch}: not built, the run was past its budget", "build_s": None}
        report |= stage_description(stage_plan(arch))
        for mode, tokens, batch in cells(args):
            report["cells"].append(skipped_cell(mode, tokens, batch, time.perf_counter() - started))
        report["total_s"] = time.perf_counter() - started
        write_results(report, args.output, stem)
        print(f"{arch}: skipped, past the budget; wrote {args.output / stem}.json and .md", flush=True)
        return 0
    # What an earlier architecture left allocated would count in this one's peaks: recorded, to be seen (CUDA).
    report["allocated_before_build_bytes"] = torch.cuda.memory_allocated() if args.device == "cuda" else None
    built = time.perf_counter()
    bench = build_bench(arch, args)
    report |= {"model": bench.description, "build_s": time.perf_counter() - built} | stage_description(bench.stages)
    print(f"{name}: {bench.description}, built in {report['build_s']:.1f} s", flush=True)
    native_tokens = native_visual_tokens(bench)
    for tokens in args.tokens:
        if not 1 <= tokens <= native_tokens:
            print(f"gpu_benchmark: --tokens must be in [1, {native_tokens}] for {arch}, got {tokens}", file=sys.stderr)
            return 2
    for mode, tokens, batch in cells(args):
        elapsed = time.perf_counter() - started
        if elapsed > args.budget_s:
            cell = skipped_cell(mode, tokens, batch, elapsed)
        else:
            cell = run_cell_or_error(bench, tokens, native_tokens, batch, mode, args)
        report["cells"].append(cell)
        report["total_s"] = time.perf_counter() - started
        write_results(report, args.output, stem)
    print(markdown(report))
    print(f"wrote {args.output / stem}.json and .md at {report['total_s']:.0f} s")
    # The next architecture's weights take the memory this one's held; Dynamo's caches refer to its tower.
    del bench
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return 0


def stage_description(stages: StagePlan) -> dict[str, Any]:
    """What a report says of its stages: each stage's marks, what the merge share divides, the table's columns."""
    part, whole = stages.share
    return {
        "stages": {stage: list(marks) for stage, marks in stages.intervals.items()},
        "merge_share": f"{part} / {whole}",
        "columns": [list(column) for column in stages.columns],
    }


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
    from pitome_mllm.zoo.architectures import get_arch

    for arch in args.arch:
        try:
            spec = get_arch(arch)
        except ValueError as error:
            print(f"gpu_benchmark: --arch: {error}", file=sys.stderr)
            return 2
        if not spec.build_language_model:
            print(
                f"gpu_benchmark: --arch {arch} has no language model, and the benchmark times the prefill",
                file=sys.stderr,
            )
            return 2
    started = time.perf_counter()
    machine = machine_info(args.device)
    for arch in args.arch:
        status = run_arch(arch, args, started, machine)
        if status:
            return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
