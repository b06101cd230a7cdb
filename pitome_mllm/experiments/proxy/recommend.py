"""Which token-reduction method to use at each visual-token budget, decided from the proxy tables.

Input: per proxy, per budget, per method, the per-item hits over seeds (`stats.SeedHits`). Two
rules, both on paired differences with `stats.crossed_standard_error` (``z`` standard errors,
default 2):

1. **The candidate** (the ``mllm`` PiToMe preset) is the recommendation at a budget only if, on
   *every* proxy, it is ahead of the reference PiToMe and of each rival (ToMe) by more than ``z``
   standard errors of the paired difference, and not behind the best selection method of that
   proxy at that budget by more than ``z`` standard errors.
2. **Otherwise** the recommendation is the method with the smallest worst shortfall: for every
   method measured on all proxies at that budget, its largest gap (in accuracy) to the best method
   of a proxy; the smallest such gap wins (ties: the earlier method in ``methods`` order). The
   verdict says on which proxies the winner is within ``z`` standard errors of the best.

Everything returned is data (`BudgetVerdict`); `verdict_markdown` turns it into the README text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .stats import Estimate, SeedHits, mean_estimate, paired_difference

# proxy name -> budget -> method -> hits over seeds and items.
ProxyTables = Mapping[str, Mapping[int, Mapping[str, SeedHits]]]


@dataclass(frozen=True)
class Check:
    """One condition of rule 1 on one proxy.

    Attributes:
        proxy, against: where and against which method.
        kind: ``"ahead"`` (must lead by more than ``z`` SE) or ``"not_behind"`` (must not trail by more).
        difference: candidate minus ``against``, paired (None when either was not measured).
        passed: whether the condition holds (False when not measured).
    """

    proxy: str
    against: str
    kind: str
    difference: Estimate | None
    passed: bool

    def describe(self, z: float) -> str:
        if self.difference is None:
            return f"{self.proxy}: no paired result against {self.against}"
        need = f"> +{z:g} SE" if self.kind == "ahead" else f">= -{z:g} SE"
        verdict = "yes" if self.passed else "no"
        return (
            f"{self.proxy}: − {self.against} = {100 * self.difference.mean:+.1f} ± "
            f"{100 * self.difference.se:.1f} points (need {need}: {verdict})"
        )


@dataclass(frozen=True)
class BudgetVerdict:
    """The decision at one budget.

    Attributes:
        budget: visual tokens per image.
        candidate: the preset rule 1 tests; candidate_wins: whether rule 1 holds.
        checks: rule 1's conditions (empty when the candidate was not measured at this budget).
        best: per proxy, the method with the highest mean there.
        means: per proxy, per method, its mean `Estimate`.
        shortfall: per method measured on every proxy, its largest gap to a proxy's best (accuracy).
        recommended: the method to use; tied_with_best: proxies on which it is within ``z`` SE of the best.
    """

    budget: int
    candidate: str
    candidate_wins: bool
    checks: tuple[Check, ...]
    best: dict[str, str]
    means: dict[str, dict[str, Estimate]]
    shortfall: dict[str, float]
    recommended: str
    tied_with_best: tuple[str, ...]
    gaps_to_best: dict[str, Estimate] = field(default_factory=dict)


def _passes(kind: str, difference: Estimate, z: float) -> bool:
    if kind == "ahead":
        return difference.mean > z * difference.se
    return difference.mean >= -z * difference.se


def candidate_checks(
    tables: ProxyTables,
    budget: int,
    candidate: str,
    reference: str,
    rivals: Sequence[str],
    selection: Sequence[str],
    z: float,
) -> tuple[Check, ...]:
    """Rule 1's conditions at ``budget``, proxy by proxy (see the module docstring)."""
    checks = []
    for proxy, by_budget in tables.items():
        cells = by_budget.get(budget, {})
        mine = cells.get(candidate)
        targets = [(name, "ahead") for name in (reference, *rivals)]
        measured = [name for name in selection if name in cells]
        if measured:
            best_selection = max(measured, key=lambda name: (mean_estimate(cells[name]).mean, -measured.index(name)))
            targets.append((best_selection, "not_behind"))
        else:
            targets.append(("a selection method", "not_behind"))
        for against, kind in targets:
            difference = None
            if mine is not None and against in cells:
                difference = paired_difference(mine, cells[against])
            passed = difference is not None and _passes(kind, difference, z)
            checks.append(Check(proxy, against, kind, difference, passed))
    return tuple(checks)


