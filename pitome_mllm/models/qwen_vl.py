"""Adapter for transformers' Qwen2.5-VL and Qwen3-VL (``Qwen2_5_VLForConditionalGeneration``,
``Qwen3VLForConditionalGeneration`` and their ``*Model`` cores).

Where it merges: after the patch merger (the projector stage). The tower runs unchanged, with its
window attention (Qwen2.5-VL) and DeepStack taps (Qwen3-VL); each image's merged-grid tokens
(``t * h * w / 4``) are then reduced to the image's budget (`pitome_mllm.geometry.MergedGridBudget`)
by `pitome_mllm.merge.sequence.reduce_image_tokens`, and Qwen3-VL's DeepStack features follow the
same plan, so every language-model layer sees the same tokens. docs/qwen.md says why here.

Positions (M-RoPE): every kept token takes the ``(t, h, w)`` position of the first merged-grid cell
it holds (kept tokens are in raster order of those cells, so positions within an image are
distinct); text after an image continues as the model's own rule says (from the image's full grid).
Positions are computed before the images are encoded in ``generate``, so they are made in two steps:
``get_rope_index`` is overridden to number a reduced image as its first K cells (text positions and
``rope_deltas`` exact), and a forward pre-hook on the language model moves each image's visual
positions to the cells its tokens actually hold, once the encoder has decided them.

Everything specific to this family lives here.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..config import PiToMeConfig
from ..geometry import MergedGridBudget, PatchGrid, SmartResize, TowerGeometry
from ..hooks.base import PROCESSOR_COPY_REFUSED, AttributeOverrides, Hook, ProcessorOverrides, remove_hooks
from ..hooks.state import PatchState
from ..merge.budget import StepParams
from ..merge.sequence import reduce_image_tokens
from ..schedule import LayerStep, projector_margin
from .compat import transformers_version
from .protocol import DecoderShape, ModelAdapter, ModelParts

FAMILY = "qwen_vl"
SUPPORTED = (
    "transformers Qwen2_5_VLForConditionalGeneration / Qwen2_5_VLModel and Qwen3VLForConditionalGeneration / "
    "Qwen3VLModel (images; videos are refused while patched)"
)
# Methods that run on a tower without a class token, on tokens of any grid shape, without the prompt.
QWEN_METHODS = ("none", "pitome", "tome", "random", "divprune")
_NO_CLASS_TOKEN = "ranks patches by the class token's attention, and Qwen-VL towers have no class token"
QWEN_METHOD_REFUSALS = {
    "dominant": _NO_CLASS_TOKEN,
    "visionzip": _NO_CLASS_TOKEN,
    "fastervlm": _NO_CLASS_TOKEN,
    "mllm": _NO_CLASS_TOKEN,
    "pool": "pools a square patch grid, and a Qwen-VL grid follows each image's aspect ratio",
    "cdpruner": "conditions on each image's prompt, which the Qwen-VL adapter does not read",
}
# The square image whose count is ``handle.num_visual_tokens`` (a Qwen-VL grid depends on the image).
REFERENCE_IMAGE_SIZE = 448
PLACEHOLDER_REMEDY = (
    "the model is patched by pitome_mllm: build the inputs with the processor passed to "
    "pitome_mllm.patch(model, processor, ...) after patching, or put handle.visual_tokens_for_image(h, w) "
    "placeholders per image into the prompt"
)
# Kept in full precision under bitsandbytes: the tower and patch merger decide the merges, the head scores.
QUANTIZATION_SKIP_MODULES = ["model.visual", "lm_head"]
VIDEO_REFUSED = (
    "pitome_mllm merges the images of a Qwen-VL model; video inputs (pixel_values_videos) are not supported "
    "while it is patched: call handle.unpatch() for videos, or pass frames as images"
)


def qwen_core(model: nn.Module) -> nn.Module:
    """The module holding ``visual`` and ``language_model`` (``Qwen*VLModel``)."""
    core = model.model if hasattr(getattr(model, "model", None), "visual") else model
    if not hasattr(core, "visual") or not hasattr(core, "language_model"):
        raise ValueError(f"{type(model).__name__} is not a transformers Qwen-VL model (no visual / language_model)")
    return core


# The ``*ForConditionalGeneration`` class of each ``model_type`` this adapter patches (config.json), and the cores.
QWEN_VL_CLASSES = {
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
}
QWEN_VL_CORES = ("Qwen2_5_VLModel", "Qwen3VLModel")


def matches(model: nn.Module) -> bool:
    import transformers

    names = (*QWEN_VL_CLASSES.values(), *QWEN_VL_CORES)
    classes = tuple(getattr(transformers, name) for name in names if hasattr(transformers, name))
    return isinstance(model, classes)


def image_processor_resize(image_processor, factor: int) -> SmartResize:
    """The processor's ``smart_resize`` bounds: ``size`` {shortest_edge, longest_edge} (5.x) or min/max_pixels."""
    size = getattr(image_processor, "size", None) or {}
    read = size.get if isinstance(size, dict) else lambda name: getattr(size, name, None)
    min_pixels = read("shortest_edge") or getattr(image_processor, "min_pixels", None)
    max_pixels = read("longest_edge") or getattr(image_processor, "max_pixels", None)
    if min_pixels is None or max_pixels is None:
        raise ValueError(
            f"cannot read the pixel bounds of {type(image_processor).__name__} (size={size!r}); expected "
            "size={'shortest_edge': min_pixels, 'longest_edge': max_pixels} or min_pixels / max_pixels"
        )
    return SmartResize(factor, int(min_pixels), int(max_pixels))


