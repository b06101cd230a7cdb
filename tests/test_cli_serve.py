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


# ---------------------------------------------------------------------------- the plugin's other families
def dry_run(capsys, argv: list[str]) -> tuple[str, str]:
    """``(pre-flight and added lines, the command)`` of a dry run that must succeed."""
    cut = argv.index("--") if "--" in argv else len(argv)
    assert main([*argv[:cut], "--dry-run", *argv[cut:]]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    checks, command = out.split("would run: ", 1)
    return checks, command.strip()


@pytest.fixture
def with_vllm(monkeypatch, tmp_path):
    """As in the vLLM environment, on a CPU machine, with the cache folder in ``tmp_path``."""
    import pitome_mllm.cli.extras as extras
    import pitome_mllm.cli.serve as serve

    monkeypatch.setenv("PITOME_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(extras, "module_available", lambda module: True)
    monkeypatch.setattr(serve.shutil, "which", lambda name: None)
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory):
    from pitome_mllm.zoo.tiny_qwen import tiny_qwen_vl_config

    folder = tmp_path_factory.mktemp("qwen") / "model"
    tiny_qwen_vl_config("qwen3-vl").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def next_folder(tmp_path_factory):
    from pitome_mllm.zoo.tiny import TEST_SPEC, build_tiny_llava_next

    folder = tmp_path_factory.mktemp("next") / "model"
    build_tiny_llava_next(TEST_SPEC)[0].config.save_pretrained(folder)  # 112 px crops, grids up to 2 x 2
    return folder


def test_serve_tiny_qwen_dry_run_counts_per_image_and_turns_videos_off(capsys, with_vllm):
    checks, command = dry_run(capsys, ["serve", "tiny-qwen", "--target-tokens", "16", "--", "--port", "8001"])
    preflight = "pre-flight: Qwen2.5-VL, each image reduced after the patch merger (pitome) to min(16, n) of its n"
    assert checks.startswith(preflight + " native tokens")
    assert "added: --limit-mm-per-prompt '{\"video\": 0}'" in checks
    assert str(with_vllm / "vllm_tiny_qwen") in command and "--served-model-name tiny-qwen" in command
    assert command.endswith("--limit-mm-per-prompt '{\"video\": 0}'") and "--port 8001" in command
    assert "--compilation-config" not in command  # no GPU
    assert not with_vllm.exists()  # no checkpoint, not even the cache folder


@pytest.mark.parametrize(
    ("flags", "rule"),
    [
        (["--keep-ratio", "0.9"], "ceil(0.9·n)"),
        (["--keep-ratio", "0.9", "--config", '{"target_tokens": 8}'], "min(8, ceil(0.9·n))"),
        (["--target-tokens", "8", "--method", "divprune"], "(divprune) to min(8, n)"),
    ],
)
def test_qwen_pre_flight_says_what_each_image_keeps(capsys, with_vllm, qwen_folder, flags, rule):
    checks, _ = dry_run(capsys, ["serve", str(qwen_folder), *flags])
    assert checks.startswith("pre-flight: Qwen3-VL, each image reduced after the patch merger")
    assert f"{rule} of its n native tokens" in checks


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--target-tokens", "8", "--method", "dominant"], "Qwen-VL towers have no class token"),
        (["--target-tokens", "8", "--method", "pool"], "method='pool'"),
    ],
)
def test_qwen_settings_the_engine_refuses_are_refused_in_pre_flight(capsys, with_vllm, qwen_folder, flags, message):
    from pitome_mllm.config import PiToMeConfig
    from pitome_mllm.models.vllm_qwen_vl import QwenVllmPlan
    from pitome_mllm.zoo.tiny_qwen import tiny_qwen_vl_config

    settings = pitome_fields(parse(["serve", "m", *flags]))
    with pytest.raises(ValueError) as engine:  # what the engine's plan raises at start
        QwenVllmPlan.from_config(tiny_qwen_vl_config("qwen3-vl"), PiToMeConfig.from_dict(settings))
    assert message in str(engine.value)
    assert main(["serve", str(qwen_folder), *flags, "--dry-run"]) == 2
    assert one_line(capsys.readouterr().err) == f"pitome-mllm serve: error: {engine.value}"


@pytest.mark.parametrize(
    "limit", ['{"image": 2}', '{"image": 1, "video": 1}', '{"video": {"count": 2}}', "--limit-mm-per-prompt.video=1"]
)
def test_a_video_limit_that_allows_videos_stops_qwen_in_pre_flight(capsys, with_vllm, limit):
    passthrough = [limit] if limit.startswith("--") else ["--limit-mm-per-prompt", limit]
    assert main(["serve", "tiny-qwen", "--target-tokens", "16", "--dry-run", "--", *passthrough]) == 2
    line = one_line(capsys.readouterr().err)
    assert "video(s) per prompt, but PiToMe on Qwen-VL serves images only" in line
    assert 'pass --limit-mm-per-prompt \'{"image": N, "video": 0}\' after --' in line


def test_a_video_limit_of_zero_is_kept_as_given(capsys, with_vllm):
    argv = ["serve", "tiny-qwen", "--target-tokens", "16", "--", "--limit_mm_per_prompt", '{"image": 2, "video": 0}']
    _, command = dry_run(capsys, argv)
    assert command.count("per") == 1 and '--limit_mm_per_prompt \'{"image": 2, "video": 0}\'' in command


