"""Energy scores of PiToMe (paper Eq. 3-4, and the variants of the released code).

A token's energy is the mean over all tokens of a function of its cosine similarity
to them. High energy: the token sits in a large cluster of near-duplicates (a
merge candidate). Low energy: an isolated token (a small object), which is protected.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# The names and the margin schedule are pure arithmetic, kept torch-free in `pitome_mllm.schedule`
# (the command line plans schedules without importing torch); re-exported here as part of the merge API.
from ..config import ENERGY_KINDS
from ..schedule import margin_for_layer  # noqa: F401  (re-exported: pitome_mllm.merge.margin_for_layer)


def energy_from_unit(unit: torch.Tensor, margin: float, alpha: float = 1.0, kind: str = "elu") -> torch.Tensor:
    """Energy of every token.

    Args:
        unit: ``[B, n, C]`` L2-normalised fp32 features.
        margin: the margin ``m``.
        alpha: scale of the bounded negative branch (ELU's alpha).
        kind: ``"elu"`` (released code: ``mean_j ELU_alpha(S_ij - m)``; computed from the
            upper triangle of ``S`` only, see `_elu_energy_symmetric`), ``"paper"``
            (paper Eq. 4: ``S_ij`` itself above the margin) or ``"gaussian"``
            (April-May 2024 code: ``mean_j (2 exp(-((1 - S_ij)/s)^2) - 1) / (s sqrt(2 pi))``,
            ``s = 1 - m``).

    Returns:
        ``[B, n]`` fp32 energies. The diagonal (self-similarity) is included; it adds
        the same constant to every token and so does not change the ranking.
    """
    if kind == "elu":
        return _elu_energy_symmetric(unit, margin, alpha)
    sim = unit @ unit.transpose(-1, -2)  # [B, n, n]
    if kind == "paper":
        above = sim >= margin
        below = torch.expm1(sim - margin).mul_(alpha)
        return torch.where(above, sim, below).mean(dim=-1)
    if kind == "gaussian":
        sigma = 1.0 - margin
        kernel = torch.exp(-(((1.0 - sim) / sigma) ** 2)).mul_(2.0).sub_(1.0)
        return kernel.mean(dim=-1) / (sigma * math.sqrt(2.0 * math.pi))
    raise ValueError(f"energy must be one of {ENERGY_KINDS}, got {kind!r}")


# Rows per strip of `_elu_energy_symmetric`. Smaller strips skip more of the lower
# triangle (the products cost ``(1 + 1 / num_strips) / 2`` of the full matrix's) but
# make smaller, less efficient matrix products and more calls. On CPU (one thread,
# N = 576, B = 1 and 8, C = 64 and 1024) 96 to 144 rows were within a few percent of
# each other and faster than 64 or 192; 128 makes 5 strips of 576 tokens.
STRIP_ROWS = 128


def _elu_energy_symmetric(
    unit: torch.Tensor, margin: float, alpha: float, strip_rows: int = STRIP_ROWS
) -> torch.Tensor:
    """``mean_j ELU_alpha(S_ij - m)`` without building all of ``S = unit @ unit^T``.

    ``S`` is symmetric, so only its upper triangle is computed, one strip of rows at a
    time: strip ``[s, e)`` holds ``S[s:e, s:]``. After the in-place shift and ELU (the
    strip is the only ``O(N^2)`` buffer, and it is small enough to stay in cache), its
    row sums feed rows ``s..e-1``, and the column sums of its right part ``S[s:e, e:]``
    feed rows ``e..n-1``: those are their entries left of the diagonal, by symmetry.
    Every entry of every row is summed once, diagonal included, so the energy is the
    full-matrix one up to fp32 summation order (a few ulp), for a bit over half the
    multiply-adds and half the exponentials.

    Args:
        unit: ``[B, n, C]`` L2-normalised fp32 features.

    Returns:
        ``[B, n]`` fp32 energies.
    """
    batch, num_tokens, _ = unit.shape
    row_sums = unit.new_zeros(batch, num_tokens)
    for start in range(0, num_tokens, strip_rows):
        stop = min(start + strip_rows, num_tokens)
        strip = unit[:, start:stop] @ unit[:, start:].transpose(-1, -2)  # [B, stop - start, n - start]
        strip.sub_(margin)
        F.elu_(strip, alpha=alpha)
        row_sums[:, start:stop] += strip.sum(dim=-1)
        if stop < num_tokens:
            row_sums[:, stop:] += strip[:, :, stop - start :].sum(dim=1)
    return row_sums.div_(num_tokens)


def energy_score(metric: torch.Tensor, margin: float, alpha: float = 1.0, kind: str = "elu") -> torch.Tensor:
    """Energy of every token of ``metric`` (``[B, n, C]``, any float dtype) -> ``[B, n]`` fp32."""
    with torch.no_grad():
        unit = F.normalize(metric.float(), p=2.0, dim=-1)
        return energy_from_unit(unit, margin, alpha, kind)


def check_energy_args(margin: float, alpha: float, kind: str) -> None:
    if kind not in ENERGY_KINDS:
        raise ValueError(f"energy must be one of {ENERGY_KINDS}, got {kind!r}")
    if not math.isfinite(margin):
        raise ValueError(f"margin must be a finite number, got {margin}")
    if kind == "gaussian" and margin >= 1.0:
        raise ValueError(f"the gaussian energy needs margin < 1 (its width is 1 - margin), got {margin}")
    if not (math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha}")
