"""`pitome_mllm.runtime.loading.load_qwen_vl`: Qwen2.5-VL / Qwen3-VL checkpoints saved offline, their
processors (torchvision or not) and the pixel bounds that fix each image's native token count."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import pitome_mllm
from pitome_mllm.models.qwen_vl import image_processor_resize, set_pixel_limits
from pitome_mllm.runtime.loading import ModelLoadError, load_qwen_vl, qwen_vl_class_name

pytestmark = pytest.mark.model_facing

FAMILIES = {"qwen2.5-vl": "Qwen2_5_VLForConditionalGeneration", "qwen3-vl": "Qwen3VLForConditionalGeneration"}
SIZES = [(300, 500), (224, 224), (90, 400)]


def placeholders(processor, image: Image.Image) -> int:
    inputs = processor(images=[image], text=[processor.image_token], return_tensors="pt")
    return int((inputs["input_ids"] == processor.image_token_id).sum())


@pytest.mark.parametrize("family", FAMILIES)
def test_loads_the_class_the_config_names_with_the_processor_bounds(saved_tiny_qwen_dir, family):
    folder = saved_tiny_qwen_dir(family)
    model, processor = load_qwen_vl(folder, device="cpu", dtype="float32")
    assert type(model).__name__ == FAMILIES[family] and not model.training
    assert type(processor).__name__ in ("Qwen2_5_VLProcessor", "Qwen3VLProcessor")

    factor = 28 if family == "qwen2.5-vl" else 32
    # At most 4 x 4 merged tokens per image.
    limits = {"min_pixels": factor * factor, "max_pixels": 16 * factor * factor}
    bounded, bounded_processor = load_qwen_vl(folder, device="cpu", **limits)
    resize = image_processor_resize(bounded_processor.image_processor, factor)
    assert (resize.min_pixels, resize.max_pixels) == (factor * factor, 16 * factor * factor)
    for height, width in SIZES:
        image = Image.new("RGB", (width, height), (120, 30, 200))
        count = placeholders(bounded_processor, image)
        assert count <= 16
        with pitome_mllm.patched(bounded, bounded_processor, method="none") as handle:
            # method none leaves every image whole: the handle's count is the native one.
            assert handle.visual_tokens_for_image(height, width) == count
    assert torch.equal(next(model.parameters()), next(bounded.parameters()))


def test_a_patch_follows_the_loaded_bounds(saved_tiny_qwen_dir):
    model, processor = load_qwen_vl(saved_tiny_qwen_dir("qwen2.5-vl"), device="cpu", max_pixels=112 * 112)
    image = Image.new("RGB", (500, 300))
    native = placeholders(processor, image)
    assert native == 15  # 84 x 140 px -> 6 x 10 patches -> 15 merged tokens
    with pitome_mllm.patched(model, processor, method="pitome", target_tokens=8) as handle:
        assert handle.visual_tokens_for_image(300, 500) == placeholders(processor, image) == 8


def test_config_without_architectures_names_the_class_by_model_type():
    class Config:
        architectures = None
        model_type = "qwen3_vl"

    assert qwen_vl_class_name(Config()) == "Qwen3VLForConditionalGeneration"
    Config.model_type = "llava"
    with pytest.raises(ModelLoadError, match="expected one of"):
        qwen_vl_class_name(Config())


def test_other_checkpoints_and_missing_folders_are_refused(saved_tiny_llava_dir, tmp_path):
    with pytest.raises(ModelLoadError, match="'llava' model"):
        load_qwen_vl(saved_tiny_llava_dir, device="cpu")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_qwen_vl(tmp_path / "missing", device="cpu")


def test_pixel_bounds_are_checked(saved_tiny_qwen_dir):
    _, processor = load_qwen_vl(saved_tiny_qwen_dir("qwen2.5-vl"), device="cpu")
    with pytest.raises(ValueError, match="must not exceed"):
        set_pixel_limits(processor.image_processor, 10_000, 5_000)
    with pytest.raises(ValueError, match="max_pixels must be a positive"):
        set_pixel_limits(processor.image_processor, None, 0)
    set_pixel_limits(processor.image_processor, None, 200 * 200)
    resize = image_processor_resize(processor.image_processor, 28)
    assert (resize.min_pixels, resize.max_pixels) == (56 * 56, 200 * 200)  # the tiny processor's minimum kept
