"""`pitome_mllm.patch` on tiny random transformers LLaVA models, end to end.

What the language model receives is checked two ways: the image placeholders the
(patched) processor emits, and the image features LLaVA scatters into them
(captured at ``get_placeholder_mask``, the last step before the LLM). Exactness
claims (keep_ratio=1.0, unpatch, cache) use ``torch.equal``.
"""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch
from transformers import (
    AutoProcessor,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaForConditionalGeneration,
)

import pitome_mllm
from pitome_mllm.models import model_geometry
from pitome_mllm.models.clip_tower import clip_encoder_layers
from pitome_mllm.models.compat import transformers_version
from pitome_mllm.models.llava_hf import image_features_per_image, vision_hidden_states
from pitome_mllm.schedule import plan_layers
from pitome_mllm.testing.llava import PROMPT, encode, features_reaching_llm, logits_of, placeholder_counts
from pitome_mllm.zoo.tiny import DEMO_SPEC, TEST_SPEC, build_tiny_llava, build_tiny_processor

pytestmark = pytest.mark.model_facing

LONG_PROMPT = "USER: <image>\nDescribe the image in detail, please. ASSISTANT:"
NEW_TOKENS = 4
# LLaVA-1.5 reads hidden_states[-2]: the output of the second-to-last CLIP layer.
SELECTED_LAYER = -2
# Keep the vision tower and projector unquantised; only the LLM goes to 4 bit.
SKIP_QUANTISATION = ["model.vision_tower", "model.multi_modal_projector", "lm_head"]


# ---------------------------------------------------------------------------------------------- helpers


def greedy(model, inputs, max_new_tokens: int = NEW_TOKENS, **kwargs) -> torch.Tensor:
    """The new tokens of a greedy generation, ``[B, max_new_tokens]``."""
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, **kwargs)
    return generated[:, inputs["input_ids"].shape[1] :]


def tower_geometry(model) -> tuple[int, int]:
    """``(tokens entering the CLIP encoder incl. CLS, number of encoder layers)`` of a LLaVA model."""
    geometry = model_geometry(model)
    return geometry.default_num_tokens, geometry.num_layers


def planned_visual_tokens(num_tokens: int, num_layers: int, keep_ratio: float, **plan_kwargs) -> int:
    """Visual tokens after LLaVA's selected layer, CLS dropped, from the schedule alone."""
    last_layer = num_layers + SELECTED_LAYER
    steps = plan_layers(num_tokens, num_layers, keep_ratio, last_layer=last_layer, **plan_kwargs)
    return steps[-1].tokens_out - 1


def assert_llm_receives(model, processor, images, expected: int) -> torch.Tensor:
    """Placeholders, scattered features and a generate() all agree on ``expected`` tokens per image.

    Returns the features of the prefill, ``[num_images * expected, hidden]``.
    """
    images = images if isinstance(images, list) else [images]
    prompts = [PROMPT] * len(images)
    inputs = encode(processor, images, prompts)
    assert placeholder_counts(processor, inputs) == [expected] * len(images)
    with features_reaching_llm(model) as seen:
        new_tokens = greedy(model, inputs, max_new_tokens=2)
    assert new_tokens.shape == (len(images), 2)
    assert seen, "generate() never scattered image features"
    assert all(features.shape[0] == expected * len(images) for features in seen)
    with torch.no_grad():
        per_image = image_features_per_image(model, inputs["pixel_values"])
    assert [features.shape[0] for features in per_image] == [expected] * len(images)
    return seen[0]


def module_state(model) -> dict:
    """Everything a patch may touch: weights, instance-level forwards, hook registrations."""
    return {
        "weights": {name: _snapshot(tensor) for name, tensor in model.state_dict().items()},
        "forwards": {name: module.__dict__.get("forward") for name, module in model.named_modules()},
        "hooks": {
            name: (tuple(module._forward_hooks), tuple(module._forward_pre_hooks))
            for name, module in model.named_modules()
        },
        "attributes": {name: sorted(module.__dict__) for name, module in model.named_modules()},
    }


def _snapshot(tensor: torch.Tensor):
    # Weights offloaded by accelerate sit on the meta device: only their metadata can be compared.
    if tensor.is_meta:
        return ("meta", tuple(tensor.shape), tensor.dtype)
    return tensor.detach().clone()


def assert_same_state(before: dict, after: dict) -> None:
    assert before["weights"].keys() == after["weights"].keys()
    for name, saved in before["weights"].items():
        current = after["weights"][name]
        if isinstance(saved, tuple):
            assert saved == current, name
        else:
            assert torch.equal(saved, current), name
    assert before["forwards"] == after["forwards"]
    assert before["hooks"] == after["hooks"]
    assert before["attributes"] == after["attributes"]


