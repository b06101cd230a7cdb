"""lmms-eval model ``pitome_llava_hf``: a transformers LLaVA with PiToMe / ToMe token merging.

Registered through the ``lmms_eval.models`` entry point (`pitome_mllm.lmms_eval_manifest`)::

    python -m lmms_eval --model pitome_llava_hf \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=pitome,target_tokens=128 \\
        --tasks gqa --batch_size 1 --output_path out/ --log_samples --verbosity DEBUG

Model arguments (``--model_args k=v,...``):

* ``pretrained``: hub id or local folder of a transformers LLaVA checkpoint (required).
* patch: every `PiToMeConfig` field - ``method`` (``pitome`` / ``tome`` / ``none``, or a
  selection method: ``random``, ``pool``, ``dominant`` / ``visionzip``, ``fastervlm``,
  ``divprune``, ``cdpruner``),
  ``keep_ratio``, ``preset``, ``target_tokens``, ``metric``, ``keep_order``, ``reduce``,
  ``prop_attn``, ... ; ``none`` (the word) leaves an optional field unset. ``method=none``
  without ``target_tokens`` evaluates the unpatched model.
* loading: ``device`` (``auto``, ``cuda``, ``cuda:1``, ``cpu``), ``device_map``, ``dtype``
  (``auto`` = float16 on GPUs, float32 on CPU), ``attn_implementation``, ``load_in_4bit``,
  ``load_in_8bit``.
* generation: ``batch_size``, ``max_new_tokens`` (used when a task's ``generation_kwargs`` give
  none; 1024 as lmms-eval's ``llava_hf``), ``prompt_format`` (``chat_template``: the processor's
  chat template with the images first, as lmms-eval's ``llava_hf``; ``llava_v1``: LLaVA-1.5's own
  evaluation prompt with the Vicuna system message), ``use_cache``, ``loglikelihood``
  (``loss`` or ``logprob``, see `PiToMeLlavaHF.loglikelihood`).
* ``record``: path of a JSON file that receives the run record (patch summary, peak memory,
  mean per-sample cost); with several processes each writes ``<stem>.rank<N><suffix>``.

What every run reports besides the task metrics:

* per sample, in the ``token_counts`` field of the logged samples (``--log_samples``):
  ``visual_tokens``, ``input_tokens``, ``output_tokens``, ``ttft_s`` (time to the first
  token's logits: vision tower, projector and prefill), ``generation_s`` and ``batch_size``
  (times are per batch, so equal for the samples of one batch);
* per run, in the ``throughput`` block of the results JSON (lmms-eval's ``log_metrics``):
  ``avg_visual_tokens``, ``avg_ttft_s``, ``avg_peak_memory_mib`` (peak CUDA memory allocated, or
  the process's peak RSS on CPU), ``avg_keep_ratio``; the patch arguments are in
  ``config.model_args``.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from ...common.prompts import IMAGE_TOKEN, LLAVA_V1_SYSTEM, PROMPT_FORMATS, build_prompt
from ...lmms_eval_manifest import MODEL_ID
from ...models.llava_hf import vision_dtype
from ...runtime.loading import load_llava
from .base import (
    ModelCall,
    PiToMeLmmsModel,
    SampleCost,
    generation_settings,
    parse_patch_args,
    truncate_at_stop,
)


class PiToMeLlavaHF(PiToMeLmmsModel):
    """A transformers LLaVA, optionally patched with `pitome_mllm.patch`, as an lmms-eval model."""

    model_id = MODEL_ID
    accepts_device_map = True

    def __init__(self, pretrained: str, prompt_format: str = "chat_template", **arguments: Any) -> None:
        """``arguments``: the loading, generation and patch arguments of `PiToMeLmmsModel`."""
        if prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")
        self.prompt_format = prompt_format
        super().__init__(pretrained, **arguments)

    # ------------------------------------------------------------------ setup
    def _load(self) -> None:
        model, processor = load_llava(self.pretrained, **self.load_settings)
        # Batched generation with a decoder-only model continues from the right end of every row.
        processor.tokenizer.padding_side = "left"
        self._model = model
        self.processor = processor
        self._tokenizer = processor.tokenizer
        self._config = model.config
        self._device = model.device
        self._image_token_id = self._find_image_token_id(processor)

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
            inputs["pixel_values"] = inputs["pixel_values"].to(vision_dtype(self.model))
        return inputs

    def _visual_tokens(self, input_ids: torch.Tensor) -> list[int]:
        """Image placeholders per row of ``input_ids`` ``[B, L]``: the processor emitted the merged count."""
        return (input_ids == self._image_token_id).sum(dim=-1).tolist()

    def _generation_call(self, items: list[tuple[str, list[Image.Image]]]) -> ModelCall:
        prompts = [build_prompt(self.processor, context, len(images), self.prompt_format) for context, images in items]
        inputs = self._encode(prompts, [image for _, images in items for image in images])
        input_tokens = inputs["attention_mask"].sum(dim=-1).tolist()
        counts = list(zip(input_tokens, self._visual_tokens(inputs["input_ids"]), strict=True))
        return ModelCall(inputs=dict(inputs), prompt_length=inputs["input_ids"].shape[1], token_counts=lambda _: counts)

    def _scoring_call(self, context: str, images: list[Image.Image], continuation_ids: torch.Tensor) -> ModelCall:
        prompt = build_prompt(self.processor, context, len(images), self.prompt_format)
        inputs = self._encode([prompt], images)
        input_ids = torch.cat([inputs["input_ids"], continuation_ids.to(self.device)[None]], dim=1)
        model_inputs = dict(inputs)
        model_inputs["input_ids"] = input_ids
        model_inputs["attention_mask"] = torch.ones_like(input_ids)
        counts = [(int(input_ids.shape[1]), self._visual_tokens(inputs["input_ids"])[0])]
        return ModelCall(inputs=model_inputs, prompt_length=input_ids.shape[1], token_counts=lambda _: counts)


__all__ = [
    "LLAVA_V1_SYSTEM",
    "PiToMeLlavaHF",
    "SampleCost",
    "build_prompt",
    "generation_settings",
    "parse_patch_args",
    "truncate_at_stop",
]
