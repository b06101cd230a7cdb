"""`pitome_mllm.patch` with bad and unusual input: copies, arguments in the wrong place,
settings that would be ignored, numpy scalars, out-of-range feature layers, and prompts
that do not carry the patched placeholder count (greedy and beam search)."""

from __future__ import annotations

import copy
import inspect
import pickle

import numpy as np
import pytest
import torch

import pitome_mllm
from pitome_mllm import PiToMeConfig
from pitome_mllm.testing.llava import encode, logits_of, pitome_leftovers
from pitome_mllm.zoo.tiny import TEST_SPEC, build_tiny_llava

pytestmark = pytest.mark.model_facing


# ------------------------------------------------------------------------------------------------ copies
def test_deepcopy_of_a_patched_model_is_refused_with_a_remedy(tiny_llava, images):
    model, processor = tiny_llava
    with pitome_mllm.patched(model, processor, keep_ratio=0.9):
        inputs = encode(processor, [images["astronaut"]])
        before = logits_of(model, inputs)
        with pytest.raises(TypeError, match=r"cannot be copied or pickled.*handle\.unpatch\(\)"):
            copy.deepcopy(model)
        # The refused copy left the patched original as it was.
        assert torch.equal(logits_of(model, inputs), before)
    assert pitome_leftovers(model) == []


def test_pickling_a_patched_model_is_refused_with_a_remedy():
    # Fresh: after a first forward, transformers' own output-capturing hooks are local functions.
    model, processor = build_tiny_llava(TEST_SPEC)
    with pitome_mllm.patched(model, processor, keep_ratio=0.9):
        with pytest.raises(TypeError, match=r"cannot be copied or pickled.*handle\.unpatch\(\)"):
            pickle.dumps(model)
    assert pickle.loads(pickle.dumps(model)) is not model


def test_a_copy_made_after_unpatching_patches_independently(images):
    model, processor = build_tiny_llava(TEST_SPEC)
    clone = copy.deepcopy(model)
    # A processor counts for one patched model at a time: the original gets its own copy.
    own_processor = copy.deepcopy(processor)
    with pitome_mllm.patched(clone, processor, keep_ratio=0.9) as clone_handle:
        inputs = encode(processor, [images["coffee"]])
        patched_clone = logits_of(clone, inputs)
        with pitome_mllm.patched(model, own_processor, keep_ratio=0.9):
            assert torch.equal(logits_of(model, inputs), patched_clone)
            # Changing the copy's tower changes the copy only: its layers run its own weights.
            with torch.no_grad():
                for parameter in clone.model.vision_tower.parameters():
                    parameter.zero_()
            assert not torch.equal(logits_of(clone, inputs), patched_clone)
            assert torch.equal(logits_of(model, inputs), patched_clone)
        clone_handle.unpatch()
    assert pitome_leftovers(clone) == [] and pitome_leftovers(model) == []


# ---------------------------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    ("args", "hint"),
    [((0.9,), "keep_ratio=0.9"), (("pitome",), "method='pitome'"), ((np.float32(0.9),), "keep_ratio=")],
)
def test_settings_in_the_config_position_raise_a_type_error_naming_the_signature(tiny_llava, args, hint):
    model, processor = tiny_llava
    with pytest.raises(TypeError, match=r"pitome_mllm\.patch\(model, processor=None, config=None") as error:
        pitome_mllm.patch(model, processor, *args)
    assert hint in str(error.value)
    assert pitome_mllm.get_patch(model) is None and pitome_leftovers(model) == []


@pytest.mark.parametrize("model", [None, "llava-hf/llava-1.5-7b-hf", 3])
def test_a_model_that_is_not_a_module_raises_a_type_error(tiny_llava, model):
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
        pitome_mllm.patch(model, tiny_llava[1], keep_ratio=0.9)


def test_a_number_in_the_processor_position_raises_a_type_error(tiny_llava):
    model, _ = tiny_llava
    with pytest.raises(TypeError, match="processor must be the model's processor or None"):
        pitome_mllm.patch(model, 0.9)
    assert pitome_mllm.get_patch(model) is None


# ---------------------------------------------------------------------------------------- ignored settings
def test_method_none_refuses_a_keep_ratio_it_would_ignore(tiny_llava):
    model, processor = tiny_llava
    with pytest.raises(ValueError, match=r"method='none'.*keep_ratio=0.9 would be ignored"):
        pitome_mllm.patch(model, processor, method="none", keep_ratio=0.9)
    with pytest.raises(ValueError, match="would be ignored"):
        PiToMeConfig(method="none", keep_ratio=0.9, target_tokens=32)
    assert pitome_mllm.get_patch(model) is None
    # keep_ratio=1.0 merges nothing either way, and stays allowed.
    assert PiToMeConfig(method="none", keep_ratio=1.0, target_tokens=32).target_tokens == 32


