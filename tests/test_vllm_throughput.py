"""The serving benchmark (`benchmarks/vllm_throughput.py`) end to end on a tiny LLaVA: two real servers on
loopback (unpatched and 16 tokens), two concurrency levels, one pass; its JSON and table hold what they claim.

Needs vLLM (the environment ``bash scripts/install.sh --vllm`` makes); skipped elsewhere.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")
pytest.importorskip("openai")

from pitome_mllm.zoo.tiny import VLLM_TEST_SPEC, save_tiny_llava  # noqa: E402

pytestmark = pytest.mark.vllm

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "vllm_throughput.py"
BUDGET = 16
OUTPUT_TOKENS = 3


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    model = save_tiny_llava(folder / "model", VLLM_TEST_SPEC, hub_layout=True)
    output = folder / "result.json"
    command = [sys.executable, str(BENCHMARK), "--family", "llava-1.5", "--model", str(model), "--dtype", "float32"]
    command += ["--budgets", str(BUDGET), "--clients", "1", "3", "--min-requests", "2", "--passes", "1"]
    command += ["--output-tokens", str(OUTPUT_TOKENS), "--max-model-len", "1024", "--output", str(output)]
    environment = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    finished = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=900)
    assert finished.returncode == 0, finished.stderr[-4000:]
    return json.loads(output.read_text()), output.with_suffix(".md").read_text()


def test_each_server_counts_its_own_visual_tokens(result):
    data, _ = result
    unpatched, merged = data["rows"]
    assert (unpatched["label"], merged["label"]) == ("unpatched", str(BUDGET))
    assert unpatched["prompt_tokens"] - merged["prompt_tokens"] == VLLM_TEST_SPEC.num_patches - BUDGET
    for row in data["rows"]:
        assert row["kv_blocks_per_request"] == math.ceil((row["prompt_tokens"] + OUTPUT_TOKENS) / row["block_size"])


def test_every_load_ran_with_its_clients(result):
    data, table = result
    assert data["clients"] == [1, 3]
    assert data["requests_per_load"] == [2, 3]
    for row in data["rows"]:
        for clients in ("1", "3"):
            cell = row["cells"][clients]
            assert cell["passes"] == 1
            assert cell["prompt_tokens"] == [row["prompt_tokens"]]
            assert cell["requests_per_s"]["median"] > 0
            assert cell["ttft_p95_s"]["median"] >= cell["ttft_p50_s"]["median"] > 0
            assert cell["server_cpu_s_per_request"]["median"] > 0
            assert f"| {row['label']} | {row['prompt_tokens']} |" in table


def test_the_text_prompt_matches_the_image_prompt_length(result):
    data, table = result
    share = data["llm_share"]
    assert share["text_prompt_tokens"] == share["image_prompt_tokens"] == data["rows"][0]["prompt_tokens"]
    assert share["share"] == pytest.approx(share["text_ttft_s"] / share["image_ttft_s"])
    assert "Language-model share of the unpatched TTFT" in table
