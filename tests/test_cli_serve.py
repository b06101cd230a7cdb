"""`pitome-mllm serve`: the settings it hands vLLM, the arguments after ``--``, and its errors (no vLLM needed)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys

import pytest

from pitome_mllm.cli import build_parser, main, split_passthrough
from pitome_mllm.cli.serve import check_settings, pitome_fields, vllm_serve_command


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
