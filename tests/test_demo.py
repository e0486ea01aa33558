"""The README's first command, ``vllm-kvquant demo``, end to end on vLLM's CPU build: it trains the
tiny model, calibrates, generates with BF16 KV and with kvquant, and reports 2x the KV capacity."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")


def test_demo_runs_and_reports_twice_the_capacity(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_kvquant.cli", "demo", "--workdir", str(tmp_path), "--dtype", "int8"],
        capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    capacity = re.search(r"KV cache capacity: bf16 (\d+) tokens, kvquant \(int8\) (\d+) tokens", proc.stdout)
    assert capacity, proc.stdout[-3000:]
    bf16, kvquant = map(int, capacity.groups())
    assert 1.9 <= kvquant / bf16 <= 2.1, (bf16, kvquant)
    identical = re.search(r"(\d+)/(\d+) greedy completions identical to the BF16 KV cache", proc.stdout)
    assert identical, proc.stdout[-3000:]
    same, total = map(int, identical.groups())
    assert total == 4 and same >= 3, proc.stdout[-3000:]  # trained tiny model: measured 4/4
    assert (tmp_path / "tiny-llama" / "kvquant_scales.json").exists()
