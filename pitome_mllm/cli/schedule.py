"""``pitome-mllm schedule``: token counts of a config, without any model.

LLaVA-style towers (a fixed square grid): the per-layer merge plan and the visual tokens that reach the LLM.
Qwen-VL (``--arch qwen2.5-vl-7b``, or the flag set ``--min-pixels`` / ``--max-pixels`` / ``--patch-size`` /
``--merge-size``): the grid follows each image, so the table has one row per original image size with its
native tokens (``smart_resize`` -> patch grid -> ``/ merge_size**2``) and the tokens kept under each setting
(`pitome_mllm.geometry.MergedGridBudget`: ``ceil(r * n)`` for a keep ratio, at most K for a target, all of an
image's tokens where it has fewer than K).
"""

from __future__ import annotations

import argparse

from ..config import METHODS, PiToMeConfig, check_keep_ratio
from ..geometry import MergedGridBudget, SmartResize
from ..runtime.terminal import add_list_argument
from ..schedule import plan_layers
from ..zoo.architecture_specs import ARCHITECTURES, REAL_QWEN_PIXELS, ArchSpec, QwenVLArchSpec
from .arguments import add_preset_argument

HELP = "print the per-layer merge plan and the visual tokens that reach the LLM (no model needed)"

DEFAULT_KEEP_RATIOS = [0.9]
# Original image sizes shown for a Qwen-VL tower when --image-sizes is not given.
DEFAULT_QWEN_IMAGE_SIZES = [(448, 448), (640, 480), (1280, 720), (1920, 1080)]


def image_size(text: str) -> tuple[int, int]:
    """``"HxW"`` (or ``"S"`` for a square) -> ``(height, width)`` in pixels."""
    sides = text.lower().split("x")
    if len(sides) == 1:
        sides = sides * 2
    if len(sides) != 2 or not all(side.isdigit() and int(side) > 0 for side in sides):
        raise ValueError(f"an image size is HEIGHTxWIDTH in pixels (e.g. 448x448), got {text!r}")
    return int(sides[0]), int(sides[1])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--arch",
        choices=list(ARCHITECTURES),
        help="take the tower's shape from a named architecture (as `pitome-mllm profile --arch`); a Qwen-VL one "
        "prints per-image counts with the released checkpoint's pixel limits",
    )
    add_list_argument(parser, "--keep-ratio", float, default=None, help="one or more keep ratios (default 0.9)")
    add_list_argument(
        parser, "--target-tokens", int, default=[], help="Qwen-VL: one or more per-image budgets K (target_tokens)"
    )
    add_preset_argument(parser)
    parser.add_argument(
        "--method", choices=METHODS, default="pitome", help="merging in the tower: pitome (default), tome or none"
    )
    parser.add_argument("--image-size", type=int, default=None, help="LLaVA-style tower input side (default 336)")
    parser.add_argument("--patch-size", type=int, default=None, help="patch side in pixels (default 14)")
    parser.add_argument("--layers", type=int, default=None, help="vision encoder depth (default 24)")
    parser.add_argument("--feature-layer", type=int, default=-2, help="hidden state the LLM reads (LLaVA: -2)")
    parser.add_argument("--per-layer", action="store_true", help="show every layer's step")
    add_list_argument(
        parser,
        "--image-sizes",
        image_size,
        default=None,
        help="Qwen-VL: original image sizes HEIGHTxWIDTH (default 448x448 640x480 1280x720 1920x1080)",
    )
    parser.add_argument("--min-pixels", type=int, default=None, help="Qwen-VL: smallest image area after resizing")
    parser.add_argument("--max-pixels", type=int, default=None, help="Qwen-VL: largest image area after resizing")
    parser.add_argument("--merge-size", type=int, default=None, help="Qwen-VL: patch merger block side (default 2)")


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
    spec = ARCHITECTURES[args.arch] if args.arch else None
    if isinstance(spec, QwenVLArchSpec) or args.min_pixels is not None or args.max_pixels is not None:
        return run_merged_grid(args, spec)
    if args.target_tokens or args.image_sizes or args.merge_size is not None:
        raise ValueError(
            "--target-tokens, --image-sizes and --merge-size describe a Qwen-VL tower: pass a Qwen-VL --arch "
            f"({', '.join(name for name, s in ARCHITECTURES.items() if isinstance(s, QwenVLArchSpec))}) or "
            "--min-pixels and --max-pixels"
        )
    return run_layer_plan(args, spec)


