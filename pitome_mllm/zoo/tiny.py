"""Tiny, randomly initialised LLaVA models and a matching processor, built fully offline.

Why this module exists
----------------------
The token-merging code patches real ``transformers`` classes (``CLIPEncoderLayer`` inside
``LlavaForConditionalGeneration``) and must cooperate with the real ``LlavaProcessor`` (which expands
``<image>`` into one placeholder per visual token).  Tests and the offline demo therefore need *genuine*
transformers objects -- not mocks -- yet they must run on a laptop CPU with no access to a model hub.

This module builds exactly that:

* :func:`build_tiny_processor` trains a ~500-token byte-level BPE tokenizer on a small English corpus
  embedded below (deterministic, well under a second), wraps it in ``PreTrainedTokenizerFast`` and pairs it
  with a ``CLIPImageProcessor`` into a ``LlavaProcessor`` with a LLaVA-1.5 style chat template.
* :func:`build_tiny_llava` builds a ``LlavaForConditionalGeneration`` whose *geometry* matches the real
  model (CLIP ViT-L/14-336: 336 px images, 14 px patches, 24 encoder layers, 577 visual tokens including
  CLS, hidden state of layer -2 selected, CLS dropped) but whose *widths* are tiny (64), so a forward pass
  takes milliseconds.  Weights are random but seeded, hence reproducible.
* :func:`save_tiny_llava` writes model + processor to a folder that ``from_pretrained`` can load offline,
  which is how the loading code paths get exercised.

The text the model generates is meaningless (the weights are random); what matters is that every shape,
mask, cache and hook behaves as in the full-size model.

Bundled demo photographs (public domain / CC0) are reachable through :func:`list_images` and
:func:`load_image`; see ``pitome_mllm/assets/README.md`` for their sources.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.utils import is_torchvision_available

# Re-exported so demo code can get a model and a picture from one place.
from pitome_mllm.assets import list_images, load_image

__all__ = [
    "DEMO_SPEC",
    "IMAGE_TOKEN",
    "LLAVA_CHAT_TEMPLATE",
    "ONEVISION_TEST_SPEC",
    "SIGLIP_TEST_SPEC",
    "TEST_SPEC",
    "VLLM_DEMO_SPEC",
    "VLLM_TEST_SPEC",
    "TinyLlavaSpec",
    "build_tiny_llava",
    "build_tiny_llava_next",
    "build_tiny_onevision",
    "build_tiny_siglip_llava",
    "build_tiny_processor",
    "build_tiny_tokenizer",
    "list_images",
    "load_image",
    "rename_tower_weights_to_hub_layout",
    "save_tiny_llava",
]

# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------

IMAGE_TOKEN = "<image>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
# Order fixes the ids: <unk>=0, <s>=1, </s>=2 as in the LLaMA tokenizer, then <pad>=3, <image>=4.
SPECIAL_TOKENS = [UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, IMAGE_TOKEN]

TOKENIZER_VOCAB_SIZE = 500

# A few hundred words of plain English in the register of visual question answering.  The tokenizer
# only needs to segment prompts sensibly; byte-level fallback covers anything not seen here.
_TRAINING_CORPUS = """
What is in the image? The image shows a cat sitting on a wooden table next to a cup of coffee.
Describe the image in detail. A woman in an orange space suit smiles at the camera. Behind her
there is a flag and a model of a rocket. What colour is the cup? The cup is red and the saucer is red.
How many people are in the picture? There is one person in the picture. Is there a dog in the photo?
No, there is no dog in the photo, but there is a small cat with green eyes. What shape is the plate?
The plate is round. The table is brown and made of wood. The sky is blue and the grass is green.
Where is the spoon? The spoon is on the saucer, to the right of the cup. What is the woman holding?
She is holding a white helmet. What is the animal looking at? The cat is looking at the camera.
Answer the question using a single word or phrase. Yes. No. Two. Three. Four. Left. Right. Red.
Blue. Green. Yellow. Orange. Purple. Black. White. Grey. Brown. Pink. A circle, a square, a
triangle and a rectangle. The square is next to the circle. The triangle is above the rectangle.
Please look at the picture and answer the question. What colour is the shirt of the man on the left?
What is the text written on the sign? The sign says stop. Is it day or night? It is day, the sun is
shining. What time of year is it? It looks like winter because there is snow on the ground.
What is the man doing? The man is riding a bicycle along the street. What vehicles can you see?
I can see a car, a bus and a bicycle. How many windows does the house have? The house has four
windows and a door. What room is this? This is a kitchen with a stove, a sink and a refrigerator.
Describe the scene briefly. A busy street with people walking and cars waiting at a traffic light.
Is the water calm? Yes, the water is calm and a boat floats near the shore. What is on the plate?
There is a sandwich, some fruit and a glass of milk on the plate. Which object is the largest?
The largest object is the building in the background. What is the weather like? It is cloudy.
Count the birds in the tree. There are three birds in the tree. What is the girl wearing? She is
wearing a yellow dress and black shoes. Where was this photo taken? It was taken in a park.
What is this? This is a photograph of an astronaut. What is the cat doing? The cat is resting.
USER: What is in the image? ASSISTANT: A cup of coffee on a saucer.
USER: Describe this photo. ASSISTANT: A cat with striped fur looks straight ahead.
USER: Who is this? ASSISTANT: An astronaut wearing an orange suit in front of a flag.
"""


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (~500 tokens) on the built-in corpus and wrap it for transformers.

    Special tokens: ``<unk>`` (0), ``<s>`` (1, BOS, prepended to every encoded text), ``</s>`` (2, EOS),
    ``<pad>`` (3) and ``<image>`` (4, exposed as ``tokenizer.image_token`` / ``tokenizer.image_token_id``).
    Padding is on the left, which is what batched generation with a decoder-only model needs.

    The result is identical on every call and in every process: the trainer sees the same corpus with
    the same settings, and its merge order does not depend on per-process hash seeds.
    Training takes about 10 ms.
    """
    backend = Tokenizer(models.BPE(unk_token=None))  # byte-level: every byte is in the alphabet, no unk needed
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=1,
        show_progress=False,
    )
    backend.train_from_iterator(_TRAINING_CORPUS.strip().splitlines(), trainer=trainer)
    bos_token_id = backend.token_to_id(BOS_TOKEN)
    # Prepend BOS like the LLaMA tokenizer does; ByteLevel post-processing keeps offsets right.
    backend.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS_TOKEN} $A",
                pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
                special_tokens=[(BOS_TOKEN, bos_token_id)],
            ),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="left",
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
        # transformers 4.x defaults to also returning token_type_ids, which LLaVA's generate refuses.
        model_input_names=["input_ids", "attention_mask"],
    )


