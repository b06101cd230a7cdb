"""`pitome-mllm serve` on loopback answers an OpenAI chat request with an image, counting merged tokens.

Needs vLLM (the environment ``bash scripts/install.sh --vllm`` makes); skipped elsewhere.
"""

from __future__ import annotations

import base64
import io
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

import pitome_mllm  # noqa: E402
from pitome_mllm.zoo.tiny import VLLM_TEST_SPEC, load_image, save_tiny_llava  # noqa: E402

pytestmark = pytest.mark.vllm

TARGET_TOKENS = 16
STARTUP_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_healthy(port: int, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"the server exited with {server.returncode}:\n{server.stdout.read()[-4000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"no healthy server on port {port} after {STARTUP_TIMEOUT_S} s")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llava(tmp_path_factory.mktemp("served"), VLLM_TEST_SPEC, hub_layout=True)


@pytest.fixture(scope="module")
def server(model_dir):
    port = free_port()
    command = [sys.executable, "-m", "pitome_mllm.cli", "serve", str(model_dir), "--target-tokens", str(TARGET_TOKENS)]
    command += ["--", "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "tiny", "--dtype", "float32"]
    command += ["--max-model-len", "1024", "--enforce-eager", "--distributed-executor-backend", "uni"]
    environment = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment)
    try:
        wait_until_healthy(port, process)
        yield port
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def image_data_url(name: str) -> str:
    buffer = io.BytesIO()
    load_image(name).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_served_chat_request_sees_the_merged_token_count(server, model_dir):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    question = "Describe this photo."
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server}/v1", api_key="unused")
    image = {"type": "image_url", "image_url": {"url": image_data_url("astronaut")}}
    content = [image, {"type": "text", "text": question}]
    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": content}], max_tokens=3, temperature=0
    )
    assert reply.choices[0].message.content is not None
    assert reply.usage.completion_tokens == 3
    # The same conversation through transformers' processor, patched to the same budget.
    model = LlavaForConditionalGeneration.from_pretrained(model_dir)
    processor = AutoProcessor.from_pretrained(model_dir)
    with pitome_mllm.patched(model, processor, target_tokens=TARGET_TOKENS):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        # vLLM's chat path tokenizes the rendered template without adding special tokens (no second BOS).
        inputs = processor(
            images=[load_image("astronaut")], text=[prompt], return_tensors="pt", add_special_tokens=False
        )
    assert (inputs["input_ids"] == model.config.image_token_id).sum() == TARGET_TOKENS
    assert reply.usage.prompt_tokens == inputs["input_ids"].shape[1]
