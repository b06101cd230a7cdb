"""`pitome_mllm.patch` on a tiny random LLaVA-NeXT (anyres), end to end.

The tower runs on 224 px crops (16 x 16 tokens + class token) with LLaVA-NeXT's crop
grids (1x2, 2x1, 2x2, 3x1, 1x3), so an image packs into up to 256 + 1024 + 32 tokens
and budgets of 160 / 320 / 640 all merge. Exactness claims use ``torch.equal``.
"""

from __future__ import annotations

import types

import pytest
import torch

import pitome_mllm
from pitome_mllm.models.llava_hf import image_features_per_image
from pitome_mllm.models.llava_next import AnyresLayout, anyres_layout, split_budget
from pitome_mllm.testing.llava import encode, logits_of, placeholder_counts
from pitome_mllm.zoo.tiny import (
    BOS_TOKEN,
    IMAGE_TOKEN,
    ONEVISION_TEST_SPEC,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    TinyLlavaSpec,
    build_tiny_llava_next,
    build_tiny_onevision,
)

pytestmark = pytest.mark.model_facing

NEXT_SPEC = TinyLlavaSpec(image_size=224, patch_size=14, vision_layers=6)
# (height, width) of original images: landscape, portrait, square, very wide, very tall, small.
# Token ids of the tiny tokenizer's special tokens (fixed by their order) and a few text tokens.
PAD_ID, BOS_ID, IMAGE_ID = (SPECIAL_TOKENS.index(token) for token in (PAD_TOKEN, BOS_TOKEN, IMAGE_TOKEN))
TEXT_IDS = [40, 41, 42]
IMAGE_SIZES = [(224, 336), (500, 200), (300, 300), (120, 400), (600, 150), (90, 130)]


@pytest.fixture(scope="module")
def tiny_next():
    return build_tiny_llava_next(NEXT_SPEC)


def image_of(images, height: int, width: int):
    return images["chelsea"].resize((width, height))


def packed_lengths(model, inputs) -> list[int]:
    with torch.no_grad():
        features = image_features_per_image(model, inputs["pixel_values"], image_sizes=inputs["image_sizes"])
    return [f.shape[0] for f in features]


# ----------------------------------------------------------------------------------------- pure rules


def test_layout_matches_the_processor_and_the_model(tiny_next, images):
    model, processor = tiny_next
    config = model.config
    layouts = [
        anyres_layout(h, w, config.image_grid_pinpoints, NEXT_SPEC.image_size, NEXT_SPEC.patch_size, 256)
        for h, w in IMAGE_SIZES
    ]
    counts = processor._get_num_multimodal_tokens(image_sizes=IMAGE_SIZES).num_image_tokens
    assert [layout.unmerged_tokens for layout in layouts] == counts
    pictures = [image_of(images, h, w) for h, w in IMAGE_SIZES[:3]]
    assert packed_lengths(model, encode(processor, pictures)) == counts[:3]


@pytest.mark.parametrize("budget", [3, 10, 160, 320, 640, 1000])
def test_split_budget_is_proportional_and_exact(budget):
    layout = AnyresLayout(base_tokens=256, grid_rows=32, grid_cols=24, crop_grid=(2, 2))
    base, grid = split_budget(budget, layout)
    assert base + grid + 1 == budget
    assert 1 <= base <= 256 and 1 <= grid <= layout.grid_tokens
    assert abs(base / (budget - 1) - 256 / (256 + 768)) <= 1 / (budget - 1) + 1e-9 or base == 1


# ----------------------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("budget", [160, 320, 640])
def test_exact_global_budget_for_every_image_size(tiny_next, images, budget):
    model, processor = tiny_next
    with pitome_mllm.patched(model, processor, target_tokens=budget) as handle:
        expected = [min(budget, handle.visual_tokens_for_image(h, w)) for h, w in IMAGE_SIZES]
        for (h, w), count in zip(IMAGE_SIZES, expected, strict=True):
            layout = handle._adapter.layout_for_image(h, w)
            assert count == (budget if budget <= layout.max_merged_tokens else layout.unmerged_tokens)
        # The model runs on a few of them (the counts above cover every size).
        pictures = [image_of(images, h, w) for h, w in IMAGE_SIZES[1:4]]
        inputs = encode(processor, pictures)
        assert placeholder_counts(processor, inputs) == expected[1:4]
        assert packed_lengths(model, inputs) == expected[1:4]


