"""What the lmms-eval models of transformers checkpoints share (``pitome_llava_hf``, ``pitome_qwen2_5_vl``,
``pitome_qwen3_vl``): a model and its processor, patched together, prompts rendered to text and encoded
by the processor with the images, the visual tokens of every sample read from its image placeholders.

A family says how to load its checkpoints (`_load_checkpoint`) and how a task's context and images
become the prompt text (`_prompt`); batching, timing and the run record are `PiToMeLmmsModel`'s.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import torch
from PIL import Image

from ...common.prompts import IMAGE_TOKEN
from ...models import model_parts
from .base import ModelCall, PiToMeLmmsModel


class PiToMeTransformersModel(PiToMeLmmsModel):
    """A transformers multimodal model and its processor, optionally patched, as an lmms-eval model.

    The processor emits one placeholder per visual token the language model receives (the patch
    makes it emit the reduced count), so the placeholders are each sample's visual tokens.
    """

    accepts_device_map = True

    # ------------------------------------------------------------------ what a family implements
    @abstractmethod
    def _load_checkpoint(self) -> tuple[Any, Any]:
        """``(model, processor)`` of ``self.pretrained`` loaded with ``self.load_settings``."""

    @abstractmethod
    def _prompt(self, context: str, num_images: int) -> str:
        """The text handed to the processor for a task's ``context`` and ``num_images`` images."""

    # ------------------------------------------------------------------ setup
    def _load(self) -> None:
        model, processor = self._load_checkpoint()
        # Batched generation with a decoder-only model continues from the right end of every row.
        processor.tokenizer.padding_side = "left"
        self._model = model
        self.processor = processor
        self._tokenizer = processor.tokenizer
        self._config = model.config
        self._device = model.device
        self._image_token_id = self._find_image_token_id(processor)
        self._vision_dtype = next(model_parts(model).tower.parameters()).dtype

    def _patch(self):
        if not self._wants_patch():
            return None
        from ...api import patch

        return patch(self._model, self.processor, self.patch_config)

    @staticmethod
    def _find_image_token_id(processor) -> int:
        image_token_id = getattr(processor, "image_token_id", None)
        if image_token_id is None:
            image_token_id = processor.tokenizer.convert_tokens_to_ids(getattr(processor, "image_token", IMAGE_TOKEN))
        return int(image_token_id)

    # ------------------------------------------------------------------ inputs
    def _encode(self, prompts: list[str], images: list[Image.Image]):
        kwargs: dict[str, Any] = {"text": prompts, "return_tensors": "pt", "padding": True}
        if images:
            kwargs["images"] = images
        inputs = self.processor(**kwargs).to(self.device)
        if "pixel_values" in inputs:
            # The tower's dtype: the language model may be quantised.
            inputs["pixel_values"] = inputs["pixel_values"].to(self._vision_dtype)
        return inputs

    def _visual_tokens(self, input_ids: torch.Tensor) -> list[int]:
        """Image placeholders per row of ``input_ids`` ``[B, L]``: the processor emitted the merged count."""
        return (input_ids == self._image_token_id).sum(dim=-1).tolist()

    def _generation_call(self, items: list[tuple[str, list[Image.Image]]]) -> ModelCall:
        prompts = [self._prompt(context, len(images)) for context, images in items]
        inputs = self._encode(prompts, [image for _, images in items for image in images])
        input_tokens = inputs["attention_mask"].sum(dim=-1).tolist()
        counts = list(zip(input_tokens, self._visual_tokens(inputs["input_ids"]), strict=True))
        return ModelCall(inputs=dict(inputs), prompt_length=inputs["input_ids"].shape[1], token_counts=lambda _: counts)

    def _scoring_call(self, context: str, images: list[Image.Image], continuation_ids: torch.Tensor) -> ModelCall:
        inputs = self._encode([self._prompt(context, len(images))], images)
        prompt_ids = inputs["input_ids"]
        continuation = continuation_ids.to(self.device)[None]  # [1, C]
        input_ids = torch.cat([prompt_ids, continuation], dim=1)
        model_inputs = dict(inputs)
        model_inputs["input_ids"] = input_ids
        model_inputs["attention_mask"] = torch.ones_like(input_ids)
        # Other per-token inputs (``[1, L]``, e.g. Qwen-VL's mm_token_type_ids) grow by the continuation's
        # tokens, which are text: type 0.
        for name, value in inputs.items():
            if name not in ("input_ids", "attention_mask") and _per_token(value, prompt_ids):
                model_inputs[name] = torch.cat([value, value.new_zeros(continuation.shape)], dim=1)
        counts = [(int(input_ids.shape[1]), self._visual_tokens(prompt_ids)[0])]
        return ModelCall(inputs=model_inputs, prompt_length=input_ids.shape[1], token_counts=lambda _: counts)


def _per_token(value: Any, prompt_ids: torch.Tensor) -> bool:
    return isinstance(value, torch.Tensor) and value.shape == prompt_ids.shape


__all__ = ["PiToMeTransformersModel"]
