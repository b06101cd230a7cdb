"""PiToMe served by vLLM (its CPU build): counts and first-token log-probabilities against transformers.

Needs vLLM, so it runs in the environment ``bash scripts/install.sh --vllm`` makes (CI does);
elsewhere it is skipped. Each engine runs in its own process (`pitome_mllm.testing.vllm_runs`);
the transformers side loads the same checkpoint here and is patched with the same settings.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

import pitome_mllm  # noqa: E402
from pitome_mllm.testing.vllm_runs import REQUESTS, EngineResults, run_vllm_engine  # noqa: E402
from pitome_mllm.zoo.tiny import VLLM_TEST_SPEC, load_image, save_tiny_llava  # noqa: E402

pytestmark = pytest.mark.vllm

# The settings each engine is started with (hf_overrides["pitome"]); None: no plugin settings.
SETTINGS = {
    "none": None,
    "target_16": {"target_tokens": 16},
    "target_32": {"target_tokens": 32},
    "keep_0.9_reference": {"keep_ratio": 0.9, "preset": "reference"},
    "keep_0.9_paper": {"keep_ratio": 0.9, "preset": "paper"},
    "keep_0.9_keys_size_weighted": {"keep_ratio": 0.9, "preset": "pure", "prop_attn": False},
    "tome_target_32": {"method": "tome", "target_tokens": 32},
    "pool_16": {"method": "pool", "target_tokens": 16},
    "fastervlm_16": {"method": "fastervlm", "target_tokens": 16},
    "divprune_16": {"method": "divprune", "target_tokens": 16},
    "mllm_16": {"target_tokens": 16, "preset": "mllm"},
    "keep_1.0": {"keep_ratio": 1.0},
}
# Largest |log p(vLLM) - log p(transformers)| over the top-5 first tokens allowed in fp32.
LOGPROB_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_llava(tmp_path_factory.mktemp("vllm_llava"), VLLM_TEST_SPEC, hub_layout=True)


run_engine = functools.partial(run_vllm_engine, requests="llava")
engine_result = EngineResults(SETTINGS, requests="llava")


@pytest.fixture(scope="module")
def reference(model_dir):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    return model, processor


def transformers_run(reference, settings: dict | None) -> dict:
    """What transformers, patched with ``settings``, makes of every request (one at a time)."""
    model, processor = reference
    handle = pitome_mllm.patch(model, processor, **settings) if settings else None
    try:
        results = {}
        for request in REQUESTS:
            images = [load_image(name) for name in request.images]
            inputs = processor(images=images, text=[request.text], return_tensors="pt")
            with torch.no_grad():
                logprobs = model(**inputs).logits[0, -1].float().log_softmax(-1)
            results[request.name] = {"prompt_token_ids": inputs["input_ids"][0].tolist(), "logprobs": logprobs}
        tokens = None if handle is None else handle.num_visual_tokens
        return {"requests": results, "num_visual_tokens": tokens}
    finally:
        if handle is not None:
            handle.unpatch()


@pytest.mark.parametrize("name", [name for name in SETTINGS if name != "keep_1.0"])
def test_counts_and_first_token_logprobs_match_transformers(model_dir, reference, name):
    settings = SETTINGS[name]
    served = engine_result(model_dir, name)
    expected = transformers_run(reference, settings)
    image_token_id = reference[0].config.image_token_id
    per_image = expected["num_visual_tokens"] or VLLM_TEST_SPEC.num_patches
    worst = 0.0
    for request in REQUESTS:
        got = served["requests"][request.name]
        want = expected["requests"][request.name]
        # The prompt vLLM built (placeholders expanded by the plugin's count) is the one transformers built.
        assert got["prompt_token_ids"] == want["prompt_token_ids"], request.name
        assert got["prompt_token_ids"].count(image_token_id) == per_image * len(request.images), request.name
        for token, logprob in got["top_logprobs"].items():
            difference = abs(logprob - want["logprobs"][int(token)].item())
            worst = max(worst, difference)
        assert worst <= LOGPROB_TOLERANCE, (request.name, worst)
    if settings is not None:
        # The tolerance tells merges apart: merging moves the log-probabilities far more than it allows.
        unmerged = transformers_run(reference, None)["requests"]["single"]["logprobs"]
        moved = (expected["requests"]["single"]["logprobs"] - unmerged).abs().max().item()
        assert moved > 100 * LOGPROB_TOLERANCE, moved
    print(f"{name}: {per_image} tokens per image, max |d log p| = {worst:.2e}")


def test_keep_ratio_one_equals_vllm_unpatched(model_dir):
    unpatched = engine_result(model_dir, "none")["requests"]
    kept = engine_result(model_dir, "keep_1.0")["requests"]
    assert kept == unpatched  # token ids and log-probabilities, exactly


def test_wrong_embedding_count_raises_instead_of_truncating(model_dir):
    process = run_engine(model_dir, {"target_tokens": 16}, "--break-counts")
    assert process.returncode != 0
    assert "image 0 produced 15 visual embeddings, but its prompt holds 16 placeholders" in process.stderr


@pytest.mark.parametrize("settings", [{"target_tokens": 65}, {"keep_ratio": 0.4}, {"kep_ratio": 0.9}])
def test_bad_settings_fail_at_engine_start_with_the_patch_message(model_dir, reference, settings):
    model, processor = reference
    with pytest.raises(ValueError) as refused:
        pitome_mllm.patch(model, processor, **settings)
    process = run_engine(model_dir, settings)
    assert process.returncode != 0
    assert str(refused.value) in process.stderr, process.stderr[-3000:]


@pytest.mark.parametrize(
    ("settings", "reason"),
    [
        ({"preset": "pure", "keep_ratio": 0.9}, "prop_attn=True is not supported in vLLM"),
        ({"method": "cdpruner", "target_tokens": 16}, "embed_multimodal sees the images only"),
        ({"keep_ratio": 0.9, "llm_prop_attn": True}, "llm_prop_attn=True is not supported in vLLM"),
    ],
)
def test_settings_vllm_cannot_serve_are_refused_with_the_reason(model_dir, settings, reason):
    process = run_engine(model_dir, settings)
    assert process.returncode != 0
    assert reason in process.stderr, process.stderr[-3000:]


def test_anyres_families_refuse_pitome_settings_instead_of_ignoring_them():
    from types import SimpleNamespace

    from vllm import ModelRegistry

    from pitome_mllm.integrations.vllm import REFUSING_CLASSES, register, unsupported

    register()
    for architecture, class_name in REFUSING_CLASSES.items():
        model_class = ModelRegistry._try_load_model_cls(architecture)
        assert model_class is getattr(unsupported, class_name)
        with_key = SimpleNamespace(
            model_config=SimpleNamespace(hf_config=SimpleNamespace(pitome={"target_tokens": 64}))
        )
        with pytest.raises(ValueError, match="is not supported for LLaVA-"):
            model_class(vllm_config=with_key)


def test_lmms_eval_vllm_model_runs_the_smoke_task_with_the_plugin(model_dir, tmp_path):
    pytest.importorskip("lmms_eval")
    tasks = Path(__file__).resolve().parents[1] / "eval" / "tasks"
    # lmms-eval splits --model_args at commas, so the override is one JSON object without any.
    model_args = (
        f'model={model_dir},hf_overrides={{"pitome":{{"target_tokens":16}}}},max_model_len=1024,'
        "enforce_eager=True,distributed_executor_backend=uni,dtype=float32"
    )
    command = [sys.executable, "-m", "lmms_eval", "--model", "vllm", "--model_args", model_args]
    command += ["--tasks", "pitome_smoke", "--include_path", str(tasks), "--limit", "2", "--output_path", str(tmp_path)]
    environment = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    run = subprocess.run(command, capture_output=True, text=True, timeout=900, env=environment)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    assert "PiToMe in vLLM: 16 visual tokens per image" in log
    (results_file,) = tmp_path.rglob("*_results.json")
    assert "pitome_smoke" in json.loads(results_file.read_text())["results"]
