"""Deciding and applying merge steps, and merging a token set down to an exact budget.

Every place that merges tokens goes through these three functions: the vision-tower
layers (one planned step after a layer), the projector stage (LLaVA-1.5: down to
``target_tokens``) and the packed anyres features (LLaVA-NeXT / OneVision: each part
down to its share of the budget).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import MERGE_METHODS, REDUCES
from .pitome import pitome
from .plan import Merge
from .tome import bipartite_soft_matching


@dataclass(frozen=True)
class StepParams:
    """How a merge step decides and merges: the one bundle every stage that merges carries.

    The vision tower takes ``alpha`` and ``reduce`` from it and each layer's method, margin and
    energy from its schedule (`pitome_mllm.schedule.LayerStep`); the projector stage, the
    selection stage (method ``mllm``) and LLaVA-NeXT's packed merge take all of it.

    Attributes:
        method: ``"pitome"`` or ``"tome"`` (bipartite soft matching), the algorithm of each step.
        margin: PiToMe's energy margin of the step.
        alpha: ELU alpha of the energy.
        energy: energy kind (`pitome_mllm.config.ENERGY_KINDS`).
        reduce: ``"mean"`` or ``"size_weighted"`` (`apply_merge`).
    """

    method: str = "pitome"
    margin: float = 0.0
    alpha: float = 1.0
    energy: str = "elu"
    reduce: str = "mean"


def decide_merge(
    method: str,
    metric: torch.Tensor,
    r: int,
    *,
    margin: float = 0.0,
    alpha: float = 1.0,
    energy: str = "elu",
    class_token: bool = False,
) -> Merge:
    """The `Merge` removing ``r`` tokens of ``metric`` (``[B, N, C]``) with ``method``.

    ``margin``, ``alpha`` and ``energy`` are PiToMe's; ToMe ignores them.
    """
    if method == "tome":
        return bipartite_soft_matching(metric, r, class_token=class_token)
    if method == "pitome":
        return pitome(metric, r, margin, alpha=alpha, class_token=class_token, energy=energy)
    raise ValueError(f"method must be one of {MERGE_METHODS}, got {method!r}")


def apply_merge(step: Merge, features: torch.Tensor, size: torch.Tensor | None, reduce: str) -> torch.Tensor:
    """Apply ``step`` to ``features`` (``[B, N, C]``): ``[B, N - r, C]``.

    ``reduce="mean"`` is the plain mean of a group (the authors' released code);
    ``"size_weighted"`` weighs every token by ``size`` (``[B, N, 1]``, the patches it holds).
    The caller carries the sizes on with ``step(size, reduce="sum")``, in fp32 whatever the
    features' dtype: bf16 counts stop being exact above 256 patches.
    """
    if reduce == "size_weighted":
        merged, _ = step.weighted(features, size.to(features.dtype))
        return merged
    if reduce == "mean":
        return step(features, reduce="mean")
    raise ValueError(f"reduce must be one of {REDUCES}, got {reduce!r}")


def merge_to_budget(
    features: torch.Tensor,
    size: torch.Tensor,
    token_map: torch.Tensor,
    target_tokens: int | None,
    *,
    method: str = "pitome",
    margin: float = 0.0,
    alpha: float = 1.0,
    energy: str = "elu",
    reduce: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge steps on ``features`` (``[B, n, C]``) until ``target_tokens`` remain.

    One step removes at most half of the tokens, so a budget below ``n / 2`` takes
    several steps, each decided on the current features. ``size`` (``[B, n, 1]``, patches
    each token holds) and ``token_map`` (``[B, N0]``, the current token of every original
    one) are carried along. ``target_tokens=None`` (or ``>= n``) leaves everything as it is;
    ``0`` returns no token and a map of ``-1`` (no patch is held).

    Returns:
        ``(features [B, k, C], size [B, k, 1], token_map [B, N0])``.
    """
    params = StepParams(method=method, margin=margin, alpha=alpha, energy=energy, reduce=reduce)
    features, size, token_map, _ = merge_to_budget_carrying(params, features, size, token_map, target_tokens, ())
    return features, size, token_map


def merge_to_budget_carrying(
    params: StepParams,
    features: torch.Tensor,
    size: torch.Tensor,
    token_map: torch.Tensor,
    target_tokens: int | None,
    carried: tuple[torch.Tensor, ...],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """`merge_to_budget` that also applies every step, as decided on ``features``, to ``carried``.

    ``carried``: tensors ``[B, n, C_i]`` whose tokens correspond to ``features``' (e.g. features
    of the same patches from other layers, as Qwen3-VL's DeepStack hands the language model):
    each is merged into the same groups with the same weights, so every one keeps the same
    ``k`` tokens in the same order.

    Returns:
        ``(features [B, k, C], size [B, k, 1], token_map [B, N0], carried: each [B, k, C_i])``.
    """
    if target_tokens == 0:
        return features[:, :0], size[:, :0], torch.full_like(token_map, -1), tuple(t[:, :0] for t in carried)
    while target_tokens is not None and features.shape[1] > target_tokens:
        num_tokens = features.shape[1]
        r = min(num_tokens - target_tokens, num_tokens // 2)
        step = decide_merge(params.method, features, r, margin=params.margin, alpha=params.alpha, energy=params.energy)
        features = apply_merge(step, features, size, params.reduce)
        carried = tuple(apply_merge(step, tensor, size, params.reduce) for tensor in carried)
        size = step(size, reduce="sum")
        token_map = step.track_source(token_map)
    return features, size, token_map, carried


def merge_to_budget_with(
    params: StepParams, features: torch.Tensor, size: torch.Tensor, token_map: torch.Tensor, target_tokens: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`merge_to_budget` with the steps of ``params``; same shapes."""
    # No StepParams is built here: dynamo (torch 2.11) cannot build a dataclass instance inside a graph.
    features, size, token_map, _ = merge_to_budget_carrying(params, features, size, token_map, target_tokens, ())
    return features, size, token_map


__all__ = [
    "StepParams",
    "apply_merge",
    "decide_merge",
    "merge_to_budget",
    "merge_to_budget_carrying",
    "merge_to_budget_with",
]
