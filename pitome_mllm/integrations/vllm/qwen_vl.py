"""vLLM's Qwen2.5-VL and Qwen3-VL, each image reduced after the patch merger as `pitome_mllm.patch` does in
transformers (Qwen3-VL's DeepStack features along).

Three parts count and place with the same plan (`pitome_mllm.models.vllm_qwen_vl.QwenVllmPlan`):

- prompt processing (`PitomeQwenMultiModalProcessor`, no weights): every ``<|image_pad|>``
  becomes the image's budget, `MergedGridBudget.kept_tokens` of its native count;
- the model (`PitomeQwenVL`): vLLM's tower and merger run unchanged
  (in calls of at most the encoder budget's patches), each image's tokens are reduced with the
  transformers adapter's code, counted against its placeholders (vLLM would drop a surplus
  silently), and carry the cells they hold to the positions;
- positions (M-RoPE): numbered at prompt processing with the text as the unpatched model numbers it
  (``get_mrope_input_positions``), then each image token moved to the cell it holds in the forward
  that places it (``embed_input_ids`` keeps the cells, ``forward`` moves the positions), for every
  prefill chunk. `pitome_mllm.models.vllm_qwen_vl` says why not through vLLM's pruning contract.

Imported by vLLM through the class path `pitome_mllm.integrations.vllm.register` registers.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from functools import cached_property

import torch
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.model_executor.models.qwen3_vl import (
    Qwen3VLDummyInputsBuilder,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMultiModalProcessor,
    Qwen3VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.utils import copy_mm_embedding_modality

from ...models.vllm_llava import check_embedding_counts
from ...models.vllm_qwen_vl import (
    FULL_CUDAGRAPH_REFUSED,
    PIPELINE_REFUSED,
    QWEN_VIDEO_REFUSED,
    ImageRun,
    QwenVllmPlan,
    append_cells,
    move_to_cells,
    reduced_mrope_positions,
    split_cells,
    tower_calls,
)
from . import pitome_settings

logger = logging.getLogger("vllm.pitome_mllm")


def config_plan(hf_config) -> QwenVllmPlan | None:
    """The `QwenVllmPlan` of the config's ``pitome`` settings, or None without them."""
    settings = pitome_settings(hf_config)
    return None if settings is None else QwenVllmPlan.from_config(hf_config, settings)


class PitomeQwenProcessingInfo:
    """vLLM's Qwen-VL prompt processing, counting each image's budget (profiling reads it too); a mixin."""

    @cached_property
    def pitome_plan(self) -> QwenVllmPlan | None:
        return config_plan(self.get_hf_config())

    def get_num_image_tokens(self, **kwargs) -> int:
        native = super().get_num_image_tokens(**kwargs)
        plan = self.pitome_plan
        return native if plan is None else plan.kept_tokens(native)


class PitomeQwenMultiModalProcessor:
    """vLLM's Qwen-VL prompt updates, each image's run of placeholders cut to its budget; a mixin."""

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        plan = self.info.pitome_plan
        if plan is None:
            return updates
        return [
            replace(update, replacement=_kept_replacement(update.replacement, plan))
            if update.modality == "image"
            else update
            for update in updates
        ]


def _kept_replacement(native_replacement, plan: QwenVllmPlan):
    """The image's native run of placeholders (``[id] * n``) cut to ``kept_tokens(n)``."""

    def replacement(item_idx: int) -> list[int]:
        native = native_replacement(item_idx)
        return native[: plan.kept_tokens(len(native))]

    return replacement