# --------------------------------------------------------------------------------------------------
# Processor
# --------------------------------------------------------------------------------------------------

# LLaVA-1.5 conversation format: "USER: <image>\n{text} ASSISTANT:".  Accepts message content either as a
# plain string or as a list of {"type": "image"} / {"type": "text", "text": ...} parts (images first, as
# in llava-hf's own template).
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}"
    "{% else %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'text') %}{{ part['text'] + ' ' }}{% endfor %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# OpenAI CLIP normalisation constants (what llava-1.5's CLIPImageProcessor uses).
CLIP_IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]


def _image_processor_class(name: str) -> type:
    """The image processor class ``name`` for the installed transformers and backends.

    transformers 5.x names the torchvision-backed class ``name`` and the PIL one ``name + "Pil"``; asking for the
    former without torchvision silently substitutes the latter with a warning, so the choice is explicit here.
    transformers 4.x has no ``Pil`` classes: there ``name`` is the PIL one (``name + "Fast"`` uses torchvision).
    Either way the saved ``image_processor_type`` is ``name`` and ``AutoProcessor`` picks the backend at load time.
    """
    import transformers

    pil_class = getattr(transformers, name + "Pil", None)
    if pil_class is None or is_torchvision_available():
        return getattr(transformers, name)
    return pil_class


