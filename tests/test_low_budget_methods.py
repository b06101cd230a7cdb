"""The small-budget methods: ``fastervlm``, ``visionzip``, ``divprune``, ``cdpruner`` and PiToMe's ``mllm`` preset.

End to end on the tiny LLaVA (`TEST_SPEC`: an 8 x 8 patch grid, LLaVA reads the output of
layer 4): exact budgets, batch equals single (for ``cdpruner`` each image with its own prompt),
keep-all exactness, refusals that leave the model untouched, and the selection each method
makes recomputed by hand from the unpatched model's features. The algorithms are also
checked as pure functions on hand-built tensors.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import pitome_mllm
from pitome_mllm import PiToMeConfig
from pitome_mllm.merge.energy import energy_score
from pitome_mllm.merge.select import (
    conditional_kernel,
    dpp_greedy_map,
    energy_and_attention_keep,
    energy_attention_split,
    farthest_point_indices,
    instruction_relevance,
    merge_into_kept,
    select_then_merge,
    top_indices,
)
from pitome_mllm.models import model_parts
from pitome_mllm.testing.llava import encode, one_torch_thread, pitome_leftovers, placeholder_counts, prefill_features
from pitome_mllm.zoo.tiny import TEST_SPEC, build_tiny_llava_next, build_tiny_siglip_llava

pytestmark = pytest.mark.model_facing

PROMPTS = ("USER: <image>\nWhat is this? ASSISTANT:", "USER: <image>\nWhat colour is the cup on the table? ASSISTANT:")
NEW_METHODS = (
    {"method": "fastervlm"},
    {"method": "visionzip"},
    {"method": "divprune"},
    {"method": "cdpruner"},
    {"method": "pitome", "preset": "mllm"},
)
IDS = ("fastervlm", "visionzip", "divprune", "cdpruner", "mllm")
NUM_PATCHES = TEST_SPEC.num_patches  # 64


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread (conftest's guard unpatches a shared model a failing test left patched)."""
    with one_torch_thread():
        yield


# ------------------------------------------------------------------------------------------- budgets
@pytest.mark.parametrize("budget", [1, 7, 16, 63])
@pytest.mark.parametrize("settings", NEW_METHODS, ids=IDS)
def test_each_method_lands_exactly_on_its_budget(tiny_llava, images, settings, budget):
    model, processor = tiny_llava
    pair = (images["astronaut"], images["coffee"])
    with pitome_mllm.patched(model, processor, target_tokens=budget, **settings) as handle:
        assert handle.num_visual_tokens == budget and handle.keep_ratio == 1.0
        assert all(step.method == "none" for step in handle.schedule)  # the tower is not merged
        inputs = encode(processor, pair, PROMPTS)
        assert placeholder_counts(processor, inputs) == [budget, budget]
        with torch.no_grad():
            generated = model.generate(**inputs, max_new_tokens=2, do_sample=False)
        assert generated.shape[1] == inputs["input_ids"].shape[1] + 2
        assert prefill_features(model, inputs).shape[0] == 2 * budget
        token_map = handle.final_token_map
        assert token_map.shape == (2, NUM_PATCHES)
        for row in token_map:
            assert set(row[row >= 0].tolist()) == set(range(budget))  # every token holds a patch
        # VisionZip folds the rest into contextual tokens (none at a budget of 1: 1 dominant + 0).
        merges = settings.get("preset") == "mllm" or (settings["method"] == "visionzip" and budget > 1)
        held = handle.final_size.sum(dim=1).flatten().tolist()
        assert held == ([float(NUM_PATCHES)] * 2 if merges else [float(budget)] * 2)


