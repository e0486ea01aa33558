"""One real engine of the accuracy benchmark (benchmarks/accuracy/engine.py) on vLLM's CPU build.

The worker extension records every token's hidden state while the prompt is prefilled in chunks
and the forced tokens are decoded one per step; the LM head applied to them must reproduce the
logprobs vLLM itself returns for the prompt tokens (the proof that the benchmark's full-vocabulary
KL is computed from the distributions vLLM serves), the forced decode must follow the given tokens,
and the capture must align with the sequences (any missing or extra row would raise).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")


def test_capture_reproduces_vllm_logprobs(tmp_path):
    import torch

    from benchmarks.accuracy.report import ModelEvaluation
    from benchmarks.accuracy.schemes import BY_NAME, EngineSettings, engine_kwargs
    from benchmarks.harness import benchmarks_path
    from vllm_kvquant.tiny_model import TinyLlamaSpec, make_tiny_llama

    model_dir = make_tiny_llama(tmp_path / "tiny", TinyLlamaSpec(num_hidden_layers=1))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 500, (n,), generator=g).tolist() for n in (70, 45)]
    forced = [torch.randint(3, 500, (n,), generator=g).tolist() for n in (5, 3)]
    windows = tmp_path / "windows.json"
    windows.write_text(json.dumps({"prompts": prompts, "forced": forced}))
    settings = EngineSettings(max_model_len=128, chunk=32, kv_cache_memory_bytes=32 * 2**20, cuda=False)
    task = {
        "label": "plain/bf16",
        "engine": engine_kwargs(BY_NAME["bf16"], model_dir, settings),
        "windows": str(windows),
        "capture": str(tmp_path / "cap.pt"),
        "result": str(tmp_path / "res.json"),
    }
    (tmp_path / "task.json").write_text(json.dumps(task))
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0",
               PYTHONPATH=os.pathsep.join([str(benchmarks_path()), os.environ.get("PYTHONPATH", "")]))  # fmt: skip
    proc = subprocess.run([sys.executable, "-P", "-m", "benchmarks.accuracy.engine", str(tmp_path / "task.json")],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=400)  # fmt: skip
    res = json.loads((tmp_path / "res.json").read_text())
    assert proc.returncode == 0 and "error" not in res, (res.get("error"), proc.stdout[-3000:], proc.stderr[-3000:])
    # prompt rows + one row per fed decode token (the last forced token is sampled, never fed)
    assert res["capture"]["rows"] == sum(len(p) + len(f) - 1 for p, f in zip(prompts, forced))
    assert res["backend"] and res["kv_capacity_tokens"] > 0
    ev = ModelEvaluation(model_dir, prompts, forced, tmp_path / "cap.pt", "cpu")
    m = ev.metrics(tmp_path / "cap.pt", "plain/bf16", res["vllm_prompt_logprobs"])
    assert m["kl_mean"] == 0 and m["top1"] == 1 and m["tokens"] == sum(len(p) + len(f) - 1 for p, f in zip(prompts, forced))
    assert m["decode"]["tokens"] == sum(len(f) - 1 for f in forced)
    # the LM head on the recorded hidden states gives vLLM's own logprobs (fp32 vs float64 log_softmax)
    assert m["logprob_vs_vllm_max_abs"] < 1e-3, m
    assert m["ppl_prompt"] == pytest.approx(m["ppl_prompt_vllm"], rel=1e-4)
