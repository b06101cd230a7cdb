"""What the figures say, read from the matplotlib figures as they are saved."""

from __future__ import annotations

import itertools

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402

from pitome_mllm.cli import main  # noqa: E402
from pitome_mllm.schedule import token_counts  # noqa: E402


@pytest.fixture
def saved_figures(monkeypatch) -> list[Figure]:
    """Every figure saved during the test, drawn, in order."""
    figures: list[Figure] = []
    original = Figure.savefig

    def savefig(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        figures.append(self)  # drawn by savefig: tick labels have their final positions
        return result

    monkeypatch.setattr(Figure, "savefig", savefig)
    return figures


def _overlapping_labels(axis) -> list[tuple[str, str]]:
    """Pairs of shown tick labels of ``axis`` whose boxes overlap (ticks outside the bar are not drawn)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(axis.figure)
    canvas.draw()
    low, high = sorted(axis.get_xlim())
    ticks = [tick for tick in axis.xaxis.get_major_ticks() if low <= tick.get_loc() <= high and tick.label1.get_text()]
    boxes = [(tick.label1.get_text(), tick.label1.get_window_extent(canvas.get_renderer())) for tick in ticks]
    return [(a, b) for (a, box_a), (b, box_b) in itertools.combinations(boxes, 2) if box_a.overlaps(box_b)]


def test_merge_map_colour_bars_have_room_for_their_labels(tmp_path, saved_figures):
    import torch

    from pitome_mllm.tools.viz import MergeMapRow, plot_merge_maps

    image = np.random.default_rng(0).random((112, 112, 3))
    rows = [MergeMapRow("pitome", [torch.arange(64).view(8, 8)] * 3, ["a", "b", "c"])]
    # Energies spanning a range that the default locator cuts into many long labels (-0.45, -0.40, ...).
    energies = [torch.linspace(-0.47, -0.03, 64).view(8, 8), torch.rand(8, 8), torch.rand(8, 8) * 1000]
    plot_merge_maps(image, rows, tmp_path / "maps.png", energy=energies, panel_px=120)
    bars = [axis for axis in saved_figures[-1].axes if axis.get_position().height < 0.05]
    assert len(bars) == 3 and all(not _overlapping_labels(bar) for bar in bars)


def test_merge_map_counts_tokens_as_the_schedule_does(tmp_path, saved_figures):
    # The command behind docs/merge_map.png (its PiToMe row).
    argv = ["visualize", "--image", "chelsea", "--layers", "6", "14", "18", "22", "--methods", "pitome",
            "--output", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    titles = [axis.get_title() for axis in saved_figures[-1].axes if axis.get_title().startswith("after layer")]
    # The tiny model has CLIP-L/14-336 geometry: 577 tokens into 24 layers. The titles count visual tokens
    # (class token excluded), as every other printed count does; the schedule counts the tower's tokens.
    schedule = token_counts(577, 24, 0.9, preset="reference")
    assert len(titles) == 4
    for title in titles:
        layer, count = title.removeprefix("after layer ").split(": ")
        assert int(count.removesuffix(" tokens")) == schedule[int(layer)] - 1, title


def test_profile_plots_keep_each_methods_colour(tmp_path, saved_figures):
    base = ["profile", "--model", "tiny-test", "--repeats", "1", "--warmup", "0", "--new-tokens", "1",
            "--device", "cpu", "--threads", "1", "--budgets", "16", "32", "--output", str(tmp_path)]  # fmt: skip
    colours = []
    for methods in (["none", "tome", "pitome"], ["pitome"]):
        saved_figures.clear()
        assert main([*base, "--methods", *methods, "--stem", "-".join(methods)]) == 0
        axis = saved_figures[0].axes[0]
        handles, labels = axis.get_legend_handles_labels()
        colours.append(
            {
                label: matplotlib.colors.to_hex(handle[0].get_color())
                for handle, label in zip(handles, labels, strict=True)
            }
        )
    first, second = colours
    assert first["unpatched"] == second["unpatched"] and first["pitome"] == second["pitome"]
    assert len(set(first.values())) == len(first)
    assert "1 thread," in saved_figures[0]._suptitle.get_text()


def test_a_one_budget_fidelity_plot_tells_the_pools_apart():
    from pitome_mllm.experiments.proxy.fidelity_table import plot_png

    rows = [
        {"setting": "pitome_reference", "budget": 64, "visual_tokens": 64, "probe_acc_plain": 0.70,
         "probe_acc_size_weighted": 0.70},
        {"setting": "none", "budget": None, "visual_tokens": 256, "probe_acc_plain": 0.8,
         "probe_acc_size_weighted": 0.8},
    ]  # fmt: skip
    figures: list[Figure] = []
    original = Figure.savefig
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Figure, "savefig", lambda self, *a, **k: (figures.append(self), original(self, *a, **k))[1])
        plot_png(rows, "fashion-mnist")
    lines = {line.get_label(): line for line in figures[0].axes[0].get_lines()}
    plain, weighted = lines["pitome_reference"], lines["pitome_reference (size-weighted)"]
    # Same colour, same single point: only the marker can show both.
    assert (plain.get_marker(), plain.get_markerfacecolor()) != (weighted.get_marker(), weighted.get_markerfacecolor())
