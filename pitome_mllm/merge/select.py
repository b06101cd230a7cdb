"""Baselines that choose or pool patch tokens to an exact budget (no merging in the tower).

Pure functions on plain tensors (no transformers, no modules): the hooks in
`pitome_mllm.hooks.projector` call them on the patch features LLaVA hands its projector
(class token already dropped), so the projector and the language model only ever see
the ``K`` tokens that are kept.

* random: a uniformly random subset of ``K`` patch positions (`random_keep_indices`).
* pool: adaptive average pooling of the patch grid to an ``h x w`` grid with ``h * w == K``
  (`pool_grid`, `pool_patches`).
* dominant: the ``D`` patches the class token attends to most (`cls_attention`,
  `top_indices`) plus ``K - D`` contextual tokens, each the mean of the remaining patches
  most similar to one of ``K - D`` evenly spaced centres (`contextual_groups`).

Every function works per image: no decision depends on another item of the batch, so a
batch gives the same tokens as its items alone. Kept tokens stay in raster order.

Source maps (``token_map``, ``[B, N]`` for ``N`` patches) say which output token holds each
patch; ``-1`` marks a patch that no output token holds (dropped).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# The budget split of the dominant method: 54 dominant + 10 contextual tokens for 64, the
# same proportion for other budgets (108 + 20 for 128, 162 + 30 for 192).
CONTEXTUAL_SHARE = 10 / 64
# A pooled grid may be at most this much more elongated than the patch grid; budgets without
# such a factorisation (primes above 4, 2 x prime, ...) are refused rather than pooled into strips.
MAX_POOL_ASPECT = 4.0


# ---------------------------------------------------------------------------------- random
def random_keep_indices(num_patches: int, num_keep: int, seed: int) -> torch.Tensor:
    """``[num_keep]`` sorted patch indices drawn uniformly without replacement.

    The draw uses a fresh CPU ``torch.Generator`` seeded with ``seed``, so it is the same on
    every device and in every batch position, and a different seed gives a different subset.
    """
    if not 0 <= num_keep <= num_patches:
        raise ValueError(f"cannot keep {num_keep} of {num_patches} patches")
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randperm(num_patches, generator=generator)[:num_keep].sort().values


def gather_tokens(features: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``features[b, indices[b]]``: ``[B, N, C]`` and ``[B, K]`` -> ``[B, K, C]``."""
    return features.gather(1, indices.unsqueeze(-1).expand(-1, -1, features.shape[-1]))


