"""Spectral distance between a token graph and its merged version (paper §3.3; docs/spectral.md).

Pure tensors: no transformers, no models. The merge of ``N`` original tokens into
``n`` tokens is a partition of the original tokens; we describe it by a *token map*
``[N]`` giving, for every original token, the index of the token that holds it
(any integer labels: only which tokens share a label matters).

Definitions (paper §3.3, Def. 1–2, Lemma 1; docs/spectral.md), all in float64:

* Graph of the original tokens: ``W[i, j] = 1 - cos(v_i, v_j)`` (cosine *distance*),
  zero diagonal; normalised Laplacian ``I - D^{-1/2} W D^{-1/2}``.
* Coarse graph of a partition (Def. 1), the *average* over block pairs:
  ``W_c = diag(1/|V|) C^T W C diag(1/|V|)`` with ``C`` the ``[N, n]`` assignment matrix.
* Lifted graph (Def. 2): ``W_l = C W_c C^T``, i.e. ``W_l[i, j] = W_c[p(i), p(j)]``. Its
  diagonal is the block's mean internal distance and is kept (Def. 2 lifts every entry).
* ``SD = sum_i |lambda_i - lambda_l,i|`` over the sorted eigenvalues of the two
  normalised Laplacians (optionally divided by ``N``).

The lifted spectrum has a closed form (docs/spectral.md, checked in the tests): the
eigenvalues of ``L(W_l)`` are those of the normalised Laplacian of the *sum-aggregated*
coarse graph ``C^T W C`` (self-loops included) plus ``N - n`` ones. Why: with
``S = diag(|V|)`` the lifted degrees are the block means of the original degrees, so
``D_l^{-1/2} W_l D_l^{-1/2} = Q M Q^T`` with ``Q = C S^{-1/2}`` (orthonormal columns) and
``M`` the normalised adjacency of ``C^T W C``. It does *not* hold for ``W_c`` itself when
blocks differ in size. `lifted_spectrum` uses the identity (an ``n x n`` problem instead
of ``N x N``); ``exact=True`` diagonalises the lifted graph directly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..merge import Merge, bipartite_soft_matching, identity_merge, margin_for_layer, pitome
from ..schedule import removal_count

# Degrees below this are treated as zero: the node's row of the normalised Laplacian
# becomes the identity row (eigenvalue 1) instead of a division by zero.
DEGREE_EPS = 1e-12

SIMULATED_METHODS = ("pitome", "tome", "random")


# ---------------------------------------------------------------------------- graphs
def cosine_distance_graph(features: torch.Tensor) -> torch.Tensor:
    """``W = 1 - cos`` between all tokens.

    Args:
        features: ``[..., N, C]`` token features (any float dtype).

    Returns:
        ``[..., N, N]`` float64, symmetric, zero diagonal, entries in ``[0, 2]``.
    """
    unit = F.normalize(features.detach().to(torch.float64), p=2.0, dim=-1)
    distance = 1.0 - unit @ unit.transpose(-1, -2)
    # Rounding can leave |cos| a hair above 1 or the matrix a hair asymmetric.
    distance = ((distance + distance.transpose(-1, -2)) / 2).clamp_(0.0, 2.0)
    distance.diagonal(dim1=-2, dim2=-1).zero_()
    return distance


def normalized_laplacian(adjacency: torch.Tensor, eps: float = DEGREE_EPS) -> torch.Tensor:
    """``I - D^{-1/2} A D^{-1/2}`` of a weighted adjacency ``[..., N, N]`` (zero degrees guarded)."""
    degree = adjacency.sum(dim=-1)
    inv_sqrt = torch.where(degree > eps, degree.clamp_min(eps).rsqrt(), torch.zeros_like(degree))
    normalized = inv_sqrt.unsqueeze(-1) * adjacency * inv_sqrt.unsqueeze(-2)
    eye = torch.eye(adjacency.shape[-1], dtype=adjacency.dtype, device=adjacency.device)
    return eye - normalized


def laplacian_spectrum(adjacency: torch.Tensor, eps: float = DEGREE_EPS) -> torch.Tensor:
    """Ascending eigenvalues ``[..., N]`` of the normalised Laplacian of ``adjacency``."""
    laplacian = normalized_laplacian(adjacency, eps)
    # Symmetrise exactly so eigvalsh reads a symmetric matrix whichever triangle it uses.
    return torch.linalg.eigvalsh((laplacian + laplacian.transpose(-1, -2)) / 2)


# ------------------------------------------------------------------------ partitions
def partition_labels(token_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Relabel a token map ``[N]`` to ``0..n-1``.

    Returns:
        ``(labels [N], sizes [n])``: the block of every token and every block's size.
    """
    if token_map.dim() != 1:
        raise ValueError(f"token_map must be a 1-D [N] tensor, got shape {tuple(token_map.shape)}")
    _, labels = torch.unique(token_map, return_inverse=True)
    sizes = torch.bincount(labels)
    return labels, sizes


