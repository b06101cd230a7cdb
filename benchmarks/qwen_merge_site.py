"""Where merging pays on Qwen-VL: the tower, the merged-grid stage and the language model's prefill, timed apart.

Real shapes, random weights, on CPU (the cost of a token count does not depend on the weights):

* the vision tower with its patch merger (``get_image_features`` of the unpatched model), one image;
* the merged-grid stage of the patch (`pitome_mllm.merge.sequence.reduce_image_tokens`) alone, on that
  image's ``[N, D]`` merged tokens, per method and budget;
* the language model's prefill for ``K`` visual + ``--text-tokens`` text tokens: ``--llm-layers`` decoder
  layers of the released width are built and timed, and the time is scaled to the released depth (a
  7B model's 28 layers do not fit in fp32 next to everything else on a small machine; the layers are
  identical, so the time scales with their number).

From these: time to first token (tower + stage + prefill) per budget, and the tower's share of it,
which bounds what merging inside the tower could save. Prints a table and writes
``<stem>.json`` / ``<stem>.md`` under ``--output`` with the machine and the load average.

    python benchmarks/qwen_merge_site.py                         # Qwen2.5-VL-7B shapes, a 448 x 448 image
    python benchmarks/qwen_merge_site.py --arch qwen3-vl-8b --image-size 512
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("pitome", "tome", "random", "divprune")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="qwen2.5-vl-7b", help="qwen2.5-vl-7b (default) or qwen3-vl-8b")
    parser.add_argument("--image-size", type=int, default=448, help="side of the square image in pixels (448)")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.5, 0.25, 0.125, 0.0625])
    parser.add_argument("--text-tokens", type=int, default=64, help="text tokens of the prompt (64)")
    parser.add_argument("--llm-layers", type=int, default=2, help="decoder layers built and timed (2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per cell (3)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (2)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--stem", default=None, help="file stem (default qwen_merge_site_<arch>_cpu)")
    return parser.parse_args(argv)


def timed_ms(run) -> float:
    start = time.perf_counter()
    run()
    return (time.perf_counter() - start) * 1e3


def best_ms(run, repeats: int) -> tuple[float, float]:
    """``(fastest, median)`` in ms of ``repeats`` calls after one untimed call.

    The fastest pass is the one least slowed by other work on a shared machine; the median says how much
    the load moved the rest.
    """
    run()
    times = [timed_ms(run) for _ in range(repeats)]
    return min(times), statistics.median(times)


def build(arch: str, image_size: int):
    """``(vision model, processor, pixel inputs)`` of ``arch`` with the language model left on meta."""
    from PIL import Image

    from pitome_mllm.zoo.architectures import build_arch

    model, processor = build_arch(f"{arch}-vision")
    image = Image.new("RGB", (image_size, image_size), (90, 140, 200))
    inputs = processor(images=[image], text=["<|vision_start|><|image_pad|><|vision_end|>"], return_tensors="pt")
    return model, processor, inputs


def language_model_prefills(arch: str, layers: int, sequences: list[int], repeats: int) -> tuple[dict, int]:
    """``({sequence: (fastest ms, median ms)}, released depth)`` of prefills, scaled from ``layers`` built layers.

    The sequence lengths are timed in turn within each repeat, so load on a shared machine hits them alike.
    """
    from pitome_mllm.zoo.architectures import arch_config, get_arch

    config = arch_config(get_arch(arch)).text_config
    depth = config.num_hidden_layers
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    text_model = _text_model_class(arch)._from_config(config).eval()

    def prefill(sequence: int):
        embeds = torch.randn(1, sequence, config.hidden_size)
        positions = torch.arange(sequence).view(1, 1, -1).expand(3, 1, -1)

        def run():
            with torch.no_grad():
                text_model(inputs_embeds=embeds, position_ids=positions, use_cache=False)

        return run

    runs = {sequence: prefill(sequence) for sequence in sequences}
    for run in runs.values():
        run()
    times: dict[int, list[float]] = {sequence: [] for sequence in sequences}
    for _ in range(repeats):
        for sequence, run in runs.items():
            times[sequence].append(timed_ms(run) * depth / layers)
    return {sequence: (min(t), statistics.median(t)) for sequence, t in times.items()}, depth


def _text_model_class(arch: str):
    if arch.startswith("qwen3"):
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextModel

        return Qwen3VLTextModel
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLTextModel

    return Qwen2_5_VLTextModel


def machine() -> dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        "logical_cpus": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "load_average": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from pitome_mllm.merge.budget import StepParams
    from pitome_mllm.merge.sequence import reduce_image_tokens
    from pitome_mllm.models.qwen_vl import qwen_core

    load_before = os.getloadavg()
    model, _, inputs = build(args.arch, args.image_size)
    core = qwen_core(model)

    def tower():
        with torch.no_grad():
            return core.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])

    tower_ms, tower_median = best_ms(tower, args.repeats)
    output = tower()
    tokens = (output.pooler_output if hasattr(output, "pooler_output") else output)[0]
    native = tokens.shape[0]
    print(f"{args.arch}: {args.image_size}x{args.image_size} image, {native} native tokens; tower {tower_ms:.0f} ms")

    rows = []
    budgets = [native] + [max(1, round(native * fraction)) for fraction in args.fractions]
    prefills, depth = language_model_prefills(
        args.arch, args.llm_layers, [kept + args.text_tokens for kept in budgets], args.repeats
    )
    for kept in budgets:
        for method in METHODS if kept < native else ("unpatched",):
            if method == "unpatched":
                stage_ms = stage_median = 0.0
            else:
                step = StepParams(method=method if method in ("pitome", "tome") else "pitome")

                def stage(method=method, kept=kept, step=step):
                    with torch.no_grad():
                        reduce_image_tokens(tokens, kept, method, step)

                stage_ms, stage_median = best_ms(stage, args.repeats)
            prefill_ms, prefill_median = prefills[kept + args.text_tokens]
            ttft = tower_ms + stage_ms + prefill_ms
            rows.append(
                {
                    "method": method,
                    "visual_tokens": kept,
                    "tower_ms": round(tower_ms, 1),
                    "stage_ms": round(stage_ms, 2),
                    "stage_median_ms": round(stage_median, 2),
                    "prefill_ms": round(prefill_ms, 1),
                    "prefill_median_ms": round(prefill_median, 1),
                    "ttft_ms": round(ttft, 1),
                    "tower_share": round(tower_ms / ttft, 3),
                }
            )
            print(
                f"  {method:>9} K={kept:>4}: stage {stage_ms:7.2f} ms  prefill {prefill_ms:8.0f} ms "
                f"(x{depth} layers)  TTFT {ttft:8.0f} ms  tower share {tower_ms / ttft:.0%}"
            )
    result = {
        "arch": args.arch,
        "image_size": args.image_size,
        "native_tokens": native,
        "text_tokens": args.text_tokens,
        "tower_ms": round(tower_ms, 1),
        "tower_median_ms": round(tower_median, 1),
        "llm_layers_timed": args.llm_layers,
        "rows": rows,
        "machine": {**machine(), "load_average_before": load_before},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    args.output.mkdir(parents=True, exist_ok=True)
    stem = args.stem or f"qwen_merge_site_{args.arch}_cpu"
    (args.output / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.output / f"{stem}.md").write_text(markdown(result))
    print(f"wrote {args.output / stem}.json and .md")
    return 0


def markdown(result: dict) -> str:
    head = (
        f"{result['arch']}, one {result['image_size']}x{result['image_size']} image ({result['native_tokens']} native "
        f"tokens) + {result['text_tokens']} text tokens; tower {result['tower_ms']} ms "
        f"(median {result['tower_median_ms']}); fastest of the timed passes; load average before "
        f"{result['machine']['load_average_before']}, "
        f"after {result['machine']['load_average']}; {result['date']}\n\n"
        "| method | visual tokens | stage ms | prefill ms (scaled) | TTFT ms | tower share |\n"
        "|---|---:|---:|---:|---:|---:|\n"
    )
    lines = [
        f"| {row['method']} | {row['visual_tokens']} | {row['stage_ms']} | {row['prefill_ms']} "
        f"(median {row['prefill_median_ms']}) | {row['ttft_ms']} | {row['tower_share']:.0%} |"
        for row in result["rows"]
    ]
    return head + "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
