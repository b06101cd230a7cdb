"""``pitome-mllm demo``: what merging buys, on a model built offline in a second.

Builds the tiny random LLaVA with CLIP ViT-L/14-336 geometry (577 tokens in, 24 layers,
576 visual tokens unmerged, exactly as LLaVA-1.5) and asks one question about one image
unpatched and patched at a few settings. It prints, per setting, the visual tokens the
language model receives and the time spent in the vision stage, to the first token and
in total, then the per-layer token trajectory of one PiToMe run and what its last merge
protected. Widths are tiny and weights random, so the answers are gibberish by design:
the point is token counts and the cost that follows from them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..config import PRESETS
from ..geometry import VISUAL_TOKENS_NOTE
from ..runtime.terminal import add_list_argument, add_threads_argument, plural

HELP = "compare unpatched vs. PiToMe / ToMe on an offline tiny LLaVA (no download): visual tokens and latency"

DEMO_METHODS = ("pitome", "tome")
DEFAULT_KEEP_RATIOS = (0.9, 0.95)
DEFAULT_BUDGETS = (64, 128, 192)
DEFAULT_PROMPT = "What is in the image?"


@dataclass(frozen=True)
class Setting:
    """One row of the demo: a label and the ``patch()`` keywords (None: unpatched)."""

    label: str
    config: dict[str, Any] | None


@dataclass
class Row:
    """Measured result of one setting (times in milliseconds, medians over the repeats)."""

    setting: str
    config: dict[str, Any] | None
    planned_visual_tokens: int
    visual_tokens: int
    vision_ms: float
    prefill_ms: float
    total_ms: float
    output_tokens: int
    runs: list[dict[str, float]] = field(default_factory=list)


# ----------------------------------------------------------------------------------- arguments
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--image", default="astronaut", help="a bundled image name or an image file (default: astronaut)"
    )
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="the question asked in every run")
    # nargs="*": an empty --keep-ratios / --budgets leaves those runs out.
    add_list_argument(
        parser,
        "--keep-ratios",
        float,
        nargs="*",
        default=list(DEFAULT_KEEP_RATIOS),
        help="PiToMe keep ratios per merging layer, in (0.5, 1.0] (default: 0.9 0.95)",
    )
    add_list_argument(
        parser,
        "--budgets",
        int,
        nargs="*",
        default=list(DEFAULT_BUDGETS),
        help="PiToMe runs with an exact visual-token budget, target_tokens (default: 64 128 192)",
    )
    add_list_argument(
        parser,
        "--methods",
        choices=DEMO_METHODS,
        default=list(DEMO_METHODS),
        help="pitome runs at every keep ratio and budget; tome (ToMe matching) runs at the first keep ratio "
        "as a baseline (default: pitome tome)",
    )
    parser.add_argument("--preset", choices=PRESETS, default="reference", help="PiToMe preset (default: reference)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed runs per setting after one warm-up; the median is shown"
    )
    parser.add_argument("--max-new-tokens", type=int, default=16, help="tokens decoded per run (default: 16)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, mps or auto")
    add_threads_argument(parser)
    parser.add_argument(
        "--json", type=Path, metavar="PATH", help="also write the table (and trajectory) to this JSON file"
    )
    # The smaller tiny model, for the test suite.
    parser.add_argument("--spec", choices=("demo", "test"), default="demo", help=argparse.SUPPRESS)


def demo_settings(methods: list[str], keep_ratios: list[float], budgets: list[int], preset: str) -> list[Setting]:
    """Unpatched first, then PiToMe at each keep ratio and budget, then the baselines."""
    settings = [Setting("unpatched", None)]
    if "pitome" in methods:
        for keep_ratio in keep_ratios:
            settings.append(
                Setting(f"pitome keep={keep_ratio:g}", {"method": "pitome", "preset": preset, "keep_ratio": keep_ratio})
            )
        for budget in budgets:
            settings.append(
                Setting(f"pitome target={budget}", {"method": "pitome", "preset": preset, "target_tokens": budget})
            )
    baseline_ratio = keep_ratios[0] if keep_ratios else DEFAULT_KEEP_RATIOS[0]
    for method in methods:
        if method != "pitome":
            settings.append(
                Setting(
                    f"{method} keep={baseline_ratio:g}",
                    {"method": method, "preset": preset, "keep_ratio": baseline_ratio},
                )
            )
    return settings


def _validate_args(args: argparse.Namespace) -> None:
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.json is not None:
        # Before the demo runs: a path that cannot be written must not cost the measurements.
        if args.json.is_dir():
            raise ValueError(f"--json {args.json} is a folder; give the path of a file, e.g. {args.json / 'demo.json'}")
        from ..common.files import checked_output_folder

        checked_output_folder("--json's folder", args.json.parent)


# ----------------------------------------------------------------------------------- measuring
def _generate_kwargs(max_new_tokens: int) -> dict[str, Any]:
    # A random model may emit EOS at any step; decoding a fixed number of tokens keeps the
    # rows comparable (same decode work, only the visual tokens differ).
    return {"max_new_tokens": max_new_tokens, "min_new_tokens": max_new_tokens, "do_sample": False}


def _timed_generate(model, inputs, max_new_tokens: int) -> dict[str, float]:
    import torch

    from ..runtime.loading import StageTimer

    with torch.inference_mode(), StageTimer(model) as timer:
        output_ids = model.generate(**inputs, **_generate_kwargs(max_new_tokens))
    output_tokens = int(output_ids.shape[1] - inputs["input_ids"].shape[1])
    return {
        "vision_ms": timer.vision_s * 1e3,
        "prefill_ms": timer.prefill_s * 1e3,
        "total_ms": timer.total_s * 1e3,
        "output_tokens": output_tokens,
    }


def _median(runs: list[dict[str, float]], key: str) -> float:
    return float(statistics.median(run[key] for run in runs))


def measure_setting(model, processor, image, prompt: str, setting: Setting, args, advance) -> Row:
    """Patch (if the setting asks), warm up once, time ``args.repeats`` generations, unpatch."""
    from .. import patch
    from ..runtime.loading import count_image_tokens

    handle = patch(model, processor, **setting.config) if setting.config is not None else None
    try:
        inputs = processor(images=image, text=prompt, return_tensors="pt").to(model.device)
        planned = handle.num_visual_tokens if handle is not None else count_image_tokens(processor, inputs["input_ids"])
        _timed_generate(model, inputs, args.max_new_tokens)  # warm-up: allocator, kernel choice
        advance()
        runs = []
        for _ in range(args.repeats):
            runs.append(_timed_generate(model, inputs, args.max_new_tokens))
            advance()
    finally:
        if handle is not None:
            handle.unpatch()
    return Row(
        setting=setting.label,
        config=setting.config,
        planned_visual_tokens=planned,
        visual_tokens=count_image_tokens(processor, inputs["input_ids"]),
        vision_ms=_median(runs, "vision_ms"),
        prefill_ms=_median(runs, "prefill_ms"),
        total_ms=_median(runs, "total_ms"),
        output_tokens=int(_median(runs, "output_tokens")),
        runs=runs,
    )


def check_configs(settings: list[Setting]) -> None:
    """Validate every setting's values before any model is built."""
    from ..config import PiToMeConfig

    for setting in settings:
        if setting.config is not None:
            PiToMeConfig(**setting.config)


