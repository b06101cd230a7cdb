"""What torch.compile does to the patched vision tower: eager vs compiled, unpatched vs patched, on CPU.

The tower is CLIP ViT-L/14-336 (LLaVA-1.5's) with its real shapes and random weights
(`pitome_mllm.zoo.architectures.build_arch("clip-l-336")`; the cost of a token budget does not depend on
the weights). Rows, each at batch 1 and 8:

* ``unpatched``        576 visual tokens, no hooks;
* ``patched r=1``      576 tokens, PiToMe installed at keep_ratio 1.0 (the hooks' own cost);
* ``pitome k=192``     PiToMe, ``target_tokens=192``;
* ``pitome k=64``      PiToMe, ``target_tokens=64``.

For each: the tower's median time eager and under ``torch.compile`` (inductor by default, no
``fullgraph``, static shapes; eager and compiled passes alternate, so that load on a shared machine hits
both alike), compiled / eager, the graphs and graph breaks Dynamo made (a patched tower that still breaks
the graph compiles in pieces, and the count says so), the first compiled pass's time (compilation
included), and the merge steps' share of the eager tower time (inside a compiled graph the merge is
fused with the layers and cannot be timed apart). Then one merge step alone, PiToMe vs ToMe (bipartite
soft matching) on ``[B, 577, 1024]`` with r = 57, eager and compiled.

The tower is timed between forward hooks on it (`StageHooks`), which stay outside the compiled graph.
Results: a printed table, ``<stem>.json`` and ``<stem>.md`` under ``--output``, with the machine
(CPU model, cores, threads, torch version, load average before and after).

    python benchmarks/compile_cost.py                  # full: 4 rows x B 1, 8 (over an hour on 2 busy cores)
    python benchmarks/compile_cost.py --quick          # B = 1, unpatched / pitome k=64, 3 repeats
    python benchmarks/compile_cost.py --compile-backend eager --quick   # Dynamo only: graph breaks, no codegen
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
# (label, patch keyword arguments or None for the unpatched tower)
ROWS: tuple[tuple[str, dict[str, Any] | None], ...] = (
    ("unpatched", None),
    ("patched r=1", {"method": "pitome", "keep_ratio": 1.0}),
    ("pitome k=192", {"method": "pitome", "target_tokens": 192}),
    ("pitome k=64", {"method": "pitome", "target_tokens": 64}),
)
QUICK_ROWS = ("unpatched", "pitome k=64")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="clip-l-336", help="architecture name (default clip-l-336)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default 1 8 (--quick: 1)")
    parser.add_argument("--rows", nargs="+", default=None, help=f"labels of {[label for label, _ in ROWS]}")
    parser.add_argument("--repeats", type=int, default=None, help="timed passes per cell (default 5, --quick 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed passes after the compiling one (default 1)")
    parser.add_argument("--step-repeats", type=int, default=None, help="merge-step repeats (default 50, --quick 10)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default inductor)")
    parser.add_argument("--quick", action="store_true", help="B = 1, unpatched and pitome k=64, fewer repeats")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--stem", default="compile_cost_cpu")
    args = parser.parse_args(argv)
    args.batch_sizes = args.batch_sizes or ([1] if args.quick else [1, 8])
    args.rows = args.rows or (list(QUICK_ROWS) if args.quick else [label for label, _ in ROWS])
    args.repeats = args.repeats or (3 if args.quick else 5)
    args.step_repeats = args.step_repeats or (10 if args.quick else 50)
    unknown = sorted(set(args.rows) - {label for label, _ in ROWS})
    if unknown:
        parser.error(f"--rows: unknown {unknown}; allowed: {[label for label, _ in ROWS]}")
    return args


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def tower_cell(model, processor, overrides, batch: int, args) -> dict[str, dict[str, Any]]:
    """Time the tower for one row and batch, eager and compiled, pass by pass in alternating order.

    The two modes share one patch: the compiled forward is installed once, and the eager passes run it
    under ``torch.compiler.set_stance("force_eager")``. Alternating the modes (eager first in even passes,
    compiled first in odd ones) spreads a change in the machine's load over both, which matters on a
    shared machine where one pass takes seconds.
    """
    import contextlib

    import torch

    import pitome_mllm
    from pitome_mllm.assets import load_image
    from pitome_mllm.models import model_parts
    from pitome_mllm.tools.profiling import PassClock, Stopwatch, compiled_forward, dynamo_counts
    from pitome_mllm.tools.profiling.runner import MergeTimer, StageHooks

    parts = model_parts(model)
    handle = pitome_mllm.patch(model, processor, **overrides) if overrides is not None else None
    hooks = StageHooks(parts)
    merge_timer = MergeTimer()  # its clock is set in eager passes only: stamps would break a compiled graph
    modes = ("eager", "compiled")
    try:
        if handle is not None:
            handle.add_observer(merge_timer)
        hooks.install()
        image = load_image("astronaut")
        pixel_values = processor.image_processor(images=[image] * batch, return_tensors="pt")["pixel_values"]
        pixel_values = pixel_values.to(parts.vision_device, parts.vision_dtype)
        # Each row compiles from scratch, as a user's fresh process would, with Dynamo's default limits: a
        # function that recompiles past the limit falls back to eager there too.
        torch._dynamo.reset()
        towers = {mode: [] for mode in modes}
        merges: list[float] = []
        first_pass: dict[str, float] = {}
        counts_before = dynamo_counts()
        with compiled_forward(parts.tower, backend=args.compile_backend, dynamic=False), torch.inference_mode():
            for index in range(1 + args.warmup + args.repeats):
                for mode in modes if index % 2 == 0 else modes[::-1]:
                    clock = PassClock(Stopwatch(parts.vision_device))
                    hooks.clock = clock
                    merge_timer.clock = clock if mode == "eager" else None
                    eager = torch.compiler.set_stance("force_eager") if mode == "eager" else contextlib.nullcontext()
                    begin = time.perf_counter()
                    with eager:
                        parts.encode_images(pixel_values)
                    first_pass.setdefault(mode, time.perf_counter() - begin)
                    if index > args.warmup:
                        towers[mode].append(clock.interval("vision_tower_start", "vision_tower_end"))
                        if mode == "eager":
                            merges.append(clock.merge_seconds("decide", "apply", "trace"))
                    hooks.clock, merge_timer.clock = None, None
        counts_after = dynamo_counts()
        visual_tokens = hooks.visual_tokens  # what the projector put out, as the language model would see it
        cells = {
            mode: {
                "visual_tokens": visual_tokens,
                "tower_ms": median_ms(towers[mode]),
                "tower_ms_samples": [value * 1e3 for value in towers[mode]],
                "first_pass_s": first_pass[mode],
            }
            for mode in modes
        }
        merge_ms = median_ms(merges) if handle is not None else None
        cells["eager"] |= {
            "merge_ms": merge_ms,
            "merge_share": merge_ms / cells["eager"]["tower_ms"] if merge_ms is not None else None,
            "graphs": None,
            "graph_breaks": None,
        }
        cells["compiled"] |= {
            "merge_ms": None,
            "merge_share": None,
            "graphs": counts_after["graphs"] - counts_before["graphs"],
            "graph_breaks": counts_after["graph_breaks"] - counts_before["graph_breaks"],
        }
        return cells
    finally:
        hooks.remove()
        if handle is not None:
            handle.unpatch()


def merge_step_cells(batch: int, args) -> dict[str, dict[str, float]]:
    """One PiToMe step vs one ToMe step on ``[B, 577, 1024]``, r = 57: median ms eager and compiled."""
    import torch

    from pitome_mllm.merge import bipartite_soft_matching, pitome

    hidden = torch.randn(batch, 577, 1024, generator=torch.Generator().manual_seed(0))  # [B, N, C]
    steps = {
        "pitome": lambda x: pitome(x, 57, 0.45, class_token=True)(x),
        "tome": lambda x: bipartite_soft_matching(x, 57, class_token=True)(x),
    }
    cells: dict[str, dict[str, float]] = {}
    for name, step in steps.items():
        cells[name] = {}
        for mode in ("eager", "compiled"):
            function = step
            if mode == "compiled":
                torch._dynamo.reset()
                function = torch.compile(step, backend=args.compile_backend, dynamic=False)
            samples = []
            with torch.inference_mode():
                for index in range(2 + args.step_repeats):
                    begin = time.perf_counter()
                    function(hidden)
                    if index >= 2:
                        samples.append(time.perf_counter() - begin)
            cells[name][f"{mode}_ms"] = median_ms(samples)
        cells[name]["compiled/eager"] = cells[name]["compiled_ms"] / cells[name]["eager_ms"]
    return cells


def fmt(value, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def markdown(report: dict[str, Any]) -> str:
    """The tower and merge-step tables, with the machine above them."""
    machine = report["machine"]
    load = machine.get("load_average_1_5_15")
    lines = [
        f"Machine: {machine['cpu']}, {machine['cpus_available']} CPUs available, {report['settings']['threads']} "
        f"torch threads, torch {machine['torch']}, transformers {machine['transformers']}; load average "
        f"(1/5/15 min) {load} before, {report['load_average_after']} after. Backend "
        f"`{report['settings']['compile_backend']}`, {report['settings']['repeats']} timed passes per cell.",
        "",
        "| row | B | tokens | eager ms | compiled ms | compiled / eager | graphs | graph breaks "
        "| first compiled pass s | merge share (eager) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for cell in report["tower"]:
        eager, compiled = cell["eager"], cell["compiled"]
        lines.append(
            f"| {cell['row']} | {cell['batch']} | {eager['visual_tokens']} | {fmt(eager['tower_ms'])} "
            f"| {fmt(compiled['tower_ms'])} | {fmt(compiled['tower_ms'] / eager['tower_ms'], '.2f')} "
            f"| {fmt(compiled['graphs'], 'd')} | {fmt(compiled['graph_breaks'], 'd')} "
            f"| {fmt(compiled['first_pass_s'])} | {fmt(eager['merge_share'], '.1%')} |"
        )
    lines += ["", "| merge step | B | eager ms | compiled ms | compiled / eager |", "|---|---:|---:|---:|---:|"]
    for batch, cells in report["merge_step"].items():
        for name, cell in cells.items():
            lines.append(
                f"| {name} | {batch} | {cell['eager_ms']:.2f} | {cell['compiled_ms']:.2f} "
                f"| {cell['compiled/eager']:.2f} |"
            )
    for batch, cells in report["merge_step"].items():
        ratio = {mode: cells["pitome"][f"{mode}_ms"] / cells["tome"][f"{mode}_ms"] for mode in ("eager", "compiled")}
        lines.append(
            f"\nB = {batch}: PiToMe / ToMe step {ratio['eager']:.2f}x eager, {ratio['compiled']:.2f}x compiled."
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import os

    import torch

    from pitome_mllm.tools.profiling import machine_info
    from pitome_mllm.zoo.architectures import build_arch

    torch.set_num_threads(args.threads)
    machine = machine_info("cpu")
    model, processor = build_arch(args.arch)
    overrides_of = dict(ROWS)
    tower = []
    for label in args.rows:
        for batch in args.batch_sizes:
            cell = {"row": label, "batch": batch, **tower_cell(model, processor, overrides_of[label], batch, args)}
            tower.append(cell)
            print(
                f"{label:>14}  B={batch}  eager {cell['eager']['tower_ms']:8.1f} ms  compiled "
                f"{cell['compiled']['tower_ms']:8.1f} ms  graph breaks {cell['compiled']['graph_breaks']}",
                flush=True,
            )
    merge_step = {str(batch): merge_step_cells(batch, args) for batch in args.batch_sizes}
    report = {
        "benchmark": "compile_cost",
        "machine": machine,
        "load_average_after": [round(value, 2) for value in os.getloadavg()],
        "settings": {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()},
        "tower": tower,
        "merge_step": merge_step,
    }
    table = markdown(report)
    print(table)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / f"{args.stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.output / f"{args.stem}.md").write_text(table)
    print(f"wrote {args.output / args.stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