def test_batched_generate_with_different_sizes(tiny_next, images):
    model, processor = tiny_next
    pictures = [image_of(images, 224, 336), image_of(images, 90, 130)]
    for settings in ({"target_tokens": 160}, {"keep_ratio": 0.9, "method": "tome"}):
        with pitome_mllm.patched(model, processor, **settings) as handle:
            inputs = encode(processor, pictures)
            counts = placeholder_counts(processor, inputs)
            assert counts == [handle.visual_tokens_for_image(*p.size[::-1]) for p in pictures]
            with torch.no_grad():
                generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
            assert generated.shape == (2, inputs["input_ids"].shape[1] + 3)
            # The batch of one gives the same placeholders: counts depend on the image size only.
            assert placeholder_counts(processor, encode(processor, pictures[1:2])) == counts[1:2]


@pytest.mark.parametrize("settings", [{"keep_ratio": 1.0}, {"target_tokens": 5000}, {"method": "none"}])
def test_no_merge_settings_are_bit_identical(tiny_next, images, settings):
    model, processor = tiny_next
    pictures = [image_of(images, 224, 336), image_of(images, 120, 400)]
    inputs = encode(processor, pictures)
    before = logits_of(model, inputs)
    with pitome_mllm.patched(model, processor, **settings):
        patched_inputs = encode(processor, pictures)
        assert torch.equal(patched_inputs["input_ids"], inputs["input_ids"])
        assert torch.equal(logits_of(model, patched_inputs), before)


def test_unpatch_restores_model_and_processor(tiny_next, images):
    model, processor = tiny_next
    pictures = [image_of(images, 500, 200)]
    inputs = encode(processor, pictures)
    before = logits_of(model, inputs)
    processor_attributes = dict(processor.__dict__)
    model_attributes = dict(model.model.__dict__)
    handle = pitome_mllm.patch(model, processor, target_tokens=160)
    assert placeholder_counts(processor, encode(processor, pictures)) == [160]
    handle.unpatch()
    assert processor.__dict__ == processor_attributes
    assert model.model.__dict__.keys() == model_attributes.keys()
    after = encode(processor, pictures)
    assert torch.equal(after["input_ids"], inputs["input_ids"])
    assert torch.equal(logits_of(model, after), before)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"keep_ratio": 0.9, "target_tokens": 160}, "not both"),
        ({"target_tokens": 2}, ">= 3"),
    ],
)
def test_bad_settings_raise_and_leave_model_untouched(tiny_next, settings, message):
    model, processor = tiny_next
    with pytest.raises(ValueError, match=message):
        pitome_mllm.patch(model, processor, **settings)
    assert pitome_mllm.get_patch(model) is None
    assert "pack_image_features" not in model.model.__dict__


# ----------------------------------------------------------------------------------------- OneVision
# No LlavaOnevisionProcessor offline (it needs a torchvision video processor): prompts are built by hand
# with the counts the patch announces, and the processor patch is checked on a stand-in.


@pytest.fixture(scope="module")
def tiny_onevision():
    return build_tiny_onevision()


ONEVISION_SIZES = [(224, 336), (120, 300), (800, 900)]  # the last one is downsampled (anyres_max_4)


def onevision_inputs(image_processor, pictures, counts):
    """Left-padded prompts ``<s> <image>*count ...`` for one image each, with pixel values."""
    pixels = image_processor(images=pictures, return_tensors="pt")
    longest = max(counts)
    rows = [[PAD_ID] * (longest - count) + [BOS_ID] + [IMAGE_ID] * count + TEXT_IDS for count in counts]
    input_ids = torch.tensor(rows)
    return {**pixels, "input_ids": input_ids, "attention_mask": (input_ids != PAD_ID).long()}


def test_onevision_layout_matches_the_model(tiny_onevision, images):
    model, image_processor, _ = tiny_onevision
    pictures = [image_of(images, h, w) for h, w in ONEVISION_SIZES]
    with pitome_mllm.patched(model, None, method="none") as handle:
        layouts = [handle._adapter.layout_for_image(h, w) for h, w in ONEVISION_SIZES]
        assert layouts[-1].grid_tokens < (3 * 8) ** 2  # 3 x 3 crops' 24 x 24 grid was resized down
        pixels = image_processor(images=pictures, return_tensors="pt")
        assert packed_lengths(model, pixels) == [layout.unmerged_tokens for layout in layouts]


