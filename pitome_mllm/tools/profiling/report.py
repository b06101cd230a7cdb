"""Profile reports on disk and on screen: CSV, JSON, plots, terminal and markdown tables."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

from ...runtime.terminal import plural
from .runner import (
    MEMORY_STAGES,
    TIMED_STAGES,
    ProfileReport,
    RunResult,
)

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
    from ...runtime.terminal import output_width, render_table

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
    "CSV_COLUMNS",
    "METHOD_COLOURS",
    "latency_rows",
    "markdown_table",
    "method_colour",
    "plot_report",
    "print_table",
    "publish_report",
    "resource_rows",
    "write_csv",
    "write_json",
    "write_report",
]