def _from_this_library(function) -> bool:
    return (getattr(function, "__module__", None) or "").startswith("pitome_mllm")


def assert_no_patch_left(model, processor) -> None:
    """Absolute check (not relative to a snapshot, which an earlier leak would already contain)."""
    assert pitome_mllm.get_patch(model) is None
    for name, module in model.named_modules():
        assert not _from_this_library(module.__dict__.get("forward")), name
        assert not any(attribute.startswith("_pitome") for attribute in module.__dict__), name
        hooks = [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]
        assert not any(_from_this_library(hook) for hook in hooks), name
    pristine = build_tiny_processor(*processor_geometry(processor))
    assert processor.__dict__.keys() == pristine.__dict__.keys()


def processor_geometry(processor) -> tuple[int, int]:
    return processor.image_processor.crop_size["height"], processor.patch_size


def merge_groups(step, item: int = 0) -> set[frozenset[int]]:
    """Which input tokens one `Merge` step puts together (its decision, independent of output order)."""
    groups: dict[int, set[int]] = defaultdict(set)
    for token, output_position in enumerate(step.output_position[item].tolist()):
        groups[output_position].add(token)
    return {frozenset(group) for group in groups.values()}


def first_patch_of_each_token(token_map: torch.Tensor) -> torch.Tensor:
    """``[B, K]``: the smallest patch index each LLM token holds, from a ``[B, num_patches]`` map."""
    batch, num_patches = token_map.shape
    num_tokens = int(token_map.max()) + 1
    first = torch.full((batch, num_tokens), num_patches, dtype=torch.long)
    patches = torch.arange(num_patches).expand(batch, -1)
    return first.scatter_reduce(1, token_map, patches, reduce="amin", include_self=True)


# ---------------------------------------------------------------------------------------------- 1. exactness


@pytest.mark.parametrize(
    "settings",
    [
        {"keep_ratio": 1.0},
        {"keep_ratio": 1.0, "method": "tome"},
        {"keep_ratio": 1.0, "preset": "pure", "keep_order": True},
        {"target_tokens": TEST_SPEC.num_patches},
        {"method": "none"},
    ],
    ids=["keep_ratio_1", "tome_keep_ratio_1", "pure_keep_order", "target_all", "method_none"],
)
def test_no_merging_is_bit_identical(tiny_llava, images, settings):
    model, processor = tiny_llava
    inputs = encode(processor, images["chelsea"], PROMPT)
    reference_logits = logits_of(model, inputs)
    reference_tokens = greedy(model, inputs)

    with pitome_mllm.patched(model, processor, **settings) as handle:
        assert handle.num_visual_tokens == TEST_SPEC.num_patches
        patched_inputs = encode(processor, images["chelsea"], PROMPT)
        assert torch.equal(patched_inputs["input_ids"], inputs["input_ids"])
        assert torch.equal(logits_of(model, patched_inputs), reference_logits)
        assert torch.equal(greedy(model, patched_inputs), reference_tokens)


def test_unpatch_after_real_merging_restores_bit_identical_outputs(tiny_llava, images):
    model, processor = tiny_llava
    inputs = encode(processor, images["astronaut"], PROMPT)
    reference_logits = logits_of(model, inputs)
    reference_tokens = greedy(model, inputs)

    handle = pitome_mllm.patch(model, processor, keep_ratio=0.7, target_tokens=9, keep_order=True)
    merged_inputs = encode(processor, images["astronaut"], PROMPT)
    assert placeholder_counts(processor, merged_inputs) == [9]
    merged_logits = logits_of(model, merged_inputs)
    assert merged_logits.shape[1] < reference_logits.shape[1]
    greedy(model, merged_inputs)
    handle.unpatch()
    assert_no_patch_left(model, processor)

    restored_inputs = encode(processor, images["astronaut"], PROMPT)
    assert torch.equal(restored_inputs["input_ids"], inputs["input_ids"])
    assert torch.equal(logits_of(model, restored_inputs), reference_logits)
    assert torch.equal(greedy(model, restored_inputs), reference_tokens)


# ---------------------------------------------------------------------------------------------- 2. token counts


