#!/usr/bin/env bash
# The GPU benchmark in one command (benchmarks/PROFILING.md, "The GPU benchmark: one command"): LLaVA-1.5-7B, then
# Qwen2.5-VL-7B (one 672 x 672 image, 576 merged tokens), both with random fp16 weights on one NVIDIA GPU,
# offline; TTFT, prefill, vision tower, merge share (Qwen-VL: the reduction after the patch merger), peak memory
# and KV cache at 576 / 192 / 128 / 64 visual tokens, batch 1 and 8, eager and compiled. At most 8 minutes for
# both (no cell starts after 6: the Qwen-VL cells run only in what LLaVA leaves, the rest are recorded as
# skipped); results in benchmarks/results/gpu_benchmark_<arch>_<gpu>.{json,md}, rewritten after every cell.
#
#   bash benchmarks/gpu.sh                          # the whole benchmark
#   bash benchmarks/gpu.sh --device cpu --tiny      # the same code on tiny models, on CPU, in a minute
#   bash benchmarks/gpu.sh --arch qwen2.5-vl-7b     # one architecture (a later --arch replaces the list)
#
# Extra arguments go to benchmarks/gpu_benchmark.py (--help lists them). PYTHON picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
# The checkout's package comes first, so that it runs without installing; an installed one works too.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# The script stops starting cells after --budget-s (360 s, counted from its start over both architectures); the
# hard limit keeps the whole run within 8 minutes even if the last cell's compilation runs long (what was
# measured is already saved).
exec timeout --signal=INT --kill-after=20 480 "${PYTHON:-python}" benchmarks/gpu_benchmark.py \
    --arch llava-1.5-7b qwen2.5-vl-7b "$@"