def run_layer_plan(args: argparse.Namespace, spec: ArchSpec | None) -> int:
    """The LLaVA-style table: one row per keep ratio, optionally every layer's step."""
    from rich.console import Console
    from rich.table import Table

    # Defaults filled in before the checks, so an explicit 0 is refused rather than replaced.
    if args.image_size is None:
        args.image_size = spec.vision.image_size if spec else 336
    if args.patch_size is None:
        args.patch_size = spec.vision.patch_size if spec else 14
    if args.layers is None:
        args.layers = spec.vision.num_layers if spec else 24
    layers = args.layers
    keep_ratios = args.keep_ratio or DEFAULT_KEEP_RATIOS
    num_tokens, last_layer = checked_geometry(args)
    num_patches = num_tokens - 1  # CLIP's class token rides along in the tower
    for keep_ratio in keep_ratios:
        try:
            check_keep_ratio(keep_ratio)
        except ValueError as error:
            raise ValueError(f"--keep-ratio: {error}") from None
        # The settings the API would refuse are refused here too, with its message, before anything prints.
        PiToMeConfig.from_dict({"method": args.method, "preset": args.preset, "keep_ratio": keep_ratio})
    console = Console()
    summary = Table(
        title=f"{args.method} / {args.preset}: {num_patches} patches + class token in, {layers} layers, "
        f"reading layer {last_layer}",
        caption="visual tokens: class token excluded (LLaVA drops it before the projector)",
    )
    summary.add_column("keep ratio", justify="right")
    summary.add_column("merging layers", justify="right")
    summary.add_column("visual tokens to the LLM", justify="right")
    for keep_ratio in keep_ratios:
        steps = plan_layers(
            num_tokens, layers, keep_ratio, method=args.method, preset=args.preset, last_layer=last_layer
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


def merged_grid_settings(keep_ratios: list[float], target_tokens: list[int]) -> list[tuple[str, dict]]:
    """``(column label, MergedGridBudget budget keywords)`` of every setting, each checked as `PiToMeConfig` does.

    Raises:
        ValueError: a keep ratio outside (0.5, 1.0] or a target below 1 (the message names it).
    """
    settings = []
    for keep_ratio in keep_ratios:
        PiToMeConfig(keep_ratio=keep_ratio)
        settings.append((f"r={keep_ratio:g}", {"keep_ratio": keep_ratio}))
    for target in target_tokens:
        PiToMeConfig(target_tokens=target)
        settings.append((f"K={target}", {"target_tokens": target}))
    return settings


def qwen_resize(args: argparse.Namespace, spec: QwenVLArchSpec | None) -> tuple[SmartResize, int, int]:
    """``(resize rule, patch size, merge size)`` from ``--arch`` and the Qwen-VL flags (flags win)."""
    patch_size = args.patch_size or (spec.vision.patch_size if spec else 14)
    merge_size = args.merge_size or (spec.vision.spatial_merge_size if spec else 2)
    default_min, default_max = REAL_QWEN_PIXELS[spec.family] if spec else (None, None)
    min_pixels = args.min_pixels if args.min_pixels is not None else default_min
    max_pixels = args.max_pixels if args.max_pixels is not None else default_max
    if min_pixels is None or max_pixels is None:
        raise ValueError("a Qwen-VL tower without --arch needs both --min-pixels and --max-pixels")
    for name, value in (("--patch-size", patch_size), ("--merge-size", merge_size), ("--min-pixels", min_pixels)):
        if value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value}")
    if max_pixels < min_pixels:
        raise ValueError(f"--max-pixels {max_pixels} is below --min-pixels {min_pixels}")
    return SmartResize(patch_size * merge_size, min_pixels, max_pixels), patch_size, merge_size


def run_merged_grid(args: argparse.Namespace, spec: QwenVLArchSpec | None) -> int:
    """The Qwen-VL table: per original image size, the native tokens and the tokens kept under each setting."""
    from rich.console import Console
    from rich.table import Table

    resize, patch_size, merge_size = qwen_resize(args, spec)
    keep_ratios = (
        args.keep_ratio if args.keep_ratio is not None else ([] if args.target_tokens else DEFAULT_KEEP_RATIOS)
    )
    settings = merged_grid_settings(keep_ratios, args.target_tokens)
    budgets = [MergedGridBudget(resize, patch_size, merge_size, **budget) for _, budget in settings]
    source = spec.name if spec else "Qwen-VL flags"
    table = Table(
        title=f"{source}: {patch_size} px patches, {merge_size}x{merge_size} merger, pixels in "
        f"[{resize.min_pixels}, {resize.max_pixels}]; tokens per image after the merger"
    )
    for column in ("image", "resized", "patch grid", "native"):
        table.add_column(column, justify="right")
    for label, _ in settings:
        table.add_column(label, justify="right")
    native_budget = MergedGridBudget(resize, patch_size, merge_size)
    for height, width in args.image_sizes or DEFAULT_QWEN_IMAGE_SIZES:
        resized = resize(height, width)
        grid = native_budget.grid_for_image(height, width)
        native = native_budget.native_tokens(grid)
        kept = [str(budget.kept_tokens(native)) for budget in budgets]
        table.add_row(f"{height}x{width}", f"{resized[0]}x{resized[1]}", f"{grid.rows}x{grid.cols}", str(native), *kept)
    Console().print(table)
    return 0
