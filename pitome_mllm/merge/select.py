"""Baselines that choose or pool patch tokens to an exact budget (no merging in the tower).

Pure functions on plain tensors (no transformers, no modules): the hooks in
`pitome_mllm.hooks.projector` call them on the patch features LLaVA hands its projector
(class token already dropped), so the projector and the language model only ever see
the ``K`` tokens that are kept.

* random: a uniformly random subset of ``K`` patch positions (`random_keep_indices`).
* pool: adaptive average pooling of the patch grid to an ``h x w`` grid with ``h * w == K``
  (`pool_grid`, `pool_patches`).
* dominant (VisionZip): the ``D`` patches the class token attends to most (`cls_attention`,
  `top_indices`) plus ``K - D`` contextual tokens, each the mean of the remaining patches
  most similar to one of ``K - D`` evenly spaced centres (`contextual_groups`).
* fastervlm: the ``K`` patches the class token attends to most (`top_indices`).
* divprune: a greedy max-min diverse subset under cosine distance (`farthest_point_indices`).
* cdpruner: the greedy MAP subset of a DPP whose kernel is similarity scaled by each token's
  relevance to the prompt (`instruction_relevance`, `conditional_kernel`, `dpp_greedy_map`).
* the ``mllm`` preset of PiToMe: keep the lowest-energy patches and those the class token
  attends to most (`energy_and_attention_keep`), merge every other patch into its most
  similar kept one (`merge_into_kept`).

Every function works per image: no decision depends on another item of the batch, so a
batch gives the same tokens as its items alone. Kept tokens stay in raster order.

Source maps (``token_map``, ``[B, N]`` for ``N`` patches) say which output token holds each
patch; ``-1`` marks a patch that no output token holds (dropped).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .energy import energy_score
from .plan import gather_tokens

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
    return torch.tensor(_random_keep_positions(num_patches, num_keep, int(seed)), dtype=torch.long)


@torch.compiler.assume_constant_result
def _random_keep_positions(num_patches: int, num_keep: int, seed: int) -> tuple[int, ...]:
    """The positions of `random_keep_indices`, as a tuple of ints.

    They depend on the three integers alone, so ``torch.compile`` takes them as a constant of the
    graph instead of stopping at the generator it cannot trace.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return tuple(torch.randperm(num_patches, generator=generator)[:num_keep].sort().values.tolist())


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


