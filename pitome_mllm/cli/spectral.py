"""``pitome-mllm spectral``: spectral distance of merged vs original token graphs (paper §3.3; docs/spectral.md).

Model mode: for every image, the reference graph is built on the UNMERGED model's
features (default: the output of the vision layer the LLM reads, class token removed),
then each method's partition after every vision layer is scored against it. Methods
are compared at EQUAL token counts: each method gets its own keep ratio, solved so that
all reach the same number of visual tokens.

Synthetic mode (``--synthetic``): Gaussian clusters, no model (the check of docs/spectral.md).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..common.files import checked_output_folder
from ..config import check_keep_ratio
from ..geometry import VISUAL_TOKENS_NOTE
from ..runtime.terminal import add_list_argument
from .arguments import add_preset_argument, add_tiny_model_arguments, checked_output_stem

HELP = "spectral distance of PiToMe / ToMe merges to the unmerged token graph, at equal token counts"

REFERENCES = {
    "read": "unmerged model, output of the vision layer the LLM reads (class token removed)",
    "embeddings": "unmerged model, patch embeddings entering layer 0 (class token removed)",
    "same": "unmerged model, output of the same layer as the partition (class token removed)",
}
REFERENCE_SHORT = {
    "read": "unmerged features at the layer the LLM reads",
    "embeddings": "unmerged patch embeddings",
    "same": "unmerged features at the same layer",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_list_argument(parser, "--methods", default=["tome", "pitome"], help="e.g. tome pitome")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument(
        "--keep-ratio",
        type=float,
        default=None,
        help="keep ratio of the anchor method (pitome if listed, else the first); the others get the ratio "
        "that gives the same token count (default 0.9; synthetic mode: 0.85)",
    )
    add_list_argument(budget, "--budgets", int, default=None, help="visual tokens to the LLM, e.g. 54 128")
    add_list_argument(parser, "--images", default=["all"], help="'all' bundled images, or names / files")
    add_tiny_model_arguments(parser)
    add_preset_argument(parser)
    parser.add_argument(
        "--reference",
        choices=sorted(REFERENCES),
        default="read",
        help="features of the reference graph: " + "; ".join(f"{k}: {v}" for k, v in REFERENCES.items()),
    )
    parser.add_argument(
        "--random-control",
        action="store_true",
        help="also score random merges with the anchor method's per-layer token counts",
    )
    parser.add_argument("--per-node", action="store_true", help="report SD / N instead of SD")
    parser.add_argument("--exact", action="store_true", help="diagonalise the N x N lifted graph (slower)")
    parser.add_argument("--output", type=Path, default=Path("."), help="folder for spectral.json and spectral.png")
    parser.add_argument("--name", default="spectral", help="file stem of the outputs")
    synthetic = parser.add_argument_group("synthetic mode (no model)")
    synthetic.add_argument("--synthetic", action="store_true", help="Gaussian clusters instead of a model")
    add_list_argument(synthetic, "--noise", float, default=[0.25, 0.5, 1.0, 2.0], help="noise levels")
    synthetic.add_argument("--trials", type=int, default=5, help="draws per noise level")
    add_list_argument(synthetic, "--cluster-sizes", int, default=[120, 50, 20, 6, 3, 1], help="points per cluster")
    synthetic.add_argument("--dim", type=int, default=64, help="feature dimension")
    synthetic.add_argument("--steps", type=int, default=8, help="merge steps")
    synthetic.add_argument("--margin", type=float, default=None, help="fixed PiToMe margin (default 0.9 - 0.9 s/S)")
    synthetic.add_argument("--seed", type=int, default=0)


# ----------------------------------------------------------------- matching budgets
def keep_ratio_for_tokens(model, method: str, num_tokens: int, preset: str, tolerance: float = 1e-7) -> float:
    """The smallest keep ratio at which ``method`` gives exactly ``num_tokens`` visual tokens.

    The schedule's bisection (`pitome_mllm.geometry.keep_ratio_for_visual_tokens`) on the model's
    geometry: the counts a patch would plan, with nothing patched and nothing run.

    Raises:
        ValueError: no keep ratio gives exactly ``num_tokens``; the message names the
            nearest counts that are reachable.
    """
    from ..config import PiToMeConfig
    from ..geometry import TowerBudget, keep_ratio_for_visual_tokens
    from ..models import model_geometry

    geometry = model_geometry(model)

    def count(keep_ratio: float) -> int:
        config = PiToMeConfig(method=method, keep_ratio=keep_ratio, preset=preset)
        return TowerBudget(geometry, config).num_visual_tokens

    most = count(1.0)
    if not (1 <= num_tokens <= most):
        raise ValueError(f"budget {num_tokens} is out of range: {method} gives between 1 and {most} visual tokens")
    high = keep_ratio_for_visual_tokens(geometry, num_tokens, method, preset, tolerance)
    reached = count(high)
    if reached != num_tokens:
        low = high - tolerance  # the ratio just below, which the bisection found too small
        below = count(low) if low > 0.5 else None
        raise ValueError(
            f"{method} cannot give exactly {num_tokens} visual tokens ({preset} preset); nearest: "
            f"{below} and {reached}. Pick a budget both methods reach."
        )
    return high


def matched_keep_ratios(args, model) -> list[dict[str, float]]:
    """Per budget, the keep ratio of every method giving that budget."""
    from ..tools.viz import patched_tower

    methods = list(args.methods)
    if args.budgets is not None:
        return [
            {"tokens": budget, **{m: keep_ratio_for_tokens(model, m, budget, args.preset) for m in methods}}
            for budget in args.budgets
        ]
    # The anchor keeps the user's ratio exactly (another ratio with the same final count
    # could still change the per-layer counts); the others are solved to match its count.
    anchor = "pitome" if "pitome" in methods else methods[0]
    keep_ratio = 0.9 if args.keep_ratio is None else args.keep_ratio
    with patched_tower(model, method=anchor, keep_ratio=keep_ratio, preset=args.preset) as handle:
        budget = handle.num_visual_tokens
    ratios = {m: keep_ratio if m == anchor else keep_ratio_for_tokens(model, m, budget, args.preset) for m in methods}
    return [{"tokens": budget, **ratios}]


# ---------------------------------------------------------------------- model mode
@dataclass
class MethodCurves:
    """One method at one budget: SD after every layer, per image."""

    keep_ratio: float | None  # None for the random control
    tokens_after_layer: list[int] = field(default_factory=list)  # visual tokens (class token excluded)
    per_image: dict[str, list[float]] = field(default_factory=dict)

    def final(self) -> list[float]:
        return [curve[-1] for curve in self.per_image.values()]


def random_control_maps(record, generator):
    """Token maps ``[P]`` after every layer of random merges with ``record``'s per-layer counts."""
    import torch

    from ..tools.spectral import SimStep, simulate_merges

    removed = {idx: step.num_removed for idx, step in record.merges}
    num_patches = record.num_tokens - 1
    steps = [SimStep("random", removed.get(layer_idx, 0)) for layer_idx in range(record.last_layer + 1)]
    maps = simulate_merges(torch.zeros(1, num_patches, 1), steps, generator=generator)
    return [token_map[0] for token_map in maps]


