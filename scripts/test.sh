#!/usr/bin/env bash
# The test command (README, CI): set up the CPU environment, then run every test.
# Kernel tests run through the Triton interpreter; `gpu` tests skip without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-cpu.sh
export TRITON_INTERPRET=1
# -P: never import the source tree (kernels/ and scales/ live there outside vllm_kvquant/)
exec "${KVQUANT_VENV:-.venv}/bin/python" -P -m pytest "$@"
