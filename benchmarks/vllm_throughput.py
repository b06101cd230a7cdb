"""Serving throughput under concurrency: `pitome-mllm serve` unpatched and at several visual-token budgets.

For one model family, one OpenAI-compatible server per setting (unpatched, then ``target_tokens`` = each budget)
runs on loopback, all at once; then, in each of ``--passes`` passes, for each number of concurrent clients
(``--clients``, default 1 4 16 32), every server gets the same load in turn (the order alternates, so that a
machine growing busier or quieter favours no setting). A load is ``max(--min-requests, clients)`` chat requests,
each with an image of its own and answering exactly ``--output-tokens`` tokens (``ignore_eos``), kept in flight
by that many clients. Each figure is the median over passes, with its range:

- requests/s: requests over the wall time from the first request sent to the last answer;
- time to first token (TTFT), p50 and p95 over the load's requests: from sending a request to the first chunk
  that carries a generated token (streamed, with usage in every chunk);
- server CPU seconds per request (the server and its engine process): the work itself, much less sensitive than
  wall time to other programs sharing the cores;
- KV cache per request: prompt and answer tokens, and the blocks vLLM allocates for them, with the engine's block
  size read from its ``/metrics``.

Whether the language model dominates the cost, as in the 7B models, is measured too: on the unpatched server, a
text-only prompt of the same token count as the image prompt (no tower) against the image prompt, alone, TTFT.

The models are random and built locally (no download), at the 7B models' geometry and proportions, narrower:

- ``llava-1.5``: CLIP ViT-L/14-336 geometry (577 tower tokens, 24 layers, 576 visual tokens) at width 64, and an
  8-layer, 1024-wide LLaMA (8 heads of 128, MLP 2816: LLaMA-7B's 2.7x);
- ``qwen2.5-vl``: Qwen2.5-VL's tower geometry (14 px patches, 2 x 2 merge, 32 layers, window attention with full
  attention every 8th layer) at width 64, and an 8-layer, 1024-wide Qwen2 (8 query and 2 key/value heads of 128,
  MLP 5376: Qwen2.5-7B's 5.3x); images are sent at 672 x 672, which is 576 merged tokens.

CPU (vLLM's CPU build, ``.venv-vllm``; 25-35 minutes per family on 2 cores)::

    .venv-vllm/bin/python benchmarks/vllm_throughput.py --family llava-1.5
    .venv-vllm/bin/python benchmarks/vllm_throughput.py --family qwen2.5-vl

GPU (any local or hub checkpoint of the released layout)::

    python benchmarks/vllm_throughput.py --family llava-1.5 --model llava-hf/llava-1.5-7b-hf --dtype float16 \\
        --clients 1 4 16 32 64 --min-requests 64 --output-tokens 64
    python benchmarks/vllm_throughput.py --family qwen2.5-vl --model Qwen/Qwen2.5-VL-7B-Instruct \\
        --dtype bfloat16 --clients 1 4 16 32 64 --min-requests 64 --output-tokens 64 \\
        --vllm-args="--gpu-memory-utilization 0.2"

On a GPU, every server holds its own copy of the model and its KV cache: lower ``--gpu-memory-utilization`` so
that the servers fit together, or run one budget at a time (``--budgets 64``) and compare across runs.

Writes ``--output`` (JSON: the machine, every pass of every figure) and the same name with ``.md`` (the table).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
QUESTION = "Describe this photo in detail."
PHOTOS = ("astronaut", "chelsea", "coffee")
SERVED_NAME = "bench"
STARTUP_TIMEOUT_S = 900


@dataclass(frozen=True)
class Family:
    """A model family the benchmark serves: how its local model is built and the image size it is sent."""

    name: str
    image_size: int  # px, square: every request's image is resized to it before sending (576 visual tokens)
    extra_vllm_args: tuple[str, ...] = ()


FAMILIES = {
    "llava-1.5": Family("llava-1.5", image_size=336),
    # The plugin refuses videos on Qwen-VL; vLLM's default would also profile with dummy videos.
    "qwen2.5-vl": Family(
        "qwen2.5-vl",
        image_size=672,
        extra_vllm_args=("--limit-mm-per-prompt", '{"image": 1, "video": 0}'),
    ),
}


def build_llava(folder: Path) -> None:
    """A random LLaVA-1.5 (CLIP-L/336 geometry at width 64, LLaMA-7B proportions at width 1024, 8 layers)."""
    from pitome_mllm.zoo.tiny import TinyLlavaSpec, save_tiny_llava

    spec = TinyLlavaSpec(
        vision_hidden=64,
        vision_heads=2,
        vision_intermediate=256,
        text_hidden=1024,
        text_layers=8,
        text_heads=8,
        text_intermediate=2816,
    )
    save_tiny_llava(folder, spec, hub_layout=True)


def build_qwen(folder: Path) -> None:
    """A random Qwen2.5-VL (its tower geometry at width 64, Qwen2.5-7B proportions at width 1024, 8 layers)."""
    from pitome_mllm.zoo.tiny_qwen import build_tiny_qwen_processor, save_qwen_vl_processor, tiny_qwen_vl

    size = FAMILIES["qwen2.5-vl"].image_size
    processor = build_tiny_qwen_processor("qwen2.5-vl", pixels=(56 * 56, size * size))
    model, processor = tiny_qwen_vl(
        "qwen2.5-vl",
        processor=processor,
        vision_hidden=64,
        vision_layers=32,
        vision_heads=2,
        vision_intermediate=176,
        window_size=112,
        fullatt_block_indexes=(7, 15, 23, 31),
        text_hidden=1024,
        text_layers=8,
        text_heads=8,
        text_kv_heads=2,
        text_intermediate=5376,
        mrope_section=(16, 24, 24),
    )
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    save_qwen_vl_processor(processor, folder)


BUILDERS = {"llava-1.5": build_llava, "qwen2.5-vl": build_qwen}


def local_model(family: str) -> Path:
    """The family's benchmark model, built once under the cache folder (``$PITOME_CACHE``)."""
    from pitome_mllm.common.files import cache_dir

    folder = cache_dir() / f"vllm_bench_{family}"
    if not (folder / "model.safetensors").is_file():
        BUILDERS[family](folder)
    return folder


