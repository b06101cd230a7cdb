"""Tiny, randomly initialised Qwen2.5-VL and Qwen3-VL models with their real processors, built offline.

Like `pitome_mllm.zoo.tiny` for LLaVA: genuine transformers classes (``Qwen2_5_VLForConditionalGeneration``,
``Qwen3VLForConditionalGeneration``, ``Qwen2_5_VLProcessor``, ``Qwen3VLProcessor``, ``Qwen2VLImageProcessor``) with
tiny widths and seeded random weights, so a forward pass takes milliseconds on a CPU, but with the family's real
geometry: Conv3d patches (14 px for Qwen2.5-VL, 16 px for Qwen3-VL, temporal patch 2), 2 x 2 patch merger,
``smart_resize`` between ``min_pixels`` and ``max_pixels``, M-RoPE in the language model, window attention with
full-attention blocks (Qwen2.5-VL), DeepStack layers (Qwen3-VL).

Sizes of the tiny processors (`TINY_QWEN_PIXELS`): images of 56-280 px (Qwen2.5-VL) or 64-320 px (Qwen3-VL)
give grids of 4 to 100 merged tokens; larger images are scaled down to at most 100, smaller ones up to at least 4.

Video and torchvision
---------------------
transformers builds Qwen's *video* processors only with torchvision installed, and the processor classes check
each argument's class, so ``Qwen2_5_VLProcessor(image_processor, tokenizer, video_processor=None)`` raises without
torchvision (transformers 5.x: ``VIDEO_PROCESSOR_MAPPING has no attribute '_extra_content'``; 4.57 fails the same
check). `qwen_vl_processor` therefore runs the processor class's own ``__init__`` with that one check waived for a
missing video processor: the result is the real processor class with the real image processor and tokenizer, and
**no video without torchvision** (``processor(videos=...)`` fails; images and text work as usual). With torchvision
the real video processor is built and passed through the unmodified check. `load_qwen_vl_processor` reloads a saved
processor the same way (``AutoProcessor.from_pretrained`` needs torchvision for these classes on transformers 5.x).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast
from transformers.utils import is_torchvision_available

from ..models.compat import transformers_version
from .architecture_specs import REAL_QWEN_PIXELS, QwenTextShape, QwenVisionShape  # noqa: F401 (re-exported)
from .tiny import _TRAINING_CORPUS, TOKENIZER_VOCAB_SIZE, _image_processor_class, _instantiate

__all__ = [
    "QWEN_CHAT_TEMPLATE",
    "QWEN_FAMILIES",
    "QWEN_SPECIAL_TOKENS",
    "REAL_QWEN_PIXELS",
    "TINY_QWEN_PIXELS",
    "TinyQwenSpec",
    "build_qwen_tokenizer",
    "build_tiny_qwen_processor",
    "load_qwen_vl_processor",
    "qwen_image_processor",
    "qwen_vl_config",
    "qwen_vl_model_class",
    "qwen_vl_processor",
    "save_qwen_vl_processor",
    "save_tiny_qwen_vl",
    "tiny_qwen_spec",
    "tiny_qwen_vl",
    "tiny_qwen_vl_config",
]

QWEN_FAMILIES = ("qwen2.5-vl", "qwen3-vl")

# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
# Qwen's own order (ids 151643...), here from 0: <|endoftext|>=0, <|im_start|>=1, <|im_end|>=2, ...
QWEN_SPECIAL_TOKENS = [PAD_TOKEN, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD]

# Qwen2-VL's chat format without its default system prompt: content is a string or a list of
# {"type": "image"} / {"type": "video"} / {"type": "text", "text": ...} parts, kept in order.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'video' %}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_qwen_tokenizer() -> PreTrainedTokenizerFast:
    """A ~500-token byte-level BPE tokenizer with Qwen's special tokens, trained offline on the tiny corpus.

    Like Qwen's tokenizer it adds no BOS; ``<|im_end|>`` is EOS and ``<|endoftext|>`` pads (on the left, for
    batched generation). ``tokenizer.image_token`` / ``image_token_id`` name ``<|image_pad|>``, ``video_token``
    ``<|video_pad|>``; ``<|vision_start|>`` / ``<|vision_end|>`` are special tokens too. Deterministic.
    """
    backend = Tokenizer(models.BPE(unk_token=None))  # byte-level: every byte is in the alphabet
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=QWEN_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=1,
        show_progress=False,
    )
    backend.train_from_iterator(_TRAINING_CORPUS.strip().splitlines(), trainer=trainer)
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    return _tokenizer_class()(
        tokenizer_object=backend,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START, VISION_START, VISION_END],
        extra_special_tokens={"image_token": IMAGE_PAD, "video_token": VIDEO_PAD},
        padding_side="left",
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],
    )


def _tokenizer_class() -> type:
    """The fast tokenizer class the Qwen-VL processors accept.

    transformers 4.x checks for ``Qwen2TokenizerFast`` (a plain ``PreTrainedTokenizerFast`` there, which takes the
    trained tokenizer as is); 5.x accepts any tokenizer, and its ``Qwen2Tokenizer`` would rebuild the
    pre-tokenizer, so the generic class is used there.
    """
    if transformers_version()[0] < 5:
        from transformers import Qwen2TokenizerFast

        return Qwen2TokenizerFast
    return PreTrainedTokenizerFast


# --------------------------------------------------------------------------------------------------
# Processor
# --------------------------------------------------------------------------------------------------

# Qwen2.5-VL normalises with OpenAI CLIP's constants, Qwen3-VL to [-1, 1].
_IMAGE_MEAN = {"qwen2.5-vl": [0.48145466, 0.4578275, 0.40821073], "qwen3-vl": [0.5, 0.5, 0.5]}
_IMAGE_STD = {"qwen2.5-vl": [0.26862954, 0.26130258, 0.27577711], "qwen3-vl": [0.5, 0.5, 0.5]}
_PATCH_SIZE = {"qwen2.5-vl": 14, "qwen3-vl": 16}
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2

# (min_pixels, max_pixels) of the tiny processors: 2 x 2 to 10 x 10 merged tokens per image.
TINY_QWEN_PIXELS = {
    family: ((2 * MERGE_SIZE * patch) ** 2, (10 * MERGE_SIZE * patch) ** 2) for family, patch in _PATCH_SIZE.items()
}


def _check_family(family: str) -> str:
    if family not in QWEN_FAMILIES:
        raise ValueError(f"unknown Qwen-VL family {family!r}; known: {', '.join(QWEN_FAMILIES)}")
    return family


def qwen_image_processor(family: str, min_pixels: int, max_pixels: int):
    """The family's real ``Qwen2VLImageProcessor`` (the PIL backend without torchvision) with these pixel limits.

    An image of ``h x w`` px becomes a grid of ``smart_resize(h, w) / patch`` patches (``t = 1``), i.e.
    ``grid.prod() // 4`` merged tokens.
    """
    patch_size = _PATCH_SIZE[_check_family(family)]
    return _image_processor_class("Qwen2VLImageProcessor")(
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
        # transformers 4.57's constructor replaces ``size`` by its defaults and reads the limits from these only.
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        patch_size=patch_size,
        temporal_patch_size=TEMPORAL_PATCH_SIZE,
        merge_size=MERGE_SIZE,
        image_mean=_IMAGE_MEAN[family],
        image_std=_IMAGE_STD[family],
    )


_PROCESSOR_FAMILY = {"Qwen2_5_VLProcessor": "qwen2.5-vl", "Qwen3VLProcessor": "qwen3-vl"}


def _processor_class(family: str) -> type:
    import transformers

    return transformers.Qwen2_5_VLProcessor if _check_family(family) == "qwen2.5-vl" else transformers.Qwen3VLProcessor


_VIDEO_PROCESSOR_CLASS = {"qwen2.5-vl": "Qwen2VLVideoProcessor", "qwen3-vl": "Qwen3VLVideoProcessor"}


def _video_processor_settings(image_processor) -> dict:
    """The video processor's geometry and normalisation, copied from the image processor."""
    return {
        "size": dict(image_processor.size),
        "patch_size": image_processor.patch_size,
        "temporal_patch_size": image_processor.temporal_patch_size,
        "merge_size": image_processor.merge_size,
        "image_mean": list(image_processor.image_mean),
        "image_std": list(image_processor.image_std),
    }


