"""Merging inside a ViT encoder, as a reversible override of its layers' forwards.

Works on any encoder whose layers are called as ``layer(hidden_states, attention_mask, ...)``
(or ``layer(hidden_states)`` where the layers take no mask, as in vLLM's encoders) and return
the new hidden states (a tensor, or a tuple whose first item is the tensor). Model adapters
supply the layers and, for the ``keys`` metric, where each layer's keys come from
(`KeySource`); nothing here knows a model family.

After layer ``l`` runs, the merge step the schedule planned for ``l`` is decided on the
metric and applied to the layer output, so the next layer and any hidden-state
recorder (transformers 5.x records outputs with forward hooks, which run after the
overridden forward) see the merged tokens. Layers after the last one the model reads
pass their input through unchanged: their output is never used, and keeping them in
the list keeps hidden-state indices stable.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..merge import Merge
from ..merge.budget import StepParams, apply_merge, decide_merge
from ..schedule import LayerStep
from .base import Hook, override_forward, remove_hooks, restore_forward, undone_on_error
from .state import MergeTrace, PatchState


def _output_itself(output: torch.Tensor) -> torch.Tensor:
    return output


@dataclass(frozen=True)
class KeySource:
    """Where one encoder layer's attention keys can be read.

    Attributes:
        module: the module whose forward output carries the keys (a key projection, or a
            fused query-key-value projection).
        num_heads: attention heads the keys are split into (for ``keys_mean``).
        keys_of_output: ``module output -> [B, N, C]`` keys (the output itself for a key
            projection; the key slice for a fused projection).
    """

    module: nn.Module
    num_heads: int
    keys_of_output: Callable[[object], torch.Tensor] = _output_itself


@dataclass(frozen=True)
class MergeSettings:
    """The model-independent part of a config that the layer wrappers need.

    Attributes:
        metric: ``"hidden"``, ``"keys"`` or ``"keys_mean"``.
        prop_attn: add ``log(size)`` to the attention logits of the later layers.
        class_token: the first token is a class token (never merged).
        step: the merge steps' alpha and reduce; each layer's method, margin and energy are
            its schedule's (`LayerStep`).
    """

    metric: str
    prop_attn: bool
    class_token: bool
    step: StepParams = StepParams()


def decide_step(step: LayerStep, metric: torch.Tensor, settings: MergeSettings) -> Merge:
    """The `Merge` for one planned step, decided on ``metric`` (``[B, N, C]``)."""
    return decide_merge(
        step.method,
        metric,
        step.r,
        margin=step.margin,
        alpha=settings.step.alpha,
        energy=step.energy,
        class_token=settings.class_token,
    )


def proportional_attention_bias(size: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention bias ``log(size)`` per key: ``[B, n, 1]`` -> ``[B, 1, 1, n]``."""
    return size.log().to(dtype).transpose(1, 2).unsqueeze(1)