def test_deep_spec_presets_plan_different_schedules(deep_tiny_llava):
    # Guards the premise of the preset tests below: at this depth every preset plans its
    # own sequence of (method, tokens) steps, and the odd-layer schedule keeps more tokens.
    num_tokens, num_layers = tower_geometry(deep_tiny_llava[0])
    assert num_layers == 24
    plans = {
        preset: [
            (step.method, step.tokens_out)
            for step in plan_layers(num_tokens, num_layers, 0.9, preset=preset, last_layer=num_layers + SELECTED_LAYER)
        ]
        for preset in ("reference", "paper", "pure")
    }
    assert plans["reference"] != plans["paper"] != plans["pure"] != plans["reference"]
    assert plans["paper"][-1][1] > plans["reference"][-1][1]


@pytest.mark.parametrize("method", ["pitome", "tome"])
@pytest.mark.parametrize("preset", ["reference", "paper", "pure"])
def test_llm_receives_the_scheduled_count(deep_tiny_llava, images, preset, method):
    model, processor = deep_tiny_llava
    num_tokens, num_layers = tower_geometry(model)
    expected_steps = plan_layers(
        num_tokens, num_layers, 0.9, method=method, preset=preset, last_layer=num_layers + SELECTED_LAYER
    )
    expected = expected_steps[-1].tokens_out - 1
    assert expected < num_tokens - 1

    with pitome_mllm.patched(model, processor, keep_ratio=0.9, preset=preset, method=method) as handle:
        assert handle.schedule == expected_steps
        assert handle.num_visual_tokens == expected
        assert_llm_receives(model, processor, images["coffee"], expected)
        # The tower merged exactly where and as much as planned.
        planned_counts = [step.tokens_out for step in expected_steps if step.method != "none"]
        assert handle.trace.token_counts == planned_counts


@pytest.mark.parametrize(
    "settings",
    [
        {"target_tokens": 1},
        {"target_tokens": 2},
        {"target_tokens": 7},
        {"target_tokens": 16},
        {"target_tokens": 33},
        {"target_tokens": 63},
        {"target_tokens": 16, "method": "tome"},
        {"target_tokens": 7, "method": "none"},
        {"target_tokens": 30, "keep_ratio": 0.9},
    ],
    ids=lambda settings: "-".join(f"{key}={value}" for key, value in settings.items()),
)
def test_llm_receives_exactly_target_tokens(tiny_llava, images, settings):
    model, processor = tiny_llava
    target = settings["target_tokens"]
    with pitome_mllm.patched(model, processor, **settings) as handle:
        assert handle.num_visual_tokens == target
        assert_llm_receives(model, processor, images["chelsea"], target)


@pytest.mark.parametrize("target", [64, 128, 192])
def test_clip_l_336_geometry_reaches_target_budgets(demo_llava, images, target):
    model, processor = demo_llava
    assert tower_geometry(model) == (577, 24)
    with pitome_mllm.patched(model, processor, target_tokens=target) as handle:
        assert handle.num_visual_tokens == target
        # The tower merges down to just above the budget; the projector stage trims the rest.
        tower_tokens = handle.schedule[-1].tokens_out - 1
        assert target <= tower_tokens < DEMO_SPEC.num_patches
        assert_llm_receives(model, processor, images["astronaut"], target)
        assert handle.trace.token_counts[-1] - 1 == tower_tokens


@pytest.mark.parametrize(("preset", "expected"), [("reference", 54), ("paper", 183)])
def test_clip_l_336_keep_ratio_0_9_counts(demo_llava, images, preset, expected):
    # 577 tokens, 24 layers, hidden_states[-2]: merging after every layer leaves 54 visual
    # tokens, merging after odd layers only (the paper's table) leaves 183.
    model, processor = demo_llava
    assert tower_geometry(model) == (577, 24)
    with pitome_mllm.patched(model, processor, keep_ratio=0.9, preset=preset) as handle:
        assert handle.num_visual_tokens == expected
        inputs = encode(processor, images["astronaut"], PROMPT)
        assert placeholder_counts(processor, inputs) == [expected]


# ---------------------------------------------------------------------------------------------- 3. hook order


def _recorder_hooks(model) -> list[int]:
    return [len(layer._forward_hooks) for layer in clip_encoder_layers(model.model.vision_tower)]


def _record_projector_input_lengths(model) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    lengths: list[int] = []
    hook = model.model.multi_modal_projector.register_forward_pre_hook(
        lambda module, args: lengths.append(args[0].shape[1])
    )
    return lengths, hook


