"""Energy scores of PiToMe (paper Eq. 3-4, and the variants of the released code).

A token's energy is the mean over all tokens of a function of its cosine similarity
to them. High energy: the token sits in a large cluster of near-duplicates (a
merge candidate). Low energy: an isolated token (a small object), which is protected.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ENERGY_KINDS = ("elu", "paper", "gaussian")


def margin_for_layer(layer_idx: int, num_layers: int, start: float = 0.9, span: float = 0.9) -> float:
    """The adaptive margin ``m_l = start - span * l / L`` (0-based ``l``).

    It *decreases* with depth, as in the authors' code (the paper's text calls it
    "increasing" but its formula decreases; see spec pitfall 4).
    """
    return start - span * layer_idx / num_layers


def energy_from_unit(unit: torch.Tensor, margin: float, alpha: float = 1.0, kind: str = "elu") -> torch.Tensor:
    """Energy of every token.

    Args:
        unit: ``[B, n, C]`` L2-normalised fp32 features.
        margin: the margin ``m``.
        alpha: scale of the bounded negative branch (ELU's alpha).
        kind: ``"elu"`` (released code: ``mean_j ELU_alpha(S_ij - m)``), ``"paper"``
            (paper Eq. 4: ``S_ij`` itself above the margin) or ``"gaussian"``
            (April-May 2024 code: ``mean_j (2 exp(-((1 - S_ij)/s)^2) - 1) / (s sqrt(2 pi))``,
            ``s = 1 - m``).

    Returns:
        ``[B, n]`` fp32 energies. The diagonal (self-similarity) is included; it adds
        the same constant to every token and so does not change the ranking.
    """
    sim = unit @ unit.transpose(-1, -2)  # [B, n, n]
    if kind == "elu":
        # In place: the N x N similarity is the only large buffer of the step.
        sim.sub_(margin)
        F.elu_(sim, alpha=alpha)
        return sim.mean(dim=-1)
    if kind == "paper":
        above = sim >= margin
        below = torch.expm1(sim - margin).mul_(alpha)
        return torch.where(above, sim, below).mean(dim=-1)
    if kind == "gaussian":
        sigma = 1.0 - margin
        kernel = torch.exp(-(((1.0 - sim) / sigma) ** 2)).mul_(2.0).sub_(1.0)
        return kernel.mean(dim=-1) / (sigma * math.sqrt(2.0 * math.pi))
    raise ValueError(f"energy must be one of {ENERGY_KINDS}, got {kind!r}")


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