class ReferenceGraphs:
    """The reference `SpectralReference` of one image for every layer, built on first use.

    Args:
        unmerged: the unmerged tower's hidden states (index 0: embeddings).
        choice: a key of `REFERENCES`.
    """

    def __init__(self, unmerged, choice: str) -> None:
        self.unmerged = unmerged
        self.choice = choice
        self._graphs = {}

    def for_layer(self, layer_idx: int, last_layer: int):
        from ..tools.spectral import SpectralReference

        index = {"read": last_layer + 1, "embeddings": 0, "same": layer_idx + 1}[self.choice]
        if index not in self._graphs:
            self._graphs[index] = SpectralReference(self.unmerged[index][0, 1:].cpu())
        return self._graphs[index]

    def score(self, maps, last_layer: int, per_node: bool, exact: bool) -> list[float]:
        """SD of the patch token map ``[P]`` after every layer ``0..last_layer``."""
        return [
            self.for_layer(layer_idx, last_layer).distance(token_map, per_node, exact)
            for layer_idx, token_map in enumerate(maps)
        ]


def run_model(args) -> dict:
    import torch
    from rich.progress import track

    from ..assets import list_images
    from ..tools.viz import pixel_values_for, trace_merges, vision_hidden_states
    from .visualize import load_input_image, load_model

    loaded = load_model(args.model, args.device)
    image_names = list_images() if args.images == ["all"] else args.images
    budgets = matched_keep_ratios(args, loaded.model)
    methods = list(args.methods)
    curves: list[dict[str, MethodCurves]] = [{} for _ in budgets]
    generator = torch.Generator().manual_seed(0)

    for image_name in track(image_names, description="images"):
        pixel_values = pixel_values_for(loaded.processor, load_input_image(image_name))
        references = ReferenceGraphs(vision_hidden_states(loaded.model, pixel_values), args.reference)
        for budget, budget_curves in zip(budgets, curves, strict=True):
            anchor = None
            for method in methods:
                record = trace_merges(
                    loaded.model, pixel_values, method=method, keep_ratio=budget[method], preset=args.preset
                )
                if record.num_visual_tokens != budget["tokens"]:
                    raise RuntimeError(f"{method} gave {record.num_visual_tokens} tokens, expected {budget['tokens']}")
                if anchor is None or method == "pitome":
                    anchor = record
                counts = [record.tokens_after(i) - 1 for i in range(record.last_layer + 1)]
                entry = budget_curves.setdefault(method, MethodCurves(record.keep_ratio, counts))
                maps = [token_map[0, 1:] for token_map in record.token_maps()]
                entry.per_image[image_name] = references.score(maps, record.last_layer, args.per_node, args.exact)
            if args.random_control:
                counts = budget_curves[anchor.method].tokens_after_layer
                entry = budget_curves.setdefault("random", MethodCurves(None, counts))
                maps = random_control_maps(anchor, generator)
                entry.per_image[image_name] = references.score(maps, anchor.last_layer, args.per_node, args.exact)

    return {
        "mode": "model",
        "counts": VISUAL_TOKENS_NOTE,
        "model": args.model,
        "random_weights": loaded.random_weights,
        "preset": args.preset,
        "images": image_names,
        "reference": args.reference,
        "reference_features": REFERENCES[args.reference],
        "per_node": args.per_node,
        "metric": "SD / N" if args.per_node else "SD = sum |lambda - lambda_lifted|",
        "budgets": [
            {
                "tokens": budget["tokens"],
                "methods": {
                    label: {
                        "keep_ratio": entry.keep_ratio,
                        "tokens_after_layer": entry.tokens_after_layer,
                        "per_image": entry.per_image,
                    }
                    for label, entry in budget_curves.items()
                },
            }
            for budget, budget_curves in zip(budgets, curves, strict=True)
        ],
    }


