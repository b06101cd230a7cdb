"""The command line (``pitome-mllm demo / chat / schedule``) and the loading helpers behind it."""

from __future__ import annotations

import importlib.util
import io
import json
import re
import subprocess
import sys

import pytest
import torch

import pitome_mllm
from pitome_mllm.cli import main
from pitome_mllm.runtime.loading import (
    QUANTIZATION_SKIP_MODULES,
    StageTimer,
    build_conversation_prompt,
    build_prompt,
    count_image_tokens,
    load_image_arg,
    load_llava,
    resolve_dtype,
)
from pitome_mllm.zoo.tiny import TEST_SPEC

pytestmark = pytest.mark.model_facing

STATS_LINE = re.compile(r"\[(\d+) visual tokens, vision \d+ ms, prefill \d+ ms, total \d+\.\d+ s\]")


def planned_tokens(model, processor, **config) -> int:
    with pitome_mllm.patched(model, processor, **config) as handle:
        return handle.num_visual_tokens


def assert_one_line_error(stderr: str, *fragments: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    for fragment in fragments:
        assert fragment in lines[0]


# -------------------------------------------------------------------------------------- demo
@pytest.fixture(scope="module")
def demo_report(tmp_path_factory):
    path = tmp_path_factory.mktemp("demo") / "demo.json"
    argv = [
        "demo",
        "--spec",
        "test",
        "--repeats",
        "1",
        "--max-new-tokens",
        "2",
        "--keep-ratios",
        "0.9",
        "0.95",
        "--budgets",
        "16",
        "32",
        "--json",
        str(path),
    ]
    assert main(argv) == 0
    return json.loads(path.read_text())


def test_demo_rows_cover_the_requested_settings(demo_report):
    settings = [row["setting"] for row in demo_report["rows"]]
    assert settings == [
        "unpatched",
        "pitome keep=0.9",
        "pitome keep=0.95",
        "pitome target=16",
        "pitome target=32",
        "tome keep=0.9",
    ]


def test_demo_visual_tokens_match_what_patch_plans(demo_report, tiny_llava):
    model, processor = tiny_llava
    unpatched, *patched_rows = demo_report["rows"]
    assert unpatched["visual_tokens"] == TEST_SPEC.num_patches == 64
    for row in patched_rows:
        expected = planned_tokens(model, processor, **row["config"])
        assert row["visual_tokens"] == row["planned_visual_tokens"] == expected, row["setting"]
        assert row["visual_tokens"] < TEST_SPEC.num_patches
        if "target_tokens" in row["config"]:
            assert row["visual_tokens"] == row["config"]["target_tokens"]


def test_demo_times_and_decodes_every_row(demo_report):
    for row in demo_report["rows"]:
        assert row["output_tokens"] == 2
        assert 0 < row["vision_ms"] <= row["prefill_ms"] <= row["total_ms"]
        assert len(row["runs"]) == 1


def test_speed_up_is_within_noise_when_the_runs_overlap():
    from pitome_mllm.cli.demo import Row, speed_up_text

    def row(*prefill_ms: float) -> Row:
        runs = [{"vision_ms": 0.0, "prefill_ms": ms, "total_ms": ms} for ms in prefill_ms]
        median = sorted(prefill_ms)[len(prefill_ms) // 2]
        return Row("s", None, 1, 1, 0.0, median, median, 1, runs)

    baseline = row(90.0, 100.0, 110.0)
    assert speed_up_text(baseline, baseline) == "1.00x"
    assert speed_up_text(baseline, row(40.0, 50.0, 60.0)) == "2.00x"
    assert speed_up_text(baseline, row(60.0, 80.0, 95.0)) == "within noise"  # 90-110 and 60-95 overlap
    assert speed_up_text(baseline, row(100.0, 600.0, 1300.0)) == "within noise"  # slower but noisy: not a 0.17x


def test_demo_reports_the_merge_trajectory(demo_report):
    merges = demo_report["merges"]
    counts = merges["tokens_after_layer"]
    assert merges["config"]["keep_ratio"] == 0.9
    assert merges["counts"] == "visual tokens, class token excluded"
    assert counts[0] == TEST_SPEC.num_vision_tokens - 1 == TEST_SPEC.num_patches
    assert counts == sorted(counts, reverse=True)
    assert counts[-1] == merges["num_visual_tokens"] == demo_report["rows"][1]["visual_tokens"]
    step = merges["last_pitome_step"]
    assert step["protected"] + 2 * step["merged_away"] == step["tokens_in"]
    assert step["tokens_out"] == step["tokens_in"] - step["merged_away"]
    assert merges["patches"] == TEST_SPEC.num_patches


def test_demo_prints_table_and_note(capsys):
    argv = ["demo", "--spec", "test", "--repeats", "1", "--max-new-tokens", "1", "--keep-ratios", "0.9", "--budgets"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "pitome keep=0.9" in out and "tome keep=0.9" in out
    assert "TTFT ms" in out and "speed-up" in out and "Measured with load average" in out
    assert "answer" not in out  # the demo prints no answers, so no note about them
    assert "Visual tokens after each vision layer" in out and "class token excluded" in out and "protected" in out


# -------------------------------------------------------------------------------------- chat
def test_chat_one_prompt(saved_tiny_llava_dir, tiny_llava, capsys):
    argv = [
        "chat",
        "--model",
        str(saved_tiny_llava_dir),
        "--image",
        "chelsea",
        "--keep-ratio",
        "0.9",
        "--prompt",
        "What is this?",
        "--max-new-tokens",
        "3",
        "--device",
        "cpu",
    ]
    assert main(argv) == 0
    stats = STATS_LINE.findall(capsys.readouterr().out)
    model, processor = tiny_llava
    assert [int(count) for count in stats] == [planned_tokens(model, processor, keep_ratio=0.9)]


def test_chat_reads_questions_until_exit(saved_tiny_llava_dir, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is this?\n\nWhat colour is it?\nexit\nNever asked?\n"))
    argv = [
        "chat",
        "--model",
        str(saved_tiny_llava_dir),
        "--image",
        "coffee",
        "--target-tokens",
        "16",
        "--max-new-tokens",
        "2",
    ]
    assert main(argv) == 0
    stats = STATS_LINE.findall(capsys.readouterr().out)
    assert [int(count) for count in stats] == [16, 16]


def test_chat_unpatched_tiny_model_until_eof(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Describe the image.\n"))
    assert main(["chat", "--model", "tiny", "--image", "astronaut", "--max-new-tokens", "1"]) == 0
    assert [int(count) for count in STATS_LINE.findall(capsys.readouterr().out)] == [576]


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["chat", "--model", "tiny", "--image", "astronaut", "--keep-ratio", "0.3", "--prompt", "q"], "0.3"),
        (["chat", "--model", "tiny", "--image", "/no/such/image.jpg", "--prompt", "q"], "/no/such/image.jpg"),
        (["chat", "--model", "tiny", "--image", "astronaut", "--dtype", "float32", "--device", "gpu0"], "gpu0"),
        (["demo", "--spec", "test", "--keep-ratios", "0.3"], "0.3"),
        (["demo", "--spec", "test", "--budgets", "1000"], "1000"),
        (["demo", "--spec", "test", "--image", "no-such-picture"], "no-such-picture"),
    ],
)
def test_bad_inputs_exit_2_with_one_line(argv, fragment, capsys):
    assert main(argv) == 2
    assert_one_line_error(capsys.readouterr().err, fragment)


def test_missing_model_folder_exits_2(tmp_path, capsys):
    missing = tmp_path / "no-model-here"
    assert main(["chat", "--model", str(missing), "--image", "astronaut", "--prompt", "q"]) == 2
    assert_one_line_error(capsys.readouterr().err, str(missing))


def test_schedule_prints_54_for_keep_ratio_0_9(capsys):
    assert main(["schedule", "--keep-ratio", "0.9"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"\b0\.9\b.*\b54\b", out)
    assert "class token excluded" in " ".join(out.split())  # the count's convention is stated


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--preset", "mllm", "--keep-ratio", "0.9"], "preset='mllm' needs target_tokens"),
        (["--method", "none", "--keep-ratio", "0.9"], "keep_ratio=0.9 would be ignored"),
        (["--keep-ratio", "0.9", "0.3"], "keep_ratio"),
    ],
)
def test_schedule_refuses_what_the_api_refuses(capsys, argv, fragment):
    assert main(["schedule", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # refused before any table prints
    assert_one_line_error(captured.err, fragment)


# ----------------------------------------------------------------------------------- loading
def test_prompt_uses_the_chat_template_with_the_image_once(tiny_llava):
    _, processor = tiny_llava
    assert build_prompt(processor, "What is this?") == "USER: <image>\nWhat is this? ASSISTANT:"
    prompt = build_conversation_prompt(processor, [("What is this?", "A cat."), ("What colour?", None)])
    assert prompt.count("<image>") == 1
    assert prompt.endswith("USER: What colour? ASSISTANT:") and "A cat." in prompt


def test_prompt_without_chat_template_uses_the_llava_15_form(tiny_llava):
    class BareProcessor:
        tokenizer = tiny_llava[1].tokenizer

    assert build_prompt(BareProcessor(), "Why?") == "USER: <image>\nWhy? ASSISTANT:"
    prompt = build_conversation_prompt(BareProcessor(), [("Why?", "Because."), ("Sure?", None)])
    assert prompt == "USER: <image>\nWhy? ASSISTANT: Because.</s>USER: Sure? ASSISTANT:"


def test_resolve_dtype():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda") == torch.float16
    assert resolve_dtype("bfloat16") == torch.bfloat16
    with pytest.raises(ValueError, match="'half'"):
        resolve_dtype("half")


def test_load_llava_from_folder_and_stage_timer(saved_tiny_llava_dir):
    model, processor = load_llava(saved_tiny_llava_dir, device="cpu")
    assert not model.training and model.dtype == torch.float32
    inputs = processor(images=load_image_arg("chelsea"), text=build_prompt(processor, "What?"), return_tensors="pt")
    with torch.inference_mode(), StageTimer(model) as timer:
        output = model.generate(**inputs, max_new_tokens=2, min_new_tokens=2)
    assert output.shape[1] == inputs["input_ids"].shape[1] + 2
    assert 0 < timer.vision_s <= timer.prefill_s <= timer.total_s
    assert "get_image_features" not in model.model.__dict__  # the timing shim is gone
    assert count_image_tokens(processor, inputs["input_ids"]) == TEST_SPEC.num_patches


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
def test_load_in_8bit_keeps_the_vision_tower_unquantised(saved_tiny_llava_dir):
    import bitsandbytes as bnb

    model, processor = load_llava(saved_tiny_llava_dir, device="cpu", load_in_8bit=True)
    assert isinstance(model.model.language_model.layers[0].mlp.up_proj, bnb.nn.Linear8bitLt)
    for skipped in QUANTIZATION_SKIP_MODULES:
        module = model.get_submodule(skipped)
        assert not any(isinstance(child, bnb.nn.Linear8bitLt) for child in module.modules()), skipped
    with pitome_mllm.patched(model, processor, keep_ratio=0.9) as handle:
        inputs = processor(images=load_image_arg("chelsea"), text=build_prompt(processor, "What?"), return_tensors="pt")
        output = model.generate(**inputs, max_new_tokens=2)
        assert count_image_tokens(processor, inputs["input_ids"]) == handle.num_visual_tokens
    assert output.shape[1] > inputs["input_ids"].shape[1]


@pytest.mark.parametrize("argv", [["--help"], ["schedule", "--keep-ratio", "0.9"], ["schedule", "--help"]])
def test_help_and_schedule_import_neither_torch_nor_transformers(argv):
    # A fresh interpreter: this one has imported torch already.
    code = (
        "import sys\n"
        "from pitome_mllm.cli import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'matplotlib') if m in sys.modules)\n"
        "print('heavy:', heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "heavy: []"


def test_chosen_command_skips_options():
    from pitome_mllm.cli import chosen_command

    assert chosen_command(["-v", "schedule", "--keep-ratio", "0.9"]) == "schedule"
    assert chosen_command(["--help"]) is None
    assert chosen_command(["nonsense"]) is None


# ------------------------------------------------------------------------------------------ output paths
@pytest.mark.parametrize(
    ("command", "flag"),
    [
        (["profile", "--model", "tiny-test", "--stem"], "--stem"),
        (["visualize", "--model", "tiny-test", "--name"], "--name"),
        (["spectral", "--synthetic", "--name"], "--name"),
    ],
)
@pytest.mark.parametrize("name", ["../x", "sub/x", "..", ""])
def test_output_names_must_stay_inside_output(tmp_path, capsys, command, flag, name):
    output = tmp_path / "out"
    status = main([*command, name, "--output", str(output)])
    err = capsys.readouterr().err
    assert status == 2
    assert len(err.strip().splitlines()) == 1 and f"error: {flag} {name!r} must be a plain file name" in err
    assert sorted(path.name for path in tmp_path.rglob("*")) == ["out"]  # nothing written, in or out


@pytest.mark.parametrize(
    "command",
    [
        ["profile", "--model", "tiny-test"],
        ["visualize", "--model", "tiny-test"],
        ["spectral", "--synthetic"],
        ["proxy", "fidelity"],
        ["proxy", "report"],
    ],
)
def test_an_unusable_output_folder_is_one_line_before_any_work(tmp_path, capsys, command):
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    for output, expected in ((a_file, "is a file, not a folder"), (a_file / "below", "cannot create the folder")):
        status = main([*command, "--output", str(output)])
        err = capsys.readouterr().err
        assert status == 2 and len(err.strip().splitlines()) == 1
        assert f"error: --output {output}" in err and expected in err
    assert a_file.read_text() == "keep me"
