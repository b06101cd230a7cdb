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


# ----------------------------------------------------------------------------------- profile
@pytest.mark.parametrize("batch_size", [1, 2])
def test_profile_a_qwen_folder_at_its_kept_budgets(qwen_dir, tmp_path, batch_size):
    argv = ["profile", "--model", str(qwen_dir), "--budgets", "8", "32", "--methods", "pitome", "tome"]
    argv += ["--repeats", "1", "--new-tokens", "3", "--batch-size", str(batch_size), "--device", "cpu"]
    argv += ["--threads", "1", "--output", str(tmp_path)]
    assert main(argv) == 0
    report = json.loads((tmp_path / "profile.json").read_text())
    # The profiled image is the 448 x 448 reference square: its count is the handle's num_visual_tokens.
    model, processor = load_model(qwen_dir, device="cpu")
    with pitome_mllm.patched(model, processor, keep_ratio=1.0) as handle:
        assert handle.visual_tokens_for_image(448, 448) == handle.num_visual_tokens
        native = handle.num_visual_tokens
    runs = {run["label"]: run for run in report["runs"]}
    assert sorted(runs) == ["pitome k=32", "pitome k=8", "tome k=32", "tome k=8", "unpatched"]
    baseline = runs["unpatched"]
    assert baseline["visual_tokens"] == baseline["visual_tokens_expected"] == native
    for label, run in runs.items():
        kept = native if label == "unpatched" else int(label.split("=")[1])
        assert run["visual_tokens"] == run["visual_tokens_expected"] == kept, label
        # One image per prompt: the prompt is shorter by exactly the tokens the stage removed.
        assert run["sequence_length"] == baseline["sequence_length"] - (native - kept), label
        timings = {stage: run["timings"][stage]["median"] for stage in ("vision_tower", "projector", "llm_prefill")}
        assert all(value > 0 for value in timings.values()), label
        assert sum(timings.values()) <= run["timings"]["ttft"]["median"] * (1 + 1e-9), label
        merge = run["timings"]["merge_projector"]["median"]
        assert (merge > 0) == (label != "unpatched") and merge <= timings["projector"], label
        assert run["flops"]["llm_prefill_flops"] <= baseline["flops"]["llm_prefill_flops"]
        assert run["kv_cache"]["sequence_length"] == run["sequence_length"]


def test_profile_vision_only_on_a_qwen_folder(qwen_dir, tmp_path):
    argv = ["profile", "--model", str(qwen_dir), "--budgets", "8", "--methods", "tome", "--vision-only"]
    argv += ["--repeats", "1", "--device", "cpu", "--threads", "1", "--output", str(tmp_path)]
    assert main(argv) == 0
    runs = {run["label"]: run for run in json.loads((tmp_path / "profile.json").read_text())["runs"]}
    assert runs["tome k=8"]["visual_tokens"] == 8
    assert runs["tome k=8"]["timings"]["merge_projector"]["median"] > 0


def test_profile_cuts_the_language_model_of_an_arch_only():
    from pitome_mllm.cli.profile import reduced_depth
    from pitome_mllm.zoo.architecture_specs import get_arch

    spec = get_arch("qwen2.5-vl-7b")
    cut, source = reduced_depth(spec, 2)
    assert cut.text.num_layers == 2 and cut.vision == spec.vision and cut.text.hidden_size == spec.text.hidden_size
    assert "cut to 2 of 28 layers" in source
    assert reduced_depth(spec, None) == (spec, "qwen2.5-vl-7b (random weights)")
    for bad in (0, 29):
        with pytest.raises(ValueError, match="--llm-layers must be between 1 and"):
            reduced_depth(spec, bad)


def test_llm_layers_needs_an_arch(capsys):
    assert main(["profile", "--model", "tiny", "--llm-layers", "2"]) == 2
    assert "--llm-layers" in capsys.readouterr().err
