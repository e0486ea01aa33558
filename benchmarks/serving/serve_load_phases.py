"""One config of the serve-load harness from start to stop: its server on the dummy-weight model
(warm-up, the grid under a time budget, then the checks), then the trained tiny model's phase."""

from __future__ import annotations

import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.serving.serve_load_bench import parse_grid, run_bench
from benchmarks.serving.serve_load_checks import bad_input_checks, complete, consistency_check, consistency_prompts
from benchmarks.serving.serve_load_env import has_cuda, log, serve_command
from benchmarks.serving.serve_load_model import CONFIGS, TINY_CONFIGS
from benchmarks.serving.serve_load_results import write_result
from benchmarks.serving.serve_load_server import (
    MetricsSampler, notable_lines, running_server, served_model, startup_lines, wait_drained,
)  # fmt: skip


def run_config(name: str, args, model_dir: Path, result: dict, out_path: Path, t_start: float) -> None:
    if not args.trained_only:
        load_phase(name, args, model_dir, result, out_path, t_start)
    if args.trained_check:
        result.setdefault("consistency", {})[name] = trained_consistency(name, args, result, out_path, t_start)
        write_result(out_path, result)
        log(f"{name}: consistency (trained tiny model)", json.dumps(result["consistency"][name])[:600])


def load_phase(name: str, args, model_dir: Path, result: dict, out_path: Path, t_start: float) -> None:
    """The dummy-weight server: warm-up, the grid, then consistency, no-leak and bad-input checks."""
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
                # With a margin: a run cut at its deadline is lost whole (an H100 run at 256 did not
                # finish in the 102 s left after a 96 s run at 64).
                estimate = 1.25 * max(durations) if durations else 0.0
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
    record["log_scan"] = notable_lines(workdir / "server.log")
    log(f"{name}: server log: {record['log_scan']['jit_during_inference']} JIT compilation(s) during inference, "
        f"{record['log_scan']['warnings']} warning(s), {record['log_scan']['errors']} error(s)")
    write_result(out_path, result)


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
    record["log_scan"] = notable_lines(workdir / "server.log")
    return record