def _video_processor(family: str, image_processor):
    """The family's video processor, with the image processor's geometry (needs torchvision)."""
    import transformers

    return getattr(transformers, _VIDEO_PROCESSOR_CLASS[family])(**_video_processor_settings(image_processor))


def _without_video_check(processor_class: type, image_processor, tokenizer, chat_template):
    """``processor_class(image_processor, tokenizer, None, chat_template)`` by the class's own ``__init__``, with
    ``check_argument_for_proper_class`` waived for the missing video processor only.

    The waiver is an instance attribute shadowing the method while ``__init__`` runs, removed afterwards, so the
    object is an ordinary instance of ``processor_class``; every other argument is checked as usual.
    """
    processor = processor_class.__new__(processor_class)
    class_check = processor.check_argument_for_proper_class

    def check_all_but_missing_video(argument_name, argument):
        if argument_name == "video_processor" and argument is None:
            return None
        return class_check(argument_name, argument)

    processor.check_argument_for_proper_class = check_all_but_missing_video
    try:
        processor_class.__init__(processor, image_processor, tokenizer, None, chat_template=chat_template)
    finally:
        del processor.check_argument_for_proper_class
    return processor


def qwen_vl_processor(family: str, image_processor, tokenizer, chat_template: str | None = QWEN_CHAT_TEMPLATE):
    """The real ``Qwen2_5_VLProcessor`` / ``Qwen3VLProcessor`` around ``image_processor`` and ``tokenizer``.

    With torchvision it gets the family's real video processor; without it, none (see the module docstring:
    images and text work, videos do not).
    """
    processor_class = _processor_class(family)
    if is_torchvision_available():
        video_processor = _video_processor(family, image_processor)
        return processor_class(image_processor, tokenizer, video_processor, chat_template=chat_template)
    return _without_video_check(processor_class, image_processor, tokenizer, chat_template)


