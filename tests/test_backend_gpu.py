"""The kvquant backend on a GPU (vLLM 0.26 on the H100): CUDA graphs on and off, prefix caching
and chunked prefill on, FP8 and INT8, against vLLM's BF16 FLASH_ATTN run; KV capacity ~2x.
Full CUDA graphs for mixed prefill/decode steps (``cudagraph_mode=FULL``) against eager.

Run on the GPU machine: ``python -m pytest tests/test_backend_gpu.py tests/test_serve.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu
HERE = Path(__file__).resolve().parent
MAX_TOKENS = 8  # as in the CPU test: fp8 (3 mantissa bits) drifts from BF16 over long greedy runs


def _prompts() -> tuple[list[str], list[str]]:
    from vllm_kvquant.tiny_model import corpus_text

    lines = corpus_text().splitlines()
    long_prefix = " ".join(lines[:8])
    round1 = [long_prefix, " ".join(lines[10:16]), "The cat slept in the sun", "A language model", " ".join(lines[20:25]), lines[30]]
    return round1, [long_prefix + " " + lines[9]]


def run_engine(engine: dict, out: Path) -> dict:
    round1, round2 = _prompts()
    spec = {"engine": engine, "rounds": [round1, round2], "max_tokens": MAX_TOKENS}
    proc = subprocess.run(
        [sys.executable, str(HERE / "engine_runner.py"), json.dumps(spec), str(out)],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    result = json.loads(out.read_text())
    result["log"] = proc.stdout[-20000:] + proc.stderr[-60000:]
    return result


def _engine(model_dir: Path, **extra) -> dict:
    engine = dict(
        model=str(model_dir), dtype="bfloat16", gpu_memory_utilization=0.2, max_model_len=1024, block_size=16,
        enable_chunked_prefill=True, max_num_batched_tokens=64, enable_prefix_caching=True, seed=0,
    )
    engine.update(extra)
    return engine


@pytest.fixture(scope="module")
def gpu_model(tmp_path_factory) -> tuple[Path, Path]:
    from vllm_kvquant.tiny_model import TRAINED_TINY_LLAMA, corpus_text, make_tiny_llama

    root = tmp_path_factory.mktemp("gpu")
    model_dir = make_tiny_llama(root / "tiny", TRAINED_TINY_LLAMA)
    data = root / "calib.txt"
    data.write_text(corpus_text())
    cmd = [sys.executable, "-m", "vllm_kvquant.cli", "calibrate", str(model_dir), "--data", str(data),
           "--num-samples", "16", "--seq-len", "128", "--dtype", "int8", "--granularity", "per_head",
           "--model-dtype", "bfloat16", "--gpu-memory-utilization", "0.2"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=root)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return model_dir, model_dir / "kvquant_scales.json"


@pytest.fixture(scope="module")
def bf16_run(gpu_model, tmp_path_factory) -> dict:
    return run_engine(_engine(gpu_model[0], attention_backend="FLASH_ATTN"), tmp_path_factory.mktemp("bf16") / "o.json")


def _agreement(run: dict, ref: dict) -> tuple[int, float]:
    identical, diffs = 0, []
    for a, b in zip(run["results"], ref["results"]):
        identical += a["token_ids"] == b["token_ids"]
        for la, lb, ta, tb in zip(a["logprobs"], b["logprobs"], a["token_ids"], b["token_ids"]):
            if ta != tb:
                break
            diffs.append(abs(la - lb))
    return identical, sum(diffs) / max(len(diffs), 1)


@pytest.mark.parametrize("kv_dtype", ["int8", "fp8_e4m3"])
def test_cuda_graphs_and_eager_agree_and_match_bf16(kv_dtype, gpu_model, bf16_run, tmp_path) -> None:
    model_dir, sidecar = gpu_model
    extra = dict(attention_backend="kvquant", additional_config={"kvquant": {"dtype": kv_dtype}})
    graph = run_engine(_engine(model_dir, **extra), tmp_path / "graph.json")
    eager = run_engine(_engine(model_dir, enforce_eager=True, **extra), tmp_path / "eager.json")
    summary = {"kv_dtype": kv_dtype}
    for name, run in (("graph", graph), ("eager", eager)):
        (report,) = run["backend_report"]
        assert {layer["backend"] for layer in report.values()} == {"KVQUANT"}
        assert {layer["kv_dtype"] for layer in report.values()} == {kv_dtype}
        assert run["results"][-1]["num_cached_tokens"] >= 16  # prefix-cache hit on quantized blocks
        ratio = run["kv_capacity_tokens"] / bf16_run["kv_capacity_tokens"]
        identical, mean_diff = _agreement(run, bf16_run)
        summary[name] = dict(capacity_ratio=round(ratio, 3), identical=identical, mean_logprob_diff=round(mean_diff, 4),
                             capacity=run["kv_capacity_tokens"], bf16_capacity=bf16_run["kv_capacity_tokens"])
        assert 1.85 <= ratio <= 2.15, ratio
        assert identical > len(run["results"]) / 2
        assert mean_diff <= 0.15
    identical, mean_diff = _agreement(graph, eager)
    summary["graph_vs_eager"] = dict(identical=identical, mean_logprob_diff=round(mean_diff, 5))
    print("GPU-E2E", json.dumps(summary))
    # Graph runs are also torch.compile'd (fused bf16 norms/activations) and pad the decode
    # batch (another split count): not bit-identical to eager, but as close as bf16 noise.
    assert identical >= len(graph["results"]) - 1
    assert mean_diff <= 0.05


@pytest.mark.parametrize("kv_dtype", ["int8", "fp8_e4m3"])
def test_full_cuda_graphs_for_mixed_batches_match_eager(kv_dtype, gpu_model, tmp_path) -> None:
    """``cudagraph_mode=FULL`` captures mixed prefill+decode steps whole (the backend declares
    ``AttentionCGSupport.ALWAYS``) and replays them with other decode/prefill mixes: chunked
    prefill at 64 tokens per step makes the short prompts decode while the long ones prefill.

    No torch.compile in either run (``mode`` 0 vs ``enforce_eager``), so only the graphs differ;
    the two plans split decode attention differently (a grid over the padded requests vs over
    the decodes), a rounding-level difference: same greedy tokens for all prompts but at most
    one, mean |logprob difference| <= 0.02 while tokens agree.
    """
    model_dir, _ = gpu_model
    extra = dict(attention_backend="kvquant", additional_config={"kvquant": {"dtype": kv_dtype}},
                 enable_prefix_caching=False)  # fmt: skip
    full = run_engine(_engine(model_dir, compilation_config={"mode": 0, "cudagraph_mode": "FULL"}, **extra),
                      tmp_path / "full.json")  # fmt: skip
    eager = run_engine(_engine(model_dir, enforce_eager=True, **extra), tmp_path / "eager.json")
    assert "Capturing CUDA graphs (mixed prefill-decode, FULL)" in full["log"], full["log"][-3000:]
    (report,) = full["backend_report"]
    assert {layer["backend"] for layer in report.values()} == {"KVQUANT"}
    identical, mean_diff = _agreement(full, eager)
    firsts = [abs(a["logprobs"][0] - b["logprobs"][0]) for a, b in zip(full["results"], eager["results"])]
    print("GPU-FULL-GRAPHS", json.dumps({"kv_dtype": kv_dtype, "identical": identical, "mean_logprob_diff": mean_diff,
                                         "max_first_logprob_diff": max(firsts)}))  # fmt: skip
    assert identical >= len(full["results"]) - 1
    assert mean_diff <= 0.02
    assert max(firsts) <= 0.02