def assignment_matrix(token_map: torch.Tensor) -> torch.Tensor:
    """``C``: ``[N, n]`` float64, ``C[i, a] = 1`` when original token ``i`` is in block ``a``."""
    labels, sizes = partition_labels(token_map)
    return F.one_hot(labels, num_classes=len(sizes)).to(torch.float64)


def summed_coarse_graph(graph: torch.Tensor, token_map: torch.Tensor) -> torch.Tensor:
    """``C^T W C``: ``[n, n]`` total distance between (and, on the diagonal, within) blocks."""
    assignment = assignment_matrix(token_map).to(graph.device)
    return assignment.T @ graph.to(torch.float64) @ assignment


def averaged_coarse_graph(graph: torch.Tensor, token_map: torch.Tensor) -> torch.Tensor:
    """Def. 1: ``W_c[a, b]`` = mean of ``W`` over block pair ``(a, b)``; ``[n, n]``."""
    _, sizes = partition_labels(token_map)
    sizes = sizes.to(device=graph.device, dtype=torch.float64)
    return summed_coarse_graph(graph, token_map) / (sizes.unsqueeze(1) * sizes.unsqueeze(0))


def lifted_graph(graph: torch.Tensor, token_map: torch.Tensor) -> torch.Tensor:
    """Def. 2: ``W_l[i, j] = W_c[p(i), p(j)]``; ``[N, N]`` (diagonal kept)."""
    labels, _ = partition_labels(token_map)
    labels = labels.to(graph.device)
    coarse = averaged_coarse_graph(graph, token_map)
    return coarse[labels][:, labels]


def lifted_spectrum(
    graph: torch.Tensor, token_map: torch.Tensor, exact: bool = False, eps: float = DEGREE_EPS
) -> torch.Tensor:
    """Ascending eigenvalues ``[N]`` of the normalised Laplacian of the lifted graph.

    Args:
        graph: ``[N, N]`` the original graph ``W``.
        token_map: ``[N]`` block of every original token.
        exact: diagonalise the ``N x N`` lifted graph; otherwise use the identity of the
            module docstring (same values up to rounding, ``n x n`` work).
    """
    if exact:
        return laplacian_spectrum(lifted_graph(graph, token_map), eps)
    coarse = summed_coarse_graph(graph, token_map)
    num_nodes, num_blocks = graph.shape[-1], coarse.shape[-1]
    ones = torch.ones(num_nodes - num_blocks, dtype=torch.float64, device=graph.device)
    return torch.cat([laplacian_spectrum(coarse, eps), ones]).sort().values


class SpectralReference:
    """The graph of one image's original tokens and its spectrum, scored against many partitions.

    Args:
        features: ``[N, C]`` reference features of the ``N`` original tokens (e.g. the
            unmerged model's features at the layer the LLM reads, class token removed).
    """

    def __init__(self, features: torch.Tensor) -> None:
        if features.dim() != 2:
            raise ValueError(f"features must be [N, C], got shape {tuple(features.shape)}")
        self.graph = cosine_distance_graph(features)  # [N, N]
        self.spectrum = laplacian_spectrum(self.graph)  # [N]

    @property
    def num_tokens(self) -> int:
        return self.graph.shape[-1]

    def distance(self, token_map: torch.Tensor, per_node: bool = False, exact: bool = False) -> float:
        """``SD`` of the partition ``token_map`` (``[N]``); divided by ``N`` when ``per_node``."""
        if token_map.shape != (self.num_tokens,):
            raise ValueError(f"token_map must have shape [{self.num_tokens}], got {tuple(token_map.shape)}")
        lifted = lifted_spectrum(self.graph, token_map.to(self.graph.device), exact=exact)
        distance = (self.spectrum - lifted).abs().sum().item()
        return distance / self.num_tokens if per_node else distance


