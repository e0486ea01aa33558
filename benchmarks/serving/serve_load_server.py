"""The ``vllm serve`` process of the serve-load harness and what its ``/metrics`` says: start it,
wait until healthy, always stop its whole process group; sample KV usage under load and wait
until nothing is left running (no leaked blocks)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import requests

from benchmarks.serving.serve_load_env import server_env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group, then SIGKILL: the server and its engine processes."""
    for sig, wait in ((signal.SIGTERM, 60), (signal.SIGKILL, 30)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@contextmanager
def running_server(cmd: list[str], log_path: Path, timeout_s: float, env: dict[str, str] | None = None):
    """Start ``cmd`` (with ``--host/--port`` added) in its own session; yield its URL once
    ``/health`` answers; always stop it. The log tail is printed if it never becomes healthy."""
    port = free_port()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    logf = open(log_path, "w")
    proc = subprocess.Popen([*cmd, "--host", "127.0.0.1", "--port", str(port)], stdout=logf, stderr=subprocess.STDOUT,
                            start_new_session=True, env=env or server_env())  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout_s
        while True:
            if proc.poll() is not None:
                logf.flush()
                raise RuntimeError(f"server exited with {proc.returncode}: {log_path.read_text()[-3000:]}")
            try:
                if requests.get(url + "/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.time() > deadline:
                logf.flush()
                raise TimeoutError(f"server not healthy in {timeout_s:.0f} s: {log_path.read_text()[-3000:]}")
            time.sleep(1)
        yield url
    finally:
        stop_group(proc)
        logf.close()


_STARTUP = re.compile(r"kvquant: |KV cache size|Maximum concurrency|[Uu]sing \S+ (attention )?backend|cudagraph_mode")


def startup_lines(log_path: Path, limit: int = 12) -> list[str]:
    """The server log's lines that say what runs: kvquant's layers and scales, the attention
    backend, the KV-cache size (messages, without vLLM's prefix)."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    keep = [re.sub(r"^\(\w+ pid=\d+\) \w+ \S+ \S+ \[[^]]*\] ", "", ln)[:300] for ln in lines if _STARTUP.search(ln)]
    return keep[:limit]


_NOTABLE = re.compile(r"JIT compilation during inference|Traceback|\bERROR\b|\bWARNING\b")


def notable_lines(log_path: Path, limit: int = 20) -> dict:
    """What in a server log says something went wrong while serving: Triton JIT compilations
    during inference (each a stall of the requests in flight), warnings, errors (messages,
    without vLLM's prefix; at most ``limit`` kept, all counted)."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return {"jit_during_inference": None, "warnings": None, "errors": None, "lines": []}
    hits = [ln for ln in lines if _NOTABLE.search(ln)]
    return {
        "jit_during_inference": sum("JIT compilation during inference" in ln for ln in hits),
        "warnings": sum(bool(re.search(r"\bWARNING\b", ln)) for ln in hits),
        "errors": sum(bool(re.search(r"\bERROR\b|Traceback", ln)) for ln in hits),
        "lines": [re.sub(r"^\(\w+ pid=\d+\) ", "", ln)[:300] for ln in hits[:limit]],
    }


def served_model(url: str) -> dict:
    """The first model the server lists (``id``, ``max_model_len``)."""
    data = requests.get(url + "/v1/models", timeout=30).json()["data"][0]
    return {"id": data["id"], "max_model_len": data.get("max_model_len")}


# ----------------------------------------------------------------------------- /metrics
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> ``{name: value summed over label sets}`` (``vllm:kv_cache_usage_perc`` etc.)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            continue
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        out[m.group(1)] = out.get(m.group(1), 0.0) + value
    return out


def read_metrics(url: str) -> dict[str, float]:
    return parse_metrics(requests.get(url + "/metrics", timeout=10).text)


def kv_usage(metrics: dict[str, float]) -> float | None:
    # vllm:kv_cache_usage_perc (v1); older releases: vllm:gpu_cache_usage_perc
    for name in ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"):
        if name in metrics:
            return metrics[name]
    return None


def generated_tokens(metrics: dict[str, float]) -> float | None:
    for name in ("vllm:generation_tokens_total", "vllm:generation_tokens"):
        if name in metrics:
            return metrics[name]
    return None


class MetricsSampler(threading.Thread):
    """Samples ``/metrics`` every ``period`` s: peaks of KV-cache usage and running/waiting requests."""

    def __init__(self, url: str, period: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.url, self.period = url, period
        self.stop_event = threading.Event()
        self.peak = {"kv_cache_usage": 0.0, "running": 0.0, "waiting": 0.0}
        self.samples, self.errors = 0, 0

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                m = read_metrics(self.url)
                self.peak["kv_cache_usage"] = max(self.peak["kv_cache_usage"], kv_usage(m) or 0.0)
                self.peak["running"] = max(self.peak["running"], m.get("vllm:num_requests_running", 0.0))
                self.peak["waiting"] = max(self.peak["waiting"], m.get("vllm:num_requests_waiting", 0.0))
                self.samples += 1
            except Exception:  # noqa: BLE001 - counted
                self.errors += 1
            self.stop_event.wait(self.period)

    def stop(self) -> dict:
        self.stop_event.set()
        self.join(timeout=10)
        return {"peak_kv_cache_usage": round(self.peak["kv_cache_usage"], 4), "peak_running": int(self.peak["running"]),
                "peak_waiting": int(self.peak["waiting"]), "metric_samples": self.samples}  # fmt: skip


def wait_drained(url: str, timeout_s: float) -> dict:
    """Poll until no request runs or waits and KV-cache usage is 0 (no leaked blocks)."""
    t0 = time.time()
    last: dict[str, float] = {}
    while True:
        try:
            last = read_metrics(url)
        except requests.RequestException as e:
            last = {"error": str(e)[:200]}  # type: ignore[dict-item]
        usage = kv_usage(last) if "error" not in last else None
        running, waiting = last.get("vllm:num_requests_running"), last.get("vllm:num_requests_waiting")
        drained = usage == 0.0 and running == 0.0 and waiting == 0.0
        if drained or time.time() - t0 > timeout_s:
            return {"ok": drained, "kv_cache_usage_perc": usage, "num_requests_running": running,
                    "num_requests_waiting": waiting, "seconds": round(time.time() - t0, 1),
                    "metric": "vllm:kv_cache_usage_perc" if "vllm:kv_cache_usage_perc" in last else
                    ("vllm:gpu_cache_usage_perc" if "vllm:gpu_cache_usage_perc" in last else None)}  # fmt: skip
        time.sleep(0.5)

