"""Running a suite: one lmms-eval child per (task, run), resumable, locked, stopping on a broken setup."""

from __future__ import annotations

import contextlib
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

from ...common.files import checked_output_folder, write_json_atomically
from ...config import PiToMeConfig, shown
from .process import (
    REPEATED_FAILURES,
    SweepInterrupted,
    SweepLock,
    failure_signature,
    log_tail,
    repeated_failure,
    run_child,
    sigterm_as_interrupt,
)
from .schema import (
    SuiteError,
    check_batch_size,
    check_limit,
    inside,
    open_for_writing,
    refuse_link,
)
from .suite import (
    LOG_FILE,
    PATCH_CONFIG_FILE,
    RECORD_FILE,
    RESULT_FILE,
    Run,
    Suite,
    _check_arg_value,
    planned_runs,
)

logger = logging.getLogger("pitome_mllm")

# Written once lmms-eval finished a run (exit 0, results file present), before its metric is read:
# a rerun that only changes which metric is read (a typo fixed) reuses the evaluation.
EVALUATED_FILE = "lmms_eval_done.json"


def run_dir(output: Path, run: Run) -> Path:
    """``OUTPUT/runs/<task>/<run id>``, checked to stay inside ``output`` (symlinks included)."""
    return inside(output, output / "runs" / run.task / run.run_id)


def prepare_output(output: str | Path) -> Path:
    """The sweep folder, created; a `SuiteError` when it is a file or cannot be written."""
    try:
        return checked_output_folder("--output", output)
    except ValueError as error:
        raise SuiteError(str(error)) from None


def remove_folder(folder: Path) -> None:
    """Delete ``folder`` and what it holds (nothing if it is absent); a `SuiteError` naming what is left."""
    try:
        shutil.rmtree(folder)
    except FileNotFoundError:
        pass
    except OSError as error:
        raise SuiteError(f"cannot clear {folder} before rerunning its run: {error}") from None


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
        run.lmms_model,
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


class MissingMetric(ValueError):
    """lmms-eval's results lack the suite's metric; ``available`` lists the numeric ones it has."""

    def __init__(self, message: str, available: list[str]) -> None:
        super().__init__(message)
        self.available = available


def is_finite_number(value: Any) -> bool:
    """A real, finite number (``true``, ``NaN`` and ``Infinity`` are not scores)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_metric(results_file: Path, task: str, metric: str) -> float:
    """``results[task][metric]`` from an lmms-eval results file.

    Raises:
        MissingMetric: the metric is missing (a `ValueError`, naming the metrics there are).
        ValueError: the task is missing, or the value is not a finite number.
    """
    results = json.loads(results_file.read_text()).get("results", {})
    if task not in results:
        raise ValueError(f"{results_file} has no results for task {task!r} (has {sorted(results)})")
    values = results[task]
    if metric not in values:
        numeric = sorted(key for key, value in values.items() if isinstance(value, (int, float)))
        raise MissingMetric(f"{results_file}: task {task!r} has no metric {metric!r}; it has {numeric}", numeric)
    value = values[metric]
    if not is_finite_number(value):
        raise ValueError(f"{results_file}: {task} {metric} is {value!r}, not a finite number")
    return float(value)


def _identity(model: str, run: Run, limit: float | None, batch_size: int) -> dict[str, Any]:
    """What makes a stored result reusable: the same model, arguments, limit and batch size."""
    return {"model": model, "model_args": run.model_args, "limit": limit, "batch_size": batch_size}


# What names a stored result's row: the task and the run id, both strings in every result the sweep writes.
RESULT_NAMES = ("task", "run")


def read_stored_result(result_path: Path, move_aside: bool = True) -> dict[str, Any] | None:
    """A run's ``result.json``, or None (with a warning naming it) when it is not a usable result.

    With ``move_aside`` (the sweep) a corrupt file is moved to ``result.json.corrupt`` (kept for
    inspection) and its run is redone; aggregation only leaves it out.
    """
    try:
        stored = json.loads(result_path.read_text())
        problem = None if isinstance(stored, dict) else f"holds {type(stored).__name__}, not a result object"
        if problem is None and not is_finite_number(stored.get("score")):
            problem = f"has no numeric 'score' ({shown(stored.get('score'))} is not a finite number)"
        if problem is None:
            missing = [key for key in RESULT_NAMES if not isinstance(stored.get(key), str)]
            problem = f"names no {' or '.join(map(repr, missing))} (not a result the sweep wrote)" if missing else None
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
    """A run that produced no result; ``signature`` is set when lmms-eval evaluated nothing,
    ``missing_metric`` when it evaluated but the suite's metric is not among its results."""

    def __init__(
        self,
        message: str,
        signature: str | None = None,
        tail: Sequence[str] = (),
        missing_metric: MissingMetric | None = None,
    ) -> None:
        super().__init__(message)
        self.signature = signature
        self.tail = list(tail)
        self.missing_metric = missing_metric


