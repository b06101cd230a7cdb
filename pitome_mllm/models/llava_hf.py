"""Adapter for transformers' LLaVA-1.5 (`LlavaForConditionalGeneration`, `LlavaModel`).

Everything specific to this family lives here: where the CLIP tower and the
projector are, how ``vision_feature_layer`` and ``vision_feature_select_strategy``
pick the features, and how `LlavaProcessor` counts image placeholders.
Tested against transformers 5.24.
"""

from __future__ import annotations

from torch import nn

from ..config import PiToMeConfig
from ..hooks.llm_attention import LLMPropAttention
from .base import ClipTowerAdapter

FAMILY = "llava_hf"
SUPPORTED = (
    "transformers LlavaForConditionalGeneration / LlavaModel (LLaVA-1.5 style) with a CLIP vision tower "
    "(vision_feature_select_strategy 'default' or 'full') or a SigLIP vision tower ('full'), "
    "and a single integer vision_feature_layer"
)
_PROCESSOR_METHODS = ("replace_image_token", "_get_num_multimodal_tokens")
_MISSING = object()
# Attention implementations whose layers take a 4D additive (or bool, or None) mask: llm_prop_attn adds to it.
LLM_PROP_ATTN_IMPLEMENTATIONS = ("sdpa", "eager")


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
    supports_llm_prop_attn = True

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
        self.llm_prop_attention = self._llm_prop_attention(llava) if config.llm_prop_attn else None

    # ------------------------------------------------------------ LLM attention
    def _llm_prop_attention(self, llava: nn.Module) -> LLMPropAttention:
        """Hooks for ``llm_prop_attn`` on the core model and every self-attention of its language model."""
        language_model = llava.language_model
        text_config = language_model.config
        implementation = text_config._attn_implementation
        if implementation not in LLM_PROP_ATTN_IMPLEMENTATIONS:
            raise ValueError(
                f"llm_prop_attn adds to the language model's attention mask, which attn_implementation="
                f"{implementation!r} does not take; supported: {', '.join(LLM_PROP_ATTN_IMPLEMENTATIONS)}"
            )
        # Sliding-window layers see keys from an offset that moves as the cache fills.
        if getattr(text_config, "sliding_window", None) is not None:
            raise ValueError(
                f"llm_prop_attn supports full-attention language models; {type(language_model).__name__} has "
                f"sliding_window={text_config.sliding_window}"
            )
        layers = getattr(language_model, "layers", None)
        if not isinstance(layers, nn.ModuleList) or not all(hasattr(layer, "self_attn") for layer in layers):
            raise ValueError(f"cannot find the self-attention layers of {type(language_model).__name__}")
        return LLMPropAttention(
            llava,
            [layer.self_attn for layer in layers],
            llava.config.image_token_id,
            # Read each forward: the projector stage replaces it on every call.
            size_source=lambda: self.projector_merger.final_size,
        )

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
        if self.llm_prop_attention is not None:
            self.llm_prop_attention.install()

    def _remove_extra(self) -> None:
        if self.processor is not None:
            self._restore_processor()
        if self.llm_prop_attention is not None:
            self.llm_prop_attention.remove()


ADAPTER = LlavaHFAdapter
