"""Adapter for the original LLaVA code (the ``llava`` package, llava-torch 1.2.x).

Everything specific to this family lives here: the CLIP tower sits behind
``model.get_vision_tower().vision_tower`` (a transformers ``CLIPVisionModel``), the
projector is ``model.get_model().mm_projector``, and the config's
``mm_vision_select_layer`` / ``mm_vision_select_feature`` pick the features.

No processor changes are needed: the prompt carries one ``IMAGE_TOKEN_INDEX`` (-200)
per image and ``prepare_inputs_labels_for_multimodal`` splices in however many
features the projector returns, so a merged (shorter) sequence flows through as is.

This module also holds the ``generate`` compatibility wrapper: llava-torch 1.2.2's
``LlavaLlamaForCausalLM.forward`` predates the ``cache`` / ``cache_position``
keywords that ``generate`` passes on transformers 5.x, so generation fails there
without it. `patch` installs it when the signature shows it is needed;
`enable_generate_compat` offers it without patching.

Importing this module does not import ``llava``: the registry asks every adapter
whether it `matches` a model, and most users do not have the package.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..config import PiToMeConfig
from ..hooks.base import is_overridden, override_forward, restore_forward
from .clip_tower import ClipTowerAdapter, clip_encoder_layers, last_encoder_layer
from .protocol import ModelParts

FAMILY = "llava_original"
SUPPORTED = (
    "original LLaVA (`llava` package, llava-torch 1.2.x) LlavaLlamaForCausalLM / LlavaMistralForCausalLM "
    "with a CLIP vision tower and mm_patch_merge_type='flat'"
)
SUPPORTED_MERGE_TYPES = ("flat",)
# mm_vision_select_feature -> does the model drop the class token before the projector?
SELECT_FEATURES = {"patch": True, "cls_patch": False}
# (module, class) of the supported causal LMs; looked up in sys.modules, never imported.
_MODEL_CLASSES = (
    ("llava.model.language_model.llava_llama", "LlavaLlamaForCausalLM"),
    ("llava.model.language_model.llava_mistral", "LlavaMistralForCausalLM"),
)
# Keywords that transformers 5.x `generate` passes to the model's forward.
_GENERATE_KEYWORDS = ("cache", "cache_position")
# Marks our wrapper, so a model is never wrapped twice (patch after enable_generate_compat).
_COMPAT_MARK = "_pitome_generate_compat"


def _supported_classes() -> tuple[type, ...]:
    """The supported classes whose modules are already imported.

    A model of one of these classes can only exist once its module is imported, so
    looking in ``sys.modules`` answers `matches` without importing ``llava``.
    """
    classes = []
    for module_name, class_name in _MODEL_CLASSES:
        module = sys.modules.get(module_name)
        cls = getattr(module, class_name, None) if module is not None else None
        if cls is not None:
            classes.append(cls)
    return tuple(classes)


def matches(model: nn.Module) -> bool:
    classes = _supported_classes()
    return bool(classes) and isinstance(model, classes)


# ------------------------------------------------------------------ generate compatibility
def _transformers_forward(model: nn.Module, name: str = "forward") -> Callable | None:
    """The forward (or method ``name``) of the transformers class the llava class derives from
    (e.g. LlamaForCausalLM's forward, GenerationMixin's prepare_inputs_for_generation)."""
    for cls in type(model).__mro__[1:]:
        if cls.__module__.startswith("transformers.") and name in cls.__dict__:
            return cls.__dict__[name]
    return None


def _accepted_keywords(function: Callable) -> tuple[set[str], bool]:
    """``(parameter names, accepts **kwargs)`` of ``function``."""
    parameters = inspect.signature(function).parameters.values()
    names = {parameter.name for parameter in parameters}
    var_keyword = any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters)
    return names, var_keyword


def needs_generate_compat(model: nn.Module) -> bool:
    """Whether ``generate`` would pass keywords the model's own forward rejects.

    True when the transformers base class's forward takes ``cache`` or ``cache_position``
    (so ``generate`` passes them) and the llava forward takes neither them nor ``**kwargs``.
    Decided on the class's forward, not the instance's, so it does not change once wrapped.
    """
    base_forward = _transformers_forward(model)
    if base_forward is None:
        return False
    base_names, _ = _accepted_keywords(base_forward)
    own_names, own_var_keyword = _accepted_keywords(type(model).forward)
    if own_var_keyword:
        return False
    return any(name in base_names and name not in own_names for name in _GENERATE_KEYWORDS)


def _make_compat_forward(original_forward: Callable) -> Callable:
    # wraps() sets __wrapped__, so inspect.signature(model.forward) still shows the
    # original parameters: generate() reads them to decide whether to build
    # position_ids and attention masks, and must decide as it would unwrapped.
    @functools.wraps(original_forward)
    def forward(*args, cache=None, cache_position=None, **kwargs):
        # transformers 5.x renamed past_key_values to cache; llava passes
        # past_key_values on to LlamaForCausalLM, which still accepts it. The cache
        # position is recomputed from the cache length when it is absent.
        if cache is not None and kwargs.get("past_key_values") is None:
            kwargs["past_key_values"] = cache
        return original_forward(*args, **kwargs)

    setattr(forward, _COMPAT_MARK, True)
    return forward


def _ignore_llava_past_key_values_warning() -> None:
    """Ignore the one deprecation transformers 5.x raises at llava's own forward.

    llava's forward hands ``past_key_values=`` on to ``LlamaForCausalLM.forward`` itself, which
    takes ``cache`` now and warns on every generation step; avoiding the keyword would mean
    forking llava's multimodal input preparation. The filter matches only that message and only
    when raised from llava's modules, so every other warning still shows.
    """
    warnings.filterwarnings(
        "ignore",
        message=r"`past_key_values` is deprecated",
        category=FutureWarning,
        module=r"llava\.model\.",
    )


def needs_quiet_prepare(model: nn.Module) -> bool:
    """Whether llava's ``prepare_inputs_for_generation`` hands ``past_key_values=None`` on
    explicitly to a transformers version that renamed it ``cache``: transformers then warns
    ("Both `past_key_values` and `cache` are set") on every generate call."""
    own = type(model).__dict__.get("prepare_inputs_for_generation")
    base = _transformers_forward(model, "prepare_inputs_for_generation")
    if own is None or base is None:
        return False
    return "past_key_values" in _accepted_keywords(own)[0] and "cache" in _accepted_keywords(base)[0]


def _quiet_prepare_inputs(model: nn.Module) -> Callable:
    """llava's ``prepare_inputs_for_generation`` (llava/model/language_model/llava_llama.py),
    passing ``past_key_values`` on only when it holds a cache."""
    base = _transformers_forward(model, "prepare_inputs_for_generation").__get__(model)

    def prepare_inputs_for_generation(input_ids, past_key_values=None, inputs_embeds=None, **kwargs):
        extras = {key: kwargs.pop(key, None) for key in ("images", "image_sizes")}
        if past_key_values is not None:
            kwargs["past_key_values"] = past_key_values
        inputs = base(input_ids, inputs_embeds=inputs_embeds, **kwargs)
        inputs.update({key: value for key, value in extras.items() if value is not None})
        return inputs

    return prepare_inputs_for_generation


def has_generate_compat(model: nn.Module) -> bool:
    """Whether ``model.forward`` is the compatibility wrapper."""
    return is_overridden(model) and getattr(model.__dict__.get("forward"), _COMPAT_MARK, False)


class GenerateCompat:
    """The compatibility wrapper on one model; `remove` restores ``forward`` exactly.

    Attributes:
        installed: this object put the wrapper on (False when it was not needed or
            was already there; `remove` then leaves the model alone).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.installed = False
        self.quiet_prepare = False  # this object set the instance's prepare_inputs_for_generation

    def install(self) -> GenerateCompat:
        if needs_generate_compat(self.model) and not has_generate_compat(self.model):
            override_forward(self.model, _make_compat_forward)
            self.installed = True
        if needs_generate_compat(self.model):
            _ignore_llava_past_key_values_warning()
        if needs_quiet_prepare(self.model) and "prepare_inputs_for_generation" not in self.model.__dict__:
            self.model.prepare_inputs_for_generation = _quiet_prepare_inputs(self.model)
            self.quiet_prepare = True
        return self

    def remove(self) -> None:
        if self.installed:
            restore_forward(self.model)
            self.installed = False
        if self.quiet_prepare:
            del self.model.__dict__["prepare_inputs_for_generation"]
            self.quiet_prepare = False

    def __enter__(self) -> GenerateCompat:
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()


