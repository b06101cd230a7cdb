"""``pitome-mllm serve``: vLLM's OpenAI-compatible server with PiToMe on.

``pitome-mllm serve MODEL --target-tokens 64 -- --port 8000`` runs the equivalent of
``vllm serve MODEL --hf-overrides '{"pitome": {"target_tokens": 64}}' --port 8000``: the
settings are checked here first (the messages `pitome_mllm.patch` gives), then vLLM
replaces this process, so signals and exit codes are vLLM's own. Everything after ``--``
goes to ``vllm serve`` unchanged.

``MODEL`` may be ``tiny``: a random-weight LLaVA-1.5 built locally (CLIP ViT-L/14-336
geometry, 576 visual tokens per image, tiny widths), to try the server with no download.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

from ..config import ALL_METHODS
from .arguments import add_budget_arguments, add_preset_argument

HELP = "serve a LLaVA model through vLLM's OpenAI-compatible server with PiToMe merging"
TINY = "tiny"
TINY_CPU_ENVIRONMENT = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
VLLM_MISSING = (
    "vLLM is not installed in this environment ({python}); `bash scripts/install.sh --vllm` makes .venv-vllm "
    "with vLLM (its CPU build on a machine without a GPU) and pitome-mllm"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help=f"a LLaVA-1.5 checkpoint (folder or hub name) or '{TINY}' (built locally)")
    parser.epilog = "Arguments after -- go to `vllm serve` unchanged, e.g. -- --port 8000 --max-model-len 4096."
    add_budget_arguments(parser)
    add_preset_argument(parser)
    parser.add_argument("--method", choices=ALL_METHODS, default="pitome")
    parser.add_argument(
        "--config",
        help='more PiToMeConfig fields as JSON (or a JSON file), e.g. \'{"metric": "keys"}\'; flags win',
    )
    parser.add_argument("--no-pitome", action="store_true", help="serve the model unpatched (for comparison)")
    parser.add_argument("--dry-run", action="store_true", help="print the vllm command and exit")


def pitome_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The PiToMeConfig fields the flags and ``--config`` give (only those set, so presets fill the rest)."""
    fields: dict[str, Any] = {}
    if args.config:
        from ..config import read_config_fields

        try:
            fields.update(read_config_fields(args.config))
        except (ValueError, FileNotFoundError) as error:
            raise ValueError(f"--config: {error}") from None
    fields["method"] = args.method
    fields["preset"] = args.preset
    if args.keep_ratio is not None:
        fields["keep_ratio"] = args.keep_ratio
    if args.target_tokens is not None:
        fields["target_tokens"] = args.target_tokens
    return fields


def vllm_serve_command(model: str, overrides: dict | None, vllm_args: list[str]) -> list[str]:
    """The ``vllm serve`` command line, run with this Python (`pitome_mllm.integrations.vllm.server`)."""
    command = [sys.executable, "-m", "pitome_mllm.integrations.vllm.server", model]
    if overrides is not None:
        command += ["--hf-overrides", json.dumps(overrides)]
    return command + vllm_args


def tiny_model_folder() -> Path:
    """A tiny LLaVA-1.5 for vLLM, saved once under the cache folder (``$PITOME_CACHE``)."""
    from ..common.files import cache_dir
    from ..zoo.tiny import VLLM_DEMO_SPEC, save_tiny_llava

    folder = cache_dir() / "vllm_tiny_llava"
    if not (folder / "model.safetensors").is_file():
        save_tiny_llava(folder, VLLM_DEMO_SPEC, hub_layout=True)
    return folder


def check_settings(fields: dict[str, Any]) -> dict:
    """The ``hf_overrides`` value for ``fields``, refused here with the engine's messages where it would fail."""
    from ..config import PiToMeConfig
    from ..integrations.vllm import hf_overrides
    from ..models.vllm_llava import check_vllm_config

    overrides = hf_overrides(fields)
    check_vllm_config(PiToMeConfig.from_dict(fields))
    return overrides


def run(args: argparse.Namespace) -> int:
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise ValueError(VLLM_MISSING.format(python=sys.executable))
    vllm_args = list(getattr(args, "passthrough", []))  # everything after `--`
    overrides = None if args.no_pitome else check_settings(pitome_fields(args))
    model = args.model
    if model == TINY:
        model = str(tiny_model_folder())
        # A toy model: no graph compilation (minutes on a CPU) and a short context, unless asked otherwise.
        for option, value in (("--served-model-name", TINY), ("--max-model-len", "2048"), ("--enforce-eager", None)):
            if option not in vllm_args:
                vllm_args += [option] if value is None else [option, value]
        if shutil.which("nvidia-smi") is None:
            # vLLM's CPU build otherwise reserves 92% of the machine's memory (and refuses to start when other
            # programs hold some) and spawns an engine process (a minute more to start).
            for name, value in TINY_CPU_ENVIRONMENT.items():
                os.environ.setdefault(name, value)
            if "--distributed-executor-backend" not in vllm_args:
                vllm_args += ["--distributed-executor-backend", "uni"]
    command = vllm_serve_command(model, overrides, vllm_args)
    print("running:", shlex.join(command), flush=True)
    if args.dry_run:
        return 0
    os.execv(command[0], command)
    return 0  # not reached: vLLM replaced this process
