"""``pitome-mllm schedule``: per-layer token counts of a config, without any model."""

from __future__ import annotations

import argparse

from ..config import METHODS, PiToMeConfig, check_keep_ratio
from ..runtime.terminal import add_list_argument
from ..schedule import plan_layers
from .arguments import add_preset_argument

HELP = "print the per-layer merge plan and the visual tokens that reach the LLM (no model needed)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_list_argument(parser, "--keep-ratio", float, default=[0.9], help="one or more keep ratios")
    add_preset_argument(parser)
    parser.add_argument(
        "--method", choices=METHODS, default="pitome", help="merging in the tower: pitome (default), tome or none"
    )
    parser.add_argument("--image-size", type=int, default=336)
    parser.add_argument("--patch-size", type=int, default=14)
    parser.add_argument("--layers", type=int, default=24, help="vision encoder depth")
    parser.add_argument("--feature-layer", type=int, default=-2, help="hidden state the LLM reads (LLaVA: -2)")
    parser.add_argument("--per-layer", action="store_true", help="show every layer's step")


def checked_geometry(args: argparse.Namespace) -> tuple[int, int]:
    """``(tokens entering the tower, last layer read)`` of the flags, or a ValueError naming the flag."""
    for flag, value in (
        ("--image-size", args.image_size),
        ("--patch-size", args.patch_size),
        ("--layers", args.layers),
    ):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if args.patch_size > args.image_size:
        raise ValueError(
            f"--patch-size {args.patch_size} is larger than --image-size {args.image_size}: the image holds no patch"
        )
    # hidden_states holds the embeddings and then one entry per layer; a layer's output is entries 1..L.
    if not (1 <= args.feature_layer <= args.layers or -args.layers <= args.feature_layer <= -1):
        raise ValueError(
            f"--feature-layer must name a layer's output of the {args.layers}-layer tower: in [1, {args.layers}] "
            f"or [-{args.layers}, -1] (a hidden-states index), got {args.feature_layer}"
        )
    num_tokens = (args.image_size // args.patch_size) ** 2 + 1
    last_layer = args.feature_layer % (args.layers + 1) - 1
    return num_tokens, last_layer


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    num_tokens, last_layer = checked_geometry(args)
    num_patches = num_tokens - 1  # CLIP's class token rides along in the tower
    for keep_ratio in args.keep_ratio:
        try:
            check_keep_ratio(keep_ratio)
        except ValueError as error:
            raise ValueError(f"--keep-ratio: {error}") from None
        # The settings the API would refuse are refused here too, with its message, before anything prints.
        PiToMeConfig.from_dict({"method": args.method, "preset": args.preset, "keep_ratio": keep_ratio})
    console = Console()
    summary = Table(
        title=f"{args.method} / {args.preset}: {num_patches} patches + class token in, {args.layers} layers, "
        f"reading layer {last_layer}",
        caption="visual tokens: class token excluded (LLaVA drops it before the projector)",
    )
    summary.add_column("keep ratio", justify="right")
    summary.add_column("merging layers", justify="right")
    summary.add_column("visual tokens to the LLM", justify="right")
    for keep_ratio in args.keep_ratio:
        steps = plan_layers(
            num_tokens, args.layers, keep_ratio, method=args.method, preset=args.preset, last_layer=last_layer
        )
        merging = sum(step.method != "none" for step in steps)
        summary.add_row(f"{keep_ratio:g}", str(merging), str(steps[-1].tokens_out - 1))
        if args.per_layer:
            table = Table(title=f"keep_ratio={keep_ratio:g}", caption="tower tokens: class token included")
            for column in ("layer", "method", "r", "margin", "tower tokens in", "tower tokens out"):
                table.add_column(column, justify="right")
            for step in steps:
                table.add_row(
                    str(step.layer_idx),
                    step.method,
                    str(step.r),
                    f"{step.margin:.4f}",
                    str(step.tokens_in),
                    str(step.tokens_out),
                )
            console.print(table)
    console.print(summary)
    return 0
