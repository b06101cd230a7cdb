"""Suite files: the runs they expand to, model arguments, and the validated `Suite` (checks in `schema`)."""

from __future__ import annotations

import dataclasses
import fnmatch
import itertools
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...config import PiToMeConfig, shown
from .schema import (
    MODEL_LOADER_ARGS,
    SUITE_KEYS,
    SuiteError,
    check_batch_size,
    check_include_path,
    check_lmms_model,
    check_model_args,
    check_name,
    check_runs,
    check_tasks,
    check_unique_run_ids,
    read_yaml,
)

logger = logging.getLogger("pitome_mllm")


# The lmms-eval model a suite runs unless its ``lmms_model`` names another.
MODEL_NAME = "pitome_llava_hf"
RESULT_FILE = "result.json"
PATCH_CONFIG_FILE = "patch_config.json"
RECORD_FILE = "pitome_record.json"
LOG_FILE = "lmms_eval.log"
PATCH_FIELDS = {field.name for field in dataclasses.fields(PiToMeConfig)}


@dataclasses.dataclass(frozen=True)
class Run:
    """One lmms-eval invocation: a task and the plugin's model arguments for it."""

    task: str
    metric: str
    run_id: str  # e.g. "pitome-target_tokens64"
    name: str  # the suite's run name, e.g. "pitome"
    model_args: dict[str, Any]
    lmms_model: str = MODEL_NAME  # the lmms-eval model, e.g. "pitome_qwen2_5_vl"

    @property
    def key(self) -> str:
        return f"{self.task}/{self.run_id}"

    @property
    def method(self) -> str:
        return str(self.model_args.get("method", "pitome"))

    def patch_args(self) -> dict[str, Any]:
        return {name: value for name, value in self.model_args.items() if name in PATCH_FIELDS}


@dataclasses.dataclass
class Suite:
    name: str
    tasks: dict[str, str]  # task -> metric key in lmms-eval's results, e.g. "exact_match,none"
    model_args: dict[str, Any]
    runs: dict[str, dict[str, Any]]
    baseline: str | None
    batch_size: int
    include_path: Path | None
    path: Path
    lmms_model: str = MODEL_NAME

    def expand(self) -> list[Run]:
        """Every (task, run) with list-valued arguments expanded, tasks outermost."""
        expanded = []
        for task, metric in self.tasks.items():
            for name, arguments in self.runs.items():
                for run_id, run_args in _expand_run(name, arguments):
                    arguments = {**self.model_args, **run_args}
                    expanded.append(Run(task, metric, run_id, name, arguments, self.lmms_model))
        return expanded


