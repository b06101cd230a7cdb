"""Adapter for transformers' LLaVA-1.5 (`LlavaForConditionalGeneration`, `LlavaModel`).

Everything specific to this family lives here: where the CLIP layers and the
projector are, how ``vision_feature_layer`` and ``vision_feature_select_strategy``
pick the features, and how `LlavaProcessor` counts image placeholders.
Tested against transformers 5.24.
"""

from __future__ import annotations

import logging

from torch import nn

from ..config import PiToMeConfig
from ..hooks.projector import ProjectorMerger, ProjectorSettings
from ..hooks.vision import MergeSettings, TowerMerger
from ..merge.energy import margin_for_layer
from ..schedule import LayerStep, PRESET_SCHEDULES, plan_layers, solve_keep_ratio

logger = logging.getLogger("pitome_mllm")

FAMILY = "llava_hf"
SUPPORTED = (
    "transformers LlavaForConditionalGeneration / LlavaModel (LLaVA-1.5 style) with a CLIP vision tower "
    "and a single integer vision_feature_layer"
)
_PROCESSOR_METHODS = ("replace_image_token", "_get_num_multimodal_tokens")
_MISSING = object()


def matches(model: nn.Module) -> bool:
    from transformers import LlavaForConditionalGeneration, LlavaModel

    return isinstance(model, (LlavaForConditionalGeneration, LlavaModel))


def _clip_layers(vision_tower: nn.Module) -> nn.ModuleList:
    # transformers >= 5.12 keeps the encoder on CLIPVisionModel itself; 4.x and 5.0 one level down.
    for owner in (vision_tower, getattr(vision_tower, "vision_model", None)):
        encoder = getattr(owner, "encoder", None)
        if encoder is not None and isinstance(getattr(encoder, "layers", None), nn.ModuleList):
            return encoder.layers
    raise ValueError(f"cannot find the encoder layers of {type(vision_tower).__name__}")


def _key_projection(layer: nn.Module) -> tuple[nn.Module, int]:
    attention = layer.self_attn
    return attention.k_proj, attention.num_heads


