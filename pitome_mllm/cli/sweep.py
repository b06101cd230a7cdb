"""``pitome-mllm sweep``: parse, call `pitome_mllm.experiments.sweep`, print."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from ..experiments.sweep import (
    SweepInterrupted,
    SweepLocked,
    SweepStopped,
    aggregate,
    lmms_eval_command,
    load_suite,
    parse_model_args,
    planned_runs,
    print_outcome,
    run_dir,
    run_suite,
)
from ..experiments.sweep.schema import check_batch_size, check_limit

HELP = "run an lmms-eval suite (one run per task x method x budget), resume it, or aggregate its results"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--suite", help="suite file, e.g. eval/suites/token_budgets.yaml")
    parser.add_argument(
        "--model", help="hub id or folder of the checkpoint (a transformers LLaVA, or the suite's lmms_model family)"
    )
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


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse a sweep without its required flags (``--aggregate DIR`` alone needs none).

    Raises:
        ValueError: naming the missing flags.
    """
    if args.aggregate:
        return
    missing = [flag for flag, value in (("--suite", args.suite), ("--model", args.model)) if not value]
    if not args.output and not args.dry_run:
        missing.append("--output")
    if missing:
        raise ValueError(f"sweep needs {', '.join(missing)} (or --aggregate DIR)")


def run(args: argparse.Namespace) -> int:
    if args.aggregate:
        paths = aggregate(args.aggregate)
        print(Path(paths["markdown"]).read_text())
        print("wrote " + ", ".join(str(path) for path in paths.values()))
        return 0
    check_arguments(args)
    suite = load_suite(args.suite)
    # A dry run checks what a real run checks before it starts anything.
    limit = check_limit("--limit", args.limit)
    batch_size = check_batch_size("--batch-size", args.batch_size) if args.batch_size is not None else None
    launcher = shlex.split(args.launcher) if args.launcher else None
    extra = parse_model_args(args.model_args, suite.lmms_model)
    if args.dry_run:
        if args.output and Path(args.output).exists() and not Path(args.output).is_dir():
            raise ValueError(f"--output {args.output} is a file, not a folder")
        for planned in planned_runs(suite, args.only, extra):
            directory = run_dir(Path(args.output or "sweep"), planned)
            command = lmms_eval_command(
                planned,
                args.model,
                directory,
                launcher=launcher or [sys.executable, "-m", "lmms_eval"],
                batch_size=batch_size or suite.batch_size,
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
            batch_size=batch_size,
            extra_model_args=extra,
        )
    except SweepLocked as error:
        print(f"pitome-mllm sweep: {error}", file=sys.stderr)
        return 2
    except SweepStopped as error:
        print_outcome(error.outcome)
        print(f"pitome-mllm sweep: stopped: {error}; fix that, then rerun the same command", file=sys.stderr)
        return 1
    except SweepInterrupted as interrupted:
        print_outcome(interrupted.outcome)
        print(
            "interrupted: finished runs are kept; resume with the same command:\n  " + resume_command(args),
            file=sys.stderr,
        )
        return 130
    print_outcome(outcome)
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
