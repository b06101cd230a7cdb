"""What the lmms-eval model classes share: model_args parsing, patching, batching, the generation
and scoring loops, per-sample costs and the run record.

`PiToMeLmmsModel` is the lmms-eval ``lmms`` class both families build on; a family (``pitome_llava_hf``
in `llava_hf`, ``pitome_llava`` in `llava_original`) says how to load and patch its checkpoints
and how to turn ``(context, images)`` into the keywords of its ``generate`` and forward
(`ModelCall`). Everything else - request handling, token counts, timing, memory, the
``throughput`` log and the record file - happens here, once.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from abc import abstractmethod
from collections.abc import Callable, Sequence
from operator import attrgetter
from pathlib import Path
from typing import Any, ClassVar

import torch
from accelerate import Accelerator
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.models.model_utils.gen_metrics import log_metrics
from loguru import logger as eval_logger
from PIL import Image
from tqdm import tqdm

from ...common.files import write_json_atomically
from ...config import PiToMeConfig
from ...runtime.loading import StageTimer
from .arguments import (
    LOGLIKELIHOOD_VALUES,
    check_loader_arguments,
    is_unset,
    parse_bool,
    parse_float,
    parse_int,
    parse_positive_int,
)

logger = logging.getLogger("pitome_mllm")

PATCH_ARGS = tuple(field.name for field in dataclasses.fields(PiToMeConfig))
# Multi-round tasks end themselves through doc_to_text; this only stops a task that never does.
MAX_ROUNDS = 16


# ------------------------------------------------------------------------------ model_args parsing
# The parsing and the checks of the loading arguments live in `arguments` (shared with the sweep's suite check).
_is_unset = is_unset


def parse_patch_args(raw: dict[str, Any]) -> dict[str, Any]:
    """Coerce lmms-eval model_args to the types of the `PiToMeConfig` fields.

    lmms-eval turns ``"1"`` into ``1`` and ``"0.9"`` into ``0.9`` but leaves ``"none"`` a
    string; the field annotations (``"float | None"``, ``"bool"``, ...) say what each must be.
    """
    unknown = sorted(set(raw) - set(PATCH_ARGS))
    if unknown:
        raise ValueError(f"unknown patch arguments {unknown}; allowed: {sorted(PATCH_ARGS)}")
    annotations = {field.name: str(field.type) for field in dataclasses.fields(PiToMeConfig)}
    parsed: dict[str, Any] = {}
    for name, value in raw.items():
        annotation = annotations[name]
        optional = "None" in annotation
        base = annotation.replace("| None", "").strip()
        if optional and _is_unset(value):
            parsed[name] = None
        elif base == "bool":
            parsed[name] = parse_bool(name, value)
        elif base == "int":
            parsed[name] = parse_int(name, value)
        elif base == "float":
            parsed[name] = parse_float(name, value)
        else:
            parsed[name] = str(value)
    return parsed


def truncate_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """``text`` up to the earliest occurrence of any of ``stop_strings`` (lmms-eval's ``until``)."""
    cut = len(text)
    for stop in stop_strings:
        if stop:
            position = text.find(stop)
            if position != -1:
                cut = min(cut, position)
    return text[:cut]


@dataclasses.dataclass
class GenerationSettings:
    stop_strings: list[str]
    generate_kwargs: dict[str, Any]


def generation_settings(gen_kwargs: dict[str, Any], default_max_new_tokens: int) -> GenerationSettings:
    """Map a task's ``generation_kwargs`` onto ``model.generate`` keywords.

    Greedy unless ``temperature > 0`` (lmms-eval's models ignore ``do_sample`` and decide on the
    temperature; so do we, so that ``temperature: 0`` with ``do_sample: true`` stays greedy).
    """
    until = gen_kwargs.get("until") or []
    if isinstance(until, str):
        until = [until]
    if not isinstance(until, (list, tuple)):
        raise ValueError(f"generation_kwargs 'until' must be a string or a list of strings, got {until!r}")
    temperature = float(gen_kwargs.get("temperature") or 0.0)
    kwargs: dict[str, Any] = {
        "max_new_tokens": parse_positive_int(
            "max_new_tokens", gen_kwargs.get("max_new_tokens", default_max_new_tokens)
        ),
        "num_beams": parse_positive_int("num_beams", gen_kwargs.get("num_beams") or 1),
        "do_sample": temperature > 0,
    }
    if temperature > 0:
        kwargs["temperature"] = temperature
        if gen_kwargs.get("top_p") is not None:
            kwargs["top_p"] = float(gen_kwargs["top_p"])
    return GenerationSettings(stop_strings=list(until), generate_kwargs=kwargs)


# ------------------------------------------------------------------------------------- costs
@dataclasses.dataclass
class SampleCost(TokenCounts):
    """lmms-eval's per-sample `TokenCounts`, plus what merging changes.

    lmms-eval writes ``to_dict()`` into the ``token_counts`` field of each logged sample; its
    efficiency summary reads ``input_tokens`` / ``output_tokens`` and ignores the rest.
    """

    visual_tokens: int | None = None
    ttft_s: float | None = None
    generation_s: float | None = None
    batch_size: int | None = None

    def to_dict(self) -> dict[str, Any]:
        values = super().to_dict()
        for name in ("visual_tokens", "ttft_s", "generation_s", "batch_size"):
            value = getattr(self, name)
            if value is not None:
                values[name] = value
        return values


def peak_memory_mib(model: torch.nn.Module) -> tuple[float, str]:
    """``(MiB, kind)``: peak CUDA memory allocated on the model's GPUs, else this process's peak RSS."""
    cuda_devices = {parameter.device for parameter in model.parameters() if parameter.device.type == "cuda"}
    if cuda_devices:
        allocated = sum(torch.cuda.max_memory_allocated(device) for device in cuda_devices)
        return allocated / 2**20, "cuda_max_memory_allocated"
    try:
        import resource
    except ImportError:  # Windows
        return float("nan"), "unavailable"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in KiB on Linux, in bytes on macOS.
    return (peak / 2**20 if sys.platform == "darwin" else peak / 1024), "cpu_peak_rss"


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


@dataclasses.dataclass
class ModelCall:
    """One batch as a family's model takes it.

    Attributes:
        inputs: keywords of ``model.generate`` / ``model(...)`` (on the model's device).
        prompt_length: leading columns of ``generate``'s output that repeat the prompt (0 where
            it returns only the new tokens).
        token_counts: ``visual tokens per image (as the run measured them) -> [(input tokens,
            visual tokens)]``, one pair per row, for the per-sample cost.
    """

    inputs: dict[str, Any]
    prompt_length: int
    token_counts: Callable[[int], list[tuple[int, int]]]


def continuation_log_prob(logits: torch.Tensor, continuation_ids: torch.Tensor) -> tuple[float, bool]:
    """``(summed log-probability, greedy)`` of a continuation that ends the scored sequence.

    Args:
        logits: ``[L, V]`` of one sequence whose last ``C`` tokens are the continuation.
        continuation_ids: ``[C]`` the continuation's tokens.
    """
    num_continuation = continuation_ids.shape[0]
    # Logits at position t predict token t + 1.
    predicting = logits[-num_continuation - 1 : -1].float().log_softmax(dim=-1)
    targets = continuation_ids.to(predicting.device)
    log_prob = float(predicting.gather(-1, targets.unsqueeze(-1)).sum())
    is_greedy = bool((predicting.argmax(dim=-1) == targets).all())
    return log_prob, is_greedy


# ------------------------------------------------------------------------------------- model
class PiToMeLmmsModel(lmms):
    """A multimodal model, optionally patched with `pitome_mllm.patch`, as an lmms-eval model.

    A family subclass sets `model_id`, calls ``super().__init__`` with the arguments every
    family takes, and implements `_load` (setting ``_model``, ``processor``, ``_tokenizer``,
    ``_config``, ``_device``), `_patch`, `_generation_call` and `_scoring_call`.
    """

    is_simple = True
    model_id: ClassVar[str]
    # Whether ``device_map`` is a load setting (else the model sits on one device).
    accepts_device_map: ClassVar[bool] = False
    # Stop strings of a task that this family does not stop at (as lmms-eval's own model of the family).
    ignored_stop_strings: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        pretrained: str,
        device: str | None = None,
        device_map: str | None = None,
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
        super().__init__()
        self.patch_args = parse_patch_args(patch_args)
        # Every loading and generation value, checked before a multi-GB checkpoint loads (the sweep checks the same).
        check_loader_arguments(
            {
                "dtype": dtype,
                "load_in_4bit": load_in_4bit,
                "load_in_8bit": load_in_8bit,
                "batch_size": batch_size,
                "max_new_tokens": max_new_tokens,
                "use_cache": use_cache,
                "loglikelihood": loglikelihood,
                "record": record,
            }
        )
        self.batch_size_per_device = parse_positive_int("batch_size", batch_size)
        self.default_max_new_tokens = parse_positive_int("max_new_tokens", max_new_tokens)
        self.use_cache = parse_bool("use_cache", use_cache)
        self.loglikelihood_value = loglikelihood
        self.pretrained = str(pretrained)
        # Validate the patch before loading a multi-GB checkpoint.
        self.patch_config = PiToMeConfig(**self.patch_args)

        accelerator = Accelerator()
        self.accelerator = accelerator
        device_map = None if _is_unset(device_map) else device_map
        if device_map is not None and not self.accepts_device_map:
            raise ValueError(f"{self.model_id} loads the model onto one device: device_map is not supported")
        if accelerator.num_processes > 1 and device_map is None:
            # Data parallel (accelerate launch): one full replica per process, on its own device;
            # lmms-eval hands each rank its own share of the documents.
            device = str(accelerator.device)
        self.load_settings = {"dtype": dtype, "device": "auto" if _is_unset(device) else device}
        if self.accepts_device_map:
            self.load_settings["device_map"] = device_map
        self.load_settings |= {
            "load_in_4bit": parse_bool("load_in_4bit", load_in_4bit),
            "load_in_8bit": parse_bool("load_in_8bit", load_in_8bit),
            "attn_implementation": None if _is_unset(attn_implementation) else attn_implementation,
        }
        self._load()
        self.handle = self._patch()
        self._rank = accelerator.process_index
        self._world_size = accelerator.num_processes
        self.record_path = None if _is_unset(record) else self._rank_record_path(Path(str(record)))
        self._sample_costs: list[SampleCost] = []
        self._model_seconds = 0.0
        self._generated_tokens = 0
        # What earlier request types already reported to lmms-eval's throughput log.
        self._reported_seconds = 0.0
        self._reported_tokens = 0
        logger.info("%s: %s", self.model_id, self.handle if self.handle is not None else "unpatched (method=none)")

    # ------------------------------------------------------------------ what a family implements
    @abstractmethod
    def _load(self) -> None:
        """Load ``self.pretrained`` with ``self.load_settings``; set ``_model``, ``processor``,
        ``_tokenizer``, ``_config`` and ``_device``."""

    @abstractmethod
    def _patch(self):
        """The patch handle, or None where the run is the unmodified model."""

    @abstractmethod
    def _generation_call(self, items: list[tuple[str, list[Image.Image]]]) -> ModelCall:
        """``model.generate`` keywords for ``(context, images)`` items, left-padded into one batch."""

    @abstractmethod
    def _scoring_call(self, context: str, images: list[Image.Image], continuation_ids: torch.Tensor) -> ModelCall:
        """Forward keywords of ``context`` with ``images`` followed by ``continuation_ids`` (``[C]``)."""

    def _wants_patch(self) -> bool:
        """False for ``method=none`` without a budget: that run is the unmodified model."""
        return not (self.patch_config.method == "none" and self.patch_config.target_tokens is None)

    def _rank_record_path(self, path: Path) -> Path:
        if self._world_size == 1:
            return path
        return path.with_name(f"{path.stem}.rank{self._rank}{path.suffix}")

    # ------------------------------------------------------------------ lmms interface
    # Read-only views of what `_load` and ``__init__`` set (lmms-eval reads these names).
    model = property(attrgetter("_model"))
    tokenizer = property(attrgetter("_tokenizer"))
    config = property(attrgetter("_config"))
    device = property(attrgetter("_device"))
    batch_size = property(attrgetter("batch_size_per_device"))
    rank = property(attrgetter("_rank"))
    world_size = property(attrgetter("_world_size"))

    @property
    def eot_token_id(self) -> int:
        return self._tokenizer.eos_token_id

    @property
    def _pad_token_id(self) -> int:
        tokenizer = self._tokenizer
        return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    # ------------------------------------------------------------------ inputs
    def _doc(self, task: str, split: str, doc_id: int):
        return self.task_dict[task][split][doc_id]

    def _visuals(self, doc_to_visual: Callable | None, doc) -> list[Image.Image]:
        if doc_to_visual is None:
            return []
        visuals = doc_to_visual(doc) or []
        if not isinstance(visuals, (list, tuple)):
            visuals = [visuals]
        images = []
        for visual in visuals:
            if not isinstance(visual, Image.Image):
                raise ValueError(
                    f"{self.model_id} takes images only (PIL images from doc_to_visual), got {type(visual).__name__}"
                )
            images.append(visual.convert("RGB"))
        return images

    # ------------------------------------------------------------------ generation
    def _generate(self, items: list[tuple[str, list[Image.Image]]], gen_kwargs: dict[str, Any]):
        """Generate for ``(context, images)`` items in one batch; returns ``(texts, costs)``."""
        settings = generation_settings(gen_kwargs, self.default_max_new_tokens)
        settings.stop_strings = [stop for stop in settings.stop_strings if stop not in self.ignored_stop_strings]
        call = self._generation_call(items)
        eos_token_id = self.eot_token_id
        with torch.inference_mode(), StageTimer(self.model) as timer:
            output_ids = self.model.generate(
                **call.inputs,
                **settings.generate_kwargs,
                use_cache=self.use_cache,
                pad_token_id=self._pad_token_id,
                eos_token_id=eos_token_id,
            )
        new_tokens = output_ids[:, call.prompt_length :]
        texts = self._tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        texts = [truncate_at_stop(text, settings.stop_strings) for text in texts]
        output_lengths = [self._generated_length(row, eos_token_id) for row in new_tokens]
        costs = [
            SampleCost(
                input_tokens=input_tokens,
                output_tokens=output_tokens,
                visual_tokens=visual_tokens,
                ttft_s=timer.prefill_s,
                generation_s=timer.total_s,
                batch_size=len(items),
            )
            for (input_tokens, visual_tokens), output_tokens in zip(
                call.token_counts(timer.visual_tokens), output_lengths, strict=True
            )
        ]
        self._model_seconds += timer.total_s
        self._generated_tokens += sum(output_lengths)
        return texts, costs

    @staticmethod
    def _generated_length(row: torch.Tensor, eos_token_id: int) -> int:
        """New tokens up to and including the first end-of-sequence (the rest is padding)."""
        stops = (row == eos_token_id).nonzero()
        return int(stops[0, 0]) + 1 if len(stops) else int(row.shape[0])

    def _batches(self, requests: list[Instance]) -> list[list[int]]:
        """Request indices in batches of the same task, split and generation settings, longest first."""
        groups: dict[tuple, list[int]] = {}
        for index, request in enumerate(requests):
            context, gen_kwargs, _, _, task, split = request.args
            key = (task, split, json.dumps(gen_kwargs, sort_keys=True, default=str))
            groups.setdefault(key, []).append(index)
        batches = []
        for indices in groups.values():
            # Similar lengths together waste less padding.
            indices.sort(key=lambda index: -len(requests[index].args[0]))
            for start in range(0, len(indices), self.batch_size):
                batches.append(indices[start : start + self.batch_size])
        return batches

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        results: list[GenerationResult | None] = [None] * len(requests)
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc=f"{self.model_id} generate")
        for batch in self._batches(requests):
            batch_requests = [requests[index] for index in batch]
            items = []
            for request in batch_requests:
                context, _, doc_to_visual, doc_id, task, split = request.args
                items.append((context, self._visuals(doc_to_visual, self._doc(task, split, doc_id))))
            gen_kwargs = dict(batch_requests[0].args[1])
            texts, costs = self._generate(items, gen_kwargs)
            for index, request, text, cost in zip(batch, batch_requests, texts, costs, strict=True):
                results[index] = GenerationResult(text=text, token_counts=cost)
                self._track(request, cost)
                self.cache_hook.add_partial("generate_until", (request.args[0], gen_kwargs), text)
            progress.update(len(batch))
        progress.close()
        self._finish_call()
        return results

    def generate_until_multi_round(self, requests: list[Instance]) -> list[list[str]]:
        """Multi-round tasks: generate, hand the answers to the task's ``doc_to_text``, repeat.

        Follows lmms-eval's round protocol: round 0 uses the request's context and images; after
        it ``doc_to_text(doc, previous_output=answers, round_idx=k, previous_round_info=info)``
        returns ``(images, context, terminal, answers, info)``; a true ``terminal`` ends the doc.
        Returns every round's answer per doc.
        """
        results = []
        for request in tqdm(requests, disable=self.rank != 0, desc=f"{self.model_id} multi-round"):
            context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = request.args
            doc = self._doc(task, split, doc_id)
            images = self._visuals(doc_to_visual, doc)
            answers: list[str] = []
            round_info = None
            for round_idx in range(1, MAX_ROUNDS + 1):
                texts, costs = self._generate([(context, images)], dict(gen_kwargs))
                answers.append(texts[0])
                self._track(request, costs[0])
                next_images, context, terminal, answers, round_info = doc_to_text(
                    doc, previous_output=answers, round_idx=round_idx, previous_round_info=round_info
                )
                answers = list(answers)
                if terminal:
                    break
                if context is None:
                    raise ValueError(f"task {task!r} returned no context for round {round_idx} of doc {doc_id}")
                images = [image.convert("RGB") for image in (next_images or [])]
            else:
                logger.warning("doc %s of %s did not finish in %d rounds; stopping it", doc_id, task, MAX_ROUNDS)
            results.append(answers)
        self._finish_call()
        return results

    # ------------------------------------------------------------------ log-likelihood
    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """Score each continuation given its context and images.

        Returns ``(value, is_greedy)`` per request, where ``is_greedy`` says that greedy decoding
        would produce exactly the continuation's tokens. ``value`` is the summed negative
        log-likelihood of the continuation tokens by default (``loglikelihood=loss``): lmms-eval
        0.7.3 picks the multiple-choice answer with ``argmin`` (its built-in models return a loss),
        so a log-probability would select the *least* likely choice there. ``loglikelihood=logprob``
        returns the summed log-probability instead (for code that expects lm-eval's convention).

        Each pair is wrapped in a `GenerationResult`: lmms-eval 0.7.3 turns any other tuple into
        its string form before scoring, and the wrapper also carries the per-sample cost.
        """
        results = []
        for request in tqdm(requests, disable=self.rank != 0, desc=f"{self.model_id} loglikelihood"):
            context, target, doc_to_visual, doc_id, task, split = request.args
            doc = self._doc(task, split, doc_id)
            continuation = target if isinstance(target, str) else target(doc)
            images = self._visuals(doc_to_visual, doc)
            log_prob, is_greedy, cost = self._score(context, str(continuation), images)
            value = log_prob if self.loglikelihood_value == "logprob" else -log_prob
            results.append(GenerationResult(text=(value, is_greedy), token_counts=cost))
            self._track(request, cost)
        self._finish_call()
        return results

    def _score(self, context: str, continuation: str, images: list[Image.Image]) -> tuple[float, bool, SampleCost]:
        # The continuation is tokenised on its own and appended, so its tokens are exactly the
        # scored ones (tokenising prompt + continuation together can merge across the boundary).
        continuation_ids = self._tokenizer(continuation, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        if continuation_ids.shape[0] == 0:
            raise ValueError(f"continuation {continuation!r} has no tokens to score")
        call = self._scoring_call(context, images, continuation_ids)
        with torch.inference_mode(), StageTimer(self.model) as timer:
            logits = self.model(**call.inputs, use_cache=False).logits
        log_prob, is_greedy = continuation_log_prob(logits[0], continuation_ids)
        self._model_seconds += timer.total_s
        [(input_tokens, visual_tokens)] = call.token_counts(timer.visual_tokens)
        cost = SampleCost(
            input_tokens=input_tokens,
            output_tokens=0,
            visual_tokens=visual_tokens,
            ttft_s=timer.prefill_s,
            generation_s=timer.total_s,
            batch_size=1,
        )
        return log_prob, is_greedy, cost

    def clean(self) -> None:
        """lmms-eval frees the model before scoring (room for a judge model); the patch handle
        holds a reference to it too."""
        self.handle = None
        super().clean()

    # ------------------------------------------------------------------ run record
    def _track(self, request: Instance, cost: SampleCost) -> None:
        # Ranks are padded with copies of a request so that all run equally many; not samples.
        if not (request.metadata or {}).get("__padding_only__"):
            self._sample_costs.append(cost)

    def run_summary(self) -> dict[str, Any]:
        """Mean per-sample cost, peak memory and the patch, for the results and the record file."""
        costs = self._sample_costs
        memory_mib, memory_kind = peak_memory_mib(self.model)
        if self.handle is not None:
            patch_summary = self.handle.summary()
        else:
            patch_summary = {"config": self.patch_config.to_dict(), "patched": False}
        return {
            "model": self.pretrained,
            "patch": patch_summary,
            "keep_ratio": self.handle.keep_ratio if self.handle is not None else 1.0,
            "load": {**self.load_settings, "model_dtype": str(self.model.dtype), "device": str(self.device)},
            "prompt_format": self.prompt_format,
            "batch_size": self.batch_size,
            "rank": self.rank,
            "world_size": self.world_size,
            "samples": len(costs),
            "mean_visual_tokens": _mean([c.visual_tokens for c in costs if c.visual_tokens is not None]),
            "mean_input_tokens": _mean([c.input_tokens for c in costs if c.input_tokens is not None]),
            "mean_output_tokens": _mean([c.output_tokens for c in costs if c.output_tokens is not None]),
            "mean_ttft_s": _mean([c.ttft_s for c in costs if c.ttft_s is not None]),
            "mean_generation_s": _mean([c.generation_s for c in costs if c.generation_s is not None]),
            "model_seconds": self._model_seconds,
            "peak_memory_mib": memory_mib,
            "memory_kind": memory_kind,
        }

    def _finish_call(self) -> None:
        """After each request type: report through lmms-eval's throughput log and the record file."""
        summary = self.run_summary()
        additional = {
            name: summary[key]
            for name, key in (
                ("visual_tokens", "mean_visual_tokens"),
                ("ttft_s", "mean_ttft_s"),
                ("generation_s", "mean_generation_s"),
                ("peak_memory_mib", "peak_memory_mib"),
                ("keep_ratio", "keep_ratio"),
            )
            if summary[key] is not None
        }
        # lmms-eval sums the totals of all log_metrics calls, so report only this call's share.
        seconds = self._model_seconds - self._reported_seconds
        tokens = self._generated_tokens - self._reported_tokens
        self._reported_seconds, self._reported_tokens = self._model_seconds, self._generated_tokens
        log_metrics(
            total_elapsed_time=seconds,
            total_gen_tokens=tokens,
            avg_speed=tokens / seconds if seconds > 0 else 0.0,
            additional_metrics=additional,
        )
        if self.world_size > 1:
            # Data parallel: each rank says what its own share of the documents cost in visual tokens.
            counts = sorted({c.visual_tokens for c in self._sample_costs if c.visual_tokens is not None})
            eval_logger.info(
                f"{self.model_id} rank {self.rank} of {self.world_size}: {summary['samples']} samples, "
                f"visual tokens per image {counts}"
            )
        if self.record_path is not None:
            write_json_atomically(self.record_path, summary)


__all__ = [
    "LOGLIKELIHOOD_VALUES",
    "ModelCall",
    "PiToMeLmmsModel",
    "SampleCost",
    "continuation_log_prob",
    "generation_settings",
    "parse_bool",
    "parse_float",
    "parse_int",
    "parse_patch_args",
    "peak_memory_mib",
    "truncate_at_stop",
]
