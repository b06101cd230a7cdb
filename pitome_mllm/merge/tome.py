"""ToMe's bipartite soft matching (Bolya et al., ICLR 2023; docs/algorithm.md §4).

Used as the baseline method and, in the authors' released LLaVA code, for the
first half of the CLIP layers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._checks import check_metric, check_r
from .plan import Merge, identity_merge


def bipartite_soft_matching(metric: torch.Tensor, r: int, class_token: bool = False) -> Merge:
    """Decide one bipartite-soft-matching step.

    A = tokens at even positions, B = tokens at odd positions. Every A token finds
    its most similar B token; the ``r`` A tokens with the most similar partners are
    merged into them. A class token (position 0, in A) is never merged.

    Args:
        metric: ``[B, N, C]`` features that decide the merge (any float dtype).
        r: tokens to remove, ``0 <= r <= ceil(N/2)`` (minus one with a class token).
        class_token: position 0 is a class token.

    Returns:
        A `Merge` whose output order is ``[unmerged A tokens in position order
        (class token first), all B tokens in position order]``.
    """
    check_metric(metric)
    batch, num_tokens, _ = metric.shape
    num_a, num_b = math.ceil(num_tokens / 2), num_tokens // 2
    max_r = min(num_a - (1 if class_token else 0), num_a if num_b > 0 else 0)
    r = check_r(r, max_r, f"a bipartite matching step over {num_tokens} tokens")
    if r == 0:
        return identity_merge(batch, num_tokens, metric.device)

    with torch.no_grad():
        unit = F.normalize(metric.float(), p=2.0, dim=-1)
        scores = unit[:, 0::2] @ unit[:, 1::2].transpose(-1, -2)  # [B, |A|, |B|]
        if class_token:
            scores[:, 0, :] = -math.inf
        best_score, best_b = scores.max(dim=-1)  # [B, |A|]
        edge_order = torch.sort(best_score, dim=-1, descending=True, stable=True).indices
        src_a = edge_order[:, :r]  # positions within A, merged away
        unmerged_a = edge_order[:, r:].sort(dim=-1).values  # position order
        dst_pos = best_b.gather(1, src_a)

        device = metric.device
        dst_idx = (torch.arange(num_b, device=device) * 2 + 1).expand(batch, num_b)
        return Merge(unmerged_a * 2, dst_idx, src_a * 2, dst_pos, num_tokens)
