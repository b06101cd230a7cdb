"""The adapter contract: what every model family implements, and what the rest of the package may ask.

An adapter class knows one family's attribute paths. `pitome_mllm.models.registry` finds
the class for a model (`ModelAdapter.matches`); `pitome_mllm.patch` builds it, which
validates and plans without touching the model, then calls `install` (and the handle
`remove`). Tools that measure or show a model, patched or not, ask the class for the
model's `ModelParts` instead of reading attributes themselves.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import PiToMeConfig
from ..geometry import ImageResize, PatchGrid, TowerGeometry
from ..hooks.tower import PatchState
from ..schedule import LayerStep


@dataclass(frozen=True)
class ModelParts:
    """The pieces of a multimodal model the tools work with, found by its adapter.

    Attributes:
        tower: the vision encoder (a transformers ``CLIPVisionModel`` or
            ``SiglipVisionModel``); its parameters' device and dtype are the images'.
        projector: the module mapping the selected vision features to the LLM width.
        language_model: the decoder the visual tokens go into (None where the family
            does not expose one).
        encoder_layers: the vision encoder's layers, in order.
        feature_layer: the hidden-state index the model reads (``hidden_states[i]`` is
            the output of encoder layer ``i - 1``; negative counts from the end).
        last_layer: the index of the encoder layer whose output that is.
        drops_class_token: the model drops the class token before the projector.
        encode_images: ``pixel_values -> [features of each image]`` as the model computes them
            for the language model (vision tower, feature selection, projector stage).
        vision_hidden_states: ``pixel_values -> (every hidden state of the tower)`` (index 0:
            embeddings; ``l + 1``: output of layer ``l``), as the model's own call computes them.
        image_feature_owner: the module whose ``encode_images`` call a forward makes (a
            timer may shadow `image_feature_method` on it), or None.
        image_feature_method: the name of that method on ``image_feature_owner``.
    """

    tower: nn.Module
    projector: nn.Module
    language_model: nn.Module | None
    encoder_layers: nn.ModuleList
    feature_layer: int
    last_layer: int
    drops_class_token: bool
    encode_images: Callable[..., list]
    vision_hidden_states: Callable[[torch.Tensor], tuple] | None = None
    image_feature_owner: nn.Module | None = None
    image_feature_method: str | None = None

    @property
    def vision_dtype(self) -> torch.dtype:
        """dtype of the vision tower's weights, which pixel values must match (the LLM may be quantised)."""
        return next(self.tower.parameters()).dtype

    @property
    def vision_device(self) -> torch.device:
        return next(self.tower.parameters()).device


class ModelAdapter(ABC):
    """One model family behind the patch API.

    Construction (``Adapter(model, processor, config)``) validates the model and the config
    and plans every token count without changing anything; `install` changes the model
    (and processor) and `remove` undoes exactly what `install` did.

    Attributes every adapter sets in ``__init__``:
        model, processor, config: what it patches, with which settings.
        state: the `PatchState` its hooks share (trace, final map and sizes, observers).
        layers: the vision encoder layers (the handle checks none is already patched).
        default_num_tokens: tower tokens of one image at the model's native size.
        tower_keep_ratio: the keep ratio the tower merges with (1.0: not at all).
    """

    family: ClassVar[str]
    supported: ClassVar[str]
    # Whether the adapter can put proportional attention into the language model (`llm_prop_attn`).
    supports_llm_prop_attn: ClassVar[bool] = False
    # Whether the prompt's image placeholders come from the processor (so patching without it
    # leaves the user to emit the merged count); False where the model counts features itself.
    processor_counts_placeholders: ClassVar[bool] = True

    model: nn.Module
    processor: Any
    config: PiToMeConfig
    state: PatchState
    layers: nn.ModuleList
    default_num_tokens: int
    tower_keep_ratio: float

    @classmethod
    @abstractmethod
    def matches(cls, model: nn.Module) -> bool:
        """Whether ``model`` belongs to this family (must not import optional packages)."""

    @classmethod
    @abstractmethod
    def parts(cls, model: nn.Module) -> ModelParts:
        """The `ModelParts` of a model of this family, patched or not."""

    @classmethod
    @abstractmethod
    def geometry(cls, parts: ModelParts, resize: ImageResize | None = None) -> TowerGeometry:
        """The token geometry of the model's tower (anyres families: of one crop), from its parts alone.

        ``resize``: the processor's rule from an original image to the tower's pixels (None: the
        tower's native size). What every count of the family is built on.
        """

    @abstractmethod
    def plan(self, num_tokens: int) -> list[LayerStep]:
        """Merge steps of the tower layers the model reads, for ``num_tokens`` tower inputs."""

    @property
    @abstractmethod
    def num_visual_tokens(self) -> int:
        """Visual tokens per image the language model receives at the native image size."""

    @abstractmethod
    def image_grids(self, height: int, width: int) -> tuple[PatchGrid, ...]:
        """The patch grid(s) the tower sees for one original ``height x width`` image.

        One grid for LLaVA-1.5 (the processed image) and for a Qwen-VL tower (``t x h x w``);
        LLaVA-NeXT: the base crop's grid, then the grid its high-resolution crops tile.
        """

    @abstractmethod
    def visual_tokens_for_image(self, height: int, width: int) -> int:
        """Placeholders the prompt needs for one original (unprocessed) image of ``height x width`` pixels.

        The family applies its own resize rule (the processor's), so the answer is the count the
        patched processor emits. Raises ValueError for a side that is not a positive integer.
        """

    def record_merges(self, enabled: bool) -> None:
        """Keep every tower step's `Merge` in the trace (families whose tower is not merged: nothing)."""
        del enabled  # overridden by adapters whose tower merges

    @abstractmethod
    def install(self) -> None:
        """Put the hooks (and processor changes) in; on failure leave the model as it was."""

    @abstractmethod
    def remove(self) -> None:
        """Undo `install` exactly; safe to call after a partial install."""


__all__ = ["ModelAdapter", "ModelParts"]
