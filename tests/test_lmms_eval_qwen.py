"""The lmms-eval models ``pitome_qwen2_5_vl`` / ``pitome_qwen3_vl`` on tiny saved Qwen-VL checkpoints, with the
offline smoke task: through ``python -m lmms_eval`` and ``pitome-mllm sweep``, patched and unpatched, each
sample's visual tokens checked against the patch's own count for the task's images.

Needs the ``eval`` extra (lmms-eval 0.7.3, see eval/INSTALL.md); skipped without it.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install 'pitome-mllm[eval]', eval/INSTALL.md)")

import torch  # noqa: E402
from lmms_eval.api.instance import Instance  # noqa: E402

import pitome_mllm  # noqa: E402
from pitome_mllm import cli  # noqa: E402
from pitome_mllm.assets import load_image  # noqa: E402
from pitome_mllm.experiments.sweep import RESULT_FILE, load_suite, summary_rows  # noqa: E402
from pitome_mllm.integrations.lmms_eval.qwen_vl import (  # noqa: E402
    DEFAULT_SYSTEM_PROMPT,
    PiToMeQwen2_5_VL,
    PiToMeQwen3_VL,
)
from pitome_mllm.runtime.loading import load_qwen_vl  # noqa: E402

pytestmark = pytest.mark.model_facing

REPO = Path(__file__).resolve().parents[1]
TASKS_DIR = REPO / "eval" / "tasks"
SMOKE_SUITE = REPO / "eval" / "suites" / "qwen_smoke.yaml"
MODEL_IDS = {"qwen2.5-vl": "pitome_qwen2_5_vl", "qwen3-vl": "pitome_qwen3_vl"}


@pytest.fixture(autouse=True)
def offline_hf_home(tmp_path_factory, monkeypatch):
    """Datasets caches arrow files under HF_HOME; keep them in a temporary folder, offline."""
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.getbasetemp() / "hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def smoke_images(limit: int) -> dict[int, tuple[int, int]]:
    """``doc_id -> (height, width)`` of the smoke task's first ``limit`` images."""
    rows = [json.loads(line) for line in (TASKS_DIR / "pitome_smoke" / "pitome_smoke.jsonl").read_text().splitlines()]
    return {doc_id: load_image(row["image"]).size[::-1] for doc_id, row in enumerate(rows[:limit])}


def expected_tokens(folder: Path, limit: int, **patch_args) -> dict[int, int]:
    """``doc_id -> handle.visual_tokens_for_image(h, w)`` of the smoke images under ``patch_args``
    (``method=none`` without a budget: the native counts)."""
    model, processor = load_qwen_vl(folder, device="cpu")
    with pitome_mllm.patched(model, processor, **patch_args) as handle:
        return {doc_id: handle.visual_tokens_for_image(*size) for doc_id, size in smoke_images(limit).items()}


# ---------------------------------------------------------------------------------- registration
def test_entry_points_register_the_qwen_models():
    from lmms_eval.models import get_model, get_model_manifest

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]["lmms_eval.models"]
    installed = {point.name: point.value for point in importlib.metadata.entry_points(group="lmms_eval.models")}
    for model_id, model_class in (("pitome_qwen2_5_vl", PiToMeQwen2_5_VL), ("pitome_qwen3_vl", PiToMeQwen3_VL)):
        function = f"manifest_{model_id.removeprefix('pitome_')}"
        assert declared[model_id] == f"pitome_mllm.lmms_eval_manifest:{function}"
        assert installed.get(model_id) == declared[model_id], "stale install: pip install -e . registers them"
        manifest = get_model_manifest(model_id)
        assert manifest.simple_class_path == f"pitome_mllm.integrations.lmms_eval.qwen_vl.{model_class.__name__}"
        assert manifest.chat_class_path is None
        assert get_model(model_id) is model_class and model_class.is_simple and model_class.model_id == model_id


