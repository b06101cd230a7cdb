"""The baselines and controls: ``random``, ``pool``, ``dominant`` and the zero-token floor.

Each is checked end to end on the tiny LLaVA (`TEST_SPEC`: 112 px, an 8 x 8 patch grid,
6 CLIP layers, LLaVA reads the output of layer 4): the exact budget (placeholders and the
features LLaVA scatters into them), the class token dropped before the selection (the
tokens equal a hand computation on the unpatched tower's patch features), exact undo,
batch independence, and what is specific to each method. The merge-free selection
functions are also checked on plain tensors.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import pitome_mllm
from pitome_mllm.merge.select import (
    cls_attention,
    contextual_groups,
    dominant_and_contextual,
    dominant_split,
    pool_grid,
    pool_patches,
    pool_token_map,
    random_keep_indices,
    top_indices,
)
from pitome_mllm.testing.llava import (
    encode,
    features_reaching_llm,
    one_torch_thread,
    pitome_leftovers,
    placeholder_counts,
    prefill_features,
)
from pitome_mllm.zoo.tiny import TEST_SPEC

pytestmark = pytest.mark.model_facing

BUDGET = 16  # of the 64 patches; pools the 8 x 8 grid to 4 x 4, i.e. 2 x 2 windows
SELECTED_LAYER = TEST_SPEC.vision_layers - 2  # hidden_states[-2] is the output of this layer
METHODS = ("random", "pool", "dominant")


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread (conftest's guard unpatches a shared model a failing test left patched)."""
    with one_torch_thread():
        yield


# ---------------------------------------------------------------------------------------------- helpers
def unpatched_patch_features(model, pixel_values) -> torch.Tensor:
    """``[B, 64, C]``: what unpatched LLaVA hands its projector (selected layer, class token dropped)."""
    assert pitome_mllm.get_patch(model) is None
    with torch.no_grad():
        hidden = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states
    return hidden[model.config.vision_feature_layer][:, 1:]


