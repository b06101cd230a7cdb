"""``pitome-mllm serve``: vLLM's OpenAI-compatible server with PiToMe on.

``pitome-mllm serve MODEL --target-tokens 64 -- --port 8000`` runs the equivalent of
``vllm serve MODEL --hf-overrides '{"pitome": {"target_tokens": 64}}' --port 8000``: the
settings are checked here first (the messages `pitome_mllm.patch` gives), then vLLM
replaces this process, so signals and exit codes are vLLM's own. Everything after ``--``
goes to ``vllm serve`` unchanged.

The plugin's families are served: LLaVA-1.5, LLaVA-NeXT, Qwen2.5-VL and Qwen3-VL. Before vLLM
starts, the settings are checked against the model's config.json with the plan the engine builds
for that family (the same messages), and the line printed says what each image gets. For Qwen-VL,
whose plugin refuses videos and full CUDA graphs, the options that keep vLLM from starting into
those refusals are added where the user gave none (and said so).

``MODEL`` may be ``tiny`` (a random-weight LLaVA-1.5: CLIP ViT-L/14-336 geometry, 576 visual
tokens per image, tiny widths) or ``tiny-qwen`` (a random-weight Qwen2.5-VL, 4 to 100 native
tokens per image), built locally to try the server with no download.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ..integrations.vllm import (
    ARCHITECTURE,
    CONFIG_KEY,
    NEXT_ARCHITECTURE,
    QWEN2_5_VL_ARCHITECTURE,
    QWEN3_VL_ARCHITECTURE,
    SUPPORTED_ARCHITECTURES,
)
from .arguments import add_budget_arguments, add_method_argument, add_preset_argument

HELP = (
    "serve a LLaVA-1.5, LLaVA-NeXT, Qwen2.5-VL or Qwen3-VL model through vLLM's OpenAI-compatible server with "
    "PiToMe merging"
)
TINY = "tiny"
TINY_QWEN = "tiny-qwen"
# The locally built models: (folder name under the cache folder, served name).
TINY_MODELS = {TINY: "vllm_tiny_llava", TINY_QWEN: "vllm_tiny_qwen"}
TINY_QWEN_FAMILY = "qwen2.5-vl"
TINY_CPU_ENVIRONMENT = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
QWEN_FAMILIES = {QWEN2_5_VL_ARCHITECTURE: "Qwen2.5-VL", QWEN3_VL_ARCHITECTURE: "Qwen3-VL"}
# The model types of the families the plugin serves, for a config that names no architecture (one built in memory).
ARCHITECTURE_OF_MODEL_TYPE = {
    "llava": ARCHITECTURE,
    "llava_next": NEXT_ARCHITECTURE,
    "qwen2_5_vl": QWEN2_5_VL_ARCHITECTURE,
    "qwen3_vl": QWEN3_VL_ARCHITECTURE,
}
# What the Qwen-VL plugin needs from vLLM (videos refused; full CUDA graphs skip the moved positions).
NO_VIDEOS = {"video": 0}
PIECEWISE_GRAPHS = {"cudagraph_mode": "PIECEWISE"}
# vLLM's default for a modality --limit-mm-per-prompt does not name (vllm.config.multimodal).
VLLM_UNNAMED_MODALITY_LIMIT = 999


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        help="a LLaVA-1.5, LLaVA-NeXT, Qwen2.5-VL or Qwen3-VL checkpoint (folder or hub name), or "
        f"'{TINY}' (a random LLaVA-1.5) or '{TINY_QWEN}' (a random Qwen2.5-VL), built locally",
    )
    parser.epilog = (
        "Arguments after -- go to `vllm serve` unchanged, e.g. -- --port 8000 --max-model-len 4096. For Qwen-VL "
        f"with PiToMe, serve adds --limit-mm-per-prompt '{json.dumps(NO_VIDEOS)}' (videos are refused) unless "
        "you give one, and on an NVIDIA machine --compilation-config "
        f"'{json.dumps(PIECEWISE_GRAPHS)}' unless you give --enforce-eager or a compilation config."
    )
    add_budget_arguments(parser)
    add_preset_argument(parser)
    add_method_argument(parser)
    parser.add_argument(
        "--config",
        help='more PiToMeConfig fields as JSON (or a JSON file), e.g. \'{"metric": "keys"}\'; flags win',
    )
    parser.add_argument("--no-pitome", action="store_true", help="serve the model unpatched (for comparison)")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="run the checks, print the vllm command (with the options serve adds) and exit; writes nothing",
    )


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


def tiny_model_folder(create: bool = True, name: str = TINY) -> Path:
    """A tiny model for vLLM (``tiny``: LLaVA-1.5, ``tiny-qwen``: Qwen2.5-VL), saved once under the cache folder
    (``$PITOME_CACHE``).

    ``create=False`` gives the folder's path only, writing nothing (``--dry-run``).
    """
    from ..common.files import cache_dir

    folder = cache_dir(create=create) / TINY_MODELS[name]
    if create and not (folder / "model.safetensors").is_file():
        if name == TINY_QWEN:
            from ..zoo.tiny_qwen import save_tiny_qwen_vl

            save_tiny_qwen_vl(folder, TINY_QWEN_FAMILY)
        else:
            from ..zoo.tiny import VLLM_DEMO_SPEC, save_tiny_llava

            save_tiny_llava(folder, VLLM_DEMO_SPEC, hub_layout=True)
    return folder


def check_settings(fields: dict[str, Any]) -> dict:
    """The ``hf_overrides`` value for ``fields``, refused here with the engine's messages where it would fail
    whatever the model (the family's own checks follow in `preflight`)."""
    from ..config import PiToMeConfig
    from ..integrations.vllm import hf_overrides
    from ..models.vllm_llava import check_vllm_config

    overrides = hf_overrides(fields)
    check_vllm_config(PiToMeConfig.from_dict(fields))
    return overrides


def model_config(model: str):
    """The transformers config of ``model`` (``tiny``, ``tiny-qwen``, a folder or a hub name), without loading
    weights.

    None when a hub model's config.json is neither cached nor reachable (vLLM then checks it when it starts).

    Raises:
        ValueError: a folder without a readable config.json.
    """
    from transformers import AutoConfig

    if model == TINY:
        from ..zoo.tiny import VLLM_DEMO_SPEC, tiny_llava_config

        return tiny_llava_config(VLLM_DEMO_SPEC)
    if model == TINY_QWEN:
        from ..zoo.tiny_qwen import tiny_qwen_vl_config

        return tiny_qwen_vl_config(TINY_QWEN_FAMILY)
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


def served_architecture(hf_config) -> str | None:
    """The architecture vLLM resolves ``hf_config`` to: the first of its ``architectures`` the plugin serves,
    else its first; for a config naming none, the plugin's architecture of its model type (None: unknown)."""
    architectures = list(getattr(hf_config, "architectures", None) or [])
    for architecture in architectures:
        if architecture in SUPPORTED_ARCHITECTURES:
            return architecture
    if architectures:
        return architectures[0]
    return ARCHITECTURE_OF_MODEL_TYPE.get(getattr(hf_config, "model_type", None))


def llava_line(hf_config, config) -> str:
    """LLaVA-1.5: the tower's budget (`planned_budget`, what prompt processing counts with)."""
    from ..models.vllm_llava import planned_budget

    budget = planned_budget(hf_config, config)
    geometry = budget.geometry
    counted = (
        "class token excluded" if geometry.drops_class_token or not geometry.class_token else "class token included"
    )
    return (
        f"pre-flight: {budget.num_visual_tokens} of {geometry.native_visual_tokens} visual tokens per image "
        f"({counted}), checked against the model's config.json"
    )


def llava_next_line(hf_config, config) -> str:
    """LLaVA-NeXT: each image's anyres budget (`AnyresPlan`), shown for the largest crop grid and one crop."""
    from ..models.vllm_llava_next import AnyresPlan

    plan = AnyresPlan.from_config(hf_config, config)
    if plan.target_tokens is not None:
        rule = f"target_tokens={plan.target_tokens} per image"
    elif plan.keep_fraction is not None:
        rule = f"keep_ratio={config.keep_ratio}: {plan.keep_fraction:.3f} of its base and crop tokens + 1 newline"
    else:
        rule = "no budget: every packed token"
    largest = max(plan.pinpoints, key=lambda size: plan.layout_for_image(*size).unmerged_tokens)
    crop = plan.crop_geometry.image_size
    examples = [
        f"{plan.visual_tokens_for_image(height, width)} of {plan.layout_for_image(height, width).unmerged_tokens} "
        f"for a {height}x{width} image"
        for height, width in (largest, (crop, crop))
    ]
    return (
        f"pre-flight: LLaVA-NeXT, each image merged after packing to its anyres budget ({rule}): "
        f"{', '.join(examples)}; checked against the model's config.json"
    )


def kept_rule(budget) -> str:
    """What `MergedGridBudget.kept_tokens` keeps of an image's ``n`` native tokens, as a formula."""
    ratio = None if budget.keep_ratio is None else f"ceil({budget.keep_ratio:g}·n)"
    if budget.target_tokens is not None:
        return f"min({budget.target_tokens}, {ratio or 'n'})"
    return ratio or "all n"


def qwen_line(hf_config, config, architecture: str) -> str:
    """Qwen-VL: each image's budget of its native tokens (`QwenVllmPlan`, `MergedGridBudget.kept_tokens`)."""
    from ..models.vllm_qwen_vl import QwenVllmPlan

    plan = QwenVllmPlan.from_config(hf_config, config)
    return (
        f"pre-flight: {QWEN_FAMILIES[architecture]}, each image reduced after the patch merger ({plan.method}) to "
        f"{kept_rule(plan.budget)} of its n native tokens; checked against the model's config.json"
    )


def preflight(model: str, fields: dict[str, Any] | None, hf_config=None) -> str:
    """Check ``fields`` against ``model``'s config.json before vLLM starts; one line saying what was checked.

    ``hf_config``: the model's config when already read (`model_config`), else read here.

    Raises:
        ValueError: an architecture the plugin refuses, a budget the model's tower cannot reach, or settings
            the family does not support in vLLM (the messages the engine and `pitome_mllm.patch` give).
    """
    from ..config import PiToMeConfig
    from ..integrations.vllm import unsupported_architecture_error

    hf_config = model_config(model) if hf_config is None else hf_config
    if hf_config is None:
        return f"pre-flight: config.json of {model} is not here (offline?); vLLM checks the settings when it starts"
    model_type = getattr(hf_config, "model_type", None)
    if fields is None:
        return f"pre-flight: {model} ({model_type}) served unpatched"
    architecture = served_architecture(hf_config)
    if architecture is None:
        return f"pre-flight: {model} is a {model_type!r} model; vLLM checks the settings against it when it starts"
    # The config as the engine sees it, the override applied.
    refusal = unsupported_architecture_error(architecture, SimpleNamespace(**{CONFIG_KEY: fields}))
    if refusal is not None:
        raise ValueError(refusal)
    config = PiToMeConfig.from_dict(fields)
    if architecture == NEXT_ARCHITECTURE:
        return llava_next_line(hf_config, config)
    if architecture in QWEN_FAMILIES:
        return qwen_line(hf_config, config, architecture)
    return llava_line(hf_config, config)


# ------------------------------------------------------------------ vLLM options the Qwen-VL plugin needs
def option_name(argument: str) -> str | None:
    """``--limit_mm_per_prompt.video=0`` -> ``--limit-mm-per-prompt.video`` (vLLM's spelling); None: not an option.

    vLLM reads underscores as dashes before the first dot, and ``--name=value`` as ``--name value``.
    """
    if not argument.startswith("--"):
        return None
    name = argument.split("=", 1)[0]
    head, dot, rest = name[2:].partition(".")
    return "--" + head.replace("_", "-") + dot + rest


def option_values(vllm_args: list[str], name: str) -> list[tuple[str, str | None]]:
    """``(option, value)`` of every ``name`` (or ``name.key...``) option in ``vllm_args`` (value None: none follows)."""
    found = []
    for index, argument in enumerate(vllm_args):
        option = option_name(argument)
        if option is None or not (option == name or option.startswith(name + ".")):
            continue
        if "=" in argument:
            value = argument.split("=", 1)[1]
        else:
            following = vllm_args[index + 1] if index + 1 < len(vllm_args) else None
            value = None if following is None or following.startswith("--") else following
        found.append((option, value))
    return found


def video_count(value) -> int:
    """Videos per prompt one ``"video"`` entry of ``--limit-mm-per-prompt`` allows (a count or ``{"count": n}``)."""
    if isinstance(value, dict):
        value = value.get("count", VLLM_UNNAMED_MODALITY_LIMIT)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"--limit-mm-per-prompt: cannot read a video count from {value!r}") from None


