"""Serving throughput when the KV cache limits concurrency: Llama-3-8B shapes, dummy weights.

A ``config.json`` with Llama-3-8B's dimensions (hidden 4096, 32 layers, 32 query / 8 KV heads
of 128, intermediate 14336, vocab 128256, rope_theta 500000, bf16) and a small locally trained
tokenizer are written to ``--workdir``; vLLM loads it with ``load_format="dummy"`` (random
weights: nothing is downloaded; prompts are random token ids and ``ignore_eos=True``, so every
request produces exactly ``--output-len`` tokens whatever the weights are).

``gpu_memory_utilization`` (default 0.35 of an 80 GB H100 = 28 GB: ~16 GB weights, ~10 GB KV at
bf16) keeps the cache small enough that it, not the batch limit, caps concurrency; an 8-bit
cache holds twice the tokens, so more sequences run at once.

Each config runs in its own subprocess (``--one NAME --json PATH``) so its GPU memory is freed:

- ``vllm-bf16``: FLASH_ATTN, bf16 cache (the reference);
- ``vllm-fp8-flash``: FLASH_ATTN (FA3), ``kv_cache_dtype="fp8"``, scale 1.0;
- ``vllm-fp8-triton``: TRITON_ATTN, ``kv_cache_dtype="fp8"``;
- ``kvquant-fp8`` / ``kvquant-int8``: ``attention_backend="kvquant"`` with per-head sidecars of
  plausible scales (|K| <= 16, |V| <= 4) written next to the config.

Engines start without torch.compile and capture full CUDA graphs for pure-decode steps only
(``compilation_config={"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"}``, the same for every
config), so five engines fit the time budget; ``--compile`` uses vLLM's default compilation
instead (~1 min per engine start on an H100; later configs may then be skipped by
``--time-budget``).

Per config: a short warm-up (JIT compiles outside the timed region), then the whole workload
in one ``llm.generate``; reported: output tokens/s and total tokens/s (wall), KV capacity in
tokens (``num_gpu_blocks * block_size``), theoretical max concurrency
(capacity // (input_len + output_len)), and - sampled every 0.2 s from ``llm.get_metrics()`` -
the peak of ``vllm:num_requests_running``, the peak KV usage and the preemption count.

Results: ``benchmarks/results/throughput-<device>.json`` (copied to ``$OUT`` when set), rewritten
after every config. ``--smoke``: a tiny model and workload for a CPU check.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

CONFIGS: dict[str, dict] = {
    "vllm-bf16": {"kv_dtype": "bf16", "engine": {"attention_backend": "FLASH_ATTN"}},
    "vllm-fp8-flash": {"kv_dtype": "fp8_e4m3", "engine": {"attention_backend": "FLASH_ATTN", "kv_cache_dtype": "fp8"}},
    "kvquant-fp8": {"kv_dtype": "fp8_e4m3", "kvquant": "fp8_e4m3"},
    "kvquant-int8": {"kv_dtype": "int8", "kvquant": "int8"},
    "vllm-fp8-triton": {"kv_dtype": "fp8_e4m3", "engine": {"attention_backend": "TRITON_ATTN", "kv_cache_dtype": "fp8"}},
    # vLLM's only int8 KV option (dynamic per-token-head scales stored beside the cache, TRITON_ATTN).
    "vllm-int8-per-token-head": {"kv_dtype": "int8",
                                 "engine": {"attention_backend": "TRITON_ATTN", "kv_cache_dtype": "int8_per_token_head"}},
    # Not in the default list: vLLM's own choice of backend (the CPU smoke's working reference).
    "vllm-bf16-auto": {"kv_dtype": "bf16", "engine": {}},
}
DEFAULT_CONFIGS = ["vllm-bf16", "vllm-fp8-flash", "kvquant-fp8", "kvquant-int8", "vllm-fp8-triton",
                   "vllm-int8-per-token-head"]
#: --smoke on a CPU: vLLM ignores FLASH_ATTN/TRITON_ATTN there (it runs CPU_ATTN; the row's
#: ``backend`` says so) and has no fp8 cache without AVX-512 (the row records the error).
SMOKE_CONFIGS = ["vllm-bf16-auto", "vllm-fp8-flash", "kvquant-fp8", "kvquant-int8"]

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "bos_token_id": 1,
    "eos_token_id": 2,
}
SMOKE_MODEL = {**LLAMA3_8B, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 4096}  # fmt: skip


def log(*a) -> None:
    print("[throughput]", *a, flush=True)


# ----------------------------------------------------------------------------- model dir
def write_model_dir(path: Path, config: dict) -> dict[str, Path]:
    """config.json + tokenizer + per-head sidecars of plausible scales for both 8-bit formats."""
    import torch

    from vllm_kvquant.scales import CalibrationInfo, ModelFacts, build_scales_file, save_scales
    from vllm_kvquant.tiny_model import _train_tokenizer
    from transformers import PreTrainedTokenizerFast

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
    info = CalibrationInfo(method="absmax", tool="benchmarks.serving.throughput", tool_version="0",
                           data="synthetic plausible amax (|K| 16, |V| 4): dummy weights")  # fmt: skip
    stats = {n: (torch.full((n_kv,), 16.0), torch.full((n_kv,), 4.0)) for n in names}
    sidecars = {}
    for dtype in ("fp8_e4m3", "int8"):
        sidecars[dtype] = path / f"scales-{dtype}.json"
        save_scales(build_scales_file(stats, dtype, "per_head", facts, info), sidecars[dtype])
    return sidecars


# ----------------------------------------------------------------------------- one config (child)
class MetricSampler(threading.Thread):
    """Polls ``llm.get_metrics()`` and keeps the peaks of the gauges that matter."""

    def __init__(self, llm, period: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.llm, self.period = llm, period
        self.stop_event = threading.Event()
        self.peak_running = 0.0
        self.peak_waiting = 0.0
        self.peak_kv_usage = 0.0
        self.samples = 0
        self.error: str | None = None

    def read(self) -> dict[str, float]:
        vals: dict[str, float] = {}
        for m in self.llm.get_metrics():
            v = getattr(m, "value", None)
            if isinstance(v, (int, float)):
                vals[m.name] = vals.get(m.name, 0.0) + float(v)
        return vals

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                vals = self.read()
                self.peak_running = max(self.peak_running, vals.get("vllm:num_requests_running", 0.0))
                self.peak_waiting = max(self.peak_waiting, vals.get("vllm:num_requests_waiting", 0.0))
                self.peak_kv_usage = max(self.peak_kv_usage, vals.get("vllm:kv_cache_usage_perc", 0.0))
                self.samples += 1
            except Exception as e:  # noqa: BLE001
                self.error = f"{type(e).__name__}: {e}"
            self.stop_event.wait(self.period)


def counter(vals: dict[str, float], stem: str) -> float | None:
    for k, v in vals.items():
        if k == stem or k == stem + "_total":
            return v
    return None


def run_one(args) -> dict:
    import random

    from vllm import LLM, SamplingParams

    from benchmarks.harness import BENCH_EXTENSION_PATH, expose_benchmarks

    expose_benchmarks()
    spec = CONFIGS[args.one]
    model_dir = args.workdir / "model"
    kw = dict(
        model=str(model_dir),
        load_format="dummy",
        dtype="bfloat16",
        seed=0,
        max_model_len=args.input_len + args.output_len + 16,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enable_prefix_caching=False,
        disable_log_stats=False,
        worker_extension_cls=BENCH_EXTENSION_PATH,
    )
    if args.max_num_seqs:
        kw["max_num_seqs"] = args.max_num_seqs
    if args.tensor_parallel_size > 1:
        kw["tensor_parallel_size"] = args.tensor_parallel_size
    if args.fast_start and not args.eager:
        kw["compilation_config"] = {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"}
    if args.eager:
        kw["enforce_eager"] = True
    if spec.get("kvquant"):
        kw["attention_backend"] = "kvquant"
        kw["additional_config"] = {
            "kvquant": {"dtype": spec["kvquant"], "scales": str(model_dir / f"scales-{spec['kvquant']}.json"), "fallback": "error"}
        }
    kw.update(spec.get("engine", {}))
    row: dict = {"name": args.one, "kv_dtype": spec["kv_dtype"],
                 "engine_kwargs": {k: v for k, v in kw.items() if k in ("attention_backend", "kv_cache_dtype", "compilation_config", "enforce_eager")}}  # fmt: skip
    t0 = time.time()
    llm = LLM(**kw)
    row["engine_start_s"] = round(time.time() - t0, 1)
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
    row["max_num_seqs"] = int(llm.llm_engine.vllm_config.scheduler_config.max_num_seqs)
    row["max_num_batched_tokens"] = int(llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens)
    per_seq = args.input_len + args.output_len
    row["theoretical_max_concurrency"] = min(row["kv_capacity_tokens"] // per_seq, row["max_num_seqs"])

    rng = random.Random(args.seed)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    prompts = [{"prompt_token_ids": [rng.randrange(1000, vocab - 1) for _ in range(args.input_len)]}
               for _ in range(args.num_requests)]  # fmt: skip
    warm = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, detokenize=False)
    t0 = time.time()
    llm.generate(prompts[: min(len(prompts), args.warmup_requests)], warm, use_tqdm=False)
    row["warmup_s"] = round(time.time() - t0, 1)

    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True, detokenize=False)
    sampler = MetricSampler(llm)
    try:
        before = sampler.read()
    except Exception as e:  # noqa: BLE001
        before, sampler.error = {}, f"{type(e).__name__}: {e}"
    sampler.start()
    t0 = time.time()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.time() - t0
    sampler.stop_event.set()
    sampler.join(timeout=5)
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    row.update({
        "num_requests": args.num_requests, "input_len": args.input_len, "output_len": args.output_len,
        "wall_s": round(wall, 2),
        "output_tokens": out_tokens,
        "output_tokens_per_s": round(out_tokens / wall, 1),
        "total_tokens_per_s": round((out_tokens + args.num_requests * args.input_len) / wall, 1),
        "peak_running_requests": int(sampler.peak_running) if sampler.samples else None,
        "peak_waiting_requests": int(sampler.peak_waiting) if sampler.samples else None,
        "peak_kv_cache_usage": round(sampler.peak_kv_usage, 4) if sampler.samples else None,
        "metric_samples": sampler.samples,
    })  # fmt: skip
    try:
        after = sampler.read()
        p0, p1 = counter(before, "vllm:num_preemptions"), counter(after, "vllm:num_preemptions")
        if p1 is not None:
            row["preemptions"] = int(p1 - (p0 or 0))
    except Exception as e:  # noqa: BLE001
        sampler.error = sampler.error or f"{type(e).__name__}: {e}"
    if sampler.error:
        row["metrics_error"] = sampler.error
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # noqa: BLE001
        pass
    return row


# ----------------------------------------------------------------------------- parent
def print_table(rows: list[dict]) -> None:
    ok = {r["name"]: r for r in rows if not r.get("error")}
    ref = ok.get("vllm-bf16") or ok.get("vllm-bf16-auto")
    print("\nconfig            backend      KV cap(tok)  max-conc  peak-run  preempt  out tok/s  vs bf16  start s  run s")
    for r in rows:
        if r.get("error"):
            print(f"{r['name']:<17} ERROR {r['error'][:150]}")
            continue
        rel = f"{r['output_tokens_per_s'] / ref['output_tokens_per_s']:.2f}x" if ref else "-"
        print(
            f"{r['name']:<17} {str(r.get('backend')):<12} {r['kv_capacity_tokens']:>11}  {r['theoretical_max_concurrency']:>8}  "
            f"{str(r.get('peak_running_requests')):>8}  {str(r.get('preemptions', '-')):>7}  "
            f"{r['output_tokens_per_s']:>9.1f}  {rel:>7}  {r['engine_start_s']:>7}  {r['wall_s']:>5}"
        )


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default=None,
                    help=f"comma-separated, in run order (default {','.join(DEFAULT_CONFIGS)}); known: {','.join(CONFIGS)}")
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=512)
    ap.add_argument("--warmup-requests", type=int, default=32)
    ap.add_argument("--gpu-memory-utilization", type=float, default=None, help="default 0.35 (GPU) / 0.3 (CPU)")
    ap.add_argument("--max-num-seqs", type=int, default=None, help="default: vLLM's")
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
    ap.add_argument("--json", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.smoke:
        args.num_requests, args.input_len, args.output_len, args.warmup_requests = 12, 64, 16, 2
        args.workdir = args.workdir.with_name(args.workdir.name + "-smoke")
        args.eager = True
        args.time_budget = 1e9
    args.workdir = args.workdir.resolve()
    return args


def child_argv(args, name: str, json_path: Path) -> list[str]:
    argv = [sys.executable, "-m", "benchmarks.serving.throughput", "--one", name, "--json", str(json_path),
            "--num-requests", str(args.num_requests), "--input-len", str(args.input_len),
            "--output-len", str(args.output_len), "--warmup-requests", str(args.warmup_requests),
            "--gpu-memory-utilization", str(args.gpu_memory_utilization), "--workdir", str(args.workdir),
            "--seed", str(args.seed)]  # fmt: skip
    if args.max_num_seqs:
        argv += ["--max-num-seqs", str(args.max_num_seqs)]
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


def main(argv=None) -> int:
    t_start = time.time()
    args = parse_args(argv)
    import torch

    if args.gpu_memory_utilization is None:
        args.gpu_memory_utilization = 0.35 if torch.cuda.is_available() else 0.3

    if args.one:  # child: one config, result to --json
        from benchmarks.harness import OutputTee, root_cause

        tee = OutputTee()
        try:
            with tee:
                row = run_one(args)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            cause = root_cause(tee.text())
            err = f"{type(e).__name__}: {e}"
            if cause and cause not in str(e):
                err = f"{cause} [{err}]"
            row = {"name": args.one, "kv_dtype": CONFIGS.get(args.one, {}).get("kv_dtype"), "error": err[:4000]}
        args.json.write_text(json.dumps(row))
        return 0

    from benchmarks.common import device_info, versions
    from benchmarks.harness import command, device_slug, write_result

    if args.configs:
        names = [n.strip() for n in args.configs.split(",") if n.strip()]
    else:
        names = SMOKE_CONFIGS if args.smoke else DEFAULT_CONFIGS
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown config(s) {unknown}; known: {list(CONFIGS)}")
    model_config = SMOKE_MODEL if args.smoke else LLAMA3_8B
    copy_gbps = None
    if torch.cuda.is_available():  # the card's copy bandwidth, measured in this run
        from benchmarks.common import measure_copy_gbps

        copy_gbps = round(measure_copy_gbps(), 1)
        torch.cuda.empty_cache()
    write_model_dir(args.workdir / "model", model_config)
    workload = f"{args.input_len}x{args.output_len}"
    out_path = args.out or REPO / "benchmarks" / "results" / f"throughput-{device_slug()}-{workload}{'-smoke' if args.smoke else ''}.json"
    result = {
        "device": device_info(),
        "versions": versions(),
        "command": command("benchmarks.serving.throughput", argv),
        # vLLM's default compilation (torch.compile, FULL_AND_PIECEWISE graphs) or the fast-start mode.
        "compile": not args.fast_start and not args.eager,
        "copy_gbps": copy_gbps,
        "model": {k: model_config[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                               "num_key_value_heads", "head_dim", "intermediate_size", "vocab_size")},
        "tensor_parallel_size": args.tensor_parallel_size,
        "workload": {"num_requests": args.num_requests, "input_len": args.input_len, "output_len": args.output_len,
                     "prompts": "random token ids, ignore_eos=True, greedy", "load_format": "dummy",
                     "gpu_memory_utilization": args.gpu_memory_utilization, "fast_start": args.fast_start,
                     "eager": args.eager},
        "rows": [],
    }  # fmt: skip
    write_result(out_path, result)
    starts: list[float] = []
    for name in names:
        elapsed = time.time() - t_start
        estimate = max(starts) if starts else 60.0
        if elapsed + estimate > args.time_budget:
            result["rows"].append({"name": name, "kv_dtype": CONFIGS[name]["kv_dtype"],
                                   "error": f"skipped: time budget ({elapsed:.0f} s of --time-budget {args.time_budget:.0f} s)"})  # fmt: skip
            write_result(out_path, result)
            continue
        json_path = args.workdir / f"row-{name}.json"
        json_path.unlink(missing_ok=True)
        t0 = time.time()
        log(f"=== {name}")
        remaining = args.time_budget - elapsed
        timeout = max(30.0, min(args.child_timeout, remaining + 60.0))
        rc = run_in_group(child_argv(args, name, json_path), timeout)
        if json_path.exists():
            row = json.loads(json_path.read_text())
        elif rc is None:
            row = {"name": name, "kv_dtype": CONFIGS[name]["kv_dtype"], "error": f"timed out after {timeout:.0f} s"}
        else:
            row = {"name": name, "kv_dtype": CONFIGS[name]["kv_dtype"], "error": f"child exited {rc} without a result"}
        row["subprocess_s"] = round(time.time() - t0, 1)
        starts.append(row["subprocess_s"])
        result["rows"].append(row)
        write_result(out_path, result)
        log(json.dumps(row)[:800])
    result["total_seconds"] = round(time.time() - t_start, 1)
    write_result(out_path, result)
    print_table(result["rows"])
    print(f"\nwrote {out_path} ({result['total_seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
