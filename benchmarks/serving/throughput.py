"""Serving throughput when the KV cache limits concurrency: Llama-3-8B shapes, dummy weights.

A ``config.json`` with Llama-3-8B's dimensions (hidden 4096, 32 layers, 32 query / 8 KV heads
of 128, intermediate 14336, vocab 128256, rope_theta 500000, bf16) and a small locally trained
tokenizer are written to ``--workdir``; vLLM loads it with ``load_format="dummy"`` (random
weights: nothing is downloaded; prompts are random token ids and ``ignore_eos=True``, so every
request produces exactly ``--output-len`` tokens whatever the weights are).

``gpu_memory_utilization`` (default 0.35 of an 80 GB H100 = 28 GB: ~16 GB weights, ~10 GB KV at
bf16) keeps the cache small enough that it, not the batch limit, caps concurrency; an 8-bit
cache holds twice the tokens, so more sequences run at once.

Each config runs in its own subprocess (``--one NAME --json PATH``) so its GPU memory is freed;
the configs are in ``throughput_configs.py``: vLLM's FLASH_ATTN with a bf16 or fp8 cache
(``vllm-bf16``, ``vllm-fp8-flash``), TRITON_ATTN fp8 / int8-per-token-head, kvquant fp8 / int8
(per-head sidecars of plausible scales), kvquant fp8 with FA3's decode kernel
(``kvquant-fp8-fa3``), and ``*-full`` variants with ``cudagraph_mode=FULL``. A config listed twice
in ``--configs`` starts twice (rows ``NAME`` and ``NAME#2``): the spread between engine starts
against the spread within one.

Engines start without torch.compile and capture full CUDA graphs for pure-decode steps only
(``compilation_config={"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"}``, the same for every
config); ``--compile`` uses vLLM's default compilation instead (~1 min per engine start on an
H200). Configs that would start past ``--time-budget`` are recorded as skipped.

Per config: a short warm-up, then the whole workload in one ``llm.generate``, ``--repeats`` times
(default 3) on the same engine; reported per run (``runs``): output tokens/s and total tokens/s
(wall), and - sampled every 0.2 s from ``llm.get_metrics()`` - the peak of
``vllm:num_requests_running``, the peak KV usage and the preemption count; per row: the median,
min and max output tokens/s (``output_tokens_per_s`` is the median), KV capacity in tokens
(``num_gpu_blocks * block_size``), theoretical max concurrency (capacity // (input_len +
output_len)) and ``cudagraph_mode``, the mode the worker settled on.

Results: ``benchmarks/results/throughput-<device>-<in>x<out>.json`` (copied to ``$OUT`` when
set), rewritten after every config; parts of one workload run in separate calls merge with
``merge_throughput.py``. ``--smoke``: a tiny model and workload for a CPU check.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

from benchmarks.serving.run_timing import summarize_runs, timed_run
from benchmarks.serving.throughput_configs import (  # CONFIGS: also read by benchmarks/tp/check.py
    CONFIGS,
    DEFAULT_CONFIGS,
    LLAMA3_8B,
    SMOKE_CONFIGS,
    SMOKE_MODEL,
    engine_kwargs,
    make_prompts,
    plan_rows,
    requested_cudagraph_mode,
)

REPO = Path(__file__).resolve().parents[2]


def log(*a) -> None:
    print("[throughput]", *a, flush=True)


# ----------------------------------------------------------------------------- model dir
def write_model_dir(path: Path, config: dict, tool: str = "benchmarks.serving.throughput") -> dict[str, Path]:
    """config.json + tokenizer + per-head sidecars of plausible scales for both 8-bit formats
    (``tool``: the sidecars' calibration tool; serve_load.py writes its model here too)."""
    import torch

    from vllm_kvquant.scales import CalibrationInfo, ModelFacts, build_scales_file, save_scales
    from vllm_kvquant.tiny_model import corpus_text, train_bpe_tokenizer

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=1))
    if not (path / "tokenizer.json").exists():
        train_bpe_tokenizer(corpus_text().splitlines(), 512).save_pretrained(path)
    n_layers, n_kv = config["num_hidden_layers"], config["num_key_value_heads"]
    names = [f"model.layers.{i}.self_attn.attn" for i in range(n_layers)]
    facts = ModelFacts(n_layers, n_kv, config["head_dim"], tuple(names))
    info = CalibrationInfo(method="absmax", tool=tool, tool_version="0",
                           data="synthetic plausible amax (|K| 16, |V| 4): dummy weights")  # fmt: skip
    stats = {n: (torch.full((n_kv,), 16.0), torch.full((n_kv,), 4.0)) for n in names}
    sidecars = {}
    for dtype in ("fp8_e4m3", "int8"):
        sidecars[dtype] = path / f"scales-{dtype}.json"
        save_scales(build_scales_file(stats, dtype, "per_head", facts, info), sidecars[dtype])
    return sidecars


