"""PiToMe on tiny random Qwen2.5-VL and Qwen3-VL models (real transformers classes, real processors).

Counts per image equal `visual_tokens_for_image` and the placeholders the patched processor emits;
the positions the language model receives are the model's own positions of the cells each token
holds (text after an image continues from the image's full grid); batches equal single prompts;
``keep_ratio=1.0`` is bit-exact; ``unpatch()`` restores model and processor; refusals touch nothing;
Qwen3-VL's DeepStack features follow the plan.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import pitome_mllm
from pitome_mllm.models.qwen_vl import VIDEO_REFUSED, qwen_core
from pitome_mllm.zoo.tiny_qwen import tiny_qwen_vl

pytestmark = pytest.mark.model_facing

FAMILIES = ("qwen2.5-vl", "qwen3-vl")
# (height, width) of original images: small (scaled up to the minimum), wide, tall, large (scaled down).
SIZES = [(30, 30), (112, 250), (260, 90), (900, 700)]
SETTINGS = [
    {"keep_ratio": 0.75},
    {"target_tokens": 8},
    {"keep_ratio": 0.9, "target_tokens": 12},
    {"method": "tome", "target_tokens": 6},
    {"method": "random", "target_tokens": 5},
    {"method": "divprune", "target_tokens": 5},
    {"method": "none", "target_tokens": 7},
]
ONE_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>What is in the picture?"
TWO_IMAGES = "Compare <|vision_start|><|image_pad|><|vision_end|> with <|vision_start|><|image_pad|><|vision_end|>."


def picture(height: int, width: int, seed: int = 0) -> Image.Image:
    generator = torch.Generator().manual_seed(seed + height * 7 + width)
    pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


@pytest.fixture(scope="module", params=FAMILIES)
def qwen(request):
    model, processor = tiny_qwen_vl(request.param)
    return model, processor


def image_token_id(model) -> int:
    return model.config.image_token_id


def build(processor, prompts: list[str], images: list[Image.Image]):
    return processor(text=prompts, images=images, return_tensors="pt", padding=True)


def placeholders_per_row(model, inputs) -> list[int]:
    return (inputs["input_ids"] == image_token_id(model)).sum(dim=1).tolist()


class LanguageModelInputs:
    """Records the position ids and DeepStack features the language model receives (after the patch's hooks)."""

    def __init__(self, model) -> None:
        self.calls: list[dict] = []
        self._hook = qwen_core(model).language_model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs) -> None:
        self.calls.append(
            {
                "position_ids": kwargs["position_ids"].clone(),
                "deepstack": [t.clone() for t in (kwargs.get("deepstack_visual_embeds") or [])],
            }
        )

    def close(self) -> None:
        self._hook.remove()


def forward_recording(model, inputs) -> tuple[torch.Tensor, dict]:
    recorder = LanguageModelInputs(model)
    try:
        with torch.no_grad():
            logits = model(**inputs).logits
    finally:
        recorder.close()
    return logits, recorder.calls[-1]


