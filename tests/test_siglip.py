"""`pitome_mllm.patch` on a transformers LLaVA whose vision tower is SigLIP (no class token).

Without a class token every tower token may merge, the schedule counts all of them,
nothing is dropped before the projector and the processor's count has no extra token.
Exactness claims use ``torch.equal``.
"""

from __future__ import annotations

import pytest
import torch

import pitome_mllm
from pitome_mllm.models.llava_hf import image_features_per_image
from pitome_mllm.schedule import plan_layers
from pitome_mllm.testing.llava import PROMPT, encode, logits_of, placeholder_counts
from pitome_mllm.zoo.tiny import SIGLIP_TEST_SPEC, build_tiny_siglip_llava

pytestmark = pytest.mark.model_facing


@pytest.fixture(scope="module")
def siglip_llava():
    return build_tiny_siglip_llava()


def test_schedule_counts_every_token_without_class_token(siglip_llava):
    model, processor = siglip_llava
    num_layers = SIGLIP_TEST_SPEC.vision_layers
    steps = plan_layers(SIGLIP_TEST_SPEC.num_patches, num_layers, 0.9, class_token=False)
    with pitome_mllm.patched(model, processor, keep_ratio=0.9) as handle:
        assert handle.schedule == steps
        # Nothing is dropped before the projector: the last step's output is what the LLM gets.
        assert handle.num_visual_tokens == steps[-1].tokens_out
        assert steps[0].tokens_in == SIGLIP_TEST_SPEC.num_patches


@pytest.mark.parametrize(
    "settings", [{"keep_ratio": 0.9}, {"target_tokens": 20}, {"keep_ratio": 0.95, "preset": "pure"}]
)
def test_llm_receives_the_planned_count(siglip_llava, images, settings):
    model, processor = siglip_llava
    with pitome_mllm.patched(model, processor, **settings) as handle:
        expected = handle.num_visual_tokens
        inputs = encode(processor, [images["chelsea"], images["coffee"]], [PROMPT, PROMPT])
        assert placeholder_counts(processor, inputs) == [expected, expected]
        with torch.no_grad():
            features = image_features_per_image(model, inputs["pixel_values"])
            generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert [f.shape[0] for f in features] == [expected, expected]
        assert generated.shape[1] == inputs["input_ids"].shape[1] + 3
        # Every one of the 64 patches lands in exactly one LLM token.
        token_map = handle.final_token_map
        assert token_map.shape == (2, SIGLIP_TEST_SPEC.num_patches)
        assert token_map.min() >= 0 and token_map.max() < expected
    if "target_tokens" in settings:
        assert expected == settings["target_tokens"]


def test_keep_ratio_one_and_unpatch_are_exact(siglip_llava, images):
    model, processor = siglip_llava
    inputs = encode(processor, [images["astronaut"]], [PROMPT])
    before = logits_of(model, inputs)
    with pitome_mllm.patched(model, processor, keep_ratio=1.0) as handle:
        assert handle.num_visual_tokens == SIGLIP_TEST_SPEC.num_patches
        assert torch.equal(logits_of(model, encode(processor, [images["astronaut"]], [PROMPT])), before)
    with pitome_mllm.patched(model, processor, keep_ratio=0.9):
        pass
    after_inputs = encode(processor, [images["astronaut"]], [PROMPT])
    assert torch.equal(after_inputs["input_ids"], inputs["input_ids"])
    assert torch.equal(logits_of(model, after_inputs), before)


def test_default_strategy_on_siglip_is_rejected(siglip_llava):
    model, processor = siglip_llava
    model.config.vision_feature_select_strategy = "default"
    try:
        with pytest.raises(ValueError, match="no class token.*'full'"):
            pitome_mllm.patch(model, processor, keep_ratio=0.9)
    finally:
        model.config.vision_feature_select_strategy = "full"
    assert pitome_mllm.get_patch(model) is None
