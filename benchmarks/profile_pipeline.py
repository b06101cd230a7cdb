"""The whole LLaVA pipeline at 64 / 128 / 192 / 576 visual tokens for none / tome / pitome.

Per configuration: vision tower (merges included), projector, LLM prefill, time to
first token, decode per token, peak memory per stage, KV-cache bytes after prefill and
analytic FLOPs. ``target_tokens`` sets the budget: ``tome`` / ``pitome`` merge in the
tower as far as the budget allows and a projector-stage PiToMe step lands exactly on it;
``none`` merges only at the projector. 576 tokens is the unpatched model.

Default: ``clip-l-336+1b`` (CLIP ViT-L/14-336 + a ~1B Llama) in fp32 on 2 CPU threads,
few repeats and few new tokens so it finishes in minutes. On a GPU, ``--gpu`` profiles the
LLaVA-1.5-7B shape in fp16. Weights are random: the cost of a token budget does not
depend on them. Results go to ``benchmarks/results/<stem>.{json,csv}`` and plots.

    python benchmarks/profile_pipeline.py                  # CPU
    python benchmarks/profile_pipeline.py --gpu            # llava-1.5-7b shape, fp16, CUDA
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
GPU_DEFAULTS = {"arch": "llava-1.5-7b", "device": "cuda", "dtype": "float16", "repeats": 10, "new_tokens": 32}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true", help=f"shortcut for {GPU_DEFAULTS}")
    parser.add_argument("--arch", default="clip-l-336+1b")
    parser.add_argument("--budgets", default="64,128,192,576")
    parser.add_argument("--methods", default="none,tome,pitome")
    parser.add_argument("--preset", default="reference")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (ignored on CUDA)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--stem", default=None, help="default: pipeline_<arch>_<device>_<dtype>")
    args = parser.parse_args(argv)
    if args.gpu:
        # Only the values left at their defaults follow the GPU preset.
        for name, value in GPU_DEFAULTS.items():
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
    return args


def main(argv: list[str] | None = None) -> int:
    import torch

    from pitome_mllm.cli.profile import native_visual_tokens, resolve_device
    from pitome_mllm.tools.profiling import ProfileSettings, plan_runs, profile, publish_report
    from pitome_mllm.zoo.architectures import build_arch

    args = parse_args(argv)
    device = resolve_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    model, processor = build_arch(args.arch, device=device, dtype=dtype)
    budgets = [int(value) for value in args.budgets.split(",")]
    methods = [value for value in args.methods.split(",") if value]
    runs = plan_runs(methods, budgets=budgets, native_tokens=native_visual_tokens(model), preset=args.preset)
    settings = ProfileSettings(
        batch_size=args.batch_size, new_tokens=args.new_tokens, repeats=args.repeats, warmup=args.warmup
    )
    report = profile(model, processor, runs, settings, source=f"{args.arch} (random weights)")
    stem = args.stem or f"pipeline_{args.arch}_{device.type}_{args.dtype}"
    publish_report(report, args.output, stem)
    return 0


if __name__ == "__main__":
    sys.exit(main())
