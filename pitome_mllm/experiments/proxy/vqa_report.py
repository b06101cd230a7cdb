"""The easy-VQA proxy's report: accuracy per setting x budget from the finished sweep runs.

``vqa.md``, ``vqa.csv``, ``vqa.json`` and ``vqa.png`` of one sweep folder (`write_report`), and
over several training seeds (`seed_table`, `write_seed_report`) the ``vqa_seeds.*`` summaries.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .files import SEED_FOLDER, seed_folder
from .plots import pyplot
from .report import SettingTable, markdown_grid, write_seed_summaries
from .settings import REFERENCE_SETTING, setting_methods
from .stats import estimate
from .vqa import SETTINGS, SINGLE_RUN_SETTINGS, TASK

KIND_COLUMNS = {"shape": "shape_accuracy,none", "color": "color_accuracy,none", "yes/no": "yes_no_accuracy,none"}
# Report column -> the row's per-question hits it is the mean of (`read_run`).
HIT_COLUMNS = {"accuracy": "hits", "shape+color acc": "image_hits"}
COLUMN_LABELS = {"accuracy": "accuracy, all questions", "shape+color acc": "accuracy, shape + colour questions"}


def read_run(result_path: Path) -> dict[str, Any]:
    """One row of the report from a sweep run's ``result.json`` and lmms-eval's results file."""
    result = json.loads(result_path.read_text())
    run_folder = result_path.parent
    lmms = json.loads((run_folder / result["lmms_eval_results"]).read_text())["results"][TASK]
    run_id = result["run"]
    setting, _, budget = run_id.rpartition("-")
    if not setting:
        setting, budget = run_id, ""
    cost = result.get("cost") or {}
    row = {
        "setting": setting,
        "budget": int(budget) if budget.isdigit() else None,
        "visual_tokens": cost.get("mean_visual_tokens"),
        "accuracy": result["score"],
        "samples": cost.get("samples"),
        "ttft_ms": None if cost.get("mean_ttft_s") is None else 1000 * cost["mean_ttft_s"],
        "config": result["patch_config"],
    }
    for kind, key in KIND_COLUMNS.items():
        value = lmms.get(key)
        row[f"{kind} acc"] = value if isinstance(value, (int, float)) else None
    hits, image_hits = logged_hits(run_folder / Path(result["lmms_eval_results"]).parent)
    row["shape+color acc"] = sum(image_hits.values()) / len(image_hits) if image_hits else None
    row["hits"] = hits
    row["image_hits"] = image_hits
    return row


def logged_hits(lmms_folder: Path) -> tuple[dict[int, float], dict[int, float]]:
    """``({doc_id: hit}, {doc_id: hit} of the shape and colour questions)`` from lmms-eval's samples.

    Yes/no questions about easy-VQA can be answered well from the text alone (the no-image
    floor gets about 0.8 of them right), so shape and colour are the questions that measure
    what the visual tokens kept.
    """
    hits: dict[int, float] = {}
    image_hits: dict[int, float] = {}
    for samples in lmms_folder.glob(f"*_samples_{TASK}.jsonl"):
        for line in samples.read_text().splitlines():
            sample = json.loads(line)
            hits[int(sample["doc_id"])] = float(sample["accuracy"])
            if sample.get("shape_accuracy") is not None or sample.get("color_accuracy") is not None:
                image_hits[int(sample["doc_id"])] = float(sample["accuracy"])
    return hits, image_hits


def paired_difference(rows: list[dict[str, Any]], setting: str, reference: str) -> tuple[float, float, int] | None:
    """Mean accuracy of ``setting`` minus ``reference`` over the same questions at the same budgets.

    Pairing removes the between-question variance, so the standard error is that of the
    per-question differences: ``(mean, standard error, pairs)``, or None without common runs.
    """
    by_key = {(row["setting"], row["budget"]): row for row in rows}
    differences: list[float] = []
    for (name, budget), row in by_key.items():
        other = by_key.get((reference, budget))
        if name != setting or other is None or budget is None:
            continue
        common = row["hits"].keys() & other["hits"].keys()
        differences += [row["hits"][doc] - other["hits"][doc] for doc in sorted(common)]
    if len(differences) < 2:
        return None
    pooled = estimate([differences], [0])
    return pooled.mean, pooled.se, pooled.items


def collect_rows(output: Path) -> list[dict[str, Any]]:
    """Every finished run in ``output``: settings in `SETTINGS` order (others after), budgets high to low."""
    rows = [read_run(path) for path in (output / "runs" / TASK).glob("*/result.json")]
    order = {name: position for position, name in enumerate(SETTINGS)}

    def key(row: dict[str, Any]) -> tuple:
        return (order.get(row["setting"], len(order)), row["setting"], -(row["budget"] or 0))

    return sorted(rows, key=key)


def _cell(value: Any, digits: int = 3) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def budget_table(rows: list[dict[str, Any]], column: str) -> list[str]:
    """Markdown lines: ``column`` per setting (rows) x budget (columns)."""

    def cell(row: dict[str, Any]) -> str:
        text = _cell(row[column])
        tokens = row["visual_tokens"]
        if tokens is not None and abs(tokens - row["budget"]) > 0.5:
            return f"{text} ({tokens:.0f} tok)"
        return text

    return markdown_grid(rows, f"setting ({column})", cell, lambda row: _cell(row[column]))


def paired_table(rows: list[dict[str, Any]], reference: str) -> list[str]:
    """Markdown lines: every setting's paired accuracy difference to ``reference`` over all budgets."""
    settings = [name for name in dict.fromkeys(row["setting"] for row in rows) if name != reference]
    lines = [
        f"| setting | accuracy − {reference}, all budgets (paired) | ± standard error | question pairs |",
        "|---|---:|---:|---:|",
    ]
    for setting in settings:
        difference = paired_difference(rows, setting, reference)
        if difference is not None:
            mean, error, count = difference
            lines.append(f"| {setting} | {mean:+.4f} | {error:.4f} | {count} |")
    return lines if len(lines) > 2 else []