def project(model, features: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.model.multi_modal_projector(features)


# ---------------------------------------------------------------------------------------------- budgets
@pytest.mark.parametrize("method", METHODS)
def test_each_method_lands_exactly_on_its_budget(tiny_llava, images, method):
    model, processor = tiny_llava
    batch = [images["astronaut"], images["coffee"]]
    with pitome_mllm.patched(model, processor, method=method, target_tokens=BUDGET) as handle:
        assert handle.num_visual_tokens == BUDGET  # before the model ever ran
        assert handle.keep_ratio == 1.0 and all(step.method == "none" for step in handle.schedule)
        inputs = encode(processor, batch)
        assert placeholder_counts(processor, inputs) == [BUDGET, BUDGET]
        with features_reaching_llm(model) as seen, torch.no_grad():
            new_tokens = model.generate(**inputs, max_new_tokens=2, do_sample=False)
        assert new_tokens.shape[1] == inputs["input_ids"].shape[1] + 2
        assert [features.shape[0] for features in seen] == [2 * BUDGET]
        token_map = handle.final_token_map
        assert token_map.shape == (2, TEST_SPEC.num_patches)
        held = token_map[token_map >= 0]
        assert held.max() == BUDGET - 1 and set(held.tolist()) == set(range(BUDGET))


def test_target_tokens_zero_is_the_floor_without_visual_tokens(tiny_llava, images):
    model, processor = tiny_llava
    with pitome_mllm.patched(model, processor, method="none", target_tokens=0) as handle:
        assert handle.num_visual_tokens == 0
        inputs = encode(processor, [images["chelsea"], images["coffee"]])
        assert placeholder_counts(processor, inputs) == [0, 0]
        text_only = processor.tokenizer(["USER: \nWhat is this? ASSISTANT:"] * 2, return_tensors="pt")
        assert torch.equal(inputs["input_ids"], text_only["input_ids"])
        with features_reaching_llm(model) as seen, torch.no_grad():
            generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
            text_logits = model(**text_only).logits
            floor_logits = model(**inputs).logits
        assert generated.shape == (2, inputs["input_ids"].shape[1] + 3)
        assert all(features.shape[0] == 0 for features in seen)
        # The image changes nothing: the LLM sees the text alone.
        assert torch.equal(floor_logits, text_logits)
        assert bool((handle.final_token_map == -1).all())


# ---------------------------------------------------------------------------------------------- class token
def test_random_keeps_the_seeded_patches_and_drops_the_class_token(tiny_llava, images):
    model, processor = tiny_llava
    inputs = encode(processor, images["astronaut"])
    patches = unpatched_patch_features(model, inputs["pixel_values"])
    kept = random_keep_indices(TEST_SPEC.num_patches, BUDGET, seed=3)
    expected = project(model, patches[:, kept])[0]
    with pitome_mllm.patched(model, processor, method="random", target_tokens=BUDGET, seed=3) as handle:
        features = prefill_features(model, encode(processor, images["astronaut"]))
        token_map = handle.final_token_map[0]
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal((token_map >= 0).nonzero().flatten(), kept)  # kept patches, raster order
    assert torch.equal(token_map[kept], torch.arange(BUDGET))


def test_pool_is_a_2x2_average_of_the_patch_grid(tiny_llava, images):
    model, processor = tiny_llava
    inputs = encode(processor, images["chelsea"])
    patches = unpatched_patch_features(model, inputs["pixel_values"])  # [1, 64, C], raster order
    grid = patches.view(1, 8, 8, -1)
    by_hand = (grid[:, 0::2, 0::2] + grid[:, 0::2, 1::2] + grid[:, 1::2, 0::2] + grid[:, 1::2, 1::2]) / 4
    expected = project(model, by_hand.reshape(1, BUDGET, -1))[0]
    with pitome_mllm.patched(model, processor, method="pool", target_tokens=BUDGET) as handle:
        features = prefill_features(model, encode(processor, images["chelsea"]))
        token_map = handle.final_token_map[0].view(8, 8)
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-6)
    rows, columns = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    assert torch.equal(token_map, (rows // 2) * 4 + columns // 2)


def test_dominant_cls_attention_equals_eager_attention(tiny_llava, images):
    model, processor = tiny_llava
    assert model.config.vision_config._attn_implementation == "sdpa"  # the patch must not change it
    inputs = encode(processor, [images["astronaut"], images["coffee"]])
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = eager.model.vision_tower(inputs["pixel_values"], output_attentions=True).attentions
    eager_cls = attentions[SELECTED_LAYER][:, :, 0, 1:].mean(dim=1)  # [2, 64]: CLS row over patches
    patches = unpatched_patch_features(model, inputs["pixel_values"])

    with pitome_mllm.patched(model, processor, method="dominant", target_tokens=BUDGET) as handle:
        features = prefill_features(model, encode(processor, [images["astronaut"], images["coffee"]]))
        features = features.view(2, BUDGET, -1)
        stage = handle._adapter.projector_stage
        assert model.config.vision_config._attn_implementation == "sdpa"
        torch.testing.assert_close(stage.cls_attention, eager_cls, rtol=1e-5, atol=1e-6)
        token_map = handle.final_token_map

    num_dominant, num_contextual = dominant_split(BUDGET)
    assert (num_dominant, num_contextual) == (14, 2)
    dominant = top_indices(eager_cls, num_dominant)
    # Dominant tokens: the top patches by CLS attention, in raster order, unchanged by the projector.
    torch.testing.assert_close(
        features[:, :num_dominant],
        project(model, patches.gather(1, dominant.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))),
        rtol=1e-5,
        atol=1e-6,
    )
    for item in range(2):
        assert torch.equal(token_map[item, dominant[item]], torch.arange(num_dominant))
    # Every other patch sits in one of the contextual tokens; none is dropped.
    assert bool((token_map >= 0).all())
    assert int((token_map >= num_dominant).sum()) == 2 * (TEST_SPEC.num_patches - num_dominant)


# ---------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize(
    "settings",
    [{"method": m, "target_tokens": BUDGET} for m in METHODS] + [{"method": "none", "target_tokens": 0}],
    ids=[*METHODS, "zero"],
)
def test_unpatch_restores_bit_identical_logits(tiny_llava, images, settings):
    model, processor = tiny_llava
    inputs = encode(processor, images["coffee"])
    with torch.no_grad():
        reference = model(**inputs).logits
    handle = pitome_mllm.patch(model, processor, **settings)
    with torch.no_grad():
        patched_logits = model(**encode(processor, images["coffee"])).logits
    assert patched_logits.shape[1] == reference.shape[1] - TEST_SPEC.num_patches + settings["target_tokens"]
    handle.unpatch()
    assert pitome_leftovers(model) == []
    restored = encode(processor, images["coffee"])
    assert torch.equal(restored["input_ids"], inputs["input_ids"])
    with torch.no_grad():
        assert torch.equal(model(**restored).logits, reference)