class LlavaHFAdapter:
    """Plans and installs a patch on a transformers LLaVA model.

    Construction validates and plans without touching the model; `install` mutates it
    and `remove` undoes exactly what `install` did.
    """

    family = FAMILY

    def __init__(self, model: nn.Module, processor, config: PiToMeConfig) -> None:
        from transformers import CLIPVisionModel

        self.model = model
        self.processor = processor
        self.config = config
        llava = model.model if hasattr(model, "model") and hasattr(model.model, "vision_tower") else model
        self.vision_tower = llava.vision_tower
        self.projector = llava.multi_modal_projector
        if not isinstance(self.vision_tower, CLIPVisionModel):
            raise ValueError(
                f"unsupported vision tower {type(self.vision_tower).__name__}; supported: {SUPPORTED}"
            )
        model_config = llava.config
        feature_layer = model_config.vision_feature_layer
        if not isinstance(feature_layer, int):
            raise ValueError(
                f"vision_feature_layer={feature_layer!r} selects several layers; supported: {SUPPORTED}"
            )
        self.strategy = model_config.vision_feature_select_strategy
        if self.strategy not in ("default", "full"):
            raise ValueError(f"unsupported vision_feature_select_strategy={self.strategy!r}; supported: default, full")
        self.layers = _clip_layers(self.vision_tower)
        self.num_layers = len(self.layers)
        # hidden_states[0] is the embedding output, hidden_states[i] the output of layer i - 1.
        selected = feature_layer % (self.num_layers + 1)
        self.last_layer = selected - 1
        if self.last_layer < 0:
            raise ValueError(
                f"vision_feature_layer={feature_layer} selects the patch embeddings; no encoder layer to merge in"
            )
        vision_config = self.vision_tower.config
        self.patch_size = vision_config.patch_size
        self.default_num_tokens = (vision_config.image_size // self.patch_size) ** 2 + 1
        self.dropped_leading = 1 if self.strategy == "default" else 0
        self._plans: dict[int, list[LayerStep]] = {}
        self.tower_method = "none" if config.method == "none" else config.method
        self.tower_keep_ratio = self._resolve_keep_ratio()
        self._check_budget(self.default_num_tokens)
        if processor is not None:
            self._check_processor(processor)

        self.tower = TowerMerger(
            self.layers,
            self.plan,
            self.last_layer,
            MergeSettings(
                metric=config.metric,
                reduce=config.reduce,
                prop_attn=config.prop_attn,
                alpha=config.alpha,
                class_token=True,
            ),
            key_projection=_key_projection,
        )
        energy = config.energy or PRESET_SCHEDULES[config.preset].energy
        self.projector_merger = ProjectorMerger(
            self.projector,
            self.tower,
            ProjectorSettings(
                target_tokens=config.target_tokens,
                keep_order=config.keep_order,
                dropped_leading=self.dropped_leading,
                # The tower's margin schedule continued one layer past the last one.
                margin=margin_for_layer(self.num_layers, self.num_layers, config.margin_start, config.margin_span),
                alpha=config.alpha,
                energy=energy,
                reduce=config.reduce,
            ),
        )
        self._processor_saved: dict[str, object] = {}

    # -------------------------------------------------------------- planning
    def _resolve_keep_ratio(self) -> float:
        config = self.config
        if config.method == "none":
            return 1.0
        if config.keep_ratio is not None:
            return config.keep_ratio
        # target_tokens without keep_ratio: merge in the tower as far as possible
        # without going below the budget; the projector step trims the rest.
        available = self.default_num_tokens - self.dropped_leading
        if config.target_tokens > available:
            raise ValueError(
                f"target_tokens={config.target_tokens} is larger than the {available} visual tokens "
                "this model produces per image"
            )
        return solve_keep_ratio(
            self.default_num_tokens,
            self.num_layers,
            config.target_tokens + self.dropped_leading,
            self.last_layer,
            method=self.tower_method,
            preset=config.preset,
        )

    def plan(self, num_tokens: int) -> list[LayerStep]:
        """Merge steps of layers ``0..last_layer`` for an input of ``num_tokens`` (CLS included)."""
        if num_tokens not in self._plans:
            self._plans[num_tokens] = plan_layers(
            num_tokens,
            self.num_layers,
            self.tower_keep_ratio,
            method=self.tower_method,
            preset=self.config.preset,
            class_token=True,
            last_layer=self.last_layer,
            margin_start=self.config.margin_start,
            margin_span=self.config.margin_span,
            energy=self.config.energy,
        )
        return self._plans[num_tokens]

    def tower_output_tokens(self, num_tokens: int) -> int:
        """Visual tokens the projector receives per image (after the class token is dropped)."""
        return self.plan(num_tokens)[-1].tokens_out - self.dropped_leading

    def visual_tokens_for(self, num_tokens: int) -> int:
        """Visual tokens the language model receives per image, for ``num_tokens`` tower inputs."""
        from_tower = self.tower_output_tokens(num_tokens)
        target = self.config.target_tokens
        return from_tower if target is None else min(target, from_tower)

    def _check_budget(self, num_tokens: int) -> None:
        target = self.config.target_tokens
        if target is None:
            return
        available = num_tokens - self.dropped_leading
        if target > available:
            raise ValueError(
                f"target_tokens={target} is larger than the {available} visual tokens this model produces per image"
            )
        from_tower = self.tower_output_tokens(num_tokens)
        if from_tower < target:
            raise ValueError(
                f"keep_ratio={self.tower_keep_ratio} leaves {from_tower} visual tokens, fewer than "
                f"target_tokens={target}; raise keep_ratio or leave it unset to have it chosen"
            )

    @property
    def num_visual_tokens(self) -> int:
        return self.visual_tokens_for(self.default_num_tokens)

    def visual_tokens_for_image(self, height: int, width: int) -> int:
        """Placeholders per image of ``height`` x ``width`` pixels (after preprocessing)."""
        return self.visual_tokens_for((height // self.patch_size) * (width // self.patch_size) + 1)

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

    # --------------------------------------------------------------- install
    def install(self) -> None:
        self.tower.install()
        try:
            self.projector_merger.install()
            if self.processor is not None:
                self._patch_processor()
        except Exception:
            self.remove()
            raise
        steps = self.plan(self.default_num_tokens)
        logger.info(
            "patched %s: %s, keep_ratio=%.4f, %d merge steps, %d visual tokens per image",
            type(self.model).__name__,
            self.config.method,
            self.tower_keep_ratio,
            sum(step.method != "none" for step in steps),
            self.num_visual_tokens,
        )

    def remove(self) -> None:
        self.projector_merger.remove()
        self.tower.remove()
        if self.processor is not None:
            self._restore_processor()


ADAPTER = LlavaHFAdapter
