"""Tiny offline LLaVA models, processor and bundled images (pitome_mllm.zoo.tiny, pitome_mllm.assets)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from pitome_mllm.assets import list_images, load_image
from pitome_mllm.models.clip_tower import clip_encoder_layers
from pitome_mllm.testing.llava import placeholder_counts
from pitome_mllm.zoo.tiny import (
    DEMO_SPEC,
    TEST_SPEC,
    TinyLlavaSpec,
    build_tiny_llava,
    build_tiny_processor,
)

pytestmark = pytest.mark.model_facing

PROMPT = "USER: <image>\nWhat is this? ASSISTANT:"
LONG_PROMPT = "USER: <image>\nDescribe the image in detail, please. ASSISTANT:"


# ---------------------------------------------------------------------------------------------- processor


@pytest.mark.parametrize("spec", [TEST_SPEC, DEMO_SPEC], ids=["test_spec", "demo_spec"])
def test_processor_expands_image_token_to_one_placeholder_per_patch(spec: TinyLlavaSpec):
    processor = build_tiny_processor(image_size=spec.image_size, patch_size=spec.patch_size)
    inputs = processor(images=load_image("chelsea"), text=PROMPT, return_tensors="pt")

    assert inputs["pixel_values"].shape == (1, 3, spec.image_size, spec.image_size)
    # "default" strategy: CLIP yields patches + CLS and LLaVA drops CLS, so one placeholder per patch.
    expected = (spec.image_size // spec.patch_size) ** 2
    assert expected == spec.num_patches
    assert placeholder_counts(processor, inputs) == [expected]
    assert inputs["input_ids"][0, 0].item() == processor.tokenizer.bos_token_id


def test_demo_spec_has_clip_vit_l_336_geometry():
    assert DEMO_SPEC.num_patches == 576 and DEMO_SPEC.num_vision_tokens == 577
    assert DEMO_SPEC.vision_layers == 24 and DEMO_SPEC.vision_feature_layer == -2
    assert TEST_SPEC.num_vision_tokens == 65


def test_tokenizer_is_deterministic_and_has_llava_special_tokens():
    first = build_tiny_processor().tokenizer
    second = build_tiny_processor().tokenizer
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()
    assert first.image_token == "<image>"
    assert first.convert_tokens_to_ids("<image>") == first.image_token_id
    assert first.padding_side == "left"
    special_ids = {first.image_token_id, first.pad_token_id, first.bos_token_id, first.eos_token_id}
    assert len(special_ids) == 4 and first.unk_token_id is not None
    # <image> must survive as one token even when glued to text.
    assert first.tokenize("a<image>b").count("<image>") == 1


def test_chat_template_renders_llava_1_5_prompt():
    processor = build_tiny_processor()
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    assert processor.apply_chat_template(conversation, add_generation_prompt=True) == PROMPT


def test_processor_save_load_round_trip(tmp_path):
    processor = build_tiny_processor(image_size=TEST_SPEC.image_size, patch_size=TEST_SPEC.patch_size)
    processor.save_pretrained(tmp_path)
    reloaded = AutoProcessor.from_pretrained(tmp_path)

    image = load_image("coffee")
    original_inputs = processor(images=image, text=PROMPT, return_tensors="pt")
    reloaded_inputs = reloaded(images=image, text=PROMPT, return_tensors="pt")
    assert torch.equal(original_inputs["input_ids"], reloaded_inputs["input_ids"])
    assert torch.equal(original_inputs["pixel_values"], reloaded_inputs["pixel_values"])
    assert reloaded.tokenizer.padding_side == "left"
    assert reloaded.tokenizer.image_token_id == processor.tokenizer.image_token_id
    assert reloaded.patch_size == TEST_SPEC.patch_size
    assert reloaded.num_additional_image_tokens == 1
    assert reloaded.vision_feature_select_strategy == "default"
    assert reloaded.chat_template == processor.chat_template


# ---------------------------------------------------------------------------------------------- model


def test_config_matches_spec_and_tokenizer(tiny_llava):
    model, processor = tiny_llava
    config = model.config
    assert config.image_token_id == processor.tokenizer.image_token_id
    assert config.text_config.vocab_size == len(processor.tokenizer)
    assert config.text_config.pad_token_id == processor.tokenizer.pad_token_id
    assert config.vision_config.num_hidden_layers == TEST_SPEC.vision_layers
    assert config.vision_feature_layer == -2 and config.vision_feature_select_strategy == "default"
    assert config._attn_implementation == "sdpa"
    assert config.vision_config._attn_implementation == "sdpa"
    assert not model.training
    assert len(clip_encoder_layers(model.model.vision_tower)) == TEST_SPEC.vision_layers


def test_build_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(1234)
    expected_next_draw = torch.rand(3)
    torch.manual_seed(1234)
    first, _ = build_tiny_llava(TEST_SPEC)
    assert torch.equal(torch.rand(3), expected_next_draw)

    second, _ = build_tiny_llava(TEST_SPEC)
    first_state, second_state = first.state_dict(), second.state_dict()
    assert first_state.keys() == second_state.keys()
    assert all(torch.equal(first_state[name], second_state[name]) for name in first_state)

    reseeded, _ = build_tiny_llava(TinyLlavaSpec(**{**TEST_SPEC.__dict__, "seed": 1}))
    name = "model.multi_modal_projector.linear_1.weight"
    assert not torch.equal(first_state[name], reseeded.state_dict()[name])


def test_build_rejects_processor_of_other_geometry():
    demo_processor = build_tiny_processor(image_size=DEMO_SPEC.image_size, patch_size=DEMO_SPEC.patch_size)
    with pytest.raises(ValueError, match="patch"):
        build_tiny_llava(TEST_SPEC, processor=demo_processor)


def test_demo_spec_forward_accepts_576_image_features():
    model, processor = build_tiny_llava(DEMO_SPEC)
    inputs = processor(images=load_image("astronaut"), text=PROMPT, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], len(processor.tokenizer))
    assert torch.isfinite(logits).all()


def test_saved_model_reloads_with_identical_logits(tiny_llava, saved_tiny_llava_dir):
    model, processor = tiny_llava
    reloaded_model = LlavaForConditionalGeneration.from_pretrained(saved_tiny_llava_dir).eval()
    reloaded_processor = AutoProcessor.from_pretrained(saved_tiny_llava_dir)

    inputs = processor(images=load_image("astronaut"), text=PROMPT, return_tensors="pt")
    reloaded_inputs = reloaded_processor(images=load_image("astronaut"), text=PROMPT, return_tensors="pt")
    assert torch.equal(inputs["input_ids"], reloaded_inputs["input_ids"])
    with torch.no_grad():
        logits = model(**inputs).logits
        reloaded_logits = reloaded_model(**reloaded_inputs).logits
    assert torch.equal(logits, reloaded_logits)
    assert reloaded_model.generation_config.pad_token_id == processor.tokenizer.pad_token_id


def test_batched_generate_with_left_padding(tiny_llava):
    model, processor = tiny_llava
    images = [load_image("astronaut"), load_image("coffee")]
    inputs = processor(images=images, text=[PROMPT, LONG_PROMPT], return_tensors="pt", padding=True)

    # The shorter prompt is padded on the left, so both rows end at the position generation continues from.
    attention_mask = inputs["attention_mask"]
    assert attention_mask[0, 0] == 0 and attention_mask[1, 0] == 1
    assert attention_mask[:, -1].all()
    assert placeholder_counts(processor, inputs) == [TEST_SPEC.num_patches] * 2

    max_new_tokens = 8
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    prompt_length = inputs["input_ids"].shape[1]
    assert generated.shape == (2, prompt_length + max_new_tokens)
    assert torch.equal(generated[:, :prompt_length], inputs["input_ids"])
    new_tokens = generated[:, prompt_length:]
    assert ((new_tokens >= 0) & (new_tokens < len(processor.tokenizer))).all()

    # Left padding must not change what the padded prompt generates on its own.
    alone = processor(images=images[0], text=PROMPT, return_tensors="pt")
    with torch.no_grad():
        generated_alone = model.generate(**alone, max_new_tokens=max_new_tokens, do_sample=False)
    assert torch.equal(generated_alone[0, alone["input_ids"].shape[1] :], new_tokens[0])


# ---------------------------------------------------------------------------------------------- images


def test_bundled_images_load_as_small_rgb():
    names = list_images()
    assert {"astronaut", "chelsea", "coffee"} <= set(names)
    for name in names:
        image = load_image(name)
        assert image.mode == "RGB"
        assert max(image.size) <= 336
    assert load_image().size == load_image("astronaut").size


def test_unknown_image_name_lists_the_options():
    with pytest.raises(ValueError) as error:
        load_image("no-such-picture")
    message = str(error.value)
    assert "no-such-picture" in message
    for name in list_images():
        assert name in message
