"""``pitome-mllm visualize``: merge maps of one image, per method and vision layer, as a PNG."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from ..common.files import checked_output_folder
from ..geometry import VISUAL_TOKENS_NOTE
from ..runtime.terminal import add_list_argument
from .arguments import add_preset_argument, add_tiny_model_arguments, checked_output_stem

HELP = "draw which image patches share a token after chosen vision layers (merge maps) and the energy map"

TINY_MODELS = ("tiny", "tiny-test")
DEFAULT_KEEP_RATIO = 0.9


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..assets import list_images

    parser.add_argument(
        "--image", default="chelsea", help=f"a bundled image ({', '.join(list_images())}) or an image file"
    )
    add_tiny_model_arguments(parser)
    add_list_argument(parser, "--methods", default=["tome", "pitome"], help="e.g. tome pitome")
    parser.add_argument(
        "--keep-ratio", type=float, default=None, help="keep ratio of every merging layer (default 0.9)"
    )
    parser.add_argument(
        "--target-tokens",
        type=int,
        default=None,
        help="Qwen-VL: tokens kept per image (alone, or with --keep-ratio: the smaller count)",
    )
    add_preset_argument(parser)
    add_list_argument(
        parser,
        "--layers",
        int,
        default=None,
        help="vision layers to show, e.g. 0 6 12 22 (the default on a 24-layer tower; same depth fractions otherwise)",
    )
    parser.add_argument("--colour", choices=("mean", "palette"), default="mean", help="group fill colour")
    parser.add_argument("--no-energy", action="store_true", help="leave out the energy-map row")
    parser.add_argument("--panel-px", type=int, default=240, help="size of one panel in pixels")
    parser.add_argument("--output", type=Path, default=Path("."), help="folder for merge_map.png and merge_map.json")
    parser.add_argument("--name", default="merge_map", help="file stem of the outputs")


@dataclass
class LoadedModel:
    model: object
    processor: object
    name: str
    random_weights: bool


def load_model(name: str, device: str | None = None) -> LoadedModel:
    """The tiny offline models by name, or a local checkpoint folder."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if name in TINY_MODELS:
        from ..zoo.tiny import DEMO_SPEC, TEST_SPEC, build_tiny_llava

        model, processor = build_tiny_llava(DEMO_SPEC if name == "tiny" else TEST_SPEC)
        return LoadedModel(model.to(device), processor, f"{name} LLaVA (random weights)", True)
    path = Path(name)
    if not path.exists():
        raise FileNotFoundError(f"--model {name!r} is neither one of {TINY_MODELS} nor an existing folder")
    from ..models.qwen_tools import is_qwen_vl_checkpoint

    if is_qwen_vl_checkpoint(path):
        from ..runtime.loading import load_qwen_vl

        model, processor = load_qwen_vl(path, device=device)
        return LoadedModel(model, processor, path.name, False)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(path, dtype="auto").to(device).eval()
    return LoadedModel(model, AutoProcessor.from_pretrained(path), path.name, False)


def load_input_image(spec: str):
    """A bundled image by name, or an image file (a file PIL cannot read is a ValueError naming ``--image``)."""
    from ..runtime.loading import load_image_arg

    try:
        return load_image_arg(spec)
    except (ValueError, FileNotFoundError) as error:
        raise type(error)(f"--image: {error}") from None


