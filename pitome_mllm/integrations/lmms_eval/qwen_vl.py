"""lmms-eval models ``pitome_qwen2_5_vl`` and ``pitome_qwen3_vl``: transformers Qwen2.5-VL / Qwen3-VL with
PiToMe / ToMe (or a selection method) on each image's merged-grid tokens.

Registered through the ``lmms_eval.models`` entry point (`pitome_mllm.lmms_eval_manifest`)::

    python -m lmms_eval --model pitome_qwen2_5_vl \\
        --model_args pretrained=Qwen/Qwen2.5-VL-7B-Instruct,method=pitome,target_tokens=64,max_pixels=200704 \\
        --tasks textvqa_val --batch_size 1 --output_path out/ --log_samples --verbosity DEBUG

Model arguments (``--model_args k=v,...``): those of ``pitome_llava_hf`` (every `PiToMeConfig` field,
``device``, ``device_map``, ``dtype``, ``attn_implementation``, ``load_in_4bit``, ``load_in_8bit``,
``batch_size``, ``max_new_tokens``, ``use_cache``, ``loglikelihood``, ``record``) except ``prompt_format``,
plus:

* ``min_pixels``, ``max_pixels``: the processor's ``smart_resize`` bounds (default: the checkpoint's own),
  which fix each image's native token count (``h * w / (28 * 28)`` for Qwen2.5-VL, ``/ (32 * 32)`` for
  Qwen3-VL, after resizing into the bounds). lmms-eval's ``qwen2_5_vl`` defaults to 256 * 28 * 28 and
  1605632; pass those for its setting.
* ``system_prompt``: the system message (``"You are a helpful assistant."`` as lmms-eval's ``qwen2_5_vl``;
  ``none`` for none).

The prompt is the processor's chat template over ``[system, user: images first, then the text]``, as
lmms-eval's ``qwen2_5_vl`` / ``qwen3_vl`` build it (``<image>`` markers in the context are dropped), and,
as there, the few-shot delimiter ``"\\n\\n"`` is not a stop string. The images go to the processor as PIL
images (lmms-eval's models resize them with ``qwen_vl_utils`` first, to the same size).

The budget per image: ``target_tokens=K`` caps every image at K tokens (an image with fewer native tokens
keeps all of them); ``keep_ratio=r`` keeps ``ceil(r * n)`` of an image's ``n``. Costs are reported as by
``pitome_llava_hf``; the visual tokens of a sample are its image placeholders (all its images together).
"""

from __future__ import annotations

from typing import Any, ClassVar

from ...common.prompts import IMAGE_TOKEN
from ...lmms_eval_manifest import QWEN2_5_VL_MODEL_ID, QWEN3_VL_MODEL_ID
from ...runtime.loading import load_qwen_vl
from .base import _is_unset, parse_int
from .transformers_model import PiToMeTransformersModel

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."


class PiToMeQwenVL(PiToMeTransformersModel):
    """A transformers Qwen-VL model, optionally patched with `pitome_mllm.patch`, as an lmms-eval model."""

    # The transformers class this model name evaluates (a checkpoint of the other family is refused).
    model_class_name: ClassVar[str]
    # lmms-eval's Qwen-VL models drop the few-shot delimiter from a task's stop strings.
    ignored_stop_strings = ("\n\n",)

    def __init__(
        self,
        pretrained: str,
        min_pixels: int | str | None = None,
        max_pixels: int | str | None = None,
        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
        **arguments: Any,
    ) -> None:
        """``arguments``: the loading, generation and patch arguments of `PiToMeLmmsModel`."""
        self.min_pixels = None if _is_unset(min_pixels) else parse_int("min_pixels", min_pixels)
        self.max_pixels = None if _is_unset(max_pixels) else parse_int("max_pixels", max_pixels)
        self.system_prompt = None if _is_unset(system_prompt) else str(system_prompt)
        self.prompt_format = "chat_template"
        super().__init__(pretrained, **arguments)

    def _load_checkpoint(self):
        model, processor = load_qwen_vl(
            self.pretrained, **self.load_settings, min_pixels=self.min_pixels, max_pixels=self.max_pixels
        )
        found = type(model).__name__
        if found != self.model_class_name:
            others = {model.model_class_name: model.model_id for model in (PiToMeQwen2_5_VL, PiToMeQwen3_VL)}
            hint = f"; evaluate it with --model {others[found]}" if found in others else ""
            raise ValueError(
                f"{self.model_id} evaluates {self.model_class_name} checkpoints, {self.pretrained!r} is a {found}{hint}"
            )
        return model, processor

    def _prompt(self, context: str, num_images: int) -> str:
        text = context.replace(IMAGE_TOKEN, "")
        messages: list[dict[str, Any]] = []
        if self.system_prompt is not None:
            messages.append({"role": "system", "content": self.system_prompt})
        content: list[dict[str, str]] = [{"type": "image"} for _ in range(num_images)]
        content.append({"type": "text", "text": text})
        messages.append({"role": "user", "content": content})
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


class PiToMeQwen2_5_VL(PiToMeQwenVL):  # noqa: N801 (lmms-eval's own class is Qwen2_5_VL)
    """``pitome_qwen2_5_vl``: ``Qwen2_5_VLForConditionalGeneration`` checkpoints."""

    model_id = QWEN2_5_VL_MODEL_ID
    model_class_name = "Qwen2_5_VLForConditionalGeneration"


class PiToMeQwen3_VL(PiToMeQwenVL):  # noqa: N801 (lmms-eval's own class is Qwen3_VL)
    """``pitome_qwen3_vl``: ``Qwen3VLForConditionalGeneration`` checkpoints."""

    model_id = QWEN3_VL_MODEL_ID
    model_class_name = "Qwen3VLForConditionalGeneration"


__all__ = ["DEFAULT_SYSTEM_PROMPT", "PiToMeQwen2_5_VL", "PiToMeQwen3_VL", "PiToMeQwenVL"]
