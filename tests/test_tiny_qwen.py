"""Tiny offline Qwen2.5-VL / Qwen3-VL models with their real processors, and the real 7B / 8B shapes
(pitome_mllm.zoo.tiny_qwen, pitome_mllm.zoo.architectures)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from transformers.utils import is_torchvision_available

from pitome_mllm.testing.llava import placeholder_counts
from pitome_mllm.zoo.architecture_specs import QwenTextShape, QwenVisionShape, QwenVLArchSpec
from pitome_mllm.zoo.architectures import ARCHITECTURES, arch_config, build_arch, count_parameters
from pitome_mllm.zoo.tiny_qwen import (
    QWEN_FAMILIES,
    TINY_QWEN_PIXELS,
    build_qwen_tokenizer,
    build_tiny_qwen_processor,
    load_qwen_vl_processor,
    qwen_image_processor,
    qwen_vl_model_class,
    qwen_vl_processor,
    save_tiny_qwen_vl,
    tiny_qwen_spec,
    tiny_qwen_vl,
)

pytestmark = pytest.mark.model_facing

IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
PROMPT = IMAGE + "What is in the image?"
TWO_IMAGE_PROMPT = IMAGE + IMAGE + "Which one is red?"
PROCESSOR_CLASS = {"qwen2.5-vl": "Qwen2_5_VLProcessor", "qwen3-vl": "Qwen3VLProcessor"}
MODEL_CLASS = {"qwen2.5-vl": "Qwen2_5_VLForConditionalGeneration", "qwen3-vl": "Qwen3VLForConditionalGeneration"}

# (height, width) px -> the patch grid smart_resize gives (multiples of 2 x patch: 28 px for 2.5-VL, 32 px for 3-VL).
SIZES = [(56, 56), (100, 150), (224, 224)]
GRIDS = {
    "qwen2.5-vl": [(4, 4), (8, 10), (16, 16)],  # 100 -> 112 px, 150 -> 140 px
    "qwen3-vl": [(4, 4), (6, 10), (14, 14)],  # 56 -> 64 px (min_pixels), 100 -> 96 px, 150 -> 160 px
}


def random_image(height: int, width: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module", params=QWEN_FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def tiny(family):
    return tiny_qwen_vl(family)


def batch_inputs(processor):
    """Two prompts, left-padded: one image of 56 px, then two images (100 x 150 and 224 px) in one prompt."""
    images = [random_image(*size, seed=index) for index, size in enumerate(SIZES)]
    return processor(images=images, text=[PROMPT, TWO_IMAGE_PROMPT], return_tensors="pt", padding=True)


# ---------------------------------------------------------------------------------------------- models


def test_builds_the_real_classes_in_eval_fp32(family, tiny):
    model, processor = tiny
    assert type(model).__name__ == MODEL_CLASS[family]
    assert type(processor).__name__ == PROCESSOR_CLASS[family]
    assert type(processor).__module__.startswith("transformers.models.")
    assert type(processor.image_processor).__name__.startswith("Qwen2VLImageProcessor")
    assert not model.training
    assert {parameter.dtype for parameter in model.parameters()} == {torch.float32}
    assert model.config.vision_config._attn_implementation == "sdpa"
    tokenizer = processor.tokenizer
    assert model.config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>") == processor.image_token_id
    assert model.config.video_token_id == tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert model.config.vision_start_token_id == tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert model.config.vision_end_token_id == tokenizer.convert_tokens_to_ids("<|vision_end|>")


def test_builds_are_seeded_and_leave_the_callers_random_stream_alone(family):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first, _ = tiny_qwen_vl(family)
    assert torch.equal(torch.rand(3), expected_next)
    second, _ = tiny_qwen_vl(family)
    other_seed, _ = tiny_qwen_vl(family, seed=1)
    state, other = first.state_dict(), other_seed.state_dict()
    assert all(torch.equal(tensor, second.state_dict()[name]) for name, tensor in state.items())
    assert not all(torch.equal(tensor, other[name]) for name, tensor in state.items())


def test_qwen25_windows_partition_small_grids_and_some_blocks_attend_fully():
    model, processor = tiny_qwen_vl("qwen2.5-vl")
    vision_config = model.config.vision_config
    assert list(vision_config.fullatt_block_indexes) == [1, 3]
    assert vision_config.depth == 4
    bounds_per_block = []

    def record(block, args, kwargs):
        bounds_per_block.append(torch.unique_consecutive(kwargs["cu_seqlens"]).tolist())

    blocks = model.model.visual.blocks
    handles = [block.register_forward_pre_hook(record, with_kwargs=True) for block in blocks]
    try:
        inputs = processor(images=random_image(112, 112), text=PROMPT, return_tensors="pt")
        with torch.no_grad():
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    # 56 px windows = 4 x 4 patches: a 112 px image (8 x 8 patches) has four windows of 16 patches.
    windows, full = [0, 16, 32, 48, 64], [0, 64]
    assert bounds_per_block == [windows, full, windows, full]


def test_qwen3_has_deepstack_layers():
    model, _ = tiny_qwen_vl("qwen3-vl")
    assert list(model.config.vision_config.deepstack_visual_indexes) == [1, 2]
    assert len(model.model.visual.deepstack_merger_list) == 2
    assert model.config.text_config.head_dim == 32


def test_spec_overrides_reach_the_config():
    model, _ = tiny_qwen_vl("qwen2.5-vl", vision_layers=8, fullatt_block_indexes=(3, 7), text_layers=1)
    assert model.config.vision_config.depth == 8
    assert list(model.config.vision_config.fullatt_block_indexes) == [3, 7]
    assert model.config.text_config.num_hidden_layers == 1
    with pytest.raises(ValueError, match="mrope_section"):
        tiny_qwen_vl("qwen2.5-vl", mrope_section=(4, 4, 4))
    with pytest.raises(ValueError, match="known: qwen2.5-vl, qwen3-vl"):
        tiny_qwen_spec("qwen2-vl")


# ---------------------------------------------------------------------------------------------- processor


@pytest.mark.parametrize("index", range(len(SIZES)), ids=[f"{h}x{w}" for h, w in SIZES])
def test_processor_emits_a_quarter_of_the_grid_per_image(family, tiny, index):
    _, processor = tiny
    inputs = processor(images=random_image(*SIZES[index]), text=PROMPT, return_tensors="pt")
    grid = inputs["image_grid_thw"]
    assert grid.tolist() == [[1, *GRIDS[family][index]]]
    assert placeholder_counts(processor, inputs) == [int(grid.prod()) // 4]
    patch = tiny_qwen_spec(family).patch_size
    channels = 3 * 2 * patch * patch  # temporal patch 2
    assert tuple(inputs["pixel_values"].shape) == (int(grid.prod()), channels)


def test_pixel_limits_bound_every_image_to_4_to_100_tokens(family, tiny):
    _, processor = tiny
    min_pixels, max_pixels = TINY_QWEN_PIXELS[family]
    assert (processor.image_processor.size["shortest_edge"], processor.image_processor.size["longest_edge"]) == (
        min_pixels,
        max_pixels,
    )
    tokens = []
    for size in [(20, 20), (600, 400), (1000, 1000)]:
        inputs = processor(images=random_image(*size), text=PROMPT, return_tensors="pt")
        tokens += placeholder_counts(processor, inputs)
    assert tokens[0] == 4
    assert all(4 <= count <= 100 for count in tokens)
    assert tokens[2] > 50


def test_two_images_in_one_prompt_get_their_own_counts_in_a_left_padded_batch(family, tiny):
    _, processor = tiny
    inputs = batch_inputs(processor)
    grids = inputs["image_grid_thw"]
    per_image = [int(grid.prod()) // 4 for grid in grids]
    assert placeholder_counts(processor, inputs) == [per_image[0], per_image[1] + per_image[2]]
    second = inputs["input_ids"][1].tolist()
    start = processor.tokenizer.convert_tokens_to_ids("<|vision_start|>")
    end = processor.tokenizer.convert_tokens_to_ids("<|vision_end|>")
    runs = []
    for position, token in enumerate(second):
        if token == start:
            runs.append(second.index(end, position) - position - 1)
    assert runs == per_image[1:]
    # Left padding: the shorter prompt starts with pad tokens and a zero mask.
    assert inputs["attention_mask"][0, 0] == 0 and inputs["attention_mask"][1].all()
    assert inputs["input_ids"][0, 0] == processor.tokenizer.pad_token_id


def test_chat_template_places_the_vision_tokens(tiny):
    _, processor = tiny
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == f"<|im_start|>user\n{IMAGE}What is this?<|im_end|>\n<|im_start|>assistant\n"
    inputs = processor(images=random_image(56, 56), text=text, return_tensors="pt")
    assert placeholder_counts(processor, inputs) == [4]


def test_tokenizer_has_the_qwen_special_tokens_and_no_bos():
    tokenizer = build_qwen_tokenizer()
    for token in ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>", "<|im_start|>"]:
        assert len(tokenizer(token)["input_ids"]) == 1, token
    assert tokenizer.image_token == "<|image_pad|>" and tokenizer.video_token == "<|video_pad|>"
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.bos_token is None
    assert tokenizer.padding_side == "left"
    assert tokenizer("a cat")["input_ids"] == build_qwen_tokenizer()("a cat")["input_ids"]


def test_without_torchvision_the_processor_has_no_video_but_keeps_its_other_class_checks(family):
    processor = build_tiny_qwen_processor(family)
    if is_torchvision_available():
        assert type(processor.video_processor).__name__.endswith("VideoProcessor")
        return
    assert processor.video_processor is None
    assert "check_argument_for_proper_class" not in vars(processor)  # the waiver is gone after __init__
    with pytest.raises(TypeError, match="for argument image_processor"):
        qwen_vl_processor(family, processor.tokenizer, processor.tokenizer)
    image_processor = qwen_image_processor(family, *TINY_QWEN_PIXELS[family])
    # The unwaived constructor is what fails without torchvision.
    with pytest.raises((AttributeError, TypeError, ValueError, ImportError)):
        getattr(transformers, PROCESSOR_CLASS[family])(image_processor, processor.tokenizer, None)


# ---------------------------------------------------------------------------------------------- running


def test_forward_and_generate_run_on_a_batch_with_two_images_in_one_prompt(tiny):
    model, processor = tiny
    inputs = batch_inputs(processor)
    with torch.no_grad():
        logits = model(**inputs).logits
        generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert logits.shape == (*inputs["input_ids"].shape, len(processor.tokenizer))
    assert torch.isfinite(logits).all()
    assert generated.shape == (2, inputs["input_ids"].shape[1] + 3)


def test_save_and_reload_offline(family, tiny, tmp_path):
    model, processor = tiny
    folder = save_tiny_qwen_vl(tmp_path / family, family)
    reloaded = qwen_vl_model_class(family).from_pretrained(folder).eval()
    reloaded_processor = load_qwen_vl_processor(folder)
    assert type(reloaded_processor) is type(processor)
    assert reloaded_processor.chat_template == processor.chat_template
    size = reloaded_processor.image_processor.size
    assert (size["shortest_edge"], size["longest_edge"]) == TINY_QWEN_PIXELS[family]
    state = reloaded.state_dict()
    assert all(torch.equal(tensor, state[name]) for name, tensor in model.state_dict().items())
    inputs = batch_inputs(processor)
    reloaded_inputs = batch_inputs(reloaded_processor)
    assert inputs.keys() == reloaded_inputs.keys()
    assert all(torch.equal(inputs[key], reloaded_inputs[key]) for key in inputs)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reloaded(**reloaded_inputs).logits)
    if processor.video_processor is None:
        # Built without torchvision: the folder is written as a released checkpoint's (image processor config, and
        # the video processor's class for a machine that has torchvision). With torchvision transformers saves the
        # real video processor itself, in its own layout.
        assert (folder / "preprocessor_config.json").exists()
        assert (folder / "video_preprocessor_config.json").exists()


# ---------------------------------------------------------------------------------------------- real shapes


def test_real_shapes_are_registered_with_the_official_numbers():
    assert {"qwen2.5-vl-7b", "qwen2.5-vl-7b-vision", "qwen3-vl-8b", "qwen3-vl-8b-vision"} <= set(ARCHITECTURES)
    config = arch_config("qwen2.5-vl-7b")
    vision, text = config.vision_config, config.text_config
    assert (vision.depth, vision.hidden_size, vision.num_heads, vision.intermediate_size) == (32, 1280, 16, 3420)
    assert (vision.out_hidden_size, vision.patch_size, vision.temporal_patch_size) == (3584, 14, 2)
    assert (vision.spatial_merge_size, vision.window_size) == (2, 112)
    assert list(vision.fullatt_block_indexes) == [7, 15, 23, 31]
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == (3584, 28, 28)
    assert (text.num_key_value_heads, text.intermediate_size, text.vocab_size) == (4, 18944, 152064)
    rope = getattr(text, "rope_parameters", None) or text.rope_scaling
    assert list(rope["mrope_section"]) == [16, 24, 24]
    config = arch_config("qwen3-vl-8b")
    vision, text = config.vision_config, config.text_config
    assert (vision.depth, vision.hidden_size, vision.out_hidden_size, vision.patch_size) == (27, 1152, 4096, 16)
    assert list(vision.deepstack_visual_indexes) == [8, 16, 24]
    assert (text.hidden_size, text.num_hidden_layers, text.num_key_value_heads, text.head_dim) == (4096, 36, 8, 128)


def test_real_shape_parameter_counts():
    qwen25 = count_parameters("qwen2.5-vl-7b")  # on the meta device: nothing allocated
    assert qwen25["vision_tower"] + qwen25["projector"] == 676_550_144
    assert 8.28e9 < qwen25["total"] < 8.30e9  # Qwen2.5-VL-7B: 8.29B
    qwen3 = count_parameters("qwen3-vl-8b")
    assert 8.76e9 < qwen3["total"] < 8.78e9  # Qwen3-VL-8B: 8.77B
    assert qwen3["projector"] > qwen25["projector"]  # three DeepStack mergers besides the merger


def test_vision_only_real_shape_builds_on_meta_without_a_language_model():
    model, processor = build_arch("qwen2.5-vl-7b-vision", device="meta")
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert model.model.visual.merger.mlp[-1].out_features == 3584
    assert all(parameter.is_meta for parameter in model.model.language_model.parameters())
    assert processor.image_token_id < model.config.text_config.vocab_size
    inputs = processor(images=random_image(336, 336), text=PROMPT, return_tensors="pt")
    assert placeholder_counts(processor, inputs) == [144]  # 24 x 24 patches, 2 x 2 merged


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_small_qwen_arch_is_materialised_with_the_buffers_of_an_ordinary_build(family):
    qwen3 = family == "qwen3-vl"
    vision = QwenVisionShape(
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        intermediate_size=64,
        out_hidden_size=64,
        patch_size=16 if qwen3 else 14,
        window_size=56,
        fullatt_block_indexes=(1,),
        deepstack_visual_indexes=(0,) if qwen3 else (),
        num_position_embeddings=64,
    )
    text = QwenTextShape(
        hidden_size=64,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        intermediate_size=64,
        vocab_size=600,
        head_dim=32,
        mrope_section=(6, 5, 5) if qwen3 else (4, 6, 6),
        mrope_interleaved=qwen3,
    )
    spec = QwenVLArchSpec("toy", "toy", family, vision, text)
    model, processor = build_arch(spec)
    ordinary = type(model)(arch_config(spec, processor.tokenizer))
    expected = dict(ordinary.named_buffers())
    assert all(torch.equal(buffer, expected[name]) for name, buffer in model.named_buffers())
    weight = model.model.language_model.layers[0].mlp.up_proj.weight
    assert 0.015 < float(weight.detach().std()) < 0.025
    inputs = processor(images=random_image(112, 112), text=PROMPT, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[-1] == 600 and torch.isfinite(logits).all()