# ----------------------------------------------------------------------------------------------- requests


def distinct_image(photos: list, index: int, size: int):
    """Image ``index``: a bundled photo cropped by a window no other index uses, resized to ``size`` x ``size``.

    vLLM caches encoder outputs by content, so a repeated image could skip the tower.
    """
    photo = photos[index % len(photos)]
    shift = index // len(photos)
    left, top = shift % 17, shift // 17
    if top >= 17:
        raise ValueError(f"image index {index}: at most {17 * 17 * len(photos)} distinct images")
    crop = photo.crop((left, top, photo.width - 17 + left, photo.height - 17 + top))
    return crop.convert("RGB").resize((size, size))


def data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def image_messages(url: str) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}],
        }
    ]


def text_messages(words: int) -> list[dict]:
    return [{"role": "user", "content": " ".join(["photo"] * words) + " " + QUESTION}]


# ------------------------------------------------------------------------------------------------ servers


def has_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None


@dataclass
class Server:
    """One running `pitome-mllm serve`, with the setting it serves."""

    label: str
    settings: dict | None
    port: int
    process: subprocess.Popen
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cpu_seconds(self) -> float:
        """CPU seconds used so far by the server and every process it started (the engine)."""
        import psutil

        total = 0.0
        root = psutil.Process(self.process.pid)
        for process in [root, *root.children(recursive=True)]:
            try:
                times = process.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += times.user + times.system
        return total

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()


