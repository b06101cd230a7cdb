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

    python benchmarks/merge_cost.py --threads 2 --json benchmarks/results/merge_cost_cpu.json
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
RATIOS = (
    ("pitome", "bsm", "PiToMe / BSM (both full-width metric)"),
    ("pitome_reduced", "bsm", "PiToMe reduced / BSM full-width"),
    ("pitome_reduced", "bsm_reduced", "PiToMe reduced / BSM reduced"),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
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


def make_timer(device: str) -> Callable[[Callable], float]:
    """A function that runs a step once and returns its wall time in milliseconds."""
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

    def time_cpu(step: Callable) -> float:
        begin = time.perf_counter_ns()
        step()
        return (time.perf_counter_ns() - begin) / 1e6

    return time_cpu


def time_interleaved(steps: dict[str, Callable], device: str, repeats: int, warmup: int) -> dict[str, list[float]]:
    """Per-case lists of ``repeats`` times (ms). Every repeat runs every case once, in a rotating order."""
    timer = make_timer(device)
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


def machine_info(threads: int, devices: list[str]) -> dict:
    info = {
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": threads,
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


def run_config(args: argparse.Namespace, device: str, batch: int) -> dict:
    generator = torch.Generator().manual_seed(args.seed)
    x = torch.randn(batch, args.tokens, args.channels, generator=generator).to(device)
    head_dim = args.channels // args.heads
    reduced_metric = x.view(batch, args.tokens, args.heads, head_dim).mean(2).contiguous()  # [B, N, C/heads]
    steps = make_steps(x, reduced_metric, args.r, args.margin)
    times = time_interleaved(steps, device, args.repeats, args.warmup)
    return {
        "device": device,
        "batch_size": batch,
        "metric_channels": {"full": args.channels, "reduced": head_dim},
        "cases": {name: summarize(samples) for name, samples in times.items()},
        "ratios": {f"{num}/{den}": ratio_summary(times, num, den) for num, den, _ in RATIOS},
    }


def print_results(results: list[dict]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # plain text when rich is missing
        Console = None  # noqa: N806

    header = ["device", "B", "case", "median ms", "IQR ms", "min ms"]
    rows = []
    for result in results:
        for name in CASES:
            stats = result["cases"][name]
            rows.append(
                [result["device"], str(result["batch_size"]), name]
                + [f"{stats[key]:.3f}" for key in ("median_ms", "iqr_ms", "min_ms")]
            )
    ratio_header = ["device", "B", "ratio", "of medians", "paired"]
    ratio_rows = []
    for result in results:
        for num, den, label in RATIOS:
            ratio = result["ratios"][f"{num}/{den}"]
            ratio_rows.append(
                [result["device"], str(result["batch_size"]), label]
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
            table.add_column(column, justify="left" if column in ("device", "case", "ratio") else "right")
        for row in body:
            table.add_row(*row)
        console.print(table)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    devices = resolve_devices(args.device)
    load_before = load_average()
    results = [run_config(args, device, batch) for device in devices for batch in args.batch_sizes]
    print_results(results)
    report = {
        "benchmark": "merge_cost",
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(args.threads, devices),
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
