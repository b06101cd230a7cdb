"""Running the original LLaVA code (the ``llava`` package): loading checkpoints, prompts, images.

The adapter that patches these models is `pitome_mllm.models.llava_original`. Importing this
module does not import ``llava``; every function that needs it says how to install it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..models import model_parts
from ..models.llava_original import QUANTIZATION_SKIP_MODULES, require_llava
from .loading import resolve_device, resolve_dtype
from .quantization import bitsandbytes_config


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

    target_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target_device)
    model_name = model_name or get_model_name_from_path(str(model_path))
    if "llava" not in model_name.lower():
        raise ValueError(
            f"llava's builder loads a multimodal model only when the model name contains 'llava'; "
            f"got {model_name!r}: pass model_name=..."
        )
    kwargs: dict = {}
    quantization = bitsandbytes_config(
        load_in_4bit,
        load_in_8bit,
        torch_dtype,
        QUANTIZATION_SKIP_MODULES,
        # What llava's builder uses; passed to from_pretrained directly because llava's own
        # load_4bit / load_8bit pass load_in_*bit keywords that transformers 5.x refuses.
        four_bit_options={"bnb_4bit_use_double_quant": True, "bnb_4bit_quant_type": "nf4"},
    )
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
        parts = model_parts(model)
        parts.tower.to(dtype=torch_dtype)
        parts.projector.to(dtype=torch_dtype)
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

    parts = model_parts(model)
    pixel_values = process_images(list(images), image_processor, model.config)
    return pixel_values.to(device=parts.vision_device, dtype=parts.vision_dtype)


__all__ = [
    "DEFAULT_CONV_TEMPLATE",
    "build_prompt",
    "load_llava_original",
    "prepare_images",
    "require_llava",
    "tokenize_prompt",
]