def enable_generate_compat(model: nn.Module) -> GenerateCompat:
    """Make ``model.generate`` work on transformers 5.x without patching any merging.

    Maps the ``cache`` keyword to ``past_key_values`` and drops ``cache_position`` when
    the model's forward does not accept them; a no-op where it does (older transformers,
    newer llava). Returns a handle whose ``remove()`` (or ``with`` exit) undoes it.
    `pitome_mllm.patch` installs the same wrapper itself when needed.
    """
    return GenerateCompat(model).install()


# ----------------------------------------------------------------------------- adapter
def _merge_type(model: nn.Module) -> str:
    return getattr(model.config, "mm_patch_merge_type", "flat")


class LlavaOriginalAdapter(ClipTowerAdapter):
    """Patches an original-LLaVA causal LM; no processor changes (``processor`` is ignored).

    Args:
        model: a ``LlavaLlamaForCausalLM`` / ``LlavaMistralForCausalLM`` whose vision tower
            is loaded (``load_pretrained_model`` does this; a model built from a config
            needs ``model.get_vision_tower().load_model()``).
        processor: None or the llava image processor; either way it is left untouched,
            because the model counts image features itself.
        config: the validated config.
    """

    family = FAMILY
    supported = SUPPORTED
    # One IMAGE_TOKEN_INDEX per image; the model splices in however many features there are.
    processor_counts_placeholders = False
    matches = staticmethod(matches)

    @classmethod
    def parts(cls, model: nn.Module) -> ModelParts:
        merge_type = _merge_type(model)
        if merge_type not in SUPPORTED_MERGE_TYPES:
            raise ValueError(
                f"unsupported mm_patch_merge_type={merge_type!r} (anyres / spatial layouts need the full "
                f"patch grid); supported: {', '.join(SUPPORTED_MERGE_TYPES)}"
            )
        tower_wrapper = model.get_vision_tower()
        if tower_wrapper is None:
            raise ValueError(f"{type(model).__name__} has no vision tower (config lacks mm_vision_tower)")
        if not getattr(tower_wrapper, "is_loaded", False):
            raise ValueError(
                "the vision tower is not loaded yet; call model.get_vision_tower().load_model() first "
                "(llava.model.builder.load_pretrained_model does this)"
            )
        # What the tower wrapper actually reads (set from the config when it was built).
        select_layer = getattr(tower_wrapper, "select_layer", model.config.mm_vision_select_layer)
        select_feature = getattr(
            tower_wrapper, "select_feature", getattr(model.config, "mm_vision_select_feature", "patch")
        )
        if select_feature not in SELECT_FEATURES:
            raise ValueError(
                f"unsupported mm_vision_select_feature={select_feature!r}; supported: {', '.join(SELECT_FEATURES)}"
            )
        layers = clip_encoder_layers(tower_wrapper.vision_tower)

        def encode_images(pixel_values, **kwargs) -> list:
            # llava's own tower + projector call (prepare_inputs_labels_for_multimodal uses it).
            return list(model.encode_images(pixel_values))

        def vision_hidden_states(pixel_values) -> tuple:
            return tuple(tower_wrapper.vision_tower(pixel_values, output_hidden_states=True).hidden_states)
        return ModelParts(
            vision_tower=tower_wrapper.vision_tower,
            projector=model.get_model().mm_projector,
            language_model=model.get_model(),
            encoder_layers=layers,
            feature_layer=select_layer,
            last_layer=last_encoder_layer(select_layer, len(layers), cls.supported),
            drops_class_token=SELECT_FEATURES[select_feature],
            encode_images=encode_images,
            vision_hidden_states=vision_hidden_states,
            image_feature_owner=model,
            image_feature_method="encode_images",
        )

    def __init__(self, model: nn.Module, processor, config: PiToMeConfig) -> None:
        super().__init__(model, processor, config)
        self.generate_compat = GenerateCompat(model)

    def _install_extra(self) -> None:
        self.generate_compat.install()

    def _remove_extra(self) -> None:
        self.generate_compat.remove()