def _normalising_image_processor(name: str, size: dict[str, int], mean: list[float], std: list[float], **options):
    """Image processor ``name`` that resizes to ``size``, rescales to [0, 1] and normalises with ``mean`` / ``std``."""
    return _image_processor_class(name)(
        size=size, do_resize=True, do_rescale=True, do_normalize=True, image_mean=mean, image_std=std, **options
    )


def build_tiny_processor(image_size: int = 336, patch_size: int = 14) -> LlavaProcessor:
    """Build a ``LlavaProcessor`` offline: tiny BPE tokenizer + ``CLIPImageProcessor``.

    Images are resized (shortest edge) and centre-cropped to ``image_size x image_size``, so
    ``pixel_values`` has shape ``(num_images, 3, image_size, image_size)``.  Each ``<image>`` in the text
    expands to ``(image_size // patch_size) ** 2`` placeholder tokens: the CLIP tower yields that many
    patch tokens plus CLS, and the ``"default"`` feature strategy drops CLS (576 for 336/14, 64 for 112/14).
    """
    if image_size % patch_size:
        raise ValueError(f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})")
    image_processor = _normalising_image_processor(
        "CLIPImageProcessor",
        {"shortest_edge": image_size},
        CLIP_IMAGE_MEAN,
        CLIP_IMAGE_STD,
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=True,
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tiny_tokenizer(),
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token
        chat_template=LLAVA_CHAT_TEMPLATE,
    )


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TinyLlavaSpec:
    """Size knobs of a tiny LLaVA-1.5 style model (CLIP vision tower + MLP projector + LLaMA decoder).

    The vision tower sees ``(image_size // patch_size) ** 2 + 1`` tokens (patches + CLS) of width
    ``vision_hidden``; LLaVA takes the hidden states of ``vision_feature_layer`` (``-2``: the penultimate
    layer, as in LLaVA-1.5), drops CLS and projects them to ``text_hidden``.
    """

    image_size: int = 336
    patch_size: int = 14
    vision_hidden: int = 64
    vision_layers: int = 24
    vision_heads: int = 4
    vision_intermediate: int = 128
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_intermediate: int = 128
    projector_hidden_act: str = "gelu"
    vision_feature_layer: int = -2
    seed: int = 0

    @property
    def num_patches(self) -> int:
        """Patch tokens per image, ``(image_size // patch_size) ** 2`` (576 for 336/14)."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_vision_tokens(self) -> int:
        """Tokens inside the vision tower: patches + CLS (577 for 336/14)."""
        return self.num_patches + 1


# CLIP ViT-L/14-336 geometry (336 px, 14 px patches, 24 layers -> 577 tokens per layer), tiny widths.
DEMO_SPEC = TinyLlavaSpec()

# Small and fast for unit tests: 112 px / 14 px patches -> 64 patches + CLS, 6 encoder layers.
TEST_SPEC = TinyLlavaSpec(image_size=112, patch_size=14, vision_layers=6)


def tower_shape(
    hidden_size: int, intermediate_size: int, num_layers: int, num_heads: int, image_size: int, patch_size: int
) -> dict[str, int]:
    """The keywords a CLIP or SigLIP vision config takes for a tower's shape."""
    return {
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "image_size": image_size,
        "patch_size": patch_size,
    }


def spec_tower_shape(spec: TinyLlavaSpec) -> dict[str, int]:
    return tower_shape(
        spec.vision_hidden,
        spec.vision_intermediate,
        spec.vision_layers,
        spec.vision_heads,
        spec.image_size,
        spec.patch_size,
    )


def tiny_clip_vision_config(spec: TinyLlavaSpec) -> CLIPVisionConfig:
    """The tiny CLIP tower's config (shared by every tiny LLaVA family)."""
    return CLIPVisionConfig(
        **spec_tower_shape(spec),
        projection_dim=spec.vision_hidden,
        hidden_act="quick_gelu",  # what OpenAI CLIP (and so LLaVA-1.5's tower) uses
    )