def spectral_distance(
    features: torch.Tensor, token_map: torch.Tensor, per_node: bool = False, exact: bool = False
) -> torch.Tensor:
    """Spectral distance between the graph of ``features`` and its coarsening by ``token_map``.

    Args:
        features: ``[N, C]`` or ``[B, N, C]`` original token features.
        token_map: ``[N]`` or ``[B, N]`` block (merged-token index) of every original token.
        per_node: divide by ``N``.
        exact: diagonalise the lifted graph directly (see `lifted_spectrum`).

    Returns:
        ``[]`` or ``[B]`` float64.
    """
    if features.dim() == 2:
        return torch.tensor(SpectralReference(features).distance(token_map, per_node, exact), dtype=torch.float64)
    if features.dim() != 3 or token_map.shape != features.shape[:2]:
        raise ValueError(
            f"expected features [B, N, C] and token_map [B, N], got {tuple(features.shape)} and "
            f"{tuple(token_map.shape)}"
        )
    return torch.stack([spectral_distance(f, t, per_node, exact) for f, t in zip(features, token_map, strict=True)])


# ------------------------------------------------------------- simulated merging
@dataclass(frozen=True)
class SimStep:
    """One merge step of a simulation: ``method`` removes ``r`` tokens (PiToMe with ``margin``)."""

    method: str
    r: int
    margin: float = 0.5