def set_pixel_limits(image_processor, min_pixels: int | None, max_pixels: int | None) -> None:
    """Give the processor's ``smart_resize`` new bounds (None keeps a bound), where `image_processor_resize` reads them.

    transformers 5.x reads ``size`` {shortest_edge, longest_edge}; 4.57 reads ``min_pixels`` / ``max_pixels``
    (set on its processors, None on 5.x's).

    Raises:
        ValueError: a bound that is not a positive integer, or ``min_pixels > max_pixels``.
    """
    size = getattr(image_processor, "size", None) or {}
    read = size.get if isinstance(size, dict) else lambda name: getattr(size, name, None)
    current_min = read("shortest_edge") or getattr(image_processor, "min_pixels", None)
    current_max = read("longest_edge") or getattr(image_processor, "max_pixels", None)
    new_min = current_min if min_pixels is None else min_pixels
    new_max = current_max if max_pixels is None else max_pixels
    for name, value in (("min_pixels", new_min), ("max_pixels", new_max)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive number of pixels, got {value!r}")
    if new_min > new_max:
        raise ValueError(f"min_pixels ({new_min}) must not exceed max_pixels ({new_max})")
    image_processor.size = {"shortest_edge": new_min, "longest_edge": new_max}
    # Only where set already: 5.x deprecates call-time min/max_pixels and warns on every call when they are set.
    for name, value in (("min_pixels", new_min), ("max_pixels", new_max)):
        if getattr(image_processor, name, None) is not None:
            setattr(image_processor, name, value)


def default_resize(vision_config) -> SmartResize:
    """The processors' default bounds (56 * 56 to 28 * 28 * 1280 pixels, scaled to the factor)."""
    factor = vision_config.patch_size * vision_config.spatial_merge_size
    return SmartResize(factor, 4 * factor * factor, factor * factor * 1280)


def qwen_parts(model: nn.Module) -> ModelParts:
    core = qwen_core(model)
    visual = core.visual
    layers = visual.blocks

    def encode_images(pixel_values, image_grid_thw=None, **kwargs) -> list:
        if image_grid_thw is None:
            raise ValueError("a Qwen-VL model encodes images with their image_grid_thw (from its processor)")
        output = core.get_image_features(pixel_values, image_grid_thw, **kwargs)
        return list(_pieces(output)[0])

    return ModelParts(
        tower=visual,
        projector=visual.merger,
        language_model=core.language_model,
        encoder_layers=layers,
        feature_layer=-1,
        last_layer=len(layers) - 1,
        drops_class_token=False,
        encode_images=encode_images,
        image_feature_owner=core,
        image_feature_method="get_image_features",
        decoder=DecoderShape.from_config(core.config.text_config),
        output_head=getattr(model, "lm_head", None),
    )


def _pieces(output) -> tuple[tuple, list | None]:
    """``(per-image features, DeepStack features or None)`` of a ``get_image_features`` output.

    transformers 5.x: an output object (``pooler_output``; Qwen3-VL's ``deepstack_features``, one tuple
    of per-image tensors per tapped layer). 4.57: Qwen2.5-VL a tuple of per-image tensors; Qwen3-VL a pair
    (that tuple, one concatenated ``[sum N_i, D]`` tensor per tapped layer).
    """
    if hasattr(output, "pooler_output"):
        return tuple(output.pooler_output), getattr(output, "deepstack_features", None)
    if len(output) == 2 and isinstance(output[1], list):
        return tuple(output[0]), output[1]
    return tuple(output), None


def merged_grid_budget(vision_config, config: PiToMeConfig, resize: SmartResize | None = None) -> MergedGridBudget:
    """Each image's budget under ``config``, for a tower of ``vision_config`` (``resize``: the processor's bounds,
    default `default_resize`; the kept count of an image depends on its native count alone)."""
    return MergedGridBudget(
        resize or default_resize(vision_config),
        vision_config.patch_size,
        vision_config.spatial_merge_size,
        keep_ratio=config.keep_ratio,
        target_tokens=config.target_tokens,
        reference_size=REFERENCE_IMAGE_SIZE,
    )


def image_stage_settings(config: PiToMeConfig, num_tower_layers: int) -> tuple[str, StepParams]:
    """``(method, step parameters)`` with which each image's merged-grid tokens are reduced.

    One definition for transformers and vLLM, so both reduce the same image the same way. As on
    LLaVA, method ``"none"`` with a budget lands on it with PiToMe steps (the tower itself is never
    merged); the margin is the projector's, after all ``num_tower_layers`` blocks.
    """
    stage_method = "pitome" if config.method == "none" else config.method
    step = StepParams(
        method=stage_method if stage_method in ("pitome", "tome") else "pitome",
        margin=projector_margin(num_tower_layers, config.margin_start, config.margin_span),
        alpha=config.alpha,
        energy=config.resolved_energy,
        reduce=config.reduce,
    )
    return stage_method, step


@dataclass
class PositionPlan:
    """What the image encoder decided, for the language model's positions of the same forward.

    Attributes:
        grids: ``(t, h, w)`` merged grid of every image (patch grid divided by the merge size).
        first_cells: ``[K_i]`` the merged-grid cell (raster index) of every kept token of image ``i``.
        cell_tokens: ``[t * h * w]`` per image, the kept token holding each merged-grid cell (``-1``: dropped);
            the merge map the tools draw.
    """

    grids: list[tuple[int, int, int]]
    first_cells: list[torch.Tensor]
    cell_tokens: list[torch.Tensor] | None = None


def cell_offsets(grid: tuple[int, int, int], cells: torch.Tensor) -> torch.Tensor:
    """``[3, K]`` the ``(t, h, w)`` offsets of raster ``cells`` in a merged ``grid``."""
    _, height, width = grid
    per_frame = height * width
    return torch.stack((cells // per_frame, (cells % per_frame) // width, cells % width))


class QwenImageStage(Hook):
    """The merged-grid stage and M-RoPE positions of a patched Qwen-VL model (one `Hook`).

    Overrides, on the core model's instance: ``get_image_features`` (reduce each image to its
    budget; DeepStack features along), ``get_video_features`` (refused), ``get_placeholder_mask``
    (record where the images sit) and ``get_rope_index`` (number a reduced image as its first K
    cells); and a forward pre-hook on the language model (move the visual positions to the cells
    kept). ``keep_ratio=1.0`` changes nothing the model computes.
    """

    def __init__(
        self, core: nn.Module, budget: MergedGridBudget, method: str, step: StepParams, seed: int, state: PatchState
    ) -> None:
        self.core = core
        self.budget = budget
        self.method = method
        self.step = step
        self.seed = seed
        self.state = state
        self.merge_size = core.config.vision_config.spatial_merge_size
        self.image_token_id = core.config.image_token_id
        self.plan: PositionPlan | None = None
        # The plan of the last images encoded, kept for analysis (``plan`` is consumed by the positions).
        self.last_plan: PositionPlan | None = None
        self._image_mask: torch.Tensor | None = None
        self._overrides = AttributeOverrides(core, self._build_overrides)
        self._hooks: list = []

    def install(self) -> None:
        self._overrides.install()
        self._hooks.append(
            self.core.language_model.register_forward_pre_hook(self._move_visual_positions, with_kwargs=True)
        )

    def remove(self) -> None:
        remove_hooks(self._hooks)
        self._overrides.remove()
        self.plan = self.last_plan = None
        self._image_mask = None

    # ---------------------------------------------------------------- counts
    def merged_grid(self, grid_thw) -> tuple[int, int, int]:
        t, h, w = (int(value) for value in grid_thw)
        return t, h // self.merge_size, w // self.merge_size

    def kept_for_grid(self, grid_thw) -> tuple[int, int]:
        """``(native, kept)`` tokens of one image of patch grid ``grid_thw``."""
        t, h, w = (int(value) for value in grid_thw)
        native = self.budget.native_tokens(PatchGrid(h, w, t))
        return native, self.budget.kept_tokens(native)

    # ------------------------------------------------------------- overrides
    def _build_overrides(self) -> dict[str, object]:
        core = self.core
        return {
            "get_image_features": self._image_features(core.get_image_features),
            "get_video_features": self._refuse_videos(core.get_video_features),
            "get_placeholder_mask": self._placeholder_mask(core.get_placeholder_mask),
            "get_rope_index": self._rope_index(core.get_rope_index),
        }

    def _image_features(self, original):
        @functools.wraps(original)
        def get_image_features(pixel_values, image_grid_thw=None, *args, **kwargs):
            output = original(pixel_values, image_grid_thw, *args, **kwargs)
            if image_grid_thw is None:
                return output
            return self._reduce(output, image_grid_thw)

        return get_image_features

    def _reduce(self, output, image_grid_thw):
        features, deepstack = _pieces(output)
        grids = [tuple(int(v) for v in grid) for grid in image_grid_thw.tolist()]
        concatenated = deepstack is not None and len(deepstack) > 0 and isinstance(deepstack[0], torch.Tensor)
        if concatenated:  # transformers 4.57's Qwen3-VL: one [sum N_i, D] tensor per tapped layer
            sizes = [feature.shape[0] for feature in features]
            deepstack = [torch.split(layer, sizes) for layer in deepstack]
        reduced_images, cells, cell_tokens = [], [], []
        for index, (image, grid) in enumerate(zip(features, grids, strict=True)):
            _, kept = self.kept_for_grid(grid)
            carried = tuple(layer[index] for layer in deepstack) if deepstack else ()
            reduced = self.state.observers.run(
                "projector", None, reduce_image_tokens, image, kept, self.method, self.step, self.seed, carried
            )
            reduced_images.append(reduced)
            cells.append(reduced.first_cells)
            cell_tokens.append(reduced.cell_tokens)
        self.plan = self.last_plan = PositionPlan([self.merged_grid(grid) for grid in grids], cells, cell_tokens)
        new_features = tuple(image.tokens for image in reduced_images)
        new_deepstack = None
        if deepstack:
            new_deepstack = [tuple(image.carried[layer] for image in reduced_images) for layer in range(len(deepstack))]
            if concatenated:
                new_deepstack = [torch.cat(layer, dim=0) for layer in new_deepstack]
        return _with_pieces(output, new_features, new_deepstack)

    def _refuse_videos(self, original):
        @functools.wraps(original)
        def get_video_features(*args, **kwargs):
            raise ValueError(VIDEO_REFUSED)

        return get_video_features

    def _placeholder_mask(self, original):
        @functools.wraps(original)
        def get_placeholder_mask(input_ids, inputs_embeds, image_features=None, video_features=None, **kwargs):
            try:
                masks = original(
                    input_ids, inputs_embeds, image_features=image_features, video_features=video_features, **kwargs
                )
            except ValueError as error:
                if "do not match" in str(error):
                    raise ValueError(f"{error}; {PLACEHOLDER_REMEDY}") from error
                raise
            if image_features is not None:
                self._image_mask = masks[0][..., 0]
            return masks

        return get_placeholder_mask

    def _rope_index(self, original):
        signature = inspect.signature(original)

        @functools.wraps(original)
        def get_rope_index(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            arguments = dict(bound.arguments)
            extra = arguments.pop("kwargs", {})
            grids = arguments.get("image_grid_thw")
            input_ids = arguments.get("input_ids")
            if grids is None or input_ids is None:
                return original(**arguments, **extra)
            counts = [self.kept_for_grid(grid) for grid in grids.tolist()]
            if all(native == kept for native, kept in counts):
                return original(**arguments, **extra)
            return self._reduced_rope_index(original, arguments, extra, counts)

        return get_rope_index

    def _reduced_rope_index(self, original, arguments: dict, extra: dict, counts: list[tuple[int, int]]):
        """Positions of a prompt with reduced images: the model's rule on the prompt with full images.

        Each image's run of K placeholders is lengthened to its N native ones, the model's own
        ``get_rope_index`` numbers that prompt, and the positions of the original tokens are read
        back (an image's K tokens take its first K cells, moved later to the cells they hold).
        """
        input_ids = arguments["input_ids"]
        attention_mask = arguments.get("attention_mask")
        expansion = expand_image_runs(input_ids, attention_mask, self.image_token_id, counts)
        arguments = dict(arguments, input_ids=expansion.input_ids, attention_mask=expansion.attention_mask)
        if arguments.get("mm_token_type_ids") is not None:
            arguments["mm_token_type_ids"] = expansion.expand(arguments["mm_token_type_ids"], fill=1)
        positions, deltas = original(**arguments, **extra)
        index = expansion.index.to(positions.device)
        positions = positions.gather(2, index[None].expand(positions.shape[0], -1, -1))
        # rope_deltas = largest position + 1 - prompt length: the prompt numbered was longer than the real one.
        # transformers 5.x counts a row's unpadded tokens (longer by the row's added ones); 4.57 the padded
        # row (longer by the added length of the longest row, every row padded to it).
        if transformers_version()[0] < 5:
            longer = torch.full_like(expansion.extra, expansion.input_ids.shape[1] - input_ids.shape[1])
        else:
            longer = expansion.extra
        return positions, deltas + longer.to(deltas.device, deltas.dtype).view(-1, *([1] * (deltas.dim() - 1)))

    # -------------------------------------------------------- positions fix
    def _move_visual_positions(self, module: nn.Module, args: tuple, kwargs: dict):
        plan, mask = self.plan, self._image_mask
        self._image_mask = None
        position_ids = kwargs.get("position_ids")
        if plan is None or mask is None or not isinstance(position_ids, torch.Tensor) or position_ids.dim() != 3:
            return None
        self.plan = None
        kwargs["position_ids"] = moved_visual_positions(position_ids, mask, plan)
        return args, kwargs


def _with_pieces(output, features: tuple, deepstack):
    """``output`` with its per-image features (and DeepStack features) replaced, in its own form."""
    if hasattr(output, "pooler_output"):
        output.pooler_output = features
        if deepstack is not None:
            output.deepstack_features = deepstack
        return output
    if deepstack is not None:
        return features, deepstack
    return features


def moved_visual_positions(position_ids: torch.Tensor, image_mask: torch.Tensor, plan: PositionPlan) -> torch.Tensor:
    """``position_ids`` (``[3 or 4, B, L]``, M-RoPE rows last) with every image's tokens at the cells they hold.

    An image's first token carries its start position ``s`` in every M-RoPE row (it was numbered as
    cell ``(0, 0, 0)``); its tokens move to ``s + (t, h, w)`` of their cells. ``image_mask``: ``[B, L]``.
    """
    positions = position_ids.clone()
    rows, columns = image_mask.nonzero(as_tuple=True)  # row-major: the order the features were scattered in
    start = 0
    for grid, cells in zip(plan.grids, plan.first_cells, strict=True):
        count = cells.shape[0]
        row, column = rows[start : start + count], columns[start : start + count]
        origin = positions[-3:, row[:1], column[:1]]  # [3, 1]
        positions[-3:, row, column] = origin + cell_offsets(grid, cells.to(positions.device)).to(positions.dtype)
        start += count
    return positions


@dataclass(frozen=True)
class RunExpansion:
    """A prompt whose image runs were lengthened to their native length.

    Attributes:
        input_ids, attention_mask: ``[B, L']`` the lengthened prompt (left-padded to one length).
        index: ``[B, L]`` the position in the lengthened prompt of every token of the original one.
        extra: ``[B]`` tokens added to each row.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    index: torch.Tensor
    extra: torch.Tensor

    def expand(self, values: torch.Tensor, fill: int) -> torch.Tensor:
        """``values`` (``[B, L]``) laid out as the lengthened prompt; added tokens take ``fill``, padding 0."""
        out = torch.zeros(self.input_ids.shape, dtype=values.dtype, device=values.device)
        is_added = torch.ones(self.input_ids.shape, dtype=torch.bool, device=values.device)
        index = self.index.to(values.device)
        is_added.scatter_(1, index, False)
        out.scatter_(1, index, values)
        padding = self.attention_mask.to(values.device) == 0
        return out.masked_fill(is_added & ~padding, fill)


def expand_image_runs(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, image_token_id: int, counts: list[tuple[int, int]]
) -> RunExpansion:
    """Lengthen each run of ``image_token_id`` from its kept to its native length (`RunExpansion`).

    ``counts``: ``(native, kept)`` of every image, in prompt order (row by row).

    Raises:
        ValueError: the prompt's runs do not hold the patched counts (a prompt built by the unpatched
            processor, or images and placeholders that do not match).
    """
    device = input_ids.device
    batch, length = input_ids.shape
    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    is_image = (input_ids == image_token_id) & mask.bool()
    rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    image = 0
    for row in range(batch):
        starts, ends = _runs(is_image[row])
        inserted_after = torch.zeros(length, dtype=torch.long, device=device)
        for start, end in zip(starts, ends, strict=True):
            if image >= len(counts):
                raise ValueError(_mismatch(is_image, counts))
            native, kept = counts[image]
            if end - start != kept:
                raise ValueError(_mismatch(is_image, counts))
            inserted_after[end - 1] = native - kept
            image += 1
        # Every token moves right by the tokens inserted before it (after the last token of a run).
        shift = torch.cumsum(inserted_after, 0) - inserted_after
        index = torch.arange(length, device=device) + shift
        new_length = length + int(inserted_after.sum())
        ids = torch.full((new_length,), image_token_id, dtype=input_ids.dtype, device=device)
        new_mask = torch.ones(new_length, dtype=mask.dtype, device=device)
        ids[index] = input_ids[row]
        new_mask[index] = mask[row]
        rows.append((ids, new_mask, index))
    if image != len(counts):
        raise ValueError(_mismatch(is_image, counts))
    longest = max(ids.shape[0] for ids, _, _ in rows)
    new_ids = torch.zeros(batch, longest, dtype=input_ids.dtype, device=device)
    new_mask = torch.zeros(batch, longest, dtype=mask.dtype, device=device)
    index = torch.empty(batch, length, dtype=torch.long, device=device)
    extra = torch.empty(batch, dtype=torch.long)
    for row, (ids, row_mask, row_index) in enumerate(rows):
        pad = longest - ids.shape[0]  # left padding, so every row's tokens keep their order
        new_ids[row, pad:] = ids
        new_mask[row, pad:] = row_mask
        index[row] = row_index + pad
        extra[row] = ids.shape[0] - length
    return RunExpansion(new_ids, new_mask, index, extra)


def _runs(flags: torch.Tensor) -> tuple[list[int], list[int]]:
    """Starts and ends (exclusive) of the runs of True in a 1-D bool tensor."""
    padded = torch.cat((flags.new_zeros(1), flags, flags.new_zeros(1))).to(torch.int8)
    changes = padded[1:] - padded[:-1]
    return (changes == 1).nonzero().flatten().tolist(), (changes == -1).nonzero().flatten().tolist()


def _mismatch(is_image: torch.Tensor, counts: list[tuple[int, int]]) -> str:
    return (
        f"the prompts hold {int(is_image.sum())} image placeholders, but the patched model gives "
        f"{[kept for _, kept in counts]} visual tokens for its {len(counts)} images (unpatched: "
        f"{[native for native, _ in counts]}); {PLACEHOLDER_REMEDY}"
    )


class QwenVLAdapter(ModelAdapter):
    """Patches a transformers Qwen2.5-VL / Qwen3-VL model and makes its processor emit the reduced counts."""

    family = FAMILY
    supported = SUPPORTED
    display_name = "Qwen-VL"
    methods = QWEN_METHODS
    presets = ("reference", "paper", "pure")
    merge_sites = ("projector",)
    limits = "it reduces each image's tokens after the patch merger, on towers without a class token"
    method_refusals = QWEN_METHOD_REFUSALS

    matches = staticmethod(matches)

    @classmethod
    def parts(cls, model: nn.Module) -> ModelParts:
        return qwen_parts(model)

    @classmethod
    def geometry(cls, parts: ModelParts, resize=None) -> TowerGeometry:
        vision_config = parts.tower.config
        return TowerGeometry(
            num_layers=len(parts.encoder_layers),
            last_layer=len(parts.encoder_layers) - 1,
            image_size=REFERENCE_IMAGE_SIZE,
            patch_size=vision_config.patch_size,
            class_token=False,
            drops_class_token=False,
            resize=resize or default_resize(vision_config),
        )

    def __init__(self, model: nn.Module, processor, config: PiToMeConfig) -> None:
        super().__init__(model, processor, config)
        core = qwen_core(model)
        vision_config = core.config.vision_config
        self.core = core
        self.layers = core.visual.blocks
        factor = vision_config.patch_size * vision_config.spatial_merge_size
        image_processor = getattr(processor, "image_processor", None)
        resize = image_processor_resize(image_processor, factor) if image_processor is not None else None
        self.budget = merged_grid_budget(vision_config, config, resize)
        self.tower_keep_ratio = 1.0  # the tower is not merged
        self.default_num_tokens = self.budget.grid_for_image(REFERENCE_IMAGE_SIZE, REFERENCE_IMAGE_SIZE).patches
        self.state = PatchState()
        stage_method, step = image_stage_settings(config, len(self.layers))
        self.stage = QwenImageStage(core, self.budget, stage_method, step, config.seed, self.state)
        if processor is not None:
            self._check_processor(processor)
        self.processor_count = ProcessorOverrides(processor, self._processor_count_overrides, type(model).__name__)

    def hooks(self) -> list[Hook]:
        """The image stage (features, positions), then the processor's count."""
        return [self.stage, *([self.processor_count] if self.processor is not None else [])]

    def plan(self, num_tokens: int) -> list[LayerStep]:
        return []  # no tower layer merges

    @property
    def num_visual_tokens(self) -> int:
        return self.budget.num_visual_tokens

    def image_grids(self, height: int, width: int) -> tuple[PatchGrid, ...]:
        return (self.budget.grid_for_image(height, width),)

    def visual_tokens_for_image(self, height: int, width: int) -> int:
        return self.budget.visual_tokens_for_image(height, width)

    def describe(self) -> str:
        return (
            f"{self.config.method}, after the patch merger, {self.num_visual_tokens} visual tokens for a "
            f"{REFERENCE_IMAGE_SIZE}x{REFERENCE_IMAGE_SIZE} image"
        )

    # ------------------------------------------------------------- processor
    def _check_processor(self, processor) -> None:
        if not hasattr(processor, "replace_image_token") and (
            transformers_version()[0] >= 5 or not hasattr(processor, "tokenizer")
        ):
            raise ValueError(
                f"processor {type(processor).__name__} has no replace_image_token; pass the model's "
                "transformers Qwen2.5-VL / Qwen3-VL processor (or processor=None and emit "
                "handle.visual_tokens_for_image(h, w) placeholders per image yourself)"
            )

    def _processor_count_overrides(self) -> dict[str, object]:
        processor = self.processor
        if not hasattr(processor, "replace_image_token"):
            overrides = _processor_count_overrides_4x(processor, self.budget)
        else:
            overrides = self._processor_count_overrides_5x()
        overrides["_get_num_multimodal_tokens"] = self._num_multimodal_tokens(processor._get_num_multimodal_tokens)
        return overrides

    def _processor_count_overrides_5x(self) -> dict[str, object]:
        """transformers 5.x: the processor's per-image hook emits each image's kept count."""
        image_token = self.processor.image_token
        original_replace = self.processor.replace_image_token

        @functools.wraps(original_replace)
        def replace_image_token(image_inputs: dict, image_idx: int, **kwargs) -> str:
            _, kept = self.stage.kept_for_grid(image_inputs["image_grid_thw"][image_idx].tolist())
            return image_token * kept

        return {"replace_image_token": replace_image_token}

    def _num_multimodal_tokens(self, original_count):
        """The processor's count for serving engines, per original image size, as the patch gives it."""

        @functools.wraps(original_count)
        def get_num_multimodal_tokens(image_sizes=None, **kwargs):
            data = original_count(image_sizes=image_sizes, **kwargs)
            if image_sizes is not None and getattr(data, "num_image_tokens", None) is not None:
                data.num_image_tokens = [self.budget.visual_tokens_for_image(*map(int, size)) for size in image_sizes]
            return data

        return get_num_multimodal_tokens


class PlaceholderRuns:
    """A processor's tokenizer, seen through a rewrite of its image-placeholder runs (transformers 4.57).

    4.57's Qwen-VL processors expand each ``<|image_pad|>`` to the native count inside ``__call__``
    and tokenize right after, with no per-image hook. The processor's ``tokenizer`` is replaced by
    this object while patched: every run of ``n`` placeholders in the texts it is given becomes
    ``kept(n)`` (a pure function of ``n``, the image's native count), rewritten in the caller's list
    so the processor's own placeholder check reads the same texts. Everything else is the tokenizer's.
    """

    def __init__(self, tokenizer, image_token: str, kept: Callable[[int], int]) -> None:
        self._tokenizer = tokenizer
        self._run = re.compile(f"(?:{re.escape(image_token)})+")
        self._image_token = image_token
        self._kept = kept

    def _shorten(self, text: str) -> str:
        width = len(self._image_token)
        return self._run.sub(lambda run: self._image_token * self._kept(len(run.group(0)) // width), text)

    def __call__(self, text=None, *args, **kwargs):
        if isinstance(text, list) and all(isinstance(item, str) for item in text):
            text[:] = [self._shorten(item) for item in text]
        elif isinstance(text, str):
            text = self._shorten(text)
        return self._tokenizer(text, *args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._tokenizer, name)

    def __deepcopy__(self, memo: dict):
        raise TypeError(PROCESSOR_COPY_REFUSED)

    def __reduce_ex__(self, protocol):
        raise TypeError(PROCESSOR_COPY_REFUSED)


def _processor_count_overrides_4x(processor, budget: MergedGridBudget) -> dict[str, object]:
    """transformers 4.57: the tokenizer sees every placeholder run shortened to the image's kept count."""
    return {"tokenizer": PlaceholderRuns(processor.tokenizer, processor.image_token, budget.kept_tokens)}


__all__ = [
    "QUANTIZATION_SKIP_MODULES",
    "QWEN_VL_CLASSES",
    "QWEN_METHODS",
    "QwenVLAdapter",
    "cell_offsets",
    "expand_image_runs",
    "image_stage_settings",
    "merged_grid_budget",
    "set_pixel_limits",
    "moved_visual_positions",
]
