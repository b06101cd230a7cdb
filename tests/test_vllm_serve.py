"""`pitome-mllm serve` on loopback answers an OpenAI chat request with an image, counting merged tokens:
a tiny LLaVA-1.5 checkpoint, and `serve tiny-qwen` (a tiny Qwen2.5-VL, with the options serve adds for it).

Needs vLLM (the environment ``bash scripts/install.sh --vllm`` makes); skipped elsewhere.
"""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

import pitome_mllm  # noqa: E402
from pitome_mllm.testing.servers import free_port, wait_until_healthy  # noqa: E402
from pitome_mllm.zoo.tiny import VLLM_TEST_SPEC, load_image, save_tiny_llava  # noqa: E402

pytestmark = pytest.mark.vllm

TARGET_TOKENS = 16
STARTUP_TIMEOUT_S = 300  # per server start (one per family), the vLLM CPU build on two cores
REQUEST_TIMEOUT_S = 120  # per chat request
# Settings a server on this machine starts with: in this process, on the CPU, a small cache.
CPU_ENVIRONMENT = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def running_server(
    serve_args: list[str], vllm_args: list[str], log: Path, environment: dict[str, str] | None = None
) -> Iterator[int]:
    """``pitome-mllm serve SERVE_ARGS -- --host 127.0.0.1 --port P ... VLLM_ARGS`` until the generator closes;
    yields P. The server's output goes to ``log`` (a pipe nobody reads would fill and stall it)."""
    port = free_port()
    command = [sys.executable, "-m", "pitome_mllm.cli", "serve", *serve_args]
    command += ["--", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "1024"]
    command += vllm_args
    environment = dict(os.environ, **CPU_ENVIRONMENT, **(environment or {}))
    with log.open("w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, text=True, env=environment)
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}", process, log, time.monotonic() + STARTUP_TIMEOUT_S)
        yield port
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llava(tmp_path_factory.mktemp("served"), VLLM_TEST_SPEC, hub_layout=True)


@pytest.fixture  # one server at a time: each is stopped after its test
def server(model_dir, tmp_path_factory):
    serve_args = [str(model_dir), "--target-tokens", str(TARGET_TOKENS)]
    cpu = ["--served-model-name", "tiny", "--enforce-eager", "--distributed-executor-backend", "uni"]
    yield from running_server(serve_args, cpu, tmp_path_factory.mktemp("llava_server") / "server.log")


@pytest.fixture(scope="module")
def qwen_cache(tmp_path_factory):
    """The cache folder `serve tiny-qwen` saves its model to."""
    return tmp_path_factory.mktemp("qwen_cache")


@pytest.fixture
def qwen_server(qwen_cache):
    # serve tiny-qwen adds the served name, eager mode, the executor and --limit-mm-per-prompt '{"video": 0}'.
    serve_args = ["tiny-qwen", "--target-tokens", str(TARGET_TOKENS)]
    log = qwen_cache / "server.log"
    yield from running_server(serve_args, [], log, environment={"PITOME_CACHE": str(qwen_cache)})


def image_data_url(name: str) -> str:
    buffer = io.BytesIO()
    load_image(name).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


QUESTION = "Describe this photo."


def ask_about_the_astronaut(port: int, served_name: str):
    """One OpenAI chat request with the astronaut photo as a data URL; the reply, checked to hold 3 tokens."""
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=REQUEST_TIMEOUT_S)
    image = {"type": "image_url", "image_url": {"url": image_data_url("astronaut")}}
    content = [image, {"type": "text", "text": QUESTION}]
    reply = client.chat.completions.create(
        model=served_name, messages=[{"role": "user", "content": content}], max_tokens=3, temperature=0
    )
    assert reply.choices[0].message.content is not None
    assert reply.usage.completion_tokens == 3
    return reply


def test_served_chat_request_sees_the_merged_token_count(server, model_dir):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    reply = ask_about_the_astronaut(server, "tiny")
    # The same conversation through transformers' processor, patched to the same budget.
    model = LlavaForConditionalGeneration.from_pretrained(model_dir)
    processor = AutoProcessor.from_pretrained(model_dir)
    with pitome_mllm.patched(model, processor, target_tokens=TARGET_TOKENS):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        # vLLM's chat path tokenizes the rendered template without adding special tokens (no second BOS).
        inputs = processor(
            images=[load_image("astronaut")], text=[prompt], return_tensors="pt", add_special_tokens=False
        )
    assert (inputs["input_ids"] == model.config.image_token_id).sum() == TARGET_TOKENS
    assert reply.usage.prompt_tokens == inputs["input_ids"].shape[1]


def test_served_qwen_chat_request_sees_the_merged_token_count(qwen_server, qwen_cache):
    from pitome_mllm.zoo.tiny_qwen import load_qwen_vl_processor, qwen_vl_model_class

    reply = ask_about_the_astronaut(qwen_server, "tiny-qwen")
    # The same conversation through transformers' processor of the saved model, patched to the same budget.
    model_dir = qwen_cache / "vllm_tiny_qwen"
    model = qwen_vl_model_class("qwen2.5-vl").from_pretrained(model_dir)
    processor = load_qwen_vl_processor(model_dir)
    with pitome_mllm.patched(model, processor, target_tokens=TARGET_TOKENS):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(images=[load_image("astronaut")], text=[prompt], return_tensors="pt")
    native = int(inputs["image_grid_thw"][0].prod()) // 4  # the merger's 2 x 2 blocks
    assert (inputs["input_ids"] == model.config.image_token_id).sum() == min(TARGET_TOKENS, native)
    assert native > TARGET_TOKENS  # the image is merged
    assert reply.usage.prompt_tokens == inputs["input_ids"].shape[1]
