"""Qwen2.5-VL and Qwen3-VL served by vLLM (CPU build) with the transformers adapter's merge: counts and
first-token log-probabilities against transformers patched the same way.

vLLM's tower and merger are its own, the plugin reduces each image with the transformers adapter's code (Qwen3-VL's
DeepStack features along) and numbers M-RoPE positions as that adapter does (text from the full grid, each kept
token at the first cell it holds), so the prompts must be the same token for token and the log-probabilities agree
to float32 rounding. Each engine runs in its own process (`pitome_mllm.testing.vllm_runs`).
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

import pitome_mllm  # noqa: E402
from pitome_mllm.testing.vllm_runs import QWEN_REQUESTS, EngineResults, run_vllm_engine  # noqa: E402

pytestmark = pytest.mark.vllm

SETTINGS = {
    "none": None,
    "target_8": {"target_tokens": 8},
    # 16 is every native token of the 112 px image (4 x 4 merged cells): min(K, n) keeps it whole, and the others merge.
    "target_16": {"target_tokens": 16},
    "tome_16": {"method": "tome", "target_tokens": 16},
    "keep_0.9": {"keep_ratio": 0.9},
    "keep_1.0": {"keep_ratio": 1.0},
}
# Largest |log p(vLLM) - log p(transformers)| over the top-5 first tokens allowed in fp32 (measured: 4.8e-7 on both
# families). Kept tokens left at their first-K positions instead of the cells they hold move it by 5e-6 to 6e-5 on
# these tiny models (`test_the_tolerance_tells_wrong_positions_apart`), so it is tighter than LLaVA's.
LOGPROB_TOLERANCE = 2e-6
FAMILIES = ("qwen2.5-vl", "qwen3-vl")


@pytest.fixture(scope="module", params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, family) -> Path:
    from pitome_mllm.zoo.tiny_qwen import save_tiny_qwen_vl

    return save_tiny_qwen_vl(tmp_path_factory.mktemp(f"vllm_{family}") / "model", family)


run_engine = functools.partial(run_vllm_engine, requests="qwen")
engine_result = EngineResults(SETTINGS, requests="qwen")


@pytest.fixture(scope="module")
def reference(model_dir, family):
    from pitome_mllm.zoo.tiny_qwen import load_qwen_vl_processor, qwen_vl_model_class

    model = qwen_vl_model_class(family).from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, load_qwen_vl_processor(model_dir)


def transformers_run(reference, settings: dict | None) -> dict:
    """What transformers, patched with ``settings``, makes of every request (one at a time)."""
    model, processor = reference
    handle = pitome_mllm.patch(model, processor, **settings) if settings else None
    try:
        results = {}
        for request in QWEN_REQUESTS:
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
    for request in QWEN_REQUESTS:
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
        unmerged = transformers_run(reference, None)
        moved = max(
            (expected[request.name]["logprobs"] - unmerged[request.name]["logprobs"]).abs().max().item()
            for request in QWEN_REQUESTS
        )
        assert moved > 100 * LOGPROB_TOLERANCE, moved
    counts = {request.name: expected[request.name]["counts"] for request in QWEN_REQUESTS}
    print(f"{name}: tokens per image {counts}, max |d log p| = {worst:.2e}")


def test_three_image_sizes_get_three_budgets(reference, family):
    """The requests' three image sizes have three native counts; keep_ratio=0.9 gives each its own budget."""
    model, processor = reference
    handle = pitome_mllm.patch(model, processor, keep_ratio=0.9)
    try:
        sizes = {size for request in QWEN_REQUESTS for size in request.sizes}
        counts = {size: handle.visual_tokens_for_image(size[1], size[0]) for size in sizes}
    finally:
        handle.unpatch()
    expected = {
        "qwen2.5-vl": {(112, 112): 15, (200, 300): 70, (280, 140): 45},  # of 16, 77 and 50
        "qwen3-vl": {(112, 112): 15, (200, 300): 49, (280, 140): 33},  # of 16, 54 and 36
    }
    assert counts == expected[family]


