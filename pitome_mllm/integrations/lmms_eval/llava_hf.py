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

from ...common.prompts import LLAVA_V1_SYSTEM, PROMPT_FORMATS, build_prompt
from ...lmms_eval_manifest import MODEL_ID
from ...runtime.loading import load_llava
from .base import SampleCost, generation_settings, parse_patch_args, truncate_at_stop
from .transformers_model import PiToMeTransformersModel


class PiToMeLlavaHF(PiToMeTransformersModel):
    """A transformers LLaVA, optionally patched with `pitome_mllm.patch`, as an lmms-eval model."""

    model_id = MODEL_ID

    def __init__(self, pretrained: str, prompt_format: str = "chat_template", **arguments: Any) -> None:
        """``arguments``: the loading, generation and patch arguments of `PiToMeLmmsModel`."""
        if prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")
        self.prompt_format = prompt_format
        super().__init__(pretrained, **arguments)

    def _load_checkpoint(self):
        return load_llava(self.pretrained, **self.load_settings)

    def _prompt(self, context: str, num_images: int) -> str:
        return build_prompt(self.processor, context, num_images, self.prompt_format)


__all__ = [
    "LLAVA_V1_SYSTEM",
    "PiToMeLlavaHF",
    "SampleCost",
    "build_prompt",
    "generation_settings",
    "parse_patch_args",
    "truncate_at_stop",
]