@pytest.mark.parametrize("method", METHODS)
def test_batch_of_two_equals_each_image_alone(tiny_llava, images, method):
    model, processor = tiny_llava
    pair = [images["astronaut"], images["chelsea"]]
    with pitome_mllm.patched(model, processor, method=method, target_tokens=BUDGET) as handle:
        batch_features = prefill_features(model, encode(processor, pair)).view(2, BUDGET, -1)
        batch_map = handle.final_token_map.clone()
        for item, image in enumerate(pair):
            alone = prefill_features(model, encode(processor, image))
            torch.testing.assert_close(alone, batch_features[item], rtol=1e-5, atol=1e-5)
            assert torch.equal(handle.final_token_map[0], batch_map[item])


def test_random_is_reproducible_under_a_seed_and_differs_across_seeds(tiny_llava, images):
    model, processor = tiny_llava

    def kept_patches(seed: int) -> torch.Tensor:
        with pitome_mllm.patched(model, processor, method="random", target_tokens=BUDGET, seed=seed) as handle:
            prefill_features(model, encode(processor, images["chelsea"]))
            return (handle.final_token_map[0] >= 0).nonzero().flatten()

    first = kept_patches(0)
    assert torch.equal(kept_patches(0), first)
    assert not torch.equal(kept_patches(1), first)
    assert torch.equal(first, random_keep_indices(TEST_SPEC.num_patches, BUDGET, 0))


# ---------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"method": "random", "target_tokens": 16, "keep_ratio": 0.9}, r"keep_ratio must be None or 1\.0, got 0\.9"),
        ({"method": "pool"}, r"method='pool' needs target_tokens"),
        (
            {"method": "pitome", "target_tokens": 0},
            r"got 0 \(target_tokens=0, .* valid only with method='none'; got method='pitome'\)",
        ),
        ({"method": "pool", "target_tokens": 7}, r"target_tokens=7 has no pooled grid on the 8x8 .* \[6, 8\]"),
        ({"method": "dominant", "target_tokens": 65}, r"target_tokens=65 is larger than the 64"),
        ({"method": "random", "target_tokens": 16, "seed": True}, r"seed must be an integer, got True"),
    ],
    ids=["keep_ratio", "no_budget", "zero_pitome", "pool_prime", "over_budget", "seed_bool"],
)
def test_bad_baseline_settings_are_refused_before_patching(tiny_llava, settings, message):
    model, processor = tiny_llava
    with pytest.raises(ValueError, match=message):
        pitome_mllm.patch(model, processor, **settings)
    assert pitome_mllm.get_patch(model) is None and pitome_leftovers(model) == []


def test_keep_ratio_one_is_accepted_for_the_baselines():
    config = pitome_mllm.PiToMeConfig(method="pool", target_tokens=64, keep_ratio=1.0)
    assert not config.merges_in_tower


