"""``pitome-mllm profile``: latency, memory and FLOPs per stage, with and without merging.

    pitome-mllm profile --arch clip-l-336+1b --budgets 64 128 576 --new-tokens 4 --output out/
    pitome-mllm profile --model llava-hf/llava-1.5-7b-hf --device cuda --dtype float16
    pitome-mllm profile --arch clip-l-336 --keep-ratios 0.9 0.95 --methods pitome
    pitome-mllm profile --arch qwen2.5-vl-7b --budgets 64 128 --llm-layers 2 --device cpu

A Qwen-VL ``--arch`` profiles a 448 x 448 image (the reference size of ``handle.num_visual_tokens``: 256
tokens after the patch merger for Qwen2.5-VL); ``--llm-layers`` keeps only the first N decoder layers of
an ``--arch`` language model, so the 7-8B shapes fit a CPU's memory (prefill and decode then cost about
N / depth of the full model's, the tower and merge stage all of theirs).

``--arch`` builds a real-size model with random weights (no download; the cost of a
fixed token budget does not depend on the weights). ``--model`` loads a checkpoint
folder or hub id (``tiny`` / ``tiny-test``: the offline tiny model).
"""

from __future__ import annotations

import argparse
import sys

from ..common.files import checked_output_folder
from ..config import METHODS
from ..runtime.terminal import add_list_argument, add_threads_argument
from ..zoo.architecture_specs import ARCHITECTURES
from .arguments import add_preset_argument, checked_output_stem

# What `write_report` adds to --stem (kept torch-free here: the check runs before the heavy imports).
REPORT_SUFFIXES = (".json", ".csv", "_latency.png", "_memory.png")

HELP = "time and measure each stage (vision tower, merges, projector, prefill, decode) per merging config"

DTYPE_CHOICES = ("auto", "float32", "float16", "bfloat16")
TINY_MODELS = {"tiny": "demo", "tiny-test": "test"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", metavar="PATH_OR_ID", help="checkpoint folder or hub id; 'tiny' / 'tiny-test'")
    source.add_argument(
        "--arch",
        choices=list(ARCHITECTURES),
        help="real-size architecture with random weights: "
        + "; ".join(f"{name}: {spec.description}" for name, spec in ARCHITECTURES.items()),
    )
    add_list_argument(parser, "--methods", default=["none", "tome", "pitome"], help="e.g. none tome pitome")
    add_list_argument(
        parser,
        "--budgets",
        int,
        default=None,
        help="visual-token budgets (target_tokens); the native count means unpatched (default 64 128 192 576 "
        "unless --keep-ratios is given)",
    )
    add_list_argument(parser, "--keep-ratios", float, default=[], help="e.g. 0.9 0.95")
    add_preset_argument(parser)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=8, help="tokens generated per pass (EOS ignored)")
    parser.add_argument("--repeats", type=int, default=5, help="measured passes per config")
    parser.add_argument("--warmup", type=int, default=1, help="discarded passes per config (the last measures memory)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help="auto: float16 on CUDA, float32 on CPU")
    add_threads_argument(parser)
    parser.add_argument("--vision-only", action="store_true", help="profile only the vision tower and projector")
    parser.add_argument("--image", default="astronaut", help="bundled image: astronaut, chelsea, coffee")
    parser.add_argument("--prompt", default=None, help="question about the image")
    parser.add_argument("--output", metavar="DIR", default=None, help="write JSON, CSV and plots here")
    parser.add_argument("--stem", default="profile", help="file name stem of the outputs")
    parser.add_argument("--seed", type=int, default=0, help="weights seed for --arch")
    parser.add_argument(
        "--llm-layers",
        type=int,
        default=None,
        help="--arch only: build only this many language-model layers (memory; the full depth by default)",
    )


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} requested but CUDA is not available here; use --device cpu")
    return device


