"""Adapter for transformers' LLaVA-1.5 (`LlavaForConditionalGeneration`, `LlavaModel`).

Everything specific to this family lives here: where the CLIP tower and the
projector are, how ``vision_feature_layer`` and ``vision_feature_select_strategy``
pick the features, and how `LlavaProcessor` counts image placeholders.
Tested against transformers 5.24.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from ..config import PiToMeConfig
from ..geometry import ImageResize, ResizeAndCrop, TowerGeometry
from ..hooks.base import (
    Hook,
    InstanceOverrides,
    ProcessorOverrides,
    override_forward,
    restore_forward,
)
from ..hooks.llm_attention import LLMPropAttention
from .clip_tower import (
    ClipTowerAdapter,
    clip_encoder_layers,
    last_encoder_layer,
    single_feature_layer,
    tower_config_geometry,
)
from .compat import cache_mask_sizes, transformers_version
from .protocol import DecoderShape, ModelParts

FAMILY = "llava_hf"
SUPPORTED = (
    "transformers LlavaForConditionalGeneration / LlavaModel (LLaVA-1.5 style) with a CLIP vision tower "
    "(vision_feature_select_strategy 'default' or 'full') or a SigLIP vision tower ('full'), "
    "and a single integer vision_feature_layer"
)
_PROCESSOR_METHODS = ("replace_image_token", "_get_num_multimodal_tokens")
# transformers 4.57's LlavaProcessor has no per-image hook: __call__ and _get_num_multimodal_tokens expand each
# <image> into (H // patch_size) * (W // patch_size) + num_additional_image_tokens - (1 if strategy == "default").
_PROCESSOR_ATTRIBUTES_4X = ("patch_size", "num_additional_image_tokens", "vision_feature_select_strategy")
FEATURE_SELECT_STRATEGIES = ("default", "full")
# Quantising the projector would change the features the merges are decided on, and the
# vision tower is small: 4/8-bit loading quantises the language model only.
QUANTIZATION_SKIP_MODULES = ["model.vision_tower", "model.multi_modal_projector", "lm_head"]
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


def image_features_per_image(model: nn.Module, pixel_values, **kwargs) -> list:
    """The projected features of each image, as the model's ``get_image_features`` computes them.

    transformers 5.x returns an output whose ``pooler_output`` holds the per-image features; 4.57
    returns the features themselves (a ``[num_images, K, D]`` tensor, or per-image tensors for NeXT).
    """
    output = image_feature_owner(model).get_image_features(pixel_values=pixel_values, **kwargs)
    return list(getattr(output, "pooler_output", output))


def vision_hidden_states(model: nn.Module, pixel_values) -> tuple:
    """Every hidden state of the vision tower (index 0: embeddings) for ``pixel_values``.

    transformers 5.x hands them out through ``get_image_features(output_hidden_states=True)``; 4.57's
    ``get_image_features`` returns the features only.
    """
    if transformers_version()[0] < 5:
        # 4.57's get_image_features asks the tower for every hidden state but returns only the features:
        # catch them on the way, so the call (projector stage included) is the one the model makes.
        caught: list = []
        hook = llava_core(model).vision_tower.register_forward_hook(
            lambda module, args, output: caught.append(output.hidden_states)
        )
        try:
            image_feature_owner(model).get_image_features(pixel_values=pixel_values)
        finally:
            hook.remove()
        return tuple(caught[-1])
    output = image_feature_owner(model).get_image_features(
        pixel_values=pixel_values, output_hidden_states=True, return_dict=True
    )
    return tuple(output.hidden_states)


def config_geometry(hf_config, resize: ImageResize | None = None) -> TowerGeometry:
    """The tower geometry of a LLaVA Hugging Face config (``LlavaConfig``), without a model.

    What prompt processing without weights (vLLM) and the tools count with; ``resize`` is the
    image processor's rule (None: every image at the tower's native size).

    Raises:
        ValueError: a tower, feature layer or feature selection the adapter does not support.
    """
    strategy = hf_config.vision_feature_select_strategy
    if strategy not in FEATURE_SELECT_STRATEGIES:
        allowed = ", ".join(FEATURE_SELECT_STRATEGIES)
        raise ValueError(f"unsupported vision_feature_select_strategy={strategy!r}; supported: {allowed}")
    return tower_config_geometry(
        hf_config.vision_config, hf_config.vision_feature_layer, strategy == "default", resize=resize
    )


def _size_field(size, name: str) -> int | None:
    """One field of an image processor's ``size`` / ``crop_size`` (a dict, or transformers' ``SizeDict``)."""
    if size is None:
        return None
    value = size.get(name) if isinstance(size, dict) else getattr(size, name, None)
    return None if value is None else int(value)


def unreadable_resize(description: str) -> ImageResize:
    """A resize rule that refuses to answer, naming the image processor settings it could not read."""

    def resize(height: int, width: int) -> tuple[int, int]:
        raise ValueError(
            f"cannot tell the size {description} makes of a {height}x{width} image; supported: "
            "size={'shortest_edge': ...} or {'height': ..., 'width': ...}, with or without a centre crop"
        )

    return resize


def image_processor_resize(image_processor) -> ImageResize:
    """A CLIP / SigLIP image processor's resize rule: ``do_resize`` + ``size``, ``do_center_crop`` + ``crop_size``."""
    size = getattr(image_processor, "size", None)
    crop = getattr(image_processor, "crop_size", None)
    name = type(image_processor).__name__
    if getattr(image_processor, "do_center_crop", False) and crop is not None:
        crop_height, crop_width = _size_field(crop, "height"), _size_field(crop, "width")
        if crop_height is None or crop_width is None:
            return unreadable_resize(f"{name} (crop_size={crop})")
        # Whatever the resize made of the image, the centre crop (padding where smaller) fixes the size.
        return ResizeAndCrop(crop=(crop_height, crop_width))
    if not getattr(image_processor, "do_resize", True) or size is None:
        return ResizeAndCrop()
    shortest, height, width = (_size_field(size, field) for field in ("shortest_edge", "height", "width"))
    # A longest_edge cap next to shortest_edge rounds in its own way: not modelled, so refused.
    if shortest is not None and _size_field(size, "longest_edge") is None:
        return ResizeAndCrop(shortest_edge=shortest)
    if height is not None and width is not None:
        return ResizeAndCrop(size=(height, width))
    return unreadable_resize(f"{name} (size={size})")


