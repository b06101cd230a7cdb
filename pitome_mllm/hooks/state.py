"""What the stages of one patched forward hand each other: `PatchState` and the tower's `MergeTrace`.

One `PatchState` per patch is given to every hook at construction. The tower writes a new
`MergeTrace` at every forward and marks it fresh; the projector stage takes the fresh trace
once (`PatchState.take_tower_trace`), so it knows a tower forward has just run from the state,
not by comparing shapes, and a later projector call on features from elsewhere is left alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..merge import Merge
from .observers import Observers, eager_only


@dataclass
class MergeTrace:
    """What the last tower forward did, for analysis and the projector stage.

    Attributes:
        token_map: ``[B, N0]`` for every original token (class token at 0), its index
            in the current sequence.
        size: ``[B, n, 1]`` how many original tokens each current token holds (fp32).
        token_counts: tokens after each layer's merge (class token included).
        merges: ``(layer_idx, Merge)`` of every step, kept only when ``record_merges``
            (visualisation needs them; normal runs do not pay for them). Eager only: a
            compiled forward that records refuses (`pitome_mllm.hooks.observers.eager_only`).
    """

    token_map: torch.Tensor
    size: torch.Tensor
    token_counts: list[int] = field(default_factory=list)
    merges: list[tuple[int, Merge]] = field(default_factory=list)
    record_merges: bool = False

    @classmethod
    def start(cls, hidden_states: torch.Tensor, record_merges: bool) -> MergeTrace:
        batch, num_tokens, _ = hidden_states.shape
        device = hidden_states.device
        token_map = torch.arange(num_tokens, device=device).expand(batch, num_tokens).clone()
        size = torch.ones(batch, num_tokens, 1, device=device)
        return cls(token_map, size, [], [], record_merges)

    def apply(self, layer_idx: int, step: Merge) -> None:
        self.token_map = step.track_source(self.token_map)
        # Summed here in fp32 even when a size-weighted merge just summed them in the model's
        # dtype: bf16 counts stop being exact above 256 patches, and the trace must stay exact.
        self.size = step(self.size, reduce="sum")
        self.token_counts.append(step.num_output_tokens)
        if self.record_merges:
            eager_only(
                "handle.record_merges(True) keeps every merge step of a forward, which runs eagerly only: call the "
                "model without torch.compile, or record_merges(False) first"
            )
            self.merges.append((layer_idx, step))


@dataclass
class PatchState:
    """What the stages of one patched forward hand each other, and what the handle reads.

    One object per patch, given to every hook at construction: the tower writes ``trace``
    (a new one at every forward, `start_tower_forward`), the projector stage takes it
    (`take_tower_trace`) and writes the final map and sizes, and proportional attention in
    the language model reads ``final_size``.

    Attributes:
        trace: the tower's `MergeTrace` of the last forward, or None.
        fresh_trace: the trace of a tower forward whose output no projector call has taken
            yet (None once taken): the per-forward token the projector stage decides by.
        final_token_map: ``[num_images, num_patches]`` the LLM token holding each patch
            (``-1``: dropped), after the last projector call.
        final_size: ``[num_images, K, 1]`` patches each LLM visual token holds.
        observers: the `Observers` every stage is announced to.
    """

    trace: MergeTrace | None = None
    fresh_trace: MergeTrace | None = None
    final_token_map: torch.Tensor | None = None
    final_size: torch.Tensor | None = None
    observers: Observers = field(default_factory=Observers)

    def start_tower_forward(self, trace: MergeTrace) -> None:
        """A tower forward began: ``trace`` is the last trace and the fresh one (replacing an untaken one)."""
        self.trace = trace
        self.fresh_trace = trace

    def take_tower_trace(self) -> MergeTrace | None:
        """The trace of the tower forward that just ran, once; None when no tower forward ran since the last take.

        The projector stage calls this at every projector call: features handed to the projector
        without a tower forward before them (a user calling it alone) find None and are left alone.
        """
        trace, self.fresh_trace = self.fresh_trace, None
        return trace

    def clear(self) -> None:
        self.trace = None
        self.fresh_trace = None
        self.final_token_map = None
        self.final_size = None


__all__ = ["MergeTrace", "PatchState"]
