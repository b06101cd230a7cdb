"""LLaVA-NeXT served by vLLM (CPU build) with the anyres budget: counts and first-token log-probabilities
against transformers patched the same way.

vLLM packs each image as transformers does, and the plugin merges the packed tokens with the transformers
adapter's code, so the prompts must be the same token for token and the log-probabilities agree to float32
rounding. Each engine runs in its own process (`pitome_mllm.testing.vllm_runs`).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

import pitome_mllm  # noqa: E402
from pitome_mllm.testing.vllm_runs import ANYRES_REQUESTS, EngineResults, run_vllm_engine, save_tiny_llava_next  # noqa: E402

pytestmark = pytest.mark.vllm

SETTINGS = {
    "none": None,
    "target_8": {"target_tokens": 8},
    "target_16": {"target_tokens": 16},
    "keep_0.9": {"keep_ratio": 0.9},
    "tome_target_16": {"method": "tome", "target_tokens": 16},
    "keep_1.0": {"keep_ratio": 1.0},
}
# Largest |log p(vLLM) - log p(transformers)| over the top-5 first tokens allowed in fp32.
LOGPROB_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_llava_next(tmp_path_factory.mktemp("vllm_llava_next") / "model")


run_engine = functools.partial(run_vllm_engine, requests="anyres")
engine_result = EngineResults(SETTINGS, requests="anyres")


@pytest.fixture(scope="module")
def reference(model_dir):
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    model = LlavaNextForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    return model, processor


def transformers_run(reference, settings: dict | None) -> dict:
    """What transformers, patched with ``settings``, makes of every request (one at a time)."""
    model, processor = reference
    handle = pitome_mllm.patch(model, processor, **settings) if settings else None
    try:
        results = {}
        for request in ANYRES_REQUESTS:
            images = request.load_images()
            inputs = processor(images=images, text=[request.text], return_tensors="pt")
            with torch.no_grad():
                logprobs = model(**inputs).logits[0, -1].float().log_softmax(-1)
            counts = None if handle is None else [handle.visual_tokens_for_image(i.height, i.width) for i in images]
            results[request.name] = {
                "prompt_token_ids": inputs["input_ids"][0].tolist(),
                "logprobs": logprobs,
                "counts": counts,
            }
        return results
    finally:
        if handle is not None:
            handle.unpatch()


@pytest.mark.parametrize("name", [name for name in SETTINGS if name != "keep_1.0"])
def test_counts_and_first_token_logprobs_match_transformers(model_dir, reference, name):
    settings = SETTINGS[name]
    served = engine_result(model_dir, name)["requests"]
    expected = transformers_run(reference, settings)
    image_token_id = reference[0].config.image_token_id
    worst = 0.0
    for request in ANYRES_REQUESTS:
        got, want = served[request.name], expected[request.name]
        # The prompt vLLM built (each image expanded to its budget by the plugin) is the one transformers built.
        assert got["prompt_token_ids"] == want["prompt_token_ids"], request.name
        if want["counts"] is not None:
            assert got["prompt_token_ids"].count(image_token_id) == sum(want["counts"]), request.name
            if settings.get("target_tokens"):
                assert want["counts"] == [settings["target_tokens"]] * len(request.images), request.name
        for token, logprob in got["top_logprobs"].items():
            worst = max(worst, abs(logprob - want["logprobs"][int(token)].item()))
        assert worst <= LOGPROB_TOLERANCE, (request.name, worst)
    if settings is not None:
        # The tolerance tells merges apart: merging moves the log-probabilities far more than it allows.
        unmerged = transformers_run(reference, None)["single"]["logprobs"]
        moved = (expected["single"]["logprobs"] - unmerged).abs().max().item()
        assert moved > 100 * LOGPROB_TOLERANCE, moved
    counts = {request.name: expected[request.name]["counts"] for request in ANYRES_REQUESTS}
    print(f"{name}: tokens per image {counts}, max |d log p| = {worst:.2e}")


def test_keep_ratio_one_equals_vllm_unpatched(model_dir):
    unpatched = engine_result(model_dir, "none")["requests"]
    kept = engine_result(model_dir, "keep_1.0")["requests"]
    assert kept == unpatched  # token ids and log-probabilities, exactly


def test_wrong_embedding_count_raises_instead_of_truncating(model_dir):
    process = run_engine(model_dir, {"target_tokens": 16}, "--break-counts")
    assert process.returncode != 0
    assert "produced 15 visual embeddings, but its prompt holds 16 placeholders" in process.stderr


@pytest.mark.parametrize(
    ("settings", "reason"),
    [
        ({"keep_ratio": 0.9, "target_tokens": 16}, "give keep_ratio (0.9) or target_tokens (16), not both"),
        ({"target_tokens": 2}, "target_tokens=2 is too small for LLaVA-NeXT"),
        ({"method": "pool", "target_tokens": 16}, "is not supported on LLaVA-NeXT"),
    ],
)
def test_settings_llava_next_cannot_run_fail_at_engine_start_with_the_patch_message(
    model_dir, reference, settings, reason
):
    model, processor = reference
    with pytest.raises(ValueError, match=re.escape(reason)) as refused:
        pitome_mllm.patch(model, processor, **settings)
    process = run_engine(model_dir, settings)
    assert process.returncode != 0
    assert str(refused.value) in process.stderr, process.stderr[-3000:]
