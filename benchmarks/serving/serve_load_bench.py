"""``vllm bench serve`` runs of the serve-load harness: vLLM's own client drives the server, and
each run's ``--save-result`` JSON becomes one results row."""

from __future__ import annotations

import json
import math
import subprocess
import time
from pathlib import Path

from benchmarks.serving.serve_load_env import bench_command, server_env
from benchmarks.serving.serve_load_server import stop_group

#: The bench JSON's figures copied into a row (mean, p50, p99 of each latency).
LATENCIES = ("ttft", "tpot", "itl", "e2el")


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

