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
        # The margins reach ToMe through the PiToMe step that lands on target_tokens.
        PiToMeConfig(method="tome", keep_ratio=0.95, target_tokens=64, margin_start=0.75, margin_span=0.4),
        PiToMeConfig(method="none", target_tokens=64, keep_order=True),
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


# ------------------------------------------------------------- finite ranges
@pytest.mark.parametrize(
    ("kwargs", "shown"),
    [
        ({"margin_span": 1e308}, "margin_span must be in [-2, 2], got 1e+308"),
        ({"margin_start": -3}, "margin_start must be in [-2, 2], got -3"),
        ({"alpha": 1e308}, "alpha must be in [0, 100], got 1e+308"),
        ({"seed": 2**70}, "seed must be an integer in [0, 2**63 - 1]"),
        ({"seed": -1}, "seed must be an integer in [0, 2**63 - 1], got -1"),
    ],
)
def test_numbers_have_finite_ranges(kwargs, shown):
    arguments = {"method": "random", "target_tokens": 64} if "seed" in kwargs else {"keep_ratio": 0.9}
    with pytest.raises(ValueError) as error:
        PiToMeConfig(**arguments, **kwargs)
    assert shown in str(error.value)


def test_range_ends_are_accepted():
    config = PiToMeConfig(keep_ratio=0.9, margin_start=2, margin_span=-2.0, alpha=100)
    assert (config.margin_start, config.margin_span, config.alpha) == (2, -2.0, 100)
    assert PiToMeConfig(method="random", target_tokens=8, seed=2**63 - 1).seed == 2**63 - 1


# --------------------------------------------------------- ignored settings
@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"method": "none", "prop_attn": True}, "prop_attn"),
        ({"method": "none", "keep_order": True}, "keep_order"),
        ({"method": "none", "target_tokens": 64, "metric": "keys"}, "metric"),
        ({"method": "random", "target_tokens": 64, "prop_attn": True}, "prop_attn"),
        ({"method": "fastervlm", "target_tokens": 64, "keep_order": True}, "keep_order"),
        ({"method": "tome", "keep_ratio": 0.9, "energy": "elu"}, "energy"),
        ({"method": "tome", "keep_ratio": 0.9, "margin_start": 0.5}, "margin_start"),
        ({"method": "tome", "keep_ratio": 0.9, "alpha": 2.0}, "alpha"),
        ({"method": "pool", "target_tokens": 64, "metric": "keys"}, "metric"),
        ({"method": "pool", "target_tokens": 64, "reduce": "size_weighted"}, "reduce"),
        ({"method": "pitome", "keep_ratio": 0.9, "seed": 3}, "seed"),
        ({"method": "mllm", "target_tokens": 64, "keep_order": True}, "keep_order"),
        # Every token of these holds one patch: proportional attention in the LLM adds log(1) = 0.
        ({"method": "random", "target_tokens": 64, "llm_prop_attn": True}, "llm_prop_attn"),
        ({"method": "fastervlm", "target_tokens": 64, "llm_prop_attn": True}, "llm_prop_attn"),
        ({"method": "none", "llm_prop_attn": True}, "llm_prop_attn"),
    ],
)
def test_a_setting_the_method_ignores_is_refused_naming_it(kwargs, name):
    with pytest.raises(ValueError, match=rf"does not read {name}, so {name}=.* would be ignored") as error:
        PiToMeConfig(**kwargs)
    assert f"method={kwargs['method']!r}" in str(error.value)


def test_tome_takes_the_energy_settings_with_a_budget():
    # target_tokens adds a PiToMe step after the tower: it reads the energy and the margins.
    config = PiToMeConfig(method="tome", keep_ratio=0.9, target_tokens=64, energy="gaussian", margin_start=0.5)
    assert (config.energy, config.margin_start) == ("gaussian", 0.5)
    with pytest.raises(ValueError, match="read only by the PiToMe step that lands on target_tokens"):
        PiToMeConfig(method="tome", keep_ratio=0.9, energy="gaussian")


@pytest.mark.parametrize("method", ["none", "random", "pool", "fastervlm", "divprune", "mllm", "tome"])
def test_defaults_and_preset_values_are_not_settings(method):
    """A saved config carries every field; values equal to the defaults or the preset's are not "set"."""
    budget = {"keep_ratio": 0.9} if method == "tome" else {"target_tokens": 64}
    config = PiToMeConfig(method=method, **budget)
    assert PiToMeConfig.from_dict(config.to_dict()) == config
    pure = {"preset": "pure"} if method != "mllm" else {}
    assert PiToMeConfig(method=method, **budget, **pure).method == method  # prop_attn=True is pure's own


def test_values_in_messages_are_cut():
    with pytest.raises(ValueError) as error:
        PiToMeConfig(method="x" * 100_000, keep_ratio=0.9)
    assert len(str(error.value)) < 500


@pytest.mark.parametrize(
    ("text", "error_type", "message"),
    [
        ("/missing/config.json", FileNotFoundError, "config file '/missing/config.json' does not exist"),
        ("{not json", ValueError, "config JSON is not valid JSON"),
    ],
)
def test_from_json_errors_say_what_was_read(text, error_type, message):
    with pytest.raises(error_type, match=message):
        PiToMeConfig.from_json(text)


def test_from_json_of_a_file_that_is_not_an_object(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"config file .*config.json' must hold a JSON object"):
        PiToMeConfig.from_json(path)
    path.write_text("{oops")
    with pytest.raises(ValueError, match=r"config.json' is not valid JSON"):
        PiToMeConfig.from_json(path)