# ------------------------------------------------------------------------------------------ counts
@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_counts_equal_plan_placeholders_and_features(qwen, settings):
    model, processor = qwen
    with pitome_mllm.patched(model, processor, **settings) as handle:
        for height, width in SIZES:
            inputs = build(processor, [ONE_IMAGE], [picture(height, width)])
            planned = handle.visual_tokens_for_image(height, width)
            assert placeholders_per_row(model, inputs) == [planned], (height, width)
            native = int(inputs["image_grid_thw"][0].prod()) // 4
            expected = native
            if settings.get("keep_ratio") is not None:
                expected = min(expected, -(-int(settings["keep_ratio"] * 1000) * native // 1000))
            if settings.get("target_tokens") is not None:
                expected = min(expected, settings["target_tokens"])
            assert planned == expected, (height, width, native)
            with torch.no_grad():
                output = qwen_core(model).get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
            features = getattr(output, "pooler_output", output)
            if isinstance(features, tuple) and len(features) == 2 and isinstance(features[1], list):
                features = features[0]  # transformers 4.57's Qwen3-VL: (features, DeepStack)
            assert [f.shape[0] for f in features] == [planned]
            model(**inputs)  # the model accepts the prompt: placeholders and features agree


def test_an_image_below_the_budget_keeps_every_token(qwen):
    model, processor = qwen
    with pitome_mllm.patched(model, processor, target_tokens=10_000) as handle:
        inputs = build(processor, [ONE_IMAGE], [picture(112, 250)])
        native = int(inputs["image_grid_thw"][0].prod()) // 4
        assert handle.visual_tokens_for_image(112, 250) == native == placeholders_per_row(model, inputs)[0]


def test_bad_image_sizes_are_refused(qwen):
    model, processor = qwen
    with pitome_mllm.patched(model, processor, target_tokens=8) as handle:
        for height, width in [(0, 10), (-14, 112), (True, 112), (10, 2.5)]:
            with pytest.raises(ValueError, match="positive integer"):
                handle.visual_tokens_for_image(height, width)


# --------------------------------------------------------------------------------------- positions
def expected_positions(unpatched_positions, unpatched_inputs, patched_inputs, plan, image_id) -> torch.Tensor:
    """``[3, B, L]`` the unpatched model's positions of what each patched token holds (real tokens only).

    Text tokens: the same text token of the unpatched prompt. Visual token j of image i: the unpatched
    position of the cell it holds (``plan.first_cells[i][j]`` of the image's merged grid).
    """
    expected = torch.zeros_like(patched_inputs["input_ids"]).unsqueeze(0).repeat(3, 1, 1)
    image = 0
    for row in range(patched_inputs["input_ids"].shape[0]):
        real_patched = patched_inputs["attention_mask"][row].bool().nonzero().flatten().tolist()
        real_unpatched = unpatched_inputs["attention_mask"][row].bool().nonzero().flatten().tolist()
        ids_patched = patched_inputs["input_ids"][row]
        ids_unpatched = unpatched_inputs["input_ids"][row]
        cursor = 0  # index into real_unpatched
        position = 0
        while position < len(real_patched):
            column = real_patched[position]
            if ids_patched[column] != image_id:
                expected[:, row, column] = unpatched_positions[-3:, row, real_unpatched[cursor]]
                cursor += 1
                position += 1
                continue
            cells = plan.first_cells[image]
            native_start = cursor
            while cursor < len(real_unpatched) and ids_unpatched[real_unpatched[cursor]] == image_id:
                cursor += 1
            for j, cell in enumerate(cells.tolist()):
                source = real_unpatched[native_start + cell]
                expected[:, row, real_patched[position + j]] = unpatched_positions[-3:, row, source]
            position += len(cells)
            image += 1
    return expected


@pytest.mark.parametrize(
    "settings",
    [{"target_tokens": 8}, {"method": "tome", "keep_ratio": 0.6}, {"method": "random", "target_tokens": 5}],
    ids=["pitome", "tome", "random"],
)
def test_positions_are_the_model_positions_of_the_cells_held(qwen, settings):
    model, processor = qwen
    prompts = [ONE_IMAGE, TWO_IMAGES]
    images = [picture(112, 250), picture(260, 90), picture(140, 140, seed=3)]
    unpatched_inputs = build(processor, prompts, images)
    _, unpatched = forward_recording(model, unpatched_inputs)
    with pitome_mllm.patched(model, processor, **settings) as handle:
        patched_inputs = build(processor, prompts, images)
        _, patched = forward_recording(model, patched_inputs)
        plan = handle._adapter.stage.last_plan
    mask = patched_inputs["attention_mask"].bool()
    expected = expected_positions(
        unpatched["position_ids"], unpatched_inputs, patched_inputs, plan, image_token_id(model)
    )
    received = patched["position_ids"][-3:]
    assert torch.equal(received[:, mask], expected[:, mask])
    # Distinct within each image: no two kept tokens share a cell.
    for cells in plan.first_cells:
        assert len(set(cells.tolist())) == len(cells)
        assert cells.tolist() == sorted(cells.tolist())


def test_generation_continues_positions_after_the_prompt(qwen):
    model, processor = qwen
    with pitome_mllm.patched(model, processor, target_tokens=6):
        inputs = build(processor, [ONE_IMAGE, TWO_IMAGES], [picture(112, 250), picture(260, 90), picture(60, 60)])
        recorder = LanguageModelInputs(model)
        try:
            output = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        finally:
            recorder.close()
    assert output.shape == (2, inputs["input_ids"].shape[1] + 3)
    prompt_positions = recorder.calls[0]["position_ids"][-3:]
    step_positions = recorder.calls[1]["position_ids"][-3:]
    mask = inputs["attention_mask"].bool()
    for row in range(2):
        # The first new token comes one after the largest position of its prompt, as the model's rule says.
        assert int(step_positions[0, row, -1]) == int(prompt_positions[:, row][:, mask[row]].max()) + 1


# ------------------------------------------------------------------------------ exactness and undo
def test_keep_ratio_one_is_bit_exact_and_unpatch_restores(qwen):
    model, processor = qwen
    prompts, images = [ONE_IMAGE, TWO_IMAGES], [picture(112, 250), picture(260, 90), picture(60, 60)]
    core = qwen_core(model)
    inputs = build(processor, prompts, images)
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    instance = set(core.__dict__), set(processor.__dict__)
    with torch.no_grad():
        reference = model(**inputs).logits
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    with pitome_mllm.patched(model, processor, keep_ratio=1.0):
        again = build(processor, prompts, images)
        assert torch.equal(again["input_ids"], inputs["input_ids"])
        with torch.no_grad():
            assert torch.equal(model(**again).logits, reference)
        assert torch.equal(model.generate(**again, max_new_tokens=4, do_sample=False), generated)
    with pitome_mllm.patched(model, processor, target_tokens=5):
        assert build(processor, prompts, images)["input_ids"].shape != inputs["input_ids"].shape
    assert (set(core.__dict__), set(processor.__dict__)) == instance
    assert torch.equal(build(processor, prompts, images)["input_ids"], inputs["input_ids"])
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reference)
    assert all(torch.equal(state[name], tensor) for name, tensor in model.state_dict().items())


def test_batch_equals_single_prompts(qwen):
    model, processor = qwen
    cases = [(ONE_IMAGE, [picture(112, 250)]), (TWO_IMAGES, [picture(260, 90), picture(60, 60)])]
    with pitome_mllm.patched(model, processor, target_tokens=8):
        batch = build(processor, [prompt for prompt, _ in cases], [image for _, images in cases for image in images])
        with torch.no_grad():
            batched = model(**batch).logits[:, -1]
            for row, (prompt, images) in enumerate(cases):
                single = model(**build(processor, [prompt], images)).logits[0, -1]
                torch.testing.assert_close(batched[row], single, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize(
    "settings, message",
    [
        ({"method": "dominant", "target_tokens": 8}, "no class token"),
        ({"method": "fastervlm", "target_tokens": 8}, "no class token"),
        ({"method": "mllm", "target_tokens": 8}, "no class token"),
        ({"method": "pool", "target_tokens": 8}, "aspect ratio"),
        ({"method": "cdpruner", "target_tokens": 8}, "prompt"),
        ({"target_tokens": 8, "llm_prop_attn": True}, "llm_prop_attn"),
        ({"target_tokens": 8, "preset": "mllm"}, "no class token"),
    ],
)
def test_refusals_leave_model_and_processor_untouched(qwen, settings, message):
    model, processor = qwen
    core = qwen_core(model)
    instance = set(core.__dict__), set(processor.__dict__), set(core.language_model.__dict__)
    hooks = len(core.language_model._forward_pre_hooks)
    with pytest.raises(ValueError, match=message):
        pitome_mllm.patch(model, processor, **settings)
    assert (set(core.__dict__), set(processor.__dict__), set(core.language_model.__dict__)) == instance
    assert len(core.language_model._forward_pre_hooks) == hooks
    assert pitome_mllm.get_patch(model) is None


def test_a_prompt_built_before_patching_is_refused_with_the_remedy(qwen):
    model, processor = qwen
    inputs = build(processor, [ONE_IMAGE], [picture(112, 250)])
    with pitome_mllm.patched(model, processor, target_tokens=8):
        with pytest.raises(ValueError, match="visual_tokens_for_image"):
            model(**inputs)


def test_videos_are_refused_while_patched(qwen):
    model, processor = qwen
    core = qwen_core(model)
    patch = core.config.vision_config.patch_size
    grid = torch.tensor([[2, 4, 4]])
    pixels = torch.randn(2 * 4 * 4, 3 * 2 * patch * patch)
    with pitome_mllm.patched(model, processor, target_tokens=8):
        with pytest.raises(ValueError, match="video"):
            core.get_video_features(pixels, grid)
    assert VIDEO_REFUSED.startswith("pitome_mllm")
    with torch.no_grad():
        core.get_video_features(pixels, grid)  # unpatched: videos work again


# ------------------------------------------------------------------------------------------ DeepStack
def test_deepstack_features_follow_the_plan():
    model, processor = tiny_qwen_vl("qwen3-vl")
    inputs_full = build(processor, [ONE_IMAGE], [picture(112, 250)])
    _, unpatched = forward_recording(model, inputs_full)
    with pitome_mllm.patched(model, processor, method="random", target_tokens=5) as handle:
        inputs = build(processor, [ONE_IMAGE], [picture(112, 250)])
        _, patched = forward_recording(model, inputs)
        cells = handle._adapter.stage.last_plan.first_cells[0]
    assert len(patched["deepstack"]) == len(unpatched["deepstack"]) > 0
    for full, kept in zip(unpatched["deepstack"], patched["deepstack"], strict=True):
        assert torch.equal(kept, full[cells])
    with pitome_mllm.patched(model, processor, target_tokens=5):
        _, merged = forward_recording(model, build(processor, [ONE_IMAGE], [picture(112, 250)]))
    assert [t.shape[0] for t in merged["deepstack"]] == [5] * len(unpatched["deepstack"])
