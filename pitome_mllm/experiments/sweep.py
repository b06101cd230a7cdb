"""``pitome-mllm sweep``: run a suite of lmms-eval evaluations, resume it, and tabulate it.

A suite file (``eval/suites/*.yaml``) names lmms-eval tasks (with the metric that stands for
accuracy), the model arguments every run shares, and the runs: each run is a set of
`pitome_llava_hf` model arguments, where a list value sweeps over its items::

    name: token_budgets
    tasks: {gqa: "exact_match,none", mme: "mme_perception_score,none"}
    model_args: {prompt_format: llava_v1}
    baseline: none
    runs:
      none: {method: none}
      pitome: {method: pitome, target_tokens: [64, 128, 192]}

Every (task, run) is one ``python -m lmms_eval ... --verbosity DEBUG`` subprocess writing into
``OUTPUT/runs/<task>/<run>/``: ``patch_config.json`` before it starts, lmms-eval's own output in
``lmms_eval/``, the plugin's ``pitome_record.json`` (patch summary, peak memory, mean per-sample
cost), and ``result.json`` last, written atomically once the metric has been read back. A run
whose ``result.json`` exists is skipped, so an interrupted sweep loses no finished run.
``pitome-mllm sweep --aggregate OUTPUT`` turns the ``result.json`` files into ``summary.csv``,
``summary.md`` and ``accuracy_vs_tokens.png``.

lmms-eval exits 0 even when the evaluation raised unless ``--verbosity DEBUG`` is given, so a run
counts as done only when its results file holds the metric.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import fnmatch
import itertools
import json
import logging
import math
import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..config import PiToMeConfig
from .sweep_process import (
    REPEATED_FAILURES,
    SweepInterrupted,
    SweepLock,
    SweepLocked,
    failure_signature,
    log_tail,
    repeated_failure,
    run_child,
    sigterm_as_interrupt,
)
from .sweep_suite import (
    LOADER_ARGS,
    SUITE_KEYS,
    SuiteError,
    check_batch_size,
    check_include_path,
    check_model_args,
    check_name,
    check_runs,
    check_tasks,
    check_unique_run_ids,
    inside,
    read_yaml,
)

logger = logging.getLogger("pitome_mllm")

HELP = "run an lmms-eval suite (one run per task x method x budget), resume it, or aggregate its results"

MODEL_NAME = "pitome_llava_hf"
RESULT_FILE = "result.json"
PATCH_CONFIG_FILE = "patch_config.json"
RECORD_FILE = "pitome_record.json"
LOG_FILE = "lmms_eval.log"
PATCH_FIELDS = {field.name for field in dataclasses.fields(PiToMeConfig)}


# ------------------------------------------------------------------------------------ suites
@dataclasses.dataclass(frozen=True)
class Run:
    """One lmms-eval invocation: a task and the plugin's model arguments for it."""

    task: str
    metric: str
    run_id: str  # e.g. "pitome-target_tokens64"
    name: str  # the suite's run name, e.g. "pitome"
    model_args: dict[str, Any]

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

    def expand(self) -> list[Run]:
        """Every (task, run) with list-valued arguments expanded, tasks outermost."""
        expanded = []
        for task, metric in self.tasks.items():
            for name, arguments in self.runs.items():
                for run_id, run_args in _expand_run(name, arguments):
                    expanded.append(Run(task, metric, run_id, name, {**self.model_args, **run_args}))
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
        raise SuiteError(f"{path}: a suite is a mapping with 'tasks' and 'runs', got {data!r:.60}")
    unknown = sorted(set(map(str, data)) - SUITE_KEYS)
    if unknown:
        raise SuiteError(f"{path}: unknown keys {unknown}; allowed: {sorted(SUITE_KEYS)}")
    known_args = PATCH_FIELDS | LOADER_ARGS
    tasks = check_tasks(path, data.get("tasks"))
    runs = check_runs(path, data.get("runs"), known_args)
    model_args = check_model_args(f"{path}: model_args", data.get("model_args"), known_args, sweepable=False)
    baseline = data.get("baseline")
    if baseline is not None and baseline not in runs:
        raise SuiteError(f"{path}: baseline {baseline!r} is not one of the runs {sorted(runs)}")
    name = data.get("name") or path.stem
    if not isinstance(name, str):
        raise SuiteError(f"{path}: name is {name!r}; it must be a string")
    suite = Suite(
        name=name,
        tasks=tasks,
        model_args=model_args,
        runs=runs,
        baseline=baseline,
        batch_size=check_batch_size(f"{path}: batch_size", data.get("batch_size", 1)),
        include_path=check_include_path(path, data.get("include_path")),
        path=path,
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


def parse_model_args(text: str | None) -> dict[str, Any]:
    """``"k=v,k2=v2"`` -> dict (the ``--model-args`` override), checked as a suite's ``model_args``."""
    if not text:
        return {}
    parsed = {}
    for item in text.split(","):
        if "=" not in item:
            raise ValueError(f"--model-args takes k=v pairs separated by commas, got {item!r}")
        key, value = item.split("=", 1)
        parsed[key.strip()] = scalar_from_text(value.strip())
    return check_model_args("--model-args", parsed, PATCH_FIELDS | LOADER_ARGS, sweepable=False)


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
    return runs


# -------------------------------------------------------------------------------------- runs
def run_dir(output: Path, run: Run) -> Path:
    """``OUTPUT/runs/<task>/<run id>``, checked to stay inside ``output`` (symlinks included)."""
    return inside(output, output / "runs" / run.task / run.run_id)


def prepare_output(output: str | Path) -> Path:
    """The sweep folder, created; a `SuiteError` when it is a file or cannot be written."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise SuiteError(f"--output {output} is a file, not a folder")
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SuiteError(f"--output {output}: cannot create the folder ({error.strerror})") from None
    if not os.access(output, os.W_OK | os.X_OK):
        raise SuiteError(f"--output {output}: the folder is not writable")
    return output


def _model_args_string(args: dict[str, Any]) -> str:
    def text(value: Any) -> str:
        if value is None:
            return "none"
        return str(value).lower() if isinstance(value, bool) else str(value)

    return ",".join(f"{key}={text(value)}" for key, value in args.items())


def lmms_eval_command(
    run: Run,
    model: str,
    directory: Path,
    *,
    launcher: Sequence[str],
    batch_size: int,
    limit: float | None,
    include_path: Path | None,
) -> list[str]:
    """The command line of one run (``launcher`` is e.g. ``[python, -m, lmms_eval]``)."""
    model_args = {"pretrained": model, **run.model_args, "record": str(directory / RECORD_FILE)}
    for key, value in model_args.items():
        _check_arg_value(f"run {run.key}", key, value)
    command = [
        *launcher,
        "--model",
        MODEL_NAME,
        "--model_args",
        _model_args_string(model_args),
        "--tasks",
        run.task,
        "--batch_size",
        str(batch_size),
        "--output_path",
        str(directory / "lmms_eval"),
        "--log_samples",
        # Without DEBUG lmms-eval exits 0 after an evaluation error.
        "--verbosity",
        "DEBUG",
    ]
    if limit is not None:
        command += ["--limit", f"{limit:g}"]
    if include_path is not None:
        command += ["--include_path", str(include_path)]
    return command


def find_results_file(directory: Path) -> Path | None:
    """The newest ``*_results.json`` lmms-eval wrote under ``directory``."""
    candidates = sorted(directory.rglob("*_results.json"), key=lambda path: path.stat().st_mtime)
    return candidates[-1] if candidates else None


def read_metric(results_file: Path, task: str, metric: str) -> float:
    """``results[task][metric]`` from an lmms-eval results file.

    Raises:
        ValueError: the task or metric is missing, or the value is not a number.
    """
    results = json.loads(results_file.read_text()).get("results", {})
    if task not in results:
        raise ValueError(f"{results_file} has no results for task {task!r} (has {sorted(results)})")
    values = results[task]
    if metric not in values:
        numeric = sorted(key for key, value in values.items() if isinstance(value, (int, float)))
        raise ValueError(f"{results_file}: task {task!r} has no metric {metric!r}; it has {numeric}")
    value = values[metric]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{results_file}: {task} {metric} is {value!r}, not a number")
    return float(value)


def write_json_atomically(path: Path, payload: dict[str, Any]) -> None:
    """Write to a temporary file and rename it, so readers see the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    # default=str: a stray non-JSON value (a dtype, a path) is recorded as text rather than losing the file.
    temporary.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(temporary, path)


def _identity(model: str, run: Run, limit: float | None, batch_size: int) -> dict[str, Any]:
    """What makes a stored result reusable: the same model, arguments, limit and batch size."""
    return {"model": model, "model_args": run.model_args, "limit": limit, "batch_size": batch_size}


def read_stored_result(result_path: Path, move_aside: bool = True) -> dict[str, Any] | None:
    """A run's ``result.json``, or None (with a warning naming it) when it is not a usable result.

    With ``move_aside`` (the sweep) a corrupt file is moved to ``result.json.corrupt`` (kept for
    inspection) and its run is redone; aggregation only leaves it out.
    """
    try:
        stored = json.loads(result_path.read_text())
        problem = None if isinstance(stored, dict) else f"holds {type(stored).__name__}, not a result object"
        if problem is None and not isinstance(stored.get("score"), (int, float)):
            problem = "has no numeric 'score'"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        problem = f"is not readable JSON ({error})"
    if problem is None:
        return stored
    if not move_aside:
        logger.warning("%s %s; leaving that run out", result_path, problem)
        return None
    corrupt = result_path.with_name(result_path.name + ".corrupt")
    with contextlib.suppress(OSError):
        os.replace(result_path, corrupt)
    logger.warning("%s %s; moved it to %s and treating the run as not done", result_path, problem, corrupt.name)
    return None


def _check_reusable(result_path: Path, stored: dict[str, Any], identity: dict[str, Any]) -> None:
    differing = [key for key, value in identity.items() if stored.get(key) != value]
    if differing:
        details = ", ".join(f"{key}: stored {stored.get(key)!r} vs now {identity[key]!r}" for key in differing)
        raise ValueError(
            f"{result_path} was produced with other settings ({details}); "
            "use another --output folder, or delete that run folder to redo it"
        )


class RunFailed(RuntimeError):
    """A run that produced no result; ``signature`` is set when lmms-eval evaluated nothing."""

    def __init__(self, message: str, signature: str | None = None, tail: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.signature = signature
        self.tail = list(tail)


def execute_run(
    run: Run,
    model: str,
    output: Path,
    *,
    suite: Suite,
    launcher: Sequence[str],
    batch_size: int,
    limit: float | None,
    on_child: Callable[[int], None] = lambda pid: None,
) -> dict[str, Any]:
    """Run one (task, run) through lmms-eval and store its ``result.json``; returns the result.

    ``on_child`` receives the pid of the lmms-eval process once it has started.

    Raises:
        RunFailed: lmms-eval failed or wrote no usable metric (see the run's log file).
    """
    directory = run_dir(output, run)
    lmms_dir = directory / "lmms_eval"
    # A folder without result.json is an attempt that did not finish: start it afresh so that
    # a stale results file can never be taken for this attempt's.
    shutil.rmtree(lmms_dir, ignore_errors=True)
    (directory / RECORD_FILE).unlink(missing_ok=True)
    directory.mkdir(parents=True, exist_ok=True)
    write_json_atomically(directory / PATCH_CONFIG_FILE, PiToMeConfig(**run.patch_args()).to_dict())
    command = lmms_eval_command(
        run, model, directory, launcher=launcher, batch_size=batch_size, limit=limit, include_path=suite.include_path
    )
    started = time.perf_counter()
    with open(directory / LOG_FILE, "w") as log:
        log.write(shlex.join(command) + "\n\n")
        log.flush()
        returncode = run_child(command, log, on_start=on_child)
    wall_s = time.perf_counter() - started
    log_hint = f"see {directory / LOG_FILE}"
    results_file = find_results_file(lmms_dir)
    if results_file is None:
        # lmms-eval evaluated nothing: the reason is in the last lines of its log.
        tail = log_tail(directory / LOG_FILE)
        status = f"exited with status {returncode}" if returncode else "exited 0"
        message = f"{run.key}: lmms-eval {status} and wrote no results; {log_hint}"
        raise RunFailed(message, failure_signature(tail), tail)
    if returncode != 0:
        raise RunFailed(f"{run.key}: lmms-eval exited with status {returncode}; {log_hint}")
    try:
        score = read_metric(results_file, run.task, run.metric)
    except ValueError as error:
        raise RunFailed(f"{run.key}: {error}; {log_hint}") from error
    record_path = directory / RECORD_FILE
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    result = {
        **_identity(model, run, limit, batch_size),
        "suite": suite.name,
        "task": run.task,
        "run": run.run_id,
        "run_name": run.name,
        "method": run.method,
        "baseline_run": suite.baseline,
        "metric": run.metric,
        "score": score,
        "patch_config": PiToMeConfig(**run.patch_args()).to_dict(),
        "num_visual_tokens": (record.get("patch") or {}).get("num_visual_tokens"),
        "cost": {
            key: record.get(key)
            for key in (
                "samples",
                "mean_visual_tokens",
                "mean_input_tokens",
                "mean_output_tokens",
                "mean_ttft_s",
                "mean_generation_s",
                "model_seconds",
                "peak_memory_mib",
                "memory_kind",
            )
        },
        "wall_s": wall_s,
        "lmms_eval_results": str(results_file.relative_to(directory)),
        "command": command,
    }
    write_json_atomically(directory / RESULT_FILE, result)
    return result


def run_suite(
    suite: Suite,
    model: str,
    output: str | Path,
    *,
    limit: float | None = None,
    only: Sequence[str] = (),
    launcher: Sequence[str] | None = None,
    batch_size: int | None = None,
    extra_model_args: dict[str, Any] | None = None,
) -> dict[str, list[str]]:
    """Run every (task, run) of ``suite`` that has no ``result.json`` yet.

    Args:
        model: hub id or folder given to the plugin as ``pretrained``.
        output: sweep folder (created).
        limit: lmms-eval ``--limit`` (documents per task), None for all.
        only: glob patterns on ``"<task>/<run>"``; empty runs everything.
        launcher: command that starts lmms-eval (default: this Python with ``-m lmms_eval``;
            e.g. ``accelerate launch --num_processes 8 -m lmms_eval`` for data parallelism).
        extra_model_args: override the suite's model arguments (e.g. ``device``, ``dtype``).

    Returns:
        ``{"done": [...], "skipped": [...], "failed": [...]}`` of run keys.
    """
    output = prepare_output(output)
    launcher = list(launcher) if launcher else [sys.executable, "-m", "lmms_eval"]
    batch_size = check_batch_size("--batch-size", batch_size) if batch_size is not None else suite.batch_size
    runs = planned_runs(suite, only, extra_model_args or {})
    outcome: dict[str, list[str]] = {"done": [], "skipped": [], "failed": []}
    with SweepLock(output) as lock, sigterm_as_interrupt():
        write_json_atomically(
            output / "sweep.json",
            {"suite": suite.name, "suite_file": str(suite.path.resolve()), "model": model, "limit": limit},
        )
        try:
            _run_each(runs, suite, model, output, lock, outcome, launcher=launcher, batch_size=batch_size, limit=limit)
        except KeyboardInterrupt:
            raise SweepInterrupted(outcome) from None
    return outcome


class SweepStopped(RuntimeError):
    """The sweep gave up early because its setup is broken; carries what it had done."""

    def __init__(self, message: str, outcome: dict[str, list[str]]) -> None:
        super().__init__(message)
        self.outcome = outcome


def _run_each(runs, suite, model, output, lock, outcome, *, launcher, batch_size, limit) -> None:
    from tqdm import tqdm

    signatures: list[str | None] = []  # per attempted run: why it failed before evaluating, else None
    progress = tqdm(runs, desc=f"sweep {suite.name}", unit="run")
    for run in progress:
        progress.set_postfix_str(run.key)
        result_path = run_dir(output, run) / RESULT_FILE
        stored = read_stored_result(result_path) if result_path.exists() else None
        if stored is not None:
            _check_reusable(result_path, stored, _identity(model, run, limit, batch_size))
            outcome["skipped"].append(run.key)
            continue
        try:
            result = execute_run(
                run, model, output, suite=suite, launcher=launcher, batch_size=batch_size, limit=limit,
                on_child=lock.set_child,
            )  # fmt: skip
        except RunFailed as error:
            logger.error("%s", error)
            progress.write(f"FAILED {error}")
            if error.tail:
                progress.write("  last lines of its log:\n" + "\n".join(f"  | {line}" for line in error.tail))
            outcome["failed"].append(run.key)
            signatures.append(error.signature)
            reason = _stop_reason(run, suite, error, signatures)
            if reason:
                raise SweepStopped(reason, outcome) from None
            continue
        finally:
            lock.set_child(None)
        signatures.append(None)
        progress.write(f"done {run.key}: {run.metric} = {result['score']:.4g}")
        outcome["done"].append(run.key)


def _stop_reason(run: Run, suite: Suite, error: RunFailed, signatures: list[str | None]) -> str | None:
    """Why the sweep should stop after ``run`` failed, or None to go on with the next run."""
    if error.signature is None:
        return None
    if run.name == suite.baseline:
        return f"the baseline run {run.key} failed before lmms-eval evaluated anything ({error.signature})"
    repeated = repeated_failure(signatures)
    if repeated:
        return f"the last {REPEATED_FAILURES} runs failed the same way before evaluating anything: {repeated}"
    return None


# ------------------------------------------------------------------------------- aggregation
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
    """
    paths = sorted(Path(output).glob(f"runs/*/*/{RESULT_FILE}"))
    if not paths:
        raise FileNotFoundError(f"no {RESULT_FILE} under {str(Path(output) / 'runs')!r}; run the sweep first")
    results = [read_stored_result(path, move_aside=False) for path in paths]
    return [result for result in results if result is not None]


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
    with open(path, "w", newline="") as stream:
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
    figure.savefig(path, dpi=120)
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
    write_csv(rows, paths["csv"])
    paths["markdown"].write_text(markdown_table(rows))
    plot_accuracy_vs_tokens(rows, paths["plot"])
    return paths


# ------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--suite", help="suite file, e.g. eval/suites/token_budgets.yaml")
    parser.add_argument("--model", help="hub id or folder of a transformers LLaVA checkpoint")
    parser.add_argument("--output", help="sweep folder (runs are resumed from what it holds)")
    parser.add_argument("--limit", type=float, help="documents per task (lmms-eval --limit); default all")
    parser.add_argument("--only", action="append", default=[], metavar="GLOB", help="run only TASK/RUN matching GLOB")
    parser.add_argument("--batch-size", type=int, help="override the suite's batch size")
    parser.add_argument("--model-args", help="override model arguments of every run, e.g. device=cuda,dtype=float16")
    parser.add_argument(
        "--launcher",
        help="command starting lmms-eval (default: this python -m lmms_eval), "
        "e.g. 'accelerate launch --num_processes 8 -m lmms_eval'",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the lmms-eval commands and stop")
    parser.add_argument("--aggregate", metavar="DIR", help="only build summary.csv / .md / .png of a sweep folder")


def _print_outcome(outcome: dict[str, list[str]]) -> None:
    print(
        f"{len(outcome['done'])} run(s) done, {len(outcome['skipped'])} skipped (already done), "
        f"{len(outcome['failed'])} failed"
    )
    for key in outcome["failed"]:
        print(f"  failed: {key}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    if args.aggregate:
        paths = aggregate(args.aggregate)
        print(Path(paths["markdown"]).read_text())
        print("wrote " + ", ".join(str(path) for path in paths.values()))
        return 0
    missing = [flag for flag, value in (("--suite", args.suite), ("--model", args.model)) if not value]
    if not args.output and not args.dry_run:
        missing.append("--output")
    if missing:
        raise ValueError(f"sweep needs {', '.join(missing)} (or --aggregate DIR)")
    suite = load_suite(args.suite)
    limit = int(args.limit) if args.limit is not None and float(args.limit).is_integer() else args.limit
    launcher = shlex.split(args.launcher) if args.launcher else None
    extra = parse_model_args(args.model_args)
    if args.dry_run:
        for planned in planned_runs(suite, args.only, extra):
            directory = run_dir(Path(args.output or "sweep"), planned)
            command = lmms_eval_command(
                planned,
                args.model,
                directory,
                launcher=launcher or [sys.executable, "-m", "lmms_eval"],
                batch_size=args.batch_size or suite.batch_size,
                limit=limit,
                include_path=suite.include_path,
            )
            print(shlex.join(command))
        return 0
    try:
        outcome = run_suite(
            suite,
            args.model,
            args.output,
            limit=limit,
            only=args.only,
            launcher=launcher,
            batch_size=args.batch_size,
            extra_model_args=extra,
        )
    except SweepLocked as error:
        print(f"pitome-mllm sweep: {error}", file=sys.stderr)
        return 2
    except SweepStopped as error:
        _print_outcome(error.outcome)
        print(f"pitome-mllm sweep: stopped: {error}; fix that, then rerun the same command", file=sys.stderr)
        return 1
    except SweepInterrupted as interrupted:
        _print_outcome(interrupted.outcome)
        print(
            "interrupted: finished runs are kept; resume with the same command:\n  " + resume_command(args),
            file=sys.stderr,
        )
        return 130
    _print_outcome(outcome)
    if outcome["done"] or outcome["skipped"]:
        paths = aggregate(args.output)
        print("wrote " + ", ".join(str(path) for path in paths.values()))
    return 1 if outcome["failed"] else 0


def resume_command(args: argparse.Namespace) -> str:
    """The ``pitome-mllm sweep`` command line that carries on where ``args`` stopped."""
    command = ["pitome-mllm", "sweep", "--suite", args.suite, "--model", args.model, "--output", args.output]
    optional = [("--limit", args.limit), ("--batch-size", args.batch_size), ("--model-args", args.model_args),
                ("--launcher", args.launcher)]  # fmt: skip
    for flag, value in optional:
        if value is not None:
            command += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    for pattern in args.only:
        command += ["--only", pattern]
    return shlex.join(command)