def build_tiny_qwen_processor(family: str = "qwen2.5-vl", pixels: tuple[int, int] | None = None):
    """The family's real processor: offline Qwen tokenizer + ``Qwen2VLImageProcessor`` with ``pixels``
    (``(min_pixels, max_pixels)``, default `TINY_QWEN_PIXELS`)."""
    min_pixels, max_pixels = pixels or TINY_QWEN_PIXELS[_check_family(family)]
    image_processor = qwen_image_processor(family, min_pixels, max_pixels)
    return qwen_vl_processor(family, image_processor, build_qwen_tokenizer())


def load_qwen_vl_processor(folder: str | Path):
    """Reload a processor that `save_tiny_qwen_vl` (or ``save_pretrained``) wrote, with or without torchvision.

    With torchvision this is ``AutoProcessor.from_pretrained(folder)``. Without it, the image processor
    (``Qwen2VLImageProcessor``, the PIL backend on 5.x), tokenizer and chat template are loaded one by one and joined
    as `qwen_vl_processor` does.
    """
    from transformers import AutoProcessor, AutoTokenizer

    if is_torchvision_available():
        return AutoProcessor.from_pretrained(folder)
    folder = Path(folder)
    processor_name = _saved_processor_class(folder)
    family = _PROCESSOR_FAMILY.get(processor_name)
    if family is None:
        raise ValueError(f"{folder} holds a {processor_name!r}; expected a Qwen2_5_VLProcessor or Qwen3VLProcessor")
    # By class, not AutoImageProcessor: transformers 5.16 refuses the Auto class without torchvision.
    image_processor = _image_processor_class("Qwen2VLImageProcessor").from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    chat_template = None
    if (folder / "chat_template.jinja").exists():
        chat_template = (folder / "chat_template.jinja").read_text()
    elif (folder / "chat_template.json").exists():
        chat_template = json.loads((folder / "chat_template.json").read_text())["chat_template"]
    return qwen_vl_processor(family, image_processor, tokenizer, chat_template=chat_template)