def test_numpy_scalars_are_accepted_as_their_python_values(tiny_llava):
    model, processor = tiny_llava
    config = PiToMeConfig(keep_ratio=np.float32(0.9), target_tokens=np.int64(32))
    assert type(config.target_tokens) is int and type(config.keep_ratio) is float
    assert config.target_tokens == 32 and config.keep_ratio == pytest.approx(0.9)
    assert PiToMeConfig.from_json(config.to_json()) == config
    # The seed is read by method="random" only (any other method refuses it as ignored).
    seeded = PiToMeConfig(method="random", target_tokens=np.int64(32), seed=np.int32(3))
    assert type(seeded.seed) is int and seeded.seed == 3
    assert PiToMeConfig.from_json(seeded.to_json()) == seeded
    with pitome_mllm.patched(model, processor, keep_ratio=np.float32(0.9)) as handle:
        from_numpy = handle.num_visual_tokens
    with pitome_mllm.patched(model, processor, keep_ratio=float(np.float32(0.9))) as handle:
        assert handle.num_visual_tokens == from_numpy


@pytest.mark.parametrize("feature_layer", [100, 7, -8])
def test_an_out_of_range_feature_layer_is_refused_not_wrapped(feature_layer):
    model, processor = build_tiny_llava(TEST_SPEC)  # 6 CLIP layers: hidden_states has 7 entries
    model.config.vision_feature_layer = feature_layer
    with pytest.raises(ValueError, match=rf"vision feature layer {feature_layer} is out of range.*-7 \.\. 6"):
        pitome_mllm.patch(model, processor, keep_ratio=0.9)
    assert pitome_mllm.get_patch(model) is None and pitome_leftovers(model) == []


# ------------------------------------------------------------------------------------ placeholder counts
def test_patching_without_the_processor_warns_with_the_count_prompts_need(tiny_llava):
    model, _ = tiny_llava
    with pytest.warns(UserWarning, match=r"without its processor.*num_visual_tokens=(\d+)") as record:
        handle = pitome_mllm.patch(model, None, keep_ratio=0.9)
    assert f"num_visual_tokens={handle.num_visual_tokens}" in str(record[0].message)
    handle.unpatch()


def placeholder_mismatch(placeholders: int, visual_tokens: int) -> str:
    """The error a prompt with the unpatched placeholder count gets from ``generate`` under a patch.

    Releases whose ``LlavaModel.forward`` takes ``mm_encoder_outputs`` (5.19 on) encode the images
    before the first forward, so the patch compares the counts itself; earlier ones (4.57, 5.16, 5.17)
    encode them in every forward, where transformers' own check fails and the patch adds the remedy.
    """
    from transformers import LlavaModel

    if "mm_encoder_outputs" not in inspect.signature(LlavaModel.forward).parameters:
        return r"Image features and image tokens do not match.*pass the processor"
    return rf"{placeholders} image placeholders.*{visual_tokens} visual tokens.*pass the processor"


def test_an_unpatched_prompt_under_a_patch_says_what_to_do(tiny_llava, images):
    model, processor = tiny_llava
    inputs = encode(processor, [images["astronaut"]])  # the unpatched processor: 64 placeholders
    with pytest.warns(UserWarning):
        handle = pitome_mllm.patch(model, None, keep_ratio=0.9)
    with handle:
        # A forward with pixel_values: transformers' own check fails, with the remedy added.
        with pytest.raises(ValueError, match=r"Image features and image tokens do not match.*pass the processor"):
            logits_of(model, inputs)
        with pytest.raises(ValueError, match=placeholder_mismatch(64, 40)):
            model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert handle.num_visual_tokens == 40


@pytest.mark.parametrize("use_embeddings", [False, True], ids=["input_ids", "inputs_embeds"])
def test_beam_search_with_an_unpatched_prompt_gets_the_clear_error(tiny_llava, images, use_embeddings):
    """generate() splits pre-encoded features between beams by matching cumulative placeholder
    and feature counts; with the unpatched count nothing matches and the model used to get an
    empty feature list (torch.cat(): expected a non-empty list of Tensors)."""
    model, processor = tiny_llava
    inputs = encode(processor, [images["astronaut"]])
    kwargs = {"max_new_tokens": 2, "num_beams": 2, "do_sample": False}
    if use_embeddings:
        kwargs["inputs_embeds"] = model.get_input_embeddings()(inputs["input_ids"])
        kwargs.update(pixel_values=inputs["pixel_values"], attention_mask=inputs["attention_mask"])
    else:
        kwargs.update(inputs)
    with pytest.warns(UserWarning), pitome_mllm.patched(model, None, keep_ratio=0.9):
        with pytest.raises(ValueError, match=placeholder_mismatch(128, 0)):
            with torch.no_grad():
                model.generate(**kwargs)


def test_beam_search_with_the_patched_processor_matches_the_placeholders(tiny_llava, images):
    model, processor = tiny_llava
    with pitome_mllm.patched(model, processor, keep_ratio=0.9) as handle:
        inputs = encode(processor, [images["astronaut"], images["coffee"]])
        assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 2 * handle.num_visual_tokens
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=3, num_beams=2, do_sample=False)
    assert output.shape[0] == 2 and output.shape[1] > inputs["input_ids"].shape[1]