# ----------------------------------------------------------------------------- loading
# Quantising the projector would change the features the merges are decided on; the
# vision tower is loaded separately by llava (never quantised), listed for safety.
QUANTIZATION_SKIP_MODULES = ["model.vision_tower", "model.mm_projector", "lm_head"]


def _quantization_config(load_in_4bit: bool, load_in_8bit: bool, compute_dtype: torch.dtype):
    """A ``BitsAndBytesConfig`` for the language model only, or None.

    Passed to ``from_pretrained`` directly: llava's own ``load_4bit`` / ``load_8bit`` also
    pass ``load_in_*bit`` keywords that transformers 5.x no longer accepts.
    """
    if load_in_4bit and load_in_8bit:
        raise ValueError("choose one of load_in_4bit and load_in_8bit, not both")
    if not (load_in_4bit or load_in_8bit):
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError("4/8-bit loading needs bitsandbytes: pip install 'pitome-mllm[quant]'")
    from transformers import BitsAndBytesConfig

    if load_in_4bit:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_use_double_quant=True,
            bnb_4bit_quant_type="nf4",  # what llava's builder uses
            llm_int8_skip_modules=list(QUANTIZATION_SKIP_MODULES),
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(QUANTIZATION_SKIP_MODULES))


def require_llava() -> None:
    """Raise an ImportError that says how to install the ``llava`` package."""
    try:
        import llava.model  # noqa: F401
    except ImportError as error:
        raise ImportError(
            "the original LLaVA code is not installed: pip install --no-deps llava-torch==1.2.2.post1 "
            f"(see docs/llava_original.md) ({error})"
        ) from error
    # llava/model/__init__.py swallows import errors with a bare except; import the
    # class directly so a broken install shows its real cause.
    import llava.model.language_model.llava_llama  # noqa: F401