def test_the_tolerance_tells_wrong_positions_apart(model_dir, reference):
    """Kept tokens left at their image's first K cells (text positions right): the log-probabilities leave the
    tolerance, so the comparison above checks the positions, not only the merge."""
    process = run_engine(model_dir, SETTINGS["target_8"], "--break-positions")
    assert process.returncode == 0, process.stderr[-4000:]
    served = json.loads(process.output_file.read_text())["requests"]
    expected = transformers_run(reference, SETTINGS["target_8"])
    worst = max(
        abs(logprob - expected[name]["logprobs"][int(token)].item())
        for name, got in served.items()
        for token, logprob in got["top_logprobs"].items()
    )
    assert worst > 2 * LOGPROB_TOLERANCE, worst


def test_chunked_prefill_across_an_image_matches_transformers(model_dir, reference):
    """Prefill chunks of 32 tokens: an image of 49 to 70 kept tokens is placed over several forwards, each moving
    the positions of the tokens it places; the answer is the one transformers gives the whole prompt."""
    settings = SETTINGS["keep_0.9"]
    engine = {"max_num_batched_tokens": 32, "max_num_seqs": 1}
    process = run_engine(model_dir, settings, "--engine", json.dumps(engine))
    assert process.returncode == 0, process.stderr[-4000:]
    served = json.loads(process.output_file.read_text())["requests"]
    expected = transformers_run(reference, settings)
    assert max(count for result in expected.values() for count in result["counts"]) > 32  # an image spans chunks
    worst = 0.0
    for request in QWEN_REQUESTS:
        got, want = served[request.name], expected[request.name]
        assert got["prompt_token_ids"] == want["prompt_token_ids"], request.name
        for token, logprob in got["top_logprobs"].items():
            worst = max(worst, abs(logprob - want["logprobs"][int(token)].item()))
    assert worst <= LOGPROB_TOLERANCE, worst
    print(f"chunked prefill (32 tokens), keep_ratio=0.9: max |d log p| = {worst:.2e}")


def test_keep_ratio_one_equals_vllm_unpatched(model_dir):
    unpatched = engine_result(model_dir, "none")["requests"]
    kept = engine_result(model_dir, "keep_1.0")["requests"]
    assert kept == unpatched  # token ids and log-probabilities, exactly


def test_wrong_embedding_count_raises_instead_of_truncating(model_dir, family):
    if family != FAMILIES[0]:
        pytest.skip("one family is enough: the check is the same code")
    process = run_engine(model_dir, {"target_tokens": 8}, "--break-counts")
    assert process.returncode != 0
    assert "produced 7 visual embeddings, but its prompt holds 8 placeholders" in process.stderr


def test_videos_are_refused_at_engine_start(model_dir, family):
    if family != FAMILIES[0]:
        pytest.skip("one family is enough: the check is the same code")
    process = run_engine(model_dir, {"target_tokens": 8}, "--engine", json.dumps({"limit_mm_per_prompt": {"image": 2}}))
    assert process.returncode != 0
    assert "limit_mm_per_prompt={'image': N, 'video': 0}" in process.stderr


@pytest.mark.parametrize(
    ("settings", "reason"),
    [
        ({"method": "pool", "target_tokens": 8}, "pools a square patch grid"),
        ({"method": "dominant", "target_tokens": 8}, "Qwen-VL towers have no class token"),
    ],
)
def test_settings_qwen_cannot_run_fail_at_engine_start_with_the_patch_message(
    model_dir, reference, family, settings, reason
):
    if family != FAMILIES[0]:
        pytest.skip("one family is enough: the check is the same code")
    model, processor = reference
    with pytest.raises(ValueError, match=re.escape(reason)) as refused:
        pitome_mllm.patch(model, processor, **settings)
    process = run_engine(model_dir, settings)
    assert process.returncode != 0
    assert str(refused.value) in process.stderr, process.stderr[-3000:]