def check_settings(model, processor, settings: list[Setting]) -> None:
    """Plan every setting before timing any, so a bad budget fails in a second, not after minutes."""
    from .. import patch

    for setting in settings:
        if setting.config is not None:
            patch(model, processor, **setting.config).unpatch()


def inspect_merges(model, processor, image, config: dict[str, Any]) -> dict[str, Any]:
    """One vision forward with ``config``, recording every merge: the per-layer trajectory and
    what the last PiToMe step protected."""
    import torch

    from .. import patch

    handle = patch(model, processor, **config)
    try:
        handle.record_merges(True)
        pixel_values = processor.image_processor(images=image, return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            handle.parts.encode_images(pixel_values.to(model.device, model.dtype))
        trace = handle.trace
        steps = handle.schedule
        num_input_tokens = steps[0].tokens_in
        # One convention wherever counts print: visual tokens, CLIP's class token excluded (LLaVA drops it).
        summary: dict[str, Any] = {
            "config": config,
            "counts": VISUAL_TOKENS_NOTE,
            "tokens_after_layer": [count - 1 for count in (num_input_tokens, *trace.token_counts)],
            "methods": [step.method for step in steps],
            "num_visual_tokens": handle.num_visual_tokens,
        }
        pitome_steps = [(layer_idx, merge) for layer_idx, merge in trace.merges if steps[layer_idx].method == "pitome"]
        if pitome_steps:
            layer_idx, merge = pitome_steps[-1]
            summary["last_pitome_step"] = {
                "layer": layer_idx,
                "margin": steps[layer_idx].margin,
                "tokens_in": merge.num_input_tokens - 1,  # the class token is never in the graph
                "protected": merge.num_kept - 1,
                "merged_away": merge.num_removed,
                "tokens_out": merge.num_output_tokens - 1,
            }
        patch_sizes = trace.size[0, 1:, 0]  # per visual token, how many patches it holds (class token dropped)
        summary["patches"] = int(patch_sizes.sum())
        summary["patches_never_merged"] = int((patch_sizes == 1).sum())
        summary["largest_token_patches"] = int(patch_sizes.max())
        return summary
    finally:
        handle.unpatch()


def _trajectory_config(settings: list[Setting], preset: str) -> dict[str, Any]:
    """The first PiToMe keep-ratio setting shown, else the reference keep_ratio=0.9 run."""
    for setting in settings:
        if setting.config and setting.config.get("method") == "pitome" and "keep_ratio" in setting.config:
            return setting.config
    return {"method": "pitome", "preset": preset, "keep_ratio": DEFAULT_KEEP_RATIOS[0]}


# ------------------------------------------------------------------------------------- output
def _spread(runs: list[dict[str, float]], key: str) -> float:
    """Half the range of ``key`` over the timed runs: how far apart two rows must be to differ."""
    values = [run[key] for run in runs]
    return (max(values) - min(values)) / 2 if values else 0.0


WITHIN_NOISE = "within noise"


def speed_up_text(baseline: Row, row: Row, key: str = "prefill_ms") -> str:
    """``baseline``'s ``key`` over ``row``'s as ``2.04x``, or "within noise" when the ranges of their timed
    runs overlap (then the runs cannot tell the two settings apart, whatever the medians say)."""
    if row is baseline:
        return "1.00x"
    base = [run[key] for run in baseline.runs] or [getattr(baseline, key)]
    this = [run[key] for run in row.runs] or [getattr(row, key)]
    if min(base) <= max(this) and min(this) <= max(base):
        return WITHIN_NOISE
    return f"{getattr(baseline, key) / getattr(row, key):.2f}x" if getattr(row, key) > 0 else "n/a"


def table_text(rows: list[Row], width: int | None = None) -> str:
    """The demo table: medians ± half the range of the timed runs, and the TTFT speed-up (or "within noise").

    ``prefill_ms`` is the time to the first token (vision included): the column says TTFT.
    """
    from ..runtime.terminal import render_table

    columns = ["setting", "visual tokens", "vision ms", "TTFT ms", "total ms", "output tokens", "TTFT speed-up"]
    cells = []
    for row in rows:
        cells.append(
            [
                row.setting,
                str(row.visual_tokens),
                *(
                    f"{getattr(row, key):.1f} ±{_spread(row.runs, key):.1f}"
                    for key in ("vision_ms", "prefill_ms", "total_ms")
                ),
                str(row.output_tokens),
                speed_up_text(rows[0], row),
            ]
        )
    return render_table(columns, cells, width=width)


def describe_merges(summary: dict[str, Any]) -> list[str]:
    config = summary["config"]
    counts = summary["tokens_after_layer"]
    label = f"{config['method']} keep={config['keep_ratio']:g}, preset {config.get('preset', 'reference')}"
    lines = [
        f"Visual tokens after each vision layer ({label}; {VISUAL_TOKENS_NOTE}): "
        + " -> ".join(str(count) for count in counts)
        + f"; the LLM receives {summary['num_visual_tokens']}."
    ]
    step = summary.get("last_pitome_step")
    if step is not None:
        lines.append(
            f"Last PiToMe merge (layer {step['layer']}, margin {step['margin']:.4f}): of {step['tokens_in']} tokens, "
            f"{step['protected']} low-energy (isolated) tokens were protected and {step['merged_away']} merged away "
            f"-> {step['tokens_out']}. {summary['patches_never_merged']} of {summary['patches']} patches reach the "
            f"LLM never merged; the largest visual token holds {summary['largest_token_patches']} patches."
        )
    return lines


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


# ----------------------------------------------------------------------------------------- run
def run(args: argparse.Namespace) -> int:
    from ..runtime.terminal import torch_threads

    _validate_args(args)
    with torch_threads(args.threads):
        return _run_demo(args)


def _run_demo(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ..models import model_parts
    from ..runtime.loading import build_prompt, load_image_arg, resolve_device, tiny_demo_model
    from ..runtime.terminal import load_average_note, output_width, warn_if_busy

    settings = demo_settings(args.methods, args.keep_ratios, args.budgets, args.preset)
    check_configs(settings)
    image = load_image_arg(args.image)
    device = resolve_device(args.device)
    console = Console()
    status_console = Console(stderr=True)

    with status_console.status("building the tiny LLaVA offline..."):
        model, processor = tiny_demo_model(args.spec)
        model.to(device)
        check_settings(model, processor, settings)
    prompt = build_prompt(processor, args.prompt)
    warn_if_busy()  # after every check, right before the timing starts

    rows: list[Row] = []
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=status_console,
        transient=True,
    )
    with progress:
        task = progress.add_task("measuring", total=len(settings) * (args.repeats + 1))
        for setting in settings:
            progress.update(task, description=f"{setting.label:<28}")
            rows.append(measure_setting(model, processor, image, prompt, setting, args, lambda: progress.advance(task)))
    merges = inspect_merges(model, processor, image, _trajectory_config(settings, args.preset))

    vision = model_parts(model).tower.config
    console.print(
        f"[bold]Tiny random LLaVA[/bold] ({vision.image_size} px, {vision.patch_size} px patches, "
        f"{vision.num_hidden_layers} CLIP layers, width {vision.hidden_size}); image {args.image!r}; "
        f"PiToMe preset {args.preset!r}; {device.type}, {plural(torch.get_num_threads(), 'thread')}; "
        f"median ± half the range of {plural(args.repeats, 'run')} after 1 warm-up"
    )
    print(table_text(rows, output_width()))
    console.print(
        f"Measured with {load_average_note()}. {VISUAL_TOKENS_NOTE.capitalize()}; vision = CLIP tower + projector "
        "(merges included); TTFT = time to the first token (vision and prefill); every run decodes exactly "
        f"{plural(args.max_new_tokens, 'token')}, so the rows compare. '{WITHIN_NOISE}': the timed runs of the "
        "setting and of the unpatched model overlap, so they do not tell the two apart. Weights are random: "
        "the table is about token counts and their cost."
    )
    for line in describe_merges(merges):
        console.print(line)

    if args.json is not None:
        _write_json(
            args.json,
            {
                "model": f"tiny-{args.spec}",
                "image": args.image,
                "prompt": args.prompt,
                "device": device.type,
                "threads": torch.get_num_threads(),
                "repeats": args.repeats,
                "max_new_tokens": args.max_new_tokens,
                "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
                "timings": "prefill_ms is the time to the first token (vision included); medians of the runs",
                "counts": VISUAL_TOKENS_NOTE,
                "rows": [asdict(row) for row in rows],
                "merges": merges,
            },
        )
        console.print(f"wrote {args.json}")
    return 0