def serve_command(model: str, settings: dict | None, family: Family, args: argparse.Namespace, port: int) -> list[str]:
    command = [sys.executable, "-m", "pitome_mllm.cli", "serve", model]
    if settings is None:
        command += ["--no-pitome"]
    else:
        command += ["--target-tokens", str(settings["target_tokens"]), "--preset", settings["preset"]]
    command += ["--", "--host", "127.0.0.1", "--port", str(port), "--served-model-name", SERVED_NAME]
    command += ["--dtype", args.dtype, "--max-model-len", str(args.max_model_len), "--seed", "0"]
    # Every request has an image of its own; no cache may serve one twice.
    command += ["--no-enable-prefix-caching", "--mm-processor-cache-gb", "0", *family.extra_vllm_args]
    if not has_gpu():
        command += ["--enforce-eager", "--distributed-executor-backend", "uni"]
    elif family.name.startswith("qwen"):
        command += ["--compilation-config", '{"cudagraph_mode": "PIECEWISE"}']  # the plugin's Qwen-VL requirement
    return command + args.vllm_args.split()


def server_environment() -> dict[str, str]:
    environment = dict(os.environ)
    if not has_gpu():
        environment.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        # Idle OpenMP threads sleep instead of spinning: the servers waiting their turn take no core from the one
        # being measured, and CPU seconds count work, not waiting.
        environment.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return environment


def start_server(label: str, settings: dict | None, model: str, family: Family, args, logs: Path) -> Server:
    from pitome_mllm.testing.servers import free_port

    port = free_port()
    log = logs / f"server_{label}.log"
    command = serve_command(model, settings, family, args, port)
    with log.open("w") as stream:
        process = subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT, env=server_environment())
    return Server(label, settings, port, process, log)


def block_size(server: Server) -> int:
    """The engine's KV-cache block size, from the ``vllm:cache_config_info`` metric's labels."""
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=10) as response:
        metrics = response.read().decode()
    match = re.search(r'vllm:cache_config_info\{[^}]*block_size="(\d+)"', metrics)
    if match is None:
        raise RuntimeError(f"server {server.label}: no block_size in /metrics")
    return int(match.group(1))


def prompt_tokens_of(server: Server, messages: list[dict]) -> int:
    """The prompt's token count, as the server's chat template and processor make it (``/tokenize``)."""
    body = json.dumps({"model": SERVED_NAME, "messages": messages, "add_generation_prompt": True}).encode()
    request = urllib.request.Request(f"{server.url}/tokenize", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())["count"]


def matching_text_words(server: Server, tokens: int) -> int:
    """How many repeated words make a text-only prompt of ``tokens`` tokens (or the nearest count above)."""
    low, high = 1, 2 * tokens
    while low < high:  # the count grows with the words
        middle = (low + high) // 2
        if prompt_tokens_of(server, text_messages(middle)) < tokens:
            low = middle + 1
        else:
            high = middle
    return low


# ------------------------------------------------------------------------------------------------- load


