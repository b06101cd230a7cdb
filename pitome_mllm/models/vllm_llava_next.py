"""The anyres budget for vLLM's own LLaVA-NeXT (``vllm.model_executor.models.llava_next``), from the config alone.

vLLM packs an image as transformers does: ``_merge_image_patch_embeddings`` lays the crops on their
grid, cuts the padding, appends a newline per row and puts the base crop first, giving
``B + U + rows`` tokens in transformers' order (the count vLLM's prompt processing expands
``<image>`` into). So the plugin merges where the transformers adapter does, after packing, with
the same code (`pitome_mllm.models.llava_next`): `AnyresPlan` counts each image's budget from
its original size before the encoder runs, and merges the packed tokens down to it.

Nothing here imports vLLM or reads a model: the plan is built from the Hugging Face config.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import PiToMeConfig
from ..geometry import TowerGeometry, check_image_size
from .llava_hf import config_geometry
from .llava_next import (
    AnyresLayout,
    LlavaNextAdapter,
    PackedMergeSettings,
    anyres_layout,
    check_packed_budget_settings,
    crop_keep_fraction,
    merge_packed_image,
    packed_budget,
    packed_merge_settings,
)
from .vllm_llava import check_vllm_config


@dataclass(frozen=True)
class AnyresPlan:
    """Per-image budgets and the packed merge of a LLaVA-NeXT config patched with ``config``.

    Attributes:
        crop_geometry: one native-size crop's tower geometry.
        pinpoints: the config's ``image_grid_pinpoints``.
        target_tokens, keep_fraction: the budget rule (`packed_budget`).
        merge_settings: the steps down to each part's share.
    """

    crop_geometry: TowerGeometry
    pinpoints: tuple[tuple[int, int], ...]
    target_tokens: int | None
    keep_fraction: float | None
    merge_settings: PackedMergeSettings

    @classmethod
    def from_config(cls, hf_config, config: PiToMeConfig) -> AnyresPlan:
        """The plan of a ``LlavaNextConfig`` patched with ``config``.

        Raises:
            ValueError: settings LLaVA-NeXT or vLLM cannot run (the messages `pitome_mllm.patch` gives).
        """
        check_vllm_config(config)
        LlavaNextAdapter.check_supported(config)
        check_packed_budget_settings(config)
        crop_geometry = config_geometry(hf_config)
        if crop_geometry.class_token != crop_geometry.drops_class_token:
            raise ValueError(
                f"vision_feature_select_strategy={hf_config.vision_feature_select_strategy!r} does not leave a "
                "whole token grid per crop with this tower"
            )
        return cls(
            crop_geometry=crop_geometry,
            pinpoints=tuple(tuple(pinpoint) for pinpoint in hf_config.image_grid_pinpoints),
            target_tokens=config.target_tokens,
            keep_fraction=crop_keep_fraction(crop_geometry, config, hf_config.vision_feature_layer),
            merge_settings=packed_merge_settings(config, crop_geometry.num_layers),
        )

    def layout_for_image(self, height: int, width: int) -> AnyresLayout:
        """What packing makes of an original ``height x width`` image (LLaVA-NeXT always cuts crops)."""
        geometry = self.crop_geometry
        crop = geometry.image_size
        base_tokens = geometry.grid_for_pixels(crop, crop).patches
        return anyres_layout(height, width, [list(p) for p in self.pinpoints], crop, geometry.patch_size, base_tokens)

    def max_unmerged_tokens(self) -> int:
        """The most tokens vLLM's own LLaVA-NeXT gives one image (at a pinpoint, as its profiling picks)."""
        return max(self.layout_for_image(height, width).unmerged_tokens for height, width in self.pinpoints)

    def visual_tokens_for_image(self, height: int, width: int) -> int:
        """Placeholders for an original ``height x width`` image: its budget, or the unpatched count."""
        check_image_size(height, width)
        layout = self.layout_for_image(height, width)
        budget = packed_budget(layout, self.target_tokens, self.keep_fraction)
        return layout.unmerged_tokens if budget is None else budget

    def merge_packed(self, packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """One image's packed tokens ``[B + U + rows, D]`` -> ``[visual_tokens_for_image(height, width), D]``.

        Raises:
            RuntimeError: the packing gave another count than the layout plans (vLLM's packing changed).
        """
        layout = self.layout_for_image(height, width)
        if packed.shape[0] != layout.unmerged_tokens:
            raise RuntimeError(
                f"vLLM's LLaVA-NeXT packed {packed.shape[0]} tokens for a {height}x{width} image, the planned "
                f"layout has {layout.unmerged_tokens}; its packing changed"
            )
        budget = packed_budget(layout, self.target_tokens, self.keep_fraction)
        if budget is None:
            return packed
        return merge_packed_image(packed, layout, budget, self.merge_settings)


__all__ = ["AnyresPlan"]
