"""The projector-stage reduction methods behind one call: ``reduce_to_budget(name, inputs)``.

Each entry of `REDUCERS` takes the same `ReductionInputs` and returns the kept (or pooled,
or merged) tokens with their source map, so the stage that runs them (`pitome_mllm.hooks.projector`)
asks the method registry (`pitome_mllm.methods`) what a method needs and never branches on its name.
The algorithms themselves are the functions of `pitome_mllm.merge.select`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .budget import StepParams
from .select import (
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


@dataclass(frozen=True)
class ReductionInputs:
    """What a reduction method may read; each method reads its own part (`pitome_mllm.methods.MethodSpec`).

    Attributes:
        features: ``[B, N, C]`` the patch features the projector reads (class token dropped).
        target_tokens: ``K``, the tokens per image to hand on.
        seed: seed of ``random``.
        class_attention: ``[B, N]`` the class token's attention to each patch in the read layer,
            averaged over heads (methods that need class attention).
        keys: ``[B, N, C_k]`` that layer's keys, all heads concatenated (same methods).
        num_heads: attention heads of ``keys``.
        projected: ``[B, N, D]`` the projector's output (methods that decide after the projector).
        instructions: ``B`` tensors ``[T_b, D]``, the embeddings of each image's prompt (methods
            that need the prompt).
        metric: what ``mllm`` decides on: ``"hidden"`` (the features), ``"keys"`` or ``"keys_mean"``.
        energy_share: ``mllm``'s share of the budget kept by lowest energy.
        step: ``mllm``'s energy (margin, alpha, energy kind); None: `StepParams`' defaults.
    """

    features: torch.Tensor
    target_tokens: int
    seed: int = 0
    class_attention: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    num_heads: int = 1
    projected: torch.Tensor | None = None
    instructions: list[torch.Tensor] | None = None
    metric: str = "keys_mean"
    energy_share: float = 0.5
    # None rather than a StepParams() default: torch.compile (dynamo of torch 2.11) cannot build a
    # dataclass default instance inside a graph.
    step: StepParams | None = None

    def keys_mean(self) -> torch.Tensor:
        """Keys averaged over heads (ToMe's metric): ``[B, N, C_k]`` -> ``[B, N, C_k / heads]``."""
        batch, num_patches, channels = self.keys.shape
        return self.keys.float().view(batch, num_patches, self.num_heads, channels // self.num_heads).mean(dim=2)


# ``inputs -> ([B, K, C] tokens, [B, N] source map: the token holding each patch, -1 for a dropped one)``;
# methods that decide after the projector return rows of ``inputs.projected``.
Reducer = Callable[[ReductionInputs], tuple[torch.Tensor, torch.Tensor]]


def _kept(tokens: torch.Tensor, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows ``kept`` (``[B, K]`` ascending) of ``tokens`` (``[B, N, C]``) and their source map."""
    return gather_tokens(tokens, kept), kept_token_map(kept, tokens.shape[1])


def reduce_random(inputs: ReductionInputs) -> tuple[torch.Tensor, torch.Tensor]:
    features = inputs.features
    kept = random_keep_indices(features.shape[1], inputs.target_tokens, inputs.seed).to(features.device)
    return _kept(features, kept.expand(features.shape[0], -1))


def reduce_pool(inputs: ReductionInputs) -> tuple[torch.Tensor, torch.Tensor]:
    features = inputs.features
    grid = square_grid(features.shape[1])
    pooled = pool_grid(inputs.target_tokens, grid)
    token_map = pool_token_map(grid, pooled).to(features.device).expand(features.shape[0], -1).clone()
    return pool_patches(features, grid, pooled), token_map


def reduce_fastervlm(inputs: ReductionInputs) -> tuple[torch.Tensor, torch.Tensor]:
    return _kept(inputs.features, top_indices(inputs.class_attention, inputs.target_tokens))


def reduce_dominant(inputs: ReductionInputs) -> tuple[torch.Tensor, torch.Tensor]:
    # Keys averaged over heads decide which contextual group a patch joins.
    return dominant_and_contextual(inputs.features, inputs.class_attention, inputs.keys_mean(), inputs.target_tokens)


# The methods deciding after the projector decide without gradient and keep rows of the projected
# tokens as they are (a gradient through the projector still reaches the kept rows).
def reduce_divprune(inputs: ReductionInputs) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        kept = farthest_point_indices(inputs.projected.detach(), inputs.target_tokens)
    return _kept(inputs.projected, kept)


def reduce_cdpruner(inputs: ReductionInputs) -> tuple[torch.Tensor, torch.Tensor]:
    # Relevance of the projected tokens to the prompt, similarity of the vision features.
    with torch.no_grad():
        relevance = instruction_relevance(inputs.projected.detach(), inputs.instructions)
        kept = dpp_greedy_map(conditional_kernel(inputs.features.detach(), relevance), inputs.target_tokens)
    return _kept(inputs.projected, kept)


def reduce_select_merge(inputs: ReductionInputs) -> tuple[torch.Tensor, torch.Tensor]:
    metrics = {"hidden": lambda: inputs.features, "keys": lambda: inputs.keys, "keys_mean": inputs.keys_mean}
    step = inputs.step if inputs.step is not None else StepParams()
    return select_then_merge(
        inputs.features,
        metrics[inputs.metric](),
        inputs.class_attention,
        inputs.target_tokens,
        energy_share=inputs.energy_share,
        margin=step.margin,
        alpha=step.alpha,
        energy=step.energy,
    )


# One entry per implementation named by `pitome_mllm.methods.MethodSpec.implementation`.
REDUCERS: dict[str, Reducer] = {
    "random": reduce_random,
    "pool": reduce_pool,
    "dominant": reduce_dominant,
    "fastervlm": reduce_fastervlm,
    "divprune": reduce_divprune,
    "cdpruner": reduce_cdpruner,
    "select_merge": reduce_select_merge,
}


def reduce_to_budget(implementation: str, inputs: ReductionInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the reduction ``implementation`` on ``inputs``: ``([B, K, C] tokens, [B, N] source map)``."""
    try:
        reducer = REDUCERS[implementation]
    except KeyError:
        raise ValueError(f"implementation must be one of {tuple(REDUCERS)}, got {implementation!r}") from None
    return reducer(inputs)


__all__ = ["REDUCERS", "ReductionInputs", "Reducer", "reduce_to_budget"]