def _evaluation(model: str, run: Run, limit: float | None, batch_size: int) -> dict[str, Any]:
    """What makes a finished lmms-eval output reusable: the run's identity and its task."""
    return {**_identity(model, run, limit, batch_size), "task": run.task}


def reusable_evaluation(directory: Path, evaluation: dict[str, Any]) -> dict[str, Any] | None:
    """The run's `EVALUATED_FILE` when it records ``evaluation`` and its results file is still there."""
    try:
        done = json.loads((directory / EVALUATED_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(done, dict) or any(done.get(key) != value for key, value in evaluation.items()):
        return None
    results = done.get("lmms_eval_results")
    if not isinstance(results, str) or not inside(directory, directory / results).is_file():
        return None
    return done


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
    lmms_dir = refuse_link(directory / "lmms_eval")
    evaluation = _evaluation(model, run, limit, batch_size)
    done = reusable_evaluation(directory, evaluation)
    log_hint = f"see {directory / LOG_FILE}"
    if done is not None:
        # lmms-eval finished this very run before (only reading its metric failed): read it again.
        logger.info("%s: reusing the finished lmms-eval output in %s", run.key, lmms_dir)
        results_file, command, wall_s = directory / done["lmms_eval_results"], done["command"], done["wall_s"]
    else:
        results_file, command, wall_s = _evaluate(run, model, directory, evaluation, suite, launcher, batch_size,
                                                  limit, on_child)  # fmt: skip
    try:
        score = read_metric(results_file, run.task, run.metric)
    except MissingMetric as error:
        raise RunFailed(f"{run.key}: {error}; {log_hint}", missing_metric=error) from error
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


def _evaluate(run, model, directory, evaluation, suite, launcher, batch_size, limit, on_child):
    """Run lmms-eval for ``run`` into a fresh ``directory/lmms_eval``; ``(results file, command, wall_s)``.

    Raises:
        RunFailed: lmms-eval failed or wrote no results.
    """
    lmms_dir = directory / "lmms_eval"
    # A folder without result.json is an attempt that did not finish: start it afresh so that
    # a stale results file can never be taken for this attempt's.
    (directory / EVALUATED_FILE).unlink(missing_ok=True)
    remove_folder(refuse_link(lmms_dir))
    (directory / RECORD_FILE).unlink(missing_ok=True)
    directory.mkdir(parents=True, exist_ok=True)
    write_json_atomically(directory / PATCH_CONFIG_FILE, PiToMeConfig(**run.patch_args()).to_dict())
    command = lmms_eval_command(
        run, model, directory, launcher=launcher, batch_size=batch_size, limit=limit, include_path=suite.include_path
    )
    started = time.perf_counter()
    with open_for_writing(directory / LOG_FILE) as log:
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
    relative = str(results_file.relative_to(directory))
    write_json_atomically(
        directory / EVALUATED_FILE, {**evaluation, "lmms_eval_results": relative, "command": command, "wall_s": wall_s}
    )
    return results_file, command, wall_s


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
    launcher = list(launcher) if launcher else [sys.executable, "-m", "lmms_eval"]
    batch_size = check_batch_size("--batch-size", batch_size) if batch_size is not None else suite.batch_size
    limit = check_limit("--limit", limit)
    runs = planned_runs(suite, only, extra_model_args or {})
    output = prepare_output(output)  # after every check: a refused sweep leaves no folder behind
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
    if error.missing_metric is not None:
        # Every run would evaluate fully and then fail the same way: stop after the first.
        return (
            f"task {run.task!r} has no metric {run.metric!r} in lmms-eval's results; it has "
            f"{error.missing_metric.available}: fix tasks.{run.task} in {suite.path} (the finished "
            "evaluation is kept and reused when you rerun)"
        )
    if error.signature is None:
        return None
    if run.name == suite.baseline:
        return f"the baseline run {run.key} failed before lmms-eval evaluated anything ({error.signature})"
    repeated = repeated_failure(signatures)
    if repeated:
        return f"the last {REPEATED_FAILURES} runs failed the same way before evaluating anything: {repeated}"
    return None


def print_outcome(outcome: dict[str, list[str]]) -> None:
    print(
        f"{len(outcome['done'])} run(s) done, {len(outcome['skipped'])} skipped (already done), "
        f"{len(outcome['failed'])} failed"
    )
    for key in outcome["failed"]:
        print(f"  failed: {key}", file=sys.stderr)