def tiny_llama_kwargs(spec: TinyLlavaSpec, tokenizer: PreTrainedTokenizerFast) -> dict:
    """Keyword arguments of the tiny Llama language model's config (shared by every tiny family)."""
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": spec.text_hidden,
        "intermediate_size": spec.text_intermediate,
        "num_hidden_layers": spec.text_layers,
        "num_attention_heads": spec.text_heads,
        "num_key_value_heads": spec.text_heads,
        # Room for a few images' worth of placeholders plus a prompt and an answer.
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "tie_word_embeddings": False,
    }


def tiny_siglip_vision_config(spec: TinyLlavaSpec):
    """A SigLIP tower of ``spec``'s shape, without the pooling head (LLaVA reads hidden states)."""
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(**spec_tower_shape(spec), vision_use_head=False)


def _llava_config_kwargs(spec: TinyLlavaSpec, tokenizer: PreTrainedTokenizerFast) -> dict:
    """The fields LLaVA-1.5 and LLaVA-NeXT configs share, for ``spec`` and the tiny tokenizer."""
    return {
        "image_token_id": tokenizer.image_token_id,
        "image_seq_length": spec.num_patches,
        "projector_hidden_act": spec.projector_hidden_act,
        "vision_feature_layer": spec.vision_feature_layer,
        "vision_feature_select_strategy": "default",
        "tie_word_embeddings": False,
        # Not a declared LlavaConfig field, but llava-hf checkpoints carry it at the top level and
        # generation / evaluation code reads ``model.config.pad_token_id``.
        "pad_token_id": tokenizer.pad_token_id,
    }


def _build_config(spec: TinyLlavaSpec, tokenizer: PreTrainedTokenizerFast) -> LlavaConfig:
    vision_config = tiny_clip_vision_config(spec)
    text_config = LlamaConfig(**tiny_llama_kwargs(spec, tokenizer))
    return LlavaConfig(vision_config=vision_config, text_config=text_config, **_llava_config_kwargs(spec, tokenizer))


def tiny_llava_config(spec: TinyLlavaSpec = DEMO_SPEC) -> LlavaConfig:
    """The ``LlavaConfig`` a tiny model of ``spec`` is built with, without building or saving the model."""
    return _build_config(spec, build_tiny_tokenizer())


def _check_processor_matches(processor: LlavaProcessor, spec: TinyLlavaSpec) -> None:
    """Fail early on a processor whose placeholder count would not match the tower's feature count.

    Otherwise the mismatch only surfaces at the first forward, as LLaVA's "image features and image
    tokens do not match" error.
    """
    crop_size = processor.image_processor.crop_size
    processor_geometry = (crop_size["height"], crop_size["width"], processor.patch_size)
    if processor_geometry != (spec.image_size, spec.image_size, spec.patch_size):
        raise ValueError(
            f"processor crops {crop_size['height']}x{crop_size['width']} with patch {processor.patch_size}, "
            f"but the spec needs {spec.image_size}x{spec.image_size} with patch {spec.patch_size}"
        )


def _instantiate(model_class: type, config, seed: int, tokenizer, dtype: torch.dtype):
    """Build ``model_class(config)`` with seeded random weights, SDPA attention and greedy defaults."""
    # SDPA for every tower: the fast path users get by default, and the one the merge hooks must handle.
    for sub_config in (config, config.vision_config, config.text_config):
        sub_config._attn_implementation = "sdpa"
    # Seed only while constructing so callers' own random streams are not disturbed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    model = model.to(dtype=dtype).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    return model