# ------------------------------------------------------------------ synthetic mode
def run_synthetic(args) -> dict:
    from ..tools.spectral import synthetic_study

    keep_ratio = 0.85 if args.keep_ratio is None else args.keep_ratio
    methods = list(args.methods) + (["random"] if args.random_control and "random" not in args.methods else [])
    levels = []
    for noise in args.noise:
        results = synthetic_study(
            methods,
            noise,
            cluster_sizes=args.cluster_sizes,
            dim=args.dim,
            keep_ratio=keep_ratio,
            num_steps=args.steps,
            trials=args.trials,
            margin=args.margin,
            per_node=args.per_node,
            seed=args.seed,
        )
        levels.append(
            {
                "noise": noise,
                "methods": {
                    r.method: {
                        "tokens_after_step": r.tokens_after_step,
                        "per_trial": r.distances,
                        "cross_cluster_fraction": r.cross_cluster_fraction,
                    }
                    for r in results
                },
            }
        )
    return {
        "mode": "synthetic",
        "cluster_sizes": list(args.cluster_sizes),
        "dim": args.dim,
        "keep_ratio": keep_ratio,
        "steps": args.steps,
        "trials": args.trials,
        "margin": args.margin if args.margin is not None else "0.9 - 0.9 * step / steps",
        "features": "size-weighted merged features are the next step's metric; tokens in random order",
        "reference_features": "the original (unmerged) synthetic tokens",
        "per_node": args.per_node,
        "metric": "SD / N" if args.per_node else "SD = sum |lambda - lambda_lifted|",
        "levels": levels,
    }


