"""`visual_tokens_for_image(h, w)` takes the ORIGINAL image size and equals what the patched processor emits.

For LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision, patched at a keep ratio and at a token budget,
the answer for an original ``h x w`` image is compared with the image placeholders the patched
processor writes into the prompt for a PIL image of that size: extreme sizes included (1 x 1, a
40:1 strip either way, 4000 x 4000), which the processors resize, crop or tile on their own.
"""

from __future__ import annotations

import copy

import pytest
from PIL import Image
from transformers import LlavaOnevisionProcessor

import pitome_mllm
from pitome_mllm.geometry import PatchGrid, ResizeAndCrop, TowerGeometry, check_image_size
from pitome_mllm.models.compat import transformers_version
from pitome_mllm.testing.llava import placeholder_counts
from pitome_mllm.zoo.tiny import (
    IMAGE_TOKEN,
    ONEVISION_TEST_SPEC,
    TinyLlavaSpec,
    build_tiny_llava_next,
    build_tiny_onevision,
)

pytestmark = pytest.mark.model_facing

PROMPT = "USER: <image>\nWhat is this? ASSISTANT:"
# (height, width) of original images: a single pixel, a wide strip, a tall strip, a large photo.
ORIGINAL_SIZES = [(1, 1), (50, 2000), (2000, 50), (4000, 4000)]
BAD_SIZES = [(0, 10), (10, -3), (True, 10), (10, 2.5), ("10", 10), (None, 10)]
NEXT_SPEC = TinyLlavaSpec(image_size=224, patch_size=14, vision_layers=6)
# transformers 4.x patches the placeholder count through the processor's own formula, which needs one output
# size for every image, and refuses a LLaVA-OneVision processor (README, "Tested releases").
TRANSFORMERS_4 = transformers_version()[0] < 5


def picture(height: int, width: int) -> Image.Image:
    return Image.new("RGB", (width, height), color=(120, 60, 200))


def emitted_placeholders(processor, height: int, width: int) -> int:
    """Image placeholders ``processor`` writes for one ``height x width`` PIL image."""
    # transformers 4.x guesses a 1 x 1 x 3 array to be channels-first (its first side is 1): say it there.
    layout = {"input_data_format": "channels_last"} if TRANSFORMERS_4 else {}
    inputs = processor(images=[picture(height, width)], text=[PROMPT], return_tensors="pt", **layout)
    return placeholder_counts(processor, inputs)[0]


def counts_agree(model, processor, settings: dict) -> tuple[list[int], list[int]]:
    """``(visual_tokens_for_image, placeholders emitted)`` for every size of `ORIGINAL_SIZES`, patched."""
    with pitome_mllm.patched(model, processor, **settings) as handle:
        planned = [handle.visual_tokens_for_image(height, width) for height, width in ORIGINAL_SIZES]
        emitted = [emitted_placeholders(processor, height, width) for height, width in ORIGINAL_SIZES]
    return planned, emitted


class TinyOnevisionProcessor(LlavaOnevisionProcessor):
    """transformers' ``LlavaOnevisionProcessor`` without a video processor.

    Its own constructor insists on a video processor, which needs torchvision (an optional
    dependency); the image path (``__call__`` on images, ``replace_image_token``) reads only
    the attributes set here.
    """

    def __init__(self, image_processor, tokenizer, vision_aspect_ratio: str) -> None:
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.video_processor = None
        self.chat_template = None
        self.num_image_tokens = ONEVISION_TEST_SPEC.num_patches
        self.vision_feature_select_strategy = "full"
        self.vision_aspect_ratio = vision_aspect_ratio
        self.image_token, self.video_token = IMAGE_TOKEN, "<video>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.video_token_id = None


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def tiny_next():
    return build_tiny_llava_next(NEXT_SPEC)


@pytest.fixture(scope="module")
def tiny_onevision():
    model, image_processor, tokenizer = build_tiny_onevision()
    return model, TinyOnevisionProcessor(image_processor, tokenizer, model.config.vision_aspect_ratio)


@pytest.fixture(autouse=True)
def _unpatch(request):
    yield
    for name in ("tiny_llava", "tiny_next", "tiny_onevision"):
        if name in request.fixturenames:
            handle = pitome_mllm.get_patch(request.getfixturevalue(name)[0])
            if handle is not None:
                handle.unpatch()


# --------------------------------------------------------------------------------------- LLaVA-1.5


@pytest.mark.parametrize("settings", [{"keep_ratio": 0.9}, {"target_tokens": 40}, {"method": "none"}], ids=str)
def test_llava_counts_equal_the_processor_for_original_sizes(tiny_llava, settings):
    model, processor = tiny_llava
    planned, emitted = counts_agree(model, processor, settings)
    assert planned == emitted
    # Shortest-edge resize and centre crop: every image reaches the tower at the native size.
    assert len(set(planned)) == 1


@pytest.mark.parametrize("settings", [{"keep_ratio": 0.9}, {"target_tokens": 40}], ids=str)
def test_llava_counts_follow_a_processor_that_keeps_the_aspect_ratio(tiny_llava, settings):
    model, processor = tiny_llava
    uncropped = copy.deepcopy(processor)
    uncropped.image_processor.do_center_crop = False
    if TRANSFORMERS_4:
        with pytest.raises(ValueError, match="needs a fixed output size"):
            pitome_mllm.patch(model, uncropped, **settings)
        assert pitome_mllm.get_patch(model) is None
        return
    planned, emitted = counts_agree(model, uncropped, settings)
    assert planned == emitted
    if "keep_ratio" in settings:  # a 112 x 4480 strip has 40 times the patches of the 112 x 112 square
        assert planned[1] == planned[2] > planned[0] == planned[3]


