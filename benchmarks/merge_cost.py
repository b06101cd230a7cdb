"""Cost of one merge step: PiToMe versus bipartite soft matching (BSM).

A step is what a merging layer runs: decide the plan from the metric, then apply it
to the hidden states with the plain mean. Shapes are those of CLIP ViT-L/14-336's
first layer: N = 577 tokens (with the class token), C = 1024, r = 57.

Four cases per batch size:

* ``bsm``             BSM decided on the full-width metric (the hidden states, C = 1024).
* ``pitome``          PiToMe decided on the same full-width metric.
* ``bsm_reduced``     BSM decided on keys averaged over heads (16 heads of 64: C = 64).
* ``pitome_reduced``  PiToMe decided on that reduced metric.

Both reduced cases still apply the plan to the full ``[B, N, 1024]`` hidden states;
the reduced metric is computed once, outside the timed region, as a layer already
holds its keys.

The cases run interleaved inside every repeat (in a rotating order), so drift in
the machine's load hits all of them alike. Reported: median and interquartile range
per case, and cost ratios of medians. The ``paired`` ratio is the median over repeats
of the per-repeat ratio, which is less sensitive to load that changes between repeats.

On a machine shared with other work, wall time with several threads suffers most
(a thread that loses its core stalls the others at every synchronisation);
``--clock cpu`` times CPU steps by the process's CPU time instead, which is a stable
measure of the work done with one thread (``--threads 1``).

    python benchmarks/merge_cost.py --threads 2 --json benchmarks/results/merge_cost_cpu.json
    python benchmarks/merge_cost.py --threads 1 --clock cpu
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timezone

import torch

from pitome_mllm.merge import bipartite_soft_matching, pitome

CASES = ("bsm", "pitome", "bsm_reduced", "pitome_reduced")
# (numerator, denominator, label) of every reported cost ratio.
RATIOS = (("pitome", "bsm"), ("pitome_reduced", "bsm"), ("pitome_reduced", "bsm_reduced"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[2], help="torch.set_num_threads, one run per value (default 2)"
    )
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="CPU steps: wall time (default) or the process's CPU time (with --threads 1 only), "
        "which other processes on a busy machine do not inflate",
    )
    parser.add_argument("--repeats", type=int, default=200, help="timed repeats per case (default 200)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed repeats first (default 10)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="default: 1 8")
    parser.add_argument(
        "--device",
        nargs="+",
        default=["auto"],
        help="cpu, cuda, or auto (cpu, plus cuda when available; the default)",
    )
    parser.add_argument("--tokens", type=int, default=577, help="N including the class token (default 577)")
    parser.add_argument("--channels", type=int, default=1024, help="C of the hidden states (default 1024)")
    parser.add_argument("--heads", type=int, default=16, help="heads averaged for the reduced metric (default 16)")
    parser.add_argument("--r", type=int, default=57, help="tokens removed by the step (default 57)")
    parser.add_argument("--margin", type=float, default=0.45, help="PiToMe energy margin (default 0.45)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="also write the results to this JSON file")
    return parser.parse_args(argv)


def resolve_devices(requested: list[str]) -> list[str]:
    if requested == ["auto"]:
        return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    for device in requested:
        if device not in ("cpu", "cuda"):
            raise SystemExit(f"--device must be cpu, cuda or auto, got {device!r}")
        if device == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda was asked for, but CUDA is not available")
    return requested


def make_steps(x: torch.Tensor, reduced_metric: torch.Tensor, r: int, margin: float) -> dict[str, Callable]:
    """One closure per case: decide the plan, then apply it to ``x`` with the plain mean."""
    return {
        "bsm": lambda: bipartite_soft_matching(x, r, class_token=True)(x),
        "pitome": lambda: pitome(x, r, margin, class_token=True)(x),
        "bsm_reduced": lambda: bipartite_soft_matching(reduced_metric, r, class_token=True)(x),
        "pitome_reduced": lambda: pitome(reduced_metric, r, margin, class_token=True)(x),
    }


def make_timer(device: str, clock: str = "wall") -> Callable[[Callable], float]:
    """A function that runs a step once and returns its time in milliseconds."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def time_cuda(step: Callable) -> float:
            torch.cuda.synchronize()
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)

        return time_cuda

    now = time.perf_counter_ns if clock == "wall" else time.process_time_ns

    def time_cpu(step: Callable) -> float:
        begin = now()
        step()
        return (now() - begin) / 1e6

    return time_cpu