def allowed_videos(vllm_args: list[str]) -> int | None:
    """Videos per prompt the ``--limit-mm-per-prompt`` options after ``--`` allow; None: none given.

    Raises:
        ValueError: a value that is not JSON, or whose video count is not a number.
    """
    given = option_values(vllm_args, "--limit-mm-per-prompt")
    if not given:
        return None
    videos = VLLM_UNNAMED_MODALITY_LIMIT
    for option, value in given:
        key = option.removeprefix("--limit-mm-per-prompt").lstrip(".")
        if key in ("video", "video.count"):
            videos = video_count(value)
        elif not key:
            try:
                limits = json.loads(value or "")
            except json.JSONDecodeError:
                raise ValueError(
                    f"--limit-mm-per-prompt takes a JSON object such as '{json.dumps(NO_VIDEOS)}', got {value!r}"
                ) from None
            if not isinstance(limits, dict):
                raise ValueError(f"--limit-mm-per-prompt takes a JSON object, got {value!r}")
            if "video" in limits:
                videos = video_count(limits["video"])
    return videos


def gives_compilation(vllm_args: list[str]) -> bool:
    """Whether the arguments after ``--`` choose the graph mode themselves: eager mode, a compilation config
    (``--compilation-config``, ``-cc``, its dotted keys) or an optimization level (``-O``)."""
    for argument in vllm_args:
        option = option_name(argument)
        if option is None:
            if argument == "-cc" or argument.startswith(("-cc=", "-O")):
                return True
            continue
        name = option.partition(".")[0]
        if name in ("--enforce-eager", "--compilation-config", "--optimization-level"):
            return True
    return False


