"""No Triton JIT compilation while serving (vLLM 0.26 on a GPU): after vLLM's warm-up, which runs
the backend's own (vllm_kvquant/warmup.py), a mixed workload must not compile a kernel variant.

vLLM (0.26+) monitors compilations once its ``compile_or_warm_up_model`` is done and logs each as
``Triton kernel JIT compilation during inference: <kernel>`` (``vllm/utils/jit_monitor.py``;
``jit_monitor_verbose`` logs every one, with its constexprs). A line naming one of the backend's
kernels fails the test; lines naming vLLM's own kernels are reported as a warning. Three engines on the calibrated tiny
model, side by side, each in its own process (tests/engine_runner.py) with its whole log kept:

- ``fp8-graphs``: vLLM's default compilation (FULL_AND_PIECEWISE), no prefill workspace, so
  prefills with cached context take FA3 + our Triton merge pass;
- ``int8-eager``: no CUDA graphs at all (every launch is eager), the 16-bit workspace fill path;
- ``fp8-full-quantized``: ``cudagraph_mode=FULL``, prefill mode ``quantized``.

Workload, per engine: 40 prompts of 1 to 30 corpus lines (30-920 tokens) at once (chunked prefill: 64 tokens per
step), each with its own output length (1 to 40 tokens, ``ignore_eos``), so the decode batch
passes through every size from 40 down to 1 while prefills join it; then prompts that extend the
first round's (prefix-cache hits: prefills with cached context) and one of ~700 tokens.

Run on the GPU machine: ``python -m pytest tests/test_jit_warmup_gpu.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu
HERE = Path(__file__).resolve().parent
JIT_LINE = "JIT compilation during inference"  # vllm/utils/jit_monitor.py, 0.26.0
WARMUP_LINE = "kvquant: compiled the backend's Triton kernels"
#: Every Triton kernel the backend launches (kernels/): a monitor line naming one fails the test.
OUR_KERNELS = ("_quantize_to_cache_kernel", "_decode_split_kernel", "_decode_reduce_kernel", "prefill_attention_kernel",
               "_fill_context_kernel")  # fmt: skip


def _rounds() -> list[list[str]]:
    from vllm_kvquant.tiny_model import corpus_text

    lines = [line for line in corpus_text().splitlines() if line.strip()]
    first = [" ".join(lines[i % 40 : i % 40 + 1 + i % 30]) for i in range(40)]
    second = [p + " " + lines[(i + 50) % len(lines)] for i, p in enumerate(first[10:18])]
    second.append(" ".join(lines[20:40]))  # ~700 tokens: eleven chunks, each after cached context
    return [first, second]


def _engine(model_dir: Path, kv_dtype: str, **extra) -> dict:
    kvquant = {"dtype": kv_dtype, **extra.pop("kvquant", {})}
    engine = dict(
        model=str(model_dir), dtype="bfloat16", gpu_memory_utilization=0.1, kv_cache_memory_bytes=1 << 28,
        max_model_len=1024, block_size=16, enable_chunked_prefill=True, max_num_batched_tokens=64, max_num_seqs=48,
        enable_prefix_caching=True, seed=0, attention_backend="kvquant", additional_config={"kvquant": kvquant},
        jit_monitor_verbose=True,
    )  # fmt: skip
    engine.update(extra)
    return engine


def engine_specs(model_dir: Path) -> dict[str, dict]:
    return {
        "fp8-graphs": _engine(model_dir, "fp8_e4m3", kvquant={"prefill_workspace_mib": 0}),
        "int8-eager": _engine(model_dir, "int8", enforce_eager=True),
        "fp8-full-quantized": _engine(model_dir, "fp8_e4m3", kvquant={"prefill": "quantized"},
                                      compilation_config={"mode": 0, "cudagraph_mode": "FULL"},
                                      enable_prefix_caching=False),  # fmt: skip
    }


def run_engine(engine: dict, out: Path, timeout: float = 480) -> dict:
    """One engine in a subprocess; its whole log is kept (the monitor's lines may come anywhere)."""
    spec = {"engine": engine, "rounds": _rounds(), "max_tokens": list(range(1, 41)), "sampling": {"ignore_eos": True}}
    env = {**os.environ, "VLLM_DISABLE_COMPILE_CACHE": "1"}
    try:
        proc = subprocess.run([sys.executable, str(HERE / "engine_runner.py"), json.dumps(spec), str(out)],
                              capture_output=True, text=True, timeout=timeout, env=env)  # fmt: skip
    except subprocess.TimeoutExpired as e:
        return {"error": f"timed out after {timeout:.0f} s", "log": str(e.stdout or "") + str(e.stderr or "")}
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        return {"error": f"engine_runner exited {proc.returncode}", "log": log}
    return {**json.loads(out.read_text()), "log": log}


@pytest.fixture(scope="module")
def runs(calibrated_tiny_model, tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("jit")
    specs = engine_specs(calibrated_tiny_model[0])
    with ThreadPoolExecutor(len(specs)) as pool:
        futures = {name: pool.submit(run_engine, spec, root / f"{name}.json") for name, spec in specs.items()}
        return {name: f.result() for name, f in futures.items()}


@pytest.mark.parametrize("name", ["fp8-graphs", "int8-eager", "fp8-full-quantized"])
def test_no_triton_jit_while_serving(name, runs) -> None:
    run = runs[name]
    assert "error" not in run, f"{name}: {run['error']}\n{run['log'][-12000:]}"
    (report,) = run["backend_report"]
    assert {layer["backend"] for layer in report.values()} == {"KVQUANT"}
    log = run["log"]
    assert WARMUP_LINE in log, f"{name}: the backend's warm-up did not run\n{log[-8000:]}"
    jit = [line for line in log.splitlines() if JIT_LINE in line]
    ours = [line for line in jit if any(k in line for k in OUR_KERNELS)]
    assert not ours, f"{name}: {len(ours)} of the backend's kernels compiled while serving:\n" + "\n".join(ours[:20])
    if jit:  # vLLM's own kernels: reported, not ours to warm up
        warnings.warn(f"{name}: vLLM compiled {len(jit)} of its own kernels while serving: " + " | ".join(jit[:5]))
    outputs = [len(r["token_ids"]) for r in run["results"]]
    assert outputs[:40] == list(range(1, 41)), outputs[:40]  # every decode batch size from 40 to 1
    (steps,) = run["step_report"]
    assert steps["mixed_steps"] > 0, steps  # decodes and prefills in one step
