"""PiToMe inside vLLM: an out-of-tree plugin that serves LLaVA-1.5 with fewer visual tokens.

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

from typing import Any

from ...config import PiToMeConfig

CONFIG_KEY = "pitome"
ARCHITECTURE = "LlavaForConditionalGeneration"
MODEL_CLASS = "pitome_mllm.integrations.vllm.model:PitomeLlavaForConditionalGeneration"
# vLLM's anyres LLaVA classes, which refuse a `pitome` key rather than ignore it (`unsupported.py`);
# kept here as names so that registering imports no vLLM model code.
REFUSING_CLASSES = {
    "LlavaNextForConditionalGeneration": "PitomeRefusingLlavaNext",
    "LlavaNextVideoForConditionalGeneration": "PitomeRefusingLlavaNextVideo",
    "LlavaOnevisionForConditionalGeneration": "PitomeRefusingLlavaOnevision",
}


def register() -> None:
    """The ``vllm.general_plugins`` entry point: serve LLaVA through the PiToMe model class.

    vLLM may call it several times per process; registering the same class again is harmless.
    """
    from vllm import ModelRegistry

    ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
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
    "ARCHITECTURE",
    "CONFIG_KEY",
    "MODEL_CLASS",
    "REFUSING_CLASSES",
    "hf_overrides",
    "pitome_settings",
    "register",
]
