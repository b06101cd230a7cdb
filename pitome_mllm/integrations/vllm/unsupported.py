"""vLLM's anyres LLaVA models the plugin does not merge in, refusing ``hf_overrides={"pitome": ...}``.

The plugin merges in vLLM's LLaVA-1.5 and LLaVA-NeXT. vLLM's LLaVA-NeXT-Video and LLaVA-OneVision
pack crops, newlines, unpadding (and OneVision's downsampling and multi-image base crops) in classes
of their own, where the anyres budget of ``docs/anyres.md`` is not wired in. Without these classes, a
``pitome`` key on such a model would be dropped without a word and the user would be served
full-length images while believing otherwise. With them, the model is vLLM's own when there is no
key, and the engine refuses to start when there is one (the architecture guard of `register` says
so earlier still, when vLLM resolves the architecture).
"""

from __future__ import annotations

from vllm.model_executor.models.llava_next_video import LlavaNextVideoForConditionalGeneration
from vllm.model_executor.models.llava_onevision import LlavaOnevisionForConditionalGeneration

from . import anyres_refusal, pitome_settings


def refuse_pitome_settings(hf_config, family: str) -> None:
    """Raise when ``hf_config`` asks for PiToMe on a family the plugin does not merge in."""
    if pitome_settings(hf_config) is not None:
        raise ValueError(anyres_refusal(family))


class PitomeRefusingLlavaNextVideo(LlavaNextVideoForConditionalGeneration):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        refuse_pitome_settings(vllm_config.model_config.hf_config, "LLaVA-NeXT-Video")
        super().__init__(vllm_config=vllm_config, prefix=prefix)


class PitomeRefusingLlavaOnevision(LlavaOnevisionForConditionalGeneration):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        refuse_pitome_settings(vllm_config.model_config.hf_config, "LLaVA-OneVision")
        super().__init__(vllm_config=vllm_config, prefix=prefix)