@pytest.mark.parametrize("settings", NEW_METHODS, ids=IDS)
def test_batch_equals_each_image_alone_with_its_own_prompt(tiny_llava, images, settings):
    model, processor = tiny_llava
    pair = (images["astronaut"], images["chelsea"])
    budget = 16
    with pitome_mllm.patched(model, processor, target_tokens=budget, **settings) as handle:
        batch = prefill_features(model, encode(processor, pair, PROMPTS)).view(2, budget, -1)
        batch_map = handle.final_token_map.clone()
        for item in range(2):
            alone = prefill_features(model, encode(processor, [pair[item]], [PROMPTS[item]]))
            assert torch.equal(handle.final_token_map[0], batch_map[item])
            torch.testing.assert_close(alone, batch[item], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("settings", [s for s in NEW_METHODS if s["method"] != "visionzip"], ids=lambda s: str(s))
def test_keeping_every_patch_reproduces_the_unpatched_model_bit_for_bit(tiny_llava, images, settings):
    model, processor = tiny_llava
    inputs = encode(processor, (images["coffee"], images["chelsea"]), PROMPTS)
    with torch.no_grad():
        reference = model(**inputs).logits
    with pitome_mllm.patched(model, processor, target_tokens=NUM_PATCHES, **settings) as handle:
        patched_inputs = encode(processor, (images["coffee"], images["chelsea"]), PROMPTS)
        assert torch.equal(patched_inputs["input_ids"], inputs["input_ids"])
        with torch.no_grad():
            assert torch.equal(model(**patched_inputs).logits, reference)
        assert torch.equal(handle.final_token_map, torch.arange(NUM_PATCHES).expand(2, -1))
    assert pitome_leftovers(model) == []
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reference)