def decide(
    tables: ProxyTables,
    methods: Sequence[str],
    *,
    candidate: str,
    reference: str,
    rivals: Sequence[str] = ("tome",),
    selection: Sequence[str] = (),
    z: float = 2.0,
) -> list[BudgetVerdict]:
    """A `BudgetVerdict` for every budget measured on every proxy, highest budget first.

    Args:
        tables: proxy -> budget -> method -> hits (`stats.SeedHits`).
        methods: the methods that may be recommended, in order of preference for ties.
        candidate: the preset rule 1 tests (it may be absent from the tables: rule 1 then fails).
        reference, rivals: what the candidate must be ahead of.
        selection: the selection methods; the candidate must not trail the best of them.

    Raises:
        ValueError: no proxy, or no budget measured on every proxy.
    """
    if not tables:
        raise ValueError("no proxy table given")
    budgets = sorted(set.intersection(*(set(by_budget) for by_budget in tables.values())), reverse=True)
    if not budgets:
        raise ValueError(f"no budget measured on every proxy ({ {p: sorted(t) for p, t in tables.items()} })")
    verdicts = []
    for budget in budgets:
        cells = {proxy: by_budget[budget] for proxy, by_budget in tables.items()}
        means = {proxy: {m: mean_estimate(hits) for m, hits in here.items()} for proxy, here in cells.items()}
        eligible = [m for m in methods if m in {m for here in cells.values() for m in here}]
        best = {
            proxy: max((m for m in eligible if m in here), key=lambda m, p=proxy: means[p][m].mean)
            for proxy, here in cells.items()
        }
        everywhere = [m for m in eligible if all(m in here for here in cells.values())]
        if not everywhere:
            raise ValueError(f"no method measured on every proxy at {budget} tokens")
        shortfall = {m: max(means[p][best[p]].mean - means[p][m].mean for p in cells) for m in everywhere}
        checks = candidate_checks(tables, budget, candidate, reference, rivals, selection, z)
        candidate_wins = candidate in everywhere and all(check.passed for check in checks)
        recommended = candidate if candidate_wins else min(everywhere, key=lambda m: shortfall[m])
        gaps = {p: paired_difference(cells[p][recommended], cells[p][best[p]]) for p in cells if best[p] != recommended}
        tied = tuple(p for p in cells if p not in gaps or gaps[p].mean >= -z * gaps[p].se)
        verdicts.append(
            BudgetVerdict(
                budget=budget,
                candidate=candidate,
                candidate_wins=candidate_wins,
                checks=checks,
                best=best,
                means=means,
                shortfall=shortfall,
                recommended=recommended,
                tied_with_best=tied,
                gaps_to_best=gaps,
            )
        )
    return verdicts


def verdict_sentence(verdict: BudgetVerdict, z: float = 2.0) -> str:
    """One Markdown bullet: what to use at this budget and why, with the numbers."""
    proxies = list(verdict.best)
    if verdict.candidate_wins:
        return (
            f"- **{verdict.budget} tokens: `{verdict.candidate}`.** On every proxy it leads "
            + ", ".join(
                f"`{c.against}` by {100 * c.difference.mean:+.1f} ± {100 * c.difference.se:.1f}"
                for c in verdict.checks
                if c.kind == "ahead" and c.difference is not None
            )
            + f" points (more than {z:g} SE) and is within {z:g} SE of the best selection method."
        )
    failed = [check for check in verdict.checks if not check.passed]
    why_not = "; ".join(check.describe(z) for check in failed[:3])
    if len(failed) > 3:
        why_not += f"; and {len(failed) - 3} more"
    placement = []
    for proxy in proxies:
        estimate = verdict.means[proxy][verdict.recommended]
        if verdict.best[proxy] == verdict.recommended:
            placement.append(f"best on {proxy} ({estimate.mean:.3f})")
        else:
            gap = verdict.gaps_to_best[proxy]
            tied = "within" if proxy in verdict.tied_with_best else "beyond"
            placement.append(
                f"{100 * -gap.mean:.1f} ± {100 * gap.se:.1f} points behind `{verdict.best[proxy]}` on {proxy} "
                f"({tied} {z:g} SE)"
            )
    return (
        f"- **{verdict.budget} tokens: `{verdict.recommended}`** — the smallest worst-case gap to the best method "
        f"({100 * verdict.shortfall[verdict.recommended]:.1f} points): " + "; ".join(placement) + ". "
        f"`{verdict.candidate}` is not recommended here: {why_not}."
    )


def verdict_markdown(verdicts: Sequence[BudgetVerdict], z: float = 2.0) -> str:
    """The per-budget recommendation as Markdown bullets (one per budget)."""
    return "\n".join(verdict_sentence(verdict, z) for verdict in verdicts) + "\n"


def verdict_to_dict(verdict: BudgetVerdict) -> dict:
    """JSON-ready form of a `BudgetVerdict`."""
    return {
        "budget": verdict.budget,
        "candidate": verdict.candidate,
        "candidate_wins": verdict.candidate_wins,
        "checks": [
            {
                "proxy": c.proxy,
                "against": c.against,
                "kind": c.kind,
                "passed": c.passed,
                "difference": None if c.difference is None else c.difference.to_dict(),
            }
            for c in verdict.checks
        ],
        "best": verdict.best,
        "shortfall": verdict.shortfall,
        "recommended": verdict.recommended,
        "tied_with_best": list(verdict.tied_with_best),
        "gaps_to_best": {p: e.to_dict() for p, e in verdict.gaps_to_best.items()},
    }
