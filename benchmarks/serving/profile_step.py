"""Where each engine step's GPU time goes, kvquant fp8 against vLLM's fp8: the throughput workload
under ``torch.profiler``.

Each config (default ``kvquant-fp8,vllm-fp8-flash``; the engines of ``throughput_configs.py``)
runs in its own subprocess: the engine starts with vLLM's profiler (``profiler_config``:
``profiler="torch"``, CPU and CUDA activities, no stacks or shapes), serves a short warm-up, then
``llm.start_profile()``, the workload of ``throughput.py`` (``--num-requests`` prompts of
``--input-len`` random tokens, ``--output-len`` tokens each), ``llm.stop_profile()``. The worker
records ``--max-iterations`` engine steps after skipping ``--delay-iterations`` (the first steps
of the workload are its prefill ramp: prefill-only, then mixed steps, then decodes), writes a
chrome trace, and ``trace_analysis.py`` turns it into GPU time per decode step and per mixed
step by category (decode attention, prefill attention, cache write, GEMMs, other kernels) plus
the idle GPU time between kernels (host gaps), and the top 10 kernels; ``idle`` per step kind
says where the idle time goes (the kernels around each gap, the host ops that launched the next
one, and the host syncs with the ops they ran under; ``--with-stack`` adds Python frames).

The profiler adds host time (every op is recorded), so ``idle_us`` is an upper bound of the host
gaps without it and the profiled run's tokens/s (``profiled_run``) is below ``throughput.py``'s;
the kernel times are the kernels'.

Results: ``benchmarks/results/profile-<device>.json`` (top level: device, versions, command,
copy_gbps, compile, workload, window, the kernel table; ``rows``), rewritten after every config.
The traces stay in ``--workdir`` (``--keep-traces``; deleted otherwise).

    python -m benchmarks.serving.profile_step --compile --gpu-memory-utilization 0.2
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from benchmarks.serving import throughput as thr
from benchmarks.serving import trace_analysis
from benchmarks.serving.run_timing import timed_run
from benchmarks.serving import throughput_configs as tc

REPO = Path(__file__).resolve().parents[2]
MODULE = "benchmarks.serving.profile_step"
DEFAULT_CONFIGS = ["kvquant-fp8", "vllm-fp8-flash"]


def _extend(ap) -> None:
    ap.add_argument("--delay-iterations", type=int, default=0, help="engine steps skipped after start_profile")
    ap.add_argument("--max-iterations", type=int, default=160, help="engine steps recorded")
    ap.add_argument("--keep-traces", action="store_true", help="keep the chrome traces in --workdir")
    ap.add_argument("--with-stack", action="store_true",
                    help="record Python frames too (idle gaps and host syncs then name the Python function; "
                         "more profiler overhead)")


def parse_args(argv=None):
    args = thr.parse_args(argv, description=__doc__.splitlines()[0], extend=_extend)
    if args.max_iterations < 1 or args.delay_iterations < 0:
        raise SystemExit(f"--max-iterations must be >= 1 and --delay-iterations >= 0, got {args.max_iterations}, "
                         f"{args.delay_iterations}")  # fmt: skip
    return args


def profiler_config(trace_dir: Path, args) -> dict:
    """vLLM's ``ProfilerConfig`` (0.26) for one engine: torch profiler, a bounded window of steps."""
    return {
        "profiler": "torch", "torch_profiler_dir": str(trace_dir), "torch_profiler_with_stack": bool(args.with_stack),
        "torch_profiler_record_shapes": False, "torch_profiler_use_gzip": True,
        "torch_profiler_dump_cuda_time_total": False, "delay_iterations": args.delay_iterations,
        "max_iterations": args.max_iterations, "ignore_frontend": True,
    }  # fmt: skip


def find_trace(trace_dir: Path, wait_s: float = 120.0) -> Path:
    """The newest chrome trace the worker wrote (waits for its export to finish)."""
    deadline = time.time() + wait_s
    while True:
        traces = sorted(trace_dir.glob("*.pt.trace.json*"), key=lambda p: p.stat().st_mtime)
        if traces:
            size = traces[-1].stat().st_size
            time.sleep(1.0)
            if traces[-1].stat().st_size == size:
                return traces[-1]
        elif time.time() > deadline:
            raise FileNotFoundError(f"no torch profiler trace in {trace_dir} after {wait_s:.0f} s")
        else:
            time.sleep(1.0)


