"""The fidelity proxy's rows as files: ``fidelity.md`` (table), ``fidelity.csv`` and ``fidelity.png`` (plot)."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .fidelity_settings import SETTINGS, WEIGHTED_POOL_LABEL
from .files import atomic_write_bytes, atomic_write_text
from .plots import png_bytes, pyplot

STEM = "fidelity"
# Pool -> the row's probe accuracy and its per-test-image hits.
POOLS = {"plain": "probe_acc_plain", "size_weighted": "probe_acc_size_weighted"}
HIT_COLUMNS = {"plain": "probe_hits_plain", "size_weighted": "probe_hits_size_weighted"}

TABLE_COLUMNS = (
    ("setting", "setting", None),
    ("budget", "budget", None),
    ("visual_tokens", "tokens", None),
    ("probe_acc_plain", "probe acc, plain pool", 3),
    ("probe_acc_size_weighted", f"probe acc, {WEIGHTED_POOL_LABEL}", 3),
    ("pooled_cos_plain", "pooled cos, plain", 4),
    ("pooled_cos_size_weighted", "pooled cos, size-weighted", 4),
    ("patch_cos", "patch cos", 4),
    ("spectral_distance", "SD/N", None),
)


def _cell(value: Any, digits: int | None) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}" if digits is not None else f"{value:.2g}"
    return str(value)


def sorted_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Unbudgeted rows first, then by falling budget, settings in `SETTINGS` order."""
    order = {name: index for index, name in enumerate(SETTINGS)}
    return sorted(
        rows, key=lambda row: (row["budget"] is not None, -(row["budget"] or 0), order.get(row["setting"], 99))
    )


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| " + " | ".join(title for _, title, _ in TABLE_COLUMNS) + " |",
        "|" + "---|" * len(TABLE_COLUMNS),
    ]
    for row in sorted_rows(rows):
        lines.append("| " + " | ".join(_cell(row.get(key), digits) for key, _, digits in TABLE_COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def csv_text(rows: Sequence[dict[str, Any]]) -> str:
    skipped = ("config", *HIT_COLUMNS.values())
    columns = [key for key in rows[0] if key not in skipped] if rows else [key for key, _, _ in TABLE_COLUMNS]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(sorted_rows(rows))
    return buffer.getvalue()


def plot_png(rows: Sequence[dict[str, Any]], dataset: str) -> bytes:
    """Probe accuracy against visual tokens: one colour per setting; plain pool solid with dots,
    size-weighted dashed with hollow squares."""
    plt = pyplot()

    figure, axis = plt.subplots(figsize=(9, 4.8))
    order = {name: index for index, name in enumerate(SETTINGS)}
    settings = sorted({row["setting"] for row in rows}, key=lambda name: order.get(name, len(order)))
    colors = plt.get_cmap("tab20").colors
    for setting in settings:
        mine = [row for row in rows if row["setting"] == setting]
        if all(row["budget"] is None for row in mine):  # the unmerged reference: a horizontal line
            row = mine[0]
            label = f"{setting} ({row['visual_tokens']} tokens)"
            axis.axhline(row["probe_acc_plain"], color="black", linewidth=0.8, label=label)
            continue
        # A colour per setting that stays the same whichever settings a run includes.
        color = colors[order.get(setting, 0) % len(colors)]
        # Line style alone cannot tell the two pools apart at a single budget (one point per line),
        # so the size-weighted points are also hollow squares.
        pools = (
            ("probe_acc_plain", {"linestyle": "-", "marker": "o"}, ""),
            (
                "probe_acc_size_weighted",
                {"linestyle": "--", "marker": "s", "markerfacecolor": "none"},
                " (size-weighted)",
            ),
        )
        for key, style, suffix in pools:
            points = sorted((row["visual_tokens"], row[key]) for row in mine if row[key] is not None)
            if points:
                axis.plot(*zip(*points, strict=True), color=color, markersize=5, label=setting + suffix, **style)
    axis.set_xscale("log", base=2)
    axis.set_xlabel("visual tokens per image (log scale)")
    axis.set_ylabel(f"linear-probe accuracy ({dataset})")
    axis.set_title(f"Real DINOv2 ViT-S/14, LLaVA view; dashed, hollow squares: {WEIGHTED_POOL_LABEL}", fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize="xx-small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.tight_layout()
    return png_bytes(figure, dpi=120)


def write_reports(output: Path, rows: Sequence[dict[str, Any]], dataset: str) -> dict[str, Path]:
    """``fidelity.md``, ``fidelity.csv`` and ``fidelity.png`` (the JSON is written as rows finish)."""
    paths = {name: output / f"{STEM}.{name}" for name in ("md", "csv", "png")}
    atomic_write_text(paths["md"], markdown_table(rows))
    atomic_write_text(paths["csv"], csv_text(rows))
    if rows:
        atomic_write_bytes(paths["png"], plot_png(rows, dataset))
    return paths
