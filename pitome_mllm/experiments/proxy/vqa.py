"""``pitome-mllm proxy vqa``: every method x budget of the easy-VQA mini-LLaVA, through lmms-eval.

1. Train the mini-LLaVA on unmerged tokens, or reuse the cached checkpoint
   (`pitome_mllm.experiments.proxy.mini_llava`).
2. Write a sweep suite for the chosen settings and budgets into ``OUTPUT/suite.yaml`` and run
   it with `pitome_mllm.experiments.sweep` (one ``python -m lmms_eval`` per run, model ``pitome_llava_hf``,
   task ``easy_vqa`` from ``eval/tasks``). A finished run is never redone, so an interrupted
   proxy resumes where it stopped.
3. Tabulate accuracy (overall and per question kind) against the visual tokens the language
   model actually received: ``vqa.md``, ``vqa.csv``, ``vqa.json`` and ``vqa.png``.

The suite and its runs are here; the tables and plots are `vqa_report`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...config import PiToMeConfig
from .files import seed_folder
from .settings import pick

TASK = "easy_vqa"
METRIC = "accuracy,none"
DEFAULT_BUDGETS = (128, 64, 32)
NUM_PATCHES = 256

# Setting -> PiToMeConfig fields; each budget is added as target_tokens (see `setting_runs`).
# "none" (the unmerged model) and "floor" (no visual token) are single runs.
SETTINGS: dict[str, dict[str, Any]] = {
    "none": {"method": "none"},
    "floor": {"method": "none", "target_tokens": 0},
    **pick("tome", "tome_sw", "pitome_reference", "pitome_paper", "pitome_reference_sw", "pitome_keys"),
    "pitome_order": {"method": "pitome", "preset": "reference", "keep_order": True},
    "pitome_llm_pa": {"method": "pitome", "preset": "reference", "llm_prop_attn": True},
    **pick("pitome_pure", "pitome_keys_sw"),
    "pitome_keys_sw_llm_pa": {
        "method": "pitome",
        "preset": "reference",
        "metric": "keys",
        "reduce": "size_weighted",
        "llm_prop_attn": True,
    },
    "pitome_pure_llm_pa": {"method": "pitome", "preset": "pure", "llm_prop_attn": True},
    "tome_sw_llm_pa": {"method": "tome", "preset": "reference", "reduce": "size_weighted", "llm_prop_attn": True},
    **pick(
        "pitome_projector_only",
        "random",
        "pool",
        "dominant",
        "fastervlm",
        "divprune",
        "cdpruner",
        "pitome_mllm",
    ),
}
SINGLE_RUN_SETTINGS = ("none", "floor")
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


# ----------------------------------------------------------------------------- several seeds
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
        train: `mini_llava.TrainSettings` whose ``seed`` is replaced by each of ``seeds`` (default: the defaults).

    Returns:
        The sweep outcomes of all calls together (``done``, ``skipped``, ``failed`` run keys, prefixed ``seed<N>/``).
    """
    import dataclasses

    from tqdm import tqdm

    from .. import sweep
    from .mini_llava import TrainSettings, train_mini_llava

    if not seeds:
        raise ValueError("no seed given")
    train = train or TrainSettings()
    checkpoints = {
        seed: train_mini_llava(settings=dataclasses.replace(train, seed=seed)) for seed in dict.fromkeys(seeds)
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
