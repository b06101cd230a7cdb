#!/usr/bin/env bash
# Install pitome-mllm into ./.venv.
#
#   bash scripts/install.sh          the library, CLI and demo (CPU torch on CPU-only machines)
#   bash scripts/install.sh --dev    + test tools and the optional integrations the tests cover
#
# On a machine without a GPU, torch is pinned to the CPU wheel through constraints-cpu.txt
# (an unpinned resolution can pull a multi-GB CUDA build). With an NVIDIA GPU, the torch
# you already have (or the default CUDA wheel) is used.
set -euo pipefail
cd "$(dirname "$0")/.."

dev=0
[ "${1:-}" = "--dev" ] && dev=1

python3 -m venv .venv
py=.venv/bin/python
"$py" -m pip install -q --upgrade pip

constraints=()
if ! command -v nvidia-smi >/dev/null 2>&1; then
  constraints=(-c constraints-cpu.txt)
fi

if [ "$dev" = 1 ]; then
  "$py" -m pip install -q "${constraints[@]}" -e ".[test]"
else
  "$py" -m pip install -q "${constraints[@]}" -e .
fi
echo "installed: $("$py" -c 'import torch, transformers, pitome_mllm; print("pitome-mllm", pitome_mllm.__version__, "| torch", torch.__version__, "| transformers", transformers.__version__)')"
