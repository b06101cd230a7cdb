"""Run a tiny LLaVA through vLLM (CPU build) with the plugin, and write what it saw and answered.

The tests compare these runs with transformers patched the same way; each run is its own
process (``python -m pitome_mllm.testing.vllm_runs MODEL_DIR OUTPUT.json --settings JSON``),
because a vLLM engine holds process-wide state (its distributed group) after shutdown.

The requests (`REQUESTS`) are plain data, so the comparing side builds the same prompts and images:
one image; two images in one prompt; a batch of three prompts with different images.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..zoo.tiny import IMAGE_TOKEN, load_image


@dataclass(frozen=True)
class Request:
    """One prompt: ``text`` holds one `IMAGE_TOKEN` per name in ``images`` (bundled photographs).

    ``sizes``: each image resized to ``(width, height)`` first (empty: as bundled), for models whose
    count depends on the image size (anyres).
    """

    name: str
    text: str
    images: tuple[str, ...]
    sizes: tuple[tuple[int, int], ...] = ()

    def load_images(self) -> list:
        images = [load_image(name) for name in self.images]
        if self.sizes:
            images = [image.resize(size) for image, size in zip(images, self.sizes, strict=True)]
        return images


REQUESTS: tuple[Request, ...] = (
    Request("single", f"USER: {IMAGE_TOKEN}\nDescribe this photo. ASSISTANT:", ("astronaut",)),
    Request("two_images", f"USER: {IMAGE_TOKEN}\n{IMAGE_TOKEN}\nWhat differs? ASSISTANT:", ("chelsea", "coffee")),
    Request("batch_0", f"USER: {IMAGE_TOKEN}\nWho is this? ASSISTANT:", ("astronaut",)),
    Request("batch_1", f"USER: {IMAGE_TOKEN}\nWhat is the cat doing? ASSISTANT:", ("chelsea",)),
    Request("batch_2", f"USER: {IMAGE_TOKEN}\nWhat is in the image? ASSISTANT:", ("coffee",)),
)
# LLaVA-NeXT: sizes that pick different crop grids (2x2, 2x1, 1x3) and a small image, two images in one prompt.
ANYRES_REQUESTS: tuple[Request, ...] = (
    Request("single", f"USER: {IMAGE_TOKEN}\nDescribe this photo. ASSISTANT:", ("astronaut",), ((336, 336),)),
    Request(
        "two_images",
        f"USER: {IMAGE_TOKEN}\n{IMAGE_TOKEN}\nWhat differs? ASSISTANT:",
        ("chelsea", "coffee"),
        ((200, 300), (400, 150)),
    ),
    Request("batch_0", f"USER: {IMAGE_TOKEN}\nWho is this? ASSISTANT:", ("astronaut",), ((150, 90),)),
    Request("batch_1", f"USER: {IMAGE_TOKEN}\nWhat is the cat doing? ASSISTANT:", ("chelsea",), ((200, 300),)),
    Request("batch_2", f"USER: {IMAGE_TOKEN}\nWhat is in the image? ASSISTANT:", ("coffee",), ((400, 150),)),
)
# Qwen2.5-VL: three sizes giving merged grids of 4 x 4, 11 x 7 and 5 x 10 cells (tiny processor), two images in one
# prompt, each image's placeholder in Qwen's own form.
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


def qwen_prompt(question: str, images: int = 1) -> str:
    return f"<|im_start|>user\n{QWEN_IMAGE * images}{question}<|im_end|>\n<|im_start|>assistant\n"


QWEN_REQUESTS: tuple[Request, ...] = (
    Request("single", qwen_prompt("Describe this photo."), ("astronaut",), ((112, 112),)),
    Request("two_images", qwen_prompt("What differs?", 2), ("chelsea", "coffee"), ((200, 300), (280, 140))),
    Request("batch_0", qwen_prompt("Who is this?"), ("astronaut",), ((200, 300),)),
    Request("batch_1", qwen_prompt("What is the cat doing?"), ("chelsea",), ((280, 140),)),
    Request("batch_2", qwen_prompt("What is in the image?"), ("coffee",), ((112, 112),)),
)
REQUEST_SETS = {"llava": REQUESTS, "anyres": ANYRES_REQUESTS, "qwen": QWEN_REQUESTS}
# Engine arguments per request set: the plugin serves Qwen-VL images only, so videos are switched off.
REQUEST_SET_ENGINE: dict[str, dict[str, Any]] = {"qwen": {"limit_mm_per_prompt": {"image": 2, "video": 0}}}
TOP_LOGPROBS = 5
MAX_NEW_TOKENS = 4


# The engine the tests start: a tiny model in this process on the CPU, small batches, fp32.
TINY_CPU_ENGINE: dict[str, Any] = {
    "dtype": "float32",
    "max_model_len": 1024,
    "enforce_eager": True,
    "max_num_seqs": 4,
    "max_num_batched_tokens": 2048,
    "distributed_executor_backend": "uni",
}


def engine_kwargs(
    model_dir: str | Path,
    settings: dict[str, Any] | None,
    max_images: int = 2,
    *,
    tiny_cpu: bool = True,
    **overrides: Any,
) -> dict[str, Any]:
    """`vllm.LLM` arguments for ``model_dir`` with PiToMe ``settings`` (or none), seeded.

    ``tiny_cpu``: start from `TINY_CPU_ENGINE` (the tests' engine); ``overrides`` replace or add
    any other `vllm.LLM` argument (a benchmark's dtype, context length, caching), and
    ``settings`` always land in ``hf_overrides``, where the plugin reads them.
    """
    kwargs: dict[str, Any] = {"model": str(model_dir), "limit_mm_per_prompt": {"image": max_images}, "seed": 0}
    if tiny_cpu:
        kwargs.update(TINY_CPU_ENGINE)
    kwargs.update(overrides)
    if settings is not None:
        kwargs["hf_overrides"] = {"pitome": settings}
    return kwargs


def save_tiny_qwen2_vl(folder: str | Path, seed: int = 0) -> Path:
    """A random 2-layer Qwen2-VL (64 wide, 2-block tower) saved to ``folder``: a multimodal checkpoint vLLM
    serves and the plugin does not merge in. Weights and config only (no tokenizer): the plugin refuses a
    ``pitome`` key when vLLM resolves the architecture, before any tokenizer is read.
    """
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    rope = {"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 10000.0}
    text = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2}
    text |= {"num_key_value_heads": 1, "vocab_size": 512, "max_position_embeddings": 1024, "rope_parameters": rope}
    vision = {"depth": 2, "embed_dim": 64, "hidden_size": 64, "num_heads": 2, "mlp_ratio": 2}
    vision |= {"patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}
    config = Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=500,
        video_token_id=501,
        vision_start_token_id=502,
        vision_end_token_id=503,
        bos_token_id=None,
        eos_token_id=None,
    )
    torch.manual_seed(seed)
    Qwen2VLForConditionalGeneration(config).save_pretrained(folder)
    return Path(folder)


def model_config_error(model_dir: str | Path, settings: dict[str, Any] | None) -> str | None:
    """The error vLLM's engine start gives when it resolves ``model_dir``'s architecture (None: it resolves).

    This is the first step of `vllm.LLM` (``EngineArgs.create_model_config``), where the plugin's
    architecture guard runs; nothing is loaded or allocated.
    """
    single_process_environment()
    from vllm.engine.arg_utils import EngineArgs

    kwargs = engine_kwargs(model_dir, settings, skip_tokenizer_init=True)
    kwargs.pop("limit_mm_per_prompt")
    try:
        EngineArgs(**kwargs).create_model_config()
    except Exception as error:  # noqa: BLE001  (the caller asserts on the message)
        return f"{type(error).__name__}: {error}"
    return None


def engine_start_error(model_dir: str | Path, settings: dict[str, Any] | None) -> str | None:
    """The error `vllm.LLM` raises when started on ``model_dir`` with ``settings`` (None: it started)."""
    single_process_environment()
    from vllm import LLM

    try:
        LLM(**engine_kwargs(model_dir, settings, skip_tokenizer_init=True))
    except Exception as error:  # noqa: BLE001  (the caller asserts on the message)
        return f"{type(error).__name__}: {error}"
    return None


def single_process_environment() -> None:
    """Run vLLM's engine core in this process with a small KV cache (unless the caller chose otherwise)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def drop_last_embedding(model) -> None:
    """Hand on one token too few per image: a merge gone wrong, for the count check's test.

    LLaVA-1.5: the projector's output; LLaVA-NeXT: each packed (and merged) image, since the
    projector's output must keep whole crops for the packing; Qwen-VL: each reduced image.
    """
    if hasattr(model, "pitome_reduce"):  # Qwen-VL: each reduced image
        reduce = model.pitome_reduce

        def reduce_one_short(*args, **kwargs):
            image = reduce(*args, **kwargs)
            return dataclasses.replace(image, tokens=image.tokens[:-1])

        model.pitome_reduce = reduce_one_short
        return
    if hasattr(model, "_merge_image_patch_embeddings"):
        pack = model._merge_image_patch_embeddings
        model._merge_image_patch_embeddings = lambda *args, **kwargs: pack(*args, **kwargs)[:-1]
        return
    model.multi_modal_projector.register_forward_hook(lambda module, args, output: output[:, :-1])


def keep_first_cells_positions(model) -> None:
    """Leave every kept Qwen-VL image token at its first-K numbering (positions gone wrong, for the tolerance's
    test: the log-probabilities must then leave it)."""
    model.pitome_move_positions = lambda *args, **kwargs: None


def save_tiny_llava_next(folder: str | Path, spec=None) -> Path:
    """A tiny random LLaVA-NeXT (`pitome_mllm.zoo.tiny.build_tiny_llava_next`, 112 px crops and LLaVA-NeXT's
    crop grids, head size 32 for vLLM's CPU attention) with its processor, saved as vLLM loads it."""
    from ..zoo.tiny import VLLM_TEST_SPEC, build_tiny_llava_next, rename_tower_weights_to_hub_layout

    folder = Path(folder)
    model, processor = build_tiny_llava_next(spec or VLLM_TEST_SPEC)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    rename_tower_weights_to_hub_layout(folder / "model.safetensors")
    return folder


def run_requests(
    model_dir: str | Path,
    settings: dict[str, Any] | None,
    break_counts: bool = False,
    requests: tuple[Request, ...] = REQUESTS,
    engine: dict[str, Any] | None = None,
    break_positions: bool = False,
) -> dict[str, Any]:
    """Start an engine, send every request of ``requests`` in one batch, return what came back.

    ``break_counts``: `drop_last_embedding` first (the run must then fail with the plugin's count error).
    ``engine``: further `vllm.LLM` arguments (`engine_kwargs`'s overrides).
    ``break_positions``: `keep_first_cells_positions` first (Qwen-VL).

    Returns:
        ``{"startup_s", "requests": {name: {"prompt_token_ids", "token_ids", "top_logprobs"}}}``;
        ``top_logprobs`` maps the first answer token's most likely ids (as strings) to log-probabilities.
    """
    single_process_environment()
    from vllm import LLM, SamplingParams

    started = time.perf_counter()
    llm = LLM(**engine_kwargs(model_dir, settings, **(engine or {})))
    startup_s = time.perf_counter() - started
    if break_counts:
        llm.apply_model(drop_last_embedding)
    if break_positions:
        llm.apply_model(keep_first_cells_positions)
    prompts = [{"prompt": request.text, "multi_modal_data": {"image": request.load_images()}} for request in requests]
    sampling = SamplingParams(max_tokens=MAX_NEW_TOKENS, temperature=0.0, logprobs=TOP_LOGPROBS)
    outputs = llm.generate(prompts, sampling, use_tqdm=False)
    results = {}
    for request, output in zip(requests, outputs, strict=True):
        completion = output.outputs[0]
        results[request.name] = {
            "prompt_token_ids": list(output.prompt_token_ids),
            "token_ids": list(completion.token_ids),
            "top_logprobs": {str(token): entry.logprob for token, entry in completion.logprobs[0].items()},
        }
    return {"startup_s": startup_s, "settings": settings, "requests": results}


def run_vllm_engine(model_dir: Path, settings: dict | None, *extra: str, requests: str = "llava"):
    """This module run on ``model_dir`` in a subprocess (a fresh engine per run), as the vLLM tests need it.

    Returns the ``subprocess.CompletedProcess``; its ``output_file`` is the JSON the run wrote.
    """
    key = json.dumps([requests, settings, extra], sort_keys=True)
    output = Path(model_dir).parent / f"run_{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    command = [sys.executable, "-m", "pitome_mllm.testing.vllm_runs", str(model_dir), str(output)]
    command += ["--requests", requests, "--settings", json.dumps(settings), *extra]
    process = subprocess.run(command, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    process.output_file = output
    return process


class EngineResults:
    """The result of each named setting's engine run on each model folder, run once per test session.

    Args:
        settings: ``{name: PiToMe settings (None: unpatched)}``.
        requests: the request set every run sends (`REQUEST_SETS`).
    """

    def __init__(self, settings: dict[str, dict | None], requests: str = "llava") -> None:
        self.settings = settings
        self.requests = requests
        self._results: dict[tuple[str, str], dict] = {}

    def __call__(self, model_dir: Path, name: str) -> dict:
        key = (str(model_dir), name)
        if key not in self._results:
            process = run_vllm_engine(model_dir, self.settings[name], requests=self.requests)
            assert process.returncode == 0, process.stderr[-4000:]
            self._results[key] = json.loads(process.output_file.read_text())
        return self._results[key]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("output", help="JSON file to write")
    parser.add_argument("--settings", default="null", help="the hf_overrides['pitome'] value, as JSON (null: none)")
    parser.add_argument("--break-counts", action="store_true", help="drop one embedding per image (must fail)")
    parser.add_argument("--requests", choices=sorted(REQUEST_SETS), default="llava", help="which prompts to send")
    parser.add_argument("--engine", default="{}", help="further vllm.LLM arguments, as JSON")
    parser.add_argument(
        "--break-positions", action="store_true", help="leave Qwen-VL image tokens at their first-K positions"
    )
    args = parser.parse_args(argv)
    engine = REQUEST_SET_ENGINE.get(args.requests, {}) | json.loads(args.engine)
    requests = REQUEST_SETS[args.requests]
    settings = json.loads(args.settings)
    result = run_requests(args.model_dir, settings, args.break_counts, requests, engine, args.break_positions)
    Path(args.output).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