@pytest.mark.skipif(
    transformers_version()[0] < 5,
    reason="transformers 4.x collects hidden states inside the encoder loop: no recorder hooks to order against",
)
def test_merged_hidden_state_is_selected_whatever_the_hook_order(images):
    fresh_model, processor = build_tiny_llava(TEST_SPEC)
    warmed_model, _ = build_tiny_llava(TEST_SPEC, processor=processor)
    inputs = encode(processor, images["coffee"], PROMPT)
    logits_of(warmed_model, inputs)
    # Premise: transformers registers its hidden-state recorders on the first forward, so
    # on warmed_model they exist before the patch and on fresh_model they come after it.
    assert all(_recorder_hooks(warmed_model)) and not any(_recorder_hooks(fresh_model))

    expected = planned_visual_tokens(TEST_SPEC.num_vision_tokens, TEST_SPEC.vision_layers, 0.8)
    results = []
    for model in (warmed_model, fresh_model):
        projector_inputs, hook = _record_projector_input_lengths(model)
        with pitome_mllm.patched(model, processor, keep_ratio=0.8):
            patched_inputs = encode(processor, images["coffee"], PROMPT)
            with features_reaching_llm(model) as seen:
                logits = logits_of(model, patched_inputs)
        hook.remove()
        # The layer LLaVA selects hands over the merged sequence (not the unmerged one).
        assert projector_inputs == [expected]
        assert seen[0].shape[0] == expected
        results.append((logits, seen[0]))

    (warmed_logits, warmed_features), (fresh_logits, fresh_features) = results
    assert torch.equal(warmed_logits, fresh_logits)
    assert torch.equal(warmed_features, fresh_features)


def test_all_hidden_states_on_request_are_the_merged_ones(tiny_llava, images):
    # A caller asking for every hidden state gets each layer's merged output; the
    # sequences have different lengths, so they must come back as a tuple, not a stack.
    model, processor = tiny_llava
    num_tokens, num_layers = tower_geometry(model)
    steps = plan_layers(num_tokens, num_layers, 0.8, last_layer=num_layers + SELECTED_LAYER)
    with pitome_mllm.patched(model, processor, keep_ratio=0.8):
        with torch.no_grad():
            output = model(**encode(processor, images["coffee"], PROMPT), output_hidden_states=True)
        # transformers 5.x hands the tower's hidden states out with the model output; 4.57 does not.
        image_outputs = getattr(output, "image_outputs", None)
        if image_outputs is None:
            hidden_states = vision_hidden_states(model, encode(processor, images["coffee"], PROMPT)["pixel_values"])
        else:
            hidden_states = image_outputs.hidden_states
    lengths = [hidden.shape[1] for hidden in hidden_states]
    # Embeddings, then one entry per layer; the skipped last layer passes its input through.
    assert lengths == [num_tokens] + [step.tokens_out for step in steps] + [steps[-1].tokens_out]


def _count_calls(module) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    calls = [0]

    def count(*_):
        calls[0] += 1

    return calls, module.register_forward_hook(count)


def test_layers_after_the_selected_one_are_not_run(tiny_llava, images):
    model, processor = tiny_llava
    last_layer_mlp = clip_encoder_layers(model.model.vision_tower)[-1].mlp
    calls, hook = _count_calls(last_layer_mlp)
    try:
        logits_of(model, encode(processor, images["coffee"], PROMPT))
        assert calls == [1]
        with pitome_mllm.patched(model, processor, keep_ratio=0.8):
            logits_of(model, encode(processor, images["coffee"], PROMPT))
            greedy(model, encode(processor, images["coffee"], PROMPT))
            assert calls == [1]
        logits_of(model, encode(processor, images["coffee"], PROMPT))
        assert calls == [2]
    finally:
        hook.remove()


def test_earlier_feature_layer_skips_every_later_layer(images):
    model, processor = build_tiny_llava(TEST_SPEC)
    model.config.vision_feature_layer = -3  # output of layer 3 of 0..5; layers 4 and 5 unused
    counters = [_count_calls(layer.mlp) for layer in clip_encoder_layers(model.model.vision_tower)]
    steps = plan_layers(TEST_SPEC.num_vision_tokens, TEST_SPEC.vision_layers, 0.8, last_layer=3)
    with pitome_mllm.patched(model, processor, keep_ratio=0.8) as handle:
        assert handle.num_visual_tokens == steps[-1].tokens_out - 1
        assert_llm_receives(model, processor, images["coffee"], handle.num_visual_tokens)
    calls_per_layer = [calls[0] for calls, _ in counters]
    for _, hook in counters:
        hook.remove()
    # Layers 0..3 ran once per vision forward (same count for each); layers 4, 5 never.
    assert calls_per_layer[4:] == [0, 0]
    assert len(set(calls_per_layer[:4])) == 1 and calls_per_layer[0] > 0


