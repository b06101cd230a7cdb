"""Multi-seed proxy statistics: crossed standard errors, paired differences, the tables and the recommendation rule."""

from __future__ import annotations

import json
import math

import pytest

from pitome_mllm.experiments.proxy import recommend, report, stats


# --------------------------------------------------------------------------- standard errors
def test_one_seed_gives_the_usual_standard_error_over_items():
    values = [1, 0, 1, 1, 0, 1, 0, 1]
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    assert stats.crossed_standard_error([values]) == pytest.approx(sd / math.sqrt(len(values)))
    assert stats.crossed_standard_error([[v] for v in values]) == pytest.approx(sd / math.sqrt(len(values)))


def test_a_setting_repeated_under_every_seed_keeps_its_one_seed_error():
    values = [1, 0, 1, 1, 0, 1, 0, 1]
    repeated = list(stats.broadcast_seeds(dict(enumerate(values)), [0, 1, 2]).values())
    matrix = [[row[i] for i in range(len(values))] for row in repeated]
    assert stats.crossed_standard_error(matrix) == pytest.approx(stats.crossed_standard_error([values]))


def test_additive_seed_and_item_effects_add_their_variances():
    seed_offsets = [0.0, 0.3, -0.1]
    item_offsets = [0.0, 1.0, 0.5, -0.5, 0.25]
    matrix = [[a + b for b in item_offsets] for a in seed_offsets]

    def variance(values):
        mean = sum(values) / len(values)
        return sum((v - mean) ** 2 for v in values) / (len(values) - 1)

    expected = math.sqrt(variance(seed_offsets) / 3 + variance(item_offsets) / 5)
    assert stats.crossed_standard_error(matrix) == pytest.approx(expected)


def test_a_seed_effect_widens_the_error_that_pairing_over_items_alone_misses():
    items = [0, 1, 0, 1, 1, 0]
    flat = [items, items, items]
    shifted = [[v + offset for v in items] for offset in (-0.2, 0.0, 0.2)]
    assert stats.estimate(shifted, [0, 1, 2]).item_se == pytest.approx(stats.estimate(flat, [0, 1, 2]).item_se)
    # The seed offsets have variance 0.04: 0.04 / 3 seeds is added to the squared error.
    expected = math.sqrt(stats.crossed_standard_error(flat) ** 2 + 0.04 / 3)
    assert stats.crossed_standard_error(shifted) == pytest.approx(expected)


def test_pure_interaction_counts_only_the_residual():
    # Row and column means are all equal: only the seed x item residual varies.
    assert stats.crossed_standard_error([[1, 0], [0, 1]]) == pytest.approx(0.5)


def test_bad_matrices_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="at least one seed and one item"):
        stats.crossed_standard_error([])
    with pytest.raises(ValueError, match="same items"):
        stats.crossed_standard_error([[1, 0], [1]])
    with pytest.raises(ValueError, match="two seeds or two items"):
        stats.crossed_standard_error([[1]])
    with pytest.raises(ValueError, match="2 rows but 1 seeds"):
        stats.estimate([[1, 0], [0, 1]], [0])


# --------------------------------------------------------------------------- paired differences
def test_paired_difference_uses_common_seeds_and_items_only():
    a = {0: {0: 1, 1: 1, 2: 0, 3: 1}, 1: {0: 1, 1: 0, 2: 1, 3: 1}, 5: {0: 1}}
    b = {0: {0: 0, 1: 1, 2: 0}, 1: {0: 1, 1: 0, 2: 0}}
    difference = stats.paired_difference(a, b)
    assert difference.seeds == (0, 1) and difference.items == 3
    assert difference.per_seed == pytest.approx((1 / 3, 1 / 3))
    assert difference.mean == pytest.approx(1 / 3)
    assert stats.paired_difference(a, a).mean == 0.0 and stats.paired_difference(a, a).se == 0.0


def test_pairing_is_tighter_than_the_two_separate_errors():
    import random

    rng = random.Random(0)
    hard = [rng.random() < 0.5 for _ in range(400)]  # items both settings find hard or easy
    a = {s: {i: float(h or rng.random() < 0.2) for i, h in enumerate(hard)} for s in range(3)}
    b = {s: {i: float(h and rng.random() < 0.9) for i, h in enumerate(hard)} for s in range(3)}
    paired = stats.paired_difference(a, b)
    unpaired = math.hypot(stats.mean_estimate(a).se, stats.mean_estimate(b).se)
    assert paired.se < 0.7 * unpaired
    assert paired.mean == pytest.approx(stats.mean_estimate(a).mean - stats.mean_estimate(b).mean)