# -------------------------------------------------------------------------------- each method by hand
def unpatched_vision(model, pixel_values):
    """``(patch features [B, 64, C], class-token attention [B, 64], keys [B, 64, C])`` of the read layer."""
    assert pitome_mllm.get_patch(model) is None
    layer = model_parts(model).encoder_layers[TEST_SPEC.vision_layers - 2]
    captured = {}
    hooks = [
        layer.self_attn.q_proj.register_forward_hook(lambda m, a, out: captured.__setitem__("q", out)),
        layer.self_attn.k_proj.register_forward_hook(lambda m, a, out: captured.__setitem__("k", out)),
    ]
    try:
        with torch.no_grad():
            hidden = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states
    finally:
        for hook in hooks:
            hook.remove()
    heads = layer.self_attn.num_heads
    batch, tokens, channels = captured["k"].shape
    q = captured["q"].view(batch, tokens, heads, -1).transpose(1, 2)
    k = captured["k"].view(batch, tokens, heads, -1).transpose(1, 2)
    attention = ((q[:, :, :1] @ k.transpose(-1, -2)) / math.sqrt(channels // heads)).softmax(-1)[:, :, 0].mean(1)
    return hidden[model.config.vision_feature_layer][:, 1:], attention[:, 1:], captured["k"][:, 1:]


def test_fastervlm_keeps_the_patches_the_class_token_attends_to_most(tiny_llava, images):
    model, processor = tiny_llava
    inputs = encode(processor, (images["astronaut"], images["coffee"]), PROMPTS)
    patches, attention, _ = unpatched_vision(model, inputs["pixel_values"])
    with pitome_mllm.patched(model, processor, method="fastervlm", target_tokens=10) as handle:
        features = prefill_features(model, encode(processor, (images["astronaut"], images["coffee"]), PROMPTS))
        token_map = handle.final_token_map
    for item in range(2):
        kept = attention[item].argsort(descending=True, stable=True)[:10].sort().values
        assert torch.equal((token_map[item] >= 0).nonzero().flatten(), kept)  # raster order
        with torch.no_grad():
            expected = model.model.multi_modal_projector(patches[item, kept])
        torch.testing.assert_close(features.view(2, 10, -1)[item], expected, rtol=1e-5, atol=1e-6)


def test_visionzip_is_the_dominant_method(tiny_llava, images):
    model, processor = tiny_llava
    outputs = {}
    for method in ("dominant", "visionzip"):
        with pitome_mllm.patched(model, processor, method=method, target_tokens=16) as handle:
            inputs = encode(processor, (images["astronaut"],), PROMPTS[:1])
            outputs[method] = (prefill_features(model, inputs), handle.final_token_map.clone())
    assert torch.equal(outputs["dominant"][0], outputs["visionzip"][0])
    assert torch.equal(outputs["dominant"][1], outputs["visionzip"][1])


def test_divprune_selects_the_farthest_points_of_the_projected_tokens(tiny_llava, images):
    model, processor = tiny_llava
    inputs = encode(processor, (images["chelsea"],), PROMPTS[:1])
    patches, _, _ = unpatched_vision(model, inputs["pixel_values"])
    with torch.no_grad():
        projected = model.model.multi_modal_projector(patches)
    kept = farthest_point_indices(projected, 12)[0]
    with pitome_mllm.patched(model, processor, method="divprune", target_tokens=12) as handle:
        features = prefill_features(model, encode(processor, (images["chelsea"],), PROMPTS[:1]))
        assert torch.equal((handle.final_token_map[0] >= 0).nonzero().flatten(), kept)
    torch.testing.assert_close(features, projected[0, kept], rtol=1e-5, atol=1e-6)


def test_cdpruner_conditions_on_the_text_tokens_of_each_images_prompt(tiny_llava, images):
    model, processor = tiny_llava
    pair = (images["astronaut"], images["coffee"])
    inputs = encode(processor, pair, PROMPTS)
    patches, _, _ = unpatched_vision(model, inputs["pixel_values"])
    with torch.no_grad():
        projected = model.model.multi_modal_projector(patches)
    tokenizer = processor.tokenizer
    special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.image_token_id}
    instructions = []
    for prompt in PROMPTS:
        ids = [i for i in tokenizer(prompt)["input_ids"] if i not in special]
        with torch.no_grad():
            instructions.append(model.get_input_embeddings()(torch.tensor(ids)))
    expected = dpp_greedy_map(conditional_kernel(patches, instruction_relevance(projected, instructions)), 12)
    swapped = dpp_greedy_map(conditional_kernel(patches, instruction_relevance(projected, instructions[::-1])), 12)
    assert not torch.equal(expected, swapped)  # the prompt matters for these images
    with pitome_mllm.patched(model, processor, method="cdpruner", target_tokens=12) as handle:
        patched_inputs = encode(processor, pair, PROMPTS)
        with torch.no_grad():
            model.generate(**patched_inputs, max_new_tokens=1, do_sample=False)  # images encoded before prefill
        generate_map = handle.final_token_map.clone()
        prefill_features(model, patched_inputs)  # a plain forward
        for token_map in (generate_map, handle.final_token_map):
            for item in range(2):
                assert torch.equal((token_map[item] >= 0).nonzero().flatten(), expected[item])


def test_cdpruner_refuses_images_that_come_without_a_prompt(tiny_llava, images):
    model, processor = tiny_llava
    inputs = encode(processor, (images["astronaut"],), PROMPTS[:1])
    with pitome_mllm.patched(model, processor, method="cdpruner", target_tokens=12):
        patched_inputs = encode(processor, (images["astronaut"],), PROMPTS[:1])
        message = r"method='cdpruner' .* came without one \(pixel values only.*call the model's forward or generate"
        with pytest.raises(ValueError, match=message):
            model.model.get_image_features(pixel_values=inputs["pixel_values"])
        prefill_features(model, patched_inputs)
        with pytest.raises(ValueError, match=message):  # no prompt is left over from the forward
            model.model.get_image_features(pixel_values=inputs["pixel_values"])


def test_mllm_keeps_isolated_and_attended_patches_and_merges_the_rest(tiny_llava, images):
    model, processor = tiny_llava
    inputs = encode(processor, (images["astronaut"],), PROMPTS[:1])
    patches, attention, keys = unpatched_vision(model, inputs["pixel_values"])
    heads = model.config.vision_config.num_attention_heads
    keys_mean = keys.view(1, NUM_PATCHES, heads, -1).mean(2)
    margin = 0.9 - 0.9 * (TEST_SPEC.vision_layers - 2) / TEST_SPEC.vision_layers
    token_energy = energy_score(keys_mean, margin)
    config = PiToMeConfig(method="pitome", preset="mllm", target_tokens=12)
    assert config.energy_share == 0.5 and config.metric == "keys_mean" and config.reduce == "size_weighted"
    with pitome_mllm.patched(model, processor, config) as handle:
        features = prefill_features(model, encode(processor, (images["astronaut"],), PROMPTS[:1]))
        token_map = handle.final_token_map[0]
        sizes = handle.final_size[0, :, 0]
    by_energy = token_energy[0].argsort(stable=True)[:6]
    rest = attention[0].clone()
    rest[by_energy] = float("-inf")
    by_attention = rest.argsort(descending=True, stable=True)[:6]
    kept = torch.cat([by_energy, by_attention]).sort().values
    assert torch.equal(token_map[kept], torch.arange(12))  # each kept patch heads its own token, raster order
    assert bool((token_map >= 0).all()) and int(sizes.sum()) == NUM_PATCHES  # nothing dropped
    # Each token is the mean of its group's patch features, projected.
    groups = torch.stack([patches[0][token_map == j].mean(0) for j in range(12)])
    with torch.no_grad():
        torch.testing.assert_close(features, model.model.multi_modal_projector(groups), rtol=1e-5, atol=1e-5)


def test_mllm_energy_share_zero_keeps_what_fastervlm_keeps(tiny_llava, images):
    model, processor = tiny_llava
    with pitome_mllm.patched(model, processor, method="fastervlm", target_tokens=9) as handle:
        prefill_features(model, encode(processor, (images["coffee"], images["chelsea"]), PROMPTS))
        fastervlm_map = handle.final_token_map.clone()
    with pitome_mllm.patched(
        model, processor, method="pitome", preset="mllm", target_tokens=9, energy_share=0.0
    ) as handle:
        prefill_features(model, encode(processor, (images["coffee"], images["chelsea"]), PROMPTS))
        mllm_map = handle.final_token_map
    kept = fastervlm_map >= 0
    assert torch.equal(mllm_map[kept], fastervlm_map[kept])


# ---------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"method": "fastervlm", "target_tokens": 65}, r"target_tokens=65 is larger than the 64"),
        ({"method": "divprune"}, r"method='divprune' needs target_tokens"),
        ({"method": "cdpruner", "target_tokens": 16, "keep_ratio": 0.9}, r"keep_ratio must be None or 1\.0, got 0\.9"),
        ({"method": "pitome", "preset": "mllm"}, r"preset='mllm' needs target_tokens .* got None"),
        ({"method": "tome", "preset": "mllm", "target_tokens": 16}, r"method must be 'pitome', got method='tome'"),
        (
            {"method": "pitome", "preset": "mllm", "target_tokens": 16, "keep_ratio": 0.95},
            r"keep_ratio must be None or 1\.0, got 0\.95",
        ),
        (
            {"method": "pitome", "preset": "mllm", "target_tokens": 16, "energy_share": 1.5},
            r"energy_share must be a number in \[0, 1\], got 1\.5",
        ),
        (
            {"method": "pitome", "preset": "reference", "target_tokens": 16, "energy_share": 0.5},
            r"energy_share is a setting of preset \('mllm',\), got preset='reference'",
        ),
        (
            {"method": "pitome", "preset": "mllm", "target_tokens": 16, "prop_attn": True},
            r"preset='mllm' leaves the tower unmerged, so prop_attn=True would do nothing",
        ),
    ],
    ids=[
        "over_budget",
        "no_budget",
        "keep_ratio",
        "mllm_no_budget",
        "mllm_tome",
        "mllm_keep_ratio",
        "share_range",
        "share_other_preset",
        "mllm_prop_attn",
    ],  # fmt: skip
)
def test_configs_a_method_cannot_serve_are_refused_before_patching(tiny_llava, settings, message):
    model, processor = tiny_llava
    with pytest.raises(ValueError, match=message):
        pitome_mllm.patch(model, processor, **settings)
    assert pitome_mllm.get_patch(model) is None and pitome_leftovers(model) == []


