"""Scores of one setting: the linear probe on pooled features, cosines and spectral distance."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .features import Reduced, mean_cosine


@dataclass
class LinearProbe:
    """Standardisation and a multinomial logistic regression on pooled features ``[N, D]``."""

    mean: torch.Tensor  # [D]
    std: torch.Tensor  # [D]
    weight: torch.Tensor  # [D, classes]
    bias: torch.Tensor  # [classes]

    def predict(self, pooled: torch.Tensor) -> torch.Tensor:
        """``[N, D]`` -> ``[N]`` class indices."""
        return (((pooled.float() - self.mean) / self.std) @ self.weight + self.bias).argmax(dim=1)

    def accuracy(self, pooled: torch.Tensor, labels: torch.Tensor) -> float:
        return (self.predict(pooled) == labels).float().mean().item()

    def hits(self, pooled: torch.Tensor, labels: torch.Tensor) -> list[int]:
        """``[N]`` 1 where the prediction for an image is right, else 0 (the per-image pairing unit)."""
        return (self.predict(pooled) == labels).int().tolist()


def train_probe(pooled: torch.Tensor, labels: torch.Tensor, weight_decay: float = 1e-3) -> LinearProbe:
    """Full-batch L-BFGS on cross-entropy + L2 over standardised ``pooled`` ``[N, D]`` (deterministic)."""
    pooled = pooled.float()
    mean, std = pooled.mean(dim=0), pooled.std(dim=0).clamp_min(1e-6)
    inputs = (pooled - mean) / std
    num_classes = int(labels.max()) + 1
    weight = torch.zeros(inputs.shape[1], num_classes, requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(inputs @ weight + bias, labels) + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return LinearProbe(mean, std, weight.detach(), bias.detach())


# --------------------------------------------------------------------------------- scoring
def spectral_distances(reference: torch.Tensor, token_maps: torch.Tensor) -> list[float] | None:
    """Per-node spectral distance of each image's partition ``token_maps`` ``[K, P]`` of ``reference`` ``[K, P, D]``.

    None when a map drops patches (``-1``): the coarsening of a graph is defined for
    partitions of all its nodes, and lumping the dropped patches into one block would
    score an invented partition.
    """
    from ...tools.spectral import SpectralReference

    if len(token_maps) == 0 or bool((token_maps < 0).any()):
        return None
    return [
        SpectralReference(features).distance(mapping.long(), per_node=True)
        for features, mapping in zip(reference, token_maps, strict=True)
    ]


def score_row(
    setting: str,
    budget: int | None,
    reduced: Reduced,
    probe: LinearProbe,
    labels: torch.Tensor,
    reference: torch.Tensor,
    config: dict[str, Any],
) -> dict[str, Any]:
    """One result row: ``reference`` is the ``[N, P, D]`` unmerged test features."""
    pooled_reference = reference.mean(dim=1)
    distances = spectral_distances(reference[: len(reduced.token_maps)], reduced.token_maps)
    cosines = reduced.patch_cosine
    return {
        "setting": setting,
        "budget": budget,
        "visual_tokens": reduced.num_tokens,
        "keep_ratio": reduced.keep_ratio,
        "probe_acc_plain": probe.accuracy(reduced.pooled_plain, labels),
        "probe_acc_size_weighted": probe.accuracy(reduced.pooled_weighted, labels),
        "probe_hits_plain": probe.hits(reduced.pooled_plain, labels),
        "probe_hits_size_weighted": probe.hits(reduced.pooled_weighted, labels),
        "pooled_cos_plain": mean_cosine(reduced.pooled_plain, pooled_reference),
        "pooled_cos_size_weighted": mean_cosine(reduced.pooled_weighted, pooled_reference),
        "patch_cos": 1.0 if cosines is None else cosines.nanmean().item(),
        "spectral_distance": None if distances is None else sum(distances) / len(distances),
        "spectral_distance_std": None if distances is None else _std(distances),
        "spectral_images": 0 if distances is None else len(distances),
        "config": config,
    }


def _std(values: Sequence[float]) -> float:
    if len(values) < 2:
        return 0.0
    mean = sum(values) / len(values)
    return math.sqrt(sum((value - mean) ** 2 for value in values) / (len(values) - 1))
