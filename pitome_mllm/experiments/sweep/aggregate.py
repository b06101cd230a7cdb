"""A sweep folder's results as summary.csv / summary.md / accuracy_vs_tokens.png."""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from typing import Any

from .runner import (
    read_stored_result,
)
from .schema import open_for_writing, refuse_link
from .suite import (
    RESULT_FILE,
)

logger = logging.getLogger("pitome_mllm")


SUMMARY_COLUMNS = [
    "task",
    "run",
    "method",
    "metric",
    "score",
    "baseline_score",
    "relative_pct",
    "visual_tokens",
    "ttft_ms",
    "generation_s",
    "peak_memory_mib",
    "memory_kind",
    "samples",
    "limit",
    "keep_ratio",
    "target_tokens",
    "preset",
    "budget",
    "best_at_budget",
]


def load_results(output: str | Path) -> list[dict[str, Any]]:
    """Every ``result.json`` under ``output/runs``.

    Raises:
        FileNotFoundError: there is none.
        ValueError: none is usable (no finite score, or not written by the sweep).
    """
    paths = sorted(Path(output).glob(f"runs/*/*/{RESULT_FILE}"))
    if not paths:
        raise FileNotFoundError(f"no {RESULT_FILE} under {str(Path(output) / 'runs')!r}; run the sweep first")
    stored = (read_stored_result(path, move_aside=False) for path in paths)
    results = [result for result in stored if result is not None]
    if not results:
        raise ValueError(
            f"none of the {len(paths)} {RESULT_FILE} under {str(Path(output) / 'runs')!r} is a usable result "
            "(each is named in a warning above)"
        )
    return results


def _relative_pct(score: float, baseline: float | None) -> float | None:
    if baseline is None or baseline == 0:
        return None
    return 100.0 * score / baseline