def test_llava_next_refuses_the_mllm_preset():
    model, processor = build_tiny_llava_next()
    with pytest.raises(ValueError, match=r"preset='mllm' .* supported presets here: reference, paper, pure"):
        pitome_mllm.patch(model, processor, method="pitome", preset="mllm", target_tokens=16)
    with pytest.raises(ValueError, match=r"method='cdpruner' is not supported on LLaVA-NeXT"):
        pitome_mllm.patch(model, processor, method="cdpruner", target_tokens=16)
    assert pitome_mllm.get_patch(model) is None and pitome_leftovers(model) == []


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"method": "fastervlm"},
            r"method='fastervlm' ranks patches by the class token's attention; .* no class token",
        ),
        ({"method": "pitome", "preset": "mllm"}, r"preset='mllm' ranks patches by the class token's attention"),
    ],
    ids=["fastervlm", "mllm"],
)
def test_class_token_methods_are_refused_on_a_tower_without_one(settings, message):
    model, processor = build_tiny_siglip_llava()
    with pytest.raises(ValueError, match=message):
        pitome_mllm.patch(model, processor, target_tokens=16, **settings)
    assert pitome_mllm.get_patch(model) is None and pitome_leftovers(model) == []
    with pitome_mllm.patched(model, processor, method="divprune", target_tokens=16) as handle:  # no class token needed
        assert handle.num_visual_tokens == 16


