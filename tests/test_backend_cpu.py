"""The kvquant backend inside the real vLLM CPU build: it runs (not CPU_ATTN), allocates half the
bytes per token, reads its own quantized context (chunked prefill, prefix caching) and
generates what the BF16 cache generates, for FP8 and INT8.

The model is the tiny Llama trained for a few seconds on the shipped corpus (a random model's
near-ties turn any rounding into another token). Tolerances, with what was measured (2-core CPU,
vLLM 0.32.0): a prompt prefilled in one chunk attends to unquantized K/V only, so its first
token must be BF16's, its logprob within 0.05 (bf16 rounding of a different attention
implementation; measured <= 0.020); chunked prompts read their earlier chunks from the 8-bit
cache: first-token logprob within 0.1 (measured <= 0.0001); the mean |logprob difference| of
the chosen tokens while outputs agree within 0.08 (measured <= 0.031 for fp8). Greedy
continuations must be identical for most prompts (measured 5 of 6 for fp8 and int8).
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
MAX_TOKENS = 8
FIRST_TOKEN_LOGPROB_ATOL = 0.1  # chunked prompts (same first token): later chunks read the 8-bit context
SINGLE_CHUNK_LOGPROB_ATOL = 0.05  # prefill attends to unquantized K/V only
MEAN_LOGPROB_ATOL = 0.08  # mean |logprob difference| of the chosen tokens while outputs agree


def _prompts() -> tuple[list[str], list[str]]:
    from vllm_kvquant.tiny_model import corpus_text

    lines = corpus_text().splitlines()
    long_prefix = " ".join(lines[:6])  # > 2 blocks of 32 tokens: shared prefix for the cache hit
    # Short prompts first: the scheduler (FCFS, 32-token budget) prefills them whole in the
    # first step. Placed after a long prompt they could be split across steps, and their
    # second chunk would read the 8-bit cache.
    round1 = [
        "The cat slept in the sun",
        "A language model",
        long_prefix,
        " ".join(lines[10:14]),
        " ".join(lines[20:23]),
    ]
    round2 = [long_prefix + " " + lines[7]]  # hits the prefix cache filled in round 1
    return round1, round2


def _engine(model_dir: Path, **extra) -> dict:
    engine = dict(
        model=str(model_dir),
        dtype="bfloat16",
        gpu_memory_utilization=0.3,
        max_model_len=512,
        enforce_eager=True,
        block_size=32,  # CPU_ATTN (the BF16 reference) needs a multiple of 32
        enable_chunked_prefill=True,
        max_num_batched_tokens=32,  # long prompts are prefilled in chunks: later chunks read the cache
        enable_prefix_caching=True,
        seed=0,
    )
    engine.update(extra)
    return engine


def run_engine(engine: dict, out: Path, *, triton_interpreter: bool = False) -> dict:
    """One engine in a subprocess, with a fixed 1 GiB KV budget so capacities compare fairly.

    By default the backend runs its PyTorch reference path (what a CPU user gets); with
    ``triton_interpreter`` the Triton kernels run under the interpreter inside vLLM.
    """
    round1, round2 = _prompts()
    spec = {"engine": engine, "rounds": [round1, round2], "max_tokens": MAX_TOKENS}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    if triton_interpreter:
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run(
        [sys.executable, str(HERE / "engine_runner.py"), json.dumps(spec), str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def model_and_scales(tmp_path_factory) -> tuple[Path, Path, Path]:
    """Tiny model + calibrated INT8 and FP8 per-head sidecars (one calibration run)."""
    from vllm_kvquant.scales import load_scales, save_scales
    from vllm_kvquant.tiny_model import TRAINED_TINY_LLAMA, corpus_text, make_tiny_llama

    root = tmp_path_factory.mktemp("backend")
    model_dir = make_tiny_llama(root / "tiny", TRAINED_TINY_LLAMA)
    data = root / "calib.txt"
    data.write_text(corpus_text())
    int8_path = root / "int8.json"
    cmd = [
        sys.executable, "-m", "vllm_kvquant.cli", "calibrate", str(model_dir), "--data", str(data),
        "--num-samples", "8", "--seq-len", "128", "--dtype", "int8", "--granularity", "per_head",
        "--model-dtype", "bfloat16", "--gpu-memory-utilization", "0.3", "--out", str(int8_path),
    ]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=root)
    assert proc.returncode == 0, proc.stderr[-4000:]
    fp8_path = root / "fp8.json"
    save_scales(load_scales(int8_path).retarget("fp8_e4m3"), fp8_path)
    return model_dir, int8_path, fp8_path


@pytest.fixture(scope="module")
def bf16_run(model_and_scales, tmp_path_factory) -> dict:
    model_dir, _, _ = model_and_scales
    return run_engine(_engine(model_dir), tmp_path_factory.mktemp("bf16") / "out.json")


def _kvquant_run(model_dir: Path, sidecar: Path, out: Path, **kwargs) -> dict:
    engine = _engine(model_dir, attention_backend="kvquant", additional_config={"kvquant": {"scales": str(sidecar)}})
    return run_engine(engine, out, **kwargs)


def _check_backend_ran(run: dict, bf16_run: dict, kv_dtype: str, sidecar: Path) -> None:
    """Our backend ran every attention layer, with the sidecar's scales, in a one-byte cache."""
    (report,) = run["backend_report"]
    assert len(report) == 2
    for layer in report.values():
        assert layer["backend"] == "KVQUANT"
        assert layer["kv_dtype"] == kv_dtype
        assert layer["scales_source"] == str(sidecar)
        assert len(layer["k_scale"]) == 2  # per KV head
    assert run["cache_dtype"] == "fp8"
    (ref_report,) = bf16_run["backend_report"]
    assert all(layer["backend"] != "KVQUANT" for layer in ref_report.values())
    # Half the bytes per token: twice the tokens in the same memory.
    ratio = run["kv_capacity_tokens"] / bf16_run["kv_capacity_tokens"]
    assert 1.9 <= ratio <= 2.1, ratio
    # The round-2 prompt reused cached (quantized) blocks.
    assert run["results"][-1]["num_cached_tokens"] >= 32
    # Chunked prefill mixed decodes and prefills in some steps; no CUDA graphs here, so every one
    # of them ran forward (the counter tests/test_backend_gpu.py reads for full-graph replays).
    (steps,) = run["step_report"]
    assert steps["mixed_steps"] > 0 and steps["mixed_steps_full_graph"] == 0, steps


