"""The method registry (`pitome_mllm.methods`): one entry per method, capabilities as data that behaviour follows.

The table is checked against the config's vocabulary and the tensor implementations, and its
capabilities against what the patched tiny models do: every method a tower without a class token
can serve runs there, every other one is refused with a message naming the capability, and every
method declared exact at keep-all reproduces the unpatched model bit for bit.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import pitome_mllm
from pitome_mllm import PiToMeConfig, config
from pitome_mllm.merge.reducers import REDUCERS, ReductionInputs, reduce_to_budget
from pitome_mllm.methods import (
    KINDS,
    METHOD_SPECS,
    PROJECTOR,
    STAGES,
    TOWER,
    capability_error,
    method_label,
    method_of_preset,
    method_spec,
    methods_reading,
    methods_where,
)
from pitome_mllm.testing.llava import one_torch_thread, pitome_leftovers
from pitome_mllm.zoo.tiny import TEST_SPEC, build_tiny_siglip_llava

pytestmark = pytest.mark.model_facing

NUM_PATCHES = TEST_SPEC.num_patches  # 64
PROMPTS = ("USER: <image>\nWhat is this? ASSISTANT:", "USER: <image>\nWhat colour is the cup on the table? ASSISTANT:")
CONFIG_FIELDS = {field.name for field in dataclasses.fields(PiToMeConfig)}


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread (conftest's guard unpatches a shared model a failing test left patched)."""
    with one_torch_thread():
        yield


# ------------------------------------------------------------------------------------------ the table
def test_every_method_of_the_config_vocabulary_has_one_entry():
    assert tuple(METHOD_SPECS) == config.ALL_METHODS
    assert all(name == spec.name for name, spec in METHOD_SPECS.items())
    assert "mllm" in config.ALL_METHODS  # a method, no longer only a preset


@pytest.mark.parametrize("name", list(METHOD_SPECS))
def test_each_entry_is_well_formed(name):
    spec = METHOD_SPECS[name]
    assert spec.stage in STAGES and spec.kind in KINDS
    assert spec.reads <= CONFIG_FIELDS, f"{name} reads fields PiToMeConfig does not have: {spec.reads - CONFIG_FIELDS}"
    assert {"method", "target_tokens"} <= spec.reads
    if spec.stage == PROJECTOR:
        assert spec.implementation in REDUCERS and spec.needs_target_tokens
    else:
        assert spec.implementation is None and not spec.needs_class_attention and not spec.needs_prompt
    assert spec.works_without_class_token == (not spec.needs_class_token)
    assert spec.own_preset is None or spec.own_preset in config.PRESETS


def test_the_public_name_tuples_keep_their_meaning():
    assert config.MERGE_METHODS == ("pitome", "tome")
    assert config.METHODS == ("pitome", "tome", "none")
    assert config.SELECTION_METHODS == ("random", "pool", "dominant", "visionzip", "fastervlm", "divprune", "cdpruner")
    assert config.INSTRUCTION_METHODS == ("cdpruner",)
    # Every method ranking patches by the class token's attention, mllm now among them.
    assert config.CLS_ATTENTION_METHODS == ("dominant", "visionzip", "fastervlm", "mllm")
    assert methods_where(stage=PROJECTOR) == (*config.SELECTION_METHODS, "mllm")
    assert methods_where(in_vllm=False) == config.INSTRUCTION_METHODS


def test_presets_and_settings_are_answered_by_the_registry():
    assert method_of_preset("mllm") == "mllm" and method_of_preset("reference") is None
    assert methods_reading("energy_share") == ("mllm",) and "seed" in method_spec("random").reads
    assert method_label("fastervlm", "reference") == "method='fastervlm'"
    assert method_label("mllm", "mllm") == "method='mllm' with preset='mllm'"
    with pytest.raises(ValueError, match=r"method must be one of \('pitome', .*'mllm'\), got 'qwen'"):
        method_spec("qwen")
    with pytest.raises(ValueError, match="unknown method capability 'flies'"):
        methods_where(flies=True)
    with pytest.raises(ValueError, match="capability must be one of"):
        capability_error("method='x'", "flies", "")


