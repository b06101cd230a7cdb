"""`PiToMeConfig`: presets, validation, JSON round trip, `replace`."""

from __future__ import annotations

import json

import pytest

from pitome_mllm.config import PiToMeConfig

pytestmark = pytest.mark.model_facing


@pytest.mark.parametrize(
    ("preset", "metric", "reduce", "prop_attn"),
    [
        ("reference", "hidden", "mean", False),  # the released LLaVA code
        ("paper", "hidden", "mean", False),  # same model side, spring-2024 schedule
        ("pure", "keys", "size_weighted", True),  # the paper's algorithm
    ],
)
def test_presets_fill_unset_fields(preset, metric, reduce, prop_attn):
    config = PiToMeConfig(keep_ratio=0.9, preset=preset)
    assert (config.metric, config.reduce, config.prop_attn) == (metric, reduce, prop_attn)
    assert config.energy is None  # the schedule takes the preset's energy kind


def test_explicit_fields_beat_the_preset():
    config = PiToMeConfig(keep_ratio=0.9, preset="pure", metric="keys_mean", reduce="mean", prop_attn=False)
    assert (config.metric, config.reduce, config.prop_attn) == ("keys_mean", "mean", False)


def test_defaults():
    config = PiToMeConfig(keep_ratio=0.9)
    assert (config.method, config.preset, config.target_tokens, config.keep_order) == (
        "pitome",
        "reference",
        None,
        False,
    )
    assert (config.margin_start, config.margin_span, config.alpha) == (0.9, 0.9, 1.0)


def test_llm_prop_attn_is_off_by_default_and_in_no_preset():
    for preset in ("reference", "paper", "pure"):
        assert PiToMeConfig(keep_ratio=0.9, preset=preset).llm_prop_attn is False
    config = PiToMeConfig(keep_ratio=0.9, llm_prop_attn=True)
    assert config.replace(preset="pure").llm_prop_attn is True  # a preset change keeps it


def test_llm_prop_attn_as_an_lmms_eval_model_arg():
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install 'pitome-mllm[eval]')")
    from pitome_mllm.integrations.lmms_eval.llava_hf import parse_patch_args

    parsed = parse_patch_args({"keep_ratio": 0.9, "llm_prop_attn": "true"})
    assert parsed == {"keep_ratio": 0.9, "llm_prop_attn": True}
    assert PiToMeConfig(**parsed).llm_prop_attn is True
    with pytest.raises(ValueError, match="llm_prop_attn must be true or false"):
        parse_patch_args({"llm_prop_attn": "maybe"})


def test_keep_ratio_or_budget_is_required_unless_method_none():
    with pytest.raises(ValueError, match="keep_ratio"):
        PiToMeConfig()
    with pytest.raises(ValueError, match="'tome'"):
        PiToMeConfig(method="tome")
    assert PiToMeConfig(target_tokens=64).keep_ratio is None
    assert PiToMeConfig(method="none").merges_in_tower is False


def test_derived_properties():
    assert PiToMeConfig(keep_ratio=0.9).effective_keep_ratio == 0.9
    assert PiToMeConfig(target_tokens=64).effective_keep_ratio == 1.0
    assert PiToMeConfig(keep_ratio=0.9).merges_in_tower
    assert not PiToMeConfig(keep_ratio=1.0).merges_in_tower
    assert PiToMeConfig(target_tokens=64).merges_in_tower  # the ratio is solved later


def test_integer_keep_ratio_becomes_float():
    config = PiToMeConfig(keep_ratio=1)
    assert config.keep_ratio == 1.0 and isinstance(config.keep_ratio, float)