async def one_request(client, messages: list[dict], output_tokens: int) -> dict:
    """Send one chat request, streamed; ``{"ttft_s", "prompt_tokens", "completion_tokens"}``."""
    sent = time.perf_counter()
    ttft = None
    usage = None
    stream = await client.chat.completions.create(
        model=SERVED_NAME,
        messages=messages,
        max_tokens=output_tokens,
        temperature=0.0,
        stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True},
        extra_body={"ignore_eos": True},
    )
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
            if ttft is None and chunk.usage.completion_tokens:
                ttft = time.perf_counter() - sent
    if ttft is None or usage is None:
        raise RuntimeError("the stream ended without a generated token")
    return {"ttft_s": ttft, "prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens}


async def run_load(server: Server, requests: list[list[dict]], clients: int, output_tokens: int) -> dict:
    """``requests`` kept ``clients`` in flight at a time; the load's figures."""
    import httpx
    import openai

    queue: asyncio.Queue = asyncio.Queue()
    for messages in requests:
        queue.put_nowait(messages)
    answers: list[dict] = []
    limits = httpx.Limits(max_connections=clients + 4)
    async with openai.AsyncOpenAI(
        base_url=f"{server.url}/v1",
        api_key="unused",
        max_retries=0,
        timeout=1800,
        http_client=httpx.AsyncClient(limits=limits, timeout=1800),
    ) as client:

        async def worker() -> None:
            while not queue.empty():
                messages = queue.get_nowait()
                answers.append(await one_request(client, messages, output_tokens))

        cpu_begun = server.cpu_seconds()
        begun = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        elapsed = time.perf_counter() - begun
        cpu_used = server.cpu_seconds() - cpu_begun
    ttfts = sorted(answer["ttft_s"] for answer in answers)
    if any(answer["completion_tokens"] != output_tokens for answer in answers):
        raise RuntimeError(f"server {server.label}: an answer had another length than {output_tokens} tokens")
    return {
        "requests": len(answers),
        "wall_s": elapsed,
        "requests_per_s": len(answers) / elapsed,
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p95_s": percentile(ttfts, 95),
        "server_cpu_s_per_request": cpu_used / len(answers),
        "prompt_tokens": sorted({answer["prompt_tokens"] for answer in answers}),
    }


def single(prompt_tokens: list[int], label: str) -> int:
    """The one prompt length of a load whose images are all the same size (else the table would mislead)."""
    if len(prompt_tokens) != 1:
        raise RuntimeError(f"server {label}: prompts of {prompt_tokens} tokens for images of one size")
    return prompt_tokens[0]


def percentile(sorted_values: list[float], q: float) -> float:
    """The ``q``-th percentile of ``sorted_values``, linear between the closest ranks."""
    if not sorted_values:
        raise ValueError("no values")
    rank = (len(sorted_values) - 1) * q / 100
    below, above = math.floor(rank), math.ceil(rank)
    return sorted_values[below] + (sorted_values[above] - sorted_values[below]) * (rank - below)


# ------------------------------------------------------------------------------------------------ summary


FIGURES = ("requests_per_s", "ttft_p50_s", "ttft_p95_s", "server_cpu_s_per_request")


def summary(passes: list[dict]) -> dict:
    """Median and range over passes of every figure of one (setting, clients) cell."""
    cell = {"passes": len(passes), "prompt_tokens": passes[0]["prompt_tokens"]}
    for key in FIGURES:
        values = [run[key] for run in passes]
        cell[key] = {"median": statistics.median(values), "min": min(values), "max": max(values), "all": values}
    return cell


def separated(cell: dict, baseline: dict, key: str = "requests_per_s") -> bool:
    """Whether the two cells' ranges over passes do not overlap: a difference the spread does not hide."""
    return cell[key]["min"] > baseline[key]["max"] or cell[key]["max"] < baseline[key]["min"]


def stops_paying(rows: list[dict], clients_levels: list[int]) -> list[str]:
    """One sentence per budget: the smallest concurrency where it no longer beats unpatched beyond the spread."""
    baseline = rows[0]
    sentences = []
    for row in rows[1:]:
        for clients in clients_levels:
            cell, base = row["cells"][str(clients)], baseline["cells"][str(clients)]
            faster = cell["requests_per_s"]["median"] > base["requests_per_s"]["median"]
            if not (faster and separated(cell, base)):
                sentences.append(f"{row['label']} tokens: no gain beyond the spread at {clients} clients")
                break
        else:
            sentences.append(f"{row['label']} tokens: faster than unpatched beyond the spread at every concurrency")
    return sentences


def markdown(result: dict) -> str:
    info, rows = result["machine"], result["rows"]
    clients_levels = result["clients"]
    where = info.get("gpu") or f"{info['cpu']} ({info['cpus_available']} CPUs)"
    share = result["llm_share"]
    lines = [
        f"{result['family']} shapes, vLLM {info['vllm']} on {where}, torch {info['torch']}, {result['dtype']}; "
        f"model {Path(result['model']).name}; {result['output_tokens']} output tokens per request; median "
        f"[min-max] over {result['passes']} passes; load average {info['load_average_1_5_15'][0]:.1f} at the end.",
        "",
        f"Language-model share of the unpatched TTFT (alone): {100 * share['share']:.0f}% "
        f"(a {share['text_prompt_tokens']}-token text prompt {1000 * share['text_ttft_s']:.0f} ms, the "
        f"{share['image_prompt_tokens']}-token image prompt {1000 * share['image_ttft_s']:.0f} ms).",
        "",
        "| visual tokens | prompt tokens | KV blocks / request | clients | requests/s | vs unpatched "
        "| TTFT p50 (ms) | TTFT p95 (ms) | server CPU s / request |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def spread(figure: dict, scale: float = 1.0, digits: int = 2) -> str:
        median, low, high = (scale * figure[key] for key in ("median", "min", "max"))
        return f"{median:.{digits}f} [{low:.{digits}f}-{high:.{digits}f}]"

    for clients in clients_levels:
        base = rows[0]["cells"][str(clients)]
        for row in rows:
            cell = row["cells"][str(clients)]
            ratio = cell["requests_per_s"]["median"] / base["requests_per_s"]["median"]
            versus = (
                "1.00x" if row is rows[0] else f"{ratio:.2f}x" + ("" if separated(cell, base) else " (within spread)")
            )
            lines.append(
                f"| {row['label']} | {row['prompt_tokens']} | {row['kv_blocks_per_request']} (of {row['block_size']}) "
                f"| {clients} | {spread(cell['requests_per_s'])} | {versus} | {spread(cell['ttft_p50_s'], 1000, 0)} "
                f"| {spread(cell['ttft_p95_s'], 1000, 0)} | {spread(cell['server_cpu_s_per_request'], 1, 3)} |"
            )
    lines += ["", *(f"- {sentence}" for sentence in stops_paying(rows, clients_levels))]
    return "\n".join(lines) + "\n"


def machine(dtype: str) -> dict[str, Any]:
    import vllm

    from pitome_mllm.tools.profiling.machine import machine_info

    info = machine_info("cuda" if has_gpu() and _torch_cuda() else "cpu")
    return {**info, "vllm": vllm.__version__, "python": platform.python_version(), "dtype": dtype}


def _torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# ----------------------------------------------------------------------------------------------------- run


def load_order(settings_count: int, pass_index: int, level_index: int) -> list[int]:
    """The servers' order for one load: reversed every other time, so none is always first or last."""
    order = list(range(settings_count))
    return order[::-1] if (pass_index + level_index) % 2 else order


def measure_llm_share(server: Server, image_url: str, text_words: int, repeats: int = 3) -> dict:
    """TTFT alone of the image prompt and of a text-only prompt of the same length, on ``server``."""

    async def alone(messages: list[dict]) -> list[dict]:
        return [(await run_load(server, [messages], 1, 1)) for _ in range(repeats)]

    image = asyncio.run(alone(image_messages(image_url)))
    text = asyncio.run(alone(text_messages(text_words)))
    image_ttft = statistics.median(run["ttft_p50_s"] for run in image)
    text_ttft = statistics.median(run["ttft_p50_s"] for run in text)
    return {
        "image_prompt_tokens": image[0]["prompt_tokens"][0],
        "text_prompt_tokens": text[0]["prompt_tokens"][0],
        "image_ttft_s": image_ttft,
        "text_ttft_s": text_ttft,
        "share": text_ttft / image_ttft,
    }


def run(args: argparse.Namespace) -> dict:
    from tqdm import tqdm

    from pitome_mllm.assets import load_image

    family = FAMILIES[args.family]
    model = args.model or str(local_model(args.family))
    settings_list: list[dict | None] = [None] + [{"target_tokens": k, "preset": args.preset} for k in args.budgets]
    labels = ["unpatched"] + [str(k) for k in args.budgets]
    photos = [load_image(name) for name in PHOTOS]
    loads = [max(args.min_requests, clients) for clients in args.clients]
    per_pass = sum(loads)
    # Every request of one server gets an image no earlier request of it had; the servers get the same images.
    urls = [data_url(distinct_image(photos, i, family.image_size)) for i in range(per_pass * args.passes + 8)]
    runs: dict[tuple[int, int], list[dict]] = {}
    shares = []
    with ExitStack() as stack:
        logs = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vllm_bench_")))
        servers = []
        for label, settings in zip(labels, settings_list, strict=True):
            servers.append(start_server(label, settings, model, family, args, logs))
            stack.callback(servers[-1].stop)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        from pitome_mllm.testing.servers import wait_until_healthy

        for server in tqdm(servers, desc="starting servers", unit="server"):
            wait_until_healthy(server.url, server.process, server.log, deadline)
        blocks = [block_size(server) for server in servers]
        warm_up = [image_messages(url) for url in urls[-8:-6]]  # unmeasured; gives each server's prompt length
        prompt_tokens = [
            single(asyncio.run(run_load(server, warm_up, 2, args.output_tokens))["prompt_tokens"], server.label)
            for server in servers
        ]
        text_words = matching_text_words(servers[0], prompt_tokens[0])
        progress = tqdm(total=args.passes * len(args.clients) * len(servers), desc="loads", unit="load")
        for pass_index in range(args.passes):
            offset = pass_index * per_pass
            for level_index, (clients, count) in enumerate(zip(args.clients, loads, strict=True)):
                requests = [image_messages(url) for url in urls[offset : offset + count]]
                offset += count
                for index in load_order(len(servers), pass_index, level_index):
                    result = asyncio.run(run_load(servers[index], requests, clients, args.output_tokens))
                    runs.setdefault((index, clients), []).append(result)
                    progress.update()
            shares.append(measure_llm_share(servers[0], urls[-5 - pass_index % 3], text_words))
        progress.close()
    rows = []
    for index, (label, settings) in enumerate(zip(labels, settings_list, strict=True)):
        tokens_per_request = prompt_tokens[index] + args.output_tokens
        rows.append(
            {
                "label": label,
                "settings": settings,
                "prompt_tokens": prompt_tokens[index],
                "block_size": blocks[index],
                "kv_tokens_per_request": tokens_per_request,
                "kv_blocks_per_request": math.ceil(tokens_per_request / blocks[index]),
                "cells": {str(clients): summary(runs[(index, clients)]) for clients in args.clients},
            }
        )
    # The prompts' lengths are the same in every pass; the times are medians over passes.
    share = {key: statistics.median(one[key] for one in shares) for key in ("image_ttft_s", "text_ttft_s", "share")}
    share.update(
        image_prompt_tokens=shares[0]["image_prompt_tokens"], text_prompt_tokens=shares[0]["text_prompt_tokens"]
    )
    return {
        "family": args.family,
        "model": model,
        "dtype": args.dtype,
        "output_tokens": args.output_tokens,
        "passes": args.passes,
        "clients": args.clients,
        "requests_per_load": loads,
        "llm_share": share,
        "llm_share_passes": shares,
        "rows": rows,
        "machine": machine(args.dtype),
    }


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(FAMILIES), default="llava-1.5")
    parser.add_argument(
        "--model", help="checkpoint folder or hub name (default: the family's random model, built locally)"
    )
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--budgets", type=int, nargs="+", default=[192, 128, 64], help="target_tokens to compare")
    parser.add_argument("--preset", default="reference")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 32], help="concurrent clients per load")
    parser.add_argument("--min-requests", type=int, default=8, help="requests per load (at least one per client)")
    parser.add_argument("--output-tokens", type=int, default=16)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--vllm-args", default="", help="more `vllm serve` options, as one string")
    parser.add_argument("--output", type=Path, help="JSON file (default: results/vllm_concurrency_FAMILY_cpu|gpu.json)")
    args = parser.parse_args(argv)
    for name in ("clients", "budgets"):
        bad = [value for value in getattr(args, name) if value < 1]
        if bad:
            parser.error(f"--{name}: {bad[0]} is not a positive count")
    if args.passes < 1 or args.min_requests < 1 or args.output_tokens < 1:
        parser.error("--passes, --min-requests and --output-tokens must be at least 1")
    if args.output is None:
        args.output = RESULTS / f"vllm_concurrency_{args.family}_{'gpu' if has_gpu() else 'cpu'}.json"
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    result = run(args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1))
    table = markdown(result)
    args.output.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
