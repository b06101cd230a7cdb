"""lmms-eval model ``pitome_llava``: an original LLaVA checkpoint (``llava`` package) with PiToMe / ToMe.

The harness setup of the PiToMe paper's LLaVA table: checkpoints such as
``liuhaotian/llava-v1.5-7b`` loaded with llava's own builder, prompted with its
conversation templates (``vicuna_v1``), as lmms-eval's built-in ``llava`` model does::

    python -m lmms_eval --model pitome_llava \\
        --model_args pretrained=liuhaotian/llava-v1.5-7b,method=pitome,keep_ratio=0.9 \\
        --tasks gqa --batch_size 1 --output_path out/ --log_samples

Model arguments (``--model_args k=v,...``) are those of ``pitome_llava_hf``
(`pitome_mllm.integrations.lmms_eval.llava_hf`; both build on `pitome_mllm.integrations.lmms_eval.base`)
- every `PiToMeConfig` field (``method``, ``keep_ratio``,
``preset``, ``target_tokens``, ``metric``, ``keep_order``, ...), ``device``, ``dtype``,
``attn_implementation``, ``load_in_4bit``, ``load_in_8bit``, ``batch_size``,
``max_new_tokens``, ``use_cache``, ``loglikelihood``, ``record`` - except that the prompt is
chosen by ``conv_template`` (default ``vicuna_v1``) instead of ``prompt_format``, and that
``model_base`` / ``model_name`` are passed to llava's builder. The model sits on one device
(``device_map`` is not supported). Per-sample and per-run costs are reported as by
``pitome_llava_hf``; visual tokens are counted at the projector's output.

Register it with the ``lmms_eval.models`` entry point `manifest`. Importing this module
imports torch and lmms-eval's API, never ``llava`` or a model: those load when a run asks.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from ...lmms_eval_manifest import LLAVA_ORIGINAL_MODEL_ID
from ...runtime.llava_original import DEFAULT_CONV_TEMPLATE
from .base import ModelCall, PiToMeLmmsModel, _is_unset


def left_pad(rows: list[torch.Tensor], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, each ``[B, L]``, with ``rows`` aligned to the right.

    Batched generation continues every row from its right end; llava re-pads the spliced
    sequences on the side ``config.tokenizer_padding_side`` names, which is set to left too.
    """
    length = max(row.shape[0] for row in rows)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=rows[0].dtype)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, length - row.shape[0] :] = row
        attention_mask[index, length - row.shape[0] :] = 1
    return input_ids, attention_mask


