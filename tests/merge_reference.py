"""Naive reference implementations of one PiToMe step and one bipartite-soft-matching step.

Written from the description in docs/algorithm.md (§3 and §4), one batch item
at a time, with Python lists for every decision, so that the tests have an oracle
that shares no code with `pitome_mllm.merge`. The similarities are what that description
fixes, fp32 cosines (one matrix product per item); the energy terms are evaluated
elementwise in float64 from them; every decision (sorting, splitting, matching,
selecting) is made on Python lists and floats.

A step is described by its *groups*: for every output token, the sorted list of the
input positions it holds, plus the *lead* position (the token whose slot it takes:
a kept token or a destination). The merged features of a group are its plain mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class ReferenceStep:
    """The outcome of one reference step.

    Attributes:
        leads: per batch item, per output token, the input position it is built on.
        groups: per batch item, per output token, the sorted input positions it holds.
        energies: per batch item, the energy of every graph token (PiToMe only).
        orders: per batch item, the graph tokens by descending energy (PiToMe only).
    """

    leads: list[list[int]]
    groups: list[list[list[int]]]
    energies: list[list[float]] | None = None
    orders: list[list[int]] | None = None

    def output_position(self) -> torch.Tensor:
        """``[B, N]``: for every input position, the output token holding it."""
        rows = []
        for groups in self.groups:
            position = {}
            for out_idx, group in enumerate(groups):
                for member in group:
                    assert member not in position, f"input {member} is in two groups"
                    position[member] = out_idx
            rows.append([position[i] for i in range(len(position))])
        return torch.tensor(rows, dtype=torch.long)

    def reduce(self, x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        """Apply the step to ``x`` (``[B, N, C]``) group by group -> ``[B, N - r, C]``.

        ``mean``/``sum`` are computed in float64 and cast back to ``x.dtype``;
        ``amax``/``amin`` pick elementwise extremes; ``prune`` keeps each lead unchanged.
        """
        out = []
        for item, (leads, groups) in enumerate(zip(self.leads, self.groups, strict=True)):
            rows = []
            for lead, group in zip(leads, groups, strict=True):
                members = x[item, group].double()  # [size, C]
                if mode == "mean":
                    rows.append(members.sum(dim=0) / len(group))
                elif mode == "sum":
                    rows.append(members.sum(dim=0))
                elif mode == "amax":
                    rows.append(members.max(dim=0).values)
                elif mode == "amin":
                    rows.append(members.min(dim=0).values)
                elif mode == "prune":
                    rows.append(x[item, lead].double())
                else:
                    raise ValueError(f"unknown reduce mode {mode!r}")
            out.append(torch.stack(rows))
        return torch.stack(out).to(x.dtype)


# ------------------------------------------------------------------ helpers
def _unit_rows(features: torch.Tensor) -> torch.Tensor:
    """``[n, C]`` -> the rows scaled to unit length, in fp32 (zero rows stay zero)."""
    features = features.float()
    norms = torch.sqrt((features * features).sum(dim=1, keepdim=True))
    return features / torch.clamp(norms, min=1e-12)


def _cosine_table(features: torch.Tensor) -> torch.Tensor:
    """``[n, C]`` -> ``[n, n]`` fp32 cosine similarities (diagonal included)."""
    unit = _unit_rows(features)
    return unit @ unit.T


def reference_energy(sim: torch.Tensor, margin: float, alpha: float, kind: str) -> list[float]:
    """Energy of every token: the mean over all tokens (itself included) of ``f(S_ij)``.

    ``sim`` is the ``[n, n]`` fp32 similarity table; the terms are evaluated in float64.
    """
    s = sim.double()
    if kind == "elu":  # the released code: ELU_alpha(S - m)
        shifted = s - margin
        terms = torch.where(shifted > 0, shifted, alpha * (torch.exp(shifted) - 1.0))
        return terms.mean(dim=1).tolist()
    if kind == "paper":  # paper Eq. 4: S itself at or above the margin
        terms = torch.where(s >= margin, s, alpha * (torch.exp(s - margin) - 1.0))
        return terms.mean(dim=1).tolist()
    if kind == "gaussian":  # spring-2024 code, width sigma = 1 - m
        sigma = 1.0 - margin
        terms = 2.0 * torch.exp(-(((1.0 - s) / sigma) ** 2)) - 1.0
        return (terms.mean(dim=1) / (sigma * math.sqrt(2.0 * math.pi))).tolist()
    raise ValueError(f"unknown energy kind {kind!r}")


def _first_best(scores: list[float]) -> int:
    """Index of the largest score; the first one wins ties."""
    best = 0
    for j in range(1, len(scores)):
        if scores[j] > scores[best]:
            best = j
    return best


def _descending(values: list[float]) -> list[int]:
    """Positions sorted by value, highest first, lower position first on ties."""
    return sorted(range(len(values)), key=lambda i: (-values[i], i))


# ------------------------------------------------------------------- PiToMe
def reference_pitome(
    metric: torch.Tensor,
    r: int,
    margin: float,
    alpha: float = 1.0,
    class_token: bool = False,
    energy: str = "elu",
    order: list[list[int]] | None = None,
) -> ReferenceStep:
    """One PiToMe step, item by item (docs/algorithm.md §3).

    Args:
        metric: ``[B, N, C]``.
        r: tokens removed (``2r`` mergeable; the lowest-energy rest is protected).
        order: per item, an energy order of the graph tokens (0-based, class token
            excluded) to use instead of sorting this function's own energies. Two
            fp32 implementations may order tokens whose energies differ by less than
            their rounding error differently; a caller checks such an order against
            `ReferenceStep.energies` and then checks everything downstream exactly.

    Returns:
        Output order ``[CLS], protected (descending energy), B (descending energy)``;
        with ``r = 0`` the identity (input order).
    """
    offset = 1 if class_token else 0
    all_leads, all_groups, all_energies, all_orders = [], [], [], []
    for item in range(metric.shape[0]):
        graph = metric[item, offset:]
        sim_table = _cosine_table(graph)
        energies = reference_energy(sim_table, margin, alpha, energy)
        item_order = _descending(energies) if order is None else list(order[item])
        assert sorted(item_order) == list(range(len(energies))), "order must be a permutation of the graph tokens"
        all_energies.append(energies)
        all_orders.append(item_order)
        if r == 0:  # nothing to merge: the step is the identity (no reordering either)
            all_leads.append(list(range(metric.shape[1])))
            all_groups.append([[i] for i in range(metric.shape[1])])
            continue
        mergeable, protected = item_order[: 2 * r], item_order[2 * r :]
        set_a = mergeable[0::2]  # energy ranks 1, 3, 5, ...
        set_b = mergeable[1::2]  # energy ranks 2, 4, 6, ...
        members_of_b = {b: [b] for b in set_b}
        a_to_b = sim_table[set_a][:, set_b].tolist()  # [r, r] similarities of A to B
        for a, scores in zip(set_a, a_to_b, strict=True):
            members_of_b[set_b[_first_best(scores)]].append(a)

        leads = [0] if class_token else []
        groups = [[0]] if class_token else []
        for p in protected:
            leads.append(p + offset)
            groups.append([p + offset])
        for b in set_b:
            leads.append(b + offset)
            groups.append(sorted(m + offset for m in members_of_b[b]))
        all_leads.append(leads)
        all_groups.append(groups)
    return ReferenceStep(all_leads, all_groups, all_energies, all_orders)


# ---------------------------------------------------------------------- ToMe
def reference_bsm(metric: torch.Tensor, r: int, class_token: bool = False) -> ReferenceStep:
    """One bipartite-soft-matching step, item by item (docs/algorithm.md §4).

    A = even positions, B = odd positions; each A finds its most similar B; the ``r``
    A tokens with the highest best-similarity merge (the class token never does).

    Returns:
        Output order ``[unmerged A in position order, all B in position order]``;
        with ``r = 0`` the identity (input order).
    """
    num_tokens = metric.shape[1]
    if r == 0:
        identity_leads = [list(range(num_tokens)) for _ in range(metric.shape[0])]
        return ReferenceStep(identity_leads, [[[i] for i in leads] for leads in identity_leads])
    positions_a = list(range(0, num_tokens, 2))
    positions_b = list(range(1, num_tokens, 2))
    all_leads, all_groups = [], []
    for item in range(metric.shape[0]):
        a_to_b = _cosine_table(metric[item])[0::2, 1::2].tolist()  # [|A|, |B|]
        best_b, best_score = {}, {}
        for a, scores in zip(positions_a, a_to_b, strict=True):
            if (class_token and a == 0) or not scores:
                best_score[a] = -math.inf
                continue
            j = _first_best(scores)
            best_b[a], best_score[a] = positions_b[j], scores[j]
        by_score = sorted(positions_a, key=lambda a: (-best_score[a], a))
        merged_a = by_score[:r]
        assert not (class_token and 0 in merged_a), "the class token must never be merged"

        members_of_b = {b: [b] for b in positions_b}
        for a in merged_a:
            members_of_b[best_b[a]].append(a)
        unmerged_a = sorted(set(positions_a) - set(merged_a))
        leads = unmerged_a + positions_b
        groups = [[a] for a in unmerged_a] + [sorted(members_of_b[b]) for b in positions_b]
        all_leads.append(leads)
        all_groups.append(groups)
    return ReferenceStep(all_leads, all_groups)


# ------------------------------------------------------------- test inputs
def clustered_tokens(
    batch: int,
    num_tokens: int,
    channels: int,
    num_clusters: int,
    spread: float = 0.3,
    num_isolated: int = 2,
    seed: int = 0,
) -> torch.Tensor:
    """``[batch, num_tokens, channels]`` Gaussian clusters plus a few isolated tokens.

    Cluster sizes are uneven (tokens are assigned at random) so energies spread out;
    ``num_isolated`` tokens are fresh random directions (small objects).
    """
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(batch, num_clusters, channels, generator=generator)
    assignment = torch.randint(0, num_clusters, (batch, num_tokens), generator=generator)
    tokens = centers.gather(1, assignment.unsqueeze(-1).expand(batch, num_tokens, channels))
    tokens = tokens + spread * torch.randn(batch, num_tokens, channels, generator=generator)
    if num_isolated:
        picks = torch.randperm(num_tokens, generator=generator)[:num_isolated]
        tokens[:, picks] = 3.0 * torch.randn(batch, len(picks), channels, generator=generator)
    return tokens


# ------------------------------------------------- reading a library plan
def groups_of(step) -> tuple[list[list[int]], list[list[list[int]]]]:
    """``(leads, groups)`` of a `pitome_mllm.merge.Merge`, in the `ReferenceStep` layout.

    Read from its public attributes only: the lead of output ``j`` is the input copied
    there (``kept_idx`` then ``dst_idx``), its group every input whose
    ``output_position`` is ``j``.
    """
    leads = torch.cat([step.kept_idx, step.dst_idx], dim=1).tolist()
    groups = []
    for positions in step.output_position.tolist():
        item_groups = [[] for _ in range(step.num_output_tokens)]
        for input_idx, out_idx in enumerate(positions):
            item_groups[out_idx].append(input_idx)
        groups.append(item_groups)
    return leads, groups


def pitome_energy_order(step, class_token: bool) -> list[list[int]]:
    """The energy order a PiToMe `Merge` implies, as graph positions (class token excluded).

    A PiToMe plan holds A = ranks 1, 3, 5, ... in ``src_idx``, B = ranks 2, 4, 6, ...
    in ``dst_idx`` and the protected rest in ``kept_idx`` (after the class token).
    """
    offset = 1 if class_token else 0
    set_a, set_b = step.src_idx - offset, step.dst_idx - offset
    protected = step.kept_idx[:, offset:] - offset
    alternating = torch.stack([set_a, set_b], dim=-1).flatten(1)  # a0, b0, a1, b1, ...
    return torch.cat([alternating, protected], dim=1).tolist()