def resolve_dtype(name: str, device):
    import torch

    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def load_model_for_profiling(args: argparse.Namespace, device, dtype):
    """``(model, processor, source description, vision_only)`` for ``--arch`` or ``--model``."""
    if args.arch:
        from ..zoo.architectures import build_arch, get_arch

        spec, source = reduced_depth(get_arch(args.arch), args.llm_layers)
        model, processor = build_arch(spec, device=device, dtype=dtype, seed=args.seed)
        return model, processor, source, not spec.build_language_model
    if args.model in TINY_MODELS:
        from ..zoo.tiny import DEMO_SPEC, TEST_SPEC, build_tiny_llava

        spec = DEMO_SPEC if TINY_MODELS[args.model] == "demo" else TEST_SPEC
        model, processor = build_tiny_llava(spec)
        return model.to(device=device, dtype=dtype), processor, f"{args.model} (random weights)", False
    try:
        from ..runtime.loading import load_checkpoint
    except ImportError:
        load_checkpoint = None
    if load_checkpoint is not None:  # a LLaVA, or a local Qwen-VL folder
        model, processor = load_checkpoint(args.model, dtype=dtype, device=device)
    else:
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(args.model, dtype=dtype).to(device).eval()
        processor = AutoProcessor.from_pretrained(args.model)
    return model, processor, args.model, False


def gigabytes(count: int) -> str:
    return f"{count / 1e9:.1f} GB"


def check_memory(
    arch: str, dtype, batch_size: int, available: int | None, device, llm_layers: int | None = None
) -> None:
    """Refuse an ``--arch`` run whose estimated memory exceeds what ``device`` has available.

    Raises:
        ValueError: naming the estimate, what is available, and the ways out (a smaller dtype, a
            smaller ``--arch`` that fits).
    """
    from ..zoo.architecture_specs import ARCHITECTURES, estimate_memory

    if available is None:
        return
    dtype_bytes = dtype.itemsize
    spec = reduced_depth(ARCHITECTURES[arch], llm_layers)[0]
    need = estimate_memory(spec, dtype_bytes, batch_size)
    if need.total_bytes <= available:
        return
    dtype_name = str(dtype).replace("torch.", "")
    ways_out = []
    if dtype_bytes > 2:
        half = estimate_memory(spec, 2, batch_size).total_bytes
        if half <= available:
            ways_out.append(f"--dtype bfloat16 or float16 (about {gigabytes(half)})")
    if llm_layers is None and spec.build_language_model and spec.text.num_layers > 2:
        shallow = estimate_memory(reduced_depth(spec, 2)[0], dtype_bytes, batch_size).total_bytes
        if shallow <= available:
            ways_out.append(f"--llm-layers 2 (the language model cut to 2 layers; about {gigabytes(shallow)})")
    smaller = [
        f"{name} ({gigabytes(estimate_memory(spec, dtype_bytes, batch_size).total_bytes)})"
        for name, spec in ARCHITECTURES.items()
        if name != arch
        and getattr(spec, "family", None) == getattr(ARCHITECTURES[arch], "family", None)  # the same family only
        and estimate_memory(spec, dtype_bytes, batch_size).total_bytes <= available
    ]
    if smaller:
        ways_out.append(f"a smaller --arch: {', '.join(smaller)} in {dtype_name}")
    if batch_size > 1:
        ways_out.append("a smaller --batch-size")
    ways_out.append("a machine with more memory")
    raise ValueError(
        f"--arch {arch} in {dtype_name} needs about {gigabytes(need.total_bytes)} "
        f"({need.parameters / 1e9:.2f} B parameters x {dtype_bytes} bytes = {gigabytes(need.weight_bytes)}, "
        f"activations {gigabytes(need.activation_bytes)}), more than the {gigabytes(available)} available on "
        f"{device}; use {'; or '.join(ways_out)}"
    )


