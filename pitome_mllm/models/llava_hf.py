"""Adapter for transformers' LLaVA-1.5 (`LlavaForConditionalGeneration`, `LlavaModel`).

Everything specific to this family lives here: where the CLIP tower and the
projector are, how ``vision_feature_layer`` and ``vision_feature_select_strategy``
pick the features, and how `LlavaProcessor` counts image placeholders.
Tested against transformers 5.24.
"""

from __future__ import annotations

from torch import nn

from ..config import PiToMeConfig
from .base import ClipTowerAdapter

FAMILY = "llava_hf"
SUPPORTED = (
    "transformers LlavaForConditionalGeneration / LlavaModel (LLaVA-1.5 style) with a CLIP vision tower "
    "(vision_feature_select_strategy 'default' or 'full') or a SigLIP vision tower ('full'), "
    "and a single integer vision_feature_layer"
)
_PROCESSOR_METHODS = ("replace_image_token", "_get_num_multimodal_tokens")
_MISSING = object()


def llava_core(model: nn.Module) -> nn.Module:
    """The part of a transformers LLaVA model holding ``vision_tower`` and ``multi_modal_projector``.

    ``LlavaForConditionalGeneration`` keeps them on ``.model``; ``LlavaModel`` holds them itself.
    """
    core = model.model if hasattr(getattr(model, "model", None), "vision_tower") else model
    if not hasattr(core, "vision_tower") or not hasattr(core, "multi_modal_projector"):
        raise ValueError(f"{type(model).__name__} is not a transformers LLaVA model (no vision_tower / projector)")
    return core


def vision_dtype(model: nn.Module):
    """dtype of the vision tower's weights, which pixel values must match (the LLM may be quantised)."""
    return next(llava_core(model).vision_tower.parameters()).dtype


def image_feature_owner(model: nn.Module) -> nn.Module:
    """The module whose forward calls ``self.get_image_features`` (``LlavaModel`` and its relatives)."""
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "get_image_features"):
        return inner
    if hasattr(model, "get_image_features"):
        return model
    raise ValueError(f"{type(model).__name__} has no get_image_features; expected a transformers LLaVA model")


def matches(model: nn.Module) -> bool:
    from transformers import LlavaForConditionalGeneration, LlavaModel

    return isinstance(model, (LlavaForConditionalGeneration, LlavaModel))


class LlavaHFAdapter(ClipTowerAdapter):
    """Patches a transformers LLaVA model and makes its processor emit the merged token count."""

    family = FAMILY
    supported = SUPPORTED

    def __init__(self, model: nn.Module, processor, config: PiToMeConfig) -> None:
        llava = llava_core(model)
        strategy = llava.config.vision_feature_select_strategy
        if strategy not in ("default", "full"):
            raise ValueError(f"unsupported vision_feature_select_strategy={strategy!r}; supported: default, full")
        super().__init__(
            model,
            processor,
            config,
            vision_tower=llava.vision_tower,
            projector=llava.multi_modal_projector,
            feature_layer=llava.config.vision_feature_layer,
            drops_class_token=strategy == "default",
        )
        if processor is not None:
            self._check_processor(processor)
        self._processor_saved: dict[str, object] = {}

    # ------------------------------------------------------------- processor
    def _check_processor(self, processor) -> None:
        missing = [name for name in _PROCESSOR_METHODS if not hasattr(processor, name)]
        if missing:
            raise ValueError(
                f"processor {type(processor).__name__} lacks {missing}; pass a transformers LlavaProcessor "
                "(or processor=None and emit handle.num_visual_tokens placeholders yourself)"
            )

    def _patch_processor(self) -> None:
        processor = self.processor
        for name in _PROCESSOR_METHODS:
            self._processor_saved[name] = processor.__dict__.get(name, _MISSING)
        original_count = processor._get_num_multimodal_tokens
        image_token = processor.image_token
        extra = processor.num_additional_image_tokens

        def replace_image_token(image_inputs: dict, image_idx: int, **kwargs) -> str:
            pixel_values = image_inputs["pixel_values"][image_idx]
            height, width = pixel_values.shape[-2:]
            num_tokens = (height // self.patch_size) * (width // self.patch_size) + extra
            return image_token * self.visual_tokens_for(int(num_tokens))

        def get_num_multimodal_tokens(image_sizes=None, **kwargs):
            data = original_count(image_sizes=image_sizes, **kwargs)
            counts = getattr(data, "num_image_tokens", None)
            if counts is not None:
                data.num_image_tokens = [self.visual_tokens_for(n + self.dropped_leading) for n in counts]
            return data

        processor.replace_image_token = replace_image_token
        processor._get_num_multimodal_tokens = get_num_multimodal_tokens

    def _restore_processor(self) -> None:
        for name, saved in self._processor_saved.items():
            if saved is _MISSING:
                self.processor.__dict__.pop(name, None)
            else:
                setattr(self.processor, name, saved)
        self._processor_saved.clear()

    def _install_extra(self) -> None:
        if self.processor is not None:
            self._patch_processor()

    def _remove_extra(self) -> None:
        if self.processor is not None:
            self._restore_processor()


ADAPTER = LlavaHFAdapter
