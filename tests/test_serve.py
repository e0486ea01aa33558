"""``vllm serve MODEL --attention-backend kvquant`` queried with the ``openai`` client.

Completions and chat, streaming and not; 64 concurrent greedy requests with no errors whose
outputs equal a sequential run's. The server listens on 127.0.0.1 only and is always stopped.
Runs on the GPU (Triton kernels, CUDA graphs) and, in CI, on vLLM's CPU build (the backend's
reference path): the same server, requests and checks.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("vllm")
from serve_client import (  # noqa: E402 - tests/ is on sys.path under pytest
    completions_and_chat,
    concurrent_vs_sequential,
    on_gpu,
)

NUM_CONCURRENT = 64


@pytest.fixture(scope="module")
def server(kvquant_server):
    """The session's kvquant server (tests/conftest.py), also used by tests/test_serve_bad_input.py."""
    url, log, _ = kvquant_server
    return url, log


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