def test_llava_without_a_processor_counts_at_the_native_size(tiny_llava):
    model, _ = tiny_llava
    with pytest.warns(UserWarning, match="without its processor"):
        handle = pitome_mllm.patch(model, None, keep_ratio=0.9)
    try:
        assert {handle.visual_tokens_for_image(h, w) for h, w in ORIGINAL_SIZES} == {handle.num_visual_tokens}
    finally:
        handle.unpatch()


@pytest.mark.parametrize(("height", "width"), BAD_SIZES)
def test_llava_refuses_sizes_that_are_not_positive_integers(tiny_llava, height, width):
    model, processor = tiny_llava
    with pitome_mllm.patched(model, processor, keep_ratio=0.9) as handle:
        with pytest.raises(ValueError, match="positive integer"):
            handle.visual_tokens_for_image(height, width)


# ------------------------------------------------------------------------------------- NeXT, OneVision


@pytest.mark.parametrize("settings", [{"keep_ratio": 0.9}, {"target_tokens": 160}], ids=str)
def test_next_counts_equal_the_processor_for_original_sizes(tiny_next, settings):
    model, processor = tiny_next
    planned, emitted = counts_agree(model, processor, settings)
    assert planned == emitted


@pytest.mark.parametrize("settings", [{"keep_ratio": 0.9}, {"target_tokens": 60}], ids=str)
def test_onevision_counts_equal_the_processor_for_original_sizes(tiny_onevision, settings):
    model, processor = tiny_onevision
    if TRANSFORMERS_4:
        with pytest.raises(ValueError, match="pass processor=None"):
            pitome_mllm.patch(model, processor, **settings)
        assert pitome_mllm.get_patch(model) is None
        return
    planned, emitted = counts_agree(model, processor, settings)
    assert planned == emitted


@pytest.mark.parametrize("fixture", ["tiny_next", "tiny_onevision"])
@pytest.mark.parametrize(("height", "width"), BAD_SIZES)
def test_anyres_refuses_sizes_that_are_not_positive_integers(request, fixture, height, width):
    model, processor = request.getfixturevalue(fixture)
    if TRANSFORMERS_4 and fixture == "tiny_onevision":
        processor = None  # refused with a processor there; the count is the adapter's either way
    with pitome_mllm.patched(model, processor, keep_ratio=0.9) as handle:
        with pytest.raises(ValueError, match="positive integer"):
            handle.visual_tokens_for_image(height, width)


def test_llava_sees_one_native_grid_for_every_original_size(tiny_llava):
    model, processor = tiny_llava
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    with pitome_mllm.patched(model, processor, keep_ratio=0.9) as handle:
        assert {handle._adapter.image_grids(h, w) for h, w in ORIGINAL_SIZES} == {(PatchGrid(side, side),)}


def test_next_grids_are_the_base_crop_and_the_crops_it_packs(tiny_next):
    model, processor = tiny_next
    side = NEXT_SPEC.image_size // NEXT_SPEC.patch_size
    with pitome_mllm.patched(model, processor, target_tokens=160) as handle:
        adapter = handle._adapter
        for height, width in ORIGINAL_SIZES:
            base, crops = adapter.image_grids(height, width)
            layout = adapter.layout_for_image(height, width)
            assert base == PatchGrid(side, side)
            assert (crops.rows // side, crops.cols // side) == layout.crop_grid
            # Unpadding only cuts rows or columns of the tiled crops off.
            assert layout.grid_rows <= crops.rows and layout.grid_cols <= crops.cols
        assert adapter.image_grids(50, 2000, cropped=False) == (PatchGrid(side, side),)


# ---------------------------------------------------------------------------------- the geometry alone


def test_shortest_edge_resize_truncates_the_long_side_like_transformers():
    resize = ResizeAndCrop(shortest_edge=336)
    assert resize(400, 300) == (448, 336)
    assert resize(333, 500) == (336, 504)
    assert ResizeAndCrop(shortest_edge=336, crop=(336, 336))(50, 2000) == (336, 336)
    assert ResizeAndCrop(size=(384, 384))(50, 2000) == (384, 384)


def test_geometry_counts_class_tokens_only_where_the_tower_has_one():
    clip = TowerGeometry(24, 22, 336, 14, class_token=True, drops_class_token=True)
    siglip = TowerGeometry(27, 25, 384, 14, class_token=False, drops_class_token=False)
    assert (clip.default_num_tokens, clip.native_visual_tokens) == (577, 576)
    assert (siglip.default_num_tokens, siglip.native_visual_tokens) == (729, 729)
    assert clip.grid_for_image(4000, 4000).patches == 576  # no resize rule: the native size


def test_check_image_size_names_the_bad_value():
    assert check_image_size(1, 4000) == (1, 4000)
    with pytest.raises(ValueError, match=r"image width must be a positive integer number of pixels, got 2\.5"):
        check_image_size(10, 2.5)
