"""The command-line tools on tiny Qwen2.5-VL / Qwen3-VL models saved to folders: chat, visualize, profile."""

from __future__ import annotations

import json
import re

import pytest
import torch

import pitome_mllm
from pitome_mllm.assets import load_image
from pitome_mllm.cli import main
from pitome_mllm.runtime.loading import StageTimer, load_model
from pitome_mllm.zoo.tiny_qwen import save_tiny_qwen_vl

pytestmark = pytest.mark.model_facing

FAMILIES = ("qwen2.5-vl", "qwen3-vl")
STATS_LINE = re.compile(r"\[(\d+) visual tokens")


@pytest.fixture(scope="module", params=FAMILIES)
def qwen_dir(request, tmp_path_factory):
    """A folder holding a saved tiny Qwen-VL model and processor (read-only for tests)."""
    return save_tiny_qwen_vl(tmp_path_factory.mktemp(f"saved_{request.param}"), request.param)


def native_and_kept(folder, image_name: str, **config) -> tuple[int, int]:
    """``(native, kept)`` visual tokens of a bundled image, from the loaded model's patch handle."""
    model, processor = load_model(folder, device="cpu")
    height, width = load_image(image_name).size[::-1]
    with pitome_mllm.patched(model, processor, **config) as handle:
        kept = handle.visual_tokens_for_image(height, width)
    with pitome_mllm.patched(model, processor, keep_ratio=1.0) as handle:
        native = handle.visual_tokens_for_image(height, width)
    return native, kept


# -------------------------------------------------------------------------------------- chat
@pytest.mark.parametrize("budget", [[], ["--target-tokens", "8"], ["--keep-ratio", "0.75"]])
def test_chat_on_a_saved_qwen_folder(qwen_dir, budget, capsys):
    argv = ["chat", "--model", str(qwen_dir), "--image", "chelsea", "--prompt", "What is this?"]
    argv += ["--max-new-tokens", "3", "--device", "cpu", "--threads", "1", *budget]
    assert main(argv) == 0
    captured = capsys.readouterr()
    config = {"target_tokens": 8} if "--target-tokens" in budget else {"keep_ratio": 0.75}
    native, kept = native_and_kept(qwen_dir, "chelsea", **config)
    assert [int(count) for count in STATS_LINE.findall(captured.out)] == [kept if budget else native]
    assert ("PatchHandle(qwen_vl" in captured.err) == bool(budget)


def test_stage_timer_counts_the_kept_tokens_of_a_qwen_image(qwen_dir):
    model, processor = load_model(qwen_dir, device="cpu")
    image = load_image("astronaut")
    prompt = "<|vision_start|><|image_pad|><|vision_end|>Describe."
    with pitome_mllm.patched(model, processor, target_tokens=6):
        inputs = processor(images=[image], text=[prompt], return_tensors="pt")
        with StageTimer(model) as timer, torch.no_grad():
            model.generate(**inputs, max_new_tokens=2)
    assert timer.visual_tokens == 6
    assert timer.vision_s > 0 and timer.prefill_s >= timer.vision_s


# --------------------------------------------------------------------------------- visualize
def test_visualize_draws_the_merge_map_of_each_method(qwen_dir, tmp_path, capsys):
    argv = ["visualize", "--model", str(qwen_dir), "--image", "chelsea", "--methods", "pitome", "tome", "random"]
    argv += ["--target-tokens", "10", "--output", str(tmp_path), "--device", "cpu"]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "merge_map.json").read_text())
    assert (tmp_path / "merge_map.png").stat().st_size > 0
    native, kept = native_and_kept(qwen_dir, "chelsea", target_tokens=10)
    rows, cols = summary["grid"]
    assert summary["native_tokens"] == native == rows * cols
    assert summary["kept_tokens"] == {"pitome": kept, "tome": kept, "random": kept}
    for method, labels in summary["merge_maps"].items():
        cells = torch.tensor(labels).flatten()
        held = cells[cells >= 0]
        assert sorted(set(held.tolist())) == list(range(kept)), method
        if method == "random":  # a selection keeps one cell per token and drops the rest
            assert held.numel() == kept
        else:  # a merge leaves no cell out
            assert held.numel() == native
        # Kept tokens are in raster order of the first cell they hold (their M-RoPE position).
        first = [int((cells == token).nonzero()[0]) for token in range(kept)]
        assert first == sorted(first)


def test_visualize_refuses_vision_layers_on_qwen(qwen_dir, tmp_path, capsys):
    argv = ["visualize", "--model", str(qwen_dir), "--layers", "0", "2", "--output", str(tmp_path)]
    assert main(argv) == 2
    assert "--layers does not apply to a Qwen-VL model" in capsys.readouterr().err