def assign_to_nearest(metric: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Group every token with the centre whose ``metric`` is most cosine-similar (ties: the lower centre).

    Args:
        metric: ``[B, n, C]`` features deciding the grouping.
        centres: ``[B, g]`` token positions of the centres (distinct within a row).

    Returns:
        ``[B, n]`` group index of every token, in ``[0, g)``; a centre always heads its own group.
    """
    unit = F.normalize(metric.float(), dim=-1)
    similarity = unit @ gather_tokens(unit, centres).transpose(1, 2)  # [B, n, g]
    groups = similarity.argmax(dim=-1)
    # A centre belongs to its own group even if another centre is as similar.
    own = torch.arange(centres.shape[1], device=metric.device).expand_as(centres)
    return groups.scatter(1, centres, own)


def contextual_groups(metric: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Assign tokens to ``num_groups`` groups by similarity to evenly spaced centres.

    Centres are the tokens at positions ``floor(j * n / num_groups)`` (evenly spread over
    the sequence, i.e. over the image for raster-ordered tokens); every other token joins
    the centre with the highest cosine similarity of ``metric`` (`assign_to_nearest`).

    Args:
        metric: ``[B, n, C]`` features deciding the grouping.

    Returns:
        ``[B, n]`` group index of every token, in ``[0, num_groups)``.
    """
    batch, num_tokens, _ = metric.shape
    if not 1 <= num_groups <= num_tokens:
        raise ValueError(f"cannot form {num_groups} groups from {num_tokens} tokens")
    centres = torch.arange(num_groups, device=metric.device) * num_tokens // num_groups
    return assign_to_nearest(metric, centres.expand(batch, -1))


def group_means(
    features: torch.Tensor, groups: torch.Tensor, num_groups: int, size: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean of the features of each group: ``[B, n, C]``, ``[B, n]`` -> ``[B, num_groups, C]`` (fp32 sums).

    ``size`` (``[B, n, 1]``, patches each token holds) weighs the mean; None weighs every token 1.
    A group of one token returns that token bit for bit.
    """
    batch, _, channels = features.shape
    weight = torch.ones_like(groups, dtype=torch.float32) if size is None else size[..., 0].float()
    weighted = features.float() if size is None else features.float() * weight.unsqueeze(-1)
    sums = torch.zeros(batch, num_groups, channels, device=features.device, dtype=torch.float32)
    sums.scatter_add_(1, groups.unsqueeze(-1).expand(-1, -1, channels), weighted)
    totals = torch.zeros(batch, num_groups, device=features.device).scatter_add_(1, groups, weight)
    return (sums / totals.unsqueeze(-1)).to(features.dtype)


def with_group_mean_gradient(tokens: torch.Tensor, features: torch.Tensor, token_map: torch.Tensor) -> torch.Tensor:
    """``tokens`` unchanged in value, with the gradient of each token as the mean of the patches it holds.

    The projector-stage methods decide without gradient (which patches, which groups); what they
    return is, for every method, each output token the plain mean of the patches ``token_map``
    gives it (one patch for a selection). Rebuilding those means from ``features`` lets the
    gradient reach the tower, and adding them as ``means - means.detach()`` (exactly zero) keeps
    the forward values bit for bit.

    Args:
        tokens: ``[B, K, C]`` what the method returned (no gradient).
        features: ``[B, N, C]`` the patch features it chose from (with gradient).
        token_map: ``[B, N]`` the output token holding each patch, ``-1`` for a dropped one.
    """
    held = (token_map >= 0).to(features.dtype)
    groups = token_map.clamp(min=0)
    batch, num_tokens, channels = tokens.shape
    sums = features.new_zeros(batch, num_tokens, channels)
    sums = sums.scatter_add(1, groups.unsqueeze(-1).expand(-1, -1, channels), features * held.unsqueeze(-1))
    counts = features.new_zeros(batch, num_tokens).scatter_add(1, groups, held).clamp(min=1)
    means = sums / counts.unsqueeze(-1)
    return tokens + (means - means.detach())


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
        (every patch is held by exactly one output token). ``K == N`` returns the features unchanged.
    """
    batch, num_patches, _ = features.shape
    if num_tokens >= num_patches:
        # Keep-all: every contextual group would hold one patch, so only the order would change; keep raster order.
        return features, torch.arange(num_patches, device=features.device).expand(batch, -1).clone()
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


# ------------------------------------------------------------------------------- divprune
def cosine_distance(features: torch.Tensor) -> torch.Tensor:
    """``[B, N, N]`` fp32 ``1 - cos(x_i, x_j)`` of ``features`` (``[B, N, C]``)."""
    unit = F.normalize(features.float(), dim=-1)
    return 1.0 - unit @ unit.transpose(1, 2)


def farthest_point_indices(features: torch.Tensor, num_keep: int) -> torch.Tensor:
    """Greedy max-min diverse subset (DivPrune): ``[B, N, C]`` -> ``[B, num_keep]`` ascending indices.

    The max-min diversity problem asks for the subset whose smallest pairwise cosine distance
    is largest; the greedy solution starts from the token farthest from its nearest neighbour
    (the most isolated one), then repeatedly adds the token whose distance to the nearest
    already chosen token is largest. Ties go to the lower index (``argmax``'s first maximum).
    """
    batch, num_tokens, _ = features.shape
    if not 1 <= num_keep <= num_tokens:
        raise ValueError(f"cannot keep {num_keep} of {num_tokens} tokens")
    distance = cosine_distance(features)  # [B, N, N]
    rows = torch.arange(batch, device=features.device)
    # The diagonal (distance 0 to itself) must not count as a token's nearest neighbour.
    off_diagonal = distance + torch.diag_embed(torch.full((batch, num_tokens), float("inf"), device=features.device))
    chosen = [off_diagonal.amin(dim=2).argmax(dim=1)] if num_tokens > 1 else [torch.zeros_like(rows)]
    nearest_chosen = distance[rows, chosen[0]].clone()  # [B, N]: distance to the closest chosen token
    taken = torch.zeros(batch, num_tokens, dtype=torch.bool, device=features.device)
    taken[rows, chosen[0]] = True
    for _ in range(num_keep - 1):
        candidate = nearest_chosen.masked_fill(taken, float("-inf")).argmax(dim=1)
        chosen.append(candidate)
        taken[rows, candidate] = True
        nearest_chosen = torch.minimum(nearest_chosen, distance[rows, candidate])
    return torch.stack(chosen, dim=1).sort(dim=1).values


# ------------------------------------------------------------------------------- cdpruner
# CDPruner weighs relevance against diversity with theta (0.5 in its experiments); the quality
# of a token is exp(theta * relevance / (2 * (1 - theta))), the trade-off of Chen et al. (2018).
CDPRUNER_THETA = 0.5
# A kernel whose remaining gains fall below this has no direction left to add (fewer feature
# dimensions than the budget): the rest of the budget then goes by relevance.
DPP_GAIN_FLOOR = 1e-6


def instruction_relevance(visual: torch.Tensor, instructions: list[torch.Tensor]) -> torch.Tensor:
    """``[B, N]`` relevance of each visual token to its image's instruction, min-max scaled to [0, 1].

    Args:
        visual: ``[B, N, D]`` visual tokens in the space of the instruction embeddings.
        instructions: ``B`` tensors ``[T_b, D]``, the embeddings of image ``b``'s instruction.

    The raw relevance is the mean over instruction tokens of the cosine similarity; an image
    whose tokens are all equally relevant gets relevance 0 everywhere.
    """
    if len(instructions) != visual.shape[0]:
        raise ValueError(f"{visual.shape[0]} images need as many instructions, got {len(instructions)}")
    unit = F.normalize(visual.float(), dim=-1)
    raw = torch.stack(
        [unit[b] @ F.normalize(text.float(), dim=-1).mean(dim=0) for b, text in enumerate(instructions)]
    )  # mean of cosines == cosine with the mean of the unit text vectors, scaled
    low, high = raw.amin(dim=1, keepdim=True), raw.amax(dim=1, keepdim=True)
    return (raw - low) / (high - low).clamp(min=torch.finfo(torch.float32).tiny)


def conditional_kernel(features: torch.Tensor, relevance: torch.Tensor, theta: float = CDPRUNER_THETA) -> torch.Tensor:
    """``[B, N, N]`` DPP kernel ``diag(q) S diag(q)``: cosine similarity ``S`` conditioned on relevance.

    ``q = exp(theta * relevance / (2 (1 - theta)))``; ``theta = 0`` gives the unconditioned
    similarity kernel. ``features``: ``[B, N, C]``; ``relevance``: ``[B, N]``.
    """
    if not 0.0 <= theta < 1.0:
        raise ValueError(f"theta must be in [0, 1), got {theta}")
    unit = F.normalize(features.float(), dim=-1)
    quality = torch.exp(relevance.float() * (theta / (2.0 * (1.0 - theta))))
    return quality.unsqueeze(2) * (unit @ unit.transpose(1, 2)) * quality.unsqueeze(1)


def dpp_greedy_map(kernel: torch.Tensor, num_keep: int) -> torch.Tensor:
    """Greedy MAP subset of a DPP: ``[B, N, N]`` PSD kernel -> ``[B, num_keep]`` ascending indices.

    Each step adds the token that multiplies ``det(L_S)`` the most, i.e. the largest residual
    variance ``d_i^2 = L_ii - |c_i|^2`` after projecting out the chosen tokens; the residuals
    are updated incrementally as in a pivoted Cholesky factorisation (Chen et al., 2018), so a
    step costs ``O(N k)``. Ties go to the lower index. When no residual is above
    `DPP_GAIN_FLOOR` (the kernel's rank is spent), the remaining tokens go by ``L_ii``.
    """
    batch, num_tokens, _ = kernel.shape
    if not 1 <= num_keep <= num_tokens:
        raise ValueError(f"cannot keep {num_keep} of {num_tokens} tokens")
    kernel = kernel.float()
    rows = torch.arange(batch, device=kernel.device)
    diagonal = kernel.diagonal(dim1=1, dim2=2)
    residual = diagonal.clone()  # [B, N] d_i^2
    factors = kernel.new_zeros(batch, num_keep, num_tokens)  # row t: c_i's t-th entry for every token
    taken = torch.zeros(batch, num_tokens, dtype=torch.bool, device=kernel.device)
    # Below any real gain, ordered by the diagonal (relevance) among themselves.
    spent = -2.0 + diagonal / diagonal.amax(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
    chosen = []
    for step in range(num_keep):
        gain = torch.where(residual > DPP_GAIN_FLOOR, residual, spent).masked_fill(taken, float("-inf"))
        pick = gain.argmax(dim=1)  # [B]
        chosen.append(pick)
        taken[rows, pick] = True
        if step == num_keep - 1:
            break
        pick_residual = residual[rows, pick]
        usable = pick_residual > DPP_GAIN_FLOOR
        projection = torch.einsum("bt,btn->bn", factors[rows, :step, pick], factors[:, :step])
        update = (kernel[rows, pick] - projection) / pick_residual.clamp(min=DPP_GAIN_FLOOR).sqrt().unsqueeze(1)
        update = update * usable.unsqueeze(1)  # a spent pick adds no direction
        factors[:, step] = update
        residual = residual - update.square()
    return torch.stack(chosen, dim=1).sort(dim=1).values


# ----------------------------------------------------------------------- mllm (select-merge)
def energy_attention_split(num_tokens: int, energy_share: float) -> tuple[int, int]:
    """``(kept by energy, kept by class-token attention)`` of a budget: ``round(K * energy_share)`` by energy.

    Halves round up (``math.floor(x + 0.5)``), so 0.5 of 5 keeps 3 by energy.

    >>> energy_attention_split(64, 0.5), energy_attention_split(64, 0.25), energy_attention_split(1, 0.5)
    ((32, 32), (16, 48), (1, 0))
    """
    if num_tokens < 1:
        raise ValueError(f"the budget must be >= 1, got {num_tokens}")
    if not 0.0 <= energy_share <= 1.0:
        raise ValueError(f"energy_share must be in [0, 1], got {energy_share}")
    by_energy = min(num_tokens, math.floor(num_tokens * energy_share + 0.5))
    return by_energy, num_tokens - by_energy


def energy_and_attention_keep(
    token_energy: torch.Tensor, patch_attention: torch.Tensor, num_by_energy: int, num_by_attention: int
) -> torch.Tensor:
    """``[B, k_e + k_a]`` ascending indices: the ``k_e`` lowest-energy tokens, then the ``k_a`` the class
    token attends to most among the others (``[B, N]`` scores each; ties to the lower index)."""
    by_energy = top_indices(-token_energy, num_by_energy)
    attention = patch_attention.float().scatter(1, by_energy, float("-inf"))
    by_attention = top_indices(attention, num_by_attention)
    return torch.cat([by_energy, by_attention], dim=1).sort(dim=1).values


def merge_into_kept(
    features: torch.Tensor, metric: torch.Tensor, kept: torch.Tensor, size: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge every token into its most similar kept token (cosine of ``metric``), size-weighted.

    Args:
        features: ``[B, N, C]``; metric: ``[B, N, C']``; kept: ``[B, K]`` ascending positions.
        size: ``[B, N, 1]`` patches each token holds (None: 1 each).

    Returns:
        ``([B, K, C], [B, N])``: the kept tokens in raster order, each the size-weighted mean
        of itself and the tokens merged into it, and the source map. ``K == N`` returns the
        features unchanged.
    """
    groups = assign_to_nearest(metric, kept)
    return group_means(features, groups, kept.shape[1], size), groups


def select_then_merge(
    features: torch.Tensor,
    metric: torch.Tensor,
    patch_attention: torch.Tensor,
    num_tokens: int,
    *,
    energy_share: float,
    margin: float,
    alpha: float = 1.0,
    energy: str = "elu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``mllm`` preset: keep isolated and attended tokens, merge the rest into them.

    Args:
        features: ``[B, N, C]`` patch features; metric: ``[B, N, C']`` what energy and merging
            are decided on; patch_attention: ``[B, N]`` the class token's attention.
        num_tokens: the budget ``K <= N``, split by `energy_attention_split`.
        energy_share, margin, alpha, energy: PiToMe's energy of the kept-by-energy part.

    Returns:
        ``([B, K, C], [B, N])`` as `merge_into_kept`.
    """
    num_by_energy, num_by_attention = energy_attention_split(num_tokens, energy_share)
    token_energy = energy_score(metric, margin, alpha, energy)
    kept = energy_and_attention_keep(token_energy, patch_attention, num_by_energy, num_by_attention)
    return merge_into_kept(features, metric, kept)


__all__ = [
    "CDPRUNER_THETA",
    "CONTEXTUAL_SHARE",
    "DPP_GAIN_FLOOR",
    "assign_to_nearest",
    "conditional_kernel",
    "cosine_distance",
    "dpp_greedy_map",
    "energy_and_attention_keep",
    "energy_attention_split",
    "farthest_point_indices",
    "instruction_relevance",
    "merge_into_kept",
    "select_then_merge",
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