def qwen_vllm_options(vllm_args: list[str], gpu: bool) -> list[tuple[list[str], str]]:
    """The options to add for PiToMe on Qwen-VL, each with why: ``[(arguments, reason), ...]``.

    ``gpu``: an NVIDIA machine, where vLLM captures full CUDA graphs by default.

    Raises:
        ValueError: ``--limit-mm-per-prompt`` allows videos (the plugin refuses them at engine start).
    """
    added = []
    videos = allowed_videos(vllm_args)
    if videos is None:
        reason = "PiToMe on Qwen-VL serves images only; vLLM's default allows videos, which the plugin refuses"
        added.append((["--limit-mm-per-prompt", json.dumps(NO_VIDEOS)], reason))
    elif videos > 0:
        raise ValueError(
            f"--limit-mm-per-prompt allows {videos} video(s) per prompt, but PiToMe on Qwen-VL serves images only; "
            f'pass --limit-mm-per-prompt \'{{"image": N, "video": 0}}\' after -- (or leave it out: serve adds '
            f"'{json.dumps(NO_VIDEOS)}')"
        )
    if gpu and not gives_compilation(vllm_args):
        reason = "the Qwen-VL plugin moves image positions in the forward, which vLLM's default full CUDA graphs skip"
        added.append((["--compilation-config", json.dumps(PIECEWISE_GRAPHS)], reason))
    return added