def test_nothing_in_common_is_an_error():
    with pytest.raises(ValueError, match="no seed in common"):
        stats.paired_difference({0: {0: 1}}, {1: {0: 1}})
    with pytest.raises(ValueError, match="no item scored"):
        stats.paired_difference({0: {0: 1}}, {0: {1: 1}})


def test_z_of_an_exact_difference():
    exact = stats.Estimate(mean=0.1, se=0.0, item_se=0.0, per_seed=(0.1,), seeds=(0,), items=2)
    assert exact.z() == math.inf
    assert stats.Estimate(0.0, 0.0, 0.0, (0.0,), (0,), 2).z() == 0.0
    assert stats.Estimate(0.1, 0.05, 0.05, (0.1,), (0,), 2).z() == pytest.approx(2.0)


# ------------------------------------------------------------------------------------ tables
def _hits(rate_per_seed: dict[int, float], items: int = 100, offset: int = 0) -> dict[int, dict[int, float]]:
    """Deterministic 0/1 hits: under seed s the first round(rate * items) items (after ``offset``) are right."""
    return {
        seed: {i: float((i - offset) % items < round(rate * items)) for i in range(items)}
        for seed, rate in rate_per_seed.items()
    }


def _table(cells: dict[tuple[str, int | None], dict[int, dict[int, float]]]) -> report.SettingTable:
    return report.SettingTable(
        hits=cells,
        tokens={key: float(key[1] or 256) for key in cells},
        order=["none", "pitome_reference", "tome", "random"],
        score="accuracy",
    )


def test_summary_rows_pair_each_setting_with_the_reference_at_its_budget():
    table = _table(
        {
            ("none", None): _hits({0: 0.9, 1: 0.9}),
            ("pitome_reference", 64): _hits({0: 0.6, 1: 0.7}),
            ("pitome_reference", 32): _hits({0: 0.5, 1: 0.5}),
            ("tome", 64): _hits({0: 0.5, 1: 0.6}),
            ("random", 32): _hits({0: 0.7, 1: 0.6}),
            ("random", 16): _hits({0: 0.4, 1: 0.4}),
        }
    )
    rows = {(row["setting"], row["budget"]): row for row in report.summary_rows(table, "pitome_reference")}
    assert [key for key in rows] == [
        ("none", None),
        ("pitome_reference", 64),
        ("pitome_reference", 32),
        ("tome", 64),
        ("random", 32),
        ("random", 16),
    ]
    assert rows[("tome", 64)]["difference"] == pytest.approx(-0.1)
    assert rows[("tome", 64)]["difference_per_seed"] == pytest.approx([-0.1, -0.1])
    assert rows[("tome", 64)]["pairs"] == 200
    assert rows[("random", 32)]["difference"] == pytest.approx(0.15)
    assert rows[("random", 16)]["difference"] is None  # no reference at 16 tokens
    assert rows[("none", None)]["difference"] is None and rows[("none", None)]["mean"] == pytest.approx(0.9)
    assert rows[("pitome_reference", 64)]["difference"] is None

    markdown = report.summary_markdown(list(rows.values()), "pitome_reference", "accuracy")
    assert "| none (256 tokens) | 0.900 ± 0.030 |" in markdown  # two identical seeds: the items' error
    assert "| setting − pitome_reference (points, paired, ± SE) | 64 tokens | 32 tokens | 16 tokens |" in markdown
    assert "| tome | -10.0 ± " in markdown


def test_estimate_cell_marks_differences_beyond_two_standard_errors():
    assert report.estimate_cell(0.8123, 0.0111) == "0.812 ± 0.011"
    assert report.estimate_cell(0.012, 0.004, points=True) == "+1.2 ± 0.4*"
    assert report.estimate_cell(-0.007, 0.004, points=True) == "-0.7 ± 0.4"


