"""Offline vLLM throughput of LLaVA unpatched and with PiToMe at several visual-token budgets, in one run.

For each setting (unpatched, then ``target_tokens`` = each budget) one engine is started in its own
process with the same engine arguments, and measures:

- offline throughput: ``--requests`` image prompts sent at once, each answering exactly
  ``--output-tokens`` tokens (``ignore_eos``): requests/s and output tokens/s over the whole batch;
- time to first token: of one request sent alone (median of ``--ttft-repeats``), and the mean over the
  batch (which includes queueing);
- KV cache per request: prompt and answer tokens, and the blocks vLLM allocates for them
  (``ceil(tokens / block_size)``).

CPU (no download; a small LLaVA-shaped random model is built and saved locally):

    .venv-vllm/bin/python benchmarks/vllm_throughput.py

GPU, LLaVA-1.5-7B (any local or hub checkpoint of llava-hf/llava-1.5-7b-hf's layout):

    python benchmarks/vllm_throughput.py --model llava-hf/llava-1.5-7b-hf --dtype float16 \\
        --requests 256 --output-tokens 64 --budgets 192 128 64 --engine-args '{"max_num_seqs": 64}'

Writes ``--output`` (JSON with the machine and every figure) and the same name with ``.md`` (the table).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_OUTPUT = Path(__file__).parent / "results" / "vllm_throughput_cpu.json"
PROMPT = "USER: <image>\nDescribe this photo in detail. ASSISTANT:"
IMAGES = ("astronaut", "chelsea", "coffee")


def small_llava_folder(folder: Path) -> Path:
    """A random LLaVA-1.5 with CLIP ViT-L/14-336 geometry (577 tokens, 24 layers) at small widths."""
    from pitome_mllm.zoo.tiny import TinyLlavaSpec, save_tiny_llava

    spec = TinyLlavaSpec(
        vision_hidden=128,
        vision_heads=4,
        vision_intermediate=512,
        text_hidden=256,
        text_layers=4,
        text_heads=8,
        text_intermediate=1024,
    )
    if not (folder / "model.safetensors").is_file():
        save_tiny_llava(folder, spec, hub_layout=True)
    return folder


def distinct_image(images: list, index: int):
    """Image ``index``: a bundled photo cropped by a window no other index uses.

    vLLM caches processed images and encoder outputs by content, so a repeated image would skip the
    vision tower (and, with prefix caching, the prefill) and the comparison would not measure them.
    """
    image = images[index % len(images)]
    shift = index // len(images)
    left, top = shift % 17, shift // 17
    return image.crop((left, top, image.width - 17 + left, image.height - 17 + top))


def has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def engine_arguments(args: argparse.Namespace, settings: dict | None) -> dict[str, Any]:
    from pitome_mllm.testing.vllm_runs import engine_kwargs

    overrides: dict[str, Any] = {
        "dtype": args.dtype,
        "max_model_len": 2048,
        "disable_log_stats": False,  # per-request first-token latency
        # Every request has an image of its own (`distinct_image`); no cache may still serve one twice.
        "enable_prefix_caching": False,
        "mm_processor_cache_gb": 0,
    }
    if not has_gpu():
        # vLLM's CPU build: no graph compilation, the engine in this process (starts in seconds, not minutes).
        overrides.update(enforce_eager=True, distributed_executor_backend="uni")
    overrides.update(json.loads(args.engine_args))
    return engine_kwargs(args.model, settings, max_images=1, tiny_cpu=False, **overrides)


def measure(args: argparse.Namespace, settings: dict | None) -> dict[str, Any]:
    """One engine: TTFT alone, then the offline batch (runs in a process of its own)."""
    from vllm import LLM, SamplingParams

    from pitome_mllm.zoo.tiny import load_image

    started = time.perf_counter()
    llm = LLM(**engine_arguments(args, settings))
    startup_s = time.perf_counter() - started
    block_size = llm.llm_engine.vllm_config.cache_config.block_size
    images = [load_image(name) for name in IMAGES]
    sampling = SamplingParams(max_tokens=args.output_tokens, temperature=0.0, ignore_eos=True)

    def request(i: int) -> dict:
        return {"prompt": PROMPT, "multi_modal_data": {"image": distinct_image(images, i)}}

    first_batch_index = args.ttft_repeats + 1  # indices never repeat across the phases
    llm.generate([request(0)], sampling, use_tqdm=False)  # warm-up
    alone, alone_cpu = [], []
    for i in range(1, first_batch_index):
        cpu_begun = time.process_time()
        (output,) = llm.generate([request(i)], SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)
        alone_cpu.append(time.process_time() - cpu_begun)
        alone.append(output.metrics.first_token_latency)
    batch = [request(first_batch_index + i) for i in range(args.requests)]
    begun, cpu_begun = time.perf_counter(), time.process_time()
    outputs = llm.generate(batch, sampling, use_tqdm=False)
    elapsed, cpu_elapsed = time.perf_counter() - begun, time.process_time() - cpu_begun
    output_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    prompt_tokens = len(outputs[0].prompt_token_ids)
    tokens_per_request = prompt_tokens + args.output_tokens
    return {
        "settings": settings,
        "startup_s": startup_s,
        "prompt_tokens": prompt_tokens,
        "requests": args.requests,
        "batch_s": elapsed,
        "requests_per_s": args.requests / elapsed,
        "output_tokens_per_s": output_tokens / elapsed,
        "ttft_alone_s": statistics.median(alone),
        # CPU seconds this process used (engine, workers and tower all run in it on the CPU build): the work
        # itself, much less sensitive than wall-clock time to other processes sharing the cores.
        "prefill_alone_cpu_s": statistics.median(alone_cpu),
        "batch_cpu_s_per_request": cpu_elapsed / args.requests,
        "ttft_batch_mean_s": statistics.fmean(o.metrics.first_token_latency for o in outputs),
        "kv_tokens_per_request": tokens_per_request,
        "block_size": block_size,
        "kv_blocks_per_request": math.ceil(tokens_per_request / block_size),
    }


TIMED = (
    "startup_s",
    "batch_s",
    "requests_per_s",
    "output_tokens_per_s",
    "ttft_alone_s",
    "ttft_batch_mean_s",
    "prefill_alone_cpu_s",
    "batch_cpu_s_per_request",
)


def median_run(passes: list[dict]) -> dict:
    """One setting's figures: the median over passes of every timed figure (the rest is the same in each)."""
    row = dict(passes[0])
    for key in TIMED:
        row[key] = statistics.median(run[key] for run in passes)
        row[f"{key}_passes"] = [run[key] for run in passes]
    return row


