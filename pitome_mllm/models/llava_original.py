"""Adapter for the original LLaVA code (the ``llava`` package, llava-torch 1.2.x).

Everything specific to this family lives here: the CLIP tower sits behind
``model.get_vision_tower().vision_tower`` (a transformers ``CLIPVisionModel``), the
projector is ``model.get_model().mm_projector``, and the config's
``mm_vision_select_layer`` / ``mm_vision_select_feature`` pick the features.

No processor changes are needed: the prompt carries one ``IMAGE_TOKEN_INDEX`` (-200)
per image and ``prepare_inputs_labels_for_multimodal`` splices in however many
features the projector returns, so a merged (shorter) sequence flows through as is.

Loading checkpoints and building prompts live in `pitome_mllm.runtime.llava_original`,
tiny offline models in `pitome_mllm.zoo.tiny_llava_original`.

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
import inspect
import sys
import warnings
from collections.abc import Callable

from torch import nn

from ..config import ALL_METHODS, INSTRUCTION_METHODS, PiToMeConfig
from ..hooks.base import Hook, is_overridden, override_forward, restore_forward
from .clip_tower import ClipTowerAdapter, clip_encoder_layers, last_encoder_layer
from .protocol import DecoderShape, ModelParts

FAMILY = "llava_original"


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


class GenerateCompat(Hook):
    """The compatibility wrapper on one model (a `Hook`); `remove` restores ``forward`` exactly.

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
    # The prompt never reaches the projector (llava splices the features in afterwards).
    methods = tuple(method for method in ALL_METHODS if method not in INSTRUCTION_METHODS)
    method_refusals = {
        method: f"conditions the selection on each image's prompt, which the {FAMILY} family does not hand to the "
        "projector"
        for method in INSTRUCTION_METHODS
    }
    display_name = "original LLaVA"
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
            tower=tower_wrapper.vision_tower,
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
            # LlavaConfig is the Llama config itself; the head is the causal LM's.
            decoder=DecoderShape.from_config(model.config),
            output_head=getattr(model, "lm_head", None),
        )

    def __init__(self, model: nn.Module, processor, config: PiToMeConfig) -> None:
        super().__init__(model, processor, config)
        self.generate_compat = GenerateCompat(model)

    def hooks(self) -> list[Hook]:
        return [*super().hooks(), self.generate_compat]


# ----------------------------------------------------------------------------- loading
# Quantising the projector would change the features the merges are decided on; the
# vision tower is loaded separately by llava (never quantised), listed for safety.
QUANTIZATION_SKIP_MODULES = ["model.vision_tower", "model.mm_projector", "lm_head"]


__all__ = [
    "FAMILY",
    "QUANTIZATION_SKIP_MODULES",
    "SUPPORTED",
    "GenerateCompat",
    "LlavaOriginalAdapter",
    "enable_generate_compat",
    "has_generate_compat",
    "matches",
    "needs_generate_compat",
]