def test_the_new_names_are_config_cli_and_json_values():
    from pitome_mllm.cli import build_parser

    for settings in NEW_METHODS:
        config = PiToMeConfig(target_tokens=32, **settings)
        assert PiToMeConfig.from_json(config.to_json()) == config
        assert not config.merges_in_tower and config.selects_at_projector
    mllm = PiToMeConfig(method="pitome", preset="mllm", target_tokens=32)
    assert mllm.energy_share == 0.5
    assert mllm.replace(preset="reference").energy_share is None  # the preset's own default goes with it
    tuned = mllm.replace(energy_share=0.25)
    assert tuned.replace(target_tokens=16).energy_share == 0.25
    with pytest.raises(ValueError, match="energy_share is a setting of preset"):
        tuned.replace(preset="reference")  # a value the user chose is not dropped silently
    for method in ("fastervlm", "visionzip", "divprune", "cdpruner"):
        command = ["chat", "--model", "tiny", "--image", "coffee", "--method", method, "--target-tokens", "32"]
        arguments = build_parser().parse_args(command)
        assert arguments.method == method


# ------------------------------------------------------------------------------ mllm: a method, and its preset
MLLM_SPELLINGS = ({"method": "mllm"}, {"method": "pitome", "preset": "mllm"}, {"method": "mllm", "preset": "mllm"})


def test_method_mllm_and_preset_mllm_give_bit_identical_outputs(tiny_llava, images):
    model, processor = tiny_llava
    pair = (images["astronaut"], images["coffee"])
    results = []
    for settings in MLLM_SPELLINGS:
        with pitome_mllm.patched(model, processor, target_tokens=12, energy_share=0.25, **settings) as handle:
            inputs = encode(processor, pair, PROMPTS)
            with torch.no_grad():
                logits = model(**inputs).logits
            results.append((handle.num_visual_tokens, logits, handle.final_token_map.clone(), handle.final_size))
    first = results[0]
    assert first[0] == 12
    for other in results[1:]:
        assert other[0] == first[0] and all(torch.equal(a, b) for a, b in zip(first[1:], other[1:], strict=True))


