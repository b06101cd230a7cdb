"""Time the baselines' selection step at LLaVA-1.5 size (CLIP ViT-L/14-336: 576 patches, width 1024, 16 heads).

Only the step itself (what `SelectionStage` adds on top of the unmerged tower), on random
tensors; prints the median of several runs per method and budget.

    python benchmarks/selection_cost.py [--repeats 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pitome_mllm.merge.select import (
    cls_attention,
    dominant_and_contextual,
    gather_tokens,
    pool_grid,
    pool_patches,
    random_keep_indices,
)

NUM_PATCHES, WIDTH, HEADS, GRID = 576, 1024, 16, (24, 24)


def step(method: str, budget: int, features: torch.Tensor, queries: torch.Tensor, keys: torch.Tensor) -> None:
    if method == "random":
        kept = random_keep_indices(NUM_PATCHES, budget, seed=0).expand(features.shape[0], -1)
        gather_tokens(features, kept)
    elif method == "pool":
        pool_patches(features, GRID, pool_grid(budget, GRID))
    else:
        attention = cls_attention(queries, keys, HEADS)[:, 1:]
        metric = keys[:, 1:].view(features.shape[0], NUM_PATCHES, HEADS, -1).mean(dim=2)
        dominant_and_contextual(features, attention, metric, budget)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(args.batch, NUM_PATCHES, WIDTH, generator=generator)
    queries = torch.randn(args.batch, NUM_PATCHES + 1, WIDTH, generator=generator)
    keys = torch.randn(args.batch, NUM_PATCHES + 1, WIDTH, generator=generator)
    print(f"batch {args.batch}, {args.threads} thread(s), median of {args.repeats} runs, fp32 CPU")
    print("| method | budget | median ms |")
    print("|---|---|---|")
    with torch.no_grad():
        for method in ("random", "pool", "dominant"):
            for budget in (192, 128, 64):
                step(method, budget, features, queries, keys)  # warm-up
                times = []
                for _ in range(args.repeats):
                    started = time.perf_counter()
                    step(method, budget, features, queries, keys)
                    times.append(1000 * (time.perf_counter() - started))
                print(f"| {method} | {budget} | {statistics.median(times):.3f} |")


if __name__ == "__main__":
    main()
