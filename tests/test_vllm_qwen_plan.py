"""The vLLM-free half of the Qwen-VL plugin (`pitome_mllm.models.vllm_qwen_vl`): positions numbered before the
encoder, the cells carried in the embeddings, their move in the forward, and the tower's groups. No vLLM needed."""

from __future__ import annotations

import pytest
import torch

import pitome_mllm
from pitome_mllm.models.qwen_vl import cell_offsets
from pitome_mllm.models.vllm_qwen_vl import (
    CELL_CHANNELS,
    ImageRun,
    QwenVllmPlan,
    append_cells,
    move_to_cells,
    reduced_mrope_positions,
    split_cells,
    tower_calls,
)

pytestmark = pytest.mark.vllm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cells_survive_the_embedding_dtype(dtype):
    grid = (1, 40, 300)  # offsets up to 299: above bfloat16's exact integers, so digits are needed
    cells = torch.tensor([0, 5, 299, 1200, 11999])
    tokens = torch.randn(5, 16).to(dtype)
    carried = append_cells(tokens, grid, cells)
    assert carried.shape == (5, 16 + CELL_CHANNELS) and carried.dtype == dtype
    stripped, offsets = split_cells(carried)
    assert torch.equal(stripped, tokens)
    assert torch.equal(offsets, cell_offsets(grid, cells))


def test_tower_groups_stay_within_the_budget_and_take_every_image():
    assert tower_calls([64, 64, 64], 128) == [slice(0, 2), slice(2, 3)]
    assert tower_calls([200, 10, 10], 128) == [slice(0, 1), slice(1, 3)]  # an image larger than the budget alone
    assert tower_calls([], 128) == []


def test_move_to_cells_moves_image_tokens_only_and_raises_on_a_count_mismatch():
    positions, _ = reduced_mrope_positions(9, [ImageRun(offset=2, grid=(1, 2, 3), kept=4)])
    is_image = torch.tensor([False, False, True, True, True, True, False])  # the forward's first 7 tokens
    offsets = cell_offsets((1, 2, 3), torch.tensor([0, 2, 3, 5]))
    moved = positions.clone()
    move_to_cells(moved, is_image, offsets)
    assert torch.equal(moved[:, [0, 1, 6, 7, 8]], positions[:, [0, 1, 6, 7, 8]])
    assert moved[:, 2:6].tolist() == [[2, 2, 2, 2], [2, 2, 3, 3], [2, 4, 2, 4]]
    with pytest.raises(RuntimeError, match="3 image embeddings in this forward, but 4 image positions"):
        move_to_cells(positions.clone(), is_image, offsets[:, :3])


@pytest.mark.parametrize("family", ["qwen2.5-vl", "qwen3-vl"])
@pytest.mark.parametrize(
    "settings", [{"target_tokens": 8}, {"keep_ratio": 0.9}, {"method": "random", "target_tokens": 6}]
)
def test_positions_equal_the_transformers_adapters(family, settings):
    """The plan's positions (numbered before the encoder, moved to the kept cells) are those the patched
    transformers model gives its language model, for two images of different sizes in one prompt."""
    from pitome_mllm.testing.vllm_runs import QWEN_REQUESTS
    from pitome_mllm.zoo.tiny_qwen import tiny_qwen_vl

    model, processor = tiny_qwen_vl(family)
    request = next(request for request in QWEN_REQUESTS if request.name == "two_images")
    handle = pitome_mllm.patch(model, processor, **settings)
    try:
        inputs = processor(images=request.load_images(), text=[request.text], return_tensors="pt")
        seen = {}
        hook = model.model.language_model.register_forward_pre_hook(
            lambda module, args, kwargs: seen.update(position_ids=kwargs["position_ids"]), with_kwargs=True
        )
        with torch.no_grad():
            model(**inputs)
        hook.remove()
        stage = handle._adapter.stage
        plan = QwenVllmPlan.from_config(model.config, pitome_mllm.PiToMeConfig(**settings))
        input_ids = inputs["input_ids"][0]
        is_image = input_ids == model.config.image_token_id
        grids = [plan.merged_grid(grid) for grid in inputs["image_grid_thw"].tolist()]
        starts = (is_image & ~torch.cat((is_image.new_zeros(1), is_image[:-1]))).nonzero().flatten().tolist()
        kept = [cells.shape[0] for cells in stage.last_plan.first_cells]
        runs = [ImageRun(start, grid, count) for start, grid, count in zip(starts, grids, kept, strict=True)]
        positions, delta = reduced_mrope_positions(input_ids.shape[0], runs)
        offsets = torch.cat([cell_offsets(g, c) for g, c in zip(grids, stage.last_plan.first_cells, strict=True)], 1)
        move_to_cells(positions, is_image, offsets)
        rope_deltas = model.model.rope_deltas
    finally:
        handle.unpatch()
    assert torch.equal(positions, seen["position_ids"][-3:, 0])
    assert delta == int(rope_deltas.flatten()[0])  # decoding continues where transformers' does