def save_qwen_vl_processor(processor, folder: str | Path) -> None:
    """``processor.save_pretrained(folder)``, also for a processor built without a video processor.

    ``save_pretrained`` saves every sub-processor the class declares and fails on the missing one, so for the
    save only, the instance lists image processor and tokenizer as its sub-processors (transformers 5.x reads
    ``get_attributes()``, 4.x ``attributes``). The folder then looks like a released Qwen-VL checkpoint, which ships
    no video processor config either: where torchvision is installed, ``AutoProcessor`` builds the video processor
    from the image processor's ``preprocessor_config.json`` (written here on 5.x too).
    """
    if getattr(processor, "video_processor", None) is not None:
        processor.save_pretrained(folder)
        return
    present = [name for name in _sub_processor_names(processor) if getattr(processor, name, None) is not None]
    missing = processor.__dict__.pop("video_processor", None)
    processor.get_attributes = lambda: present
    processor.attributes = present
    try:
        processor.save_pretrained(folder)
    finally:
        del processor.get_attributes, processor.attributes
        processor.video_processor = missing
    # transformers 5.x nests the image processor in processor_config.json; the video processor falls back to
    # preprocessor_config.json only (4.x writes that file anyway).
    folder = Path(folder)
    if not (folder / "preprocessor_config.json").exists():
        processor.image_processor.save_pretrained(folder)
    # The family's video processor class and geometry, as a torchvision install would have saved them.
    family = _PROCESSOR_FAMILY[type(processor).__name__]
    video_config = {
        "video_processor_type": _VIDEO_PROCESSOR_CLASS[family],
        "processor_class": type(processor).__name__,
        **_video_processor_settings(processor.image_processor),
    }
    (folder / "video_preprocessor_config.json").write_text(json.dumps(video_config, indent=2) + "\n")


def _sub_processor_names(processor) -> list[str]:
    get_attributes = getattr(type(processor), "get_attributes", None)  # transformers 5.x
    return list(get_attributes() if get_attributes is not None else type(processor).attributes)


def _saved_processor_class(folder: Path) -> str | None:
    """The ``processor_class`` a saved processor names (transformers 4.x and 5.x write it in different files)."""
    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        path = folder / name
        if path.exists():
            value = json.loads(path.read_text()).get("processor_class")
            if value:
                return value
    return None


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TinyQwenSpec:
    """Size knobs of a tiny Qwen-VL model.

    Head sizes are 32 in the tower and the language model (vLLM's CPU attention refuses 16). ``mrope_section``
    splits the language model's rotary half-dimension (``text_head_dim // 2``) into (t, h, w) parts.
    Qwen2.5-VL only: ``window_size`` (px; windows of ``window_size // patch`` patches, here 56 px = 4 x 4 patches =
    2 x 2 merged tokens, so a 112 px image has four windows) and ``fullatt_block_indexes``. Qwen3-VL only:
    ``deepstack_visual_indexes`` and ``num_position_embeddings`` (a square: the learned position grid).
    """

    family: str = "qwen2.5-vl"
    vision_hidden: int = 64
    vision_layers: int = 4
    vision_heads: int = 2
    vision_intermediate: int = 128
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 2
    text_kv_heads: int = 1
    text_head_dim: int = 32
    text_intermediate: int = 128
    mrope_section: tuple[int, int, int] = (4, 6, 6)
    window_size: int = 56
    fullatt_block_indexes: tuple[int, ...] = (1, 3)
    deepstack_visual_indexes: tuple[int, ...] = (1, 2)
    num_position_embeddings: int = 256
    seed: int = 0

    @property
    def patch_size(self) -> int:
        return _PATCH_SIZE[self.family]

    def vision_shape(self) -> QwenVisionShape:
        return QwenVisionShape(
            hidden_size=self.vision_hidden,
            num_layers=self.vision_layers,
            num_heads=self.vision_heads,
            intermediate_size=self.vision_intermediate,
            out_hidden_size=self.text_hidden,
            patch_size=self.patch_size,
            temporal_patch_size=TEMPORAL_PATCH_SIZE,
            spatial_merge_size=MERGE_SIZE,
            hidden_act="silu" if self.family == "qwen2.5-vl" else "gelu_pytorch_tanh",
            window_size=self.window_size,
            fullatt_block_indexes=self.fullatt_block_indexes,
            deepstack_visual_indexes=self.deepstack_visual_indexes,
            num_position_embeddings=self.num_position_embeddings,
        )

    def text_shape(self) -> QwenTextShape:
        qwen3 = self.family == "qwen3-vl"
        return QwenTextShape(
            hidden_size=self.text_hidden,
            num_layers=self.text_layers,
            num_heads=self.text_heads,
            num_kv_heads=self.text_kv_heads,
            intermediate_size=self.text_intermediate,
            head_dim=self.text_head_dim if qwen3 else self.text_hidden // self.text_heads,
            mrope_section=self.mrope_section,
            mrope_interleaved=qwen3,
            rope_theta=5_000_000.0 if qwen3 else 1_000_000.0,
            max_position_embeddings=4096,
        )


