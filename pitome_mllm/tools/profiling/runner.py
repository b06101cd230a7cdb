"""The profiler itself: which runs to make, their settings, the passes over the model, and their results."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ...hooks.base import InstanceOverrides, remove_hooks
from ...hooks.observers import Observer, eager_only
from ...models import ModelParts, model_geometry, model_parts
from ...models.qwen_tools import (
    decode_position_ids,
    encoded_tokens_per_image,
    image_encoding_kwargs,
    reference_grid,
    reference_image_size,
    spatial_merge_size,
    vision_tower_sizes,
)
from . import flops
from .clock import (
    PassClock,
    Stopwatch,
    summarize,
)
from .machine import machine_info
from .memory import (
    MemoryProbe,
    kv_cache_bytes,
    memory_probe_for,
)

logger = logging.getLogger("pitome_mllm")


TIMED_STAGES = (
    "vision_tower",
    "merge_tower",
    "merge_tower_decide",
    "merge_tower_apply",
    "merge_tower_trace",
    "projector",
    "merge_projector",
    "llm_prefill",
    "ttft",
    "decode_per_token",
    "decode_total",
    "total",
)
MEMORY_STAGES = ("vision_tower", "projector", "llm_prefill", "decode")
# Stages compared with the unpatched run (measured speed-up vs FLOPs speed-up).
SPEEDUP_STAGES = ("vision_tower", "llm_prefill", "ttft", "decode_per_token")
DEFAULT_PROMPT = "Describe the image in detail."


class MergeTimer(Observer):
    """Times every merge stage the patch announces into ``clock`` (when one is set).

    The stages (``decide``, ``apply``, ``trace`` of the tower steps, ``projector``) are the
    kinds of `PassClock.merge_intervals`. Attach with ``handle.add_observer(timer)``.

    Eager only while a clock is set: its stamps read the host between merge stages, which a compiled
    graph fuses, so a compiled forward refuses (`pitome_mllm.hooks.observers.eager_only`); with no
    clock it does nothing and compiles away.
    """

    def __init__(self) -> None:
        self.clock: PassClock | None = None
        self._starts: list[Any] = []

    def stage_started(self, stage: str, layer_idx: int | None) -> None:
        if self.clock is not None:
            eager_only(
                "MergeTimer times the merge stages on the host, which runs eagerly only: time the model without "
                "torch.compile, or set the timer's clock to None for compiled passes"
            )
            self._starts.append(self.clock.stopwatch.stamp())

    def stage_finished(self, stage: str, layer_idx: int | None) -> None:
        if self.clock is not None and self._starts:
            start = self._starts.pop()
            self.clock.merge_intervals[stage].append((start, self.clock.stopwatch.stamp()))


# ========================================================================= run specs
@dataclass(frozen=True)
class RunSpec:
    """One configuration to profile.

    Attributes:
        label: short name for tables and plots.
        method: ``"unpatched"``, ``"none"``, ``"tome"`` or ``"pitome"``.
        overrides: `pitome_mllm.patch` keyword arguments; None profiles the model as is.
    """

    label: str
    method: str
    overrides: dict[str, Any] | None = None

    @property
    def patched(self) -> bool:
        return self.overrides is not None

    @classmethod
    def unpatched(cls) -> RunSpec:
        return cls("unpatched", "unpatched", None)


def plan_runs(
    methods: Sequence[str] = ("none", "tome", "pitome"),
    budgets: Sequence[int] = (),
    keep_ratios: Sequence[float] = (),
    native_tokens: int = 576,
    preset: str = "reference",
) -> list[RunSpec]:
    """The unpatched baseline, then every method at every budget and keep ratio.

    A budget at or above ``native_tokens`` and a keep ratio of 1.0 are the unpatched
    model (merging nothing costs nothing but the hooks), so they map to the baseline.
    ``method="none"`` merges only at the projector, so it takes budgets, not keep ratios.
    """
    runs = [RunSpec.unpatched()]
    for method in methods:
        for budget in budgets:
            if budget < native_tokens:
                overrides = {"method": method, "target_tokens": int(budget), "preset": preset}
                runs.append(RunSpec(f"{method} k={budget}", method, overrides))
        for keep_ratio in keep_ratios:
            if keep_ratio < 1.0 and method != "none":
                overrides = {"method": method, "keep_ratio": float(keep_ratio), "preset": preset}
                runs.append(RunSpec(f"{method} r={keep_ratio:g}", method, overrides))
    unique: dict[tuple, RunSpec] = {}
    for run in runs:
        key = (run.method, tuple(sorted((run.overrides or {}).items())))
        unique.setdefault(key, run)
    return list(unique.values())


# =========================================================================== settings
@dataclass
class ProfileSettings:
    """How to profile.

    Attributes:
        batch_size: images (and prompts) per pass.
        new_tokens: tokens generated per pass (greedy, EOS ignored so every pass does the
            same work); ``new_tokens - 1`` cached decode steps follow the prefill.
        repeats: measured passes per run.
        warmup: discarded passes per run before the measured ones; the last one also
            measures memory (at least one memory pass always runs).
        vision_only: run only the vision tower and projector (the model's image encoding).
        prompt: the question about the image.
        image: a bundled image name (``astronaut``, ``chelsea``, ``coffee``).
        interleave: measure round-robin (repeat 1 of every run, then repeat 2, ...) so
            that a change in machine load during the profile spreads over all runs
            instead of favouring some; False measures each run's passes back to back.
        progress: show a progress bar.
    """

    batch_size: int = 1
    new_tokens: int = 8
    repeats: int = 5
    warmup: int = 1
    vision_only: bool = False
    prompt: str = DEFAULT_PROMPT
    image: str = "astronaut"
    interleave: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        for name, low in (("batch_size", 1), ("new_tokens", 1), ("repeats", 1), ("warmup", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


# ============================================================================ results
@dataclass
class RunResult:
    """Everything measured for one `RunSpec` (seconds, bytes, MACs)."""

    label: str
    method: str
    config: dict[str, Any] | None
    keep_ratio: float | None
    visual_tokens: int
    visual_tokens_expected: int
    sequence_length: int | None
    tower_tokens_in: list[int]
    observed_layer_tokens: list[int]
    merge_token_counts: list[int]
    merge_token_counts_expected: list[int]
    samples: dict[str, list[float]]
    timings: dict[str, dict[str, float] | None]
    memory: dict[str, dict[str, Any]]
    kv_cache: dict[str, Any] | None
    flops: dict[str, float]
    speedup: dict[str, dict[str, float]] = field(default_factory=dict)

    def median_ms(self, stage: str) -> float | None:
        stats = self.timings.get(stage)
        return None if stats is None else stats["median"] * 1e3


@dataclass
class ProfileReport:
    """A profile: the machine, the settings, the model's shapes and one result per run."""

    machine: dict[str, Any]
    settings: dict[str, Any]
    model: dict[str, Any]
    runs: list[RunResult]

    def to_dict(self) -> dict[str, Any]:
        return {
            "machine": self.machine,
            "settings": self.settings,
            "model": self.model,
            "runs": [dataclasses.asdict(run) for run in self.runs],
        }

    def baseline(self) -> RunResult | None:
        return next((run for run in self.runs if run.method == "unpatched"), None)


# ========================================================================= the model


def _cache_keyword(model: nn.Module) -> str:
    """transformers 5.24 calls the cache argument ``cache``; earlier versions ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _output_cache(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def _build_prompt(processor, question: str) -> str:
    try:
        from ...runtime.loading import build_prompt
    except ImportError:  # the loading helpers are optional here
        build_prompt = None
    if build_prompt is not None:
        return build_prompt(processor, question)
    return f"USER: {getattr(processor, 'image_token', '<image>')}\n{question} ASSISTANT:"


def _model_inputs(model: nn.Module, processor, settings: ProfileSettings, device: torch.device) -> dict:
    from ...assets import load_image

    image = load_image(settings.image)
    side = reference_image_size(model)
    if side is not None:
        # A tower whose grid follows the image (Qwen-VL): the reference square, whose count is the handle's.
        image = image.convert("RGB").resize((side, side))
    prompt = _build_prompt(processor, settings.prompt)
    batch = settings.batch_size
    inputs = processor(images=[image] * batch, text=[prompt] * batch, return_tensors="pt", padding=True)
    moved = {name: tensor.to(device) for name, tensor in inputs.items()}
    moved["pixel_values"] = moved["pixel_values"].to(model_parts(model).vision_dtype)
    return moved


def model_shapes(model: nn.Module, processor=None) -> dict[str, Any]:
    """The vision and language-model shapes the FLOPs formulas use.

    ``tokens``: tokens entering the tower for the profiled image (where the grid follows the image, the
    reference square under ``processor``'s pixel limits).
    """
    parts = model_parts(model)
    if parts.decoder is None:
        raise ValueError(f"the {type(model).__name__} adapter does not report its language model's sizes")
    vision = parts.tower.config
    geometry = model_geometry(model)
    grid = reference_grid(model, processor)
    sizes = vision_tower_sizes(model) or {
        "hidden": vision.hidden_size,
        "intermediate": vision.intermediate_size,
        "layers": vision.num_hidden_layers,
        "heads": vision.num_attention_heads,
        "patch_size": vision.patch_size,
    }
    shapes = {
        "vision": {
            **sizes,
            "image_size": geometry.image_size,
            "tokens": geometry.default_num_tokens if grid is None else grid.patches,
            # Patches per side that one language-model token takes (Qwen-VL's 2 x 2 patch merger; else 1).
            "merge_size": spatial_merge_size(model),
            "class_token": geometry.class_token,
        },
        "llm": dataclasses.asdict(flops.LLMShape.from_decoder(parts.decoder)),
        "vision_feature_layer": parts.feature_layer,
        "vision_feature_select_strategy": "default" if parts.drops_class_token else "full",
    }
    counts: dict[str, int] = {}
    for name, part in (("vision_tower", parts.tower), ("projector", parts.projector)):
        counts[name] = sum(p.numel() for p in part.parameters())
    counts["language_model"] = sum(p.numel() for p in parts.language_model.parameters())
    if parts.output_head is not None:
        counts["language_model"] += sum(p.numel() for p in parts.output_head.parameters())
    shapes["parameters"] = counts
    return shapes


# ======================================================================== stage hooks
class StageHooks:
    """Forward hooks that stamp the vision tower's and the projector's boundaries.

    Install after patching, so the projector's end stamp follows the projector-stage
    merge hook (forward hooks run in registration order).
    """

    def __init__(self, parts: ModelParts, model: nn.Module | None = None) -> None:
        self.parts = parts
        self.model = model
        self.clock: PassClock | None = None
        self.memory: MemoryProbe | None = None
        self.visual_tokens: int | None = None
        self.layer_tokens: list[int] = []
        self.record_layer_tokens = False  # append each layer's input length to layer_tokens
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._encoding = InstanceOverrides(parts.image_feature_owner) if parts.image_feature_owner else None
        self._flat_projector_output = False

    def install(self) -> None:
        tower, projector = self.parts.tower, self.parts.projector
        # A projector inside the tower (Qwen-VL's patch merger): the tower stage ends where the projector starts,
        # so the two intervals stay disjoint.
        nested = any(module is projector for module in tower.modules())
        self._handles += [
            tower.register_forward_pre_hook(self._stage_start("vision_tower"), prepend=True),
            projector.register_forward_pre_hook(self._stage_start("projector"), prepend=True),
            projector.register_forward_hook(self._projector_end),
        ]
        if nested:  # prepended after the projector's start, so it runs before it
            self._handles.append(projector.register_forward_pre_hook(self._tower_end_at_projector, prepend=True))
        else:
            self._handles.append(tower.register_forward_hook(self._stage_end("vision_tower")))
        for layer in self.parts.encoder_layers:
            self._handles.append(layer.register_forward_pre_hook(self._count_layer_tokens, prepend=True))
        if self._encoding is not None and self.model is not None:
            method = self.parts.image_feature_method
            self._encoding.set(method, self._stamped_encoding(getattr(self._encoding.target, method)))

    def remove(self) -> None:
        remove_hooks(self._handles)
        if self._encoding is not None:
            self._encoding.restore()

    def _stamped_encoding(self, original: Callable) -> Callable:
        """The model's image encoding; where the projector's output concatenates the images (Qwen-VL), the
        projector stage (per-image reduction included) ends when the encoding returns."""

        @functools.wraps(original)
        def encode(*args, **kwargs):
            output = original(*args, **kwargs)
            per_image = encoded_tokens_per_image(self.model, output)
            if per_image and self._flat_projector_output:
                if self.clock is not None:
                    self.clock.mark("projector_end")
                self.visual_tokens = per_image[0]
            return output

        return encode

    def _stage_start(self, stage: str) -> Callable:
        def hook(module, args) -> None:
            if self.memory is not None:
                self.memory.begin(stage)
            if self.clock is not None:
                self.clock.mark(f"{stage}_start")

        return hook

    def _stage_end(self, stage: str) -> Callable:
        def hook(module, args, output) -> None:
            if self.clock is not None:
                self.clock.mark(f"{stage}_end")
            if self.memory is not None:
                self.memory.end(stage)

        return hook

    def _tower_end_at_projector(self, module, args) -> None:
        self._stage_end("vision_tower")(module, args, None)

    def _projector_end(self, module, args, output) -> None:
        self._stage_end("projector")(module, args, output)
        # [B, K, D]; a flat [sum K_i, D] (images concatenated) is reduced and counted after the projector.
        self._flat_projector_output = output.dim() == 2
        if not self._flat_projector_output:
            self.visual_tokens = int(output.shape[1])
        if self.memory is not None:
            self.memory.begin("llm_prefill")

    def _count_layer_tokens(self, module, args) -> None:
        if self.record_layer_tokens and args:
            self.layer_tokens.append(int(args[0].shape[1]))


# ============================================================================= passes
@dataclass
class _PassOutput:
    seconds: dict[str, float]
    decode_steps: list[float]
    kv_cache_bytes: int | None = None
    kv_sequence_length: int | None = None


def _vision_pass(parts: ModelParts, inputs: dict, clock: PassClock, extra: dict | None = None) -> _PassOutput:
    clock.mark("start")
    parts.encode_images(inputs["pixel_values"], **(extra or {}))
    clock.mark("end")
    clock.stopwatch.synchronize()
    seconds = {
        "vision_tower": clock.interval("vision_tower_start", "vision_tower_end"),
        "projector": clock.interval("projector_start", "projector_end"),
        "total": clock.interval("start", "end"),
    }
    return _PassOutput(seconds, [])


def _generation_pass(
    model: nn.Module,
    inputs: dict,
    clock: PassClock,
    new_tokens: int,
    cache_keyword: str,
    memory: MemoryProbe | None,
) -> _PassOutput:
    """Prefill, then ``new_tokens - 1`` greedy cached decode steps, stamping each boundary."""
    clock.mark("start")
    output = model(**inputs, use_cache=True, logits_to_keep=1)
    next_ids = output.logits[:, -1:].argmax(dim=-1)  # [B, 1]
    clock.mark("prefill_end")
    if memory is not None:
        memory.end("llm_prefill")
    cache = _output_cache(output)
    kv_bytes = kv_cache_bytes(cache) if memory is not None else None
    kv_length = cache.get_seq_length() if memory is not None and hasattr(cache, "get_seq_length") else None
    attention_mask = inputs["attention_mask"]
    if memory is not None and new_tokens > 1:
        memory.begin("decode")
    for _ in range(new_tokens - 1):
        attention_mask = torch.cat([attention_mask, torch.ones_like(next_ids)], dim=1)
        positions = decode_position_ids(model, attention_mask)
        output = model(
            input_ids=next_ids,
            attention_mask=attention_mask,
            use_cache=True,
            logits_to_keep=1,
            **{cache_keyword: cache},
            **({} if positions is None else {"position_ids": positions}),
        )
        next_ids = output.logits[:, -1:].argmax(dim=-1)
        clock.decode_marks.append(clock.stopwatch.stamp())
    if memory is not None and new_tokens > 1:
        memory.end("decode")
    clock.mark("end")
    clock.stopwatch.synchronize()
    return _PassOutput(_generation_seconds(clock), _decode_steps(clock), kv_bytes, kv_length)


def _decode_steps(clock: PassClock) -> list[float]:
    stamps = [clock.marks["prefill_end"], *clock.decode_marks]
    return [clock.stopwatch.seconds(a, b) for a, b in zip(stamps, stamps[1:], strict=False)]


def _generation_seconds(clock: PassClock) -> dict[str, float]:
    return {
        "vision_tower": clock.interval("vision_tower_start", "vision_tower_end"),
        "projector": clock.interval("projector_start", "projector_end"),
        "llm_prefill": clock.interval("projector_end", "prefill_end"),
        "ttft": clock.interval("start", "prefill_end"),
        "decode_total": clock.interval("prefill_end", "end"),
        "total": clock.interval("start", "end"),
    }


# ============================================================================ profile
@dataclass
class _RunState:
    """One run between its warm-up and its result.

    Attributes:
        spec: what is profiled.
        inputs: the processor's output for this run (placeholders follow the patch).
        samples: seconds per stage of every measured pass.
        probe, memory_output: the memory pass's probe and its output (KV-cache bytes).
        facts: what the patch handle knew (schedule, config, expected token counts) and
            what the hooks saw during the memory pass (visual tokens, layer lengths).
    """

    spec: RunSpec
    inputs: dict
    samples: dict[str, list[float]]
    probe: MemoryProbe | None = None
    memory_output: _PassOutput | None = None
    facts: dict[str, Any] = field(default_factory=dict)


class _Profiler:
    """Holds the model, inputs and clocks while the runs of one `profile` call execute."""

    def __init__(self, model: nn.Module, processor, settings: ProfileSettings, progress: Callable[[], None]) -> None:
        self.model = model
        self.processor = processor
        self.settings = settings
        self.parts = model_parts(model)
        self.device = self.parts.vision_device
        self.stopwatch = Stopwatch(self.device)
        self.cache_keyword = _cache_keyword(model)
        self.merge_timer = MergeTimer()
        self.progress = progress
        self.shapes = model_shapes(model, processor)
        self.llm_shape = flops.LLMShape(**self.shapes["llm"])

    def run_all(self, specs: Sequence[RunSpec]) -> list[RunResult]:
        """Warm up and measure every run; interleaved, the measured passes go round-robin."""
        repeats = self.settings.repeats
        states = []
        if self.settings.interleave:
            states = [self.prepare(spec) for spec in specs]
            for round_index in range(repeats):
                # Rotate the order so no run always follows the same neighbour.
                shift = round_index % len(states)
                for state in states[shift:] + states[:shift]:
                    self.measure(state, passes=1)
        else:
            for spec in specs:
                states.append(self.prepare(spec))
                self.measure(states[-1], passes=repeats)
        return [self._result(state) for state in states]

    # ------------------------------------------------------------------ phases
    @contextlib.contextmanager
    def _applied(self, spec: RunSpec) -> Iterator[tuple[Any, StageHooks]]:
        """The model patched for ``spec`` (or not), with the stage hooks installed after the patch."""
        import pitome_mllm

        handle = pitome_mllm.patch(self.model, self.processor, **spec.overrides) if spec.patched else None
        hooks = StageHooks(self.parts, self.model)
        try:
            if handle is not None:
                handle.add_observer(self.merge_timer)
            hooks.install()
            yield handle, hooks
        finally:
            hooks.remove()
            if handle is not None:
                handle.unpatch()

    def prepare(self, spec: RunSpec) -> _RunState:
        """Build the inputs and run the warm-up passes; the last one measures memory."""
        with self._applied(spec) as (handle, hooks):
            inputs = _model_inputs(self.model, self.processor, self.settings, self.device)
            state = _RunState(spec, inputs, {stage: [] for stage in TIMED_STAGES})
            num_warmup = max(self.settings.warmup, 1)
            for index in range(num_warmup):
                measuring_memory = index == num_warmup - 1
                hooks.record_layer_tokens = measuring_memory
                probe = memory_probe_for(self.device) if measuring_memory else None
                output = self._one_pass(inputs, hooks, probe)
                self.progress()
            state.probe, state.memory_output = probe, output
            state.facts = self._facts(handle, hooks)
        return state

    def measure(self, state: _RunState, passes: int) -> None:
        """``passes`` timed passes of one run, appended to its samples."""
        with self._applied(state.spec) as (_, hooks):
            for _ in range(passes):
                output = self._one_pass(state.inputs, hooks, None)
                for stage, value in output.seconds.items():
                    if value is not None:
                        state.samples[stage].append(value)
                # Decode steps of all measured passes are pooled: one sample per token.
                state.samples["decode_per_token"] += output.decode_steps
                self.progress()

    def _one_pass(self, inputs: dict, hooks: StageHooks, probe: MemoryProbe | None) -> _PassOutput:
        clock = PassClock(self.stopwatch)
        hooks.clock, hooks.memory = clock, probe
        self.merge_timer.clock = clock
        try:
            with torch.inference_mode():
                if self.settings.vision_only:
                    result = _vision_pass(self.parts, inputs, clock, image_encoding_kwargs(self.model, inputs))
                else:
                    result = _generation_pass(
                        self.model, inputs, clock, self.settings.new_tokens, self.cache_keyword, probe
                    )
        finally:
            hooks.clock, hooks.memory = None, None
            self.merge_timer.clock = None
        result.seconds["merge_tower"] = clock.merge_seconds("decide", "apply", "trace")
        for part in ("decide", "apply", "trace"):
            result.seconds[f"merge_tower_{part}"] = clock.merge_seconds(part)
        result.seconds["merge_projector"] = clock.merge_seconds("projector")
        return result

    # ------------------------------------------------------------ bookkeeping
    def _facts(self, handle, hooks: StageHooks) -> dict[str, Any]:
        """Token counts and config of a run, from the handle (expected) and the hooks (observed)."""
        vision = self.shapes["vision"]
        observed = {
            "visual_tokens": hooks.visual_tokens if hooks.visual_tokens is not None else -1,
            "observed_layer_tokens": list(hooks.layer_tokens),
        }
        if handle is None:
            return observed | {
                "config": None,
                "keep_ratio": 1.0,
                "steps": [],
                "tower_tokens_in": [vision["tokens"]] * vision["layers"],
                "merge_token_counts": [],
                "visual_tokens_expected": self._unpatched_visual_tokens(),
            }
        steps = handle.schedule
        # A patch that leaves the tower unmerged (Qwen-VL) plans no layer step: every layer sees every token.
        tower_tokens_in = [step.tokens_in for step in steps] if steps else [vision["tokens"]] * vision["layers"]
        return observed | {
            "config": handle.config.to_dict(),
            "keep_ratio": handle.keep_ratio,
            "steps": steps,
            # Layers after the one LLaVA reads pass their input through: no cost.
            "tower_tokens_in": tower_tokens_in,
            "merge_token_counts": list(handle.trace.token_counts) if handle.trace is not None else [],
            "visual_tokens_expected": handle.num_visual_tokens,
        }

    def _result(self, state: _RunState) -> RunResult:
        facts, spec = state.facts, state.spec
        steps = facts["steps"]
        if spec.patched and facts["visual_tokens"] != facts["visual_tokens_expected"]:
            logger.warning(
                "%s: the LLM received %d visual tokens, the handle expected %d",
                spec.label,
                facts["visual_tokens"],
                facts["visual_tokens_expected"],
            )
        seq_len = None if self.settings.vision_only else int(state.inputs["input_ids"].shape[1])
        target = (facts["config"] or {}).get("target_tokens")
        flops = self._flops(steps, facts["tower_tokens_in"], target, seq_len)
        kv = None if self.settings.vision_only else self._kv_cache(state.memory_output, seq_len)
        probe = state.probe
        return RunResult(
            label=spec.label,
            method=spec.method,
            config=facts["config"],
            keep_ratio=facts["keep_ratio"],
            visual_tokens=facts["visual_tokens"],
            visual_tokens_expected=facts["visual_tokens_expected"],
            sequence_length=seq_len,
            tower_tokens_in=facts["tower_tokens_in"],
            observed_layer_tokens=facts["observed_layer_tokens"],
            merge_token_counts=facts["merge_token_counts"],
            merge_token_counts_expected=[step.tokens_out for step in steps if step.method != "none"],
            samples=state.samples,
            timings={stage: summarize(values) for stage, values in state.samples.items()},
            memory={stage: probe.stages[stage] for stage in MEMORY_STAGES if stage in probe.stages}
            | {"probe": probe.kind},
            kv_cache=kv,
            flops=flops,
        )

    def _unpatched_visual_tokens(self) -> int:
        vision = self.shapes["vision"]
        drop = 1 if self.shapes["vision_feature_select_strategy"] == "default" else 0
        return (vision["tokens"] - drop) // vision["merge_size"] ** 2

    def _flops(self, steps, tower_tokens_in: list[int], target: int | None, seq_len: int | None) -> dict[str, float]:
        vision, llm = self.shapes["vision"], self.llm_shape
        batch = self.settings.batch_size
        merge_size = vision["merge_size"]
        num_patches = vision["tokens"] - 1 if merge_size == 1 else vision["tokens"]
        hidden = vision["hidden"]
        tower_layers = sum(flops.vision_layer_macs(n, hidden, vision["intermediate"]) for n in tower_tokens_in)
        embed = flops.patch_embedding_macs(num_patches, vision["hidden"], vision["patch_size"])
        tower_merges = flops.merge_macs(steps, vision["hidden"])
        drop = 1 if self.shapes["vision_feature_select_strategy"] == "default" else 0
        tower_out = (steps[-1].tokens_out if steps else vision["tokens"]) - drop
        if merge_size == 1:
            projector = flops.projector_macs(tower_out, vision["hidden"], llm.hidden)
        else:  # a patch merger: each merge_size-square block of patches becomes one token
            tower_out //= merge_size**2
            projector = flops.patch_merger_macs(tower_out, vision["hidden"] * merge_size**2, llm.hidden)
        projector_merges = flops.projector_merge_macs(tower_out, target, llm.hidden)
        macs = {
            "vision_tower": batch * (tower_layers + embed + tower_merges),
            "merge_tower": batch * tower_merges,
            "projector": batch * (projector + projector_merges),
            "merge_projector": batch * projector_merges,
        }
        if seq_len is not None:
            macs["llm_prefill"] = batch * flops.llm_prefill_macs(llm, seq_len)
            macs["ttft"] = macs["vision_tower"] + macs["projector"] + macs["llm_prefill"]
            decode_steps = self.settings.new_tokens - 1
            if decode_steps:
                # Step i attends to seq_len + i + 1 positions; report the mean step.
                mean_context = seq_len + (decode_steps + 1) / 2
                macs["decode_per_token"] = batch * flops.llm_decode_macs(llm, round(mean_context))
        return {f"{stage}_flops": 2.0 * value for stage, value in macs.items()}

    def _kv_cache(self, memory_output: _PassOutput, seq_len: int) -> dict[str, Any]:
        dtype = model_parts(self.model).output_head.weight.dtype
        bytes_per_value = torch.empty((), dtype=dtype).element_size()
        formula = flops.kv_cache_bytes_formula(self.llm_shape, seq_len, self.settings.batch_size, bytes_per_value)
        return {
            "bytes": memory_output.kv_cache_bytes,
            "formula_bytes": formula,
            "sequence_length": memory_output.kv_sequence_length,
            "bytes_per_value": bytes_per_value,
        }


def _add_speedups(runs: list[RunResult]) -> None:
    """Measured speed-up / FLOPs speed-up of every run against the unpatched one."""
    baseline = next((run for run in runs if run.method == "unpatched"), None)
    if baseline is None:
        return
    for run in runs:
        for stage in SPEEDUP_STAGES:
            base_time, time_ = baseline.timings.get(stage), run.timings.get(stage)
            base_flops, run_flops = baseline.flops.get(f"{stage}_flops"), run.flops.get(f"{stage}_flops")
            if not (base_time and time_ and base_flops and run_flops):
                continue
            measured = base_time["median"] / time_["median"]
            by_flops = base_flops / run_flops
            run.speedup[stage] = {"measured": measured, "flops": by_flops, "measured_over_flops": measured / by_flops}


def profile(
    model: nn.Module,
    processor,
    runs: Sequence[RunSpec] | None = None,
    settings: ProfileSettings | None = None,
    source: str = "",
) -> ProfileReport:
    """Profile ``model`` (a transformers LLaVA, unpatched) under every run in ``runs``.

    Args:
        model, processor: the model and its processor; each patched run patches and
            unpatches them.
        runs: what to profile (default: the unpatched model only); see `plan_runs`.
        settings: batch size, repeats, warm-up, new tokens, vision-only.
        source: a description of the model for the report (``--arch`` name or path).

    Returns:
        A `ProfileReport`; `write_report` saves it as JSON, CSV and plots.

    The model should sit on one device: CUDA stamps are events on that device's current
    stream, and one synchronisation per pass makes them readable.
    """
    from tqdm.auto import tqdm

    import pitome_mllm

    settings = settings or ProfileSettings()
    runs = list(runs or [RunSpec.unpatched()])
    if pitome_mllm.get_patch(model) is not None:
        raise ValueError("profile() needs an unpatched model; call handle.unpatch() first")
    passes_per_run = max(settings.warmup, 1) + settings.repeats
    with tqdm(total=len(runs) * passes_per_run, desc="profiling", unit="pass", disable=not settings.progress) as bar:
        profiler = _Profiler(model, processor, settings, progress=lambda: bar.update(1))
        device = profiler.device
        machine = machine_info(device)
        # CUDA events record on the current device's stream: make it the model's device.
        on_device = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
        with on_device:
            results = profiler.run_all(runs)
    machine["load_average_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    _add_speedups(results)
    settings_dict = dataclasses.asdict(settings)
    settings_dict.update(dtype=str(profiler.parts.vision_dtype).replace("torch.", ""))
    model_info = {"source": source, **profiler.shapes}
    return ProfileReport(machine, settings_dict, model_info, results)