def build_tiny_llava(
    spec: TinyLlavaSpec = DEMO_SPEC,
    processor: LlavaProcessor | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Build a randomly initialised ``LlavaForConditionalGeneration`` plus a matching processor.

    Args:
        spec: size knobs; :data:`DEMO_SPEC` mirrors LLaVA-1.5's vision geometry, :data:`TEST_SPEC` is faster.
        processor: reuse an existing processor (its tokenizer defines the vocabulary and the image token id);
            by default one is built with :func:`build_tiny_processor` for ``spec``'s image and patch size.
        dtype: parameter dtype of the returned model.

    Returns:
        ``(model, processor)``; the model is in eval mode.  ``processor(images=[img] * B, text=[prompt] * B,
        return_tensors="pt", padding=True)`` gives ``pixel_values`` ``(B, 3, image_size, image_size)`` and
        ``input_ids`` ``(B, L)`` containing ``spec.num_patches`` image placeholders per image;
        ``model(**inputs).logits`` is ``(B, L, vocab_size)``.

    Weights are drawn after ``torch.manual_seed(spec.seed)`` (the global RNG state is restored afterwards),
    so the same spec always gives the same state dict.
    """
    if processor is None:
        processor = build_tiny_processor(image_size=spec.image_size, patch_size=spec.patch_size)
    else:
        _check_processor_matches(processor, spec)
    tokenizer = processor.tokenizer
    config = _build_config(spec, tokenizer)
    model = _instantiate(LlavaForConditionalGeneration, config, spec.seed, tokenizer, dtype)
    return model, processor


def save_tiny_llava(folder: str | Path, spec: TinyLlavaSpec = TEST_SPEC, hub_layout: bool = False) -> Path:
    """Build a tiny model for ``spec`` and save model + processor into ``folder`` (created if missing).

    Afterwards ``LlavaForConditionalGeneration.from_pretrained(folder)`` and
    ``AutoProcessor.from_pretrained(folder)`` load it without network access.  Returns ``Path(folder)``.

    ``hub_layout=True`` names the tower's weights as llava-hf checkpoints on the Hub do
    (``vision_tower.vision_model.*``), which vLLM's loader expects; transformers loads both.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model, processor = build_tiny_llava(spec)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    if hub_layout:
        rename_tower_weights_to_hub_layout(folder / "model.safetensors")
    return folder


TINY_CHECKPOINT_FOLDER = "tiny_llava"  # under the cache folder (``$PITOME_CACHE``)


def tiny_llava_checkpoint(folder: str | Path | None = None, spec: TinyLlavaSpec = DEMO_SPEC) -> Path:
    """A local tiny LLaVA-1.5 checkpoint, built offline once and reused: the folder to ``from_pretrained``.

    ``LlavaForConditionalGeneration.from_pretrained(path)`` and ``AutoProcessor.from_pretrained(path)``
    load it with no network access. The default :data:`DEMO_SPEC` has LLaVA-1.5-7B's vision geometry
    (CLIP ViT-L/14 at 336 px, 24 layers, 576 visual tokens) at tiny widths and random weights: its
    answers are noise, its token counts and merge plans are those of the real model.

    Args:
        folder: where to save it (default ``$PITOME_CACHE/tiny_llava``, or ``~/.cache/pitome_mllm/...``).
        spec: the sizes; a folder already holding a checkpoint is reused as it is.
    """
    from ..common.files import cache_dir

    folder = Path(folder) if folder is not None else cache_dir() / TINY_CHECKPOINT_FOLDER
    if (folder / "model.safetensors").is_file():
        return folder
    if folder.is_dir() and any(folder.iterdir()):
        raise ValueError(f"{folder} holds files but no model.safetensors: give a new or empty folder")
    # Built beside the folder and renamed into place, so a reader never sees a half-written checkpoint.
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = folder.with_name(f".{folder.name}.{os.getpid()}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    save_tiny_llava(partial, spec)
    try:
        os.replace(partial, folder)  # onto a missing or empty folder
    except OSError:
        shutil.rmtree(partial, ignore_errors=True)
        if not (folder / "model.safetensors").is_file():  # else another process saved it first
            raise
    return folder


def rename_tower_weights_to_hub_layout(weights_file: Path) -> None:
    """Rewrite a saved LLaVA's ``vision_tower.<name>`` weights as ``vision_tower.vision_model.<name>``."""
    from safetensors.torch import load_file, save_file

    tower_prefixes = ("vision_tower.", "model.vision_tower.")
    renamed = {}
    for name, tensor in load_file(weights_file).items():
        prefix = next((p for p in tower_prefixes if name.startswith(p)), None)
        if prefix is not None and not name.startswith(prefix + "vision_model."):
            name = prefix + "vision_model." + name[len(prefix) :]
        renamed[name] = tensor
    save_file(renamed, weights_file, metadata={"format": "pt"})


# The smallest shape vLLM's CPU attention serves: head size 32 in the tower and the language
# model (it refuses 16), 112 px / 14 px patches -> 64 patches + CLS, 6 encoder layers.
VLLM_TEST_SPEC = TinyLlavaSpec(image_size=112, patch_size=14, vision_layers=6, vision_heads=2, text_heads=2)
# LLaVA-1.5's vision geometry (336 px, 24 layers, 576 patches) at head size 32: `pitome-mllm serve tiny`.
VLLM_DEMO_SPEC = TinyLlavaSpec(vision_heads=2, text_heads=2)


# --------------------------------------------------------------------------------------------------
# SigLIP tower (no class token) in the LLaVA-1.5 path
# --------------------------------------------------------------------------------------------------

# SigLIP normalises to [-1, 1].
SIGLIP_IMAGE_MEAN = [0.5, 0.5, 0.5]
SIGLIP_IMAGE_STD = [0.5, 0.5, 0.5]

# 112 px / 14 px patches -> 64 patch tokens, no class token; 6 layers, LLaVA reads the last one.
SIGLIP_TEST_SPEC = TinyLlavaSpec(image_size=112, patch_size=14, vision_layers=6, vision_feature_layer=-1)


def _siglip_image_processor(image_size: int):
    """A SigLIP image processor resizing to ``image_size`` square (PIL backend without torchvision)."""
    size = {"height": image_size, "width": image_size}
    return _normalising_image_processor("SiglipImageProcessor", size, SIGLIP_IMAGE_MEAN, SIGLIP_IMAGE_STD)


def build_tiny_siglip_llava(
    spec: TinyLlavaSpec = SIGLIP_TEST_SPEC, dtype: torch.dtype = torch.float32
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A ``LlavaForConditionalGeneration`` with a ``SiglipVisionModel`` tower, and its processor.

    The tower has no class token, so LLaVA uses ``vision_feature_select_strategy="full"`` and every
    ``<image>`` expands to ``spec.num_patches`` placeholders (64 for :data:`SIGLIP_TEST_SPEC`).
    Seeded like :func:`build_tiny_llava`.
    """
    tokenizer = build_tiny_tokenizer()
    config = _build_config(spec, tokenizer)
    config.vision_config = tiny_siglip_vision_config(spec)
    config.vision_feature_select_strategy = "full"
    model = _instantiate(LlavaForConditionalGeneration, config, spec.seed, tokenizer, dtype)
    processor = LlavaProcessor(
        image_processor=_siglip_image_processor(spec.image_size),
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="full",
        num_additional_image_tokens=0,  # no class token
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    return model, processor


# --------------------------------------------------------------------------------------------------
# LLaVA-NeXT (anyres)
# --------------------------------------------------------------------------------------------------


# LLaVA-NeXT's grid pinpoints ([[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]) scaled to
# the tiny tower's 112 px crops, so the crop grids (1x2, 2x1, 2x2, 3x1, 1x3) are the real ones.
def _scaled_pinpoints(crop: int) -> list[list[int]]:
    return [[crop, 2 * crop], [2 * crop, crop], [2 * crop, 2 * crop], [3 * crop, crop], [crop, 3 * crop]]


def build_tiny_llava_next(
    spec: TinyLlavaSpec = TEST_SPEC, dtype: torch.dtype = torch.float32
) -> tuple[torch.nn.Module, object]:
    """A ``LlavaNextForConditionalGeneration`` (CLIP tower, anyres) and a matching ``LlavaNextProcessor``.

    Each image becomes a base crop plus a grid of ``spec.image_size`` crops chosen from LLaVA-NeXT's
    pinpoints scaled to the crop size; the processor's placeholder count (base + unpadded grid + one
    newline per grid row) matches what ``pack_image_features`` produces. Seeded like `build_tiny_llava`.
    """
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor

    image_processor_class = _image_processor_class("LlavaNextImageProcessor")

    tokenizer = build_tiny_tokenizer()
    llava_config = _build_config(spec, tokenizer)
    pinpoints = _scaled_pinpoints(spec.image_size)
    config = LlavaNextConfig(
        vision_config=llava_config.vision_config,
        text_config=llava_config.text_config,
        image_grid_pinpoints=pinpoints,
        **_llava_config_kwargs(spec, tokenizer),
    )
    model = _instantiate(LlavaNextForConditionalGeneration, config, spec.seed, tokenizer, dtype)
    image_processor = image_processor_class(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
        image_grid_pinpoints=pinpoints,
        image_mean=CLIP_IMAGE_MEAN,
        image_std=CLIP_IMAGE_STD,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's class token
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    return model, processor


# --------------------------------------------------------------------------------------------------
# LLaVA-OneVision (SigLIP tower, anyres_max)
# --------------------------------------------------------------------------------------------------

# 112 px crops, 14 px patches: 64 tokens per crop, no class token; 6 SigLIP layers, the last one read.
ONEVISION_TEST_SPEC = TinyLlavaSpec(image_size=112, patch_size=14, vision_layers=6, vision_feature_layer=-1)
# Crop grids up to 3 x 3 and "anyres_max_4": the largest grids get downsampled, as OneVision's 6 x 6
# grids do with "anyres_max_9".
ONEVISION_MAX_CROPS = 4


def build_tiny_onevision(
    spec: TinyLlavaSpec = ONEVISION_TEST_SPEC, dtype: torch.dtype = torch.float32
) -> tuple[torch.nn.Module, object, PreTrainedTokenizerFast]:
    """A ``LlavaOnevisionForConditionalGeneration`` (SigLIP tower, ``"full"`` features), its image processor
    and tokenizer.

    No ``LlavaOnevisionProcessor``: it insists on a video processor, which needs torchvision (an optional
    dependency). Build prompts with the placeholder counts yourself. Seeded like `build_tiny_llava`.
    """
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
    )

    image_processor_class = _image_processor_class("LlavaOnevisionImageProcessor")

    tokenizer = build_tiny_tokenizer()
    text_config = _build_config(spec, tokenizer).text_config
    crop = spec.image_size
    pinpoints = [[rows * crop, cols * crop] for rows in (1, 2, 3) for cols in (1, 2, 3)]
    vision_aspect_ratio = f"anyres_max_{ONEVISION_MAX_CROPS}"
    config = LlavaOnevisionConfig(
        vision_config=tiny_siglip_vision_config(spec),
        text_config=text_config,
        image_token_index=tokenizer.image_token_id,
        image_grid_pinpoints=pinpoints,
        projector_hidden_act=spec.projector_hidden_act,
        vision_feature_layer=spec.vision_feature_layer,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=vision_aspect_ratio,
        tie_word_embeddings=False,
    )
    config.image_token_id = tokenizer.image_token_id
    config.pad_token_id = tokenizer.pad_token_id
    model = _instantiate(LlavaOnevisionForConditionalGeneration, config, spec.seed, tokenizer, dtype)
    image_processor = image_processor_class(
        size={"height": crop, "width": crop},
        image_grid_pinpoints=pinpoints,
        image_mean=SIGLIP_IMAGE_MEAN,
        image_std=SIGLIP_IMAGE_STD,
    )
    return model, image_processor, tokenizer
