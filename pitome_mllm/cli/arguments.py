"""The command line's shared argument vocabulary: one spelling, one help text per setting.

Torch-free (``pitome-mllm --help`` builds every command's parser).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from ..config import ALL_METHODS, DTYPES, PRESETS

PRESET_HELP = "merge schedule (reference: the authors' released LLaVA code, ToMe in the first half)"
IMAGE_HELP = "a bundled image name (astronaut, chelsea, coffee) or an image file"


def add_preset_argument(parser: argparse.ArgumentParser, help: str = PRESET_HELP) -> None:
    parser.add_argument("--preset", choices=PRESETS, default="reference", help=help)


METHOD_HELP = (
    "how tokens are reduced: pitome (default), tome, none, or a selection method at the projector "
    "(random, pool, dominant, ...; docs/methods.md)"
)


def add_method_argument(parser: argparse.ArgumentParser, choices=ALL_METHODS) -> None:
    parser.add_argument("--method", choices=choices, default="pitome", help=METHOD_HELP)


def add_budget_arguments(parser: argparse.ArgumentParser) -> None:
    """``--keep-ratio`` or ``--target-tokens`` (one of them)."""
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--keep-ratio", type=float, help="fraction of tokens each merging layer keeps, in (0.5, 1.0]")
    budget.add_argument("--target-tokens", type=int, help="exact number of visual tokens per image")


def add_quantization_arguments(parser: argparse.ArgumentParser) -> None:
    """``--load-in-4bit`` or ``--load-in-8bit`` (the language model only)."""
    quantization = parser.add_mutually_exclusive_group()
    quantization.add_argument(
        "--load-in-4bit", action="store_true", help="quantise the language model to 4 bit (bitsandbytes)"
    )
    quantization.add_argument(
        "--load-in-8bit", action="store_true", help="quantise the language model to 8 bit (bitsandbytes)"
    )


def add_loading_arguments(parser: argparse.ArgumentParser) -> None:
    """``--device`` and ``--dtype`` of a loaded checkpoint."""
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    parser.add_argument("--dtype", choices=DTYPES, default="auto")


def add_tiny_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model`` (default: the offline tiny model) and ``--device``."""
    parser.add_argument(
        "--model",
        default="tiny",
        help="'tiny' (offline random-weight LLaVA with CLIP ViT-L/14-336 geometry, the default), "
        "'tiny-test' (112 px, 6 layers) or a local folder loadable with from_pretrained",
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


# ------------------------------------------------------------------------------ output paths
def checked_output_stem(flag: str, stem: str, folder_flag: str, folder: Path, suffixes: Sequence[str]) -> list[Path]:
    """The files ``folder/<stem><suffix>``, checked to stay inside ``folder`` before any work starts.

    Raises:
        ValueError: naming ``flag`` when ``stem`` is not a plain file name (``../x``, ``a/b``, ``.``),
            or when one of the files resolves outside ``folder`` (a symbolic link).
    """
    separators = {"/", os.sep, os.altsep} - {None}
    if not stem or stem in (".", "..") or "\0" in stem or any(sep in stem for sep in separators):
        raise ValueError(
            f"{flag} {stem!r} must be a plain file name (no '/', not '.' or '..'): the outputs are written "
            f"inside {folder_flag} {folder}"
        )
    root = folder.resolve()
    paths = [folder / f"{stem}{suffix}" for suffix in suffixes]
    for path in paths:
        if not path.resolve().is_relative_to(root):
            raise ValueError(f"{flag} {stem!r}: {path} resolves to {path.resolve()}, outside {folder_flag} {folder}")
    return paths
