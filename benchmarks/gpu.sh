#!/usr/bin/env bash
# The GPU benchmark in one command (benchmarks/PROFILING.md, "The GPU benchmark: one command"): LLaVA-1.5-7B shapes with
# random fp16 weights on one NVIDIA GPU, offline; TTFT, prefill, vision tower and merge share, peak memory
# and KV cache at 576 / 192 / 128 / 64 visual tokens, batch 1 and 8, eager and compiled. At most 8 minutes
# (it starts no cell after 6); results in benchmarks/results/gpu_benchmark_<gpu>.{json,md}, rewritten after
# every cell.
#
#   bash benchmarks/gpu.sh                          # the whole benchmark
#   bash benchmarks/gpu.sh --device cpu --tiny      # the same code on a tiny model, on CPU, in seconds
#
# Extra arguments go to benchmarks/gpu_benchmark.py (--help lists them). PYTHON picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
# The checkout's package comes first, so that it runs without installing; an installed one works too.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# The script stops starting cells after --budget-s (360 s); the hard limit keeps the whole run within
# 8 minutes even if the last cell's compilation runs long (what was measured is already saved).
exec timeout --signal=INT --kill-after=20 480 "${PYTHON:-python}" benchmarks/gpu_benchmark.py "$@"