# ---------------------------------------------------------------------------------------------- 4. cache


@pytest.mark.parametrize("settings", [{"keep_ratio": 0.75}, {"target_tokens": 12, "preset": "pure"}])
def test_cached_generation_equals_uncached(tiny_llava, images, settings):
    model, processor = tiny_llava
    with pitome_mllm.patched(model, processor, **settings):
        inputs = encode(processor, images["chelsea"], PROMPT)
        with_cache = greedy(model, inputs, max_new_tokens=5, use_cache=True)
        without_cache = greedy(model, inputs, max_new_tokens=5, use_cache=False)
    assert torch.equal(with_cache, without_cache)


# ---------------------------------------------------------------------------------------------- 5. batching


@pytest.mark.parametrize(
    "settings",
    [{"keep_ratio": 0.8, "target_tokens": 16, "keep_order": True}, {"keep_ratio": 0.8, "preset": "pure"}],
    ids=["target_keep_order", "pure"],
)
def test_left_padded_batch_equals_items_alone(tiny_llava, images, settings):
    model, processor = tiny_llava
    batch_images = [images["astronaut"], images["coffee"]]
    prompts = [PROMPT, LONG_PROMPT]
    with pitome_mllm.patched(model, processor, **settings) as handle:
        batch = encode(processor, batch_images, prompts)
        assert batch["attention_mask"][0, 0] == 0, "the shorter prompt should be left padded"
        with features_reaching_llm(model) as seen:
            batch_logits = logits_of(model, batch)[:, -1]
        batch_features = seen[0].view(2, handle.num_visual_tokens, -1)
        batch_tokens = greedy(model, batch)

        for item, (image, prompt) in enumerate(zip(batch_images, prompts, strict=True)):
            alone = encode(processor, image, prompt)
            with features_reaching_llm(model) as seen:
                alone_logits = logits_of(model, alone)[:, -1]
            torch.testing.assert_close(seen[0], batch_features[item], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(alone_logits[0], batch_logits[item], rtol=1e-4, atol=1e-5)
            assert torch.equal(greedy(model, alone)[0], batch_tokens[item])


# ---------------------------------------------------------------------------------------------- 6. half precision


def _first_merge_groups(model, processor, image) -> tuple[set[frozenset[int]], list[int]]:
    with pitome_mllm.patched(model, processor, keep_ratio=0.8) as handle:
        handle.record_merges()
        logits = logits_of(model, encode(processor, image, PROMPT))
        assert torch.isfinite(logits).all()
        first_layer, first_step = handle.trace.merges[0]
        assert first_layer == 0
        return merge_groups(first_step), list(handle.trace.token_counts)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_models_merge_like_fp32(tiny_llava, images, dtype):
    reference_model, processor = tiny_llava
    model = build_tiny_llava(TEST_SPEC, processor=processor)[0].to(dtype)

    reference_groups, reference_counts = _first_merge_groups(reference_model, processor, images["chelsea"])
    groups, counts = _first_merge_groups(model, processor, images["chelsea"])
    assert counts == reference_counts
    # Decisions are made in fp32, so near-identical inputs give the same grouping.
    assert groups == reference_groups

    expected = planned_visual_tokens(TEST_SPEC.num_vision_tokens, TEST_SPEC.vision_layers, 0.8)
    with pitome_mllm.patched(model, processor, keep_ratio=0.8):
        features = assert_llm_receives(model, processor, images["chelsea"], expected)
        assert features.dtype == dtype
    with pitome_mllm.patched(model, processor, target_tokens=10, preset="pure"):
        assert_llm_receives(model, processor, images["chelsea"], 10)


# ---------------------------------------------------------------------------------------------- 7-8. loading


def test_4bit_language_model_is_patched(saved_tiny_llava_dir, tiny_llava, images):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    quantisation = BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=SKIP_QUANTISATION)
    # dtype given: transformers 4.57 otherwise loads the unquantised modules of a 4-bit model in fp16.
    model = LlavaForConditionalGeneration.from_pretrained(
        saved_tiny_llava_dir, quantization_config=quantisation, dtype=torch.float32
    )
    processor = AutoProcessor.from_pretrained(saved_tiny_llava_dir)
    assert type(model.model.language_model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    assert type(clip_encoder_layers(model.model.vision_tower)[0].self_attn.k_proj) is torch.nn.Linear

    with pitome_mllm.patched(model, processor, target_tokens=9) as handle:
        assert handle.num_visual_tokens == 9
        features = assert_llm_receives(model, processor, images["coffee"], 9)
    # The tower and projector are not quantised: they must merge exactly like the fp32 model.
    reference_model, reference_processor = tiny_llava
    with pitome_mllm.patched(reference_model, reference_processor, target_tokens=9):
        reference_features = assert_llm_receives(reference_model, reference_processor, images["coffee"], 9)
    torch.testing.assert_close(features, reference_features)

    assert placeholder_counts(processor, encode(processor, images["coffee"], PROMPT)) == [TEST_SPEC.num_patches]
    assert greedy(model, encode(processor, images["coffee"], PROMPT)).shape == (1, NEW_TOKENS)


@pytest.mark.parametrize(
    "device_map",
    [
        "cpu",
        # The vision tower offloaded: accelerate puts its own forward on every tower layer,
        # and the patch has to wrap it and give it back.
        {
            "model.vision_tower": "disk",
            "model.multi_modal_projector": "cpu",
            "model.language_model": "cpu",
            "lm_head": "cpu",
        },
    ],
    ids=["cpu", "tower_offloaded"],
)
def test_device_map_loaded_model_patches_and_unpatches(saved_tiny_llava_dir, tmp_path, images, device_map):
    model = LlavaForConditionalGeneration.from_pretrained(
        saved_tiny_llava_dir, device_map=device_map, offload_folder=tmp_path
    )
    processor = AutoProcessor.from_pretrained(saved_tiny_llava_dir)
    plain_model = LlavaForConditionalGeneration.from_pretrained(saved_tiny_llava_dir)
    inputs = encode(processor, images["chelsea"], PROMPT)
    reference_logits = logits_of(model, inputs)
    before = module_state(model)

    expected = planned_visual_tokens(TEST_SPEC.num_vision_tokens, TEST_SPEC.vision_layers, 0.8)
    with pitome_mllm.patched(model, processor, keep_ratio=0.8):
        assert_llm_receives(model, processor, images["chelsea"], expected)
        merged_logits = logits_of(model, encode(processor, images["chelsea"], PROMPT))
    with pitome_mllm.patched(plain_model, processor, keep_ratio=0.8):
        plain_merged_logits = logits_of(plain_model, encode(processor, images["chelsea"], PROMPT))
    assert torch.equal(merged_logits, plain_merged_logits)

    assert_same_state(before, module_state(model))
    assert_no_patch_left(model, processor)
    assert torch.equal(logits_of(model, inputs), reference_logits)


def test_model_and_processor_loaded_from_a_folder(saved_tiny_llava_dir, images):
    model = LlavaForConditionalGeneration.from_pretrained(saved_tiny_llava_dir).eval()
    processor = AutoProcessor.from_pretrained(saved_tiny_llava_dir)
    inputs = encode(processor, images["astronaut"], PROMPT)
    reference_logits = logits_of(model, inputs)

    with pitome_mllm.patched(model, processor, keep_ratio=0.85, method="tome") as handle:
        expected = planned_visual_tokens(TEST_SPEC.num_vision_tokens, TEST_SPEC.vision_layers, 0.85, method="tome")
        assert handle.num_visual_tokens == expected
        assert_llm_receives(model, processor, images["astronaut"], expected)
    assert torch.equal(logits_of(model, encode(processor, images["astronaut"], PROMPT)), reference_logits)


# ---------------------------------------------------------------------------------------------- 9. bad inputs


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"keep_ratio": 0.3}, r"keep_ratio must be in \(0\.5, 1\.0\], got 0\.3"),
        ({"keep_ratio": 1.5}, r"keep_ratio must be in \(0\.5, 1\.0\], got 1\.5"),
        ({"target_tokens": 65}, r"target_tokens=65 is larger than the 64 visual tokens"),
        ({"target_tokens": 0}, r"target_tokens must be >= 1, got 0"),
        ({"target_tokens": -1}, r"target_tokens must be >= 1, got -1"),
        ({"target_tokens": 2.5}, r"target_tokens must be a positive integer, got 2\.5"),
        (
            {"keep_ratio": 0.6, "target_tokens": 60},
            r"keep_ratio=0\.6 leaves \d+ visual tokens, fewer than target_tokens=60",
        ),
        ({}, r"needs keep_ratio"),
        ({"keep_ratio": 0.9, "method": "magic"}, r"method must be one of"),
        ({"keep_ratio": 0.9, "metric": "queries"}, r"metric must be one of"),
        ({"keep_ratio": 0.9, "preset": "fast"}, r"preset must be one of"),
        ({"keep_ratio": 0.9, "unknown_knob": 1}, r"unknown config keys \['unknown_knob'\]"),
    ],
    ids=lambda value: str(value) if isinstance(value, dict) else "",
)
def test_bad_settings_raise_and_leave_model_untouched(tiny_llava, images, settings, message):
    model, processor = tiny_llava
    before = module_state(model)
    processor_attributes = dict(processor.__dict__)
    expected_inputs = encode(processor, images["coffee"], PROMPT)

    with pytest.raises(ValueError, match=message):
        pitome_mllm.patch(model, processor, **settings)

    assert_no_patch_left(model, processor)
    assert_same_state(before, module_state(model))
    assert processor.__dict__ == processor_attributes
    assert torch.equal(encode(processor, images["coffee"], PROMPT)["input_ids"], expected_inputs["input_ids"])