def test_write_summary_writes_every_file(tmp_path):
    table = _table({("pitome_reference", 64): _hits({0: 0.6}), ("random", 64): _hits({0: 0.7})})
    paths = report.write_summary(tmp_path, "x", table, "pitome_reference", "title", {"note": 1}, {"random": "random"})
    stored = json.loads(paths["json"].read_text())
    assert stored["note"] == 1 and stored["reference"] == "pitome_reference" and "crossed" in stored["se"]
    assert [row["method"] for row in stored["rows"]] == [None, "random"]
    assert paths["png"].stat().st_size > 10_000 and paths["csv"].read_text().startswith("setting,budget,")


# ---------------------------------------------------------------------------- recommendation
def _proxy(rates: dict[str, float], budget: int = 64, seeds=(0, 1, 2), items: int = 400) -> dict:
    # Each method is right on a prefix of the items, so a higher rate dominates item by item.
    return {budget: {name: _hits(dict.fromkeys(seeds, rate), items) for name, rate in rates.items()}}


SELECTION = ["random", "divprune"]
METHODS = ["pitome_mllm", "pitome_reference", "tome", "random", "divprune"]


def _decide(tables):
    return recommend.decide(
        tables, METHODS, candidate="pitome_mllm", reference="pitome_reference", rivals=["tome"], selection=SELECTION
    )


def test_candidate_wins_when_ahead_of_reference_and_tome_and_level_with_selection_everywhere():
    rates = {"pitome_mllm": 0.80, "pitome_reference": 0.70, "tome": 0.68, "random": 0.75, "divprune": 0.80}
    (verdict,) = _decide({"vqa": _proxy(rates), "fidelity": _proxy(rates)})
    assert verdict.candidate_wins and verdict.recommended == "pitome_mllm"
    assert all(check.passed for check in verdict.checks)
    assert {check.against for check in verdict.checks} == {"pitome_reference", "tome", "divprune"}
    assert "**64 tokens: `pitome_mllm`.**" in recommend.verdict_sentence(verdict)


def test_candidate_loses_when_one_proxy_leaves_it_behind_the_best_selection_method():
    good = {"pitome_mllm": 0.80, "pitome_reference": 0.70, "tome": 0.68, "random": 0.75, "divprune": 0.80}
    bad = {**good, "divprune": 0.90}
    (verdict,) = _decide({"vqa": _proxy(good), "fidelity": _proxy(bad)})
    assert not verdict.candidate_wins
    failed = [check for check in verdict.checks if not check.passed]
    assert [(c.proxy, c.against, c.kind) for c in failed] == [("fidelity", "divprune", "not_behind")]
    # divprune: 0 behind on both proxies' best (tied on vqa, best on fidelity): the smallest worst gap.
    assert verdict.recommended == "divprune" and verdict.shortfall["divprune"] == pytest.approx(0.0)
    sentence = recommend.verdict_sentence(verdict)
    assert "`divprune`" in sentence and "`pitome_mllm` is not recommended here: fidelity: − divprune" in sentence


def test_a_lead_within_two_standard_errors_is_not_enough():
    rates = {"pitome_mllm": 0.705, "pitome_reference": 0.70, "tome": 0.60, "random": 0.60, "divprune": 0.60}
    # 2 items of 400 better: a lead of 0.5 points whose SE is about 0.35 points.
    (verdict,) = _decide({"vqa": _proxy(rates), "fidelity": _proxy(rates)})
    reference_checks = [c for c in verdict.checks if c.against == "pitome_reference"]
    assert all(not c.passed and 0 < c.difference.mean < 2 * c.difference.se for c in reference_checks)
    assert not verdict.candidate_wins and verdict.recommended == "pitome_mllm"  # still the smallest gap


def test_missing_candidate_fails_rule_one_and_the_smallest_worst_gap_decides():
    vqa = {"pitome_reference": 0.70, "tome": 0.72, "random": 0.60}
    fidelity = {"pitome_reference": 0.50, "tome": 0.40, "random": 0.55}
    (verdict,) = _decide({"vqa": _proxy(vqa), "fidelity": _proxy(fidelity)})
    assert not verdict.candidate_wins and all(check.difference is None for check in verdict.checks)
    # Worst gaps: reference 0.05, tome 0.15, random 0.12.
    assert verdict.recommended == "pitome_reference"
    assert verdict.best == {"vqa": "tome", "fidelity": "random"}
    assert verdict.shortfall == pytest.approx({"pitome_reference": 0.05, "tome": 0.15, "random": 0.12})
    assert verdict.tied_with_best == ()  # 2 and 5 points behind, far beyond 2 SE with 1,200 pairs
    assert "no paired result against pitome_reference" in recommend.verdict_sentence(verdict)