def time_interleaved(
    steps: dict[str, Callable], device: str, clock: str, repeats: int, warmup: int
) -> dict[str, list[float]]:
    """Per-case lists of ``repeats`` times (ms). Every repeat runs every case once, in a rotating order."""
    timer = make_timer(device, clock)
    names = list(steps)
    with torch.inference_mode():
        for _ in range(warmup):
            for name in names:
                timer(steps[name])
        times: dict[str, list[float]] = {name: [] for name in names}
        for repeat in range(repeats):
            shift = repeat % len(names)
            for name in names[shift:] + names[:shift]:
                times[name].append(timer(steps[name]))
    return times


def summarize(samples: list[float]) -> dict[str, float]:
    q1, median, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return {"median_ms": median, "q1_ms": q1, "q3_ms": q3, "iqr_ms": q3 - q1, "min_ms": min(samples)}


def ratio_summary(times: dict[str, list[float]], num: str, den: str) -> dict[str, float]:
    paired = [a / b for a, b in zip(times[num], times[den], strict=True)]
    return {
        "of_medians": statistics.median(times[num]) / statistics.median(times[den]),
        "paired_median": statistics.median(paired),
    }


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(devices: list[str]) -> dict:
    info = {
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
    }
    if "cuda" in devices:
        info["cuda_device"] = torch.cuda.get_device_name()
        info["cuda_version"] = torch.version.cuda
    return info


def load_average() -> list[float] | None:
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return None


def run_config(args: argparse.Namespace, device: str, threads: int, batch: int) -> dict:
    torch.set_num_threads(threads)
    clock = "cuda events" if device == "cuda" else args.clock
    generator = torch.Generator().manual_seed(args.seed)
    x = torch.randn(batch, args.tokens, args.channels, generator=generator).to(device)
    head_dim = args.channels // args.heads
    reduced_metric = x.view(batch, args.tokens, args.heads, head_dim).mean(2).contiguous()  # [B, N, C/heads]
    steps = make_steps(x, reduced_metric, args.r, args.margin)
    times = time_interleaved(steps, device, args.clock, args.repeats, args.warmup)
    return {
        "device": device,
        "threads": threads,
        "clock": clock,
        "batch_size": batch,
        "metric_channels": {"full": args.channels, "reduced": head_dim},
        "cases": {name: summarize(samples) for name, samples in times.items()},
        "ratios": {f"{num}/{den}": ratio_summary(times, num, den) for num, den in RATIOS},
    }


def print_results(results: list[dict]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # plain text when rich is missing
        Console = None  # noqa: N806

    header = ["device", "threads", "clock", "B", "case", "median ms", "IQR ms", "min ms"]
    rows = []
    for result in results:
        for name in CASES:
            stats = result["cases"][name]
            rows.append(
                [result["device"], str(result["threads"]), result["clock"], str(result["batch_size"]), name]
                + [f"{stats[key]:.3f}" for key in ("median_ms", "iqr_ms", "min_ms")]
            )
    ratio_header = ["device", "threads", "clock", "B", "ratio", "of medians", "paired"]
    ratio_rows = []
    for result in results:
        for num, den in RATIOS:
            ratio = result["ratios"][f"{num}/{den}"]
            ratio_rows.append(
                [result["device"], str(result["threads"]), result["clock"], str(result["batch_size"]), f"{num} / {den}"]
                + [f"{ratio['of_medians']:.2f}x", f"{ratio['paired_median']:.2f}x"]
            )

    if Console is None:
        for head, body in ((header, rows), (ratio_header, ratio_rows)):
            print("  ".join(head))
            for row in body:
                print("  ".join(row))
            print()
        return
    console = Console()
    for title, head, body in (("One merge step", header, rows), ("Cost ratios", ratio_header, ratio_rows)):
        table = Table(title=title)
        for column in head:
            table.add_column(column, justify="left" if column in ("device", "clock", "case", "ratio") else "right")
        for row in body:
            table.add_row(*row)
        console.print(table)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    devices = resolve_devices(args.device)
    if args.clock == "cpu" and max(args.threads) > 1:
        # Process CPU time also counts the time threads spin at synchronisation points.
        raise SystemExit("--clock cpu measures the work of one thread: use it with --threads 1")
    load_before = load_average()
    results = [
        run_config(args, device, threads, batch)
        for device in devices
        for threads in (args.threads if device == "cpu" else args.threads[:1])
        for batch in args.batch_sizes
    ]
    print_results(results)
    report = {
        "benchmark": "merge_cost",
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(devices),
        "load_average_1_5_15min": {"before": load_before, "after": load_average()},
        "settings": {
            "tokens": args.tokens,
            "channels": args.channels,
            "heads": args.heads,
            "r": args.r,
            "margin": args.margin,
            "class_token": True,
            "dtype": "float32",
            "reduce": "mean",
            "repeats": args.repeats,
            "warmup": args.warmup,
            "clock_cpu": args.clock,
            "seed": args.seed,
        },
        "results": results,
    }
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)
            handle.write("\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
