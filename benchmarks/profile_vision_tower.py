"""Vision tower of CLIP ViT-L/14-336 (LLaVA-1.5's) with PiToMe at the reference preset.

Profiles the unpatched tower and PiToMe at keep ratios 0.9, 0.925, 0.95, 0.975 (the
authors' released LLaVA schedule: bipartite matching on layers 0-12, PiToMe energy on
13-22, layer 23 skipped because LLaVA reads layer 22): latency of the tower and of the
projector, the merge steps' share of the tower, peak memory and analytic FLOPs.
Weights are random (``--arch clip-l-336``): the cost of a token budget does not depend on
them. Results go to ``benchmarks/results/<stem>.{json,csv}`` and ``<stem>_{latency,memory}.png``.

    python benchmarks/profile_vision_tower.py                          # CPU, 2 threads, fp32
    python benchmarks/profile_vision_tower.py --device cuda --dtype float16 --repeats 20
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="clip-l-336", help="architecture name (see pitome-mllm profile --help)")
    parser.add_argument("--keep-ratios", default="0.9,0.925,0.95,0.975")
    parser.add_argument("--methods", default="pitome", help="comma-separated: pitome, tome")
    parser.add_argument("--preset", default="reference")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (ignored on CUDA)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--stem", default=None, help="default: vision_tower_<arch>_<device>_<dtype>")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import torch

    from pitome_mllm.cli.profile import resolve_device
    from pitome_mllm.tools.profiling import ProfileSettings, plan_runs, profile, publish_report
    from pitome_mllm.zoo.architectures import build_arch

    args = parse_args(argv)
    device = resolve_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    model, processor = build_arch(args.arch, device=device, dtype=dtype)
    keep_ratios = [float(value) for value in args.keep_ratios.split(",")]
    methods = [value for value in args.methods.split(",") if value]
    runs = plan_runs(methods, budgets=[], keep_ratios=keep_ratios, preset=args.preset)
    settings = ProfileSettings(
        batch_size=args.batch_size, repeats=args.repeats, warmup=args.warmup, vision_only=True, new_tokens=1
    )
    report = profile(model, processor, runs, settings, source=f"{args.arch} (random weights)")
    stem = args.stem or f"vision_tower_{args.arch}_{device.type}_{args.dtype}"
    publish_report(report, args.output, stem)
    return 0


if __name__ == "__main__":
    sys.exit(main())