class TowerMerger(Hook):
    """Installs merging on the layers of one vision encoder (a `Hook`).

    Args:
        layers: the encoder layers, in order.
        plan: ``num_tokens -> list[LayerStep]`` for layers ``0..last_layer`` (cached per
            token count by the caller or here).
        last_layer: index of the last layer whose output the model reads.
        settings: metric, reduce, proportional attention, alpha, class token.
        state: the patch's `PatchState`; the tower writes its ``trace``.
        key_projection: ``layer -> KeySource``, needed for the keys metrics.
        layers_return_tuple: the layers return ``(hidden_states, ...)`` rather than the tensor, so a
            skipped layer must too (the adapter knows which the installed library does).
        layers_take_mask: the layers are called as ``layer(hidden_states, attention_mask, ...)``;
            False for layers called with the hidden states alone (no proportional attention then).
    """

    def __init__(
        self,
        layers: Sequence[nn.Module],
        plan: Callable[[int], list[LayerStep]],
        last_layer: int,
        settings: MergeSettings,
        state: PatchState,
        key_projection: Callable[[nn.Module], KeySource] | None = None,
        layers_return_tuple: bool = False,
        layers_take_mask: bool = True,
    ) -> None:
        if settings.metric != "hidden" and key_projection is None:
            raise ValueError(f"metric={settings.metric!r} needs the layers' key projections")
        if settings.prop_attn and not layers_take_mask:
            raise ValueError("prop_attn=True adds a bias to the attention mask, which these encoder layers do not take")
        self.layers = list(layers)
        self.plan = plan
        self.last_layer = last_layer
        self.settings = settings
        self.key_projection = key_projection
        self.layers_return_tuple = layers_return_tuple
        self.layers_take_mask = layers_take_mask
        self.state = state
        self.record_merges = False
        self._steps: list[LayerStep] = []
        self._keys: torch.Tensor | None = None
        self._key_hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._installed: list[nn.Module] = []

    # --------------------------------------------------------------- install
    def install(self) -> None:
        with undone_on_error(self.remove):
            for layer_idx, layer in enumerate(self.layers):
                if layer_idx <= self.last_layer:
                    override_forward(layer, self._make_merging_forward(layer_idx))
                    if self.settings.metric != "hidden":
                        source = self.key_projection(layer)
                        self._key_hooks.append(source.module.register_forward_hook(self._make_key_hook(source)))
                else:
                    override_forward(layer, _passthrough_forward(self.layers_return_tuple))
                self._installed.append(layer)

    def remove(self) -> None:
        remove_hooks(self._key_hooks)
        for layer in self._installed:
            restore_forward(layer)
        self._installed.clear()
        self.state.trace = None
        self.state.fresh_trace = None
        self._keys = None

    # ---------------------------------------------------------------- hooks
    def _make_key_hook(self, source: KeySource) -> Callable:
        def capture_keys(module: nn.Module, args: tuple, output) -> None:
            keys = source.keys_of_output(output).detach()
            if self.settings.metric == "keys_mean":
                batch, num_tokens, channels = keys.shape
                keys = keys.reshape(batch, num_tokens, source.num_heads, channels // source.num_heads).mean(dim=2)
            self._keys = keys

        return capture_keys

    def _make_merging_forward(self, layer_idx: int) -> Callable[[Callable], Callable]:
        def make(original_forward: Callable) -> Callable:
            @functools.wraps(original_forward)
            def merging_forward(hidden_states: torch.Tensor, attention_mask=None, *args, **kwargs):
                if layer_idx == 0:
                    self._start(hidden_states)
                trace = self.state.trace
                if self.settings.prop_attn and trace is not None and trace.token_counts:
                    bias = proportional_attention_bias(trace.size, hidden_states.dtype)
                    attention_mask = bias if attention_mask is None else attention_mask + bias
                if self.layers_take_mask:
                    output = original_forward(hidden_states, attention_mask, *args, **kwargs)
                else:
                    output = original_forward(hidden_states, *args, **kwargs)
                step = self._steps[layer_idx] if layer_idx < len(self._steps) else None
                if step is None or step.method == "none" or trace is None:
                    return output
                layer_out = output[0] if isinstance(output, tuple) else output
                metric = layer_out if self.settings.metric == "hidden" else self._keys
                observers = self.state.observers
                decision = observers.run("decide", layer_idx, decide_step, step, metric, self.settings)
                reduce = self.settings.step.reduce
                size = trace.size if reduce == "size_weighted" else None
                merged = observers.run("apply", layer_idx, apply_merge, decision, layer_out, size, reduce)
                observers.run("trace", layer_idx, trace.apply, layer_idx, decision)
                observers.merged(layer_idx, decision)
                self._keys = None
                return (merged, *output[1:]) if isinstance(output, tuple) else merged

            return merging_forward

        return make

    def _start(self, hidden_states: torch.Tensor) -> None:
        self._steps = self.plan(hidden_states.shape[1])
        # A new trace per forward, marked fresh: the projector stage takes it as "a tower forward just ran".
        self.state.start_tower_forward(MergeTrace.start(hidden_states, self.record_merges))


def _passthrough_forward(as_tuple: bool) -> Callable[[Callable], Callable]:
    """An override making a layer hand its input on unchanged, in the layer's own output form."""

    def make(original_forward: Callable) -> Callable:
        @functools.wraps(original_forward)
        def passthrough(hidden_states: torch.Tensor, *args, **kwargs):
            return (hidden_states,) if as_tuple else hidden_states

        return passthrough

    return make


__all__ = [
    "KeySource",
    "MergeSettings",
    "MergeTrace",
    "PatchState",
    "TowerMerger",
    "decide_step",
    "proportional_attention_bias",
]
