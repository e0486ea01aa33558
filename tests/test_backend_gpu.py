"""The kvquant backend on a GPU (vLLM 0.26): CUDA graphs on and off, prefix caching and chunked
prefill on, FP8 and INT8, against vLLM's BF16 FLASH_ATTN run; KV capacity ~2x. Full CUDA graphs
for mixed prefill/decode steps (``cudagraph_mode=FULL``) against eager.

Every engine of this file (nine: one BF16, four per 8-bit format) runs once, in its own
subprocess, all of them side by side on the one GPU (at most ``KVQ_GPU_TEST_PARALLEL`` at a
time, default all nine), started by the module fixture ``runs``; each test reads the runs it compares. The
KV cache is a fixed ``kv_cache_memory_bytes`` per engine instead of a share of the GPU found by
profiling (which other processes on the same GPU would disturb), so capacities compare exactly.
What ran is read from the engines, not their logs: the backend per layer, the CUDA-graph mode
vLLM settled on and the backend's count of mixed steps replayed from full CUDA graphs
(``kvquant_step_report``).

Run on the GPU machine: ``python -m pytest tests/test_backend_gpu.py tests/test_serve.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu
HERE = Path(__file__).resolve().parent
MAX_TOKENS = 8  # as in the CPU test: fp8 (3 mantissa bits) drifts from BF16 over long greedy runs
KV_CACHE_BYTES = 1 << 28  # per engine: 262144 tokens of the tiny model at BF16 (1 KiB per token), twice that at one byte
KV_DTYPES = ("int8", "fp8_e4m3")


def _prompts() -> tuple[list[str], list[str]]:
    from vllm_kvquant.tiny_model import corpus_text

    lines = corpus_text().splitlines()
    long_prefix = " ".join(lines[:8])
    round1 = [long_prefix, " ".join(lines[10:16]), "The cat slept in the sun", "A language model", " ".join(lines[20:25]), lines[30]]
    return round1, [long_prefix + " " + lines[9]]


def _engine(model_dir: Path, **extra) -> dict:
    engine = dict(
        model=str(model_dir), dtype="bfloat16", gpu_memory_utilization=0.1, kv_cache_memory_bytes=KV_CACHE_BYTES,
        max_model_len=1024, block_size=16, enable_chunked_prefill=True, max_num_batched_tokens=64,
        enable_prefix_caching=True, seed=0,
    )  # fmt: skip
    engine.update(extra)
    return engine


def engine_specs(model_dir: Path) -> dict[str, dict]:
    """Every engine this file compares, by name."""
    specs = {"bf16": _engine(model_dir, attention_backend="FLASH_ATTN")}
    for kv_dtype in KV_DTYPES:
        kvq = dict(attention_backend="kvquant", additional_config={"kvquant": {"dtype": kv_dtype}})
        specs[f"{kv_dtype}-graph"] = _engine(model_dir, **kvq)  # vLLM's default: FULL_AND_PIECEWISE, compiled
        specs[f"{kv_dtype}-eager"] = _engine(model_dir, enforce_eager=True, **kvq)
        # No torch.compile in either (mode 0 vs enforce_eager): only the full graphs differ.
        specs[f"{kv_dtype}-full"] = _engine(model_dir, compilation_config={"mode": 0, "cudagraph_mode": "FULL"},
                                            enable_prefix_caching=False, **kvq)  # fmt: skip
        specs[f"{kv_dtype}-full-eager"] = _engine(model_dir, enforce_eager=True, enable_prefix_caching=False, **kvq)
    return specs


def run_engine(engine: dict, out: Path, timeout: float = 480) -> dict:
    """One engine in a subprocess (tests/engine_runner.py); a failure is returned, not raised,
    so that the other runs still serve their tests: ``{"error": ..., "log": ...}``. Its output
    goes to ``OUT.log`` as it runs (scripts/gpu-run.sh brings those back, also from a lane that
    ran out of time), and the process group is killed on time-out (vLLM's engine core with it)."""
    round1, round2 = _prompts()
    spec = {"engine": engine, "rounds": [round1, round2], "max_tokens": MAX_TOKENS}
    # Engines start side by side: no shared torch.compile cache to race on (a fresh machine has none).
    env = {**os.environ, "VLLM_DISABLE_COMPILE_CACHE": "1"}
    log_path = out.with_suffix(".log")
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "engine_runner.py"), json.dumps(spec), str(out)],
            stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
        try:
            returncode = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            returncode = None
    log = log_path.read_text(errors="replace")[-16000:]
    if returncode is None:
        return {"error": f"timed out after {timeout:.0f} s", "log": log}
    if returncode != 0:
        return {"error": f"engine_runner exited {returncode}", "log": log}
    result = json.loads(out.read_text())
    result["log"] = log
    return result


def run_engines(specs: dict[str, dict], root: Path, workers: int | None = None) -> dict[str, dict]:
    """Every engine of ``specs`` by :func:`run_engine`, ``workers`` at a time (default: all),
    each writing ``root/NAME.json``; results by name."""
    with ThreadPoolExecutor(max(1, len(specs) if workers is None else workers)) as pool:
        futures = {name: pool.submit(run_engine, spec, root / f"{name}.json") for name, spec in specs.items()}
        return {name: f.result() for name, f in futures.items()}


@pytest.fixture(scope="module")
def runs(calibrated_tiny_model, tmp_path_factory) -> dict[str, dict]:
    model_dir = calibrated_tiny_model[0]  # its default sidecar: int8 per head; dtype fp8_e4m3 converts it
    specs = engine_specs(model_dir)
    workers = int(os.environ.get("KVQ_GPU_TEST_PARALLEL", str(len(specs))))
    return run_engines(specs, tmp_path_factory.mktemp("engines"), workers)