def tiny_qwen_spec(family: str = "qwen2.5-vl", **overrides) -> TinyQwenSpec:
    """The default `TinyQwenSpec` of ``family`` with ``overrides`` (field names of `TinyQwenSpec`).

    Qwen3-VL's M-RoPE is interleaved with Qwen3-VL-8B's proportions (24, 20, 20 of 64 -> 6, 5, 5 of 16).
    """
    defaults = {"family": _check_family(family)}
    if family == "qwen3-vl":
        defaults["mrope_section"] = (6, 5, 5)
    return dataclasses.replace(TinyQwenSpec(**defaults), **overrides)


def qwen_vl_config(family: str, vision: QwenVisionShape, text: QwenTextShape, tokenizer, vocab_size: int | None = None):
    """The ``Qwen2_5_VLConfig`` / ``Qwen3VLConfig`` of these shapes (nothing is allocated).

    Token ids (image, video, vision start / end, pad, EOS) come from ``tokenizer``; the vocabulary is
    ``vocab_size`` (default: the tokenizer's length, for tiny models). Raises ``ValueError`` on an
    ``mrope_section`` that does not fill half the head size.
    """
    import transformers

    family = _check_family(family)
    if text.head_dim != 2 * sum(text.mrope_section):
        raise ValueError(f"mrope_section {text.mrope_section} must sum to half the head size {text.head_dim}")
    rope = {"rope_type": "default", "mrope_section": list(text.mrope_section)}
    if text.mrope_interleaved:
        rope["mrope_interleaved"] = True
    text_config = {
        "vocab_size": vocab_size or len(tokenizer),
        "hidden_size": text.hidden_size,
        "intermediate_size": text.intermediate_size,
        "num_hidden_layers": text.num_layers,
        "num_attention_heads": text.num_heads,
        "num_key_value_heads": text.num_kv_heads,
        "max_position_embeddings": text.max_position_embeddings,
        "rms_norm_eps": text.rms_norm_eps,
        "rope_theta": text.rope_theta,
        # transformers 4.57 reads M-RoPE from rope_scaling; 5.x converts it to rope_parameters.
        "rope_scaling": rope,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": None,  # like Qwen's tokenizer, the tiny one adds no BOS
        "eos_token_id": tokenizer.eos_token_id,
    }
    vision_config = {
        "depth": vision.num_layers,
        "hidden_size": vision.hidden_size,
        "intermediate_size": vision.intermediate_size,
        "num_heads": vision.num_heads,
        "out_hidden_size": vision.out_hidden_size,
        "patch_size": vision.patch_size,
        "spatial_merge_size": vision.spatial_merge_size,
        "temporal_patch_size": vision.temporal_patch_size,
        "hidden_act": vision.hidden_act,
    }
    if family == "qwen2.5-vl":
        if text.hidden_size != text.num_heads * text.head_dim:
            raise ValueError(
                f"Qwen2.5-VL's head size is hidden_size / num_heads = {text.hidden_size} / {text.num_heads}, "
                f"not head_dim {text.head_dim}"
            )
        vision_config.update(
            window_size=vision.window_size,
            fullatt_block_indexes=list(vision.fullatt_block_indexes),
            tokens_per_second=2,
        )
        config_class = transformers.Qwen2_5_VLConfig
    else:
        text_config["head_dim"] = text.head_dim
        vision_config.update(
            deepstack_visual_indexes=list(vision.deepstack_visual_indexes),
            num_position_embeddings=vision.num_position_embeddings,
        )
        config_class = transformers.Qwen3VLConfig
    config = config_class(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=tokenizer.image_token_id,
        video_token_id=tokenizer.video_token_id,
        vision_start_token_id=tokenizer.convert_tokens_to_ids(VISION_START),
        vision_end_token_id=tokenizer.convert_tokens_to_ids(VISION_END),
        tie_word_embeddings=False,
    )
    # Generation and evaluation code reads ``model.config.pad_token_id`` (as for the tiny LLaVAs).
    config.pad_token_id = tokenizer.pad_token_id
    return config


