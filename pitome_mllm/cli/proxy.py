"""``pitome-mllm proxy fidelity|vqa``: the CPU proxy benchmarks on a real pretrained tower.

* ``fidelity``: how much of the DINOv2 tower's features each method keeps (linear probe,
  cosines, spectral distance); `pitome_mllm.experiments.proxy.fidelity`.
* ``vqa``: a mini-LLaVA with that tower, trained on unmerged tokens, answering easy-VQA questions
  through lmms-eval with every method and budget; `pitome_mllm.experiments.proxy.vqa`.
* ``report``: both proxies' multi-seed tables side by side (mean, paired difference to the
  reference PiToMe with standard errors) and the method to use at each budget
  (`pitome_mllm.experiments.proxy.report`, `pitome_mllm.experiments.proxy.recommend`).

``--seeds`` (fidelity and vqa) repeats a proxy over seeds: training seeds of the mini-LLaVA,
the selection seed of ``random`` in the fidelity proxy. Each seed has a folder ``OUTPUT/seed<N>``.

Both need the proxy extra: ``pip install -e '.[proxy]'`` (and, for Fashion-MNIST, the Debian
package ``dataset-fashion-mnist``). The proxies import torch, so their modules load only when a
proxy is chosen.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..common.files import checked_output_folder
from ..runtime.terminal import add_list_argument

HELP = "CPU proxy benchmarks on a real pretrained ViT: feature fidelity and a mini-LLaVA on easy-VQA"
FIDELITY_HELP = (
    "feature fidelity of every token-reduction method on the real DINOv2 tower (probe, cosines, spectral distance)"
)
VQA_HELP = "easy-VQA proxy: train (or reuse) a mini-LLaVA on the real DINOv2 tower, evaluate every method x budget"
REPORT_HELP = "both proxies' multi-seed tables, paired differences with standard errors, and the method per budget"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    subparsers = parser.add_subparsers(dest="proxy", metavar="PROXY", required=True)
    for name, help_text, add, run_proxy in (
        ("fidelity", FIDELITY_HELP, add_fidelity_arguments, run_fidelity),
        ("vqa", VQA_HELP, add_vqa_arguments, run_vqa),
        ("report", REPORT_HELP, add_report_arguments, run_report),
    ):
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        add(sub)
        sub.set_defaults(_proxy_run=run_proxy)


def run(args: argparse.Namespace) -> int:
    # Every proxy command writes fixed names into --output: check it before the work starts.
    checked_output_folder("--output", args.output)
    return int(args._proxy_run(args) or 0)


def add_fidelity_arguments(parser: argparse.ArgumentParser) -> None:
    from ..experiments.proxy.fidelity import DEFAULT_BUDGETS, DEFAULT_OUTPUT
    from ..experiments.proxy.fidelity_settings import DEFAULT_SETTINGS, SETTINGS
    from ..experiments.proxy.images import DATASETS

    parser.add_argument("--dataset", choices=DATASETS, default="fashion-mnist", help="default: fashion-mnist")
    parser.add_argument("--train", type=int, default=600, help="training images of the linear probe (default 600)")
    parser.add_argument("--test", type=int, default=300, help="test images scored per setting (default 300)")
    add_list_argument(
        parser, "--budgets", int, default=list(DEFAULT_BUDGETS), help="visual-token budgets (default: 128 64 32)"
    )
    add_list_argument(
        parser, "--settings", default=list(DEFAULT_SETTINGS), help=f"settings (default: all): {', '.join(SETTINGS)}"
    )
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help=f"results folder (default {DEFAULT_OUTPUT})")
    parser.add_argument("--spectral-images", type=int, default=50, help="test images scored for SD (default 50)")
    parser.add_argument("--batch-size", type=int, default=20, help="images per forward (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random setting (default 0)")
    add_list_argument(
        parser,
        "--seeds",
        int,
        default=None,
        help="several seeds of the random setting (the others run once); results in OUTPUT/seed<N> "
        "and OUTPUT/fidelity_seeds.*",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run_fidelity(args: argparse.Namespace) -> int:
    from ..experiments.proxy.fidelity import run_fidelity, run_fidelity_seeds, write_seed_report
    from ..experiments.proxy.fidelity_table import STEM, markdown_table

    # What one seed's run and a multi-seed run both take.
    study = {
        "dataset": args.dataset,
        "train": args.train,
        "test": args.test,
        "budgets": args.budgets,
        "settings": args.settings,
        "output": args.output,
        "spectral_images": args.spectral_images,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "progress": not args.no_progress,
    }
    if args.seeds:
        started = time.perf_counter()
        run_fidelity_seeds(args.seeds, **study)
        paths = write_seed_report(
            Path(args.output),
            args.seeds,
            {"command": " ".join(sys.argv), "wall_seconds_this_call": round(time.perf_counter() - started, 1)},
        )
        print(paths["md"].read_text())
        print("wrote " + ", ".join(str(path) for path in paths.values()))
        return 0
    rows = run_fidelity(**study, seed=args.seed)
    print(markdown_table(rows))
    print(f"wrote {Path(args.output) / STEM}.{{json,md,csv,png}}")
    return 0


def add_vqa_arguments(parser: argparse.ArgumentParser) -> None:
    from ..experiments.proxy import easy_vqa, mini_llava
    from ..experiments.proxy.vqa import DEFAULT_BUDGETS, DEFAULT_SETTINGS, SETTINGS

    parser.add_argument("--output", default="proxy_results/vqa", help="folder of the sweep and the report")
    add_list_argument(
        parser,
        "--settings",
        default=list(DEFAULT_SETTINGS),
        help=f"settings, or 'all' (default: {' '.join(DEFAULT_SETTINGS)}); all: {', '.join(SETTINGS)}",
    )
    add_list_argument(parser, "--budgets", int, default=list(DEFAULT_BUDGETS), help="visual-token budgets per image")
    parser.add_argument("--limit", type=int, default=300, help=f"test questions per run (of {easy_vqa.TASK_ROWS})")
    parser.add_argument("--batch-size", type=int, default=16, help="lmms-eval batch size")
    parser.add_argument("--checkpoint", help="trained mini-LLaVA folder (default: trained once, cached)")
    parser.add_argument(
        "--train-images",
        type=int,
        default=mini_llava.TrainSettings.train_images,
        help="training images (of 4000; every question on them is used)",
    )
    parser.add_argument("--epochs", type=int, default=mini_llava.TrainSettings.epochs, help="training epochs")
    parser.add_argument("--seed", type=int, default=mini_llava.TrainSettings.seed, help="training seed")
    add_list_argument(
        parser,
        "--seeds",
        int,
        default=None,
        help="several training seeds: one mini-LLaVA each, results in OUTPUT/seed<N> and OUTPUT/vqa_seeds.*",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads of training and of each lmms-eval run (default: all)"
    )
    parser.add_argument("--retrain", action="store_true", help="train again even if a cached checkpoint exists")
    parser.add_argument("--train-only", action="store_true", help="train (or find) the checkpoint and stop")
    parser.add_argument("--include-path", help="folder holding the easy_vqa lmms-eval task (default: eval/tasks)")


def run_vqa(args: argparse.Namespace) -> int:
    from ..experiments import sweep
    from ..experiments.proxy import easy_vqa, mini_llava
    from ..experiments.proxy.vqa import NUM_PATCHES, SETTINGS, TASK, default_task_folder, write_suite
    from ..experiments.proxy.vqa_report import write_report
    from ..tools.profiling import machine_info

    if args.settings == ["all"]:
        args.settings = list(SETTINGS)
    unknown = [name for name in args.settings if name not in SETTINGS]
    if unknown:
        raise ValueError(f"unknown settings {unknown}; allowed: {', '.join(SETTINGS)}")
    bad = [budget for budget in args.budgets if not 1 <= budget < NUM_PATCHES]
    if bad:
        raise ValueError(f"budgets must be in [1, {NUM_PATCHES - 1}] (the tower gives {NUM_PATCHES}), got {bad}")
    if not 1 <= args.limit <= easy_vqa.TASK_ROWS:
        raise ValueError(f"--limit must be in [1, {easy_vqa.TASK_ROWS}], got {args.limit}")
    include_path = Path(args.include_path) if args.include_path else default_task_folder()
    if not (include_path / TASK / f"{TASK}.yaml").is_file():
        raise FileNotFoundError(f"no {TASK} task under {include_path}; pass --include-path PATH/TO/eval/tasks")
    if args.threads is not None:
        set_threads(args.threads)
    if args.seeds:
        return run_vqa_seeds(args, include_path)
    output = Path(args.output)
    started = time.perf_counter()
    if args.checkpoint:
        checkpoint = Path(args.checkpoint)
        if not (checkpoint / "config.json").is_file():
            raise FileNotFoundError(f"--checkpoint {checkpoint} holds no saved model (config.json)")
    else:
        settings = mini_llava.TrainSettings(train_images=args.train_images, epochs=args.epochs, seed=args.seed)
        checkpoint = mini_llava.train_mini_llava(settings=settings, force=args.retrain)
    record_path = checkpoint / mini_llava.CHECKPOINT_FILE
    training = json.loads(record_path.read_text()) if record_path.exists() else {}
    print(f"mini-LLaVA checkpoint: {checkpoint}")
    if args.train_only:
        return 0
    suite_path = write_suite(output / "suite.yaml", args.settings, args.budgets, include_path, args.batch_size)
    outcome = sweep.run_suite(sweep.load_suite(suite_path), str(checkpoint), output, limit=args.limit)
    sweep.print_outcome(outcome)
    extra = {
        "checkpoint": str(checkpoint),
        "training": {key: value for key, value in training.items() if key != "loss_per_step"},
        "limit": args.limit,
        "machine": machine_info("cpu"),
        "wall_seconds_this_call": round(time.perf_counter() - started, 1),
        "command": " ".join(sys.argv),
    }
    paths = write_report(output, extra)
    print(paths["md"].read_text())
    print("wrote " + ", ".join(str(path) for path in paths.values()))
    return 1 if outcome["failed"] else 0


def set_threads(threads: int) -> None:
    """Torch threads here and, through ``OMP_NUM_THREADS``, in every lmms-eval child."""
    import os

    import torch

    if threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


def run_vqa_seeds(args: argparse.Namespace, include_path: Path) -> int:
    """``proxy vqa --seeds ...``: train (or reuse) one checkpoint per seed, run the grid on each, report."""
    from ..experiments.proxy import mini_llava
    from ..experiments.proxy.vqa import run_seeds
    from ..experiments.proxy.vqa_report import write_seed_report
    from ..tools.profiling import machine_info

    if args.checkpoint:
        raise ValueError("--checkpoint names one model; --seeds trains (or reuses) one per seed: pass one of them")
    started = time.perf_counter()
    train = mini_llava.TrainSettings(train_images=args.train_images, epochs=args.epochs)
    if args.train_only:
        for seed in args.seeds:
            settings = mini_llava.TrainSettings(train_images=args.train_images, epochs=args.epochs, seed=seed)
            print(f"seed {seed}: {mini_llava.train_mini_llava(settings=settings, force=args.retrain)}")
        return 0
    if args.retrain:
        raise ValueError("--retrain with --seeds would retrain every seed: retrain them one at a time with --seed")
    output = Path(args.output)
    outcome = run_seeds(
        args.seeds,
        args.settings,
        args.budgets,
        output,
        include_path=include_path,
        limit=args.limit,
        batch_size=args.batch_size,
        train=train,
    )
    print(f"{len(outcome['done'])} run(s) done, {len(outcome['skipped'])} skipped, {len(outcome['failed'])} failed")
    for key in outcome["failed"]:
        print(f"  failed: {key}", file=sys.stderr)
    extra = {
        "train": {"train_images": args.train_images, "epochs": args.epochs},
        "limit": args.limit,
        "machine": machine_info("cpu"),
        "wall_seconds_this_call": round(time.perf_counter() - started, 1),
        "command": " ".join(sys.argv),
    }
    paths = write_seed_report(output, args.seeds, extra)
    print(paths["md"].read_text())
    print("wrote " + ", ".join(str(path) for path in paths.values()))
    return 1 if outcome["failed"] else 0


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--vqa", default="proxy_results/vqa", help="folder of `proxy vqa --seeds` (default %(default)s)"
    )
    parser.add_argument(
        "--fidelity", default="proxy_results/fidelity", help="folder of `proxy fidelity --seeds` (default %(default)s)"
    )
    add_list_argument(parser, "--seeds", int, default=None, help="seeds to use (default: every seed folder of --vqa)")
    add_list_argument(
        parser,
        "--fidelity-seeds",
        int,
        default=None,
        help="seeds of the fidelity proxy's random setting (default: those of --seeds with a folder under --fidelity)",
    )
    parser.add_argument(
        "--vqa-score",
        choices=("accuracy", "shape+color acc"),
        default="accuracy",
        help="easy-VQA questions scored: all (default) or shape and colour only",
    )
    parser.add_argument(
        "--pool", choices=("plain", "size_weighted"), default="plain", help="fidelity probe pool (default plain)"
    )
    parser.add_argument("--candidate", default="pitome_mllm", help="the setting the rule tests (default %(default)s)")
    parser.add_argument(
        "--output", default="proxy_results/summary", help="folder of proxy_summary.* (default %(default)s)"
    )


def run_report(args: argparse.Namespace) -> int:
    from ..experiments.proxy import fidelity, vqa, vqa_report
    from ..experiments.proxy.report import write_combined
    from ..experiments.proxy.settings import REFERENCE_SETTING
    from ..tools.profiling import machine_info

    seeds = args.seeds or vqa_report.finished_seeds(Path(args.vqa))
    if not seeds:
        raise FileNotFoundError(f"no seed folder with finished runs under {args.vqa}: run `proxy vqa --seeds` first")
    fidelity_seeds = args.fidelity_seeds or [
        seed for seed in seeds if (fidelity.seed_folder(Path(args.fidelity), seed) / "fidelity.json").is_file()
    ]
    if not fidelity_seeds:
        raise FileNotFoundError(f"no fidelity seed folder under {args.fidelity}: run `proxy fidelity --seeds` first")
    tables = {
        "easy-VQA": vqa_report.seed_table(Path(args.vqa), seeds, args.vqa_score),
        "fidelity": fidelity.seed_table(Path(args.fidelity), fidelity_seeds, args.pool),
    }
    methods = {name: fields["method"] for name, fields in {**fidelity.SETTINGS, **vqa.SETTINGS}.items()}
    extra = {
        "vqa_seeds": seeds,
        "fidelity_seeds": fidelity_seeds,
        "vqa_score": args.vqa_score,
        "fidelity_pool": args.pool,
        "machine": machine_info("cpu"),
        "command": " ".join(sys.argv),
    }
    paths = write_combined(
        Path(args.output),
        tables,
        candidate=args.candidate,
        reference=REFERENCE_SETTING,
        rivals=["tome"],
        methods=methods,
        extra=extra,
    )
    print(paths["md"].read_text())
    print("wrote " + ", ".join(str(path) for path in paths.values()))
    return 0
