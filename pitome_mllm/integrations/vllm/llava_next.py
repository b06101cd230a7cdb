"""vLLM's LLaVA-NeXT, with the anyres budget of ``docs/anyres.md`` when the config asks for PiToMe.

As for LLaVA-1.5, two halves count with the same plan (`AnyresPlan`):

- prompt processing (`PitomeLlavaNextProcessingInfo`, no weights) expands every ``<image>`` into
  the image's budget, a function of its original size alone;
- the model (`PitomeLlavaNextForConditionalGeneration`) runs the tower and projector unmerged, lets
  vLLM pack each image (crops, unpadding, newlines) and merges the packed tokens to that budget,
  with the transformers adapter's code. Every image's embeddings are counted against its
  placeholders before vLLM places them (it would drop a surplus silently).

Imported by vLLM through the class path `pitome_mllm.integrations.vllm.register` registers.
"""

from __future__ import annotations

import logging
from functools import cached_property

import torch
from vllm.model_executor.models.llava import LlavaDummyInputsBuilder
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from ...models.vllm_llava import check_embedding_counts, images_per_tower_call
from ...models.vllm_llava_next import AnyresPlan
from . import pitome_settings

logger = logging.getLogger("vllm.pitome_mllm")


def config_plan(hf_config) -> AnyresPlan | None:
    """The `AnyresPlan` of the config's ``pitome`` settings, or None without them."""
    settings = pitome_settings(hf_config)
    return None if settings is None else AnyresPlan.from_config(hf_config, settings)


class PitomeLlavaNextProcessingInfo(LlavaNextProcessingInfo):
    """vLLM's LLaVA-NeXT prompt processing, counting each image's budget."""

    @cached_property
    def pitome_plan(self) -> AnyresPlan | None:
        return config_plan(self.get_hf_config())

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        plan = self.pitome_plan
        if plan is None:
            return super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        return plan.visual_tokens_for_image(image_height, image_width)


@MULTIMODAL_REGISTRY.register_processor(
    LlavaNextMultiModalProcessor,
    info=PitomeLlavaNextProcessingInfo,
    dummy_inputs=LlavaDummyInputsBuilder,
)
class PitomeLlavaNextForConditionalGeneration(LlavaNextForConditionalGeneration):
    """vLLM's LLaVA-NeXT; each packed image merged to its budget when ``hf_config.pitome`` is set.

    Attributes:
        pitome_plan: the `AnyresPlan`, or None (then the model is vLLM's own).
    """

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.pitome_plan = config_plan(self.config)
        self.images_per_tower_call = None
        if self.pitome_plan is not None:
            scheduler = vllm_config.scheduler_config
            budget = min(scheduler.max_num_encoder_input_tokens, scheduler.encoder_cache_size)
            # vLLM plans encoder calls by merged tokens; the tower still sees every crop of every image.
            self.images_per_tower_call = images_per_tower_call(budget, self.pitome_plan.max_unmerged_tokens())
            crop = self.pitome_plan.crop_geometry.image_size
            logger.info(
                "PiToMe in vLLM: LLaVA-NeXT images merged after packing, %d visual tokens for a %dx%d image, "
                "at most %d images per tower call",
                self.pitome_plan.visual_tokens_for_image(crop, crop),
                crop,
                crop,
                self.images_per_tower_call,
            )

    def _merge_image_patch_embeddings(
        self, image_size: torch.Tensor, patch_embeddings: torch.Tensor, *, strategy: str
    ) -> torch.Tensor:
        packed = super()._merge_image_patch_embeddings(image_size, patch_embeddings, strategy=strategy)
        if self.pitome_plan is None:
            return packed
        height, width = (int(value) for value in image_size.tolist())
        return self.pitome_plan.merge_packed(packed, height, width)

    def embed_multimodal(self, **kwargs: object):
        plan = self.pitome_plan
        pixel_values, image_sizes = kwargs.get("pixel_values"), kwargs.get("image_sizes")
        if plan is None or pixel_values is None or image_sizes is None:
            return super().embed_multimodal(**kwargs)
        per_call = self.images_per_tower_call
        embeddings = []
        for start in range(0, len(pixel_values), per_call):
            chunk = slice(start, start + per_call)
            chunk_kwargs = {**kwargs, "pixel_values": pixel_values[chunk], "image_sizes": image_sizes[chunk]}
            embeddings.extend(super().embed_multimodal(**chunk_kwargs))
        expected = [plan.visual_tokens_for_image(int(h), int(w)) for h, w in image_sizes.tolist()]
        check_embedding_counts(embeddings, expected)
        return embeddings


__all__ = ["PitomeLlavaNextForConditionalGeneration", "PitomeLlavaNextProcessingInfo", "config_plan"]