def default_layers(last_layer: int) -> list[int]:
    """0, 6, 12, 22 for a tower read at layer 22; the same fractions of depth otherwise."""
    return sorted({0, round(last_layer * 3 / 11), round(last_layer * 6 / 11), last_layer})


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from ..tools.viz import RANDOM_WEIGHTS_NOTE, last_vision_layer, visualize

    # Before the model is built: a bad output path must not cost the work.
    args.output = checked_output_folder("--output", args.output)
    checked_output_stem("--name", args.name, "--output", args.output, (".png", ".json"))
    image = load_input_image(args.image)
    loaded = load_model(args.model, args.device)
    from ..models.qwen_tools import is_qwen_vl

    if is_qwen_vl(loaded.model):
        return run_merged_grid(args, loaded, image)
    if args.target_tokens is not None:
        raise ValueError(
            "--target-tokens applies to Qwen-VL models (merge maps of the merged grid); "
            "the merge maps of a LLaVA tower follow --keep-ratio"
        )
    layers = args.layers
    if layers is None:
        layers = default_layers(last_vision_layer(loaded.model))
    output = args.output / f"{args.name}.png"
    image_name = Path(args.image).stem
    result = visualize(
        loaded.model,
        loaded.processor,
        image,
        output,
        methods=args.methods,
        keep_ratio=DEFAULT_KEEP_RATIO if args.keep_ratio is None else args.keep_ratio,
        layers=layers,
        preset=args.preset,
        colour=args.colour,
        energy=not args.no_energy,
        title=f"Merge groups: {loaded.name}, image '{image_name}', {args.preset} preset ({VISUAL_TOKENS_NOTE})",
        caption=RANDOM_WEIGHTS_NOTE if loaded.random_weights else "",
        panel_px=args.panel_px,
    )
    summary = {
        "model": args.model,
        "image": args.image,
        "preset": args.preset,
        "random_weights": loaded.random_weights,
        "counts": VISUAL_TOKENS_NOTE,
        **result.to_dict(),
    }
    summary_path = args.output / f"{args.name}.json"
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")

    table = Table(title=f"visual tokens after each shown layer ({image_name}; {VISUAL_TOKENS_NOTE})")
    table.add_column("method")
    table.add_column("keep ratio", justify="right")
    for layer_idx in result.layers:
        table.add_column(f"layer {layer_idx}", justify="right")
    table.add_column("to the LLM", justify="right")
    for method in args.methods:
        counts = [str(count) for count in result.tokens_after_layer[method]]
        table.add_row(method, f"{result.keep_ratio[method]:.4g}", *counts, str(result.num_visual_tokens[method]))
    console = Console()
    console.print(table)
    # Plain print: a path must not be wrapped at the terminal's width.
    print(f"wrote {output}")
    print(f"wrote {summary_path} (the counts of the table)")
    return 0


def run_merged_grid(args: argparse.Namespace, loaded: LoadedModel, image) -> int:
    """Merge maps of a Qwen-VL model: which merged-grid cells each kept token holds, one row per method."""
    from rich.console import Console
    from rich.table import Table

    from ..tools.viz import RANDOM_WEIGHTS_NOTE, visualize_merged_grid

    if args.layers is not None:
        raise ValueError(
            "--layers does not apply to a Qwen-VL model: it merges each image's tokens after the patch merger, "
            "not inside vision layers"
        )
    budget = {}
    if args.keep_ratio is not None or args.target_tokens is None:
        budget["keep_ratio"] = DEFAULT_KEEP_RATIO if args.keep_ratio is None else args.keep_ratio
    if args.target_tokens is not None:
        budget["target_tokens"] = args.target_tokens
    output = args.output / f"{args.name}.png"
    image_name = Path(args.image).stem
    result = visualize_merged_grid(
        loaded.model,
        loaded.processor,
        image,
        output,
        methods=args.methods,
        budget=budget,
        colour=args.colour,
        title=f"Merged-grid tokens: {loaded.name}, image '{image_name}'",
        caption=RANDOM_WEIGHTS_NOTE if loaded.random_weights else "",
        panel_px=args.panel_px,
    )
    summary = {"model": args.model, "image": args.image, "random_weights": loaded.random_weights, **result.to_dict()}
    (args.output / f"{args.name}.json").write_text(json.dumps(summary, indent=2) + "\n")

    rows, cols = result.grid
    table = Table(title=f"tokens of '{image_name}' after the patch merger ({rows}x{cols} cells)")
    for column in ("method", "setting", "native", "to the LLM"):
        table.add_column(column, justify="right" if column in ("native", "to the LLM") else "left")
    setting = ", ".join(f"{name}={value}" for name, value in budget.items())
    for method in args.methods:
        table.add_row(method, setting, str(result.native_tokens), str(result.kept_tokens[method]))
    console = Console()
    console.print(table)
    console.print(f"wrote {output}")
    return 0