def plan_steps(
    num_tokens: int,
    method: str,
    keep_ratio: float,
    num_steps: int,
    margin: float | None = None,
    margin_start: float = 0.9,
    margin_span: float = 0.9,
) -> list[SimStep]:
    """``num_steps`` steps each keeping ``keep_ratio`` of the tokens (no class token).

    ``r = floor(n - n * keep_ratio)`` as the released code computes it, capped at
    ``n // 2``, so every method removes the same number of tokens at every step.
    The margin is ``margin`` if given, else ``margin_start - margin_span * step / num_steps``.
    """
    if method not in SIMULATED_METHODS:
        raise ValueError(f"method must be one of {SIMULATED_METHODS}, got {method!r}")
    steps, tokens = [], num_tokens
    for step_idx in range(num_steps):
        r = min(removal_count(tokens, keep_ratio), tokens // 2)
        step_margin = margin if margin is not None else margin_for_layer(step_idx, num_steps, margin_start, margin_span)
        steps.append(SimStep(method, r, step_margin))
        tokens -= r
    return steps


def random_merge(batch_size: int, num_tokens: int, r: int, generator: torch.Generator | None = None) -> Merge:
    """A control step: ``r`` random tokens merge into random partners among ``r`` other random tokens."""
    if r == 0:
        return identity_merge(batch_size, num_tokens)
    order = torch.stack([torch.randperm(num_tokens, generator=generator) for _ in range(batch_size)])
    src_idx, dst_idx = order[:, :r], order[:, r : 2 * r]
    kept_idx = order[:, 2 * r :].sort(dim=1).values
    src_dst_pos = torch.randint(r, (batch_size, r), generator=generator)
    return Merge(kept_idx, dst_idx, src_idx, src_dst_pos, num_tokens)


def decide_sim_step(step: SimStep, metric: torch.Tensor, generator: torch.Generator | None = None) -> Merge:
    """The `Merge` of one simulated step on ``metric`` (``[B, n, C]``, no class token)."""
    if step.method == "pitome":
        return pitome(metric, step.r, step.margin)
    if step.method == "tome":
        return bipartite_soft_matching(metric, step.r)
    if step.method == "random":
        return random_merge(metric.shape[0], metric.shape[1], step.r, generator)
    raise ValueError(f"method must be one of {SIMULATED_METHODS}, got {step.method!r}")


def simulate_merges(
    features: torch.Tensor,
    steps: Sequence[SimStep],
    reduce: str = "size_weighted",
    generator: torch.Generator | None = None,
) -> list[torch.Tensor]:
    """Merge a token set through ``steps``; the metric of each step is the current features.

    Args:
        features: ``[B, N, C]`` tokens (no class token).
        steps: the steps, in order.
        reduce: ``"size_weighted"`` (paper Alg. 1) or ``"mean"`` (released LLaVA code).
        generator: random source of ``"random"`` steps.

    Returns:
        One token map ``[B, N]`` per step: the index of the token holding each original
        token after that step.
    """
    if reduce not in ("size_weighted", "mean"):
        raise ValueError(f"reduce must be 'size_weighted' or 'mean', got {reduce!r}")
    current = features.float()
    size = torch.ones_like(current[..., :1])
    token_map: torch.Tensor | None = None
    maps = []
    for step in steps:
        decision = decide_sim_step(step, current, generator)
        if reduce == "size_weighted":
            current, size = decision.weighted(current, size)
        else:
            current = decision(current, reduce="mean")
        token_map = decision.track_source(token_map)
        maps.append(token_map)
    return maps


# ------------------------------------------------------------- synthetic data
def gaussian_clusters(
    cluster_sizes: Sequence[int],
    dim: int = 64,
    noise: float = 0.5,
    generator: torch.Generator | None = None,
    shuffle: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens drawn around random cluster centres.

    Each centre is ``N(0, I_dim)``; each token is its centre plus ``noise * N(0, I_dim)``,
    so ``noise`` is relative to the centres' spread (``noise = 1`` puts the mean
    within-cluster cosine near 0.5). ``shuffle`` puts the tokens in random order, so
    ToMe's alternating split is a random split rather than one aligned with clusters.

    Returns:
        ``(features [N, dim] fp32, cluster_id [N] long)``.
    """
    if not cluster_sizes or any(size < 1 for size in cluster_sizes):
        raise ValueError(f"cluster_sizes must be positive integers, got {list(cluster_sizes)}")
    centres = torch.randn(len(cluster_sizes), dim, generator=generator)
    cluster_id = torch.repeat_interleave(torch.arange(len(cluster_sizes)), torch.tensor(list(cluster_sizes)))
    features = centres[cluster_id] + noise * torch.randn(len(cluster_id), dim, generator=generator)
    if shuffle:
        order = torch.randperm(len(cluster_id), generator=generator)
        features, cluster_id = features[order], cluster_id[order]
    return features, cluster_id


@dataclass
class SyntheticResult:
    """Spectral distances of one method on synthetic clusters.

    Attributes:
        method, noise: what was measured.
        tokens_after_step: token count after every step.
        distances: ``[trials][steps]`` spectral distance after each step.
        cross_cluster_fraction: ``[trials]`` share of final tokens holding more than one cluster.
    """

    method: str
    noise: float
    tokens_after_step: list[int]
    distances: list[list[float]]
    cross_cluster_fraction: list[float]

    @property
    def final_distances(self) -> list[float]:
        return [trial[-1] for trial in self.distances]


def mixed_block_fraction(token_map: torch.Tensor, cluster_id: torch.Tensor) -> float:
    """Share of the blocks of ``token_map`` (``[N]``) that hold tokens of more than one cluster."""
    labels, sizes = partition_labels(token_map)
    pairs = torch.unique(torch.stack([labels, cluster_id]), dim=1)  # distinct (block, cluster)
    clusters_per_block = torch.bincount(pairs[0], minlength=len(sizes))
    return (clusters_per_block > 1).float().mean().item()


def synthetic_study(
    methods: Sequence[str],
    noise: float,
    cluster_sizes: Sequence[int] = (120, 50, 20, 6, 3, 1),
    dim: int = 64,
    keep_ratio: float = 0.85,
    num_steps: int = 8,
    trials: int = 5,
    margin: float | None = None,
    per_node: bool = False,
    seed: int = 0,
) -> list[SyntheticResult]:
    """Spectral distance of each method on ``trials`` draws of Gaussian clusters (docs/spectral.md).

    Every method sees the same draws and removes the same number of tokens per step;
    the reference graph is built on the original (unmerged) tokens.
    """
    results = {}
    num_tokens = sum(cluster_sizes)
    for trial in range(trials):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + trial)
        features, cluster_id = gaussian_clusters(cluster_sizes, dim, noise, generator)
        reference = SpectralReference(features)
        for method in methods:
            steps = plan_steps(num_tokens, method, keep_ratio, num_steps, margin=margin)
            maps = simulate_merges(features.unsqueeze(0), steps, generator=generator)
            result = results.setdefault(
                method, SyntheticResult(method, noise, _tokens_after(num_tokens, steps), [], [])
            )
            result.distances.append([reference.distance(m[0], per_node) for m in maps])
            result.cross_cluster_fraction.append(mixed_block_fraction(maps[-1][0], cluster_id))
    return [results[method] for method in methods]


def _tokens_after(num_tokens: int, steps: Sequence[SimStep]) -> list[int]:
    counts, tokens = [], num_tokens
    for step in steps:
        tokens -= step.r
        counts.append(tokens)
    return counts


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample standard deviation, min and max of ``values``."""
    values = list(values)
    count = len(values)
    mean = sum(values) / count
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (count - 1)) if count > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "n": count}


__all__ = [
    "DEGREE_EPS",
    "SIMULATED_METHODS",
    "SimStep",
    "SpectralReference",
    "SyntheticResult",
    "assignment_matrix",
    "averaged_coarse_graph",
    "cosine_distance_graph",
    "decide_sim_step",
    "gaussian_clusters",
    "laplacian_spectrum",
    "lifted_graph",
    "lifted_spectrum",
    "mixed_block_fraction",
    "normalized_laplacian",
    "partition_labels",
    "plan_steps",
    "random_merge",
    "simulate_merges",
    "spectral_distance",
    "summarize",
    "summed_coarse_graph",
    "synthetic_study",
]