# ----------------------------------------------------------------------------- one config (child)
def describe_engine(llm, row: dict, per_seq: int) -> None:
    """What the engine really runs, into ``row``: KV capacity, attention backend, the CUDA-graph mode
    the worker settled on (after vLLM checked the backend's support), batch limits."""
    cache = llm.llm_engine.vllm_config.cache_config
    row["block_size"] = int(cache.block_size)
    row["num_gpu_blocks"] = int(cache.num_gpu_blocks or 0)
    row["kv_capacity_tokens"] = row["num_gpu_blocks"] * row["block_size"]
    row["kv_cache_dtype"] = str(cache.cache_dtype)
    try:
        layers = llm.collective_rpc("bench_attention_scales")[0]
        first = layers[min(layers, key=lambda n: [int(p) if p.isdigit() else p for p in n.split(".")])]
        row["backend"] = first.get("backend")
    except Exception as e:  # noqa: BLE001
        row["backend_report_error"] = f"{type(e).__name__}: {e}"
    try:  # the mode the worker settled on, after vLLM checked what the attention backend supports
        row["cudagraph_mode"] = llm.collective_rpc("kvquant_step_report")[0]["cudagraph_mode"]
    except Exception as e:  # noqa: BLE001
        row["cudagraph_mode"] = None
        row["cudagraph_mode_error"] = f"{type(e).__name__}: {e}"
    row["max_num_seqs"] = int(llm.llm_engine.vllm_config.scheduler_config.max_num_seqs)
    row["max_num_batched_tokens"] = int(llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens)
    row["theoretical_max_concurrency"] = min(row["kv_capacity_tokens"] // per_seq, row["max_num_seqs"])


def run_one(args) -> dict:
    from vllm import LLM, SamplingParams

    from benchmarks.harness import BENCH_EXTENSION_PATH, expose_benchmarks

    expose_benchmarks()
    config = args.one
    model_dir = args.workdir / "model"
    kw = engine_kwargs(config, model_dir, args, worker_extension_cls=BENCH_EXTENSION_PATH)
    keys = ("attention_backend", "kv_cache_dtype", "compilation_config", "enforce_eager", "additional_config")
    row: dict = {"name": args.row_name or config, "config": config, "kv_dtype": CONFIGS[config]["kv_dtype"],
                 "engine_kwargs": {k: v for k, v in kw.items() if k in keys},
                 "cudagraph_mode_requested": requested_cudagraph_mode(kw)}  # fmt: skip
    t0 = time.time()
    llm = LLM(**kw)
    row["engine_start_s"] = round(time.time() - t0, 1)
    describe_engine(llm, row, args.input_len + args.output_len)

    prompts = make_prompts(model_dir, args.num_requests, args.input_len, args.seed)
    warm = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, detokenize=False)
    t0 = time.time()
    llm.generate(prompts[: min(len(prompts), args.warmup_requests)], warm, use_tqdm=False)
    row["warmup_s"] = round(time.time() - t0, 1)

    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True, detokenize=False)
    row.update({"num_requests": args.num_requests, "input_len": args.input_len, "output_len": args.output_len})
    runs = []
    for i in range(args.repeats):  # the same workload again on the same engine (no prefix caching)
        runs.append(timed_run(llm, prompts, params, args.input_len))
        log(f"{row['name']} run {i + 1}/{args.repeats}: {runs[-1]['output_tokens_per_s']} output tok/s")
    row["runs"] = runs
    row.update(summarize_runs(runs))
    # Older readers (plots, benchmarks/tp/check.py): the median run's numbers at the top level.
    mid = sorted(runs, key=lambda r: r["output_tokens_per_s"])[(len(runs) - 1) // 2]
    for key in ("wall_s", "output_tokens", "total_tokens_per_s", "peak_running_requests", "peak_waiting_requests",
                "peak_kv_cache_usage", "preemptions"):  # fmt: skip
        if key in mid:
            row[key] = mid[key]
    row["output_tokens_per_s"] = row["median_output_tokens_per_s"]
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # noqa: BLE001
        pass
    return row


# ----------------------------------------------------------------------------- parent
def print_table(rows: list[dict]) -> None:
    ok = {r["name"]: r for r in rows if not r.get("error")}
    ref = ok.get("vllm-bf16") or ok.get("vllm-bf16-auto")
    print("\nconfig                 backend    graphs               KV cap(tok) peak-run preempt "
          "out tok/s (median, min-max)  vs bf16 start s")
    for r in rows:
        if r.get("error"):
            print(f"{r['name']:<22} ERROR {r['error'][:150]}")
            continue
        rel = f"{r['output_tokens_per_s'] / ref['output_tokens_per_s']:.2f}x" if ref else "-"
        rng = f"{r.get('min_output_tokens_per_s', '-')}-{r.get('max_output_tokens_per_s', '-')}"
        print(
            f"{r['name']:<22} {str(r.get('backend')):<10} {str(r.get('cudagraph_mode')):<20} "
            f"{r['kv_capacity_tokens']:>11} {str(r.get('peak_running_requests')):>8} {str(r.get('preemptions', '-')):>7} "
            f"{r['output_tokens_per_s']:>9.1f} ({rng:<15}) {rel:>7} {r['engine_start_s']:>7}"
        )


def parse_args(argv=None, description: str | None = None, extend=None):
    """The options; ``extend(parser)`` adds a tool's own (profile_step.py shares the rest)."""
    ap = argparse.ArgumentParser(description=description or __doc__.splitlines()[0])
    if extend is not None:
        extend(ap)
    ap.add_argument("--configs", default=None,
                    help=f"comma-separated, in run order (default {','.join(DEFAULT_CONFIGS)}); known: {','.join(CONFIGS)}")
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=512)
    ap.add_argument("--warmup-requests", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of the workload per engine, after the warm-up")
    ap.add_argument("--gpu-memory-utilization", type=float, default=None, help="default 0.35 (GPU) / 0.3 (CPU)")
    ap.add_argument("--max-num-seqs", type=int, default=None, help="default: vLLM's")
    ap.add_argument("--max-num-batched-tokens", type=int, default=None,
                    help="default: vLLM's (offline LLM 16384 on an H100/H200; `vllm serve` uses 8192)")
    ap.add_argument("--compile", dest="fast_start", action="store_false",
                    help="vLLM's default compilation (torch.compile + piecewise/full CUDA graphs); default: "
                         "no torch.compile, full CUDA graphs for pure-decode steps only (engine start ~2-3x faster)")
    ap.add_argument("--eager", action="store_true", help="enforce_eager (no CUDA graphs)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/kvquant-throughput"))
    ap.add_argument("--out", type=Path, default=None, help="default benchmarks/results/throughput-<device>.json")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs per engine (tensor parallel)")
    ap.add_argument("--time-budget", type=float, default=470.0, help="seconds; configs that would start past it are skipped")
    ap.add_argument("--child-timeout", type=float, default=300.0, help="seconds per config subprocess")
    ap.add_argument("--smoke", action="store_true", help="tiny model and workload (CPU check)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--row-name", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.smoke:
        args.num_requests, args.input_len, args.output_len, args.warmup_requests = 12, 64, 16, 2
        args.repeats = min(args.repeats, 2)
        args.workdir = args.workdir.with_name(args.workdir.name + "-smoke")
        args.eager = True
        args.time_budget = 1e9
    if args.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.gpu_memory_utilization is None:
        import torch

        args.gpu_memory_utilization = 0.35 if torch.cuda.is_available() else 0.3
    args.workdir = args.workdir.resolve()
    return args


def child_argv(args, row_name: str, config: str, json_path: Path, module: str = "benchmarks.serving.throughput") -> list[str]:
    argv = [sys.executable, "-m", module, "--one", config, "--row-name", row_name,
            "--json", str(json_path), "--repeats", str(args.repeats),
            "--num-requests", str(args.num_requests), "--input-len", str(args.input_len),
            "--output-len", str(args.output_len), "--warmup-requests", str(args.warmup_requests),
            "--gpu-memory-utilization", str(args.gpu_memory_utilization), "--workdir", str(args.workdir),
            "--seed", str(args.seed)]  # fmt: skip
    if args.max_num_seqs:
        argv += ["--max-num-seqs", str(args.max_num_seqs)]
    if args.max_num_batched_tokens:
        argv += ["--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    if args.tensor_parallel_size > 1:
        argv += ["--tensor-parallel-size", str(args.tensor_parallel_size)]
    if not args.fast_start:
        argv.append("--compile")
    if args.eager:
        argv.append("--eager")
    return argv


def run_in_group(argv: list[str], timeout: float) -> int | None:
    """Run a child in its own process group; on timeout end that group (the child and its engine
    process) so the GPU memory is freed. Returns the exit code, or None on timeout."""
    from benchmarks.harness import expose_benchmarks

    expose_benchmarks()  # the child runs `-m benchmarks.serving.throughput` from any working directory
    proc = subprocess.Popen(argv, start_new_session=True)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=15)
                break
            except subprocess.TimeoutExpired:
                continue
        return None


def run_child(args, fn) -> int:
    """A child's work: ``fn(args)`` (one engine) with the process output kept, so that a failure's
    row names the root cause; the row goes to ``--json``."""
    from benchmarks.harness import OutputTee, root_cause

    tee = OutputTee()
    try:
        with tee:
            row = fn(args)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        cause = root_cause(tee.text())
        err = f"{type(e).__name__}: {e}"
        if cause and cause not in str(e):
            err = f"{cause} [{err}]"
        row = {"name": args.row_name or args.one, "config": args.one,
               "kv_dtype": CONFIGS.get(args.one, {}).get("kv_dtype"), "error": err[:4000]}  # fmt: skip
    args.json.write_text(json.dumps(row))
    return 0


def skip_reason(elapsed: float, durations: list[float], budget: float) -> str | None:
    """Why the next config must not start: it would not end within ``budget`` seconds of the run's
    start, judged by the longest config so far (60 s before the first)."""
    estimate = max(durations) if durations else 60.0
    if elapsed + estimate > budget:
        return f"skipped: time budget ({elapsed:.0f} s + ~{estimate:.0f} s per config > --time-budget {budget:.0f} s)"
    return None


def run_rows(
    args, plan: list[tuple[str, str]], result: dict, out_path: Path, t_start: float, run=None, argv_fn=None
) -> None:  # fmt: skip
    """Each planned row in its own subprocess (``argv_fn(args, row_name, config, json_path)``, default
    :func:`child_argv`, run by ``run(argv, timeout)``, default :func:`run_in_group`), the results file
    rewritten after each; rows that would not fit the time budget are recorded as skipped."""
    from benchmarks.harness import write_result

    run = run or run_in_group
    argv_fn = argv_fn or child_argv
    durations: list[float] = []
    for row_name, config in plan:
        base = {"name": row_name, "config": config, "kv_dtype": CONFIGS[config]["kv_dtype"]}
        elapsed = time.time() - t_start
        reason = skip_reason(elapsed, durations, args.time_budget)
        if reason:
            result["rows"].append({**base, "error": reason})
            write_result(out_path, result)
            continue
        json_path = args.workdir / f"row-{row_name.replace('#', '-')}.json"
        json_path.unlink(missing_ok=True)
        t0 = time.time()
        log(f"=== {row_name}")
        timeout = max(30.0, min(args.child_timeout, args.time_budget - elapsed + 60.0))
        rc = run(argv_fn(args, row_name, config, json_path), timeout)
        if json_path.exists():
            row = json.loads(json_path.read_text())
        elif rc is None:
            row = {**base, "error": f"timed out after {timeout:.0f} s"}
        else:
            row = {**base, "error": f"child exited {rc} without a result"}
        row["subprocess_s"] = round(time.time() - t0, 1)
        durations.append(row["subprocess_s"])
        result["rows"].append(row)
        write_result(out_path, result)
        log(json.dumps({k: v for k, v in row.items() if k != "runs"})[:800])


def start_result(args, argv, module: str, names: list[str]) -> tuple[list[tuple[str, str]], dict, dict]:
    """The parent's set-up (shared with profile_step.py): the row plan, the model directory, the
    copy bandwidth measured now, and the results file's common top level."""
    import torch

    from benchmarks.common import device_info, versions
    from benchmarks.harness import command

    try:
        plan = plan_rows(names)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    model_config = SMOKE_MODEL if args.smoke else LLAMA3_8B
    copy_gbps = None
    if torch.cuda.is_available():  # the card's copy bandwidth, measured in this run
        from benchmarks.common import measure_copy_gbps

        copy_gbps = round(measure_copy_gbps(), 1)
        torch.cuda.empty_cache()
    write_model_dir(args.workdir / "model", model_config)
    result = {
        "device": device_info(),
        "versions": versions(),
        "command": command(module, argv),
        # vLLM's default compilation (torch.compile, FULL_AND_PIECEWISE graphs) or the fast-start mode.
        "compile": not args.fast_start and not args.eager,
        "copy_gbps": copy_gbps,
        "workload": {"num_requests": args.num_requests, "input_len": args.input_len, "output_len": args.output_len,
                     "prompts": "random token ids, ignore_eos=True, greedy", "load_format": "dummy",
                     "gpu_memory_utilization": args.gpu_memory_utilization, "fast_start": args.fast_start,
                     "eager": args.eager},
    }  # fmt: skip
    return plan, model_config, result


def run_and_finish(args, plan, result: dict, out_path: Path, t_start: float, table, argv_fn=None) -> None:
    """Every row (:func:`run_rows`), then the total time, the file and the table."""
    from benchmarks.harness import write_result

    result["rows"] = []
    write_result(out_path, result)
    run_rows(args, plan, result, out_path, t_start, argv_fn=argv_fn)
    result["total_seconds"] = round(time.time() - t_start, 1)
    write_result(out_path, result)
    table(result["rows"])
    print(f"\nwrote {out_path} ({result['total_seconds']} s)")


def main(argv=None) -> int:
    t_start = time.time()
    args = parse_args(argv)
    if args.one:  # child: one config, result to --json
        return run_child(args, run_one)

    from benchmarks.harness import device_slug

    if args.configs:
        names = [n.strip() for n in args.configs.split(",") if n.strip()]
    else:
        names = SMOKE_CONFIGS if args.smoke else DEFAULT_CONFIGS
    plan, model_config, result = start_result(args, argv, "benchmarks.serving.throughput", names)
    workload = f"{args.input_len}x{args.output_len}"
    out_path = args.out or REPO / "benchmarks" / "results" / f"throughput-{device_slug()}-{workload}{'-smoke' if args.smoke else ''}.json"
    result.update({
        "model": {k: model_config[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                               "num_key_value_heads", "head_dim", "intermediate_size", "vocab_size")},
        "tensor_parallel_size": args.tensor_parallel_size,
        "repeats": args.repeats,
    })  # fmt: skip
    run_and_finish(args, plan, result, out_path, t_start, print_table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