def kept_token_map(indices: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Source map of a selection: ``[B, K]`` kept patch indices -> ``[B, N]`` (``-1``: dropped)."""
    batch, num_keep = indices.shape
    token_map = torch.full((batch, num_patches), -1, dtype=torch.long, device=indices.device)
    positions = torch.arange(num_keep, device=indices.device).expand(batch, -1)
    return token_map.scatter(1, indices, positions)


# ------------------------------------------------------------------------------------ pool
def square_grid(num_patches: int) -> tuple[int, int]:
    """``(rows, columns)`` of a square patch grid of ``num_patches`` tokens."""
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"pooling needs a square patch grid, got {num_patches} patches")
    return side, side


def pool_grid(num_tokens: int, grid: tuple[int, int], max_aspect: float = MAX_POOL_ASPECT) -> tuple[int, int]:
    """The ``(h, w)`` with ``h * w == num_tokens`` whose shape is closest to ``grid``.

    Closest means the smallest ``|log(h / w) - log(rows / columns)|``; of two equally close
    shapes the one with fewer rows wins (so 128 on a 24 x 24 grid is 8 rows x 16 columns).
    ``h`` and ``w`` may not exceed the grid, and ``h / w`` may differ from the grid's aspect
    by at most ``max_aspect``.

    >>> pool_grid(64, (24, 24)), pool_grid(128, (24, 24)), pool_grid(192, (24, 24))
    ((8, 8), (8, 16), (12, 16))

    Raises:
        ValueError: no factorisation fits (e.g. a prime budget above ``max_aspect``); the
            message names the nearest budgets that do.
    """
    rows, columns = grid

    def fits(h: int, w: int) -> bool:
        return h <= rows and w <= columns and abs(math.log(h / w) - math.log(rows / columns)) <= math.log(max_aspect)

    def shapes(n: int) -> list[tuple[int, int]]:
        return [(h, n // h) for h in range(1, n + 1) if n % h == 0 and fits(h, n // h)]

    candidates = shapes(num_tokens) if num_tokens >= 1 else []
    if not candidates:
        allowed = [n for n in range(1, rows * columns + 1) if shapes(n)]
        nearest = sorted(allowed, key=lambda n: (abs(n - num_tokens), n))[:2]
        raise ValueError(
            f"target_tokens={num_tokens} has no pooled grid on the {rows}x{columns} patch grid "
            f"(h * w == {num_tokens}, h <= {rows}, w <= {columns}, aspect within {max_aspect:g}x of the grid's); "
            f"nearest budgets that have one: {sorted(nearest)}"
        )

    def distance(shape: tuple[int, int]) -> float:
        # Rounded so that mirror-image shapes (12x16, 16x12 on a square grid) tie exactly.
        return round(abs(math.log(shape[0] * columns / (shape[1] * rows))), 12)

    return min(candidates, key=lambda shape: (distance(shape), shape[0]))


def pool_patches(features: torch.Tensor, grid: tuple[int, int], pooled: tuple[int, int]) -> torch.Tensor:
    """Average-pool patch features on their grid: ``[B, rows*columns, C]`` -> ``[B, h*w, C]``.

    ``adaptive_avg_pool2d`` windows: cell ``i`` of ``h`` covers rows
    ``floor(i * rows / h)`` to ``ceil((i + 1) * rows / h) - 1`` (neighbouring windows share a
    row when ``h`` does not divide ``rows``). Averaged in fp32, returned in the input dtype.
    Output tokens are in raster order of the pooled grid.
    """
    batch, num_patches, channels = features.shape
    rows, columns = grid
    if rows * columns != num_patches:
        raise ValueError(f"a {rows}x{columns} grid holds {rows * columns} patches, got {num_patches}")
    image = features.float().transpose(1, 2).reshape(batch, channels, rows, columns)
    pooled_image = F.adaptive_avg_pool2d(image, pooled)
    return pooled_image.flatten(2).transpose(1, 2).to(features.dtype)


def pool_token_map(grid: tuple[int, int], pooled: tuple[int, int]) -> torch.Tensor:
    """``[rows*columns]``: the pooled cell of each patch, ``(r * h // rows) * w + c * w // columns``.

    With overlapping windows a border patch also feeds the next cell; the map names the
    cell whose window starts at or before it, which always contains it.
    """
    rows, columns = grid
    h, w = pooled
    cell_row = torch.arange(rows) * h // rows
    cell_column = torch.arange(columns) * w // columns
    return (cell_row[:, None] * w + cell_column[None, :]).flatten()


# -------------------------------------------------------------------------------- dominant
def dominant_split(num_tokens: int) -> tuple[int, int]:
    """``(dominant, contextual)`` tokens of a budget: ``contextual = round(K * 10 / 64)``.

    At least one contextual token from ``K = 2`` on, none for ``K = 1``.

    >>> dominant_split(64), dominant_split(128), dominant_split(192)
    ((54, 10), (108, 20), (162, 30))
    """
    if num_tokens < 1:
        raise ValueError(f"the dominant method needs a budget >= 1, got {num_tokens}")
    contextual = 0 if num_tokens == 1 else max(1, round(num_tokens * CONTEXTUAL_SHARE))
    return num_tokens - contextual, contextual


def cls_attention(queries: torch.Tensor, keys: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The class token's attention row, averaged over heads: ``softmax(q_0 K^T / sqrt(d))``.

    Args:
        queries, keys: ``[B, N0, C]`` outputs of one layer's query and key projections
            (class token at 0), ``C = num_heads * d``.

    Returns:
        ``[B, N0]`` fp32 attention of the class token to every token (itself included); each
        head's row sums to 1 before the mean. Equals the mean over heads of row 0 of the
        attention probabilities an eager attention implementation returns.
    """
    batch, num_tokens, channels = keys.shape
    head_dim = channels // num_heads
    query_cls = queries[:, 0].float().view(batch, num_heads, 1, head_dim)
    keys_by_head = keys.float().view(batch, num_tokens, num_heads, head_dim).transpose(1, 2)
    logits = (query_cls @ keys_by_head.transpose(-1, -2)).squeeze(2) * head_dim**-0.5  # [B, H, N0]
    return logits.softmax(dim=-1).mean(dim=1)


def top_indices(scores: torch.Tensor, num_keep: int) -> torch.Tensor:
    """``[B, num_keep]`` indices of the highest ``scores`` (``[B, N]``), in ascending index order.

    Ties go to the lower index (stable sort), so the choice does not depend on the backend.
    """
    order = scores.float().argsort(dim=1, descending=True, stable=True)
    return order[:, :num_keep].sort(dim=1).values


def remaining_indices(kept: torch.Tensor, num_patches: int) -> torch.Tensor:
    """``[B, N - K]`` the patch indices not in ``kept`` (``[B, K]``), ascending."""
    batch = kept.shape[0]
    is_kept = torch.zeros(batch, num_patches, dtype=torch.bool, device=kept.device).scatter(1, kept, True)
    # Not-kept patches first, each group in index order.
    order = is_kept.to(torch.int8).argsort(dim=1, stable=True)
    return order[:, : num_patches - kept.shape[1]]


def contextual_groups(metric: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Assign tokens to ``num_groups`` groups by similarity to evenly spaced centres.

    Centres are the tokens at positions ``floor(j * n / num_groups)`` (evenly spread over
    the sequence, i.e. over the image for raster-ordered tokens); every other token joins
    the centre with the highest cosine similarity of ``metric`` (ties: the lower centre).

    Args:
        metric: ``[B, n, C]`` features deciding the grouping.

    Returns:
        ``[B, n]`` group index of every token, in ``[0, num_groups)``.
    """
    batch, num_tokens, _ = metric.shape
    if not 1 <= num_groups <= num_tokens:
        raise ValueError(f"cannot form {num_groups} groups from {num_tokens} tokens")
    centres = torch.arange(num_groups, device=metric.device) * num_tokens // num_groups
    unit = F.normalize(metric.float(), dim=-1)
    similarity = unit @ unit[:, centres].transpose(1, 2)  # [B, n, num_groups]
    groups = similarity.argmax(dim=-1)
    # A centre always belongs to its own group, even if another centre is as similar.
    groups[:, centres] = torch.arange(num_groups, device=metric.device)
    return groups


def group_means(features: torch.Tensor, groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Mean of the features of each group: ``[B, n, C]``, ``[B, n]`` -> ``[B, num_groups, C]`` (fp32 sums)."""
    batch, _, channels = features.shape
    sums = torch.zeros(batch, num_groups, channels, device=features.device, dtype=torch.float32)
    sums.scatter_add_(1, groups.unsqueeze(-1).expand(-1, -1, channels), features.float())
    counts = torch.zeros(batch, num_groups, device=features.device).scatter_add_(
        1, groups, torch.ones_like(groups, dtype=torch.float32)
    )
    return (sums / counts.unsqueeze(-1)).to(features.dtype)


def dominant_and_contextual(
    features: torch.Tensor, patch_attention: torch.Tensor, metric: torch.Tensor, num_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dominant patches by class-token attention plus contextual means of the rest.

    Args:
        features: ``[B, N, C]`` patch features (class token dropped).
        patch_attention: ``[B, N]`` the class token's attention to each patch.
        metric: ``[B, N, C']`` what decides the contextual grouping (e.g. keys).
        num_tokens: the budget ``K <= N``, split by `dominant_split`.

    Returns:
        ``([B, K, C], [B, N])``: the ``D`` dominant patches in raster order followed by the
        ``K - D`` contextual tokens (ordered by their centre's position), and the source map
        (every patch is held by exactly one output token).
    """
    batch, num_patches, _ = features.shape
    num_dominant, num_contextual = dominant_split(num_tokens)
    dominant = top_indices(patch_attention, num_dominant)
    token_map = kept_token_map(dominant, num_patches)
    kept = gather_tokens(features, dominant)
    if num_contextual == 0:
        return kept, token_map
    rest = remaining_indices(dominant, num_patches)
    groups = contextual_groups(gather_tokens(metric, rest), num_contextual)
    contextual = group_means(gather_tokens(features, rest), groups, num_contextual)
    token_map = token_map.scatter(1, rest, num_dominant + groups)
    return torch.cat([kept, contextual], dim=1), token_map


__all__ = [
    "CONTEXTUAL_SHARE",
    "MAX_POOL_ASPECT",
    "cls_attention",
    "contextual_groups",
    "dominant_and_contextual",
    "dominant_split",
    "gather_tokens",
    "group_means",
    "kept_token_map",
    "pool_grid",
    "pool_patches",
    "pool_token_map",
    "random_keep_indices",
    "remaining_indices",
    "square_grid",
    "top_indices",
]