def run_profiled(args) -> dict:
    from vllm import LLM, SamplingParams

    from benchmarks.harness import BENCH_EXTENSION_PATH, expose_benchmarks

    expose_benchmarks()
    config, row_name = args.one, args.row_name or args.one
    model_dir = args.workdir / "model"
    trace_dir = args.workdir / f"trace-{row_name.replace('#', '-')}"
    shutil.rmtree(trace_dir, ignore_errors=True)
    trace_dir.mkdir(parents=True)
    kw = tc.engine_kwargs(config, model_dir, args, worker_extension_cls=BENCH_EXTENSION_PATH,
                       profiler_config=profiler_config(trace_dir, args))  # fmt: skip
    row: dict = {"name": row_name, "config": config, "kv_dtype": tc.CONFIGS[config]["kv_dtype"],
                 "cudagraph_mode_requested": tc.requested_cudagraph_mode(kw)}  # fmt: skip
    t0 = time.time()
    llm = LLM(**kw)
    row["engine_start_s"] = round(time.time() - t0, 1)
    thr.describe_engine(llm, row, args.input_len + args.output_len)
    prompts = tc.make_prompts(model_dir, args.num_requests, args.input_len, args.seed)
    warm = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, detokenize=False)
    llm.generate(prompts[: min(len(prompts), args.warmup_requests)], warm, use_tqdm=False)
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True, detokenize=False)
    llm.start_profile()
    row["profiled_run"] = timed_run(llm, prompts, params, args.input_len)
    llm.stop_profile()
    trace = find_trace(trace_dir)
    row["trace_mib"] = round(trace.stat().st_size / 2**20, 1)
    t0 = time.time()
    row.update(trace_analysis.analyze(trace))
    row["analysis_s"] = round(time.time() - t0, 1)
    if args.keep_traces:
        row["trace_path"] = str(trace)
    else:
        shutil.rmtree(trace_dir, ignore_errors=True)
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # noqa: BLE001
        pass
    return row


def child_argv(args, row_name: str, config: str, json_path: Path) -> list[str]:
    argv = thr.child_argv(args, row_name, config, json_path, module=MODULE)
    argv += ["--delay-iterations", str(args.delay_iterations), "--max-iterations", str(args.max_iterations)]
    return argv + (["--keep-traces"] if args.keep_traces else []) + (["--with-stack"] if args.with_stack else [])


def print_table(rows: list[dict]) -> None:
    cats = [f"{c}_us" for c in trace_analysis.CATEGORIES]
    print("\nconfig            step     steps   span    busy    idle  " + "  ".join(c[:-3][:10] for c in cats))
    for r in rows:
        if r.get("error"):
            print(f"{r['name']:<17} ERROR {r['error'][:150]}")
            continue
        for kind, m in r["per_kind"].items():
            vals = "  ".join(f"{m[f'mean_{c}']:>10.0f}" for c in cats)
            print(f"{r['name']:<17} {kind:<8} {m['steps']:>5} {m['mean_span_us']:>7.0f} {m['mean_busy_us']:>7.0f} "
                  f"{m['mean_idle_us']:>7.0f}  {vals}")  # fmt: skip
    print("\nwhere the idle time goes (per step: us, gaps; kernel before -> after, launched under; host syncs)")
    for r in rows:
        for kind, idle in (r.get("idle") or {}).items():
            print(f"{r['name']} {kind}: {idle['host_syncs_per_step']} host syncs per step "
                  f"{[(h['call'], h['under'], h['count']) for h in idle['host_syncs'][:3]]}")
            for g in idle["idle_gaps"][:4]:
                print(f"  {g['mean_us_per_step']:>8.1f} us {g['count']:>5}x  {g['before']} -> {g['after']}"
                      f"{'  [' + g['launched_under'] + ']' if g['launched_under'] else ''}")


def main(argv=None) -> int:
    t_start = time.time()
    args = parse_args(argv)
    if args.one:  # child: one config, result to --json
        return thr.run_child(args, run_profiled)

    from benchmarks.harness import device_slug

    names = [n.strip() for n in args.configs.split(",") if n.strip()] if args.configs else DEFAULT_CONFIGS
    plan, _, result = thr.start_result(args, argv, MODULE, names)
    out_path = args.out or REPO / "benchmarks" / "results" / f"profile-{device_slug()}{'-smoke' if args.smoke else ''}.json"
    result.update({
        "window": {"delay_iterations": args.delay_iterations, "max_iterations": args.max_iterations},
        "categories": [{"category": c, "pattern": p, "matches": m} for c, p, m in trace_analysis.KERNEL_TABLE],
        "method": trace_analysis.__doc__.split("\n\n", 1)[1].strip(),
    })  # fmt: skip
    thr.run_and_finish(args, plan, result, out_path, t_start, print_table, argv_fn=child_argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