def test_both_spellings_of_mllm_are_one_config_and_round_trip():
    by_method = PiToMeConfig(method="mllm", target_tokens=32)
    by_preset = PiToMeConfig(method="pitome", preset="mllm", target_tokens=32)
    assert by_method == by_preset and (by_method.method, by_method.preset) == ("mllm", "mllm")
    assert by_method.energy_share == 0.5 and by_method.metric == "keys_mean" and by_method.reduce == "size_weighted"
    for config in (by_method, by_preset):
        assert PiToMeConfig.from_dict(config.to_dict()) == config
        assert PiToMeConfig.from_json(config.to_json()) == config
    stored = {**by_preset.to_dict(), "method": "pitome"}  # a sweep config written before mllm was a method
    assert PiToMeConfig.from_dict(stored) == by_method
    # The method and its preset move together.
    assert by_method.replace(method="fastervlm") == PiToMeConfig(method="fastervlm", target_tokens=32)
    assert by_method.replace(preset="pure", target_tokens=None, keep_ratio=0.9) == PiToMeConfig(
        preset="pure", keep_ratio=0.9
    )
    assert PiToMeConfig(keep_ratio=0.9).replace(method="mllm", keep_ratio=None, target_tokens=32) == by_method
    command = ["chat", "--model", "tiny", "--image", "coffee", "--method", "mllm", "--target-tokens", "32"]
    from pitome_mllm.cli import build_parser
    from pitome_mllm.cli.chat import checked_patch_config

    arguments = build_parser().parse_args(command)
    assert PiToMeConfig(**checked_patch_config(arguments)) == by_method


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({}, r"method='mllm' with preset='mllm' needs target_tokens .* got None"),
        ({"target_tokens": 16, "keep_ratio": 0.95}, r"keep_ratio must be None or 1\.0, got 0\.95"),
        ({"target_tokens": 16, "prop_attn": True}, r"leaves the tower unmerged, so prop_attn=True would do nothing"),
        ({"target_tokens": 16, "energy_share": 1.5}, r"energy_share must be a number in \[0, 1\], got 1\.5"),
        ({"target_tokens": 16, "preset": "pure"}, r"method='mllm' brings its own preset: preset must be 'mllm'"),
    ],
    ids=["no_budget", "keep_ratio", "prop_attn", "share_range", "other_preset"],
)
def test_method_mllm_keeps_the_refusals_of_the_preset(settings, message):
    with pytest.raises(ValueError, match=message):
        PiToMeConfig(method="mllm", **settings)


def test_energy_share_is_refused_for_every_method_that_does_not_read_it():
    for method in ("pitome", "fastervlm", "divprune"):
        with pytest.raises(ValueError, match=r"energy_share is a setting of preset \('mllm',\).*method='mllm'"):
            PiToMeConfig(method=method, target_tokens=16, energy_share=0.5)


def test_method_mllm_is_refused_where_the_preset_is(images):
    from pitome_mllm.models.vllm_llava import check_vllm_config

    with pytest.raises(ValueError, match=r"method='mllm' with preset='mllm' .* supported presets here: reference"):
        pitome_mllm.patch(*build_tiny_llava_next(), method="mllm", target_tokens=16)
    model, processor = build_tiny_siglip_llava()
    with pytest.raises(ValueError, match=r"method='mllm' with preset='mllm' ranks patches by the class token"):
        pitome_mllm.patch(model, processor, method="mllm", target_tokens=16)
    assert pitome_mllm.get_patch(model) is None
    check_vllm_config(PiToMeConfig(method="mllm", target_tokens=16))


# ------------------------------------------------------------------------------------------ pure functions
def unit_circle(degrees: list[float]) -> torch.Tensor:
    radians = torch.tensor(degrees) * math.pi / 180
    return torch.stack([radians.cos(), radians.sin()], dim=-1).unsqueeze(0)  # [1, n, 2]


def test_divprune_starts_from_the_most_isolated_token_and_adds_the_farthest():
    # 180 deg is farthest from its nearest neighbour; then 0 deg is farthest from it; then 90 deg.
    points = unit_circle([0, 10, 20, 90, 180])
    assert farthest_point_indices(points, 1).tolist() == [[4]]
    assert farthest_point_indices(points, 2).tolist() == [[0, 4]]
    assert farthest_point_indices(points, 3).tolist() == [[0, 3, 4]]
    assert farthest_point_indices(points, 5).tolist() == [[0, 1, 2, 3, 4]]
    # Scale does not matter (cosine distance), and batch items are independent.
    both = torch.cat([points * 3.0, unit_circle([0, 90, 95, 100, 105])])
    assert farthest_point_indices(both, 2).tolist() == [[0, 4], [0, 4]]
    with pytest.raises(ValueError, match="cannot keep 6 of 5 tokens"):
        farthest_point_indices(points, 6)


