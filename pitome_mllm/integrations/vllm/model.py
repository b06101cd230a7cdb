"""vLLM's LLaVA-1.5, with PiToMe in its vision tower when the config asks for it.

Two halves meet here, each counting tokens with the same `TowerBudget`:

- prompt processing (`PitomeLlavaProcessingInfo`, no weights): vLLM expands every ``<image>``
  into ``get_num_image_tokens`` placeholders before the encoder runs, so that count is the
  merged one;
- the model (`PitomeLlavaForConditionalGeneration`): `pitome_mllm.patch` puts the merges into
  vLLM's own CLIP layers and projector (`pitome_mllm.models.vllm_llava`), and every image's
  embeddings are counted against the placeholders before vLLM places them. vLLM itself drops
  surplus embeddings without a word, so a mismatch must be caught here.

Imported by vLLM through the class path `pitome_mllm.integrations.vllm.register` registers.
"""

from __future__ import annotations

import logging

from transformers import LlavaConfig
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaProcessingInfo,
    _build_llava_or_pixtral_hf_info,
    _build_llava_or_pixtral_hf_processor,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from ... import api
from ...geometry import TowerBudget
from ...merge.plan import cached_property  # functools' without its lock (3.11), which dynamo cannot trace
from ...models.vllm_llava import (
    check_embedding_counts,
    config_geometry,
    embed_in_chunks,
    images_per_tower_call,
    planned_budget,
)
from . import CONFIG_KEY, pitome_settings

# A child of vLLM's logger, so the line appears in vLLM's own log, in every process that builds the model.
logger = logging.getLogger("vllm.pitome_mllm")


class PitomeLlavaProcessingInfo(LlavaProcessingInfo):
    """vLLM's LLaVA prompt processing, counting the placeholders of a merged image."""

    @cached_property
    def pitome_budget(self) -> TowerBudget | None:
        """The token budget of the config's ``pitome`` settings, or None without them."""
        hf_config = self.get_hf_config()
        settings = pitome_settings(hf_config)
        return None if settings is None else planned_budget(hf_config, settings)

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        budget = self.pitome_budget
        if budget is None:
            return super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        # LLaVA-1.5's image processor resizes and crops every image to the tower's native size, so
        # vLLM's own count ignores the image size; the merged count is the native one too.
        return budget.num_visual_tokens


def build_processing_info(ctx) -> LlavaProcessingInfo:
    """vLLM's choice of processing info, with the PiToMe count for CLIP / SigLIP towers."""
    info = _build_llava_or_pixtral_hf_info(ctx)
    if isinstance(info, LlavaProcessingInfo):
        return PitomeLlavaProcessingInfo(ctx)
    if pitome_settings(ctx.get_hf_config(LlavaConfig)) is not None:
        raise ValueError(
            f"hf_overrides['{CONFIG_KEY}']: pitome_mllm merges in CLIP and SigLIP towers; this model's "
            f"{type(info).__name__} is for a Pixtral tower"
        )
    return info


@MULTIMODAL_REGISTRY.register_processor(
    _build_llava_or_pixtral_hf_processor,
    info=build_processing_info,
    dummy_inputs=LlavaDummyInputsBuilder,
)
class PitomeLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """vLLM's LLaVA-1.5; patched with `pitome_mllm.patch` when ``hf_config.pitome`` is set.

    Attributes:
        pitome_handle: the `PatchHandle` of the merge, or None (then the model is vLLM's own).
    """

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        settings = pitome_settings(self.config)
        # Hooks go in before the weights load; loading writes parameters only, never forwards.
        self.pitome_handle = None if settings is None else api.patch(self, None, config=settings)
        self.images_per_tower_call = None
        if self.pitome_handle is not None:
            scheduler = vllm_config.scheduler_config
            budget = min(scheduler.max_num_encoder_input_tokens, scheduler.encoder_cache_size)
            unmerged = config_geometry(self.config).native_visual_tokens
            self.images_per_tower_call = images_per_tower_call(budget, unmerged)
            logger.info(
                "PiToMe in vLLM: %d visual tokens per image (%r), at most %d images per tower call",
                self.pitome_handle.num_visual_tokens,
                self.pitome_handle,
                self.images_per_tower_call,
            )

    def embed_multimodal(self, **kwargs: object):
        handle = self.pitome_handle
        pixel_values = kwargs.get("pixel_values")
        if handle is None or pixel_values is None:
            return super().embed_multimodal(**kwargs)

        def embed(pixel_values):
            return super(PitomeLlavaForConditionalGeneration, self).embed_multimodal(
                **{**kwargs, "pixel_values": pixel_values}
            )

        embeddings = embed_in_chunks(embed, pixel_values, self.images_per_tower_call)
        check_embedding_counts(embeddings, handle.num_visual_tokens)
        return embeddings


__all__ = [
    "PitomeLlavaForConditionalGeneration",
    "PitomeLlavaProcessingInfo",
    "build_processing_info",
]