# ------------------------------------------------------------------------ reports
def _paired_rows(per_a: dict[str, float], per_b: dict[str, float]) -> tuple[list[float], int]:
    """Differences ``a - b`` over the shared keys, and how many are negative (``a`` lower)."""
    differences = [per_a[key] - per_b[key] for key in per_a if key in per_b]
    return differences, sum(d < 0 for d in differences)


def summarize_report(report: dict) -> list[dict]:
    """Rows of the summary table: one per (budget or noise level, method), plus a paired row."""
    from ..tools.spectral import summarize

    rows = []
    groups = report["budgets"] if report["mode"] == "model" else report["levels"]
    for group in groups:
        if report["mode"] == "model":
            setting = f"{group['tokens']} visual tokens"
            finals = {m: {k: v[-1] for k, v in d["per_image"].items()} for m, d in group["methods"].items()}
            ratios = {m: d["keep_ratio"] for m, d in group["methods"].items()}
        else:
            setting = f"noise {group['noise']:g}"
            finals = {m: {str(i): t[-1] for i, t in enumerate(d["per_trial"])} for m, d in group["methods"].items()}
            ratios = {m: report["keep_ratio"] for m in group["methods"]}
        for method, values in finals.items():
            row = {"setting": setting, "method": method, "keep_ratio": ratios[method], **summarize(values.values())}
            if report["mode"] == "synthetic":
                fractions = group["methods"][method]["cross_cluster_fraction"]
                row["mixed_tokens"] = sum(fractions) / len(fractions)
            rows.append(row)
        if "pitome" in finals and "tome" in finals:
            differences, pitome_lower = _paired_rows(finals["pitome"], finals["tome"])
            rows.append(
                {
                    "setting": setting,
                    "method": "pitome - tome",
                    "keep_ratio": None,
                    **summarize(differences),
                    "pitome_lower": pitome_lower,
                }
            )
    return rows