def _tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    return LlamaForCausalLM(config)


@pytest.mark.parametrize(
    "build",
    [_tiny_llama, lambda: build_tiny_llava(TEST_SPEC)[0].model.vision_tower],
    ids=["LlamaForCausalLM", "CLIPVisionModel"],
)
def test_unsupported_model_names_what_is_supported(build):
    model = build()
    assert isinstance(model, (LlamaForCausalLM, CLIPVisionModel))
    before = module_state(model)
    with pytest.raises(ValueError, match=rf"unsupported model {type(model).__name__}.*LlavaForConditionalGeneration"):
        pitome_mllm.patch(model, None, keep_ratio=0.9)
    assert pitome_mllm.get_patch(model) is None
    assert_same_state(before, module_state(model))


def test_multi_layer_feature_selection_is_refused(images):
    model, processor = build_tiny_llava(TEST_SPEC)
    model.config.vision_feature_layer = [-2, -5]
    before = module_state(model)
    with pytest.raises(ValueError, match=r"\[-2, -5\] selects several layers.*single integer vision_feature_layer"):
        pitome_mllm.patch(model, processor, keep_ratio=0.9)
    assert pitome_mllm.get_patch(model) is None
    assert_same_state(before, module_state(model))
    inputs = encode(processor, images["coffee"], PROMPT)
    assert placeholder_counts(processor, inputs) == [TEST_SPEC.num_patches]


