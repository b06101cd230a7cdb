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

from pitome_mllm.merge import StepParams
from pitome_mllm.merge.reducers import ReductionInputs, reduce_to_budget
from pitome_mllm.merge.select import cls_attention
from pitome_mllm.methods import method_spec

NUM_PATCHES, WIDTH, HEADS = 576, 1024, 16
LLM_WIDTH, PROMPT_TOKENS = 4096, 20
METHODS = ("random", "pool", "dominant", "fastervlm", "divprune", "cdpruner", "mllm")
# The margin of mllm's energy at the read layer of 24 (layer 22).
READ_LAYER_MARGIN = 0.075


def step(method: str, budget: int, features: torch.Tensor, queries: torch.Tensor, keys: torch.Tensor,
         projected: torch.Tensor, prompt: torch.Tensor) -> None:  # fmt: skip
    """One reduction as the selection stage runs it: what the method needs, then its reducer."""
    spec = method_spec(method)
    attention = patch_keys = None
    if spec.needs_class_attention:
        attention, patch_keys = cls_attention(queries, keys, HEADS)[:, 1:], keys[:, 1:]
    inputs = ReductionInputs(
        features,
        budget,
        class_attention=attention,
        keys=patch_keys,
        num_heads=HEADS,
        projected=projected,
        instructions=[prompt] * features.shape[0] if spec.needs_prompt else None,
        step=StepParams(margin=READ_LAYER_MARGIN),
    )
    reduce_to_budget(spec.implementation, inputs)


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
