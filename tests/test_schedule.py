"""Per-layer schedules and token counts (`pitome_mllm.schedule`), checked against the
counts of docs/algorithm.md §5 for CLIP ViT-L/14-336 (577 tokens = CLS + 24 x 24, 24 layers)."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest

from pitome_mllm.schedule import (
    METHODS,
    PRESETS,
    check_keep_ratio,
    plan_layers,
    removal_count,
    solve_keep_ratio,
    token_counts,
    vision_output_tokens,
)

CLIP_TOKENS, CLIP_LAYERS, LLAVA_LAYER = 577, 24, 22  # LLaVA-1.5 reads hidden_states[-2]


def llm_tokens(keep_ratio: float, **kwargs) -> int:
    """Visual tokens LLaVA-1.5 hands to the LLM: the output of layer 22 minus CLS."""
    return token_counts(CLIP_TOKENS, CLIP_LAYERS, keep_ratio, **kwargs)[LLAVA_LAYER] - 1


@pytest.mark.parametrize(
    ("keep_ratio", "tokens"), [(0.85, 17), (0.875, 30), (0.9, 54), (0.925, 101), (0.95, 183), (0.975, 330)]
)
def test_reference_preset_counts(keep_ratio, tokens):
    assert llm_tokens(keep_ratio, preset="reference") == tokens


@pytest.mark.parametrize(
    ("keep_ratio", "tokens"), [(0.85, 99), (0.875, 135), (0.9, 183), (0.925, 247), (0.95, 331), (0.975, 440)]
)
def test_paper_preset_counts(keep_ratio, tokens):
    assert llm_tokens(keep_ratio, preset="paper") == tokens


@pytest.mark.parametrize(
    ("keep_ratio", "tokens"), [(0.85, 16), (0.875, 29), (0.9, 53), (0.925, 100), (0.95, 183), (0.975, 329)]
)
def test_tome_counts(keep_ratio, tokens):
    assert llm_tokens(keep_ratio, method="tome") == tokens


def test_reference_trajectory_at_0_9():
    steps = plan_layers(CLIP_TOKENS, CLIP_LAYERS, 0.9)
    entering = [step.tokens_in for step in steps]
    assert entering == [577, 520, 468, 422, 380, 342, 308, 278, 251, 226, 204, 184,
                        166, 150, 136, 123, 111, 100, 91, 82, 74, 67, 61, 55]  # fmt: skip
    assert steps[-1].tokens_out == 50
    assert [step.tokens_out for step in steps] == entering[1:] + [50]
    assert all(step.tokens_in - step.r == step.tokens_out for step in steps)


def test_bsm_counts_the_class_token_and_pitome_does_not():
    steps = plan_layers(CLIP_TOKENS, CLIP_LAYERS, 0.9)
    assert steps[0].r == math.floor(577 - 577 * 0.9) == 57  # BSM layer: T includes CLS
    assert steps[13].tokens_in == 150 and steps[13].r == math.floor(149 - 149 * 0.9) == 14  # PiToMe: T excludes CLS
    no_cls = plan_layers(150, CLIP_LAYERS, 0.9, class_token=False, preset="pure")
    assert no_cls[0].r == 15


def methods_by_layer(**kwargs) -> str:
    steps = plan_layers(CLIP_TOKENS, CLIP_LAYERS, 0.9, **kwargs)
    return "".join({"tome": "B", "pitome": "P", "none": "-"}[step.method] for step in steps)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"preset": "reference"}, "B" * 13 + "P" * 11),  # BSM on layers 0..12 (l <= L // 2)
        ({"preset": "paper"}, "-B" * 6 + "-P" * 6),  # odd layers only: BSM 1..11, PiToMe 13..23
        ({"preset": "pure"}, "P" * 24),
        ({"method": "tome"}, "B" * 24),
        ({"method": "tome", "preset": "paper"}, "-B" * 12),
        ({"method": "none"}, "-" * 24),
    ],
)
def test_methods_per_layer(kwargs, pattern):
    assert methods_by_layer(**kwargs) == pattern


def test_bsm_half_follows_depth():
    steps = plan_layers(65, 12, 0.9)
    assert [step.method for step in steps] == ["tome"] * 7 + ["pitome"] * 5  # l <= 6


@pytest.mark.parametrize(("preset", "energy"), [("reference", "elu"), ("paper", "gaussian"), ("pure", "paper")])
def test_preset_energy_and_override(preset, energy):
    assert {step.energy for step in plan_layers(CLIP_TOKENS, CLIP_LAYERS, 0.9, preset=preset)} == {energy}
    overridden = plan_layers(CLIP_TOKENS, CLIP_LAYERS, 0.9, preset=preset, energy="elu")
    assert {step.energy for step in overridden} == {"elu"}


def test_margins():
    steps = plan_layers(CLIP_TOKENS, CLIP_LAYERS, 0.9)
    for i, step in enumerate(steps):
        assert step.layer_idx == i
        assert step.margin == pytest.approx(0.9 - 0.9 * i / 24)
    assert steps[-1].margin == pytest.approx(0.0375)
    custom = plan_layers(CLIP_TOKENS, CLIP_LAYERS, 0.9, margin_start=0.75, margin_span=0.4)
    assert custom[12].margin == pytest.approx(0.75 - 0.4 * 12 / 24)


def test_removal_count_replicates_float64_arithmetic():
    assert removal_count(577, 0.9) == 57
    assert removal_count(577, 1.0) == 0
    # 100 * 0.55 is 55.000000000000007 in float64, so the released code removes 44, not 45.
    assert removal_count(100, 0.55) == 44
    assert removal_count(25, 0.56) == 10


def test_keep_ratio_one_merges_nothing():
    steps = plan_layers(CLIP_TOKENS, CLIP_LAYERS, 1.0)
    assert all(step.method == "none" and step.r == 0 for step in steps)
    assert token_counts(CLIP_TOKENS, CLIP_LAYERS, 1.0) == [577] * 24


def test_last_layer_limits_the_plan():
    steps = plan_layers(CLIP_TOKENS, CLIP_LAYERS, 0.9, last_layer=LLAVA_LAYER)
    assert len(steps) == 23 and steps[-1].tokens_out == 55
    assert vision_output_tokens(CLIP_TOKENS, CLIP_LAYERS, 0.9, LLAVA_LAYER) == 55
    for bad in (-1, 24):
        with pytest.raises(ValueError, match=str(bad)):
            plan_layers(CLIP_TOKENS, CLIP_LAYERS, 0.9, last_layer=bad)


@pytest.mark.parametrize("keep_ratio", [0.5, 0.3, 0.0, -0.9, 1.01, 2, float("nan"), "0.9", True, None])
def test_bad_keep_ratio_is_rejected(keep_ratio):
    with pytest.raises(ValueError, match=r"\(0\.5, 1\.0\]") as error:
        plan_layers(CLIP_TOKENS, CLIP_LAYERS, keep_ratio)
    assert repr(keep_ratio) in str(error.value) or str(keep_ratio) in str(error.value)


def test_good_keep_ratio_is_a_float():
    assert check_keep_ratio(1) == 1.0 and isinstance(check_keep_ratio(1), float)
    assert check_keep_ratio(0.5000001) == 0.5000001


@pytest.mark.parametrize(("name", "value"), [("method", "bsm"), ("preset", "head")])
def test_bad_method_or_preset_is_rejected(name, value):
    with pytest.raises(ValueError, match=value):
        plan_layers(CLIP_TOKENS, CLIP_LAYERS, 0.9, **{name: value})


# ------------------------------------------------------------ solving a ratio
RATIO_GRID = [0.5 + i / 1000 for i in range(1, 501)]


@pytest.mark.parametrize(("method", "preset"), [("pitome", p) for p in PRESETS] + [("tome", "reference")])
def test_counts_do_not_decrease_with_the_keep_ratio(method, preset):
    counts = [
        vision_output_tokens(CLIP_TOKENS, CLIP_LAYERS, ratio, LLAVA_LAYER, method=method, preset=preset)
        for ratio in RATIO_GRID
    ]
    assert all(a <= b for a, b in pairwise(counts))
    assert counts[-1] == CLIP_TOKENS


@pytest.mark.parametrize(("method", "preset"), [("pitome", "reference"), ("pitome", "paper"), ("tome", "reference")])
def test_solve_keep_ratio_is_the_smallest_that_reaches_the_budget(method, preset):
    def count(ratio):
        return vision_output_tokens(CLIP_TOKENS, CLIP_LAYERS, ratio, LLAVA_LAYER, method=method, preset=preset)

    for min_tokens in (2, 17, 55, 65, 102, 129, 193, 300, 441, 576, 577):
        ratio = solve_keep_ratio(CLIP_TOKENS, CLIP_LAYERS, min_tokens, LLAVA_LAYER, method=method, preset=preset)
        assert check_keep_ratio(ratio) == ratio
        assert count(ratio) >= min_tokens
        # Minimal: a slightly smaller ratio (beyond the bisection tolerance) falls short,
        # and no ratio of the grid below it reaches the budget.
        if ratio - 1e-6 > 0.5:
            assert count(ratio - 1e-6) < min_tokens
        assert all(count(r) < min_tokens for r in RATIO_GRID if r < ratio - 1e-6)


def test_solve_keep_ratio_rejects_an_impossible_budget():
    with pytest.raises(ValueError, match="578.*577"):
        solve_keep_ratio(CLIP_TOKENS, CLIP_LAYERS, 578, LLAVA_LAYER)


def test_methods_and_presets_are_listed():
    assert set(METHODS) == {"pitome", "tome", "none"}
    assert set(PRESETS) == {"reference", "paper", "pure", "mllm"}


def test_the_mllm_preset_never_merges_in_the_tower():
    steps = plan_layers(CLIP_TOKENS, CLIP_LAYERS, 0.9, preset="mllm", last_layer=LLAVA_LAYER)
    assert [step.method for step in steps] == ["none"] * (LLAVA_LAYER + 1)
    assert steps[-1].tokens_out == CLIP_TOKENS