def _get(runs: dict, name: str) -> dict:
    run = runs[name]
    assert "error" not in run, f"{name}: {run['error']}\n{run['log']}"
    return run


def _agreement(run: dict, ref: dict) -> tuple[int, float]:
    identical, diffs = 0, []
    for a, b in zip(run["results"], ref["results"]):
        identical += a["token_ids"] == b["token_ids"]
        for la, lb, ta, tb in zip(a["logprobs"], b["logprobs"], a["token_ids"], b["token_ids"]):
            if ta != tb:
                break
            diffs.append(abs(la - lb))
    return identical, sum(diffs) / max(len(diffs), 1)


def _check_kvquant_ran(run: dict, kv_dtype: str) -> None:
    (report,) = run["backend_report"]
    assert {layer["backend"] for layer in report.values()} == {"KVQUANT"}
    assert {layer["kv_dtype"] for layer in report.values()} == {kv_dtype}


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_cuda_graphs_and_eager_agree_and_match_bf16(kv_dtype, runs) -> None:
    bf16_run = _get(runs, "bf16")
    graph, eager = _get(runs, f"{kv_dtype}-graph"), _get(runs, f"{kv_dtype}-eager")
    summary = {"kv_dtype": kv_dtype}
    for name, run in (("graph", graph), ("eager", eager)):
        _check_kvquant_ran(run, kv_dtype)
        assert run["results"][-1]["num_cached_tokens"] >= 16  # prefix-cache hit on quantized blocks
        ratio = run["kv_capacity_tokens"] / bf16_run["kv_capacity_tokens"]
        identical, mean_diff = _agreement(run, bf16_run)
        summary[name] = dict(capacity_ratio=round(ratio, 3), identical=identical, mean_logprob_diff=round(mean_diff, 4),
                             capacity=run["kv_capacity_tokens"], bf16_capacity=bf16_run["kv_capacity_tokens"],
                             steps=run["step_report"][0])  # fmt: skip
        assert 1.85 <= ratio <= 2.15, ratio  # one byte per element in the same KV memory
        assert identical > len(run["results"]) / 2
        assert mean_diff <= 0.15
    # vLLM's default with ALWAYS support: decode-only steps replay full graphs, mixed steps run
    # piecewise (attention outside the graphs, so every mixed step reached forward); eager: no graphs.
    (graph_steps,), (eager_steps,) = graph["step_report"], eager["step_report"]
    assert graph_steps["cudagraph_mode"] == "FULL_AND_PIECEWISE" and graph_steps["capture_sizes"], graph_steps
    assert eager_steps["cudagraph_mode"] == "NONE", eager_steps
    for steps in (graph_steps, eager_steps):
        assert steps["mixed_steps"] > 0 and steps["mixed_steps_full_graph"] == 0, steps
    identical, mean_diff = _agreement(graph, eager)
    summary["graph_vs_eager"] = dict(identical=identical, mean_logprob_diff=round(mean_diff, 5))
    print("GPU-E2E", json.dumps(summary))
    # Graph runs are also torch.compile'd (fused bf16 norms/activations) and pad the decode
    # batch (another split count): not bit-identical to eager, but as close as bf16 noise.
    assert identical >= len(graph["results"]) - 1
    assert mean_diff <= 0.05


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_full_cuda_graphs_for_mixed_batches_match_eager(kv_dtype, runs) -> None:
    """``cudagraph_mode=FULL`` captures mixed prefill+decode steps whole (the backend declares
    ``AttentionCGSupport.ALWAYS``) and replays them with other decode/prefill mixes: chunked
    prefill at 64 tokens per step makes the short prompts decode while the long ones prefill.
    That mixed steps really were replayed from full graphs is read from the engine: vLLM kept
    ``FULL`` (it would downgrade a backend without that support) and the backend counted mixed
    steps whose metadata never reached ``forward`` (a replay runs no Python); the eager run,
    the control, counts mixed steps and no replays.

    No torch.compile in either run (``mode`` 0 vs ``enforce_eager``), so only the graphs differ;
    the two plans split decode attention differently (a grid over the padded requests vs over
    the decodes), a rounding-level difference: same greedy tokens for all prompts but at most
    one, mean |logprob difference| <= 0.02 while tokens agree.
    """
    full, eager = _get(runs, f"{kv_dtype}-full"), _get(runs, f"{kv_dtype}-full-eager")
    _check_kvquant_ran(full, kv_dtype)
    (steps,), (eager_steps,) = full["step_report"], eager["step_report"]
    identical, mean_diff = _agreement(full, eager)
    firsts = [abs(a["logprobs"][0] - b["logprobs"][0]) for a, b in zip(full["results"], eager["results"])]
    print("GPU-FULL-GRAPHS", json.dumps({"kv_dtype": kv_dtype, "identical": identical, "mean_logprob_diff": mean_diff,
                                         "max_first_logprob_diff": max(firsts), "steps": steps,
                                         "eager_steps": eager_steps}))  # fmt: skip
    assert steps["cudagraph_mode"] == "FULL" and steps["capture_sizes"], steps
    assert steps["mixed_steps_full_graph"] > 0, steps
    assert eager_steps["cudagraph_mode"] == "NONE", eager_steps
    assert eager_steps["mixed_steps"] > 0 and eager_steps["mixed_steps_full_graph"] == 0, eager_steps
    assert identical >= len(full["results"]) - 1
    assert mean_diff <= 0.02
    assert max(firsts) <= 0.02