def tiny_model_options(vllm_args: list[str], served_name: str) -> tuple[list[str], dict[str, str]]:
    """``(arguments, environment)`` for a tiny model: ``vllm_args`` with the toy defaults it does not set, and
    the environment variables to set for vLLM (on a CPU machine, those not set already)."""
    vllm_args = list(vllm_args)
    # A toy model: no graph compilation (minutes on a CPU) and a short context, unless asked otherwise.
    for option, value in (("--served-model-name", served_name), ("--max-model-len", "2048"), ("--enforce-eager", None)):
        if option not in vllm_args:
            vllm_args += [option] if value is None else [option, value]
    environment: dict[str, str] = {}
    if shutil.which("nvidia-smi") is None:
        # vLLM's CPU build otherwise reserves 92% of the machine's memory (and refuses to start when other
        # programs hold some) and spawns an engine process (a minute more to start).
        environment = {name: value for name, value in TINY_CPU_ENVIRONMENT.items() if name not in os.environ}
        if "--distributed-executor-backend" not in vllm_args:
            vllm_args += ["--distributed-executor-backend", "uni"]
    return vllm_args, environment


def run(args: argparse.Namespace) -> int:
    from .extras import VLLM, MissingExtra, missing_extra_message, module_available

    vllm_args = list(getattr(args, "passthrough", []))  # everything after `--`
    fields = None if args.no_pitome else pitome_fields(args)
    overrides = None if fields is None else check_settings(fields)
    # Everything that can be checked without vLLM, before it starts (it takes seconds to minutes to fail).
    hf_config = model_config(args.model)
    print(preflight(args.model, fields, hf_config), flush=True)
    environment: dict[str, str] = {}  # set for vLLM where not set already
    if args.model in TINY_MODELS:
        vllm_args, environment = tiny_model_options(vllm_args, args.model)
    added: list[tuple[list[str], str]] = []  # options added for the plugin, with why
    if fields is not None and hf_config is not None and served_architecture(hf_config) in QWEN_FAMILIES:
        added = qwen_vllm_options(vllm_args, gpu=shutil.which("nvidia-smi") is not None)
    if not module_available("vllm"):
        raise MissingExtra(missing_extra_message("serve", [("vllm", VLLM)]))
    model = args.model
    if model in TINY_MODELS:
        # --dry-run writes nothing: the path the tiny model would be saved to.
        model = str(tiny_model_folder(create=not args.dry_run, name=model))
    for arguments, reason in added:
        print(f"added: {shlex.join(arguments)} ({reason})", flush=True)
        vllm_args += arguments
    command = vllm_serve_command(model, overrides, vllm_args)
    shown = " ".join([*(f"{name}={value}" for name, value in environment.items()), shlex.join(command)])
    if args.dry_run:
        print("would run:", shown, flush=True)
        return 0
    print("running:", shown, flush=True)
    os.environ.update(environment)
    os.execv(command[0], command)
    return 0  # not reached: vLLM replaced this process