class PiToMeLlava(PiToMeLmmsModel):
    """An original-LLaVA causal LM, optionally patched with `pitome_mllm.patch`, as an lmms-eval model.

    Request handling, batching, cost tracking and the run record are `PiToMeLmmsModel`'s; this
    class loads through llava's builder, builds llava conversation prompts with one
    ``IMAGE_TOKEN_INDEX`` marker per image, and runs llava's ``generate`` / forward.
    """

    model_id = LLAVA_ORIGINAL_MODEL_ID

    def __init__(
        self,
        pretrained: str,
        model_base: str | None = None,
        model_name: str | None = None,
        conv_template: str = DEFAULT_CONV_TEMPLATE,
        **arguments: Any,
    ) -> None:
        """``arguments``: the loading, generation and patch arguments of `PiToMeLmmsModel`."""
        self.prompt_format = f"llava:{conv_template}"
        self.conv_template = conv_template
        self.model_base = None if _is_unset(model_base) else model_base
        self.model_name = None if _is_unset(model_name) else model_name
        super().__init__(pretrained, **arguments)

    # ------------------------------------------------------------------ setup
    @staticmethod
    def _check_conv_template(conv_template: str) -> str:
        from ...models.llava_original import require_llava

        require_llava()
        from llava.conversation import conv_templates

        if conv_template not in conv_templates:
            raise ValueError(f"conv_template must be one of {sorted(conv_templates)}, got {conv_template!r}")
        return conv_template

    def _load(self) -> None:
        from ...runtime.llava_original import load_llava_original

        # Checked here, after the patch arguments: the check needs the llava package.
        self._check_conv_template(self.conv_template)
        tokenizer, model, image_processor, context_len = load_llava_original(
            self.pretrained, self.model_base, model_name=self.model_name, **self.load_settings
        )
        # Batched generation continues every row from its right end (see `left_pad`).
        model.config.tokenizer_padding_side = "left"
        self._model = model
        self.processor = None
        self._tokenizer = tokenizer
        self.image_processor = image_processor
        self._config = model.config
        self._device = model.device
        self.context_len = context_len

    def _patch(self):
        """Patch unless ``method=none`` without a budget; unpatched runs get only the generate wrapper."""
        if not self._wants_patch():
            from ...models.llava_original import enable_generate_compat

            self.generate_compat = enable_generate_compat(self._model)
            return None
        from ...api import patch

        return patch(self._model, self.image_processor, self.patch_config)

    # ------------------------------------------------------------------ inputs
    def _prompt_ids(self, context: str, num_images: int) -> torch.Tensor:
        """``[L]`` ids of ``context`` in the conversation template, one -200 marker per image."""
        from ...runtime.llava_original import build_prompt, tokenize_prompt

        image_start_end = bool(getattr(self._config, "mm_use_im_start_end", False))
        prompt = build_prompt([(context, None)], self.conv_template, image_start_end, num_images)
        return tokenize_prompt(prompt, self._tokenizer)

    def _pixel_values(self, images: list[Image.Image]) -> torch.Tensor | None:
        from ...runtime.llava_original import prepare_images

        return prepare_images(images, self.image_processor, self._model) if images else None

    @staticmethod
    def _input_tokens(text_ids: torch.Tensor, num_images: int, visual_tokens: int) -> int:
        """Tokens the language model reads: text tokens plus the spliced visual tokens."""
        return int(text_ids.shape[0]) - num_images + num_images * visual_tokens

    @classmethod
    def _token_counts(cls, rows: list[torch.Tensor], image_counts: list[int]) -> Any:
        """Per row ``(input tokens, visual tokens)`` once the run measured the visual tokens per image
        (llava splices the projector's output, so the count is known only then)."""

        def counts(visual_tokens: int) -> list[tuple[int, int]]:
            return [
                (cls._input_tokens(row, num_images, visual_tokens), num_images * visual_tokens)
                for row, num_images in zip(rows, image_counts, strict=True)
            ]

        return counts

    def _generation_call(self, items: list[tuple[str, list[Image.Image]]]) -> ModelCall:
        rows = [self._prompt_ids(context, len(images)) for context, images in items]
        input_ids, attention_mask = left_pad(rows, self._pad_token_id)
        all_images = [image for _, images in items for image in images]
        inputs = {
            "inputs": input_ids.to(self._device),
            "attention_mask": attention_mask.to(self._device),
            "images": self._pixel_values(all_images),
            "image_sizes": [image.size for image in all_images] or None,
        }
        # Generating from embeddings, llava's generate returns only the new tokens.
        return ModelCall(inputs, prompt_length=0, token_counts=self._token_counts(rows, [len(i) for _, i in items]))

    def _scoring_call(self, context: str, images: list[Image.Image], continuation_ids: torch.Tensor) -> ModelCall:
        input_ids = torch.cat([self._prompt_ids(context, len(images)), continuation_ids])
        inputs = {
            "input_ids": input_ids[None].to(self._device),
            "images": self._pixel_values(images),
            "image_sizes": [image.size for image in images] or None,
        }
        # The continuation ends the spliced sequence, so its logits are the last ones.
        return ModelCall(inputs, prompt_length=0, token_counts=self._token_counts([input_ids], [len(images)]))


__all__ = ["PiToMeLlava", "left_pad"]