def test_the_reducers_dispatch_by_name_and_refuse_an_unknown_one():
    features = torch.randn(2, 16, 8)
    tokens, token_map = reduce_to_budget("random", ReductionInputs(features, 5, seed=3))
    assert tokens.shape == (2, 5, 8) and token_map.shape == (2, 16)
    with pytest.raises(ValueError, match=r"implementation must be one of .*got 'mllm'"):
        reduce_to_budget("mllm", ReductionInputs(features, 5))  # the method's implementation is "select_merge"


# -------------------------------------------------------------------------------- capabilities in action
def refusal_of(capability: str) -> str:
    return rf"\(method capability: {capability}\)"


@pytest.mark.parametrize("method", methods_where(stage=PROJECTOR))
def test_a_tower_without_a_class_token_serves_exactly_the_methods_that_need_none(method, images):
    model, processor = build_tiny_siglip_llava()
    spec = method_spec(method)
    if spec.needs_class_token:
        with pytest.raises(ValueError, match=r"ranks patches by the class token's attention; .*no class token"):
            pitome_mllm.patch(model, processor, method=method, target_tokens=16)
        with pytest.raises(ValueError, match=refusal_of("needs_class_token")):
            pitome_mllm.patch(model, processor, method=method, target_tokens=16)
        assert pitome_mllm.get_patch(model) is None and pitome_leftovers(model) == []
        return
    with pitome_mllm.patched(model, processor, method=method, target_tokens=16) as handle:
        inputs = processor(images=[images["coffee"]], text=list(PROMPTS[:1]), return_tensors="pt")
        with torch.no_grad():
            model(**inputs)
        assert handle.num_visual_tokens == 16 and handle.final_token_map.shape[0] == 1
        assert set(handle.final_token_map[0][handle.final_token_map[0] >= 0].tolist()) == set(range(16))


def test_a_method_that_needs_the_prompt_is_refused_where_there_is_none():
    from pitome_mllm.models.vllm_llava import check_vllm_config

    for method in methods_where(needs_prompt=True):
        with pytest.raises(ValueError, match=refusal_of("needs_prompt")):
            check_vllm_config(PiToMeConfig(method=method, target_tokens=16))
    for method in methods_where(in_vllm=True, stage=PROJECTOR):
        check_vllm_config(PiToMeConfig(method=method, target_tokens=16))


@pytest.mark.parametrize("method", methods_where(stage=PROJECTOR, exact_at_keep_all=True))
def test_methods_declared_exact_at_keep_all_reproduce_the_unpatched_model(tiny_llava, images, method):
    model, processor = tiny_llava
    pair = [images["coffee"], images["chelsea"]]
    inputs = processor(images=pair, text=list(PROMPTS), return_tensors="pt", padding=True)
    with torch.no_grad():
        reference = model(**inputs).logits
    with pitome_mllm.patched(model, processor, method=method, target_tokens=NUM_PATCHES):
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, reference)


@pytest.mark.parametrize("method", methods_where(stage=PROJECTOR, merges_patches=False))
def test_methods_declared_not_to_merge_hand_on_single_patches(tiny_llava, images, method):
    model, processor = tiny_llava
    pair = [images["coffee"], images["chelsea"]]
    with pitome_mllm.patched(model, processor, method=method, target_tokens=16) as handle, torch.no_grad():
        model(**processor(images=pair, text=list(PROMPTS), return_tensors="pt", padding=True))
        assert torch.equal(handle.final_size, torch.ones(2, 16, 1))


def test_the_projector_stage_methods_leave_the_tower_unmerged_and_the_tower_methods_plan_it():
    for name, spec in METHOD_SPECS.items():
        settings = (
            {"target_tokens": 16} if spec.stage == PROJECTOR else {"keep_ratio": 0.9} if spec.merges_in_tower else {}
        )
        patch_config = PiToMeConfig(method=name, **settings)
        assert patch_config.selects_at_projector == (spec.stage == PROJECTOR)
        assert patch_config.merges_in_tower == (spec.stage == TOWER and spec.merges_in_tower)