def _assert_close_to_bf16(run: dict, bf16_run: dict) -> None:
    """First tokens, mean logprob difference while outputs agree, and greedy agreement."""
    identical = 0
    step_diffs = []
    for ours, ref in zip(run["results"], bf16_run["results"]):
        # A prompt prefilled in one chunk never reads the 8-bit cache before its first token.
        if len(ours["prompt"]) < 60:
            assert ours["token_ids"][0] == ref["token_ids"][0], ours["prompt"]
            assert abs(ours["logprobs"][0] - ref["logprobs"][0]) <= SINGLE_CHUNK_LOGPROB_ATOL, ours["prompt"]
        elif ours["token_ids"][0] == ref["token_ids"][0]:
            assert abs(ours["logprobs"][0] - ref["logprobs"][0]) <= FIRST_TOKEN_LOGPROB_ATOL, ours["prompt"]
        for a, b, ta, tb in zip(ours["logprobs"], ref["logprobs"], ours["token_ids"], ref["token_ids"]):
            if ta != tb:
                break
            step_diffs.append(abs(a - b))
        identical += ours["token_ids"] == ref["token_ids"]
    assert sum(step_diffs) / len(step_diffs) <= MEAN_LOGPROB_ATOL, step_diffs
    assert identical > len(run["results"]) / 2, f"only {identical}/{len(run['results'])} greedy continuations identical"


def test_kvquant_triton_interpreter_path(model_and_scales, bf16_run, tmp_path: Path) -> None:
    """The Triton kernels themselves inside vLLM, through the interpreter."""
    model_dir, int8_path, _ = model_and_scales
    run = _kvquant_run(model_dir, int8_path, tmp_path / "out.json", triton_interpreter=True)
    _check_backend_ran(run, bf16_run, "int8", int8_path)
    _assert_close_to_bf16(run, bf16_run)


@pytest.mark.parametrize("kv_dtype", ["int8", "fp8_e4m3"])
def test_kvquant_matches_bf16(kv_dtype: str, model_and_scales, bf16_run, tmp_path: Path) -> None:
    """The reference path (what a CPU user gets) for both 8-bit formats."""
    model_dir, int8_path, fp8_path = model_and_scales
    sidecar = int8_path if kv_dtype == "int8" else fp8_path
    run = _kvquant_run(model_dir, sidecar, tmp_path / "out.json")
    _check_backend_ran(run, bf16_run, kv_dtype, sidecar)
    _assert_close_to_bf16(run, bf16_run)


def _start_failure(engine: dict, tmp_path: Path) -> str:
    """stderr of an engine start that must fail."""
    spec = {"engine": engine, "rounds": [["hello"]], "max_tokens": 1}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    proc = subprocess.run(
        [sys.executable, str(HERE / "engine_runner.py"), json.dumps(spec), str(tmp_path / "out.json")],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert proc.returncode != 0
    return proc.stdout + proc.stderr


def test_unsupported_head_size_fails_at_startup(tmp_path: Path) -> None:
    from vllm_kvquant.tiny_model import TinyLlamaSpec, make_tiny_llama

    model_dir = make_tiny_llama(tmp_path / "h72", TinyLlamaSpec(head_dim=72, num_hidden_layers=1))
    out = _start_failure(_engine(model_dir, attention_backend="kvquant"), tmp_path)
    assert "kvquant cannot run an attention layer with 4 heads of size 72" in out
    assert "head size 72 is not supported by kvquant" in out


def test_sidecar_of_another_model_fails_at_startup(model_and_scales, tmp_path: Path) -> None:
    from vllm_kvquant.tiny_model import TinyLlamaSpec, make_tiny_llama

    _, int8_path, _ = model_and_scales  # made for 2 layers x 2 KV heads
    other = make_tiny_llama(tmp_path / "other", TinyLlamaSpec(num_hidden_layers=3))
    engine = _engine(other, attention_backend="kvquant", additional_config={"kvquant": {"scales": str(int8_path)}})
    out = _start_failure(engine, tmp_path)
    assert str(int8_path) in out
    assert "model.layers.2.self_attn.attn" in out
