"""Merge maps (pitome_mllm.tools.viz) and the ``pitome-mllm visualize`` command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pitome_mllm.assets import load_image
from pitome_mllm.cli import main
from pitome_mllm.tools.spectral import plan_steps
from pitome_mllm.tools.viz import (
    BOUNDARY_RGB,
    SINGLETON_RGB,
    Curve,
    CurvePanel,
    MergeMapRow,
    curves_size_px,
    energy_map,
    figure_size_px,
    merge_maps_from_tokens,
    patch_grid,
    pixel_values_for,
    plot_curves,
    plot_merge_maps,
    record_row,
    render_merge_map,
    trace_merges,
    vision_hidden_states,
)
from pitome_mllm.zoo.tiny import TEST_SPEC

pytestmark = pytest.mark.model_facing


def _quadrant_image(cells: int = 8, cell_px: int = 4) -> np.ndarray:
    """An image of four flat colours, one per quadrant of a ``cells x cells`` grid."""
    colours = np.array([[0.9, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.9], [0.9, 0.9, 0.2]])
    half = cells // 2
    quadrant = (np.arange(cells)[:, None] >= half) * 2 + (np.arange(cells)[None, :] >= half)
    return np.repeat(np.repeat(colours[quadrant], cell_px, axis=0), cell_px, axis=1)


# ----------------------------------------------------------------- rendering
def test_render_fills_groups_with_their_mean_colour_and_draws_edges():
    image = np.zeros((8, 8, 3))
    image[:, :4] = [1.0, 0.0, 0.0]  # left half red
    image[:, 4:] = [0.0, 0.0, 1.0]  # right half blue
    # 2 x 2 patches of 4 px: the top row is one group spanning red and blue, the bottom row two singletons.
    labels = torch.tensor([[7, 7], [1, 2]])
    canvas = render_merge_map(image, labels)
    assert canvas.shape == (8, 8, 3)
    np.testing.assert_allclose(canvas[1, 1], [0.5, 0.0, 0.5])  # inside the merged group: mean colour
    np.testing.assert_allclose(canvas[2, 3], [0.5, 0.0, 0.5])  # no edge inside a group
    np.testing.assert_allclose(canvas[3, 1], BOUNDARY_RGB)  # edge between the top group and a bottom token
    np.testing.assert_allclose(canvas[7, 0], SINGLETON_RGB)  # single-patch tokens are outlined


def test_render_palette_mode_and_bad_arguments():
    image = _quadrant_image()
    labels = torch.arange(64).view(8, 8) // 16
    canvas = render_merge_map(image, labels, colour="palette")
    assert canvas.shape == image.shape and canvas.min() >= 0 and canvas.max() <= 1
    with pytest.raises(ValueError, match="colour"):
        render_merge_map(image, labels, colour="rainbow")
    with pytest.raises(ValueError, match="multiple"):
        render_merge_map(image[:30], labels)


def test_patch_grid():
    assert patch_grid(576, 336, 336) == (24, 24)
    assert patch_grid(8, 28, 56) == (2, 4)
    with pytest.raises(ValueError):
        patch_grid(10, 336, 336)


# ------------------------------------------------------------ pure merge maps
def test_merge_maps_from_tokens_without_a_model():
    image = _quadrant_image()
    patch_rgb = torch.tensor(image.reshape(8, 4, 8, 4, 3).mean(axis=(1, 3)), dtype=torch.float32).view(64, 3)
    features = patch_rgb + 0.01 * torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
    steps = plan_steps(64, "pitome", keep_ratio=0.75, num_steps=3)
    maps = merge_maps_from_tokens(features, steps)
    assert len(maps) == 3 and all(m.shape == (8, 8) for m in maps)
    assert [len(torch.unique(m)) for m in maps] == [48, 36, 27]
    # Four flat colours: every group stays inside one quadrant.
    quadrant = torch.tensor((np.arange(8)[:, None] >= 4) * 2 + (np.arange(8)[None, :] >= 4))
    for label in torch.unique(maps[-1]):
        assert len(torch.unique(quadrant[maps[-1] == label])) == 1
    batched = merge_maps_from_tokens(features.unsqueeze(0).repeat(2, 1, 1), steps)
    assert batched[0].shape == (2, 8, 8)


def test_merge_map_figure_has_the_expected_pixel_size(tmp_path):
    image = _quadrant_image(cells=8, cell_px=14)
    grid_maps = [torch.arange(64).view(8, 8) // k for k in (1, 2, 4)]
    rows = [MergeMapRow(name, grid_maps, ["a", "b", "c"]) for name in ("tome", "pitome")]
    energies = [torch.rand(8, 8) for _ in range(3)]
    path = plot_merge_maps(image, rows, tmp_path / "maps.png", energy=energies, title="t", caption="c", panel_px=96)
    with Image.open(path) as png:
        assert png.size == figure_size_px(2, 3, (8, 8), panel_px=96, energy=True)
    path = plot_merge_maps(image, rows[:1], tmp_path / "plain.png", panel_px=96, input_column=False)
    with Image.open(path) as png:
        assert png.size == figure_size_px(1, 3, (8, 8), panel_px=96, energy=False, input_column=False)


def test_curve_plot_has_the_expected_pixel_size(tmp_path):
    curve = Curve("pitome", [0, 1, 2], [0.1, 0.2, 0.3], [0.05, 0.1, 0.2], [0.2, 0.3, 0.4])
    panels = [CurvePanel("a", [curve], "layer", "SD"), CurvePanel("b", [curve], invert_x=True)]
    path = plot_curves(panels, tmp_path / "curves.png", title="t")
    with Image.open(path) as png:
        assert png.size == curves_size_px(2)


# --------------------------------------------------------------- model-backed
def test_trace_merges_composes_to_the_final_token_map(tiny_llava):
    model, processor = tiny_llava
    pixel_values = pixel_values_for(processor, load_image("coffee"))
    record = trace_merges(model, pixel_values, method="pitome", keep_ratio=0.9)
    assert record.num_tokens == TEST_SPEC.num_vision_tokens
    last = record.token_map_after(record.last_layer)
    # Composing the recorded steps lands where the projector stage says each patch went.
    assert torch.equal(last[:, 1:] - 1, record.final_token_map)
    for layer_idx in range(record.last_layer + 1):
        labels = record.patch_labels_after(layer_idx)
        assert len(torch.unique(labels)) == record.tokens_after(layer_idx) - 1  # CLS holds no patch
    assert record.tokens_after(record.last_layer) - 1 == record.num_visual_tokens
    with pytest.raises(ValueError, match="out of range"):
        record.token_map_after(record.last_layer + 1)


def test_energy_map_covers_the_patch_grid(tiny_llava):
    model, processor = tiny_llava
    hidden = vision_hidden_states(model, pixel_values_for(processor, load_image("chelsea")))
    assert len(hidden) == TEST_SPEC.vision_layers + 1
    energies = energy_map(hidden[3][0, 1:], margin=0.5, grid=(8, 8))
    assert energies.shape == (8, 8) and torch.isfinite(energies).all()


def test_visualize_cli_writes_png_and_json(tmp_path, capsys, recwarn):
    code = main(
        [
            "visualize",
            "--model",
            "tiny-test",
            "--image",
            "chelsea",
            "--methods",
            "tome,pitome",
            "--keep-ratio",
            "0.9",
            "--layers",
            "0,2,4",
            "--panel-px",
            "120",
            "--output",
            str(tmp_path),
        ]
    )
    assert code == 0
    with Image.open(tmp_path / "merge_map.png") as png:
        assert png.size == figure_size_px(2, 3, (8, 8), panel_px=120)
    summary = json.loads((tmp_path / "merge_map.json").read_text())
    assert summary["layers"] == [0, 2, 4] and summary["random_weights"] is True
    assert set(summary["tokens_after_layer"]) == {"tome", "pitome"}
    assert summary["tokens_after_layer"]["pitome"][-1] == summary["num_visual_tokens"]["pitome"]
    # One counting convention, stated; where both files went; no warning meant for generation.
    assert summary["counts"] == "visual tokens, class token excluded"
    out = capsys.readouterr().out.splitlines()
    assert f"wrote {tmp_path / 'merge_map.png'}" in out
    assert f"wrote {tmp_path / 'merge_map.json'} (the counts of the table)" in out
    assert not [str(w.message) for w in recwarn if "without its processor" in str(w.message)]


def test_visualize_cli_rejects_a_layer_the_model_does_not_read(tmp_path, capsys):
    code = main(["visualize", "--model", "tiny-test", "--layers", "0,5", "--output", str(tmp_path)])
    assert code == 2
    assert "out of range" in capsys.readouterr().err


def test_figure_titles_count_visual_tokens_without_the_class_token(tiny_llava):
    model, processor = tiny_llava
    from pitome_mllm.assets import load_image

    record = trace_merges(model, pixel_values_for(processor, load_image("chelsea")), method="pitome", keep_ratio=0.9)
    row = record_row(record, [record.last_layer], (8, 8))
    assert row.titles == [f"after layer {record.last_layer}: {record.num_visual_tokens} tokens"]
