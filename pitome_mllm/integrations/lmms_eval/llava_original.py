"""lmms-eval model ``pitome_llava``: an original LLaVA checkpoint (``llava`` package) with PiToMe / ToMe.

The harness setup of the PiToMe paper's LLaVA table: checkpoints such as
``liuhaotian/llava-v1.5-7b`` loaded with llava's own builder, prompted with its
conversation templates (``vicuna_v1``), as lmms-eval's built-in ``llava`` model does::

    python -m lmms_eval --model pitome_llava \\
        --model_args pretrained=liuhaotian/llava-v1.5-7b,method=pitome,keep_ratio=0.9 \\
        --tasks gqa --batch_size 1 --output_path out/ --log_samples

Model arguments (``--model_args k=v,...``) are those of ``pitome_llava_hf``
(`pitome_mllm.integrations.lmms_eval.llava_hf`) - every `PiToMeConfig` field (``method``, ``keep_ratio``,
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

from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from PIL import Image

from ...config import PiToMeConfig
from ...lmms_eval_manifest import LLAVA_ORIGINAL_MODEL_ID
from ...runtime.llava_original import DEFAULT_CONV_TEMPLATE
from ...runtime.loading import StageTimer
from .llava_hf import (
    LOGLIKELIHOOD_VALUES,
    PiToMeLlavaHF,
    SampleCost,
    _is_unset,
    generation_settings,
    parse_bool,
    parse_int,
    parse_patch_args,
    truncate_at_stop,
)


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


class PiToMeLlava(PiToMeLlavaHF):
    """An original-LLaVA causal LM, optionally patched with `pitome_mllm.patch`, as an lmms-eval model.

    Request handling, batching, cost tracking and the run record are `PiToMeLlavaHF`'s; this
    class loads through llava's builder, builds llava conversation prompts with one
    ``IMAGE_TOKEN_INDEX`` marker per image, and runs llava's ``generate`` / forward.
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        model_base: str | None = None,
        model_name: str | None = None,
        conv_template: str = DEFAULT_CONV_TEMPLATE,
        device: str | None = None,
        dtype: str = "auto",
        attn_implementation: str | None = None,
        load_in_4bit: bool | str = False,
        load_in_8bit: bool | str = False,
        batch_size: int | str = 1,
        max_new_tokens: int | str = 1024,
        use_cache: bool | str = True,
        loglikelihood: str = "loss",
        record: str | None = None,
        max_batch_size: int | None = None,  # passed by lmms-eval with --max_batch_size; unused
        **patch_args: Any,
    ) -> None:
        # The base class loads a transformers LLaVA in its __init__, so this one sets up the
        # same attributes its methods read (see PiToMeLlavaHF.__init__) around its own loader.
        super(PiToMeLlavaHF, self).__init__()
        self._parse_run_settings(batch_size, max_new_tokens, use_cache, loglikelihood)
        self.patch_args = parse_patch_args(patch_args)
        self.patch_config = PiToMeConfig(**self.patch_args)  # fail before loading a checkpoint
        self.pretrained = str(pretrained)
        self.prompt_format = f"llava:{conv_template}"
        self.conv_template = self._check_conv_template(conv_template)

        accelerator = Accelerator()
        self.accelerator = accelerator
        if accelerator.num_processes > 1:
            device = str(accelerator.device)  # data parallel: one replica per process
        self.load_settings = {
            "dtype": dtype,
            "device": "auto" if _is_unset(device) else device,
            "load_in_4bit": parse_bool("load_in_4bit", load_in_4bit),
            "load_in_8bit": parse_bool("load_in_8bit", load_in_8bit),
            "attn_implementation": None if _is_unset(attn_implementation) else attn_implementation,
        }
        self._load(None if _is_unset(model_base) else model_base, None if _is_unset(model_name) else model_name)
        self.handle = self._patch_or_wrap()
        self._rank = accelerator.process_index
        self._world_size = accelerator.num_processes
        self.record_path = None if _is_unset(record) else self._rank_record_path(Path(str(record)))
        self._sample_costs: list[SampleCost] = []
        self._model_seconds = 0.0
        self._generated_tokens = 0
        self._reported_seconds = 0.0
        self._reported_tokens = 0

    # ------------------------------------------------------------------ setup helpers
    def _parse_run_settings(self, batch_size, max_new_tokens, use_cache, loglikelihood) -> None:
        if loglikelihood not in LOGLIKELIHOOD_VALUES:
            raise ValueError(f"loglikelihood must be one of {LOGLIKELIHOOD_VALUES}, got {loglikelihood!r}")
        if str(batch_size).startswith("auto"):
            raise ValueError(f"batch_size 'auto' is not supported by {LLAVA_ORIGINAL_MODEL_ID}; pass an integer")
        self.batch_size_per_device = parse_int("batch_size", batch_size)
        if self.batch_size_per_device < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size_per_device}")
        self.default_max_new_tokens = parse_int("max_new_tokens", max_new_tokens)
        self.use_cache = parse_bool("use_cache", use_cache)
        self.loglikelihood_value = loglikelihood

    @staticmethod
    def _check_conv_template(conv_template: str) -> str:
        from ...runtime.llava_original import require_llava

        require_llava()
        from llava.conversation import conv_templates

        if conv_template not in conv_templates:
            raise ValueError(f"conv_template must be one of {sorted(conv_templates)}, got {conv_template!r}")
        return conv_template

    def _load(self, model_base: str | None, model_name: str | None) -> None:
        from ...runtime.llava_original import load_llava_original

        tokenizer, model, image_processor, context_len = load_llava_original(
            self.pretrained, model_base, model_name=model_name, **self.load_settings
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

    def _patch_or_wrap(self):
        """Patch unless ``method=none`` without a budget; unpatched runs get only the generate wrapper."""
        from ...models.llava_original import enable_generate_compat

        if self.patch_config.method == "none" and self.patch_config.target_tokens is None:
            self.generate_compat = enable_generate_compat(self._model)
            return None
        from ...api import patch

        return patch(self._model, self.image_processor, self.patch_config)

    # ------------------------------------------------------------------ inputs
    @property
    def _pad_token_id(self) -> int:
        tokenizer = self._tokenizer
        return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

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

    # ------------------------------------------------------------------ generation
    def _generate(self, items: list[tuple[str, list[Image.Image]]], gen_kwargs: dict[str, Any]):
        """Generate for ``(context, images)`` items in one batch; returns ``(texts, costs)``."""
        settings = generation_settings(gen_kwargs, self.default_max_new_tokens)
        rows = [self._prompt_ids(context, len(images)) for context, images in items]
        input_ids, attention_mask = left_pad(rows, self._pad_token_id)
        all_images = [image for _, images in items for image in images]
        eos_token_id = self.eot_token_id
        with torch.inference_mode(), StageTimer(self._model) as timer:
            new_tokens = self._model.generate(
                input_ids.to(self._device),
                attention_mask=attention_mask.to(self._device),
                images=self._pixel_values(all_images),
                image_sizes=[image.size for image in all_images] or None,
                **settings.generate_kwargs,
                use_cache=self.use_cache,
                pad_token_id=self._pad_token_id,
                eos_token_id=eos_token_id,
            )
        # Generating from embeddings, llava's generate returns only the new tokens.
        texts = self._tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        texts = [truncate_at_stop(text, settings.stop_strings) for text in texts]
        output_lengths = [self._generated_length(row, eos_token_id) for row in new_tokens]
        costs = [
            SampleCost(
                input_tokens=self._input_tokens(row, len(images), timer.visual_tokens),
                output_tokens=output_tokens,
                visual_tokens=len(images) * timer.visual_tokens,
                ttft_s=timer.prefill_s,
                generation_s=timer.total_s,
                batch_size=len(items),
            )
            for row, (_, images), output_tokens in zip(rows, items, output_lengths, strict=True)
        ]
        self._model_seconds += timer.total_s
        self._generated_tokens += sum(output_lengths)
        return texts, costs

    # ------------------------------------------------------------------ log-likelihood
    def _score(self, context: str, continuation: str, images: list[Image.Image]) -> tuple[float, bool, SampleCost]:
        prompt_ids = self._prompt_ids(context, len(images))
        # Tokenised on its own and appended, so its tokens are exactly the scored ones.
        continuation_ids = self._tokenizer(continuation, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        num_continuation = continuation_ids.shape[0]
        if num_continuation == 0:
            raise ValueError(f"continuation {continuation!r} has no tokens to score")
        input_ids = torch.cat([prompt_ids, continuation_ids])[None].to(self._device)
        with torch.inference_mode(), StageTimer(self._model) as timer:
            logits = self._model(
                input_ids=input_ids,
                images=self._pixel_values(images),
                image_sizes=[image.size for image in images] or None,
                use_cache=False,
            ).logits
        # The continuation ends the spliced sequence; logits at position t predict token t + 1.
        predicting = logits[0, -num_continuation - 1 : -1].float().log_softmax(dim=-1)
        targets = continuation_ids.to(predicting.device)
        log_prob = float(predicting.gather(-1, targets.unsqueeze(-1)).sum())
        is_greedy = bool((predicting.argmax(dim=-1) == targets).all())
        self._model_seconds += timer.total_s
        cost = SampleCost(
            input_tokens=self._input_tokens(input_ids[0], len(images), timer.visual_tokens),
            output_tokens=0,
            visual_tokens=len(images) * timer.visual_tokens,
            ttft_s=timer.prefill_s,
            generation_s=timer.total_s,
            batch_size=1,
        )
        return log_prob, is_greedy, cost


__all__ = ["PiToMeLlava", "left_pad"]