def _expand_run(name: str, arguments: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    swept = [key for key, value in arguments.items() if isinstance(value, list)]
    if not swept:
        return [(name, dict(arguments))]
    combinations = []
    for values in itertools.product(*(arguments[key] for key in swept)):
        run_args = {**arguments, **dict(zip(swept, values, strict=True))}
        suffix = "-".join(f"{key}{value}" for key, value in zip(swept, values, strict=True))
        combinations.append((f"{name}-{suffix}", run_args))
    return combinations


def _check_arg_value(where: str, key: str, value: Any) -> None:
    # lmms-eval splits model_args on ',' and '='; such characters would silently corrupt a run.
    text = str(value)
    if "," in text or "=" in text:
        raise ValueError(f"{where}: model argument {key}={text!r} may not contain ',' or '='")


def load_suite(path: str | Path) -> Suite:
    """Read and validate a suite file (see the module docstring and `pitome_mllm.experiments.sweep_suite`).

    Raises:
        FileNotFoundError: no such file.
        SuiteError: (a ValueError) one line naming the file, the key and what is allowed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"suite file {str(path)!r} does not exist")
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise SuiteError(f"{path}: a suite is a mapping with 'tasks' and 'runs', got {shown(data, 60)}")
    unknown = sorted(set(map(str, data)) - SUITE_KEYS)
    if unknown:
        raise SuiteError(f"{path}: unknown keys {unknown}; allowed: {sorted(SUITE_KEYS)}")
    lmms_model = check_lmms_model(path, data.get("lmms_model", MODEL_NAME))
    known_args = PATCH_FIELDS | MODEL_LOADER_ARGS[lmms_model]
    tasks = check_tasks(path, data.get("tasks"))
    runs = check_runs(path, data.get("runs"), known_args)
    model_args = check_model_args(f"{path}: model_args", data.get("model_args"), known_args, sweepable=False)
    baseline = data.get("baseline")
    if baseline is not None and (not isinstance(baseline, str) or baseline not in runs):
        raise SuiteError(f"{path}: baseline {shown(baseline)} must name one of the runs {sorted(runs)}")
    name = data.get("name") or path.stem
    if not isinstance(name, str):
        raise SuiteError(f"{path}: name is {shown(name)}; it must be a string")
    suite = Suite(
        name=name,
        tasks=tasks,
        model_args=model_args,
        runs=runs,
        baseline=baseline,
        batch_size=check_batch_size(f"{path}: batch_size", data.get("batch_size", 1)),
        include_path=check_include_path(path, data.get("include_path")),
        path=path,
        lmms_model=lmms_model,
    )
    check_runs_expand(suite)
    return suite


def check_runs_expand(suite: Suite) -> None:
    """Every expanded run: a safe, unique folder name and a valid patch config."""
    path = suite.path
    for task in suite.tasks:
        runs = [run for run in suite.expand() if run.task == task]
        for run in runs:
            check_name(path, f"run {run.name!r} expands to run id", run.run_id)
        check_unique_run_ids(path, [(run.run_id, run.name) for run in runs])
    for run in suite.expand():
        try:
            PiToMeConfig(**run.patch_args())
        except (TypeError, ValueError) as error:
            raise SuiteError(f"{path}: run {run.run_id} has an invalid patch config: {error}") from None
        check_plugin_arguments(f"{path}: run {run.run_id}", run)


def check_plugin_arguments(where: str, run: Run) -> None:
    """The run's loading and generation arguments, checked as the plugin checks them when the run starts."""
    from ...integrations.lmms_eval.arguments import check_loader_arguments

    try:
        check_loader_arguments(run.model_args)
    except ValueError as error:
        raise SuiteError(f"{where} has an invalid model argument: {error}") from None


def scalar_from_text(text: str) -> Any:
    """A command-line value typed as the same text in a suite file would be (``16`` -> 16, ``true`` -> True)."""
    import yaml

    if text.lower() in ("", "none", "null"):
        return None
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if isinstance(value, (str, int, float, bool)) else text


def parse_model_args(text: str | None, lmms_model: str = MODEL_NAME) -> dict[str, Any]:
    """``"k=v,k2=v2"`` -> dict (the ``--model-args`` override), checked as a ``model_args`` of a suite
    running ``lmms_model``."""
    if not text:
        return {}
    parsed = {}
    for item in text.split(","):
        if "=" not in item:
            raise ValueError(f"--model-args takes k=v pairs separated by commas, got {shown(item)}")
        key, value = item.split("=", 1)
        if key.strip() in parsed:
            raise ValueError(f"--model-args gives {shown(key.strip())} twice; give each argument once")
        parsed[key.strip()] = scalar_from_text(value.strip())
    return check_model_args("--model-args", parsed, PATCH_FIELDS | MODEL_LOADER_ARGS[lmms_model], sweepable=False)


def planned_runs(suite: Suite, only: Sequence[str], overrides: dict[str, Any]) -> list[Run]:
    """The runs matching the ``only`` globs, with ``overrides`` (``--model-args``) applied to each.

    Raises:
        SuiteError: nothing matches, or an override makes a run's patch config invalid.
    """
    runs = [
        dataclasses.replace(run, model_args={**run.model_args, **overrides})
        for run in suite.expand()
        if not only or any(fnmatch.fnmatch(run.key, pattern) for pattern in only)
    ]
    if not runs:
        raise SuiteError(f"no run of suite {suite.name!r} matches {list(only)}")
    for run in runs:
        try:
            PiToMeConfig(**run.patch_args())
        except (TypeError, ValueError) as error:
            raise SuiteError(f"--model-args: run {run.key} gets an invalid patch config: {error}") from None
        check_plugin_arguments(f"--model-args: run {run.key}", run)
    return runs
