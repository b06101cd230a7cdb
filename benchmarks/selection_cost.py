"""Time the selection step of each selection method at LLaVA-1.5 size (576 patches, width 1024, 16 heads).

Only the step itself (what `SelectionStage` adds on top of the unmerged tower), on random
tensors; divprune and cdpruner decide on projected tokens (width 4096, a 20-token prompt), whose
projector cost is not included. Prints the median of several runs per method and budget.

    python benchmarks/selection_cost.py [--repeats 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pitome_mllm.merge.select import (
    cls_attention,
    conditional_kernel,
    dominant_and_contextual,
    dpp_greedy_map,
    farthest_point_indices,
    gather_tokens,
    instruction_relevance,
    pool_grid,
    pool_patches,
    random_keep_indices,
    select_then_merge,
    top_indices,
)

NUM_PATCHES, WIDTH, HEADS, GRID = 576, 1024, 16, (24, 24)
LLM_WIDTH, PROMPT_TOKENS = 4096, 20
METHODS = ("random", "pool", "dominant", "fastervlm", "divprune", "cdpruner", "mllm")


def step(method: str, budget: int, features: torch.Tensor, queries: torch.Tensor, keys: torch.Tensor,
         projected: torch.Tensor, prompt: torch.Tensor) -> None:  # fmt: skip
    batch = features.shape[0]
    if method == "divprune":
        farthest_point_indices(projected, budget)
    elif method == "cdpruner":
        relevance = instruction_relevance(projected, [prompt] * batch)
        dpp_greedy_map(conditional_kernel(features, relevance), budget)
    elif method == "random":
        kept = random_keep_indices(NUM_PATCHES, budget, seed=0).expand(features.shape[0], -1)
        gather_tokens(features, kept)
    elif method == "pool":
        pool_patches(features, GRID, pool_grid(budget, GRID))
    else:
        attention = cls_attention(queries, keys, HEADS)[:, 1:]
        metric = keys[:, 1:].view(batch, NUM_PATCHES, HEADS, -1).mean(dim=2)
        if method == "fastervlm":
            gather_tokens(features, top_indices(attention, budget))
        elif method == "dominant":
            dominant_and_contextual(features, attention, metric, budget)
        else:  # the mllm preset of pitome at the read layer of 24 (margin 0.075)
            select_then_merge(features, metric, attention, budget, energy_share=0.5, margin=0.075)


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
    projected = torch.randn(args.batch, NUM_PATCHES, LLM_WIDTH, generator=generator)
    prompt = torch.randn(PROMPT_TOKENS, LLM_WIDTH, generator=generator)
    tensors = (features, queries, keys, projected, prompt)
    print(f"batch {args.batch}, {args.threads} thread(s), median of {args.repeats} runs, fp32 CPU")
    print("| method | budget | median ms |")
    print("|---|---|---|")
    with torch.no_grad():
        for method in METHODS:
            for budget in (192, 128, 64, 32):
                step(method, budget, *tensors)  # warm-up
                times = []
                for _ in range(args.repeats):
                    started = time.perf_counter()
                    step(method, budget, *tensors)
                    times.append(1000 * (time.perf_counter() - started))
                print(f"| {method} | {budget} | {statistics.median(times):.3f} |")


if __name__ == "__main__":
    main()