def test_processor_of_the_wrong_kind_is_refused(tiny_llava):
    model, processor = tiny_llava
    before = module_state(model)
    with pytest.raises(ValueError, match=r"lacks .*LlavaProcessor"):
        pitome_mllm.patch(model, processor.tokenizer, keep_ratio=0.9)
    assert pitome_mllm.get_patch(model) is None
    assert_same_state(before, module_state(model))


def test_patching_a_patched_model_raises_and_keeps_the_first_patch(tiny_llava, images):
    model, processor = tiny_llava
    with pitome_mllm.patched(model, processor, target_tokens=20) as handle:
        patched_state = module_state(model)
        with pytest.raises(RuntimeError, match="already patched"):
            pitome_mllm.patch(model, processor, keep_ratio=0.9)
        assert pitome_mllm.get_patch(model) is handle
        assert_same_state(patched_state, module_state(model))
        assert_llm_receives(model, processor, images["coffee"], 20)


def test_patched_context_restores_on_exit_and_on_exception(tiny_llava, images):
    model, processor = tiny_llava
    before = module_state(model)
    processor_keys = set(processor.__dict__)
    inputs = encode(processor, images["chelsea"], PROMPT)
    reference_logits = logits_of(model, inputs)

    with pitome_mllm.patched(model, processor, keep_ratio=0.8) as handle:
        assert pitome_mllm.get_patch(model) is handle and handle.active
    assert not handle.active and pitome_mllm.get_patch(model) is None

    with pytest.raises(KeyError, match="inside the block"):
        with pitome_mllm.patched(model, processor, target_tokens=5):
            logits_of(model, encode(processor, images["chelsea"], PROMPT))
            raise KeyError("inside the block")
    assert_no_patch_left(model, processor)

    assert_same_state(before, module_state(model))
    assert set(processor.__dict__) == processor_keys
    assert torch.equal(encode(processor, images["chelsea"], PROMPT)["input_ids"], inputs["input_ids"])
    assert torch.equal(logits_of(model, inputs), reference_logits)


