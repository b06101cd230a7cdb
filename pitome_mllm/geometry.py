"""Token geometry and token counts of a vision tower, known before any model runs.

Pure arithmetic over a model's configuration and the merge schedule: no tensors, no models.
One image goes through four steps, each answered here once for every model family:

```
original image (height, width)
  │ ImageResize: the family's image processor rule        -> processed (height, width) in pixels
  ▼
PatchGrid (frames, rows, cols) of patch_size-px patches   -> TowerGeometry.grid_for_image
  ▼
tokens entering the tower (+ a class token where the tower has one)
  ▼ TowerBudget: the schedule of a `PiToMeConfig` (merges in the tower, the projector's budget)
visual tokens the language model receives (the image placeholders the processor emits)
```

A family's adapter (``pitome_mllm.models``) reads its model or its configuration and
builds the `TowerGeometry`; everything else asks it.

* LLaVA-1.5 (CLIP): the image processor resizes the shortest edge and centre-crops to the
  tower's native size (`ResizeAndCrop`), so every image becomes one 24 x 24 grid; the tower
  prepends a class token that ``vision_feature_select_strategy="default"`` drops.
* SigLIP towers: the same, without a class token.
* A tower whose grid depends on the image (Qwen2.5-VL / Qwen3-VL) is one more `ImageResize`:
  ``smart_resize`` rounds the original size to a multiple of ``patch_size * merge_size`` (28)
  with its area between ``min_pixels`` and ``max_pixels``; the grid is ``(t, h, w)`` of 14-px
  patches (``frames`` = 1 for a still image), there is no class token, and the 2 x 2 patch
  merger makes ``t * h * w / 4`` tokens: a ``PatchGrid`` per image and a count per image, with
  the same ``grid_for_image`` -> tokens -> budget chain as LLaVA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from .config import PiToMeConfig
from .schedule import LayerStep, plan_layers, solve_keep_ratio

# How every printed count of visual tokens counts (tables, JSON, figure titles, the demo): the tokens the
# language model receives per image, so a CLIP tower's class token (dropped before the projector) is not one.
VISUAL_TOKENS_NOTE = "visual tokens, class token excluded"


def check_image_size(height: int, width: int) -> tuple[int, int]:
    """``(height, width)`` of an image in pixels, checked.

    Raises:
        ValueError: a side that is not a positive integer (bools, floats and strings are refused).
    """
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"image {name} must be a positive integer number of pixels, got {value!r}")
        if value < 1:
            raise ValueError(f"image {name} must be a positive integer number of pixels, got {value}")
    return height, width


@dataclass(frozen=True)
class PatchGrid:
    """The patches an image becomes inside the tower: ``frames x rows x cols``.

    ``frames`` is 1 for a still image in every tower so far; towers with a temporal patch
    (Qwen-VL's videos) give more.
    """

    rows: int
    cols: int
    frames: int = 1

    @property
    def patches(self) -> int:
        return self.frames * self.rows * self.cols


class ImageResize(Protocol):
    """A family's resize rule: the ``(height, width)`` its image processor makes of an original image."""

    def __call__(self, height: int, width: int) -> tuple[int, int]: ...


@dataclass(frozen=True)
class ResizeAndCrop:
    """The CLIP / SigLIP image processors: resize, then (optionally) centre-crop.

    Attributes:
        shortest_edge: resize so that the shorter side has this many pixels, keeping the aspect
            ratio (the longer side truncated, as transformers does).
        size: ``(height, width)`` to resize to, ignoring the aspect ratio.
        crop: ``(height, width)`` of the centre crop (a smaller image is padded to it).

    With neither ``shortest_edge`` nor ``size`` the image keeps its size up to the crop.
    """

    shortest_edge: int | None = None
    size: tuple[int, int] | None = None
    crop: tuple[int, int] | None = None

    def resized(self, height: int, width: int) -> tuple[int, int]:
        """Size after the resize step (before the crop)."""
        if self.size is not None:
            return self.size
        if self.shortest_edge is None:
            return height, width
        short, long = min(height, width), max(height, width)
        new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
        return (new_short, new_long) if height <= width else (new_long, new_short)

    def __call__(self, height: int, width: int) -> tuple[int, int]:
        return self.crop if self.crop is not None else self.resized(height, width)

    @property
    def fixed_size(self) -> tuple[int, int] | None:
        """The one size every image comes out at, or None where it depends on the image."""
        return self.crop if self.crop is not None else self.size


@dataclass(frozen=True)
class SmartResize:
    """Qwen-VL's image processors (``smart_resize``): both sides a multiple of ``factor``, area bounded.

    Each side is rounded to the nearest multiple of ``factor`` (``patch_size * merge_size``: 28 for
    Qwen2.5-VL, 32 for Qwen3-VL); an area above ``max_pixels`` is scaled down (sides floored), one
    below ``min_pixels`` up (sides ceiled), keeping the aspect ratio as closely as the multiples allow.
    The same arithmetic as transformers' ``smart_resize``, so counts agree with the processor.

    Raises (on call):
        ValueError: an aspect ratio above 200, which the processor refuses too.
    """

    factor: int
    min_pixels: int
    max_pixels: int

    def __call__(self, height: int, width: int) -> tuple[int, int]:
        check_image_size(height, width)
        if max(height, width) / min(height, width) > 200:
            raise ValueError(
                f"a {height}x{width} image has an aspect ratio above 200, which the Qwen-VL processor refuses"
            )
        factor = self.factor
        rounded_height = round(height / factor) * factor
        rounded_width = round(width / factor) * factor
        if rounded_height * rounded_width > self.max_pixels:
            beta = math.sqrt((height * width) / self.max_pixels)
            rounded_height = max(factor, math.floor(height / beta / factor) * factor)
            rounded_width = max(factor, math.floor(width / beta / factor) * factor)
        elif rounded_height * rounded_width < self.min_pixels:
            beta = math.sqrt(self.min_pixels / (height * width))
            rounded_height = math.ceil(height * beta / factor) * factor
            rounded_width = math.ceil(width * beta / factor) * factor
        return rounded_height, rounded_width


@dataclass(frozen=True)
class MergedGridBudget:
    """Token counts of a tower whose merger turns each ``merge_size x merge_size`` block into one token.

    Qwen2.5-VL / Qwen3-VL: an original image is resized (`SmartResize`), cut into ``patch_size`` patches
    (a `PatchGrid`), and the patch merger gives ``patches / merge_size**2`` "native" tokens. The patch
    reduces each image's native tokens after the merger, per image:

    * ``keep_ratio`` r: ``ceil(r * n)`` of the image's ``n`` native tokens (one step, r in (0.5, 1]);
    * ``target_tokens`` K: at most K per image; an image with fewer native tokens keeps all of them;
    * both: the smaller of the two; neither: every native token.

    A pure function of the grid, so the processor's placeholders and the model's features agree
    before anything runs.

    Attributes:
        resize: the image processor's rule.
        patch_size, merge_size: the tower's patch side in pixels and the merger's block side in patches.
        keep_ratio, target_tokens: the budget (None: not set).
        reference_size: the side of the square image whose count is the family's
            ``num_visual_tokens`` (the grid depends on the image, so a reference is needed).
    """

    resize: ImageResize
    patch_size: int
    merge_size: int
    keep_ratio: float | None = None
    target_tokens: int | None = None
    reference_size: int = 448

    def grid_for_image(self, height: int, width: int) -> PatchGrid:
        """The patch grid of an original ``height x width`` image (a still image: one frame)."""
        resized_height, resized_width = self.resize(*check_image_size(height, width))
        return PatchGrid(resized_height // self.patch_size, resized_width // self.patch_size)

    def native_tokens(self, grid: PatchGrid) -> int:
        """Tokens the unpatched merger makes of ``grid``."""
        return grid.patches // (self.merge_size**2)

    def kept_tokens(self, native_tokens: int) -> int:
        """Tokens the language model receives for an image of ``native_tokens`` native tokens."""
        kept = native_tokens
        if self.keep_ratio is not None:
            # The tolerance keeps r * n that is an integer in exact arithmetic from rounding up by one.
            kept = min(kept, math.ceil(self.keep_ratio * native_tokens - 1e-9))
        if self.target_tokens is not None:
            kept = min(kept, self.target_tokens)
        return kept

    def visual_tokens_for_grid(self, grid: PatchGrid) -> int:
        return self.kept_tokens(self.native_tokens(grid))

    def visual_tokens_for_image(self, height: int, width: int) -> int:
        """Placeholders per original ``height x width`` image (the patched processor emits this many)."""
        return self.visual_tokens_for_grid(self.grid_for_image(height, width))

    @property
    def num_visual_tokens(self) -> int:
        """Visual tokens of the ``reference_size`` square image."""
        return self.visual_tokens_for_image(self.reference_size, self.reference_size)


@dataclass(frozen=True)
class TowerGeometry:
    """What the token counts of a vision tower depend on, read from a model or from its config alone.

    Attributes:
        num_layers: layers of the whole tower; the schedule's margins span all of them, also where a
            model builds only the layers it reads.
        last_layer: index of the encoder layer whose output the model reads.
        image_size, patch_size: the tower's native input size and patch size, in pixels.
        class_token: the tower prepends a class token (CLIP) or not (SigLIP, Qwen-VL).
        drops_class_token: the model drops the class token before the projector.
        resize: the family's rule from an original image to the pixels the tower sees; None: every
            image is brought to the native ``image_size x image_size`` (used where no image processor
            is known).
    """

    num_layers: int
    last_layer: int
    image_size: int
    patch_size: int
    class_token: bool
    drops_class_token: bool
    resize: ImageResize | None = None

    def processed_size(self, height: int, width: int) -> tuple[int, int]:
        """``(height, width)`` in pixels the tower sees for an original ``height x width`` image."""
        check_image_size(height, width)
        if self.resize is None:
            return self.image_size, self.image_size
        return self.resize(height, width)

    def grid_for_pixels(self, height: int, width: int) -> PatchGrid:
        """The patch grid of processed pixels (``pixel_values`` of ``height x width``)."""
        return PatchGrid(height // self.patch_size, width // self.patch_size)

    def grid_for_image(self, height: int, width: int) -> PatchGrid:
        """The patch grid of an original ``height x width`` image, after the family's resize rule."""
        return self.grid_for_pixels(*self.processed_size(height, width))

    def tokens_for_grid(self, grid: PatchGrid) -> int:
        """Tokens entering the tower for ``grid`` (class token included)."""
        return grid.patches + int(self.class_token)

    def tower_tokens(self, height: int, width: int) -> int:
        """Tokens inside the tower for processed pixels of ``height x width`` (class token included)."""
        return self.tokens_for_grid(self.grid_for_pixels(height, width))

    def image_tower_tokens(self, height: int, width: int) -> int:
        """Tokens inside the tower for an original ``height x width`` image (class token included)."""
        return self.tokens_for_grid(self.grid_for_image(height, width))

    @property
    def default_num_tokens(self) -> int:
        """Tokens inside the tower at the native size (class token included)."""
        return self.tower_tokens(self.image_size, self.image_size)

    @property
    def native_visual_tokens(self) -> int:
        """Visual tokens per image the projector receives from the unpatched tower at the native size."""
        return self.default_num_tokens - int(self.drops_class_token)


class TowerBudget:
    """Every token count of a tower patched with ``config``, known before any model runs.

    Needs no model, only its `TowerGeometry`, so that a serving engine's prompt processing (which
    holds no weights) counts placeholders with the same code the patched model merges with.

    Construction resolves the tower's keep ratio (solved from ``target_tokens`` when it is not
    given) and checks the budget at the native size.

    Raises:
        ValueError: a budget the tower cannot reach (the message names the numbers).
    """

    def __init__(self, geometry: TowerGeometry, config: PiToMeConfig) -> None:
        self.geometry = geometry
        self.config = config
        # Selection methods (and the mllm preset) choose at the projector; the tower stays unmerged.
        self.tower_method = "none" if config.selects_at_projector else config.method
        self._plans: dict[int, list[LayerStep]] = {}
        self.keep_ratio = self._resolve_keep_ratio()
        self.check(geometry.default_num_tokens)

    def _resolve_keep_ratio(self) -> float:
        config, geometry = self.config, self.geometry
        if config.method == "none" or config.selects_at_projector:
            return 1.0
        if config.keep_ratio is not None:
            return config.keep_ratio
        # target_tokens without keep_ratio: merge in the tower as far as possible
        # without going below the budget; the projector step trims the rest.
        available = geometry.native_visual_tokens
        if config.target_tokens > available:
            raise ValueError(
                f"target_tokens={config.target_tokens} is larger than the {available} visual tokens "
                "this model produces per image"
            )
        return keep_ratio_for_visual_tokens(geometry, config.target_tokens, self.tower_method, config.preset)

    def plan(self, num_tokens: int) -> list[LayerStep]:
        """Merge steps of layers ``0..last_layer`` for an input of ``num_tokens`` (class token, if any, included)."""
        if num_tokens not in self._plans:
            geometry = self.geometry
            self._plans[num_tokens] = plan_layers(
                num_tokens,
                geometry.num_layers,
                self.keep_ratio,
                method=self.tower_method,
                preset=self.config.preset,
                class_token=geometry.class_token,
                last_layer=geometry.last_layer,
                margin_start=self.config.margin_start,
                margin_span=self.config.margin_span,
                energy=self.config.energy,
            )
        return self._plans[num_tokens]

    def tower_output_tokens(self, num_tokens: int) -> int:
        """Visual tokens the projector receives per image (after the class token is dropped)."""
        return self.plan(num_tokens)[-1].tokens_out - int(self.geometry.drops_class_token)

    def visual_tokens_for(self, num_tokens: int) -> int:
        """Visual tokens the language model receives per image, for ``num_tokens`` tower inputs."""
        from_tower = self.tower_output_tokens(num_tokens)
        target = self.config.target_tokens
        return from_tower if target is None else min(target, from_tower)

    def check(self, num_tokens: int) -> None:
        """Raise ValueError when the budget cannot be met for ``num_tokens`` tower inputs."""
        target = self.config.target_tokens
        if target is None:
            return
        available = num_tokens - int(self.geometry.drops_class_token)
        if target > available:
            raise ValueError(
                f"target_tokens={target} is larger than the {available} visual tokens this model produces per image"
            )
        from_tower = self.tower_output_tokens(num_tokens)
        if from_tower < target:
            raise ValueError(
                f"keep_ratio={self.keep_ratio} leaves {from_tower} visual tokens, fewer than "
                f"target_tokens={target}; raise keep_ratio or leave it unset to have it chosen"
            )

    @property
    def num_visual_tokens(self) -> int:
        """Visual tokens per image the language model receives at the native image size."""
        return self.visual_tokens_for(self.geometry.default_num_tokens)

    def visual_tokens_for_pixels(self, height: int, width: int) -> int:
        """Placeholders per image for processed pixels (``pixel_values``) of ``height x width``."""
        return self.visual_tokens_for(self.geometry.tower_tokens(height, width))

    def visual_tokens_for_image(self, height: int, width: int) -> int:
        """Placeholders per original ``height x width`` image, after the family's resize rule.

        Raises:
            ValueError: a side that is not a positive integer.
        """
        return self.visual_tokens_for(self.geometry.image_tower_tokens(height, width))


def keep_ratio_for_visual_tokens(
    geometry: TowerGeometry, num_visual_tokens: int, method: str, preset: str, tolerance: float = 1e-7
) -> float:
    """The smallest keep ratio at which the tower leaves at least ``num_visual_tokens`` visual tokens.

    The bisection of `pitome_mllm.schedule.solve_keep_ratio` at the native size; the count it
    reaches may be larger where no ratio gives exactly ``num_visual_tokens``.
    """
    return solve_keep_ratio(
        geometry.default_num_tokens,
        geometry.num_layers,
        num_visual_tokens + int(geometry.drops_class_token),
        geometry.last_layer,
        method=method,
        preset=preset,
        class_token=geometry.class_token,
        tolerance=tolerance,
    )


__all__ = [
    "ImageResize",
    "MergedGridBudget",
    "SmartResize",
    "PatchGrid",
    "ResizeAndCrop",
    "TowerBudget",
    "TowerGeometry",
    "check_image_size",
    "keep_ratio_for_visual_tokens",
]
