"""What the tools (profiler, merge maps, loading) need to know about a Qwen-VL model, read here.

Tools stay family-agnostic: they ask these functions, which answer for Qwen2.5-VL / Qwen3-VL and
give the neutral answer (None, ``{}``, False) for every other family.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..geometry import PatchGrid
from .qwen_vl import (
    QWEN_VL_CLASSES,
    REFERENCE_IMAGE_SIZE,
    _pieces,
    default_resize,
    image_processor_resize,
    matches,
    qwen_core,
)

# ``model_type`` of the checkpoints the adapter patches (config.json).
QWEN_VL_MODEL_TYPES = tuple(QWEN_VL_CLASSES)


def is_qwen_vl(model: nn.Module) -> bool:
    """A transformers Qwen2.5-VL / Qwen3-VL model (the adapter's own test)."""
    return matches(model)


def is_qwen_vl_checkpoint(folder: str | Path) -> bool:
    """``folder`` holds a saved Qwen2.5-VL / Qwen3-VL model (its ``config.json`` says so)."""
    config = Path(folder).expanduser() / "config.json"
    if not config.is_file():
        return False
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError):
        return False
    return model_type in QWEN_VL_MODEL_TYPES


def reference_image_size(model: nn.Module) -> int | None:
    """The square image side whose count is ``handle.num_visual_tokens`` where the grid depends on the image
    (Qwen-VL: 448); None for towers that bring every image to one size."""
    return REFERENCE_IMAGE_SIZE if is_qwen_vl(model) else None


def reference_grid(model: nn.Module, processor=None) -> PatchGrid | None:
    """The patch grid of the `reference_image_size` square under the processor's pixel limits (Qwen-VL;
    the released defaults without a processor); None for towers that bring every image to one size."""
    if not is_qwen_vl(model):
        return None
    vision_config = qwen_core(model).config.vision_config
    factor = vision_config.patch_size * vision_config.spatial_merge_size
    image_processor = getattr(processor, "image_processor", None)
    resize = image_processor_resize(image_processor, factor) if image_processor is not None else None
    height, width = (resize or default_resize(vision_config))(REFERENCE_IMAGE_SIZE, REFERENCE_IMAGE_SIZE)
    return PatchGrid(height // vision_config.patch_size, width // vision_config.patch_size)


def vision_tower_sizes(model: nn.Module) -> dict[str, int] | None:
    """``hidden``, ``intermediate``, ``layers``, ``heads`` and ``patch_size`` of a Qwen-VL tower (its config names
    them ``depth`` / ``num_heads``, with no ``num_hidden_layers`` alias before transformers 5.2x); None for other
    families."""
    if not is_qwen_vl(model):
        return None
    vision_config = qwen_core(model).config.vision_config
    return {
        "hidden": vision_config.hidden_size,
        "intermediate": vision_config.intermediate_size,
        "layers": vision_config.depth,
        "heads": vision_config.num_heads,
        "patch_size": vision_config.patch_size,
    }


def image_encoding_kwargs(model: nn.Module, inputs: dict) -> dict:
    """The processor outputs besides ``pixel_values`` that the model's image encoding needs (Qwen-VL: the grids)."""
    if is_qwen_vl(model) and "image_grid_thw" in inputs:
        return {"image_grid_thw": inputs["image_grid_thw"]}
    return {}


def spatial_merge_size(model: nn.Module) -> int:
    """Patches per side that become one language-model token (Qwen-VL's patch merger: 2; otherwise 1)."""
    if not is_qwen_vl(model):
        return 1
    return int(qwen_core(model).config.vision_config.spatial_merge_size)


def cell_pixels(model: nn.Module) -> int:
    """Side in processed pixels of one merged-grid cell (Qwen-VL: ``patch_size * spatial_merge_size``).

    Raises:
        ValueError: not a Qwen-VL model.
    """
    if not is_qwen_vl(model):
        raise ValueError(f"{type(model).__name__} has no merged grid (only Qwen2.5-VL / Qwen3-VL models do)")
    vision_config = qwen_core(model).config.vision_config
    return int(vision_config.patch_size * vision_config.spatial_merge_size)


def encoded_tokens_per_image(model: nn.Module, output) -> list[int] | None:
    """Tokens per image in an image-encoding output of a Qwen-VL model (its reduced per-image features);
    None for other families (their projector's output says it)."""
    if not is_qwen_vl(model):
        return None
    features, _ = _pieces(output)
    return [int(feature.shape[0]) for feature in features]


def decode_position_ids(model: nn.Module, attention_mask: torch.Tensor) -> torch.Tensor | None:
    """``[3, B, 1]`` M-RoPE positions of the one new token of a hand-written cached decode step (Qwen-VL);
    None for other families (their forward numbers the token itself).

    ``generate`` slices the positions it computes; a plain ``model(input_ids=[B, 1], attention_mask=[B, L + 1],
    cache=...)`` call must pass them: the text position after the prompt, ``L``, plus the ``rope_deltas`` the
    prefill stored (the model's rule for rows without padding, on every supported transformers release).
    """
    if not is_qwen_vl(model):
        return None
    deltas = qwen_core(model).rope_deltas  # [B, 1]
    if deltas is None:
        raise ValueError("a Qwen-VL decode step needs the rope_deltas of a prefill forward; run the prompt first")
    new_position = attention_mask.long().sum(dim=-1, keepdim=True) - 1  # [B, 1]
    return (new_position + deltas.to(new_position.device)).unsqueeze(0).expand(3, -1, -1)


@dataclass(frozen=True)
class ImageCells:
    """One image's merge map on its merged grid, as the last patched image encoding decided it.

    Attributes:
        grid: ``(t, h, w)`` merged-grid cells (``t`` frames of ``h x w``).
        cell_tokens: ``[t, h, w]`` the kept token holding each cell, ``-1`` where the cell was dropped.
        first_cells: ``[K]`` the raster index of the first cell of each kept token (its M-RoPE position).
    """

    grid: tuple[int, int, int]
    cell_tokens: torch.Tensor
    first_cells: torch.Tensor

    @property
    def kept_tokens(self) -> int:
        return int(self.first_cells.shape[0])


def last_image_cells(handle) -> list[ImageCells]:
    """The merge map of every image of the last encoding a patched Qwen-VL model made (`ImageCells` each).

    Raises:
        ValueError: ``handle`` does not patch a Qwen-VL model, or no image was encoded since patching.
    """
    adapter = handle._adapter
    stage = getattr(adapter, "stage", None)
    plan = getattr(stage, "last_plan", None)
    if stage is None or not hasattr(stage, "last_plan"):
        raise ValueError(f"the {handle.family} adapter keeps no merged-grid plan (only Qwen-VL models have one)")
    if plan is None:
        raise ValueError("no image has been encoded since the model was patched: run the model on an image first")
    cells = []
    for grid, first, tokens in zip(plan.grids, plan.first_cells, plan.cell_tokens, strict=True):
        cells.append(ImageCells(grid, tokens.detach().cpu().view(*grid), first.detach().cpu()))
    return cells


__all__ = [
    "QWEN_VL_MODEL_TYPES",
    "ImageCells",
    "cell_pixels",
    "decode_position_ids",
    "encoded_tokens_per_image",
    "image_encoding_kwargs",
    "is_qwen_vl",
    "is_qwen_vl_checkpoint",
    "last_image_cells",
    "reference_grid",
    "reference_image_size",
    "spatial_merge_size",
    "vision_tower_sizes",
]