# ----------------------------------------------------------------- round trip
@pytest.mark.parametrize(
    "config",
    [
        PiToMeConfig(keep_ratio=0.9),
        PiToMeConfig(keep_ratio=0.925, preset="paper", energy="gaussian"),
        PiToMeConfig(preset="pure", target_tokens=128, keep_order=True, alpha=0.5),
        PiToMeConfig(method="tome", keep_ratio=0.95, margin_start=0.75, margin_span=0.4),
        PiToMeConfig(method="none", target_tokens=64, metric="keys_mean"),
        PiToMeConfig(keep_ratio=0.9, llm_prop_attn=True),
    ],
    ids=["reference", "paper", "pure-budget", "tome", "none", "llm_prop_attn"],
)
def test_json_round_trip(config, tmp_path):
    text = config.to_json()
    assert json.loads(text) == config.to_dict()
    assert PiToMeConfig.from_json(text) == config
    path = tmp_path / "config.json"
    config.to_json(path)
    assert PiToMeConfig.from_json(path) == config
    assert PiToMeConfig.from_json(str(path)) == config
    assert PiToMeConfig.from_dict(config.to_dict()) == config


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="ratio"):
        PiToMeConfig.from_dict({"ratio": 0.9})


def test_loaded_values_are_validated():
    with pytest.raises(ValueError, match="0.3"):
        PiToMeConfig.from_json('{"keep_ratio": 0.3}')


# ----------------------------------------------------------------- bad values
@pytest.mark.parametrize(
    ("kwargs", "bad"),
    [
        ({"method": "bsm"}, "bsm"),
        ({"preset": "head"}, "head"),
        ({"metric": "keys_max"}, "keys_max"),
        ({"reduce": "median"}, "median"),
        ({"energy": "cosine"}, "cosine"),
        ({"keep_ratio": 0.3}, "0.3"),
        ({"keep_ratio": 0.5}, "0.5"),
        ({"keep_ratio": 1.5}, "1.5"),
        ({"keep_ratio": "0.9"}, "0.9"),
        ({"target_tokens": 0}, "0"),
        ({"target_tokens": -1}, "-1"),
        ({"target_tokens": 1.5}, "1.5"),
        ({"target_tokens": True}, "True"),
        ({"target_tokens": "64"}, "64"),
        ({"prop_attn": "yes"}, "yes"),
        ({"keep_order": 1}, "1"),
        ({"llm_prop_attn": 1}, "1"),
        ({"llm_prop_attn": "true"}, "true"),
        ({"llm_prop_attn": None}, "None"),
        ({"alpha": -1.0}, "-1.0"),
        ({"alpha": float("inf")}, "inf"),
        ({"margin_start": float("nan")}, "nan"),
        ({"margin_span": True}, "True"),
    ],
)
def test_bad_values_are_rejected(kwargs, bad):
    arguments = {"keep_ratio": 0.9} | kwargs
    with pytest.raises(ValueError) as error:
        PiToMeConfig(**arguments)
    name = next(iter(kwargs))
    assert name in str(error.value) and bad in str(error.value)


# -------------------------------------------------------------------- replace
def test_replace_rederives_preset_defaults():
    reference = PiToMeConfig(keep_ratio=0.9)
    pure = reference.replace(preset="pure")
    assert (pure.metric, pure.reduce, pure.prop_attn) == ("keys", "size_weighted", True)
    back = pure.replace(preset="reference")
    assert back == reference
    assert (reference.metric, reference.reduce, reference.prop_attn) == ("hidden", "mean", False)  # unchanged


def test_replace_keeps_explicit_choices():
    custom = PiToMeConfig(keep_ratio=0.9, metric="keys_mean")
    pure = custom.replace(preset="pure")
    assert (pure.metric, pure.reduce) == ("keys_mean", "size_weighted")
    overridden = PiToMeConfig(keep_ratio=0.9).replace(preset="pure", reduce="mean")
    assert (overridden.metric, overridden.reduce) == ("keys", "mean")


def test_replace_without_preset_change_keeps_fields():
    config = PiToMeConfig(keep_ratio=0.9, preset="pure").replace(keep_ratio=0.95)
    assert config.keep_ratio == 0.95 and config.metric == "keys" and config.preset == "pure"


def test_replace_validates():
    with pytest.raises(ValueError, match="0.3"):
        PiToMeConfig(keep_ratio=0.9).replace(keep_ratio=0.3)
    with pytest.raises(ValueError, match="ratio"):
        PiToMeConfig(keep_ratio=0.9).replace(ratio=0.95)