def test_unpatched_qwen_gets_no_added_options(capsys, with_vllm):
    checks, command = dry_run(capsys, ["serve", "tiny-qwen", "--no-pitome"])
    assert "added" not in checks and "--limit-mm-per-prompt" not in command and "--hf-overrides" not in command


@pytest.mark.parametrize(
    ("passthrough", "added"),
    [
        ([], True),
        (["--enforce-eager"], False),
        (["--compilation-config", '{"cudagraph_mode": "PIECEWISE"}'], False),
        (["-cc", '{"cudagraph_mode": "NONE"}'], False),
        (["--compilation_config.cudagraph_mode", "PIECEWISE"], False),
        (["-O3"], False),
    ],
)
def test_piecewise_cuda_graphs_are_added_for_qwen_on_an_nvidia_machine(
    capsys, with_vllm, qwen_folder, monkeypatch, passthrough, added
):
    import pitome_mllm.cli.serve as serve

    monkeypatch.setattr(serve.shutil, "which", lambda name: "/usr/bin/nvidia-smi" if name == "nvidia-smi" else None)
    checks, command = dry_run(capsys, ["serve", str(qwen_folder), "--target-tokens", "8", "--", *passthrough])
    option = '--compilation-config \'{"cudagraph_mode": "PIECEWISE"}\''
    assert (f"added: {option}" in checks) is added
    assert command.count(option) == (1 if added or passthrough[1:2] == ['{"cudagraph_mode": "PIECEWISE"}'] else 0)
    assert "VLLM_CPU_KVCACHE_SPACE" not in command
    # The option the added one comes from: the plugin's own refusal of full CUDA graphs names it.
    from pitome_mllm.models.vllm_qwen_vl import FULL_CUDAGRAPH_REFUSED

    assert "compilation_config={'cudagraph_mode': 'PIECEWISE'}" in FULL_CUDAGRAPH_REFUSED.format(mode="FULL")


def test_llava_next_pre_flight_gives_the_anyres_budget(capsys, with_vllm, next_folder):
    from transformers import AutoConfig

    from pitome_mllm.config import PiToMeConfig
    from pitome_mllm.models.vllm_llava_next import AnyresPlan

    plan = AnyresPlan.from_config(AutoConfig.from_pretrained(next_folder), PiToMeConfig(target_tokens=100))
    checks, command = dry_run(capsys, ["serve", str(next_folder), "--target-tokens", "100"])
    # 100 is more than a LLaVA-1.5 tower of these crops has (64): the NeXT budget counts the packed image.
    assert checks.strip() == (
        "pre-flight: LLaVA-NeXT, each image merged after packing to its anyres budget (target_tokens=100 per image): "
        f"100 of {plan.layout_for_image(224, 224).unmerged_tokens} for a 224x224 image, "
        f"{plan.visual_tokens_for_image(112, 112)} of {plan.layout_for_image(112, 112).unmerged_tokens} for a 112x112 "
        "image; checked against the model's config.json"
    )
    assert "--limit-mm-per-prompt" not in command
    ratio_plan = AnyresPlan.from_config(AutoConfig.from_pretrained(next_folder), PiToMeConfig(keep_ratio=0.9))
    checks, _ = dry_run(capsys, ["serve", str(next_folder), "--keep-ratio", "0.9"])
    assert f"(keep_ratio=0.9: {ratio_plan.keep_fraction:.3f} of its base and crop tokens + 1 newline)" in checks
    assert f"{ratio_plan.visual_tokens_for_image(224, 224)} of 336 for a 224x224 image" in checks
    assert main(["serve", str(next_folder), "--target-tokens", "16", "--method", "dominant"]) == 2
    assert "is not supported on LLaVA-NeXT" in one_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    ("config_class", "architecture", "message"),
    [
        (
            "Qwen2VLConfig",
            "Qwen2VLForConditionalGeneration",
            "hf_overrides['pitome'] is not supported for Qwen2VLForConditionalGeneration in vLLM: the pitome_mllm "
            "plugin merges visual tokens in LlavaForConditionalGeneration",
        ),
        (
            "LlavaOnevisionConfig",
            "LlavaOnevisionForConditionalGeneration",
            "hf_overrides['pitome'] is not supported for LLaVA-OneVision in vLLM yet: its anyres packing",
        ),
    ],
)
def test_architectures_the_plugin_refuses_are_refused_in_pre_flight(
    capsys, with_vllm, tmp_path, config_class, architecture, message
):
    import transformers

    folder = tmp_path / "model"
    getattr(transformers, config_class)(architectures=[architecture]).save_pretrained(folder)
    assert main(["serve", str(folder), "--target-tokens", "16", "--dry-run"]) == 2
    # The plugin's refusal at engine start (its guard of vLLM's registry, tests/test_vllm_plugin.py).
    assert one_line(capsys.readouterr().err).startswith(f"pitome-mllm serve: error: {message}")
    _, command = dry_run(capsys, ["serve", str(folder), "--no-pitome"])  # without the key: vLLM's own
    assert "--hf-overrides" not in command