def logits_from_tower_features(
    model: nn.Module, features: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """``[B, L, V]`` logits with tower ``features`` (``[B, n, C]``, already selected) at the image tokens.

    The model's own forward after its vision tower (projector, scatter into the image-token
    positions, language model, head), so a frozen tower's features can be computed once and
    the rest trained.
    """
    core = llava_core(model)
    image_positions = input_ids == core.config.image_token_id
    embeddings = core.get_input_embeddings()(input_ids.masked_fill(image_positions, 0))
    projected = core.multi_modal_projector(features).to(embeddings.dtype)
    embeddings = embeddings.masked_scatter(image_positions.unsqueeze(-1), projected.reshape(-1, projected.shape[-1]))
    hidden = core.language_model(inputs_embeds=embeddings, attention_mask=attention_mask).last_hidden_state
    return model.lm_head(hidden)


# transformers' own check (get_placeholder_mask), 4.x and 5.x.
TRANSFORMERS_MISMATCH = "Image features and image tokens do not match"


def count_image_placeholders(core: nn.Module, image_token_id: int, input_ids, inputs_embeds) -> int:
    """Image-token positions in ``input_ids`` (or, without them, embeddings equal to the image token's)."""
    if input_ids is not None and input_ids.numel() > 0:
        return int((input_ids == image_token_id).sum())
    if inputs_embeds is None:
        return 0
    token = torch.full((), image_token_id, dtype=torch.long, device=inputs_embeds.device)
    image_embedding = core.get_input_embeddings()(token)
    return int((inputs_embeds == image_embedding).all(-1).sum())


def count_encoded_image_tokens(pooler_output) -> int:
    """Visual tokens in pre-encoded image features: a list of ``[n_i, D]`` or a ``[N, n, D]`` tensor."""
    if isinstance(pooler_output, torch.Tensor):
        return int(pooler_output.shape[0] * pooler_output.shape[1]) if pooler_output.dim() == 3 else len(pooler_output)
    return sum(len(features) for features in pooler_output)


class PlaceholderCheck(Hook):
    """Says what to do when a prompt's image placeholders do not match the patched token count.

    A prompt built by the unpatched processor holds the unpatched count. transformers then
    fails with "Image features and image tokens do not match" (greedy decoding), or, with
    ``num_beams > 1``, ``generate`` cannot split the pre-encoded features between the beams
    (it matches cumulative placeholder counts against cumulative feature counts) and hands
    the model an empty feature list (``torch.cat(): expected a non-empty list``). This
    override of the core model's forward compares the counts first whenever features come
    pre-encoded, and adds the remedy to transformers' own error otherwise.

    Args:
        core: the module holding the vision tower and the language model (``LlavaModel``).
        image_token_id: the placeholder token.
        num_visual_tokens: visual tokens per image under the patch (native size).
    """

    def __init__(self, core: nn.Module, image_token_id: int, num_visual_tokens: int) -> None:
        self.core = core
        self.image_token_id = image_token_id
        self.num_visual_tokens = num_visual_tokens
        # The feature selection the patch was planned for: a change after patching would be silently ignored.
        self.planned_selection = self._feature_selection()
        self._installed = False

    def _feature_selection(self) -> tuple:
        config = self.core.config
        return single_feature_layer(config.vision_feature_layer), config.vision_feature_select_strategy

    def _check_feature_selection(self) -> None:
        selection = self._feature_selection()
        if selection != self.planned_selection:
            raise ValueError(
                f"(vision_feature_layer, vision_feature_select_strategy) changed from {self.planned_selection} to "
                f"{selection} after patching; the patch is planned for the first: call handle.unpatch() and patch "
                "again after changing them"
            )

    def install(self) -> None:
        override_forward(self.core, self._make_forward)
        self._installed = True

    def remove(self) -> None:
        # Only an override this check put in: after a failed install the core's forward is someone else's.
        if self._installed:
            restore_forward(self.core)
            self._installed = False

    def remedy(self) -> str:
        return (
            f"the model is patched by pitome_mllm and gives {self.num_visual_tokens} visual tokens per image "
            "(handle.num_visual_tokens), so each image needs that many placeholders: pass the processor to "
            "pitome_mllm.patch(model, processor, ...) and build the inputs with it after patching, or put "
            "handle.visual_tokens_for_image(h, w) placeholders per image into the prompt yourself"
        )

    def _check_encoded(self, args: tuple, kwargs: dict) -> None:
        encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")
        pooler_output = getattr(encoded, "pooler_output", None)
        if pooler_output is None:
            return
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        placeholders = count_image_placeholders(self.core, self.image_token_id, input_ids, kwargs.get("inputs_embeds"))
        features = count_encoded_image_tokens(pooler_output)
        if placeholders != features:
            raise ValueError(
                f"the prompts hold {placeholders} image placeholders, the encoded images {features} visual tokens; "
                + self.remedy()
            )

    def _make_forward(self, original_forward):
        @functools.wraps(original_forward)
        def forward(*args, **kwargs):
            self._check_feature_selection()
            self._check_encoded(args, kwargs)
            try:
                return original_forward(*args, **kwargs)
            except ValueError as error:
                if TRANSFORMERS_MISMATCH in str(error):
                    raise ValueError(f"{error}; {self.remedy()}") from error
                raise

        return forward


@dataclass(frozen=True)
class PromptText:
    """The text of a prompt batch, read once when the prompt is recorded.

    Attributes:
        placeholders: image placeholders in the whole batch.
        images_per_row: images each row of the batch holds (its placeholders over the per-image count).
        text: one tensor ``[T_r, D]`` per row: the input embeddings of the row's text tokens (``T_r``
            may be 0).
    """

    placeholders: int
    images_per_row: tuple[int, ...]
    text: tuple[torch.Tensor, ...]


class PromptInstructions(Hook):
    """The prompt text of every image, for instruction-conditioned selection (``cdpruner``).

    LLaVA has no text tower: the instruction is the language model's own input embeddings of
    the prompt's text tokens (every token of the row that holds the image's placeholders, less
    the placeholders, padding and special tokens). The prompt is recorded where it is seen
    before the images are encoded: a forward pre-hook on the core model (a plain forward) and an
    override of ``generate`` (which encodes the images before its first forward, transformers
    5.19 on); it is cleared after each, so a later pixel-only call cannot pick up a stale prompt.

    Choosing the text tokens depends on the values of the prompt (how many, in which row), work
    for the host: it is done when a prompt comes with images, before they are encoded, so the
    image path (tower, projector stage) runs without a host round trip and compiles whole.

    Args:
        model: the whole model (its ``generate`` is wrapped).
        core: the module holding the embeddings and the image token (``LlavaModel``).
        num_visual_tokens: placeholders per image under the patch.
    """

    def __init__(self, model: nn.Module, core: nn.Module, num_visual_tokens: int) -> None:
        self.model = model
        self.core = core
        self.num_visual_tokens = num_visual_tokens
        self.image_token_id = core.config.image_token_id
        self._prompt: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._text: PromptText | None = None  # of ``_prompt``, once read
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._model_overrides = InstanceOverrides(model)

    def install(self) -> None:
        self._hooks.append(self.core.register_forward_pre_hook(self._record_forward, with_kwargs=True))
        self._hooks.append(self.core.register_forward_hook(self._clear_after, with_kwargs=True))
        if hasattr(self.model, "generate"):
            original_generate = self.model.generate

            @functools.wraps(original_generate)
            def generate(*args, **kwargs):
                input_ids = kwargs.get("input_ids", args[0] if args else None)
                self._set(input_ids, kwargs.get("attention_mask"), kwargs.get("pixel_values") is not None)
                try:
                    return original_generate(*args, **kwargs)
                finally:
                    self._clear()

            self._model_overrides.set("generate", generate)

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self._model_overrides.restore()
        self._clear()

    def _set(self, input_ids, attention_mask, with_images: bool) -> None:
        """Record a prompt; read its text now when ``with_images`` (its images are encoded next)."""
        if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2:
            self._prompt = (input_ids, attention_mask if isinstance(attention_mask, torch.Tensor) else None)
            self._text = None
        if with_images and self._prompt is not None and self._text is None:
            self._text = self._read_text(*self._prompt)

    def _clear(self) -> None:
        self._prompt = None
        self._text = None

    def _record_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        pixel_values = kwargs.get("pixel_values", args[1] if len(args) > 1 else None)
        self._set(input_ids, kwargs.get("attention_mask"), pixel_values is not None)

    def _clear_after(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        self._clear()

    def _special_ids(self) -> set[int]:
        ids = {self.image_token_id}
        for config in (self.core.config, getattr(self.core.config, "text_config", None)):
            for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
                value = getattr(config, name, None)
                ids.update(value if isinstance(value, (list, tuple)) else [value] if isinstance(value, int) else [])
        return ids

    def _read_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> PromptText:
        """The `PromptText` of ``input_ids`` ``[R, L]`` (``attention_mask`` ``[R, L]`` or None)."""
        placeholders = (input_ids == self.image_token_id).sum(dim=1)
        images_per_row = torch.div(placeholders, max(1, self.num_visual_tokens), rounding_mode="floor")
        special = torch.tensor(sorted(self._special_ids()), device=input_ids.device)
        is_text = ~torch.isin(input_ids, special)
        if attention_mask is not None:
            is_text &= attention_mask.bool()
        embeddings = self.core.get_input_embeddings()
        with torch.no_grad():
            text = tuple(embeddings(input_ids[row][is_text[row]]).detach() for row in range(input_ids.shape[0]))
        return PromptText(int(placeholders.sum()), tuple(images_per_row.tolist()), text)

    def __call__(self, num_images: int) -> list[torch.Tensor]:
        """``num_images`` tensors ``[T_b, D]``: the prompt embeddings of each image, in placeholder order.

        Raises:
            ValueError: no prompt came with these images (the projector was called from pixel
                values alone), or the prompt's placeholders do not hold ``num_images`` images.
        """
        if self._prompt is None:
            raise ValueError(
                "method='cdpruner' selects the visual tokens relevant to the prompt, but these images came "
                "without one (pixel values only, e.g. get_image_features or encode_images); call the model's "
                "forward or generate with input_ids"
            )
        if self._text is None:  # images encoded by a call that did not name its pixel values
            self._text = self._read_text(*self._prompt)
        prompt = self._text
        if sum(prompt.images_per_row) != num_images:
            raise ValueError(
                f"method='cdpruner' needs each image's prompt: the prompts hold {prompt.placeholders} image "
                f"placeholders ({self.num_visual_tokens} per image), not {num_images} images"
            )
        instructions = []
        for text, count in zip(prompt.text, prompt.images_per_row, strict=True):
            if text.shape[0] == 0:
                raise ValueError("method='cdpruner' found a prompt with no text token to condition on")
            instructions.extend([text] * count)
        return instructions


def matches(model: nn.Module) -> bool:
    from transformers import LlavaForConditionalGeneration, LlavaModel

    return isinstance(model, (LlavaForConditionalGeneration, LlavaModel))


def llava_parts(model: nn.Module, supported: str = "", several_layers: bool = False) -> ModelParts:
    """The `ModelParts` of a transformers LLaVA-style model (also NeXT / OneVision: same names).

    ``several_layers``: a list ``vision_feature_layer`` is allowed (a tower that is not merged
    reads them all); ``last_layer`` is then the encoder's last layer.
    """
    llava = llava_core(model)
    strategy = llava.config.vision_feature_select_strategy
    if strategy not in FEATURE_SELECT_STRATEGIES:
        allowed = ", ".join(FEATURE_SELECT_STRATEGIES)
        raise ValueError(f"unsupported vision_feature_select_strategy={strategy!r}; supported: {allowed}")
    layers = clip_encoder_layers(llava.vision_tower)
    feature_layer = single_feature_layer(llava.config.vision_feature_layer)
    if several_layers and isinstance(feature_layer, (list, tuple)):
        last_layer = len(layers) - 1
    else:
        last_layer = last_encoder_layer(feature_layer, len(layers), supported or SUPPORTED)

    def encode_images(pixel_values, **kwargs) -> list:
        return image_features_per_image(model, pixel_values, **kwargs)

    def hidden_states(pixel_values) -> tuple:
        return vision_hidden_states(model, pixel_values)

    return ModelParts(
        tower=llava.vision_tower,
        projector=llava.multi_modal_projector,
        language_model=getattr(llava, "language_model", None),
        encoder_layers=layers,
        feature_layer=feature_layer,
        last_layer=last_layer,
        drops_class_token=strategy == "default",
        encode_images=encode_images,
        vision_hidden_states=hidden_states,
        image_feature_owner=image_feature_owner(model),
        image_feature_method="get_image_features",
        decoder=DecoderShape.from_config(llava.config.text_config),
        output_head=getattr(model, "lm_head", None),
    )


def processor_output_size(processor) -> tuple[int, int]:
    """``(height, width)`` of every image the processor's image processor produces (transformers 4.x path).

    Raises:
        ValueError: the image processor keeps each image's aspect ratio, so no single size exists.
    """
    image_processor = processor.image_processor
    rule = image_processor_resize(image_processor)
    fixed_size = getattr(rule, "fixed_size", None)
    if fixed_size is not None:
        return fixed_size
    size = getattr(image_processor, "size", None) or {}
    crop = getattr(image_processor, "crop_size", None)
    raise ValueError(
        f"{type(image_processor).__name__} (size={size}, crop_size={crop}) does not give every image one size; "
        "with transformers 4.x, patch() needs a fixed output size (center crop or height/width resize) to set "
        "the number of image placeholders"
    )


class LlavaHFAdapter(ClipTowerAdapter):
    """Patches a transformers LLaVA model and makes its processor emit the merged token count."""

    family = FAMILY
    supported = SUPPORTED
    options = frozenset({"llm_prop_attn"})

    matches = staticmethod(matches)

    @classmethod
    def parts(cls, model: nn.Module) -> ModelParts:
        return llava_parts(model, cls.supported)

    @classmethod
    def image_resize(cls, processor) -> ImageResize | None:
        """The image processor's resize and centre crop (LLaVA-1.5: shortest edge, then the native crop)."""
        image_processor = getattr(processor, "image_processor", None)
        return None if image_processor is None else image_processor_resize(image_processor)

    def __init__(self, model: nn.Module, processor, config: PiToMeConfig) -> None:
        super().__init__(model, processor, config)
        llava = llava_core(model)
        # (height, width) the processor's own placeholder formula is set for (transformers 4.x), else None.
        self._processor_image_size: tuple[int, int] | None = None
        if processor is not None:
            self._check_processor(processor)
        self.processor_count = ProcessorOverrides(processor, self._processor_count_overrides, type(model).__name__)
        self.placeholder_check = PlaceholderCheck(llava, llava.config.image_token_id, self.num_visual_tokens)
        self.llm_prop_attention = self._llm_prop_attention(llava) if config.llm_prop_attn else None

    def hooks(self) -> list[Hook]:
        """Tower, prompt recorder (cdpruner), projector stage; then the processor's count, the placeholder
        check and proportional attention in the language model."""
        processor = [self.processor_count] if self.processor is not None else []
        prop_attn = [self.llm_prop_attention] if self.llm_prop_attention is not None else []
        return [*super().hooks(), *processor, self.placeholder_check, *prop_attn]

    def _instruction_source(self) -> PromptInstructions:
        # Called while the base class builds the selection stage; the base lists it among the hooks.
        return PromptInstructions(self.model, llava_core(self.model), self.config.target_tokens)

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
            self.state,
            cache_mask_sizes,
        )

    # ------------------------------------------------------------- processor
    def _check_processor(self, processor) -> None:
        if all(hasattr(processor, name) for name in _PROCESSOR_METHODS):
            return
        if all(getattr(processor, name, None) is not None for name in _PROCESSOR_ATTRIBUTES_4X):
            self._processor_image_size = processor_output_size(processor)
            return
        raise ValueError(
            f"processor {type(processor).__name__} lacks {[n for n in _PROCESSOR_METHODS if not hasattr(processor, n)]}"
            "; pass a transformers LlavaProcessor (or processor=None and emit handle.num_visual_tokens placeholders "
            "yourself)"
        )

    def _processor_count_overrides(self) -> dict[str, object]:
        """The processor methods (or, on transformers 4.57, the attribute) that make it emit the merged count."""
        if self._processor_image_size is not None:
            return self._processor_count_overrides_4x()
        processor = self.processor
        original_count = processor._get_num_multimodal_tokens
        image_token = processor.image_token

        @functools.wraps(processor.replace_image_token)
        def replace_image_token(image_inputs: dict, image_idx: int, **kwargs) -> str:
            height, width = image_inputs["pixel_values"][image_idx].shape[-2:]
            return image_token * self.budget.visual_tokens_for_pixels(int(height), int(width))

        @functools.wraps(original_count)
        def get_num_multimodal_tokens(image_sizes=None, **kwargs):
            data = original_count(image_sizes=image_sizes, **kwargs)
            counts = getattr(data, "num_image_tokens", None)
            if counts is not None:
                data.num_image_tokens = [self.visual_tokens_for(n + int(self.drops_class_token)) for n in counts]
            return data

        return {"replace_image_token": replace_image_token, "_get_num_multimodal_tokens": get_num_multimodal_tokens}

    def _processor_count_overrides_4x(self) -> dict[str, object]:
        """transformers 4.57: make the processor's own formula give the merged count.

        Its formula depends on the image only through the size of the first processed image, which
        the image processor fixes (`processor_output_size`); ``num_additional_image_tokens`` is set so
        that the formula gives ``visual_tokens_for`` of that size.
        """
        processor = self.processor
        height, width = self._processor_image_size
        patches = (height // processor.patch_size) * (width // processor.patch_size)
        dropped = 1 if processor.vision_feature_select_strategy == "default" else 0
        merged = self.budget.visual_tokens_for_pixels(height, width)
        return {"num_additional_image_tokens": merged - patches + dropped}
