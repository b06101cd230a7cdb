"""Means and paired differences of per-item scores over seeds, with standard errors.

Both proxies score items (test questions, test images) with 0/1 hits, and repeat the scoring
over seeds (training seeds of the easy-VQA mini-LLaVA; the selection seed of ``random`` in the
fidelity proxy). The same items are scored under every seed, so a setting's hits form a
``seeds x items`` matrix, and the hits of two settings on the same items and seeds pair up.

Standard error (`crossed_standard_error`): seeds and items are two *crossed* random factors.
With ``x[s][i] = mu + a_s + b_i + e_si`` the grand mean has variance
``var(a) / S + var(b) / I + var(e) / (S * I)``; the three components come from the two-way
ANOVA mean squares (negative estimates clamped to 0). This counts both what another draw of
test items and what another training seed would change. With one seed it is the usual
``sd / sqrt(I)`` over items, with one item ``sd / sqrt(S)`` over seeds.

For a paired difference the matrix is ``hits(a) - hits(b)`` item by item and seed by seed:
per-item pairing removes the between-item variance that two unpaired means would carry, and
the seed term keeps a method-by-seed interaction (a ranking that flips between training seeds)
in the error instead of hiding it.

Hits are ``{seed: {item: value}}``; a setting that does not depend on the seed (a deterministic
method of the fidelity proxy) is given under every seed with the same values, which leaves its
seed variance at exactly 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# {seed: {item id: score}}: one setting at one budget.
SeedHits = Mapping[int, Mapping[int, float]]


@dataclass(frozen=True)
class Estimate:
    """A mean over a ``seeds x items`` matrix and its standard errors.

    Attributes:
        mean: the grand mean.
        se: `crossed_standard_error` (seeds and items both random): the error to compare with.
        item_se: the error over items alone, ``sd(per-item means over seeds) / sqrt(items)``
            (seeds taken as fixed); 0 with one item.
        per_seed: the mean of each seed's row, in ``seeds`` order.
        seeds: the seeds used (those common to everything compared).
        items: how many items each seed contributes.
    """

    mean: float
    se: float
    item_se: float
    per_seed: tuple[float, ...]
    seeds: tuple[int, ...]
    items: int

    def z(self) -> float:
        """``mean / se`` (inf or -inf for a nonzero mean with se 0, 0 for a zero mean)."""
        if self.se > 0:
            return self.mean / self.se
        return 0.0 if self.mean == 0 else math.copysign(math.inf, self.mean)

    def to_dict(self) -> dict:
        return {
            "mean": self.mean,
            "se": self.se,
            "item_se": self.item_se,
            "per_seed": list(self.per_seed),
            "seeds": list(self.seeds),
            "items": self.items,
        }


def _check_matrix(matrix: Sequence[Sequence[float]]) -> tuple[int, int]:
    if not matrix or not matrix[0]:
        raise ValueError("need at least one seed and one item")
    widths = {len(row) for row in matrix}
    if len(widths) != 1:
        raise ValueError(f"every seed must score the same items; row lengths {sorted(widths)}")
    seeds, items = len(matrix), widths.pop()
    if seeds == 1 and items == 1:
        raise ValueError("a standard error needs at least two seeds or two items")
    return seeds, items


def _variance(values: Sequence[float]) -> float:
    """Sample variance (``n - 1`` denominator) of at least two values."""
    mean = sum(values) / len(values)
    return sum((value - mean) ** 2 for value in values) / (len(values) - 1)


def crossed_standard_error(matrix: Sequence[Sequence[float]]) -> float:
    """Standard error of the grand mean of ``matrix`` (``seeds x items``), both factors random.

    Raises:
        ValueError: an empty or ragged matrix, or a single cell.
    """
    seeds, items = _check_matrix(matrix)
    row_means = [sum(row) / items for row in matrix]
    column_means = [sum(row[i] for row in matrix) / seeds for i in range(items)]
    if seeds == 1:
        return math.sqrt(_variance(matrix[0]) / items)
    if items == 1:
        return math.sqrt(_variance([row[0] for row in matrix]) / seeds)
    grand = sum(row_means) / seeds
    ms_seed = items * sum((mean - grand) ** 2 for mean in row_means) / (seeds - 1)
    ms_item = seeds * sum((mean - grand) ** 2 for mean in column_means) / (items - 1)
    residual = sum(
        (matrix[s][i] - row_means[s] - column_means[i] + grand) ** 2 for s in range(seeds) for i in range(items)
    )
    ms_residual = residual / ((seeds - 1) * (items - 1))
    var_seed = max(0.0, (ms_seed - ms_residual) / items)
    var_item = max(0.0, (ms_item - ms_residual) / seeds)
    return math.sqrt(var_seed / seeds + var_item / items + ms_residual / (seeds * items))


def estimate(matrix: Sequence[Sequence[float]], seeds: Sequence[int]) -> Estimate:
    """`Estimate` of a ``seeds x items`` matrix whose rows belong to ``seeds``."""
    num_seeds, items = _check_matrix(matrix)
    if len(seeds) != num_seeds:
        raise ValueError(f"{num_seeds} rows but {len(seeds)} seeds")
    per_seed = tuple(sum(row) / items for row in matrix)
    column_means = [sum(row[i] for row in matrix) / num_seeds for i in range(items)]
    return Estimate(
        mean=sum(per_seed) / num_seeds,
        se=crossed_standard_error(matrix),
        item_se=math.sqrt(_variance(column_means) / items) if items > 1 else 0.0,
        per_seed=per_seed,
        seeds=tuple(seeds),
        items=items,
    )


def common_grid(*settings: SeedHits) -> tuple[list[int], list[int]]:
    """Seeds present in every setting, and the items every one of them scored under all of those seeds.

    Raises:
        ValueError: no common seed or no common item (nothing can be paired).
    """
    seeds = sorted(set.intersection(*(set(hits) for hits in settings)))
    if not seeds:
        raise ValueError(f"no seed in common (seeds: {[sorted(hits) for hits in settings]})")
    items = set.intersection(*(set(hits[seed]) for hits in settings for seed in seeds))
    if not items:
        raise ValueError(f"no item scored by every setting under seeds {seeds}")
    return seeds, sorted(items)


def mean_estimate(hits: SeedHits) -> Estimate:
    """Mean score of one setting over its seeds and the items every seed scored."""
    seeds, items = common_grid(hits)
    return estimate([[hits[seed][item] for item in items] for seed in seeds], seeds)


def paired_difference(a: SeedHits, b: SeedHits) -> Estimate:
    """``a - b`` paired by seed and item, over the seeds and items both scored."""
    seeds, items = common_grid(a, b)
    return estimate([[a[seed][item] - b[seed][item] for item in items] for seed in seeds], seeds)


def broadcast_seeds(hits: Mapping[int, float], seeds: Sequence[int]) -> dict[int, dict[int, float]]:
    """A seed-independent setting's ``{item: score}`` as ``{seed: {item: score}}`` for ``seeds``."""
    return {seed: dict(hits) for seed in seeds}