def greedy_by_determinants(kernel: torch.Tensor, num_keep: int) -> list[int]:
    """The greedy MAP subset by brute force: add the item that maximises det(L_S) each step."""
    chosen: list[int] = []
    for _ in range(num_keep):
        candidates = [i for i in range(kernel.shape[0]) if i not in chosen]
        dets = [torch.linalg.det(kernel[[*chosen, i]][:, [*chosen, i]].double()).item() for i in candidates]
        chosen.append(candidates[max(range(len(dets)), key=dets.__getitem__)])
    return sorted(chosen)


def test_dpp_greedy_map_matches_the_determinant_greedy_on_hand_built_kernels():
    # Two near-duplicates of high quality and one orthogonal token of lower quality:
    # the second pick is the orthogonal one, not the duplicate.
    features = torch.tensor([[[1.0, 0.0], [1.0, 0.01], [0.0, 1.0]]])
    relevance = torch.tensor([[1.0, 0.9, 0.0]])
    kernel = conditional_kernel(features, relevance, theta=0.5)
    assert dpp_greedy_map(kernel, 2).tolist() == [[0, 2]]
    # A diagonal kernel keeps the highest qualities.
    assert dpp_greedy_map(torch.diag_embed(torch.tensor([[0.1, 0.9, 0.5, 0.7]])), 2).tolist() == [[1, 3]]
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        vectors = torch.randn(1, 7, 5, generator=generator)
        kernel = conditional_kernel(vectors, torch.rand(1, 7, generator=generator))
        assert dpp_greedy_map(kernel, 4)[0].tolist() == greedy_by_determinants(kernel[0], 4)


def test_dpp_greedy_map_fills_the_budget_past_the_kernels_rank_by_quality():
    features = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, -1.0]]])  # rank 2
    kernel = conditional_kernel(features, torch.tensor([[0.0, 0.2, 1.0, 0.4]]))
    # Picks 2 (highest quality), then 3 (orthogonal to it); the plane is then spanned, so the
    # third pick goes by quality: 1 (relevance 0.2) before 0 (relevance 0).
    assert dpp_greedy_map(kernel, 3).tolist() == [[1, 2, 3]]
    assert dpp_greedy_map(kernel, 4).tolist() == [[0, 1, 2, 3]]


def test_instruction_relevance_is_min_max_scaled_cosine_to_the_instruction():
    visual = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    relevance = instruction_relevance(visual, [torch.tensor([[2.0, 0.0], [3.0, 0.0]])])
    torch.testing.assert_close(relevance, torch.tensor([[1.0, 0.0, 1 / math.sqrt(2)]]))
    with pytest.raises(ValueError, match="1 images need as many instructions, got 2"):
        instruction_relevance(visual, [torch.ones(1, 2)] * 2)
    # theta = 0: no conditioning, the plain cosine-similarity kernel.
    unit = F.normalize(visual, dim=-1)
    torch.testing.assert_close(conditional_kernel(visual, relevance, theta=0.0), unit @ unit.transpose(1, 2))
    with pytest.raises(ValueError, match=r"theta must be in \[0, 1\), got 1\.0"):
        conditional_kernel(visual, relevance, theta=1.0)


