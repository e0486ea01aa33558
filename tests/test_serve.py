"""``vllm serve MODEL --attention-backend kvquant`` queried with the ``openai`` client.

Completions and chat, streaming and not; 64 concurrent greedy requests with no errors whose
outputs equal a sequential run's. The server listens on 127.0.0.1 only and is always stopped.
Runs on the GPU (Triton kernels, CUDA graphs) and, in CI, on vLLM's CPU build (the backend's
reference path): the same server, requests and checks.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("vllm")
from serve_client import (  # noqa: E402 - tests/ is on sys.path under pytest
    completions_and_chat,
    concurrent_vs_sequential,
    on_gpu,
    running_server,
    server_env,
)

NUM_CONCURRENT = 64


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from vllm_kvquant.tiny_model import TRAINED_TINY_LLAMA, corpus_text, make_tiny_llama

    root = tmp_path_factory.mktemp("serve")
    model_dir = make_tiny_llama(root / "tiny", TRAINED_TINY_LLAMA)
    data = root / "calib.txt"
    data.write_text(corpus_text())
    subprocess.run(
        [sys.executable, "-m", "vllm_kvquant.cli", "calibrate", str(model_dir), "--data", str(data),
         "--num-samples", "16", "--seq-len", "128", "--dtype", "fp8_e4m3", "--model-dtype", "bfloat16",
         "--gpu-memory-utilization", "0.2"],
        check=True, capture_output=True, timeout=900, cwd=root, env=server_env(),
    )  # fmt: skip
    # prefill "quantized": a repeated greedy request (the streamed one below, which hits the prefix
    # cache) attends to the same 8-bit values as the first, so it must give the same text.
    args = ["--attention-backend", "kvquant", "--dtype", "bfloat16", "--gpu-memory-utilization", "0.2",
            "--max-model-len", "1024", "--enable-prefix-caching", "--enable-chunked-prefill",
            "--additional-config", json.dumps({"kvquant": {"prefill": "quantized"}})]  # fmt: skip
    with running_server(model_dir, root / "server.log", args) as url:
        yield url, root / "server.log"


def test_completions_and_chat(server) -> None:
    url, log = server
    got = completions_and_chat(url)
    assert got["completion"] and got["completion_tokens"] == 12
    assert got["stream_equal"], got
    assert got["chat"]
    assert got["chat_stream_equal"], got
    assert "store fp8_e4m3 K/V with per_head scales from" in log.read_text()


def test_concurrent_requests_equal_sequential(server) -> None:
    url, _ = server
    got = concurrent_vs_sequential(url, NUM_CONCURRENT)
    print("SERVE", json.dumps({"device": "gpu" if on_gpu() else "cpu", **got}))
    assert got["errors"] == 0, got["error_samples"]
    equal = got["equal_to_sequential"]
    assert equal == NUM_CONCURRENT, f"{NUM_CONCURRENT - equal} concurrent outputs differ from the sequential run"