def test_invalid_arguments_fail_before_loading(tmp_path):
    missing = str(tmp_path / "missing")  # reaching the loader would raise FileNotFoundError instead
    with pytest.raises(ValueError, match="max_pixels must be an integer"):
        PiToMeQwen2_5_VL(pretrained=missing, max_pixels="large", method="none")
    with pytest.raises(ValueError, match="needs keep_ratio"):
        PiToMeQwen3_VL(pretrained=missing, method="pitome")
    with pytest.raises(ValueError, match=r"unknown patch arguments \['prompt_format'\]"):
        PiToMeQwen2_5_VL(pretrained=missing, method="none", prompt_format="llava_v1")


def test_a_checkpoint_of_the_other_family_is_refused(saved_tiny_qwen_dir):
    with pytest.raises(ValueError, match="evaluate it with --model pitome_qwen2_5_vl"):
        PiToMeQwen3_VL(pretrained=str(saved_tiny_qwen_dir("qwen2.5-vl")), method="none", device="cpu")


# ---------------------------------------------------------------------------------- prompts and scoring
@pytest.fixture(scope="module")
def plugin(saved_tiny_qwen_dir):
    """The tiny Qwen2.5-VL patched to 8 tokens per image, driven directly with hand-made requests."""
    model = PiToMeQwen2_5_VL(
        pretrained=str(saved_tiny_qwen_dir("qwen2.5-vl")), method="pitome", target_tokens=8, device="cpu"
    )
    model.task_dict = {"t": {"test": [{"image": "chelsea"}, {"image": "astronaut"}]}}
    return model


