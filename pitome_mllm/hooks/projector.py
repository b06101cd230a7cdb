"""The projector stage: a last merge on the projected visual tokens, and order restore.

Runs as a forward hook on the projector (a per-token MLP in LLaVA), so the language
model receives exactly ``target_tokens`` tokens per image, optionally back in raster
order. The tower's `MergeTrace` (taken from the patch's `PatchState`, once per tower forward:
that is how a stage knows the projector input came from the tower) supplies token sizes
(for size-weighted merging) and the source map (for raster order); the stage writes the
final map and sizes back to the same state. ``target_tokens=0`` (method ``none`` only) hands the
language model no visual token at all.

`SelectionStage` is the stage of every method that reduces at the projector (the selection
methods and PiToMe's ``mllm``; `pitome_mllm.methods`): a forward pre-hook that chooses, pools or
merges the patch tokens *before* the projector (so the projector runs on the kept tokens only and
averages are taken in the vision features' space), or, for the methods that decide on the projected
tokens, a forward hook keeping rows of the projector's output.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..merge.budget import StepParams, merge_to_budget_with
from ..merge.plan import to_raster_order
from ..merge.reducers import ReductionInputs, reduce_to_budget
from ..merge.select import cls_attention, with_group_mean_gradient
from ..methods import MethodSpec, method_spec
from .base import Hook, remove_hooks, undone_on_error
from .state import MergeTrace, PatchState
from .tower import KeySource


@dataclass(frozen=True)
class ProjectorSettings:
    """Attributes:
    target_tokens: tokens per image after this stage (None: keep what the tower gives).
    keep_order: sort the tokens by the first patch each one holds.
    drops_class_token: the model drops the tower's class token (index 0) before the projector.
    step: the PiToMe step(s) down to ``target_tokens``.
    """

    target_tokens: int | None
    keep_order: bool
    drops_class_token: bool
    step: StepParams


class ProjectorMerger(Hook):
    """Forward hook on a projector that applies `ProjectorSettings` (a `Hook`)."""

    def __init__(self, projector: nn.Module, state: PatchState, settings: ProjectorSettings) -> None:
        self.projector = projector
        self.state = state
        self.settings = settings
        self._hook: torch.utils.hooks.RemovableHandle | None = None

    @property
    def active(self) -> bool:
        return self.settings.target_tokens is not None or self.settings.keep_order

    def install(self) -> None:
        # Always installed: it also records the final source map for analysis.
        self._hook = self.projector.register_forward_hook(self._on_output)

    def remove(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self.state.final_token_map = None
        self.state.final_size = None

    def _on_output(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        trace: MergeTrace | None = self.state.take_tower_trace()
        if trace is None:
            return None  # no tower forward ran since the last projector call (e.g. a user calling it alone)
        drop = int(self.settings.drops_class_token)
        size = trace.size[:, drop:]
        # Original tokens dropped with the class token are left out of the map.
        token_map = trace.token_map[:, drop:] - drop
        if not _fits(trace, output, drop):
            return None  # a tower run whose output never came here (the tower called alone), then other features
        settings = self.settings
        features, size, token_map = self.state.observers.run(
            "projector", None, merge_to_budget_with, settings.step, output, size, token_map, settings.target_tokens
        )
        if self.settings.keep_order:
            features, size, token_map = to_raster_order(features, size, token_map)
        self.state.final_token_map = token_map
        self.state.final_size = size
        return features if self.active else None


def _fits(trace: MergeTrace, features, drop: int) -> bool:
    """Whether ``features`` (``[B, n, C]``) hold the tokens ``trace`` tracked, less ``drop`` leading ones.

    Only a guard for a fresh trace left by a tower called on its own (its output never reached
    the projector): the decision that a tower forward ran is the trace being fresh.
    """
    if not isinstance(features, torch.Tensor) or features.dim() != 3:
        return False
    return tuple(trace.size.shape[:2]) == (features.shape[0], features.shape[1] + drop)


def patches_held(token_map: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """``[B, num_tokens, 1]`` patches each output token holds, from a ``[B, N]`` map (``-1``: none)."""
    held = (token_map >= 0).float()
    counts = torch.zeros(token_map.shape[0], num_tokens, device=token_map.device)
    return counts.scatter_add_(1, token_map.clamp(min=0), held).unsqueeze(-1)


@dataclass(frozen=True)
class SelectionSettings:
    """Attributes:
    method: a method of `pitome_mllm.methods` that reduces at the projector (a selection method,
        or PiToMe's ``mllm``).
    target_tokens: tokens per image handed to the language model.
    seed: seed of ``random``.
    drops_class_token: the model drops the tower's class token before the projector; the
        projector input must be exactly the patch tokens.
    num_heads: attention heads of the selected layer (class-token attention, keys metric).
    metric, energy_share, step: of ``mllm`` (the step's margin, alpha and energy).
    """

    method: str
    target_tokens: int
    seed: int
    drops_class_token: bool
    num_heads: int = 1
    metric: str = "keys_mean"
    energy_share: float = 0.5
    step: StepParams = StepParams()


# ``num_images -> B tensors [T_b, D]``: the embeddings of each image's prompt text, in the
# space of the projector's output (supplied by the model adapter for instruction methods).
InstructionSource = Callable[[int], list[torch.Tensor]]


class SelectionStage(Hook):
    """A hook on the projector that chooses (or pools, or merges) the patch tokens to a budget (a `Hook`).

    What the method needs is asked of its `pitome_mllm.methods.MethodSpec`; the tensors are
    reduced by `pitome_mllm.merge.reducers.reduce_to_budget`. Methods that decide on the vision
    features (`random`, `pool`, `dominant` / `visionzip`, `fastervlm`, `mllm`) are a forward
    pre-hook: the projector runs on the kept tokens only. Methods that decide on the projected
    tokens (`divprune`, `cdpruner`, as their papers do: ``after_projector``) are a forward hook
    that keeps rows of the projector's output.

    The methods that need the class token's attention also hook the query and key projections of
    the selected vision layer (the last one the model reads) to compute it themselves, so the
    tower keeps its SDPA path and no attention maps are requested.

    Writes the patch state's ``final_token_map`` (``[B, num_patches]`` after the last
    forward: the LLM token holding each patch, ``-1`` for a patch that was dropped;
    ``dominant`` and ``mllm`` never drop) and ``final_size``.

    Attributes:
        cls_attention: ``[B, num_patches]`` the class token's attention to each patch in the
            selected layer, averaged over heads, of the last forward (class-token methods).
    """

    def __init__(
        self,
        projector: nn.Module,
        state: PatchState,
        settings: SelectionSettings,
        query_key: tuple[KeySource, KeySource] | None = None,
        instructions: InstructionSource | None = None,
    ) -> None:
        spec = method_spec(settings.method)
        if spec.implementation is None:
            raise ValueError(f"method={settings.method!r} does not reduce at the projector (stage {spec.stage!r})")
        if spec.needs_class_attention and query_key is None:
            raise ValueError(f"method={settings.method!r} needs the selected layer's query and key projections")
        if spec.needs_prompt and instructions is None:
            raise ValueError(f"method={settings.method!r} needs the prompt of every image (an instruction source)")
        self.projector = projector
        self.state = state
        self.settings = settings
        self.spec: MethodSpec = spec
        self.query_key = query_key
        self.instructions = instructions
        self.cls_attention: torch.Tensor | None = None
        self._captured: dict[str, torch.Tensor] = {}
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []

    def install(self) -> None:
        with undone_on_error(self.remove):
            if self.spec.after_projector:
                self._hooks.append(self.projector.register_forward_hook(self._on_output))
            else:
                self._hooks.append(self.projector.register_forward_pre_hook(self._on_input))
            if self.spec.needs_class_attention:
                for name, source in zip(("queries", "keys"), self.query_key, strict=True):
                    self._hooks.append(source.module.register_forward_hook(self._make_capture(name, source)))

    def remove(self) -> None:
        remove_hooks(self._hooks)
        self._captured.clear()
        self.state.final_token_map = None
        self.state.final_size = None
        self.cls_attention = None

    def _make_capture(self, name: str, source: KeySource):
        def capture(module: nn.Module, args: tuple, output) -> None:
            self._captured[name] = source.keys_of_output(output).detach()

        return capture

    def _follows_tower(self, args: tuple) -> bool:
        """Whether this projector call (input ``args``) is the first since a tower forward (its fresh trace)."""
        trace: MergeTrace | None = self.state.take_tower_trace()
        return trace is not None and len(args) > 0 and _fits(trace, args[0], int(self.settings.drops_class_token))

    def _record(self, token_map: torch.Tensor, num_tokens: int) -> None:
        self.state.final_token_map = token_map
        self.state.final_size = patches_held(token_map, num_tokens)

    def _on_input(self, module: nn.Module, args: tuple) -> tuple | None:
        if not self._follows_tower(args):
            return None  # no tower forward ran since the last projector call (e.g. a user calling it alone)
        features = args[0]
        with torch.no_grad():
            selected, token_map = reduce_to_budget(self.spec.implementation, self._inputs(features.detach()))
        if torch.is_grad_enabled() and features.requires_grad:
            # Decided without gradient; the kept values carry the gradient of the patches they hold.
            selected = with_group_mean_gradient(selected, features, token_map)
        self._record(token_map, selected.shape[1])
        return (selected, *args[1:])

    def _on_output(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if not self._follows_tower(args) or output.dim() != 3:
            return None
        # The reducer decides without gradient and keeps rows of ``output`` itself.
        kept, token_map = reduce_to_budget(self.spec.implementation, self._inputs(args[0].detach(), output))
        self._record(token_map, kept.shape[1])
        return kept

    def _inputs(self, features: torch.Tensor, projected: torch.Tensor | None = None) -> ReductionInputs:
        """What the method reads, from the projector's input ``[B, N, C]`` (and output ``[B, N, D]``)."""
        settings = self.settings
        class_attention = keys = instructions = None
        if self.spec.needs_class_attention:
            class_attention, keys = self._class_attention_and_keys()
        if self.spec.needs_prompt:
            instructions = self.instructions(features.shape[0])
        return ReductionInputs(
            features,
            settings.target_tokens,
            seed=settings.seed,
            class_attention=class_attention,
            keys=keys,
            num_heads=settings.num_heads,
            projected=projected,
            instructions=instructions,
            metric=settings.metric,
            energy_share=settings.energy_share,
            step=settings.step,
        )

    def _class_attention_and_keys(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``([B, N] class-token attention to each patch, [B, N, C] keys)`` of the selected layer."""
        queries, keys = self._captured.pop("queries"), self._captured.pop("keys")
        drop = int(self.settings.drops_class_token)
        attention = cls_attention(queries, keys, self.settings.num_heads)[:, drop:]
        self.cls_attention = attention
        return attention, keys[:, drop:]