def load_llava_original(
    model_path: str | Path,
    model_base: str | None = None,
    *,
    model_name: str | None = None,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    attn_implementation: str | None = None,
):
    """Load a checkpoint with ``llava.model.builder.load_pretrained_model`` onto one device.

    Args:
        model_path: a folder or hub id, e.g. ``"liuhaotian/llava-v1.5-7b"``.
        model_base: base LLM for projector-only or LoRA checkpoints (as in llava).
        model_name: llava decides the architecture from the name (it must contain
            ``"llava"``); defaults to ``get_model_name_from_path(model_path)``.
        dtype: ``"auto"`` (float16 on GPUs, float32 on CPU), ``"float16"``, ``"bfloat16"``,
            ``"float32"`` or a ``torch.dtype``. llava's builder always loads float16; the
            model is cast afterwards.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``.
        load_in_4bit, load_in_8bit: quantise the language model (bitsandbytes); the
            vision tower and projector stay in ``dtype``.
        attn_implementation: e.g. ``"sdpa"`` or ``"eager"`` for the language model.

    Returns:
        ``(tokenizer, model, image_processor, context_len)`` as llava's builder returns them.
    """
    require_llava()
    from llava.mm_utils import get_model_name_from_path
    from llava.model.builder import load_pretrained_model

    from ..runtime.loading import resolve_device, resolve_dtype

    target_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target_device)
    model_name = model_name or get_model_name_from_path(str(model_path))
    if "llava" not in model_name.lower():
        raise ValueError(
            f"llava's builder loads a multimodal model only when the model name contains 'llava'; "
            f"got {model_name!r}: pass model_name=..."
        )
    kwargs: dict = {}
    quantization = _quantization_config(load_in_4bit, load_in_8bit, torch_dtype)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    # A device string (not "auto") makes the builder place the model and the separately
    # loaded vision tower on that one device.
    device_name = str(target_device)
    tokenizer, model, image_processor, context_len = load_pretrained_model(
        str(model_path), model_base, model_name, device=device_name, device_map=device_name, **kwargs
    )
    if quantization is None:
        model.to(dtype=torch_dtype)
    else:
        # Quantised weights cannot be cast; the tower and projector can and must match.
        model.get_vision_tower().to(dtype=torch_dtype)
        model.get_model().mm_projector.to(dtype=torch_dtype)
    model.eval()
    return tokenizer, model, image_processor, context_len


# ------------------------------------------------------------------ prompts and images
DEFAULT_CONV_TEMPLATE = "vicuna_v1"


def build_prompt(
    turns, conv_template: str = DEFAULT_CONV_TEMPLATE, image_start_end: bool = False, num_images: int = 1
) -> str:
    """The prompt for a conversation about images, in an llava conversation template.

    Args:
        turns: ``(question, answer)`` pairs; the images go before the first question
            (unless it already holds ``<image>`` markers); the last answer is None (the
            one to generate).
        conv_template: a key of ``llava.conversation.conv_templates`` (LLaVA-1.5: ``vicuna_v1``).
        image_start_end: wrap the image token in ``<im_start>`` / ``<im_end>``
            (``model.config.mm_use_im_start_end``).
        num_images: image markers to put before the first question.
    """
    from llava.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_TOKEN
    from llava.conversation import conv_templates

    if conv_template not in conv_templates:
        raise ValueError(f"unknown conv_template {conv_template!r}; one of {sorted(conv_templates)}")
    if not turns:
        raise ValueError("a conversation needs at least one question")
    image_token = DEFAULT_IMAGE_TOKEN
    if image_start_end:
        image_token = DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN
    conversation = conv_templates[conv_template].copy()
    for index, (question, answer) in enumerate(turns):
        if index == 0 and num_images and DEFAULT_IMAGE_TOKEN not in question:
            question = " ".join([image_token] * num_images) + f"\n{question}"
        conversation.append_message(conversation.roles[0], question)
        conversation.append_message(conversation.roles[1], answer)
    return conversation.get_prompt()