def test_prompt_is_the_chat_template_with_the_images_first(plugin):
    prompt = plugin._prompt("<image>\nWhat is it?", 2)
    image = "<|vision_start|><|image_pad|><|vision_end|>"
    assert prompt == (
        f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n"
        f"<|im_start|>user\n{image}{image}\nWhat is it?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_loglikelihood_of_the_patched_model_is_its_own_forward(plugin):
    """The scored forward (prompt + continuation, per-token inputs extended) against the patched model's own."""
    context = "What is it?"
    images = [load_image("chelsea")]
    continuation_ids = plugin.tokenizer(" a cat", add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    inputs = plugin.processor(images=images, text=[plugin._prompt(context, 1)], return_tensors="pt")
    assert int((inputs["input_ids"] == plugin.processor.image_token_id).sum()) == 8
    log_probs = []
    input_ids, mask = inputs["input_ids"], inputs["attention_mask"]
    extra = {name: value for name, value in inputs.items() if name not in ("input_ids", "attention_mask")}
    for token_id in continuation_ids.tolist():  # teacher forcing, one forward per token
        if "mm_token_type_ids" in extra:
            extra["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(input_ids)], 1)[
                :, : input_ids.shape[1]
            ]
        with torch.no_grad():
            logits = plugin.model(input_ids=input_ids, attention_mask=mask, **extra).logits
        log_probs.append(float(logits[0, -1].float().log_softmax(-1)[token_id]))
        input_ids = torch.cat([input_ids, torch.tensor([[token_id]])], dim=1)
        mask = torch.ones_like(input_ids)

    request = Instance(
        request_type="loglikelihood",
        arguments=(context, " a cat", lambda doc: [load_image(doc["image"])], 0, "t", "test"),
        idx=0,
        metadata={"task": "t", "doc_id": 0, "repeats": 1},
    )
    (result,) = plugin.loglikelihood([request])
    assert result.text[0] == pytest.approx(-sum(log_probs), rel=1e-4)
    assert result.token_counts.visual_tokens == 8


# ---------------------------------------------------------------------------------- real CLI
@pytest.mark.parametrize(
    ("family", "patch_args"),
    [
        ("qwen2.5-vl", {"method": "none"}),
        ("qwen2.5-vl", {"method": "pitome", "target_tokens": 16}),
        ("qwen3-vl", {"method": "tome", "keep_ratio": 0.6}),
    ],
    ids=["qwen2.5-unpatched", "qwen2.5-pitome16", "qwen3-tome0.6"],
)
def test_lmms_eval_cli_runs_the_smoke_task(saved_tiny_qwen_dir, tmp_path, family, patch_args):
    """``python -m lmms_eval`` end to end; every sample's visual tokens are the patch's count for its image."""
    folder = saved_tiny_qwen_dir(family)
    limit = 3  # two photographs of different shapes
    expected = expected_tokens(folder, limit, **patch_args)
    output = tmp_path / "out"
    patch_text = ",".join(f"{key}={value}" for key, value in patch_args.items())
    command = [
        sys.executable, "-m", "lmms_eval", "--model", MODEL_IDS[family],
        "--model_args", f"pretrained={folder},{patch_text},device=cpu",
        "--tasks", "pitome_smoke", "--include_path", str(TASKS_DIR), "--limit", str(limit), "--batch_size", "2",
        "--output_path", str(output), "--log_samples", "--verbosity", "DEBUG",
    ]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ), timeout=600)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]

    (results_file,) = output.rglob("*_results.json")
    results = json.loads(results_file.read_text())
    assert 0.0 <= results["results"]["pitome_smoke"]["exact_match,none"] <= 1.0
    (samples_file,) = output.rglob("*_samples_pitome_smoke.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    logged = {sample["doc_id"]: sample["token_counts"][0] for sample in samples}
    assert {doc_id: cost["visual_tokens"] for doc_id, cost in logged.items()} == expected
    assert len(set(expected.values())) == 2 or patch_args.get("target_tokens")  # the two shapes differ natively
    assert all(0 < cost["ttft_s"] <= cost["generation_s"] for cost in logged.values())
    throughput = results["throughput"]
    assert throughput["avg_visual_tokens"] == pytest.approx(sum(expected.values()) / limit)
    assert throughput["avg_peak_memory_mib"] > 0


def test_sweep_runs_the_qwen_smoke_suite(saved_tiny_qwen_dir, tmp_path):
    """``pitome-mllm sweep`` with the shipped qwen_smoke suite: unpatched and PiToMe at 16 tokens per image."""
    folder = saved_tiny_qwen_dir("qwen2.5-vl")
    suite = load_suite(SMOKE_SUITE)
    assert suite.lmms_model == "pitome_qwen2_5_vl"
    output = tmp_path / "sweep"
    status = cli.main(["sweep", "--suite", str(SMOKE_SUITE), "--model", str(folder), "--output", str(output),
                       "--limit", "3", "--only", "pitome_smoke/none",
                       "--only", "pitome_smoke/pitome-target_tokens16"])  # fmt: skip
    assert status == 0

    rows = {row["run"]: row for row in summary_rows([json.loads(p.read_text()) for p in output.rglob(RESULT_FILE)])}
    assert set(rows) == {"none", "pitome-target_tokens16"}
    native = expected_tokens(folder, 3, method="none")
    reduced = expected_tokens(folder, 3, method="pitome", target_tokens=16)
    assert rows["none"]["visual_tokens"] == pytest.approx(sum(native.values()) / 3)
    assert rows["pitome-target_tokens16"]["visual_tokens"] == pytest.approx(sum(reduced.values()) / 3)
    for row in rows.values():
        assert 0.0 <= row["score"] <= 1.0 and row["samples"] == 3
        assert row["ttft_ms"] > 0 and row["peak_memory_mib"] > 0
    runs = output / "runs" / "pitome_smoke"
    record = json.loads((runs / "pitome-target_tokens16" / "pitome_record.json").read_text())
    assert record["patch"]["config"]["target_tokens"] == 16
    log = (runs / "none" / "lmms_eval.log").read_text()
    assert "--model pitome_qwen2_5_vl" in log.splitlines()[0]