class PitomeQwenVL:
    """vLLM's Qwen-VL model; each image reduced to its budget when ``hf_config.pitome`` is set (a mixin
    before vLLM's class).

    Attributes:
        pitome_plan: the `QwenVllmPlan`, or None (then the model is vLLM's own).
        tower_patches_per_call: the most patches one tower call takes (the encoder budget, in patches).
    """

    family_name = "Qwen-VL"

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.pitome_plan = config_plan(self.config)
        self.tower_patches_per_call = None
        self._pitome_cells = None
        if self.pitome_plan is None:
            return
        if vllm_config.model_config.multimodal_config.get_limit_per_prompt("video") > 0:
            raise ValueError(QWEN_VIDEO_REFUSED)
        if vllm_config.parallel_config.pipeline_parallel_size > 1:
            raise ValueError(PIPELINE_REFUSED)
        cudagraph_mode = vllm_config.compilation_config.cudagraph_mode
        if cudagraph_mode is not None and cudagraph_mode.has_full_cudagraphs():
            raise ValueError(FULL_CUDAGRAPH_REFUSED.format(mode=cudagraph_mode.name))
        scheduler = vllm_config.scheduler_config
        budget_tokens = min(scheduler.max_num_encoder_input_tokens, scheduler.encoder_cache_size)
        # vLLM plans encoder calls by placeholders (merged); the tower sees merge_size**2 patches per native token.
        self.tower_patches_per_call = budget_tokens * self.pitome_plan.merge_size**2
        logger.info(
            "PiToMe in vLLM: %s images reduced after the patch merger (%s, %d tokens for a %dx%d image), "
            "at most %d patches per tower call",
            self.family_name,
            self.pitome_plan.method,
            self.pitome_plan.budget.num_visual_tokens,
            self.pitome_plan.budget.reference_size,
            self.pitome_plan.budget.reference_size,
            self.tower_patches_per_call,
        )

    # ------------------------------------------------------------ positions
    def get_mrope_input_positions(self, input_tokens, mm_features):
        plan = self.pitome_plan
        if plan is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        runs = []
        for feature in mm_features:
            if feature.modality != "image":
                raise ValueError(QWEN_VIDEO_REFUSED)
            grid = plan.merged_grid(feature.data["image_grid_thw"].data.tolist())
            runs.append(ImageRun(feature.mm_position.offset, grid, feature.mm_position.length))
        return reduced_mrope_positions(len(input_tokens), runs)

    def embed_input_ids(self, input_ids, multimodal_embeddings=None, *, is_multimodal=None, **kwargs):
        """The token embeddings, images placed; the cells each image token holds kept for `forward`."""
        self._pitome_cells = None
        if self.pitome_plan is None or not multimodal_embeddings:
            return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal, **kwargs)
        pieces = [split_cells(embeddings) for embeddings in multimodal_embeddings]
        self._pitome_cells = (is_multimodal, torch.cat([offsets for _, offsets in pieces], dim=1))
        tokens = [
            copy_mm_embedding_modality(embeddings, piece[0])
            for embeddings, piece in zip(multimodal_embeddings, pieces, strict=True)
        ]
        return super().embed_input_ids(input_ids, tokens, is_multimodal=is_multimodal, **kwargs)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        cells, self._pitome_cells = self._pitome_cells, None
        if cells is not None and inputs_embeds is not None:
            is_image, offsets = cells
            self.pitome_move_positions(positions, is_image, offsets)
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)

    def pitome_move_positions(self, positions, is_image, offsets) -> None:
        """Each image token of this forward to the cell it holds (`move_to_cells`, in place)."""
        move_to_cells(positions, is_image, offsets)

    # ------------------------------------------------------------ embeddings
    def embed_multimodal(self, **kwargs: object):
        plan = self.pitome_plan
        if plan is None:
            return super().embed_multimodal(**kwargs)
        inputs = self._parse_and_validate_multimodal_inputs(**kwargs)
        if inputs.get("video") is not None:
            raise ValueError(QWEN_VIDEO_REFUSED)
        image_input = inputs.get("image")
        if image_input is None:
            return []
        grids = image_input["image_grid_thw"].tolist()
        features = self._tower_features(image_input, grids)
        expected = [plan.kept_tokens(grid[0] * grid[1] * grid[2] // plan.merge_size**2) for grid in grids]
        reduced = [self.pitome_reduce(image, grid) for image, grid in zip(features, grids, strict=True)]
        check_embedding_counts([image.tokens for image in reduced], expected)
        return tuple(
            append_cells(torch.cat((image.tokens, *image.carried), dim=1), plan.merged_grid(grid), image.first_cells)
            for image, grid in zip(reduced, grids, strict=True)
        )

    def pitome_reduce(self, features: torch.Tensor, grid: list[int]):
        """One image's tower output reduced to its budget (`QwenVllmPlan.reduce`); DeepStack channels carried."""
        return self.pitome_plan.reduce(features, grid)

    def _tower_features(self, image_input, grids: list[list[int]]) -> list[torch.Tensor]:
        """Every image's tower output ``[n_i, C]``, the tower run on at most the encoder budget's patches."""
        if image_input["type"] != "pixel_values":
            return list(self._process_image_input(image_input))
        patches = [t * h * w for t, h, w in grids]
        bounds = torch.tensor([0, *patches]).cumsum(0).tolist()
        features: list[torch.Tensor] = []
        for group in tower_calls(patches, self.tower_patches_per_call):
            pixels = image_input["pixel_values"][bounds[group.start] : bounds[group.stop]]
            group_grids = image_input["image_grid_thw"][group]
            part = {"type": "pixel_values", "pixel_values": pixels, "image_grid_thw": group_grids}
            features.extend(self._process_image_input(part))
        return features


class PitomeQwen2_5_VLProcessingInfo(PitomeQwenProcessingInfo, Qwen2_5_VLProcessingInfo):
    pass


class PitomeQwen2_5_VLMultiModalProcessor(PitomeQwenMultiModalProcessor, Qwen2_5_VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    PitomeQwen2_5_VLMultiModalProcessor,
    info=PitomeQwen2_5_VLProcessingInfo,
    dummy_inputs=Qwen2_5_VLDummyInputsBuilder,
)
class PitomeQwen2_5_VLForConditionalGeneration(PitomeQwenVL, Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL with `PitomeQwenVL`."""

    family_name = "Qwen2.5-VL"


class PitomeQwen3VLProcessingInfo(PitomeQwenProcessingInfo, Qwen3VLProcessingInfo):
    pass


class PitomeQwen3VLMultiModalProcessor(PitomeQwenMultiModalProcessor, Qwen3VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    PitomeQwen3VLMultiModalProcessor,
    info=PitomeQwen3VLProcessingInfo,
    dummy_inputs=Qwen3VLDummyInputsBuilder,
)
class PitomeQwen3VLForConditionalGeneration(PitomeQwenVL, Qwen3VLForConditionalGeneration):
    """vLLM's Qwen3-VL with `PitomeQwenVL`: the DeepStack levels vLLM's tower appends to each token's channels
    follow the plan as carried features, as in transformers."""

    family_name = "Qwen3-VL"


__all__ = [
    "PitomeQwen2_5_VLForConditionalGeneration",
    "PitomeQwen2_5_VLMultiModalProcessor",
    "PitomeQwen2_5_VLProcessingInfo",
    "PitomeQwen3VLForConditionalGeneration",
    "PitomeQwen3VLMultiModalProcessor",
    "PitomeQwen3VLProcessingInfo",
    "PitomeQwenVL",
    "config_plan",
]