def markdown_report(rows: list[dict[str, Any]]) -> str:
    """Accuracy and shape+colour accuracy per setting x budget, then every run's per-kind scores."""
    lines = [*budget_table(rows, "accuracy"), "", *budget_table(rows, "shape+color acc"), ""]
    comparisons = paired_table(rows, REFERENCE_SETTING)
    if comparisons:
        lines += [*comparisons, ""]
    lines += [
        "| setting | budget | visual tokens | accuracy | shape+color | shape | color | yes/no |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['setting']} | {_cell(row['budget'])} | {_cell(row['visual_tokens'], 1)} "
            f"| {_cell(row['accuracy'])} | {_cell(row['shape+color acc'])} "
            f"| {_cell(row['shape acc'])} | {_cell(row['color acc'])} | {_cell(row['yes/no acc'])} |"
        )
    return "\n".join(lines) + "\n"


def plot_report(rows: list[dict[str, Any]], path: Path) -> None:
    """Accuracy and shape+colour accuracy against visual tokens, one line per setting.

    The unmerged model and the no-image floor are horizontal lines; the selection baselines
    (``random``, ``pool``, ``dominant``) are dotted.
    """
    plt = pyplot()

    settings = list(dict.fromkeys(row["setting"] for row in rows))
    order = {name: position for position, name in enumerate(SETTINGS)}
    colors = plt.get_cmap("tab20").colors
    figure, axes = plt.subplots(1, 2, figsize=(13, 5))
    for axis, column, title in (
        (axes[0], "accuracy", "all questions"),
        (axes[1], "shape+color acc", "shape and colour questions"),
    ):
        for setting in settings:
            points = sorted(
                (row["visual_tokens"], row[column])
                for row in rows
                if row["setting"] == setting and row[column] is not None and row["visual_tokens"] is not None
            )
            if not points:
                continue
            if setting in SINGLE_RUN_SETTINGS:
                style = "--" if setting == "none" else "-."
                axis.axhline(
                    points[0][1], color="grey", linestyle=style, label=f"{setting} ({points[0][0]:.0f} tokens)"
                )
                continue
            color = colors[order.get(setting, len(order)) % len(colors)]
            linestyle = ":" if SETTINGS.get(setting, {}).get("method") in ("random", "pool", "dominant") else "-"
            axis.plot(
                *zip(*points, strict=True), marker="o", markersize=4, linestyle=linestyle, color=color, label=setting
            )
        axis.set_xscale("log", base=2)
        axis.set_xlabel("visual tokens per image (log scale)")
        axis.set_ylabel("easy-VQA accuracy")
        axis.set_title(title)
        axis.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="center right", fontsize="small")
    figure.suptitle("Mini-LLaVA (real DINOv2 tower, trained on unmerged tokens) on easy-VQA")
    figure.tight_layout(rect=(0, 0, 0.86, 1))
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_report(output: Path, extra: dict[str, Any]) -> dict[str, Path]:
    """``vqa.md`` / ``vqa.csv`` / ``vqa.json`` / ``vqa.png`` from the finished runs in ``output``."""
    rows = collect_rows(output)
    if not rows:
        raise ValueError(f"{output} holds no finished easy_vqa run")
    paths = {name: output / f"vqa.{name}" for name in ("md", "csv", "json", "png")}
    paths["md"].write_text(markdown_report(rows))
    columns = [key for key in rows[0] if key not in ("config", *HIT_COLUMNS.values())]
    with open(paths["csv"], "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    stored = [{key: value for key, value in row.items() if key not in HIT_COLUMNS.values()} for row in rows]
    paths["json"].write_text(json.dumps({**extra, "rows": stored}, indent=1) + "\n")
    plot_report(rows, paths["png"])
    return paths


# ----------------------------------------------------------------------------- several seeds
SEEDS_STEM = "vqa_seeds"


def finished_seeds(output: Path) -> list[int]:
    """Seeds with a sweep folder under ``output`` holding at least one finished run."""
    seeds = []
    for folder in Path(output).glob(SEED_FOLDER.format(seed="*")):
        suffix = folder.name[len(SEED_FOLDER.format(seed="")) :]
        if suffix.isdigit() and any((folder / "runs" / TASK).glob("*/result.json")):
            seeds.append(int(suffix))
    return sorted(seeds)


def seed_table(output: Path, seeds: Sequence[int], column: str = "accuracy"):
    """A `report.SettingTable` of ``column``'s per-question hits over the training ``seeds``.

    Args:
        output: the folder of `run_seeds` (one `seed_folder` per seed).
        column: ``"accuracy"`` (every question) or ``"shape+color acc"`` (shape and colour questions).

    Raises:
        ValueError: an unknown column, or a seed folder without finished runs.
    """
    if column not in HIT_COLUMNS:
        raise ValueError(f"column must be one of {sorted(HIT_COLUMNS)}, got {column!r}")
    hits: dict[tuple[str, int | None], dict[int, dict[int, float]]] = {}
    tokens: dict[tuple[str, int | None], list[float]] = {}
    for seed in seeds:
        rows = collect_rows(seed_folder(output, seed))
        if not rows:
            raise ValueError(f"{seed_folder(output, seed)} holds no finished {TASK} run")
        for row in rows:
            key = (row["setting"], row["budget"])
            hits.setdefault(key, {})[seed] = row[HIT_COLUMNS[column]]
            if row["visual_tokens"] is not None:
                tokens.setdefault(key, []).append(row["visual_tokens"])
    return SettingTable(
        hits=hits,
        tokens={key: sum(values) / len(values) for key, values in tokens.items()},
        order=list(SETTINGS),
        score=COLUMN_LABELS[column],
    )


def write_seed_report(output: Path, seeds: Sequence[int], extra: dict[str, Any]) -> dict[str, Path]:
    """Each seed's own report, then ``vqa_seeds.*`` (all questions) and ``vqa_seeds_shape_color.*``.

    Returns the paths of the all-questions summary.
    """
    for seed in seeds:
        write_report(seed_folder(output, seed), {**extra, "seed": seed})
    tables = {SEEDS_STEM: seed_table(output, seeds, "accuracy")}
    tables[f"{SEEDS_STEM}_shape_color"] = seed_table(output, seeds, "shape+color acc")
    title = f"Mini-LLaVA (real DINOv2 tower) on easy-VQA, training seeds {', '.join(map(str, seeds))}"
    titles = dict.fromkeys(tables, title)
    return write_seed_summaries(output, tables, titles, {**extra, "seeds": list(seeds)}, setting_methods(SETTINGS))