def test_only_budgets_on_every_proxy_are_decided_and_a_method_on_one_proxy_is_not_recommended():
    vqa = {**_proxy({"pitome_reference": 0.7, "tome": 0.6}, 64), **_proxy({"pitome_reference": 0.7}, 32)}
    fidelity = _proxy({"pitome_reference": 0.5, "tome": 0.6, "random": 0.9}, 64)
    (verdict,) = _decide({"vqa": vqa, "fidelity": fidelity})
    assert verdict.budget == 64 and "random" not in verdict.shortfall
    with pytest.raises(ValueError, match="no budget measured on every proxy"):
        _decide({"vqa": _proxy({"tome": 0.6}, 16), "fidelity": _proxy({"tome": 0.6}, 32)})
    with pytest.raises(ValueError, match="no proxy table"):
        _decide({})


def test_verdict_to_dict_is_json():
    rates = {"pitome_mllm": 0.8, "pitome_reference": 0.7, "tome": 0.6, "random": 0.7, "divprune": 0.7}
    (verdict,) = _decide({"vqa": _proxy(rates), "fidelity": _proxy(rates)})
    stored = json.loads(json.dumps(recommend.verdict_to_dict(verdict)))
    assert stored["recommended"] == "pitome_mllm" and len(stored["checks"]) == 6
    assert stored["checks"][0]["difference"]["seeds"] == [0, 1, 2]


def test_combined_report_has_both_proxies_and_the_verdicts(tmp_path):
    def table(rates):
        cells = {("none", None): _hits({0: 0.95, 1: 0.95})}
        for budget in (64, 32):
            cells.update({(name, budget): _hits({0: rate, 1: rate}) for name, rate in rates.items()})
        return _table(cells)

    tables = {
        "easy-VQA": table({"pitome_reference": 0.7, "tome": 0.65, "random": 0.75}),
        "fidelity": table({"pitome_reference": 0.5, "tome": 0.45, "random": 0.8}),
    }
    paths = report.write_combined(
        tmp_path, tables, candidate="pitome_mllm", reference="pitome_reference", rivals=["tome"],
        methods={"random": "random", "tome": "tome", "pitome_reference": "pitome"}, extra={"machine": "m"},
    )  # fmt: skip
    text = paths["md"].read_text()
    assert "| easy-VQA: accuracy (− pitome_reference, points ± SE) | 64 tokens | 32 tokens |" in text
    assert "| random | 0.750 (+5.0 ± " in text and "**0.700 ± " in text
    assert "- **64 tokens: `random`**" in text and "- **32 tokens: `random`**" in text
    stored = json.loads(paths["json"].read_text())
    assert stored["rule"]["selection"] == ["random"] and [v["budget"] for v in stored["verdicts"]] == [64, 32]
    assert paths["png"].stat().st_size > 10_000


def test_cells_with_fewer_seeds_are_marked_and_left_out_of_the_verdict(tmp_path):
    def table(extra_rate):
        cells = {
            ("pitome_reference", 64): _hits({0: 0.6, 1: 0.6, 2: 0.6}),
            ("tome", 64): _hits({0: 0.5, 1: 0.5, 2: 0.5}),
            ("random", 64): _hits({0: extra_rate}),  # one seed of three
        }
        return _table(cells)

    one = table(0.9)
    assert one.all_seeds() == [0, 1, 2] and one.incomplete() == [("random", 64, [0])]
    assert set(one.by_budget(complete=True)[64]) == {"pitome_reference", "tome"}
    assert set(one.by_budget()[64]) == {"pitome_reference", "tome", "random"}
    rows = report.summary_rows(one, "pitome_reference")
    assert "| random | 0.900 ± 0.030 (1 seed) |" in report.summary_markdown(rows, "pitome_reference", "accuracy")
    paths = report.write_combined(
        tmp_path, {"a": one, "b": table(0.95)}, candidate="pitome_mllm", reference="pitome_reference",
        rivals=["tome"], methods={"random": "random"}, extra={},
    )  # fmt: skip
    stored = json.loads(paths["json"].read_text())
    assert stored["verdicts"][0]["recommended"] == "pitome_reference"  # random, best but on one seed, is not eligible
    assert stored["left_out_of_the_verdict"]["a"] == [{"setting": "random", "budget": 64, "seeds": [0]}]