def print_table(report: dict, rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    unit = "final SD / N" if report["per_node"] else "final SD"
    where = "at the layer the LLM reads" if report["mode"] == "model" else "after the last step"
    count = "images" if report["mode"] == "model" else "trials"
    table = Table(
        title=f"spectral distance {where}, over {count}",
        caption=f"reference graph: {report['reference_features']}; {report['metric']}",
    )
    columns = ["setting", "method", "keep ratio", f"{unit} mean", "std", "min", "max", "pitome lower"]
    if report["mode"] == "synthetic":
        columns.append("tokens mixing clusters")
    for column in columns:
        table.add_column(column, justify="left" if column in ("setting", "method") else "right")
    for row in rows:
        ratio = "" if row["keep_ratio"] is None else f"{row['keep_ratio']:.5f}"
        lower = f"{row['pitome_lower']}/{row['n']}" if "pitome_lower" in row else ""
        table.add_row(
            row["setting"],
            row["method"],
            ratio,
            f"{row['mean']:.4f}",
            f"{row['std']:.4f}",
            f"{row['min']:.4f}",
            f"{row['max']:.4f}",
            lower,
            *([f"{row['mixed_tokens']:.1%}" if "mixed_tokens" in row else ""] if report["mode"] == "synthetic" else []),
        )
    Console().print(table)


def plot_report(report: dict, path: Path) -> Path:
    from ..tools.spectral import summarize
    from ..tools.viz import RANDOM_WEIGHTS_NOTE, Curve, CurvePanel, plot_curves

    ylabel = "SD / N" if report["per_node"] else "spectral distance SD"
    panels = []
    if report["mode"] == "model":
        for group in report["budgets"]:
            curves = []
            for method, data in group["methods"].items():
                per_layer = list(zip(*data["per_image"].values(), strict=True))
                stats = [summarize(values) for values in per_layer]
                curves.append(
                    Curve(
                        method,
                        list(range(len(stats))),
                        [s["mean"] for s in stats],
                        [s["min"] for s in stats],
                        [s["max"] for s in stats],
                    )
                )
            panels.append(CurvePanel(f"{group['tokens']} visual tokens to the LLM", curves, "vision layer", ylabel))
        title = f"Spectral distance vs layer: model '{report['model']}', {len(report['images'])} images"
        caption = (
            f"mean, band = min-max over images; reference graph: {REFERENCE_SHORT[report['reference']]}; "
            f"{VISUAL_TOKENS_NOTE}"
        )
        if report["random_weights"]:
            caption += "\n" + RANDOM_WEIGHTS_NOTE
    else:
        for group in report["levels"]:
            curves = []
            for method, data in group["methods"].items():
                stats = [summarize(values) for values in zip(*data["per_trial"], strict=True)]
                curves.append(
                    Curve(
                        method,
                        data["tokens_after_step"],
                        [s["mean"] for s in stats],
                        [s["mean"] - s["std"] for s in stats],
                        [s["mean"] + s["std"] for s in stats],
                    )
                )
            panels.append(CurvePanel(f"noise {group['noise']:g}", curves, "tokens left", ylabel, invert_x=True))
        sizes = ",".join(str(s) for s in report["cluster_sizes"])
        title = f"Spectral distance on Gaussian clusters (sizes {sizes}, dim {report['dim']})"
        caption = (
            f"mean, band = +-1 std over {report['trials']} trials per noise level; "
            f"keep ratio {report['keep_ratio']} per step, equal token counts for every method"
        )
    return plot_curves(panels, path, title=title, caption=caption)


def check_synthetic_arguments(args: argparse.Namespace) -> None:
    """The synthetic study's sizes, or a ValueError naming the flag (each must leave something to measure)."""
    for flag, value in (("--trials", args.trials), ("--dim", args.dim), ("--steps", args.steps)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if not args.cluster_sizes or min(args.cluster_sizes) < 1:
        raise ValueError(f"--cluster-sizes must be whole numbers >= 1, got {args.cluster_sizes}")
    if not args.noise or any(not math.isfinite(noise) or noise < 0 for noise in args.noise):
        raise ValueError(f"--noise must be finite numbers >= 0, got {args.noise}")
    if args.margin is not None and not -2 <= args.margin <= 2:
        raise ValueError(f"--margin must be in [-2, 2] (compared with cosine similarities), got {args.margin}")
    if args.keep_ratio is not None:
        try:
            check_keep_ratio(args.keep_ratio)
        except ValueError as error:
            raise ValueError(f"--keep-ratio: {error}") from None


def run(args: argparse.Namespace) -> int:
    known = {"pitome", "tome"} | ({"random"} if args.synthetic else set())
    unknown = [m for m in args.methods if m not in known]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; allowed: {sorted(known)}")
    if args.synthetic:
        check_synthetic_arguments(args)
    # Before the work: a bad output path must not cost it.
    args.output = checked_output_folder("--output", args.output)
    checked_output_stem("--name", args.name, "--output", args.output, (".json", ".png"))
    report = run_synthetic(args) if args.synthetic else run_model(args)
    report["summary"] = summarize_report(report)
    print_table(report, report["summary"])
    args.output.mkdir(parents=True, exist_ok=True)
    json_path = args.output / f"{args.name}.json"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    png_path = plot_report(report, args.output / f"{args.name}.png")
    print(f"wrote {json_path} and {png_path}")
    return 0
