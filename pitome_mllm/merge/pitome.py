"""One PiToMe step (paper §3.2, Alg. 1; the released code's behaviour, docs/algorithm.md §3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import check_metric, check_r
from .energy import check_energy_args, energy_from_unit
from .plan import Merge, gather_tokens, identity_merge


def _descending_order(values: torch.Tensor) -> torch.Tensor:
    """Indices sorting ``values`` (``[B, n]``) high to low; ties keep the lower index first.

    A stable sort makes the plan independent of the backend's sort algorithm
    (the authors' unstable ``argsort`` is not; docs/algorithm.md §3).
    """
    return torch.sort(values, dim=-1, descending=True, stable=True).indices


def pitome(
    metric: torch.Tensor,
    r: int,
    margin: float,
    alpha: float = 1.0,
    class_token: bool = False,
    energy: str = "elu",
) -> Merge:
    """Decide one PiToMe step.

    1. Cosine similarities of the tokens (fp32), energy of every token (``energy``).
    2. Sort by energy, highest first; the top ``2r`` are mergeable, the rest protected.
    3. Split the mergeable tokens alternately: energy ranks 1, 3, 5, ... form A,
       ranks 2, 4, 6, ... form B (``|A| = |B| = r``).
    4. Every A token merges into its most similar B token (ties: the first).

    Args:
        metric: ``[B, N, C]`` features that decide the merge (any float dtype).
        r: tokens to remove, ``0 <= r <= n // 2`` with ``n`` the non-class tokens.
        margin: energy margin ``m`` of this layer.
        alpha: ELU alpha of the energy.
        class_token: index 0 is a class token: left out of the graph, never merged,
            kept at output index 0.
        energy: ``"elu"`` (default, released code), ``"paper"`` or ``"gaussian"``.

    Returns:
        A `Merge` whose output order is ``[CLS], protected (descending energy),
        B tokens (descending energy)``.
    """
    check_metric(metric)
    check_energy_args(margin, alpha, energy)
    batch, num_tokens, _ = metric.shape
    offset = 1 if class_token else 0
    num_graph = num_tokens - offset
    r = check_r(r, num_graph // 2, f"a PiToMe step over {num_graph} tokens (at most half of them)")
    if r == 0:
        return identity_merge(batch, num_tokens, metric.device)

    with torch.no_grad():
        unit = F.normalize(metric[:, offset:].float(), p=2.0, dim=-1)  # [B, n, C]
        token_energy = energy_from_unit(unit, margin, alpha, energy)  # [B, n]
        order = _descending_order(token_energy)
        a_idx = order[:, 0 : 2 * r : 2]  # [B, r]
        b_idx = order[:, 1 : 2 * r : 2]  # [B, r]
        protected_idx = order[:, 2 * r :]  # [B, n - 2r]

        unit_a = gather_tokens(unit, a_idx)  # [B, r, C]
        unit_b = gather_tokens(unit, b_idx)  # [B, r, C]
        # Only the r x r block of A-B similarities is needed here: recomputing it is
        # cheaper than keeping the full N x N matrix alive next to the energy buffer.
        dst_pos = (unit_a @ unit_b.transpose(-1, -2)).argmax(dim=-1)  # [B, r]

        kept = protected_idx + offset
        if class_token:
            cls = torch.zeros(batch, 1, dtype=torch.long, device=metric.device)
            kept = torch.cat([cls, kept], dim=1)
        return Merge(kept, b_idx + offset, a_idx + offset, dst_pos, num_tokens)