def machine() -> dict[str, Any]:

    import vllm

    from pitome_mllm.tools.profiling.machine import machine_info

    device = "cuda" if has_gpu() else "cpu"
    return {**machine_info(device), "vllm": vllm.__version__, "python": platform.python_version()}


def markdown(results: list[dict], info: dict) -> str:
    base = results[0]
    lines = [
        f"vLLM {info['vllm']} on {info.get('gpu') or info['cpu']} ({info['cpus_available']} CPUs available), "
        f"torch {info.get('torch')}; model {Path(info['model']).name}, dtype {info['dtype']}; "
        f"{base['requests']} requests x {info['output_tokens']} output tokens; median of {info['passes']} passes; "
        f"load average {info['load_average_1_5_15'][0]:.1f} at the end",
        "",
        "| visual tokens | prompt tokens | requests/s | output tok/s | vs unpatched | TTFT alone (ms) "
        "| TTFT in batch (ms) | CPU s / request (batch) | CPU s, one request to first token | KV blocks / request |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results:
        label = "unpatched" if row["settings"] is None else str(row["settings"]["target_tokens"])
        speedup = row["requests_per_s"] / base["requests_per_s"]
        lines.append(
            f"| {label} | {row['prompt_tokens']} | {row['requests_per_s']:.2f} | {row['output_tokens_per_s']:.1f} "
            f"| {speedup:.2f}x | {1000 * row['ttft_alone_s']:.0f} | {1000 * row['ttft_batch_mean_s']:.0f} "
            f"| {row['batch_cpu_s_per_request']:.3f} | {row['prefill_alone_cpu_s']:.3f} "
            f"| {row['kv_blocks_per_request']} (of {row['block_size']}) |"
        )
    return "\n".join(lines) + "\n"


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint folder or hub name (default: a small random LLaVA built locally)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--budgets", type=int, nargs="+", default=[192, 128, 64], help="target_tokens to compare")
    parser.add_argument("--preset", default="reference")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--output-tokens", type=int, default=16)
    parser.add_argument("--ttft-repeats", type=int, default=3)
    parser.add_argument(
        "--passes", type=int, default=2, help="runs of every setting, in alternating order (medians reported)"
    )
    parser.add_argument("--engine-args", default="{}", help="more vllm.LLM arguments, as JSON")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # one setting, run in this process
    parser.add_argument("--worker-output", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.worker is not None:
        args.worker_output.write_text(json.dumps(measure(args, json.loads(args.worker))))
        return
    from tqdm import tqdm

    if args.model is None:
        from pitome_mllm.zoo.real_tower import cache_dir

        args.model = str(small_llava_folder(cache_dir() / "vllm_small_llava"))
    settings_list = [None] + [{"target_tokens": k, "preset": args.preset} for k in args.budgets]
    runs: dict[str, list[dict]] = {json.dumps(settings): [] for settings in settings_list}
    environment = dict(os.environ)
    if not has_gpu():
        environment.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        environment.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        # Idle OpenMP threads sleep instead of spinning, so CPU seconds count work, not waiting for a busy core.
        environment.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # Alternating order, so that a machine growing busier or quieter does not favour one setting.
    order = [s for p in range(args.passes) for s in (settings_list if p % 2 == 0 else settings_list[::-1])]
    for settings in tqdm(order, desc="engines", unit="engine"):
        worker_output = args.output.with_suffix(".worker.json")
        command = [sys.executable, __file__, "--model", args.model, "--dtype", args.dtype]
        command += ["--requests", str(args.requests), "--output-tokens", str(args.output_tokens)]
        command += ["--ttft-repeats", str(args.ttft_repeats), "--engine-args", args.engine_args]
        command += ["--worker", json.dumps(settings), "--worker-output", str(worker_output)]
        subprocess.run(command, check=True, env=environment)
        runs[json.dumps(settings)].append(json.loads(worker_output.read_text()))
        worker_output.unlink()
    results = [median_run(runs[json.dumps(settings)]) for settings in settings_list]
    info = {**machine(), "model": args.model, "dtype": args.dtype, "output_tokens": args.output_tokens}
    info["passes"] = args.passes
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"machine": info, "results": results}, indent=1))
    table = markdown(results, info)
    args.output.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