def tokenize_prompt(prompt: str, tokenizer) -> torch.Tensor:
    """``[L]`` token ids of ``prompt`` with ``IMAGE_TOKEN_INDEX`` (-200) where each image goes."""
    from llava.constants import IMAGE_TOKEN_INDEX
    from llava.mm_utils import tokenizer_image_token

    return tokenizer_image_token(prompt, tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")


def prepare_images(images, image_processor, model: nn.Module) -> torch.Tensor:
    """``[N, 3, H, W]`` pixel values on the model's device and in its vision dtype."""
    from llava.mm_utils import process_images

    tower = model.get_vision_tower()
    pixel_values = process_images(list(images), image_processor, model.config)
    return pixel_values.to(device=tower.device, dtype=tower.dtype)


# ------------------------------------------------------------------- tiny offline model
def _tiny_llava_config(spec, tokenizer, tower_folder: Path):
    from llava.model.language_model.llava_llama import LlavaConfig

    from ..testing.tiny import tiny_llama_kwargs

    return LlavaConfig(
        **tiny_llama_kwargs(spec, tokenizer),
        # The multimodal fields a LLaVA-1.5 checkpoint's config.json carries.
        mm_vision_tower=str(tower_folder.resolve()),
        mm_hidden_size=spec.vision_hidden,
        mm_projector_type="mlp2x_gelu",
        mm_vision_select_layer=spec.vision_feature_layer,
        mm_vision_select_feature="patch",
        mm_patch_merge_type="flat",
        image_aspect_ratio="pad",
        mm_use_im_start_end=False,
        mm_use_im_patch_token=False,
        use_mm_proj=True,
        tokenizer_padding_side="right",
    )


def _tiny_vision_tower(spec):
    from transformers import CLIPVisionModel

    from ..testing.tiny import tiny_clip_vision_config

    vision_config = tiny_clip_vision_config(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        return CLIPVisionModel(vision_config)


def build_tiny_llava_original(folder: str | Path, spec=None, vision_tower: nn.Module | None = None):
    """A tiny random ``LlavaLlamaForCausalLM`` built offline, its tower saved under ``folder``.

    llava loads its CLIP tower and image processor by name, so they are written to
    ``folder / "vision_tower"`` and the config points there. Geometry and widths follow
    a `pitome_mllm.testing.tiny.TinyLlavaSpec` (default ``TEST_SPEC``); ``vision_tower``
    reuses a given ``CLIPVisionModel`` (e.g. a transformers LLaVA's, to compare families).

    Returns:
        ``(model, tokenizer, image_processor)``, the model in eval mode, float32.
    """
    require_llava()
    from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM
    from transformers import GenerationConfig

    from ..testing.tiny import TEST_SPEC, build_tiny_processor, build_tiny_tokenizer

    spec = spec or TEST_SPEC
    tower_folder = Path(folder) / "vision_tower"
    tower = vision_tower if vision_tower is not None else _tiny_vision_tower(spec)
    tower.save_pretrained(tower_folder)
    build_tiny_processor(spec.image_size, spec.patch_size).image_processor.save_pretrained(tower_folder)
    tokenizer = build_tiny_tokenizer()
    tokenizer.padding_side = "right"  # llava pads right itself and reads this from its config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = LlavaLlamaForCausalLM(_tiny_llava_config(spec, tokenizer, tower_folder))
    model.get_vision_tower().load_model()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    return model.float().eval(), tokenizer, model.get_vision_tower().image_processor


def save_tiny_llava_original(folder: str | Path, spec=None) -> Path:
    """Save a tiny model as an original-LLaVA checkpoint that ``load_pretrained_model`` loads offline.

    The folder name must contain ``llava`` for llava's builder to treat it as multimodal.
    Like real LLaVA-1.5 checkpoints, the weights leave out the CLIP tower, which is
    loaded from ``folder / "vision_tower"`` (the absolute path in ``config.json``).
    """
    folder = Path(folder)
    model, tokenizer, _ = build_tiny_llava_original(folder, spec)
    state = {name: value for name, value in model.state_dict().items() if ".vision_tower." not in name}
    model.save_pretrained(folder, state_dict=state)
    tokenizer.save_pretrained(folder)
    return folder


__all__ = [
    "DEFAULT_CONV_TEMPLATE",
    "FAMILY",
    "SUPPORTED",
    "GenerateCompat",
    "LlavaOriginalAdapter",
    "build_prompt",
    "build_tiny_llava_original",
    "enable_generate_compat",
    "has_generate_compat",
    "load_llava_original",
    "matches",
    "needs_generate_compat",
    "prepare_images",
    "require_llava",
    "save_tiny_llava_original",
    "tokenize_prompt",
]
