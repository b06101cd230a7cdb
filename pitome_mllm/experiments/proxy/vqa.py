"""``pitome-mllm proxy vqa``: every method x budget of the easy-VQA mini-LLaVA, through lmms-eval.

1. Train the mini-LLaVA on unmerged tokens, or reuse the cached checkpoint
   (`pitome_mllm.experiments.proxy.easy_vqa`).
2. Write a sweep suite for the chosen settings and budgets into ``OUTPUT/suite.yaml`` and run
   it with `pitome_mllm.experiments.sweep` (one ``python -m lmms_eval`` per run, model ``pitome_llava_hf``,
   task ``easy_vqa`` from ``eval/tasks``). A finished run is never redone, so an interrupted
   proxy resumes where it stopped.
3. Tabulate accuracy (overall and per question kind) against the visual tokens the language
   model actually received: ``vqa.md``, ``vqa.csv``, ``vqa.json`` and ``vqa.png``.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...config import PiToMeConfig
from .stats import estimate

TASK = "easy_vqa"
METRIC = "accuracy,none"
KIND_COLUMNS = {"shape": "shape_accuracy,none", "color": "color_accuracy,none", "yes/no": "yes_no_accuracy,none"}
DEFAULT_BUDGETS = (128, 64, 32)
# Report column -> the row's per-question hits it is the mean of (`read_run`).
HIT_COLUMNS = {"accuracy": "hits", "shape+color acc": "image_hits"}
COLUMN_LABELS = {"accuracy": "accuracy, all questions", "shape+color acc": "accuracy, shape + colour questions"}
NUM_PATCHES = 256

# Setting -> PiToMeConfig fields; each budget is added as target_tokens (see `setting_runs`).
# "none" (the unmerged model) and "floor" (no visual token) are single runs.
SETTINGS: dict[str, dict[str, Any]] = {
    "none": {"method": "none"},
    "floor": {"method": "none", "target_tokens": 0},
    "tome": {"method": "tome", "preset": "reference"},
    "tome_sw": {"method": "tome", "preset": "reference", "reduce": "size_weighted"},
    "pitome_reference": {"method": "pitome", "preset": "reference"},
    "pitome_paper": {"method": "pitome", "preset": "paper"},
    "pitome_reference_sw": {"method": "pitome", "preset": "reference", "reduce": "size_weighted"},
    "pitome_keys": {"method": "pitome", "preset": "reference", "metric": "keys"},
    "pitome_order": {"method": "pitome", "preset": "reference", "keep_order": True},
    "pitome_llm_pa": {"method": "pitome", "preset": "reference", "llm_prop_attn": True},
    "pitome_pure": {"method": "pitome", "preset": "pure"},
    "pitome_keys_sw": {"method": "pitome", "preset": "reference", "metric": "keys", "reduce": "size_weighted"},
    "pitome_keys_sw_llm_pa": {
        "method": "pitome",
        "preset": "reference",
        "metric": "keys",
        "reduce": "size_weighted",
        "llm_prop_attn": True,
    },
    "pitome_pure_llm_pa": {"method": "pitome", "preset": "pure", "llm_prop_attn": True},
    "tome_sw_llm_pa": {"method": "tome", "preset": "reference", "reduce": "size_weighted", "llm_prop_attn": True},
    # Only the projector-stage PiToMe steps (on the projected tokens); the tower runs unmerged.
    "pitome_projector_only": {"method": "none"},
    "random": {"method": "random"},
    "pool": {"method": "pool"},
    "dominant": {"method": "dominant"},
    # The small-budget methods (docs/methods.md); "visionzip" is "dominant" under its published name.
    "fastervlm": {"method": "fastervlm"},
    "divprune": {"method": "divprune"},
    "cdpruner": {"method": "cdpruner"},
    # PiToMe's select-then-merge preset: keep isolated (low-energy) and class-attended tokens, merge the rest.
    "pitome_mllm": {"method": "pitome", "preset": "mllm"},
}
SINGLE_RUN_SETTINGS = ("none", "floor")
REFERENCE_SETTING = "pitome_reference"  # what the paired differences are taken against
# A few minutes of evaluation on 2 cores; "--settings all" runs every entry of SETTINGS.
DEFAULT_SETTINGS = (
    "none",
    "floor",
    "tome",
    "pitome_reference",
    "pitome_pure",
    "pitome_llm_pa",
    "random",
    "pool",
    "dominant",
)


def setting_runs(name: str, budgets: Sequence[int]) -> dict[str, dict[str, Any]]:
    """Suite runs of one setting: ``{run_id: model_args}``, one per budget."""
    if name not in SETTINGS:
        raise ValueError(f"unknown setting {name!r}; allowed: {sorted(SETTINGS)}")
    fields = dict(SETTINGS[name])
    if name in SINGLE_RUN_SETTINGS:
        return {name: fields}
    runs = {}
    for budget in budgets:
        args = {**fields, "target_tokens": budget}
        PiToMeConfig(**args)  # a bad setting fails here, before anything runs
        runs[f"{name}-{budget}"] = args
    return runs


def write_suite(
    path: Path, settings: Sequence[str], budgets: Sequence[int], include_path: Path, batch_size: int
) -> Path:
    """A sweep suite file for ``settings`` x ``budgets`` on the ``easy_vqa`` task."""
    import yaml

    runs: dict[str, dict[str, Any]] = {}
    for name in settings:
        runs.update(setting_runs(name, budgets))
    suite = {
        "name": "easy_vqa_proxy",
        "include_path": str(include_path.resolve()),
        "tasks": {TASK: METRIC},
        "batch_size": batch_size,
        "baseline": "none" if "none" in runs else None,
        "runs": runs,
    }
    if suite["baseline"] is None:
        del suite["baseline"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(suite, sort_keys=False))
    return path


def default_task_folder() -> Path:
    """``eval/tasks`` of a source checkout (the proxy's task lives there)."""
    return Path(__file__).resolve().parents[3] / "eval" / "tasks"


# ---------------------------------------------------------------------------------- report
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
    from .report import markdown_grid

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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
SEED_FOLDER = "seed{seed}"
SEEDS_STEM = "vqa_seeds"


def seed_folder(output: Path, seed: int) -> Path:
    """``OUTPUT/seed<N>``: the sweep folder of one training seed."""
    return Path(output) / SEED_FOLDER.format(seed=seed)


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
    from .report import SettingTable

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


def run_seeds(
    seeds: Sequence[int],
    settings: Sequence[str],
    budgets: Sequence[int],
    output: Path,
    *,
    include_path: Path,
    limit: int,
    batch_size: int = 16,
    train=None,
    progress: bool = True,
) -> dict[str, list[str]]:
    """Train (or reuse) one mini-LLaVA per seed and evaluate every setting x budget on each.

    Settings go one after another and, within a setting, seed after seed, so an interrupted
    call leaves whole settings measured on every seed. Every run is a sweep run (`sweep.run_suite`),
    kept once finished: a second call redoes nothing.

    Args:
        train: `easy_vqa.TrainSettings` whose ``seed`` is replaced by each of ``seeds`` (default: the defaults).

    Returns:
        The sweep outcomes of all calls together (``done``, ``skipped``, ``failed`` run keys, prefixed ``seed<N>/``).
    """
    import dataclasses

    from tqdm import tqdm

    from .. import sweep
    from . import easy_vqa

    if not seeds:
        raise ValueError("no seed given")
    train = train or easy_vqa.TrainSettings()
    checkpoints = {
        seed: easy_vqa.train_mini_llava(settings=dataclasses.replace(train, seed=seed)) for seed in dict.fromkeys(seeds)
    }
    suites = {
        seed: sweep.load_suite(
            write_suite(seed_folder(output, seed) / "suite.yaml", settings, budgets, include_path, batch_size)
        )
        for seed in checkpoints
    }
    outcome: dict[str, list[str]] = {"done": [], "skipped": [], "failed": []}
    steps = [(name, seed) for name in settings for seed in checkpoints]
    for name, seed in tqdm(steps, desc="easy-VQA settings x seeds", unit="step", disable=not progress):
        only = [f"{TASK}/{run_id}" for run_id in setting_runs(name, budgets)]
        done = sweep.run_suite(suites[seed], str(checkpoints[seed]), seed_folder(output, seed), limit=limit, only=only)
        for key, keys in done.items():
            outcome[key] += [f"seed{seed}/{run}" for run in keys]
    return outcome


def write_seed_report(output: Path, seeds: Sequence[int], extra: dict[str, Any]) -> dict[str, Path]:
    """Each seed's own report, then ``vqa_seeds.*`` (all questions) and ``vqa_seeds_shape_color.*``.

    Returns the paths of the all-questions summary.
    """
    from .report import write_summary

    for seed in seeds:
        write_report(seed_folder(output, seed), {**extra, "seed": seed})
    methods = {name: fields["method"] for name, fields in SETTINGS.items()}
    title = f"Mini-LLaVA (real DINOv2 tower) on easy-VQA, training seeds {', '.join(map(str, seeds))}"
    paths = {}
    for column, stem in (("accuracy", SEEDS_STEM), ("shape+color acc", f"{SEEDS_STEM}_shape_color")):
        table = seed_table(output, seeds, column)
        written = write_summary(output, stem, table, REFERENCE_SETTING, title, {**extra, "seeds": list(seeds)}, methods)
        paths = paths or written
    return paths