@pytest.mark.parametrize(
    "settings", [{"target_tokens": 60}, {"keep_ratio": 0.9}, {"target_tokens": 90, "method": "tome"}]
)
def test_onevision_budgets_and_generate(tiny_onevision, images, settings):
    model, image_processor, _ = tiny_onevision
    pictures = [image_of(images, h, w) for h, w in ONEVISION_SIZES]
    with pitome_mllm.patched(model, None, **settings) as handle:
        counts = [handle.visual_tokens_for_image(h, w) for h, w in ONEVISION_SIZES]
        if "target_tokens" in settings:
            assert counts == [settings["target_tokens"]] * 3
        inputs = onevision_inputs(image_processor, pictures, counts)
        assert packed_lengths(model, inputs) == counts
        with torch.no_grad():
            generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert generated.shape == (3, inputs["input_ids"].shape[1] + 3)


def test_onevision_keep_ratio_one_and_unpatch_are_exact(tiny_onevision, images):
    model, image_processor, _ = tiny_onevision
    pictures = [image_of(images, h, w) for h, w in ONEVISION_SIZES[1:]]
    with pitome_mllm.patched(model, None, method="none") as handle:
        counts = [handle.visual_tokens_for_image(h, w) for h, w in ONEVISION_SIZES[1:]]
    inputs = onevision_inputs(image_processor, pictures, counts)
    before = logits_of(model, inputs)
    with pitome_mllm.patched(model, None, keep_ratio=1.0):
        assert torch.equal(logits_of(model, inputs), before)
    with pitome_mllm.patched(model, None, target_tokens=50):
        assert logits_of(model, onevision_inputs(image_processor, pictures, [50, 50])).shape[1] < before.shape[1]
    assert torch.equal(logits_of(model, inputs), before)


class _OnevisionProcessorWithoutPerImageCount:
    """transformers 4.57's OneVision processor shape: a per-image ``_get_number_of_features``, no
    ``replace_image_token`` (multi-image prompts are counted from ``num_image_tokens``)."""

    image_token = "<image>"
    vision_feature_select_strategy = "full"
    num_image_tokens = 64

    def _get_number_of_features(self, orig_height, orig_width, height, width):
        return 65


def test_onevision_processor_without_a_per_image_count_is_refused_untouched(tiny_onevision):
    model, _, _ = tiny_onevision
    processor = _OnevisionProcessorWithoutPerImageCount()
    forward_before = dict(model.model.__dict__)
    with pytest.raises(ValueError, match="cannot set the placeholder count.*processor=None"):
        pitome_mllm.patch(model, processor, target_tokens=40)
    assert pitome_mllm.get_patch(model) is None
    assert dict(model.model.__dict__) == forward_before
    assert "_get_number_of_features" not in processor.__dict__
    with pitome_mllm.patched(model, None, target_tokens=40) as handle:  # the model alone still patches
        assert handle.num_visual_tokens == 40


class _OnevisionProcessorStandIn:
    """The two methods the patch rewrites, with OneVision's signatures (counts are irrelevant here)."""

    image_token = "<image>"

    def replace_image_token(self, image_inputs, image_idx, **kwargs):
        return "unpatched"

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs):
        return types.SimpleNamespace(num_image_tokens=[0] * len(image_sizes), num_image_patches=[1] * len(image_sizes))


def test_onevision_processor_counts_single_and_multi_image_prompts(tiny_onevision):
    model, _, _ = tiny_onevision
    processor = _OnevisionProcessorStandIn()
    sizes = torch.tensor([[224, 336], [120, 300], [800, 900]])
    with pitome_mllm.patched(model, processor, target_tokens=40) as handle:
        # Image 0 alone in its prompt (cropped, budget 40); images 1 and 2 share one (base crop only).
        image_inputs = {"image_sizes": sizes, "batch_num_images": [1, 2]}
        counts = [len(processor.replace_image_token(image_inputs, i)) // len("<image>") for i in range(3)]
        assert counts == [40, 40, 40]
        single = handle._adapter.layout_for_image(120, 300, cropped=False)
        assert single.unmerged_tokens == ONEVISION_TEST_SPEC.num_patches + 1
        assert processor._get_num_multimodal_tokens(image_sizes=sizes.tolist()).num_image_tokens == [40, 40, 40]
    with pitome_mllm.patched(model, processor, target_tokens=100):
        # The base crop alone has 64 + 1 tokens, fewer than the budget: left unmerged.
        assert len(processor.replace_image_token(image_inputs, 1)) // len("<image>") == 65
    assert processor.replace_image_token(image_inputs, 0) == "unpatched"