def reduced_depth(spec, llm_layers: int | None):
    """``(spec, source description)`` with the language model cut to its first ``llm_layers`` layers.

    Raises:
        ValueError: ``llm_layers`` outside 1..the architecture's depth.
    """
    import dataclasses

    if llm_layers is None:
        return spec, f"{spec.name} (random weights)"
    depth = spec.text.num_layers
    if not 1 <= llm_layers <= depth:
        raise ValueError(f"--llm-layers must be between 1 and {spec.name}'s {depth} decoder layers, got {llm_layers}")
    text = dataclasses.replace(spec.text, num_layers=llm_layers)
    return (
        dataclasses.replace(spec, text=text),
        f"{spec.name} (random weights, language model cut to {llm_layers} of {depth} layers)",
    )


def native_visual_tokens(model, processor=None) -> int:
    """Visual tokens per image of the unpatched model at its reference size (after any patch merger;
    where the grid follows the image, under ``processor``'s pixel limits)."""
    from ..models import model_geometry
    from ..models.qwen_tools import reference_grid, spatial_merge_size

    grid = reference_grid(model, processor)
    tower_tokens = model_geometry(model).native_visual_tokens if grid is None else grid.patches
    return tower_tokens // spatial_merge_size(model) ** 2


def run(args: argparse.Namespace) -> int:
    from ..runtime.terminal import torch_threads

    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        raise ValueError(f"--methods must be drawn from {METHODS}, got {unknown}")
    if any(budget < 1 for budget in args.budgets or ()):
        raise ValueError(f"--budgets must be >= 1, got {args.budgets}")
    if args.llm_layers is not None and not args.arch:
        raise ValueError("--llm-layers builds a shallower --arch model; it does not apply to --model")
    if args.output:  # before the model is built: a bad output path must not cost a profiling run
        output = checked_output_folder("--output", args.output)
        checked_output_stem("--stem", args.stem, "--output", output, REPORT_SUFFIXES)
    if args.arch:  # before the model is built: a run that cannot fit must not end in the kernel's OOM killer
        from ..tools.profiling.machine import available_memory_bytes

        device = resolve_device(args.device)
        check_memory(
            args.arch,
            resolve_dtype(args.dtype, device),
            args.batch_size,
            available_memory_bytes(device),
            device,
            args.llm_layers,
        )
    with torch_threads(args.threads):
        return _profile(args)


def _profile(args: argparse.Namespace) -> int:
    from rich.console import Console

    from ..runtime.terminal import load_average_note, warn_if_busy
    from ..tools.profiling import DEFAULT_PROMPT, ProfileSettings, plan_runs, print_table, profile, write_report

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    settings = ProfileSettings(
        batch_size=args.batch_size,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        warmup=args.warmup,
        vision_only=args.vision_only,
        prompt=args.prompt or DEFAULT_PROMPT,
        image=args.image,
        # A progress bar redraws one line with carriage returns: only on a terminal, never into a log file.
        progress=sys.stderr.isatty(),
    )
    console = Console(stderr=True)
    console.print(f"building {args.arch or args.model} on {device} ({str(dtype).replace('torch.', '')}) ...")
    model, processor, source, vision_only = load_model_for_profiling(args, device, dtype)
    settings.vision_only = settings.vision_only or vision_only
    native_tokens = native_visual_tokens(model, processor)
    if args.budgets is not None and max(args.budgets) > native_tokens:
        # The native count means unpatched; a larger budget is a mistake, not another unpatched run.
        raise ValueError(f"--budgets must be in [1, {native_tokens}] for this model ({source}), got {args.budgets}")
    budgets = args.budgets if args.budgets is not None else ([] if args.keep_ratios else [64, 128, 192, 576])
    runs = plan_runs(args.methods, budgets, args.keep_ratios, native_tokens, args.preset)
    warn_if_busy()
    report = profile(model, processor, runs, settings, source=source)
    print_table(report)
    console.print(f"measured with {load_average_note()}")
    if args.output:
        paths = write_report(report, args.output, args.stem)
        console.print("wrote " + ", ".join(str(path) for path in paths.values()))
    return 0