def summary_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per result, with the score relative to the baseline run of the same task."""
    baselines = {
        result["task"]: result["score"] for result in results if result.get("run_name") == result.get("baseline_run")
    }
    rows = []
    for result in results:
        cost = result.get("cost") or {}
        config = result.get("patch_config") or {}
        baseline = baselines.get(result["task"])
        ttft = cost.get("mean_ttft_s")
        visual_tokens = cost.get("mean_visual_tokens")
        if visual_tokens is None:
            visual_tokens = result.get("num_visual_tokens")
        rows.append(
            {
                "task": result["task"],
                "run": result["run"],
                "method": result.get("method"),
                "metric": result.get("metric"),
                "score": result["score"],
                "baseline_score": baseline,
                "relative_pct": _relative_pct(result["score"], baseline),
                "visual_tokens": visual_tokens,
                "ttft_ms": None if ttft is None else 1000.0 * ttft,
                "generation_s": cost.get("mean_generation_s"),
                "peak_memory_mib": cost.get("peak_memory_mib"),
                "memory_kind": cost.get("memory_kind"),
                "samples": cost.get("samples"),
                "limit": result.get("limit"),
                "keep_ratio": config.get("keep_ratio"),
                "target_tokens": config.get("target_tokens"),
                "preset": config.get("preset"),
            }
        )
    mark_best_per_budget(rows, [result.get("run_name") == result.get("baseline_run") for result in results])
    rows.sort(key=lambda row: (row["task"], row["method"] or "", -(row["visual_tokens"] or 0), row["run"]))
    return rows


def _budget(row: dict[str, Any]) -> float | None:
    """Visual tokens per image a run was given: its ``target_tokens``, else what it measured."""
    if row["target_tokens"] is not None:
        return row["target_tokens"]
    tokens = row["visual_tokens"]
    return None if tokens is None else round(tokens, 1)


def mark_best_per_budget(rows: list[dict[str, Any]], is_baseline: list[bool]) -> None:
    """Set ``budget`` and ``best_at_budget`` on every row (in place).

    Among the runs of a task with the same budget, the highest score is the best (every
    suite metric is higher-is-better: accuracy, F1, MME score); ties all count as best.
    The baseline run is the 100% reference and a 0-token run (the ``floor``: what the LLM
    answers without the image) the 0% reference, not competitors: their ``best_at_budget``
    is None.
    """
    best: dict[tuple[str, float], float] = {}
    for row in rows:
        row["budget"] = _budget(row)
    is_reference = [baseline or row["budget"] == 0 for row, baseline in zip(rows, is_baseline, strict=True)]
    for row, baseline in zip(rows, is_reference, strict=True):
        if not baseline and row["budget"] is not None:
            key = (row["task"], row["budget"])
            best[key] = max(best.get(key, -math.inf), row["score"])
    for row, baseline in zip(rows, is_reference, strict=True):
        key = (row["task"], row["budget"])
        row["best_at_budget"] = None if baseline or key not in best else row["score"] == best[key]


def _format(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with open_for_writing(path, "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=SUMMARY_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: ("" if row[key] is None else row[key]) for key in SUMMARY_COLUMNS})


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Runs down, tasks across (score and % of the baseline), then the mean cost of each run."""
    tasks = sorted({row["task"] for row in rows})
    by_run: dict[str, dict[str, dict[str, Any]]] = {}
    for row in rows:
        by_run.setdefault(row["run"], {})[row["task"]] = row
    header = ["run", "method", "visual tokens", *tasks, "mean % of baseline", "TTFT ms", "gen s", "peak MiB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]

    def mean(values: list[float | None]) -> float | None:
        present = [value for value in values if value is not None]
        return sum(present) / len(present) if present else None

    def order(item: tuple[str, dict[str, dict[str, Any]]]) -> tuple:
        cells = list(item[1].values())
        return (
            cells[0]["method"] != "none",
            cells[0]["method"] or "",
            -(mean([c["visual_tokens"] for c in cells]) or 0),
        )

    for run, cells in sorted(by_run.items(), key=order):
        first = next(iter(cells.values()))
        scores = []
        for task in tasks:
            cell = cells.get(task)
            if cell is None:
                scores.append("")
                continue
            relative = cell["relative_pct"]
            suffix = f" ({relative:.1f}%)" if relative is not None else ""
            scores.append(f"{_format(cell['score'])}{suffix}")
        values = list(cells.values())
        visual_tokens = mean([cell["visual_tokens"] for cell in values])
        lines.append(
            "| "
            + " | ".join(
                [
                    run,
                    str(first["method"]),
                    _format(visual_tokens, 4),
                    *scores,
                    _format(mean([cell["relative_pct"] for cell in values]), 4),
                    _format(mean([cell["ttft_ms"] for cell in values]), 3),
                    _format(mean([cell["generation_s"] for cell in values]), 3),
                    _format(mean([cell["peak_memory_mib"] for cell in values]), 4),
                ]
            )
            + " |"
        )
    return "\n".join(lines) + "\n" + best_per_budget_table(rows)


def best_per_budget_table(rows: list[dict[str, Any]]) -> str:
    """Budgets down, tasks across: the best method at each budget, its score and % of the baseline."""
    competing = [row for row in rows if row.get("best_at_budget") is not None]
    if not competing:
        return ""
    tasks = sorted({row["task"] for row in competing})
    budgets = sorted({row["budget"] for row in competing}, reverse=True)
    lines = [
        "",
        "Best method per budget (highest score among the runs given that many visual tokens per image; "
        "the baseline run is the 100% reference):",
        "",
        "| visual tokens | " + " | ".join(tasks) + " |",
        "|" + "|".join(["---"] * (len(tasks) + 1)) + "|",
    ]
    for budget in budgets:
        cells = []
        for task in tasks:
            winners = [row for row in competing if row["task"] == task and row["budget"] == budget]
            winners = [row for row in winners if row["best_at_budget"]]
            if not winners:
                cells.append("")
                continue
            relative = winners[0]["relative_pct"]
            suffix = f" ({relative:.1f}%)" if relative is not None else ""
            names = " = ".join(sorted(row["method"] or row["run"] for row in winners))
            cells.append(f"{names} {_format(winners[0]['score'])}{suffix}")
        lines.append("| " + " | ".join([_format(budget, 4), *cells]) + " |")
    return "\n".join(lines) + "\n"


def plot_accuracy_vs_tokens(rows: list[dict[str, Any]], path: Path) -> None:
    """One panel per task: score against visual tokens, one line per method, baseline dashed."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt

    tasks = sorted({row["task"] for row in rows})
    columns = min(3, len(tasks))
    lines = math.ceil(len(tasks) / columns)
    figure, axes = plt.subplots(lines, columns, figsize=(4.5 * columns, 3.4 * lines), squeeze=False)
    for panel, task in zip(axes.flat, tasks, strict=False):  # spare panels are switched off below
        task_rows = [row for row in rows if row["task"] == task and row["visual_tokens"] is not None]
        for method in sorted({row["method"] for row in task_rows}):
            points = sorted((row["visual_tokens"], row["score"]) for row in task_rows if row["method"] == method)
            if method == "none":
                # The unpatched baseline and the zero-token floor are references, not a curve.
                references = [row for row in task_rows if row["method"] == "none" and not row["target_tokens"]]
                for row in references:
                    tokens, score = row["visual_tokens"], row["score"]
                    label, style = ("0 visual tokens", ":") if tokens == 0 else ("none (baseline)", "--")
                    panel.axhline(score, color="grey", linestyle=style, label=label)
                    panel.plot([tokens], [score], "o", color="grey")
                points = sorted(
                    (r["visual_tokens"], r["score"]) for r in task_rows if r["method"] == "none" and r["target_tokens"]
                )
                if not points:
                    continue
            panel.plot(*zip(*points, strict=True), "o-", label=method)
        metric = task_rows[0]["metric"] if task_rows else ""
        panel.set_title(task)
        panel.set_xlabel("visual tokens per image")
        panel.set_ylabel(metric)
        panel.grid(alpha=0.3)
        panel.legend(fontsize="small")
    for panel in list(axes.flat)[len(tasks) :]:
        panel.axis("off")
    figure.tight_layout()
    figure.savefig(refuse_link(path), dpi=120)
    plt.close(figure)


def aggregate(output: str | Path) -> dict[str, Path]:
    """Write ``summary.csv``, ``summary.md`` and ``accuracy_vs_tokens.png`` into ``output``."""
    output = Path(output)
    rows = summary_rows(load_results(output))
    paths = {
        "csv": output / "summary.csv",
        "markdown": output / "summary.md",
        "plot": output / "accuracy_vs_tokens.png",
    }
    for path in paths.values():  # before writing any: a refused link leaves every summary as it was
        refuse_link(path)
    write_csv(rows, paths["csv"])
    with open_for_writing(paths["markdown"]) as stream:
        stream.write(markdown_table(rows))
    plot_accuracy_vs_tokens(rows, paths["plot"])
    return paths
