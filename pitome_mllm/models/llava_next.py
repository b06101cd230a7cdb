"""Adapter for transformers' anyres models: LLaVA-NeXT and LLaVA-OneVision (``*ForConditionalGeneration``, ``*Model``).

LLaVA-NeXT cuts an image into a base crop (the whole image resized) and a grid of
high-resolution crops, runs the tower on all crops as one batch, and then
``pack_image_features`` lays each crop's tokens back onto the crop grid, cuts off
the rows or columns that only hold padding ("unpad") and appends a learned
newline token after every row of the unpadded grid. That spatial step needs every
crop's full ``side x side`` token grid, which merged tokens no longer form.

So this adapter leaves the tower alone and merges **after** packing, once per
image, to a global budget ``K`` that is a pure function of the image size (so the
processor can emit it before the model runs):

* ``B`` base tokens, ``U = rows x cols`` unpadded grid tokens and ``rows`` newlines
  come out of ``pack_image_features`` (``B + U + rows`` tokens unpatched);
* the newlines are dropped except the last one, which still closes the image as in
  training (a row separator means nothing once rows are merged away);
* the other ``K - 1`` tokens are split between base and grid in proportion to
  ``B : U`` (both compressed by the same factor), and each part is merged on its
  own with PiToMe (or ToMe) steps on the projected features down to its share;
  the grid is merged as one set, so merges may cross crop borders and PiToMe
  spends the budget where the content is least redundant.

``target_tokens`` gives ``K`` directly; ``keep_ratio`` gives ``K`` as the
LLaVA-1.5 tower schedule would compress one crop, applied to ``B + U``. A budget
at least the unpatched count leaves the image untouched (bit-identical). See
``docs/anyres.md`` for a worked example.

OneVision packs the same way with two differences this adapter follows: a grid of
more than ``N`` crops' worth of tokens is resized down (``vision_aspect_ratio=
"anyres_max_N"``) before the newlines are added, and an image that shares its
prompt with other images goes in as its base crop only (base + one newline).
Videos take another path (``get_video_features``) and are left unmerged.
Tested against transformers 5.24.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..config import PRESETS, PiToMeConfig
from ..geometry import ImageResize, PatchGrid, TowerBudget, TowerGeometry, check_image_size
from ..hooks.base import AttributeOverrides, Hook, ProcessorOverrides
from ..hooks.state import PatchState
from ..merge.budget import StepParams, merge_to_budget_with
from ..merge.plan import to_raster_order
from ..methods import TOWER, method_of_preset, method_spec, methods_where
from ..schedule import LayerStep, plan_layers, projector_margin
from .clip_tower import parts_geometry
from .compat import transformers_version_text
from .llava_hf import PlaceholderCheck, llava_core, llava_parts
from .protocol import ModelAdapter, ModelParts
from .siglip import tower_has_class_token

FAMILY = "llava_next"
SUPPORTED = (
    "transformers LlavaNextForConditionalGeneration / LlavaNextModel and LlavaOnevisionForConditionalGeneration / "
    "LlavaOnevisionModel (anyres) with a CLIP or SigLIP tower, method pitome / tome / none, merged after "
    "pack_image_features to a per-image budget"
)
_PROCESSOR_METHODS = ("replace_image_token", "_get_num_multimodal_tokens")
_NUMBER_OF_FEATURES_4X = "_get_number_of_features"
_PACK = "pack_image_features"
# One newline token closes the image after merging (see the module docstring).
KEPT_NEWLINES = 1


def is_onevision(model: nn.Module) -> bool:
    from transformers import LlavaOnevisionForConditionalGeneration, LlavaOnevisionModel

    return isinstance(model, (LlavaOnevisionForConditionalGeneration, LlavaOnevisionModel))


def matches(model: nn.Module) -> bool:
    from transformers import (
        LlavaNextForConditionalGeneration,
        LlavaNextModel,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionModel,
    )

    families = (LlavaNextForConditionalGeneration, LlavaNextModel)
    return isinstance(model, (*families, LlavaOnevisionForConditionalGeneration, LlavaOnevisionModel))


# ------------------------------------------------------------------------------------------ layout


@dataclass(frozen=True)
class AnyresLayout:
    """What ``pack_image_features`` produces for one image, before merging.

    Attributes:
        base_tokens: ``B``, tokens of the base crop.
        grid_rows, grid_cols: the unpadded (for OneVision: also downsampled) token grid of
            the high-resolution crops; ``0 x 0`` when the image is not cut into crops
            (OneVision's multi-image prompts).
        crop_grid: ``(crops down, crops across)``.
    """

    base_tokens: int
    grid_rows: int
    grid_cols: int
    crop_grid: tuple[int, int]

    @property
    def newlines(self) -> int:
        """One per grid row; a base crop alone is closed by a single newline."""
        return self.grid_rows if self.grid_tokens else 1

    @property
    def grid_tokens(self) -> int:
        return self.grid_rows * self.grid_cols

    @property
    def unmerged_tokens(self) -> int:
        """``B + U + rows``: the unpatched count (one newline per grid row)."""
        return self.base_tokens + self.grid_tokens + self.newlines

    @property
    def max_merged_tokens(self) -> int:
        """``B + U + 1``: the most tokens a merged image can have (newlines collapsed to one)."""
        return self.base_tokens + self.grid_tokens + KEPT_NEWLINES


def unpadded_shape(height: int, width: int, rows: int, cols: int) -> tuple[int, int]:
    """The token grid left after LLaVA-NeXT cuts off the padding of a ``height x width`` image.

    The image was resized to fit a ``rows x cols`` token grid keeping its aspect ratio
    and padded symmetrically; the same float arithmetic as the model decides how many
    padding rows (or columns) there are, so the counts agree token for token.
    """
    if width / height > cols / rows:
        new_rows = int(round(height * (cols / width), 7))
        padding = (rows - new_rows) // 2
        return rows - 2 * padding, cols
    new_cols = int(round(width * (rows / height), 7))
    padding = (cols - new_cols) // 2
    return rows, cols - 2 * padding


def downsampled_shape(rows: int, cols: int, side: int, max_crops: int) -> tuple[int, int]:
    """OneVision's ``anyres_max_N``: a grid of more than ~``N`` crops' worth of tokens is resized down."""
    ratio = math.sqrt(rows * cols / (max_crops * side**2))
    if ratio > 1.1:
        return int(rows // ratio), int(cols // ratio)
    return rows, cols


def anyres_layout(
    height: int,
    width: int,
    pinpoints: list,
    crop_size: int,
    patch_size: int,
    base_tokens: int,
    max_crops: int | None = None,
    cropped: bool = True,
) -> AnyresLayout:
    """The `AnyresLayout` of an original ``height x width`` image.

    ``max_crops``: OneVision's ``anyres_max_N`` (None for LLaVA-NeXT); ``cropped=False``: the
    image is fed as the base crop only (OneVision with several images in one prompt).
    """
    from transformers.image_processing_utils import select_best_resolution

    if not cropped:
        return AnyresLayout(base_tokens, 0, 0, (0, 0))
    best_height, best_width = select_best_resolution([height, width], pinpoints)
    crops_down, crops_across = best_height // crop_size, best_width // crop_size
    side = crop_size // patch_size
    rows, cols = unpadded_shape(height, width, crops_down * side, crops_across * side)
    if max_crops is not None:
        rows, cols = downsampled_shape(rows, cols, side, max_crops)
    return AnyresLayout(base_tokens, rows, cols, (crops_down, crops_across))


def split_budget(budget: int, layout: AnyresLayout) -> tuple[int, int]:
    """``(base share, grid share)`` of ``budget - 1`` tokens, proportional to ``B : U``.

    Each share is at least 1 and at most its part's size. Requires
    ``3 <= budget <= layout.max_merged_tokens``.
    """
    visible = budget - KEPT_NEWLINES
    base, grid = layout.base_tokens, layout.grid_tokens
    if grid == 0:
        return visible, 0
    base_share = round(visible * base / (base + grid))
    base_share = min(max(base_share, 1, visible - grid), base, visible - 1)
    return base_share, visible - base_share


def max_crops_of(vision_aspect_ratio: str | None) -> int | None:
    """``N`` of OneVision's ``"anyres_max_N"``; None for LLaVA-NeXT (no downsampling)."""
    if vision_aspect_ratio is None:
        return None
    prefix = "anyres_max_"
    if not vision_aspect_ratio.startswith(prefix) or not vision_aspect_ratio[len(prefix) :].isdigit():
        raise ValueError(f"unsupported vision_aspect_ratio={vision_aspect_ratio!r}; supported: 'anyres_max_<N>'")
    return int(vision_aspect_ratio[len(prefix) :])


def images_in_prompt(batch_num_images, image_idx: int) -> int:
    """How many images share the prompt of image ``image_idx`` (1 when the processor does not say)."""
    if batch_num_images is None:
        return 1
    first = 0
    for count in batch_num_images:
        if image_idx < first + count:
            return int(count)
        first += count
    return 1


def check_packed_budget_settings(config: PiToMeConfig) -> None:
    """Refuse settings that do not give one budget per image (the anyres rule of ``docs/anyres.md``)."""
    if config.keep_ratio is not None and config.target_tokens is not None:
        raise ValueError(
            "LLaVA-NeXT merges once, after packing, to one budget per image: give keep_ratio "
            f"({config.keep_ratio}) or target_tokens ({config.target_tokens}), not both"
        )
    if config.target_tokens is not None and config.target_tokens < 2 + KEPT_NEWLINES:
        raise ValueError(
            f"target_tokens={config.target_tokens} is too small for LLaVA-NeXT: at least one base token, "
            "one grid token and the closing newline (>= 3)"
        )


def crop_keep_fraction(crop_geometry: TowerGeometry, config: PiToMeConfig, feature_layer) -> float | None:
    """The fraction of one crop's tokens the LLaVA-1.5 tower schedule keeps at ``keep_ratio`` (None: not used).

    ``c / side^2`` of ``docs/anyres.md``, with ``c`` the tokens one native-size crop keeps.

    Raises:
        ValueError: ``keep_ratio`` with several feature layers (the schedule reads one).
    """
    if config.keep_ratio is None or config.method == "none" or config.keep_ratio >= 1.0:
        return None
    if not (isinstance(feature_layer, int) and not isinstance(feature_layer, bool)):
        raise ValueError(
            f"keep_ratio on LLaVA-NeXT follows the tower schedule of one feature layer, but "
            f"vision_feature_layer={feature_layer!r}; use target_tokens"
        )
    default_num_tokens = crop_geometry.default_num_tokens
    kept = TowerBudget(crop_geometry, config).tower_output_tokens(default_num_tokens)
    return kept / (default_num_tokens - int(crop_geometry.class_token))


def packed_budget(layout: AnyresLayout, target_tokens: int | None, keep_fraction: float | None) -> int | None:
    """Tokens the LLM receives for ``layout``; None leaves the image unmerged.

    ``target_tokens`` gives the budget directly; otherwise ``keep_fraction`` (`crop_keep_fraction`) of
    ``B + U`` plus the closing newline; neither: unmerged.
    """
    if target_tokens is not None:
        requested = target_tokens
    elif keep_fraction is not None:
        requested = round(keep_fraction * (layout.base_tokens + layout.grid_tokens)) + KEPT_NEWLINES
    else:
        return None
    if requested >= layout.unmerged_tokens:
        return None
    return max(min(requested, layout.max_merged_tokens), 2 + KEPT_NEWLINES)


# ------------------------------------------------------------------------------------------ merging


@dataclass(frozen=True)
class PackedMergeSettings:
    """Attributes:
    step: the merge steps down to each part's share of the budget (method ``"pitome"`` or ``"tome"``).
    keep_order: hand the merged tokens on in reading order.
    """

    step: StepParams
    keep_order: bool


def packed_merge_settings(config: PiToMeConfig, num_layers: int) -> PackedMergeSettings:
    """The packed merge's steps for ``config`` on a tower of ``num_layers`` layers."""
    return PackedMergeSettings(
        step=StepParams(
            # The packed merge uses the method's own algorithm; "none" trims with PiToMe.
            method=config.method if method_spec(config.method).merges_in_tower else "pitome",
            margin=projector_margin(num_layers, config.margin_start, config.margin_span),
            alpha=config.alpha,
            energy=config.resolved_energy,
            reduce=config.reduce,
        ),
        keep_order=config.keep_order,
    )


def merge_to(features: torch.Tensor, keep: int, settings: PackedMergeSettings) -> torch.Tensor:
    """Merge ``features`` (``[n, D]``) down to ``[keep, D]`` with steps of at most ``n // 2``."""
    x = features.unsqueeze(0)
    num_tokens = x.shape[1]
    size = torch.ones(1, num_tokens, 1, device=x.device)
    token_map = torch.arange(num_tokens, device=x.device).unsqueeze(0)
    x, size, token_map = merge_to_budget_with(settings.step, x, size, token_map, keep)
    if settings.keep_order and x.shape[1] < num_tokens:
        # Back to reading order (by each group's first patch), as LLaVA-NeXT lays tokens out.
        x, size, token_map = to_raster_order(x, size, token_map)
    return x.squeeze(0)


def merge_packed_image(
    packed: torch.Tensor, layout: AnyresLayout, budget: int, settings: PackedMergeSettings
) -> torch.Tensor:
    """One image's packed features ``[B + U + rows, D]`` -> ``[budget, D]``: base, grid, last newline."""
    base = packed[: layout.base_tokens]
    newline = packed[-1:]
    if layout.grid_tokens == 0:
        return torch.cat((merge_to(base, budget - KEPT_NEWLINES, settings), newline))
    rows_with_newline = packed[layout.base_tokens :].view(layout.grid_rows, layout.grid_cols + 1, -1)
    grid = rows_with_newline[:, :-1].reshape(layout.grid_tokens, -1)
    base_share, grid_share = split_budget(budget, layout)
    return torch.cat((merge_to(base, base_share, settings), merge_to(grid, grid_share, settings), newline))


# ------------------------------------------------------------------------------------------ adapter


class LlavaNextAdapter(ModelAdapter):
    """Merges LLaVA-NeXT's packed image features to a per-image budget; patches the processor's count.

    The tower is left unmerged (the packing needs whole crops), so the patch state holds
    no tower trace; the merge to the budget is `merge_to_budget`, the projector stage's.
    """

    family = FAMILY
    supported = SUPPORTED
    # The packing needs whole crops: only methods planned in the tower (merging after packing) run here.
    methods = methods_where(stage=TOWER)
    presets = tuple(preset for preset in PRESETS if method_of_preset(preset) is None)
    merge_sites = ("packed",)
    display_name = "LLaVA-NeXT"
    limits = (
        "it merges once, after pack_image_features, on whole crops: no selection by class-token attention "
        "at the read layer of a LLaVA-1.5 tower"
    )
    matches = staticmethod(matches)

    @classmethod
    def parts(cls, model: nn.Module) -> ModelParts:
        return llava_parts(model, cls.supported, several_layers=True)

    @classmethod
    def geometry(cls, parts: ModelParts, resize: ImageResize | None = None) -> TowerGeometry:
        """The geometry of one crop: a native-size tower image (anyres resizes each crop itself)."""
        return parts_geometry(parts, resize)

    def __init__(self, model: nn.Module, processor, config: PiToMeConfig) -> None:
        super().__init__(model, processor, config)
        self.llava = llava_core(model)
        llava_config = self.llava.config
        check_packed_budget_settings(config)
        parts = self.parts(model)
        strategy = llava_config.vision_feature_select_strategy
        self.vision_tower = parts.tower
        class_token = tower_has_class_token(self.vision_tower)
        if class_token != parts.drops_class_token:
            allowed = "'default'" if class_token else "'full'"
            raise ValueError(
                f"vision_feature_select_strategy={strategy!r} does not leave a whole token grid per crop with "
                f"{type(self.vision_tower).__name__}; supported with this tower: {allowed}"
            )
        self.layers = parts.encoder_layers
        self.num_layers = len(self.layers)
        # Every crop (the base one and the high-resolution ones) is one native-size tower image.
        self.crop_geometry = self.geometry(parts)
        self.crop_size = self.crop_geometry.image_size
        self.patch_size = self.crop_geometry.patch_size
        self.pinpoints = llava_config.image_grid_pinpoints
        self.max_crops = max_crops_of(getattr(llava_config, "vision_aspect_ratio", None))
        self.default_num_tokens = self.crop_geometry.default_num_tokens
        # The grid reshape in pack_image_features needs exactly side x side tokens per crop.
        self.base_tokens = self.crop_geometry.grid_for_pixels(self.crop_size, self.crop_size).patches
        self.last_layer = parts.last_layer
        self.class_token = class_token
        # The tower is not merged (the grid logic needs whole crops): its schedule is all "none".
        self.tower_keep_ratio = 1.0
        self.state = PatchState()
        self.keep_fraction = crop_keep_fraction(self.crop_geometry, config, parts.feature_layer)
        self.merge_settings = packed_merge_settings(config, self.num_layers)
        if processor is not None and is_onevision(model) and not hasattr(processor, "replace_image_token"):
            # transformers 4.57's LlavaOnevisionProcessor counts a multi-image prompt's images from its
            # num_image_tokens attribute, which its video path also reads: there is no per-image count to set.
            raise ValueError(
                f"with transformers {transformers_version_text()}, patch() cannot set the placeholder count of "
                f"{type(processor).__name__}; pass processor=None and emit handle.visual_tokens_for_image(h, w) "
                "placeholders yourself, or use transformers >= 5.16"
            )
        if processor is not None:
            self._check_processor(processor)
        self.processor_count = ProcessorOverrides(processor, self._processor_count_overrides, type(model).__name__)
        self.pack_override = AttributeOverrides(self.llava, self._pack_overrides)
        self.placeholder_check = PlaceholderCheck(self.llava, llava_config.image_token_id, self.num_visual_tokens)

    # -------------------------------------------------------------- budgets
    def plan(self, num_tokens: int) -> list[LayerStep]:
        """The tower's schedule: no merge on any layer (merging happens after packing)."""
        return plan_layers(num_tokens, self.num_layers, 1.0, class_token=self.class_token, last_layer=self.last_layer)

    def image_grids(self, height: int, width: int, cropped: bool = True) -> tuple[PatchGrid, ...]:
        """The base crop's patch grid, then the grid the high-resolution crops tile (before unpadding).

        ``cropped=False``: the base crop only (OneVision, several images per prompt).
        """
        check_image_size(height, width)
        base = self.crop_geometry.grid_for_pixels(self.crop_size, self.crop_size)
        layout = self.layout_for_image(height, width, cropped)
        if layout.grid_tokens == 0:
            return (base,)
        crops_down, crops_across = layout.crop_grid
        return base, PatchGrid(crops_down * base.rows, crops_across * base.cols)

    def layout_for_image(self, height: int, width: int, cropped: bool = True) -> AnyresLayout:
        return anyres_layout(
            height, width, self.pinpoints, self.crop_size, self.patch_size, self.base_tokens, self.max_crops, cropped
        )

    def budget_for(self, layout: AnyresLayout) -> int | None:
        """Tokens the LLM receives for ``layout``; None leaves the image unmerged."""
        return packed_budget(layout, self.config.target_tokens, self.keep_fraction)

    def visual_tokens_for_image(self, height: int, width: int, cropped: bool = True) -> int:
        """Placeholders for an original (unprocessed) image of ``height x width`` pixels.

        Anyres works on the original size itself (the processor records it in ``image_sizes``), so
        no resize rule comes first. ``cropped=False``: the image goes in as its base crop only
        (OneVision, several images per prompt).

        Raises:
            ValueError: ``height`` or ``width`` is not a positive integer.
        """
        check_image_size(height, width)
        layout = self.layout_for_image(height, width, cropped)
        budget = self.budget_for(layout)
        return layout.unmerged_tokens if budget is None else budget

    @property
    def num_visual_tokens(self) -> int:
        """Visual tokens for a square image of the tower's crop size (others: `visual_tokens_for_image`)."""
        return self.visual_tokens_for_image(self.crop_size, self.crop_size)

    # ---------------------------------------------------------------- hooks
    def _pack_overrides(self) -> dict[str, object]:
        """``pack_image_features`` merging each packed image to its budget (wrapping what is there at install)."""
        return {_PACK: self._make_pack(self.llava.pack_image_features)}

    def _make_pack(self, original):
        # LLaVA-NeXT and OneVision name their extra arguments differently; pass them through.
        @functools.wraps(original)
        def pack_with_budget(image_features, image_sizes, *args, **kwargs):
            packed, _ = original(image_features, image_sizes, *args, **kwargs)
            merged = []
            for features, crops, image_size in zip(packed, image_features, image_sizes, strict=True):
                height, width = (int(v) for v in image_size)
                layout = self.layout_for_image(height, width, cropped=crops.shape[0] > 1)
                if features.shape[0] != layout.unmerged_tokens:
                    raise RuntimeError(
                        f"{type(self.llava).__name__} packed {features.shape[0]} tokens for a {height}x{width} image, "
                        f"the planned layout has {layout.unmerged_tokens}; the model's packing changed"
                    )
                budget = self.budget_for(layout)
                if budget is not None:
                    features = self.state.observers.run(
                        "projector", None, merge_packed_image, features, layout, budget, self.merge_settings
                    )
                merged.append(features)
            lengths = torch.tensor([f.shape[0] for f in merged], dtype=torch.long, device=merged[0].device)
            return merged, lengths

        return pack_with_budget

    def hooks(self) -> list[Hook]:
        """The packing override, the placeholder check, then the processor's count."""
        processor = [self.processor_count] if self.processor is not None else []
        return [self.pack_override, self.placeholder_check, *processor]

    # ------------------------------------------------------------- processor
    def _check_processor(self, processor) -> None:
        if all(hasattr(processor, name) for name in _PROCESSOR_METHODS):
            return
        # transformers 4.57: __call__ and _get_num_multimodal_tokens ask _get_number_of_features per image.
        if hasattr(processor, _NUMBER_OF_FEATURES_4X) and getattr(processor, "vision_feature_select_strategy", None):
            return
        missing = [name for name in _PROCESSOR_METHODS if not hasattr(processor, name)]
        raise ValueError(
            f"processor {type(processor).__name__} lacks {missing}; pass a transformers LlavaNextProcessor "
            "(or processor=None and emit handle.visual_tokens_for_image(h, w) placeholders yourself)"
        )

    def _processor_count_overrides_4x(self) -> dict[str, object]:
        """transformers 4.57: the processor's per-image count, before it drops the class token, is ours."""
        processor = self.processor
        dropped = 1 if processor.vision_feature_select_strategy == "default" else 0

        def get_number_of_features(orig_height: int, orig_width: int, height: int, width: int) -> int:
            return self.visual_tokens_for_image(int(orig_height), int(orig_width)) + dropped

        return {_NUMBER_OF_FEATURES_4X: get_number_of_features}

    def _processor_count_overrides(self) -> dict[str, object]:
        """The processor methods that make it emit each image's merged count."""
        processor = self.processor
        if not hasattr(processor, "replace_image_token"):
            return self._processor_count_overrides_4x()
        original_count = processor._get_num_multimodal_tokens
        image_token = processor.image_token

        @functools.wraps(processor.replace_image_token)
        def replace_image_token(image_inputs: dict, image_idx: int, **kwargs) -> str:
            image_size = image_inputs["image_sizes"][image_idx]
            height, width = (int(v) for v in image_size)
            cropped = images_in_prompt(image_inputs.get("batch_num_images"), image_idx) == 1
            return image_token * self.visual_tokens_for_image(height, width, cropped)

        @functools.wraps(original_count)
        def get_num_multimodal_tokens(image_sizes=None, **kwargs):
            data = original_count(image_sizes=image_sizes, **kwargs)
            if image_sizes is not None and getattr(data, "num_image_tokens", None) is not None:
                data.num_image_tokens = [self.visual_tokens_for_image(int(h), int(w)) for h, w in image_sizes]
            return data

        return {"replace_image_token": replace_image_token, "_get_num_multimodal_tokens": get_num_multimodal_tokens}
