"""``pitome-mllm schedule``: per-layer token counts of a config, without any model."""

from __future__ import annotations

import argparse

from ..config import METHODS, PiToMeConfig
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


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    # The settings the API would refuse are refused here too, with its message, before anything prints.
    for keep_ratio in args.keep_ratio:
        PiToMeConfig.from_dict({"method": args.method, "preset": args.preset, "keep_ratio": keep_ratio})
    num_patches = (args.image_size // args.patch_size) ** 2
    num_tokens = num_patches + 1  # CLIP's class token rides along in the tower
    last_layer = args.feature_layer % (args.layers + 1) - 1
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