# ---------------------------------------------------------------------------------------------- pure functions
def test_pool_grid_picks_the_factorisation_closest_to_the_grid():
    grid = (24, 24)
    assert [pool_grid(k, grid) for k in (64, 128, 144, 192, 576)] == [(8, 8), (8, 16), (12, 12), (12, 16), (24, 24)]
    assert pool_grid(8, (4, 8)) == (2, 4)  # follows a wide grid
    with pytest.raises(ValueError, match=r"nearest budgets that have one: \[60, 63\]"):
        pool_grid(61, grid)


def test_pool_with_overlapping_windows_matches_adaptive_pooling():
    features = torch.randn(2, 24 * 24, 5)
    pooled = pool_patches(features, (24, 24), (8, 16))
    image = features.transpose(1, 2).reshape(2, 5, 24, 24)
    expected = F.adaptive_avg_pool2d(image, (8, 16)).flatten(2).transpose(1, 2)
    torch.testing.assert_close(pooled, expected)
    token_map = pool_token_map((24, 24), (8, 16))
    assert token_map.shape == (576,) and token_map.max() == 127 and token_map.unique().numel() == 128


def test_cls_attention_is_a_mean_of_per_head_softmax_rows():
    queries, keys = torch.randn(2, 10, 8), torch.randn(2, 10, 8)
    attention = cls_attention(queries, keys, num_heads=2)
    q = queries.view(2, 10, 2, 4).transpose(1, 2)
    k = keys.view(2, 10, 2, 4).transpose(1, 2)
    expected = ((q @ k.transpose(-1, -2)) / 2.0).softmax(-1)[:, :, 0].mean(1)
    torch.testing.assert_close(attention, expected)
    torch.testing.assert_close(attention.sum(-1), torch.ones(2))


def test_dominant_and_contextual_on_plain_tensors():
    features = torch.randn(3, 64, 6)
    scores = torch.rand(3, 64)
    merged, token_map = dominant_and_contextual(features, scores, features, 64)
    assert merged.shape == (3, 64, 6) and bool((token_map >= 0).all())
    merged, token_map = dominant_and_contextual(features, scores, features, 1)
    assert merged.shape == (3, 1, 6) and int((token_map == 0).sum()) == 3 and int((token_map == -1).sum()) == 189
    groups = contextual_groups(torch.randn(1, 9, 4), 3)
    assert groups[0, [0, 3, 6]].tolist() == [0, 1, 2]  # centres head their own groups
    assert dominant_split(64) == (54, 10) and dominant_split(192) == (162, 30)


def test_baselines_and_floor_on_the_original_llava_code(tmp_path, images):
    """The same stage on the original code's `LlavaLlamaForCausalLM`: spliced lengths and exact undo."""
    pytest.importorskip("llava", reason="the original LLaVA code is not installed (pip install --no-deps llava-torch)")
    from pitome_mllm.runtime import llava_original as original_runtime
    from pitome_mllm.zoo import tiny_llava_original as original_tiny

    model, tokenizer, image_processor = original_tiny.build_tiny_llava_original(tmp_path)
    prompt = original_runtime.build_prompt([("What is this?", None)])
    input_ids = original_runtime.tokenize_prompt(prompt, tokenizer)[None]
    pixels = original_runtime.prepare_images([images["chelsea"]], image_processor, model)
    with torch.no_grad():
        reference = model(input_ids=input_ids, images=pixels).logits
    for settings in [
        *({"method": m, "target_tokens": BUDGET} for m in METHODS),
        {"target_tokens": 0, "method": "none"},
    ]:
        with pitome_mllm.patched(model, None, **settings) as handle, torch.no_grad():
            logits = model(input_ids=input_ids, images=pixels).logits
            assert handle.num_visual_tokens == settings["target_tokens"]
            assert logits.shape[1] == reference.shape[1] - TEST_SPEC.num_patches + settings["target_tokens"]
    with torch.no_grad():
        assert torch.equal(model(input_ids=input_ids, images=pixels).logits, reference)
