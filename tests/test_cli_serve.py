"""`pitome-mllm serve`: the settings it hands vLLM, the arguments after ``--``, and its errors (no vLLM needed)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys

import pytest

from pitome_mllm.cli import build_parser, main, split_passthrough
from pitome_mllm.cli.serve import check_settings, pitome_fields, vllm_serve_command

# The pre-flight reads the tiny model's config.json through transformers: every release CI tests.
pytestmark = pytest.mark.model_facing


def parse(argv: list[str]) -> argparse.Namespace:
    return build_parser(["serve"]).parse_args(argv)


def test_arguments_after_the_double_dash_are_split_off():
    assert split_passthrough(["serve", "m", "--target-tokens", "64", "--", "--port", "8000"]) == (
        ["serve", "m", "--target-tokens", "64"],
        ["--port", "8000"],
    )
    assert split_passthrough(["schedule"]) == (["schedule"], [])


def test_only_the_flags_given_reach_the_overrides(tmp_path):
    args = parse(["serve", "m", "--keep-ratio", "0.9", "--preset", "paper"])
    assert pitome_fields(args) == {"method": "pitome", "preset": "paper", "keep_ratio": 0.9}
    config_file = tmp_path / "pitome.json"
    config_file.write_text(json.dumps({"metric": "keys", "target_tokens": 10}))
    args = parse(["serve", "m", "--target-tokens", "64", "--config", str(config_file)])
    assert pitome_fields(args)["target_tokens"] == 64  # the flag wins over the file
    assert pitome_fields(args)["metric"] == "keys"


def test_the_vllm_command_carries_the_overrides_and_the_passthrough():
    overrides = check_settings({"target_tokens": 64})
    command = vllm_serve_command("llava-hf/llava-1.5-7b-hf", overrides, ["--port", "8000"])
    assert command[:3] == [sys.executable, "-m", "pitome_mllm.integrations.vllm.server"]
    assert command[3] == "llava-hf/llava-1.5-7b-hf"
    assert json.loads(command[command.index("--hf-overrides") + 1]) == {"pitome": {"target_tokens": 64}}
    assert command[-2:] == ["--port", "8000"]
    assert "--hf-overrides" not in vllm_serve_command("m", None, [])


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"keep_ratio": 0.3}, "keep_ratio must be in (0.5, 1.0]"),
        ({"preset": "pure", "keep_ratio": 0.9}, "prop_attn=True is not supported in vLLM"),
        ({"method": "cdpruner", "target_tokens": 16}, "method='cdpruner'"),
    ],
)
def test_settings_vllm_would_refuse_are_refused_before_it_starts(settings, message):
    with pytest.raises(ValueError) as refused:
        check_settings(settings)
    assert message in str(refused.value)


def test_other_commands_refuse_arguments_after_the_double_dash(capsys):
    with pytest.raises(SystemExit):
        main(["schedule", "--", "--port", "1"])
    assert "arguments after -- (--port 1) are taken only by: serve" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_serve_without_vllm_says_how_to_install_it(capsys):
    assert main(["serve", "tiny", "--target-tokens", "64", "--dry-run"]) == 2
    assert "bash scripts/install.sh --vllm" in capsys.readouterr().err


# ---------------------------------------------------------------------------- pre-flight (no vLLM needed)
def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


def test_a_budget_the_model_cannot_reach_is_refused_in_one_line_before_vllm(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("PITOME_CACHE", str(tmp_path / "cache"))
    assert main(["serve", "tiny", "--target-tokens", "9999"]) == 2
    captured = capsys.readouterr()
    assert one_line(captured.err) == (
        "pitome-mllm serve: error: target_tokens=9999 is larger than the 576 visual tokens this model produces "
        "per image"
    )
    assert "running" not in captured.out
    assert not (tmp_path / "cache").exists()


def test_config_that_is_not_json_names_the_flag(capsys):
    assert main(["serve", "tiny", "--config", "not-json"]) == 2
    line = one_line(capsys.readouterr().err)
    # One reading of config files for every entry point (pitome_mllm.config.read_config_fields), named by the flag.
    assert line.startswith("pitome-mllm serve: error: --config: config file 'not-json' does not exist")
    assert "JSON text starting with '{'" in line


def test_a_config_file_that_is_not_json_names_the_file(capsys, tmp_path):
    broken = tmp_path / "pitome.json"
    broken.write_text("{metric: keys}")
    assert main(["serve", "tiny", "--config", str(broken)]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("pitome-mllm serve: error: --config:")
    assert f"config file '{broken}' is not valid JSON" in line


def test_a_local_checkpoint_is_checked_against_its_config_json(capsys, tmp_path):
    from pitome_mllm.zoo.tiny import TEST_SPEC, tiny_llava_config

    folder = tmp_path / "model"
    tiny_llava_config(TEST_SPEC).save_pretrained(folder)  # 112 px / 14 px: 64 visual tokens
    assert main(["serve", str(folder), "--target-tokens", "65"]) == 2
    assert "target_tokens=65 is larger than the 64 visual tokens" in one_line(capsys.readouterr().err)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["serve", str(empty), "--target-tokens", "16"]) == 2
    assert f"MODEL {empty}: cannot read its config.json" in one_line(capsys.readouterr().err)


def test_dry_run_writes_nothing(capsys, tmp_path, monkeypatch):
    import pitome_mllm.cli.extras as extras

    cache = tmp_path / "cache"
    monkeypatch.setenv("PITOME_CACHE", str(cache))
    monkeypatch.setattr(extras, "module_available", lambda module: True)  # as in the vLLM environment
    assert main(["serve", "tiny", "--target-tokens", "64", "--dry-run", "--", "--port", "8001"]) == 0
    out = capsys.readouterr().out
    assert "pre-flight: 64 of 576 visual tokens per image (class token excluded)" in out
    command = out.split("would run: ", 1)[1].strip()
    assert str(cache / "vllm_tiny_llava") in command and "--port 8001" in command
    assert "--served-model-name tiny" in command
    assert not cache.exists()  # no checkpoint, not even the cache folder
