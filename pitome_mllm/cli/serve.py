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

from .arguments import add_budget_arguments, add_method_argument, add_preset_argument

HELP = "serve a LLaVA model through vLLM's OpenAI-compatible server with PiToMe merging"
TINY = "tiny"
TINY_CPU_ENVIRONMENT = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help=f"a LLaVA-1.5 checkpoint (folder or hub name) or '{TINY}' (built locally)")
    parser.epilog = "Arguments after -- go to `vllm serve` unchanged, e.g. -- --port 8000 --max-model-len 4096."
    add_budget_arguments(parser)
    add_preset_argument(parser)
    add_method_argument(parser)
    parser.add_argument(
        "--config",
        help='more PiToMeConfig fields as JSON (or a JSON file), e.g. \'{"metric": "keys"}\'; flags win',
    )
    parser.add_argument("--no-pitome", action="store_true", help="serve the model unpatched (for comparison)")
    parser.add_argument("--dry-run", action="store_true", help="print the vllm command and exit")


def pitome_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The PiToMeConfig fields the flags and ``--config`` give (only those set, so presets fill the rest).

    Raises:
        ValueError: naming ``--config`` when it is neither a JSON object nor a file holding one.
    """
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


def tiny_model_folder(create: bool = True) -> Path:
    """A tiny LLaVA-1.5 for vLLM, saved once under the cache folder (``$PITOME_CACHE``).

    ``create=False`` gives the folder's path only, writing nothing (``--dry-run``).
    """
    from ..common.files import cache_dir
    from ..zoo.tiny import VLLM_DEMO_SPEC, save_tiny_llava

    folder = cache_dir(create=create) / "vllm_tiny_llava"
    if create and not (folder / "model.safetensors").is_file():
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


def model_config(model: str):
    """The transformers config of ``model`` (``tiny``, a folder or a hub name), without loading weights.

    None when a hub model's config.json is neither cached nor reachable (vLLM then checks it when it starts).

    Raises:
        ValueError: a folder without a readable config.json.
    """
    from transformers import AutoConfig

    if model == TINY:
        from ..zoo.tiny import VLLM_DEMO_SPEC, tiny_llava_config

        return tiny_llava_config(VLLM_DEMO_SPEC)
    if Path(model).is_dir():
        if not (Path(model) / "config.json").is_file():
            # Checked here: transformers 4.x guesses a model type from the folder's name instead (e.g. "empty" -> mpt).
            raise ValueError(f"MODEL {model}: cannot read its config.json (the folder holds none)")
        try:
            return AutoConfig.from_pretrained(model)
        except (OSError, ValueError) as error:
            raise ValueError(f"MODEL {model}: cannot read its config.json ({error})") from None
    for local_only in (True, False):
        try:
            return AutoConfig.from_pretrained(model, local_files_only=local_only)
        except (OSError, ValueError):
            continue
    return None


def preflight(model: str, fields: dict[str, Any] | None) -> str:
    """Check ``fields`` against ``model``'s config.json before vLLM starts; one line saying what was checked.

    Raises:
        ValueError: a budget the model's tower cannot reach, or a geometry the plugin does not support
            (the messages `pitome_mllm.patch` gives).
    """
    from ..config import PiToMeConfig
    from ..models.vllm_llava import planned_budget

    hf_config = model_config(model)
    if hf_config is None:
        return f"pre-flight: config.json of {model} is not here (offline?); vLLM checks the settings when it starts"
    model_type = getattr(hf_config, "model_type", None)
    if fields is None:
        return f"pre-flight: {model} ({model_type}) served unpatched"
    if model_type != "llava":
        return f"pre-flight: {model} is a {model_type!r} model; vLLM checks the settings against it when it starts"
    budget = planned_budget(hf_config, PiToMeConfig.from_dict(fields))
    geometry = budget.geometry
    counted = (
        "class token excluded" if geometry.drops_class_token or not geometry.class_token else "class token included"
    )
    return (
        f"pre-flight: {budget.num_visual_tokens} of {geometry.native_visual_tokens} visual tokens per image "
        f"({counted}), checked against the model's config.json"
    )


def run(args: argparse.Namespace) -> int:
    from .extras import VLLM, MissingExtra, missing_extra_message, module_available

    vllm_args = list(getattr(args, "passthrough", []))  # everything after `--`
    fields = None if args.no_pitome else pitome_fields(args)
    overrides = None if fields is None else check_settings(fields)
    # Everything that can be checked without vLLM, before it starts (it takes seconds to minutes to fail).
    print(preflight(args.model, fields), flush=True)
    if not module_available("vllm"):
        raise MissingExtra(missing_extra_message("serve", [("vllm", VLLM)]))
    model = args.model
    environment: dict[str, str] = {}  # set for vLLM where not set already
    if model == TINY:
        # --dry-run writes nothing: the path the tiny model would be saved to.
        model = str(tiny_model_folder(create=not args.dry_run))
        # A toy model: no graph compilation (minutes on a CPU) and a short context, unless asked otherwise.
        for option, value in (("--served-model-name", TINY), ("--max-model-len", "2048"), ("--enforce-eager", None)):
            if option not in vllm_args:
                vllm_args += [option] if value is None else [option, value]
        if shutil.which("nvidia-smi") is None:
            # vLLM's CPU build otherwise reserves 92% of the machine's memory (and refuses to start when other
            # programs hold some) and spawns an engine process (a minute more to start).
            environment = {name: value for name, value in TINY_CPU_ENVIRONMENT.items() if name not in os.environ}
            if "--distributed-executor-backend" not in vllm_args:
                vllm_args += ["--distributed-executor-backend", "uni"]
    command = vllm_serve_command(model, overrides, vllm_args)
    shown = " ".join([*(f"{name}={value}" for name, value in environment.items()), shlex.join(command)])
    if args.dry_run:
        print("would run:", shown, flush=True)
        return 0
    print("running:", shown, flush=True)
    os.environ.update(environment)
    os.execv(command[0], command)
    return 0  # not reached: vLLM replaced this process
