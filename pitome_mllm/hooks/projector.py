"""The projector stage: a last merge on the projected visual tokens, and order restore.

Runs as a forward hook on the projector (a per-token MLP in LLaVA), so the language
model receives exactly ``target_tokens`` tokens per image, optionally back in raster
order. The tower's `MergeTrace` (read from the patch's `PatchState`) supplies token sizes
(for size-weighted merging) and the source map (for raster order); the stage writes the
final map and sizes back to the same state. ``target_tokens=0`` (method ``none`` only) hands the
language model no visual token at all.

`SelectionStage` is the stage of the selection methods and of PiToMe's ``mllm`` preset: a
forward pre-hook that chooses, pools or merges the patch tokens *before* the projector (so the
projector runs on the kept tokens only and averages are taken in the vision features' space),
or, for the methods that decide on the projected tokens, a forward hook keeping rows of the
projector's output.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..config import CLS_ATTENTION_METHODS, INSTRUCTION_METHODS
from ..merge.budget import merge_to_budget
from ..merge.plan import to_raster_order
from ..merge.select import (
    cls_attention,
    conditional_kernel,
    dominant_and_contextual,
    dpp_greedy_map,
    farthest_point_indices,
    gather_tokens,
    instruction_relevance,
    kept_token_map,
    pool_grid,
    pool_patches,
    pool_token_map,
    random_keep_indices,
    select_then_merge,
    square_grid,
    top_indices,
)
from .base import remove_hooks, undone_on_error
from .tower import KeySource, MergeTrace, PatchState


@dataclass(frozen=True)
class ProjectorSettings:
    """Attributes:
    target_tokens: tokens per image after this stage (None: keep what the tower gives).
    keep_order: sort the tokens by the first patch each one holds.
    drops_class_token: the model drops the tower's class token (index 0) before the projector.
    margin, alpha, energy: of the PiToMe step(s).
    reduce: ``"mean"`` or ``"size_weighted"``.
    """

    target_tokens: int | None
    keep_order: bool
    drops_class_token: bool
    margin: float
    alpha: float
    energy: str
    reduce: str


class ProjectorMerger:
    """Forward hook on a projector that applies `ProjectorSettings`."""

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
        trace: MergeTrace | None = self.state.trace
        if trace is None or output.dim() != 3 or trace.size.shape[0] != output.shape[0]:
            return None  # not a call that followed a tower forward (e.g. a user calling it alone)
        drop = int(self.settings.drops_class_token)
        size = trace.size[:, drop:]
        # Original tokens dropped with the class token are left out of the map.
        token_map = trace.token_map[:, drop:] - drop
        if size.shape[1] != output.shape[1]:
            return None
        settings = self.settings
        features, size, token_map = self.state.observers.run(
            "projector",
            None,
            merge_to_budget,
            output,
            size,
            token_map,
            settings.target_tokens,
            margin=settings.margin,
            alpha=settings.alpha,
            energy=settings.energy,
            reduce=settings.reduce,
        )
        if self.settings.keep_order:
            features, size, token_map = to_raster_order(features, size, token_map)
        self.state.final_token_map = token_map
        self.state.final_size = size
        return features if self.active else None


def patches_held(token_map: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """``[B, num_tokens, 1]`` patches each output token holds, from a ``[B, N]`` map (``-1``: none)."""
    held = (token_map >= 0).float()
    counts = torch.zeros(token_map.shape[0], num_tokens, device=token_map.device)
    return counts.scatter_add_(1, token_map.clamp(min=0), held).unsqueeze(-1)


@dataclass(frozen=True)
class SelectionSettings:
    """Attributes:
    method: a selection method of `pitome_mllm.config.SELECTION_METHODS`, or ``"mllm"`` (the
        select-then-merge preset of PiToMe).
    target_tokens: tokens per image handed to the language model.
    seed: seed of ``random``.
    drops_class_token: the model drops the tower's class token before the projector; the
        projector input must be exactly the patch tokens.
    num_heads: attention heads of the selected layer (class-token attention, keys metric).
    metric, energy_share, margin, alpha, energy: of ``mllm``.
    """

    method: str
    target_tokens: int
    seed: int
    drops_class_token: bool
    num_heads: int = 1
    metric: str = "keys_mean"
    energy_share: float = 0.5
    margin: float = 0.0
    alpha: float = 1.0
    energy: str = "elu"


# Methods that decide on the projected tokens (the LLM's visual tokens): they run as a forward
# hook on the projector's output; the others choose before the projector, which then runs on
# the kept tokens only.
AFTER_PROJECTOR = ("divprune", "cdpruner")
# Methods that need the selected layer's queries and keys (class-token attention, keys metric).
NEEDS_QUERY_KEY = (*CLS_ATTENTION_METHODS, "mllm")
# One implementation, two names (docs/methods.md, "visionzip").
SELECTION_ALIASES = {"visionzip": "dominant"}

# ``num_images -> B tensors [T_b, D]``: the embeddings of each image's prompt text, in the
# space of the projector's output (supplied by the model adapter for instruction methods).
InstructionSource = Callable[[int], list[torch.Tensor]]


class SelectionStage:
    """A hook on the projector that chooses (or pools, or merges) the patch tokens to a budget.

    Methods that decide on the vision features (`random`, `pool`, `dominant` / `visionzip`,
    `fastervlm`, the ``mllm`` preset) are a forward pre-hook: the projector runs on the kept
    tokens only. `divprune` and `cdpruner` decide on the projected tokens (as their papers do),
    so they are a forward hook that keeps rows of the projector's output.

    The class-token methods also hook the query and key projections of the selected vision layer
    (the last one the model reads) to compute the class token's attention themselves, so the
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
        if settings.method in NEEDS_QUERY_KEY and query_key is None:
            raise ValueError(f"method={settings.method!r} needs the selected layer's query and key projections")
        if settings.method in INSTRUCTION_METHODS and instructions is None:
            raise ValueError(f"method={settings.method!r} needs the prompt of every image (an instruction source)")
        self.projector = projector
        self.state = state
        self.settings = settings
        self.method = SELECTION_ALIASES.get(settings.method, settings.method)
        self.query_key = query_key
        self.instructions = instructions
        self.cls_attention: torch.Tensor | None = None
        self._captured: dict[str, torch.Tensor] = {}
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []

    def install(self) -> None:
        with undone_on_error(self.remove):
            if self.method in AFTER_PROJECTOR:
                self._hooks.append(self.projector.register_forward_hook(self._on_output))
            else:
                self._hooks.append(self.projector.register_forward_pre_hook(self._on_input))
            if self.settings.method in NEEDS_QUERY_KEY:
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

    def _follows_tower(self, features) -> bool:
        """Whether ``features`` (the projector input) came from the tower forward just traced."""
        trace: MergeTrace | None = self.state.trace
        if trace is None or not isinstance(features, torch.Tensor) or features.dim() != 3:
            return False
        drop = int(self.settings.drops_class_token)
        return tuple(trace.size.shape[:2]) == (features.shape[0], features.shape[1] + drop)

    def _record(self, token_map: torch.Tensor, num_tokens: int) -> None:
        self.state.final_token_map = token_map
        self.state.final_size = patches_held(token_map, num_tokens)

    def _on_input(self, module: nn.Module, args: tuple) -> tuple | None:
        if not args or not self._follows_tower(args[0]):
            return None  # not a call that followed a tower forward (e.g. a user calling it alone)
        with torch.no_grad():
            selected, token_map = self._select_features(args[0].detach())
        self._record(token_map, selected.shape[1])
        return (selected, *args[1:])

    def _on_output(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if not args or not self._follows_tower(args[0]) or output.dim() != 3:
            return None
        with torch.no_grad():
            kept = self._select_projected(args[0].detach(), output.detach())
        self._record(kept_token_map(kept, output.shape[1]), kept.shape[1])
        return gather_tokens(output, kept)

    def _select_projected(self, features: torch.Tensor, projected: torch.Tensor) -> torch.Tensor:
        """``[B, K]`` ascending indices of the kept tokens, from the projector's input and output."""
        target = self.settings.target_tokens
        if self.method == "divprune":
            return farthest_point_indices(projected, target)
        # cdpruner: relevance of the projected tokens to the prompt, similarity of the vision features.
        relevance = instruction_relevance(projected, self.instructions(projected.shape[0]))
        return dpp_greedy_map(conditional_kernel(features, relevance), target)

    def _class_attention_and_keys(self, num_patches: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``([B, N] class-token attention to each patch, [B, N, C] keys)`` of the selected layer."""
        queries, keys = self._captured.pop("queries"), self._captured.pop("keys")
        drop = int(self.settings.drops_class_token)
        attention = cls_attention(queries, keys, self.settings.num_heads)[:, drop:]
        self.cls_attention = attention
        return attention, keys[:, drop:]

    def _keys_mean(self, keys: torch.Tensor) -> torch.Tensor:
        """Keys averaged over heads (ToMe's metric): ``[B, N, C]`` -> ``[B, N, C / heads]``."""
        batch, num_patches, channels = keys.shape
        heads = self.settings.num_heads
        return keys.float().view(batch, num_patches, heads, channels // heads).mean(dim=2)

    def _select_features(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, N, C]`` patch features -> ``([B, K, C], [B, N] source map)``."""
        batch, num_patches, _ = features.shape
        target = self.settings.target_tokens
        if self.method == "random":
            kept = random_keep_indices(num_patches, target, self.settings.seed).to(features.device)
            kept = kept.expand(batch, -1)
            return gather_tokens(features, kept), kept_token_map(kept, num_patches)
        if self.method == "pool":
            grid = square_grid(num_patches)
            pooled = pool_grid(target, grid)
            token_map = pool_token_map(grid, pooled).to(features.device).expand(batch, -1).clone()
            return pool_patches(features, grid, pooled), token_map
        attention, keys = self._class_attention_and_keys(num_patches)
        if self.method == "fastervlm":
            kept = top_indices(attention, target)
            return gather_tokens(features, kept), kept_token_map(kept, num_patches)
        if self.method == "dominant":
            # Keys averaged over heads decide which contextual group a patch joins.
            return dominant_and_contextual(features, attention, self._keys_mean(keys), target)
        # mllm
        settings = self.settings
        metric = {"hidden": features, "keys": keys, "keys_mean": self._keys_mean(keys)}[settings.metric]
        return select_then_merge(
            features,
            metric,
            attention,
            target,
            energy_share=settings.energy_share,
            margin=settings.margin,
            alpha=settings.alpha,
            energy=settings.energy,
        )
