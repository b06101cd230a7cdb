"""``pitome-mllm schedule`` for Qwen-VL towers: per original image size, native and kept tokens, no model."""

from __future__ import annotations

import re

import pytest

from pitome_mllm.cli import main
from pitome_mllm.geometry import MergedGridBudget, SmartResize

# Qwen3-VL-8B-Instruct's preprocessor limits (min_pixels, max_pixels).
QWEN3_VL_PIXELS = (65536, 16777216)


def table_rows(text: str) -> dict[str, list[str]]:
    """``{image size: the row's other cells}`` of the printed table."""
    rows = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in re.split(r"[│|]", line) if cell.strip()]
        if cells and re.fullmatch(r"\d+x\d+", cells[0]):
            rows[cells[0]] = cells[1:]
    return rows


def test_qwen25_arch_counts_per_image(capsys):
    argv = ["schedule", "--arch", "qwen2.5-vl-7b", "--keep-ratio", "0.75", "--target-tokens", "64", "300"]
    argv += ["--image-sizes", "448x448", "1080x1920", "30x30"]
    assert main(argv) == 0
    rows = table_rows(capsys.readouterr().out)
    # 448 px: 32 x 32 patches, 256 tokens after the 2 x 2 merger; 1080 x 1920 is scaled down to 728 x 1316
    # (the released max_pixels), 52 x 94 patches; 30 x 30 is scaled up to the 56 x 56 minimum: 4 tokens.
    assert rows["448x448"] == ["448x448", "32x32", "256", "192", "64", "256"]
    assert rows["1080x1920"] == ["728x1316", "52x94", "1222", "917", "64", "300"]
    assert rows["30x30"] == ["56x56", "4x4", "4", "3", "4", "4"]


@pytest.mark.parametrize("size", [(448, 448), (333, 517), (1200, 900)])
def test_qwen3_arch_agrees_with_the_budget(capsys, size):
    height, width = size
    assert (
        main(["schedule", "--arch", "qwen3-vl-8b", "--target-tokens", "100", "--image-sizes", f"{height}x{width}"]) == 0
    )
    rows = table_rows(capsys.readouterr().out)
    budget = MergedGridBudget(SmartResize(32, *QWEN3_VL_PIXELS), 16, 2, target_tokens=100)
    grid = budget.grid_for_image(height, width)
    assert rows[f"{height}x{width}"][2:] == [
        str(budget.native_tokens(grid)),
        str(budget.visual_tokens_for_image(height, width)),
    ]


def test_qwen_flag_set_without_arch(capsys):
    argv = ["schedule", "--min-pixels", "3136", "--max-pixels", "100000", "--image-sizes", "448", "--keep-ratio", "0.9"]
    assert main(argv) == 0
    rows = table_rows(capsys.readouterr().out)
    assert rows["448x448"] == ["308x308", "22x22", "121", "109"]


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["schedule", "--target-tokens", "64"], "describe a Qwen-VL tower"),
        (["schedule", "--min-pixels", "3136"], "needs both --min-pixels and --max-pixels"),
        (["schedule", "--arch", "qwen2.5-vl-7b", "--keep-ratio", "0.25"], "keep_ratio must be in (0.5, 1.0]"),
        (["schedule", "--arch", "qwen2.5-vl-7b", "--target-tokens", "0"], "target_tokens"),
    ],
)
def test_bad_qwen_settings_exit_2_with_one_line(capsys, argv, fragment):
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert fragment in error and len(error.strip().splitlines()) == 1


def test_a_bad_image_size_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        main(["schedule", "--arch", "qwen2.5-vl-7b", "--image-sizes", "448x0"])
    assert "--image-sizes" in capsys.readouterr().err


def test_llava_arch_takes_the_tower_shape(capsys):
    assert main(["schedule", "--arch", "llava-1.5-7b", "--keep-ratio", "0.9"]) == 0
    assert re.search(r"\b0\.9\b.*\b54\b", capsys.readouterr().out)