def tiny_qwen_vl_config(family: str = "qwen2.5-vl", **overrides):
    """The config `tiny_qwen_vl` builds its model with (same token ids), without building or saving the model."""
    spec = tiny_qwen_spec(family, **overrides)
    return qwen_vl_config(family, spec.vision_shape(), spec.text_shape(), build_qwen_tokenizer())


def qwen_vl_model_class(family: str) -> type:
    """``Qwen2_5_VLForConditionalGeneration`` or ``Qwen3VLForConditionalGeneration``."""
    import transformers

    if _check_family(family) == "qwen2.5-vl":
        return transformers.Qwen2_5_VLForConditionalGeneration
    return transformers.Qwen3VLForConditionalGeneration


def tiny_qwen_vl(family: str = "qwen2.5-vl", dtype: torch.dtype = torch.float32, processor=None, **overrides):
    """A random tiny ``Qwen2_5_VLForConditionalGeneration`` / ``Qwen3VLForConditionalGeneration`` and its processor.

    Args:
        family: ``"qwen2.5-vl"`` or ``"qwen3-vl"``.
        dtype: parameter dtype.
        processor: reuse a processor of this family (its tokenizer fixes vocabulary and token ids); by default
            `build_tiny_qwen_processor` (56-280 px / 64-320 px images -> 4 to 100 merged tokens each).
        overrides: fields of `TinyQwenSpec` (e.g. ``vision_layers=8, fullatt_block_indexes=(3, 7)``).

    Returns:
        ``(model, processor)``: the model in eval mode with SDPA attention and greedy generation defaults; weights
        drawn after ``torch.manual_seed(spec.seed)`` (the caller's RNG state is restored). ``processor(images=...,
        text=...)`` expands each ``<|image_pad|>`` to ``image_grid_thw[i].prod() // 4`` placeholders.
    """
    spec = tiny_qwen_spec(family, **overrides)
    if processor is None:
        processor = build_tiny_qwen_processor(family)
    tokenizer = processor.tokenizer
    config = qwen_vl_config(family, spec.vision_shape(), spec.text_shape(), tokenizer)
    model = _instantiate(qwen_vl_model_class(family), config, spec.seed, tokenizer, dtype)
    return model, processor


def save_tiny_qwen_vl(folder: str | Path, family: str = "qwen2.5-vl", **overrides) -> Path:
    """Build `tiny_qwen_vl` and save model + processor into ``folder`` (created if missing); returns ``Path(folder)``.

    ``<ModelClass>.from_pretrained(folder)`` (or ``AutoModelForImageTextToText``) reloads the model offline and
    `load_qwen_vl_processor` the processor (``AutoProcessor.from_pretrained`` too where torchvision is installed).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model, processor = tiny_qwen_vl(family, **overrides)
    model.save_pretrained(folder)
    save_qwen_vl_processor(processor, folder)
    return folder