def test_unpatch_is_idempotent_and_a_stale_handle_leaves_a_new_patch_alone(tiny_llava, images):
    model, processor = tiny_llava
    before = module_state(model)
    processor_keys = set(processor.__dict__)
    original_count = placeholder_counts(processor, encode(processor, images["coffee"], PROMPT))

    first = pitome_mllm.patch(model, processor, keep_ratio=0.8)
    first.unpatch()
    first.unpatch()
    assert_no_patch_left(model, processor)
    assert_same_state(before, module_state(model))
    assert set(processor.__dict__) == processor_keys
    assert placeholder_counts(processor, encode(processor, images["coffee"], PROMPT)) == original_count

    second = pitome_mllm.patch(model, processor, target_tokens=11)
    first.unpatch()  # must not touch the second patch
    assert pitome_mllm.get_patch(model) is second
    assert_llm_receives(model, processor, images["coffee"], 11)
    second.unpatch()
    assert_no_patch_left(model, processor)
    assert_same_state(before, module_state(model))
    assert set(processor.__dict__) == processor_keys
    assert placeholder_counts(processor, encode(processor, images["coffee"], PROMPT)) == original_count


# ---------------------------------------------------------------------------------------------- 10. variants

BASE_VARIANT = {"keep_ratio": 0.8}


@pytest.mark.parametrize(
    "extra",
    [
        {"metric": "keys"},
        {"metric": "keys_mean"},
        {"reduce": "size_weighted"},
        {"prop_attn": True},
        {"preset": "pure"},
        {"method": "tome", "metric": "keys_mean", "reduce": "size_weighted", "prop_attn": True},
    ],
    ids=lambda extra: "-".join(f"{key}={value}" for key, value in extra.items()),
)
def test_variants_land_on_the_planned_count_and_change_the_result(tiny_llava, images, extra):
    model, processor = tiny_llava
    settings = {**BASE_VARIANT, **extra}
    plan_kwargs = {key: settings[key] for key in ("method", "preset") if key in settings}
    expected = planned_visual_tokens(TEST_SPEC.num_vision_tokens, TEST_SPEC.vision_layers, 0.8, **plan_kwargs)

    base_settings = {**BASE_VARIANT, **plan_kwargs, "metric": "hidden", "reduce": "mean", "prop_attn": False}
    with pitome_mllm.patched(model, processor, **base_settings):
        base_features = assert_llm_receives(model, processor, images["astronaut"], expected)
    with pitome_mllm.patched(model, processor, **settings) as handle:
        assert handle.num_visual_tokens == expected
        features = assert_llm_receives(model, processor, images["astronaut"], expected)
    # The knob is honoured, not silently ignored.
    assert not torch.equal(features, base_features)


@pytest.mark.parametrize(
    "settings",
    [{"keep_ratio": 0.8}, {"keep_ratio": 0.8, "method": "tome"}, {"target_tokens": 10, "preset": "pure"}],
    ids=["pitome", "tome", "target_pure"],
)
def test_keep_order_hands_tokens_over_in_raster_order(tiny_llava, images, settings):
    model, processor = tiny_llava
    with pitome_mllm.patched(model, processor, **settings) as handle:
        merge_order_features = assert_llm_receives(model, processor, images["chelsea"], handle.num_visual_tokens)
        merge_order_first = first_patch_of_each_token(handle.final_token_map)
    with pitome_mllm.patched(model, processor, **settings, keep_order=True) as handle:
        raster_features = assert_llm_receives(model, processor, images["chelsea"], handle.num_visual_tokens)
        token_map = handle.final_token_map
        raster_first = first_patch_of_each_token(token_map)

    assert token_map.shape == (1, TEST_SPEC.num_patches)
    assert raster_first.shape == (1, handle.num_visual_tokens)
    assert (raster_first[:, 1:] > raster_first[:, :-1]).all()
    # Without keep_order the merge order is not raster order, so the check above can fail.
    assert not (merge_order_first[:, 1:] > merge_order_first[:, :-1]).all()
    # Same tokens, only reordered.
    order = merge_order_first[0].argsort()
    assert torch.equal(raster_features, merge_order_features[order])


@pytest.mark.parametrize("keep_order", [False, True])
def test_final_size_counts_the_patches_each_token_holds(tiny_llava, images, keep_order):
    model, processor = tiny_llava
    with pitome_mllm.patched(model, processor, target_tokens=10, keep_order=keep_order) as handle:
        assert_llm_receives(model, processor, images["chelsea"], handle.num_visual_tokens)
        size, token_map = handle.final_size, handle.final_token_map
        assert size.shape == (1, 10, 1)
        # Each token's size is the number of patches the source map assigns to it.
        held = torch.bincount(token_map[0], minlength=10).to(size.dtype)
        assert torch.equal(size[0, :, 0], held)
        assert int(size.sum()) == TEST_SPEC.num_patches
    assert handle.final_size is None  # unpatch() drops the last forward's state