def test_energy_attention_split_and_keep():
    assert [energy_attention_split(k, 0.5) for k in (64, 5, 1)] == [(32, 32), (3, 2), (1, 0)]
    assert energy_attention_split(10, 0.0) == (0, 10) and energy_attention_split(10, 1.0) == (10, 0)
    token_energy = torch.tensor([[0.5, 0.1, 0.9, 0.2, 0.8, 0.3]])
    attention = torch.tensor([[0.9, 0.8, 0.1, 0.7, 0.0, 0.6]])
    # Lowest energy: 1 and 3; then the most attended among the others: 0 (3 is already kept).
    assert energy_and_attention_keep(token_energy, attention, 2, 1).tolist() == [[0, 1, 3]]
    assert energy_and_attention_keep(token_energy, attention, 0, 3).tolist() == top_indices(attention, 3).tolist()


def test_merge_into_kept_is_a_size_weighted_mean_into_the_most_similar_kept_token():
    metric = torch.tensor([[[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]]])
    features = torch.tensor([[[1.0], [3.0], [10.0], [20.0]]])
    size = torch.tensor([[[1.0], [3.0], [1.0], [1.0]]])
    merged, token_map = merge_into_kept(features, metric, torch.tensor([[0, 2]]), size)
    assert token_map.tolist() == [[0, 0, 1, 1]]
    torch.testing.assert_close(merged, torch.tensor([[[(1.0 + 9.0) / 4], [15.0]]]))
    everything, identity = merge_into_kept(features, metric, torch.arange(4)[None])
    assert torch.equal(everything, features) and identity.tolist() == [[0, 1, 2, 3]]


def test_select_then_merge_keeps_exactly_the_budget_for_every_share():
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(2, 36, 8, generator=generator)
    attention = torch.rand(2, 36, generator=generator)
    for budget, share in itertools.product((1, 5, 18, 36), (0.0, 0.3, 1.0)):
        merged, token_map = select_then_merge(features, features, attention, budget, energy_share=share, margin=0.3)
        assert merged.shape == (2, budget, 8)
        assert all(set(row.tolist()) == set(range(budget)) for row in token_map)
    merged, _ = select_then_merge(features, features, attention, 36, energy_share=0.5, margin=0.3)
    assert torch.equal(merged, features)


def test_the_vllm_plugin_accepts_the_selectors_and_refuses_cdpruner_before_building_anything():
    from pitome_mllm.models.vllm_llava import check_vllm_config

    for settings in ({"method": "fastervlm"}, {"method": "visionzip"}, {"method": "divprune"}, {"preset": "mllm"}):
        check_vllm_config(PiToMeConfig(target_tokens=16, **settings))
    with pytest.raises(ValueError, match=r"method='cdpruner' conditions the selection on each image's prompt"):
        check_vllm_config(PiToMeConfig(target_tokens=16, method="cdpruner"))


def test_the_original_llava_code_runs_the_selection_methods_and_refuses_cdpruner(tmp_path, images):
    pytest.importorskip("llava", reason="the original LLaVA code is not installed (pip install --no-deps llava-torch)")
    from pitome_mllm.runtime import llava_original as original_runtime
    from pitome_mllm.zoo import tiny_llava_original as original_tiny

    model, tokenizer, image_processor = original_tiny.build_tiny_llava_original(tmp_path)
    input_ids = original_runtime.tokenize_prompt(original_runtime.build_prompt([("What is this?", None)]), tokenizer)
    pixels = original_runtime.prepare_images([images["chelsea"]], image_processor, model)
    with torch.no_grad():
        reference = model(input_ids=input_ids[None], images=pixels).logits
    for settings in ({"method": "fastervlm"}, {"method": "divprune"}, {"method": "pitome", "preset": "mllm"}):
        with pitome_mllm.patched(model, None, target_tokens=12, **settings), torch.no_grad():
            logits = model(input_ids=input_ids[None], images=pixels).logits
        assert logits.shape[1] == reference.shape[1] - NUM_PATCHES + 12
    message = r"method='cdpruner' conditions the selection on each image's prompt, which the llava_original family"
    with pytest.raises(ValueError, match=message):
        pitome_mllm.patch(model, None, method="cdpruner", target_tokens=12)
    assert pitome_mllm.get_patch(model) is None
    with torch.no_grad():
        assert torch.equal(model(input_ids=input_ids[None], images=pixels).logits, reference)
