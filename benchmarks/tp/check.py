"""Tensor parallel on real GPUs (issue #14): calibration, generation, serving and throughput at
tp=2 (tp=4 where 4 GPUs are visible) against tp=1, in one call of <= 9 minutes.

    source .gpu/p2/setup.sh && python3 -m benchmarks.tp.check        # 2+ GPUs
    .venv/bin/python -m benchmarks.tp.check --cpu-smoke              # orchestration check, tp=1 only

Steps, most valuable first (a time-out loses the least):

1. calibration: ``vllm-kvquant calibrate --tensor-parallel-size N`` writes the sidecar tp=1 writes
   (every K/V scale within 1e-6 relative; also reported against one bf16 ulp), for a tiny Llama
   with 8 KV heads and one with 2 (replicated heads at tp=4);
2. generation: ``LLM(tensor_parallel_size=N, attention_backend="kvquant")`` with per-head int8 and
   fp8 sidecars, decode in full CUDA graphs: greedy tokens and logprobs vs tp=1 (tolerances of
   the single-GPU tests, benchmarks/tp/compare.py) and, per rank and layer, the scales of the KV
   heads that rank holds. Models: briefly trained tiny Llamas (vllm_kvquant.tiny_model);
3. serving: ``vllm serve MODEL --tensor-parallel-size 2 --attention-backend kvquant`` with the
   OpenAI client (completions and chat, plain and streamed, 64 concurrent requests, 0 errors);
4. throughput at tp=2, Llama-3-8B shapes, dummy weights (benchmarks/serving/throughput.py, its own JSON):
   vllm-bf16, vllm-fp8-flash, kvquant-fp8, kvquant-int8; output tok/s in the rows.

Engines that do not measure time run side by side (benchmarks/tp/jobs.py) with a fixed KV-cache
size; every vLLM process gets NVLink multicast off (NCCL_NVLS_ENABLE=0 and friends).

Output: ``benchmarks/results/tp-<device>.json`` (copied to $OUT), rewritten after every step:
device, versions, command, and ``rows`` of ``{tp, kv_dtype, granularity, check, passed, value}``
(``passed`` null = not run, with ``status`` and ``reason``); per-job timings and failure tails
under ``jobs``. A table is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.tp.jobs import Job, Runner

REPO = Path(__file__).resolve().parents[2]

#: NVLink multicast stays off in every process (it can take the shared host's GPUs out of service).
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1",
                 "VLLM_ALLREDUCE_USE_SYMM_MEM": "0"}  # fmt: skip
MODELS = {"kv8": dict(num_attention_heads=8, num_key_value_heads=8), "kv2": dict(num_attention_heads=4, num_key_value_heads=2)}
KV_DTYPES = ("int8", "fp8_e4m3")
THROUGHPUT_CONFIGS = "vllm-bf16,vllm-fp8-flash,kvquant-fp8,kvquant-int8"
MAX_TOKENS = 8  # as in the single-GPU tests


@dataclass
class Settings:
    smoke: bool
    gpu: bool
    devices: list[str]
    workdir: Path
    out: Path
    deadline: float
    compile: bool
    kv_cache_bytes: int
    steps: set[str]
    tp_sizes: list[int] = field(default_factory=list)


class Report:
    """The result JSON: rewritten (and copied to $OUT) after every change."""

    def __init__(self, settings: Settings, header: dict) -> None:
        self.settings = settings
        self.result = {**header, "rows": [], "jobs": {}}
        self.runner: Runner | None = None

    def row(self, tp: int, kv_dtype: str | None, granularity: str | None, check: str, passed: bool | None,
            value=None, **detail) -> None:  # fmt: skip
        status = {True: "passed", False: "failed", None: "not run"}[passed]
        if isinstance(value, float) and not math.isfinite(value):
            value = None  # strict JSON
        self.result["rows"].append({"tp": tp, "kv_dtype": kv_dtype, "granularity": granularity, "check": check,
                                    "passed": passed, "value": value, "status": status, **detail})  # fmt: skip
        self.write()

    def not_run(self, keys: list[tuple], reason: str) -> None:
        passed = None if (reason.startswith("not run") or "time budget" in reason) else False
        for tp, kv_dtype, granularity, check in keys:
            self.row(tp, kv_dtype, granularity, check, passed, None, reason=reason)

    def write(self) -> None:
        from benchmarks.harness import write_result

        if self.runner:
            self.result["jobs"] = {n: {k: v for k, v in vars(s).items() if v not in (None, [], "")}
                                   for n, s in self.runner.state.items()}  # fmt: skip
        self.result["elapsed_s"] = round(time.time() - self.result["started"], 1)
        write_result(self.settings.out, self.result)


# ----------------------------------------------------------------------------- environments and engines
def base_env(s: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(MULTICAST_OFF, VLLM_WORKER_MULTIPROC_METHOD="spawn", PYTHONUNBUFFERED="1")
    from benchmarks.harness import benchmarks_path

    # the children run `-m benchmarks....` from the work folder
    env["PYTHONPATH"] = os.pathsep.join([str(benchmarks_path()), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
    if s.gpu:
        env["TP_CHECK_KV_CACHE_BYTES"] = str(s.kv_cache_bytes)
    else:
        env.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    return env


def prompts() -> list[list[str]]:
    """tests/test_backend_cpu.py's rounds: short prompts first (prefilled whole in the first step),
    a long one read back in chunks, then a prompt that hits the prefix cache."""
    from vllm_kvquant.tiny_model import corpus_text

    lines = corpus_text().splitlines()
    long_prefix = " ".join(lines[:6])
    round1 = ["The cat slept in the sun", "A language model", long_prefix, " ".join(lines[10:14]), " ".join(lines[20:23])]
    return [round1, [long_prefix + " " + lines[7]]]


def engine_kwargs(s: Settings, model_dir: Path, tp: int, sidecar: Path) -> dict:
    kw = dict(model=str(model_dir), dtype="bfloat16", max_model_len=512, enable_chunked_prefill=True,
              max_num_batched_tokens=32, enable_prefix_caching=True, seed=0, attention_backend="kvquant",
              additional_config={"kvquant": {"scales": str(sidecar), "fallback": "error"}})  # fmt: skip
    if tp > 1:
        kw["tensor_parallel_size"] = tp
    if not s.gpu:
        return {**kw, "block_size": 32, "enforce_eager": True, "gpu_memory_utilization": 0.3}
    kw.update(block_size=16, gpu_memory_utilization=0.1, kv_cache_memory_bytes=s.kv_cache_bytes)
    if not s.compile:  # no torch.compile; decode batches in full CUDA graphs (what kvquant captures)
        kw["compilation_config"] = {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY", "cudagraph_capture_sizes": [1, 2, 4, 8]}
    return kw


def serve_args(s: Settings) -> list[str]:
    if not s.gpu:
        return ["--gpu-memory-utilization", "0.3", "--enforce-eager"]
    args = ["--gpu-memory-utilization", "0.1", "--kv-cache-memory-bytes", str(s.kv_cache_bytes)]
    if not s.compile:
        args += ["--compilation-config", json.dumps({"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY",
                                                     "cudagraph_capture_sizes": [1, 2, 4, 8, 16, 32, 64]})]  # fmt: skip
    return args


# ----------------------------------------------------------------------------- steps
def model_jobs(s: Settings, models: list[str]) -> list[Job]:
    jobs = []
    for m in models:
        spec = f"TinyLlamaSpec(**{MODELS[m]!r})" if s.smoke else f"replace(TRAINED_TINY_LLAMA, **{MODELS[m]!r})"
        code = ("from dataclasses import replace\nfrom vllm_kvquant.tiny_model import TRAINED_TINY_LLAMA, TinyLlamaSpec, make_tiny_llama\n"
                f"import torch; torch.set_num_threads(max(1, (__import__('os').cpu_count() or 2) // {len(models)}))\n"
                f"make_tiny_llama({str(s.workdir / m)!r}, {spec})\n")  # fmt: skip
        jobs.append(Job(f"model-{m}", argv=[sys.executable, "-c", code], timeout_s=240, env=base_env(s), cwd=s.workdir))
    return jobs


def calibration_jobs(s: Settings, report: Report, m: str, compare: bool = True) -> list[Job]:
    """tp=1 calibration (the sidecars the other steps use); with ``compare``, tp=N and the comparison."""
    from vllm_kvquant.tiny_model import corpus_text

    data = s.workdir / "calib.txt"
    data.write_text(corpus_text())
    (s.workdir / "scales").mkdir(exist_ok=True)

    def calibrate(tp: int) -> Job:
        argv = [sys.executable, "-m", "benchmarks.tp.calibrate", "calibrate", str(s.workdir / m),
                "--data", str(data), "--num-samples", "8" if s.smoke else "16", "--seq-len", "128", "--dtype", "int8",
                "--granularity", "per_head", "--model-dtype", "bfloat16", "--gpu-memory-utilization", "0.1" if s.gpu else "0.3",
                "--tensor-parallel-size", str(tp), "--out", str(s.workdir / "scales" / f"{m}-tp{tp}-int8.json")]  # fmt: skip
        return Job(f"calibrate-{m}-tp{tp}", argv=argv, deps=(f"model-{m}",), gpus=tp if s.gpu else 0,
                   timeout_s=240, min_time_s=60, env=base_env(s), cwd=s.workdir)  # fmt: skip

    jobs = [calibrate(1)]
    for tp in s.tp_sizes if compare else []:
        keys = [(tp, "int8", "per_head", f"calibrate = tp1 sidecar ({what}) [{m}]") for what in ("1e-6 rel", "1 bf16 ulp")]
        if tp > max(len(s.devices), 1):
            report.not_run(keys, f"not run: needs {tp} GPUs, {len(s.devices)} visible")
            continue
        if tp > 1:
            jobs.append(calibrate(tp))
        jobs.append(Job(f"check-calibrate-{m}-tp{tp}", action=lambda tp=tp: check_calibration(s, report, m, tp),
                        deps=(f"calibrate-{m}-tp1", f"calibrate-{m}-tp{tp}"),
                        on_skip=lambda reason, keys=keys: report.not_run(keys, reason)))  # fmt: skip
    return jobs


def check_calibration(s: Settings, report: Report, m: str, tp: int) -> None:
    from benchmarks.tp.compare import BF16_ULP_REL, STRICT_REL, sidecar_diff
    from vllm_kvquant.scales import load_scales

    ref = load_scales(s.workdir / "scales" / f"{m}-tp1-int8.json")
    run = load_scales(s.workdir / "scales" / f"{m}-tp{tp}-int8.json")
    d = sidecar_diff(run, ref)
    ok = not d["structure_problems"]
    heads = ref.model.num_kv_heads
    detail = dict(model=m, num_kv_heads=heads, replicated=tp > heads, **d)
    if s.smoke and tp == 1:
        detail["note"] = "smoke: the tp=1 sidecar against itself (exercises the comparison only)"
    for label, bound in (("1e-6 rel", STRICT_REL), ("1 bf16 ulp", BF16_ULP_REL)):
        report.row(tp, "int8", "per_head", f"calibrate = tp1 sidecar ({label}) [{m}]", ok and d["max_rel"] <= bound,
                   d["max_rel"], bound=bound, **detail)  # fmt: skip


def sidecar_job(s: Settings, m: str) -> Job:
    def make() -> None:
        from vllm_kvquant.scales import load_scales, save_scales

        int8 = s.workdir / "scales" / f"{m}-tp1-int8.json"
        save_scales(load_scales(int8).retarget("fp8_e4m3"), s.workdir / "scales" / f"{m}-fp8_e4m3.json")
        shutil.copy(int8, s.workdir / "scales" / f"{m}-int8.json")

    return Job(f"sidecars-{m}", action=make, deps=(f"calibrate-{m}-tp1",))


def gen_job(s: Settings, m: str, tp: int, dtype: str) -> Job:
    sidecar = s.workdir / "scales" / f"{m}-{dtype}.json"
    spec = {"engine": engine_kwargs(s, s.workdir / m, tp, sidecar), "rounds": prompts(), "max_tokens": MAX_TOKENS}
    out = s.workdir / "gen" / f"{m}-tp{tp}-{dtype}.json"
    out.parent.mkdir(exist_ok=True)
    argv = [sys.executable, str(REPO / "tests" / "engine_runner.py"), json.dumps(spec), str(out)]
    return Job(f"generate-{m}-tp{tp}-{dtype}", argv=argv, deps=(f"sidecars-{m}",), gpus=tp if s.gpu else 0,
               timeout_s=240, min_time_s=60, env=base_env(s), cwd=s.workdir)  # fmt: skip


def generation_jobs(s: Settings, report: Report, m: str, tps: list[int], dtypes=KV_DTYPES) -> list[Job]:
    jobs, have = [], set()
    for tp in tps:
        for dtype in dtypes:
            checks = ["rank scales = sidecar shard", "CUDA graphs captured"]
            if tp > 1 or s.smoke:
                checks = ["greedy tokens vs tp1", "logprobs vs tp1", *checks]
            keys = [(tp, dtype, "per_head", f"generate {c} [{m}]") for c in checks]
            if tp > max(len(s.devices), 1):
                report.not_run(keys, f"not run: needs {tp} GPUs, {len(s.devices)} visible")
                continue
            for t in sorted({1, tp}):
                if (t, dtype) not in have:
                    jobs.append(gen_job(s, m, t, dtype))
                    have.add((t, dtype))
            jobs.append(Job(f"check-generate-{m}-tp{tp}-{dtype}", action=lambda tp=tp, dtype=dtype: check_generation(s, report, m, tp, dtype),
                            deps=(f"generate-{m}-tp1-{dtype}", f"generate-{m}-tp{tp}-{dtype}"),
                            on_skip=lambda reason, keys=keys: report.not_run(keys, reason)))  # fmt: skip
    return jobs


def check_generation(s: Settings, report: Report, m: str, tp: int, dtype: str) -> None:
    from benchmarks.tp.compare import agreement, rank_scale_problems
    from vllm_kvquant.scales import load_scales

    run = json.loads((s.workdir / "gen" / f"{m}-tp{tp}-{dtype}.json").read_text())
    ref = json.loads((s.workdir / "gen" / f"{m}-tp1-{dtype}.json").read_text())
    scales = load_scales(s.workdir / "scales" / f"{m}-{dtype}.json")
    key = dict(tp=tp, kv_dtype=dtype, granularity="per_head")
    common = dict(model=m, num_kv_heads=scales.model.num_kv_heads, startup_s=round(run.get("startup_s", 0), 1))
    if tp > 1 or s.smoke:
        a = agreement(run, ref)
        if s.smoke and tp == 1:
            common["note"] = "smoke: the tp=1 run against itself (exercises the comparison only)"
        report.row(**key, check=f"generate greedy tokens vs tp1 [{m}]", passed=not a["token_problems"],
                   value=a["identical"], n=a["n"], problems=a["token_problems"], **common)  # fmt: skip
        report.row(**key, check=f"generate logprobs vs tp1 [{m}]", passed=not a["logprob_problems"], value=a["mean_logprob_diff"],
                   max_first_logprob_diff=a["max_first_logprob_diff"], steps=a["steps_compared"],
                   problems=a["logprob_problems"], tolerances=a["tolerances"], **common)  # fmt: skip
    problems, checked = rank_scale_problems(run["backend_report"], scales, tp, dtype)
    report.row(**key, check=f"generate rank scales = sidecar shard [{m}]", passed=not problems and checked > 0, value=checked,
               problems=problems[:6], scales_rank0=_first_layer_scales(run), **common)  # fmt: skip
    log = Path(report.runner.state[f"generate-{m}-tp{tp}-{dtype}"].log).read_text(errors="replace")
    captured = "Graph capturing finished" in log
    report.row(**key, check=f"generate CUDA graphs captured [{m}]", passed=captured if s.gpu else None, value=captured,
               **({} if s.gpu else {"reason": "not run: CPU (eager)"}), **common)  # fmt: skip


def _first_layer_scales(run: dict) -> list:
    """Per rank, the first layer's K scales (what each rank holds, for the record)."""
    out = []
    for layers in run.get("backend_report", []):
        first = min(layers, key=lambda n: [int(p) if p.isdigit() else 0 for p in n.split(".")]) if layers else None
        out.append(layers[first]["k_scale"] if first else None)
    return out


def serve_jobs(s: Settings, report: Report, m: str, tp: int) -> list[Job]:
    n = 8 if s.smoke else 64
    checks = ["completions+chat plain/streamed", f"{n} concurrent: 0 errors", f"{n} concurrent = sequential", "kvquant on every rank"]
    keys = [(tp, "fp8_e4m3", "per_head", f"serve {c} [{m}]") for c in checks]
    if tp > max(len(s.devices), 1):
        report.not_run(keys, f"not run: needs {tp} GPUs, {len(s.devices)} visible")
        return []
    out, log = s.workdir / f"serve-{m}-tp{tp}.json", s.workdir / f"serve-{m}-tp{tp}.log"
    argv = [sys.executable, "-m", "benchmarks.tp.serve", str(s.workdir / m), "--tp", str(tp),
            "--scales", str(s.workdir / "scales" / f"{m}-fp8_e4m3.json"), "--out", str(out), "--log", str(log),
            "--concurrent", str(n), *[f"--server-arg={a}" for a in serve_args(s)]]  # fmt: skip

    def check() -> None:
        r = json.loads(out.read_text())
        chat, conc = r["chat"], r["concurrent"]
        ok = bool(chat["completion"]) and chat["completion_tokens"] == 12 and chat["stream_equal"] and bool(chat["chat"]) and chat["chat_stream_equal"]
        common = dict(model=m, startup_s=r.get("startup_s"))
        report.row(tp, "fp8_e4m3", "per_head", f"serve {checks[0]} [{m}]", ok, chat["completion_tokens"], answers=chat, **common)
        report.row(tp, "fp8_e4m3", "per_head", f"serve {checks[1]} [{m}]", conc["errors"] == 0, conc["errors"], **conc, **common)
        report.row(tp, "fp8_e4m3", "per_head", f"serve {checks[2]} [{m}]", conc["equal_to_sequential"] == n,
                   conc["equal_to_sequential"], **common)  # fmt: skip
        ranks = [r_ for r_ in range(tp) if any(f"(tp rank {r_} of {tp})" in l and "fp8_e4m3 K/V with per_head" in l
                                               for l in r["log_kvquant_lines"])]  # fmt: skip
        report.row(tp, "fp8_e4m3", "per_head", f"serve {checks[3]} [{m}]", len(ranks) == tp, len(ranks),
                   log_lines=r["log_kvquant_lines"], **common)  # fmt: skip

    return [Job(f"serve-{m}-tp{tp}", argv=argv, deps=(f"sidecars-{m}",), gpus=tp if s.gpu else 0, timeout_s=300,
                min_time_s=90, env=base_env(s), cwd=s.workdir),
            Job(f"check-serve-{m}-tp{tp}", action=check, deps=(f"serve-{m}-tp{tp}",),
                on_skip=lambda reason: report.not_run(keys, reason))]  # fmt: skip


def throughput_jobs(s: Settings, report: Report, tp: int) -> list[Job]:
    from benchmarks.harness import device_slug
    from benchmarks.serving.throughput_configs import CONFIGS

    configs = "kvquant-fp8" if s.smoke else THROUGHPUT_CONFIGS
    gran = {"kvquant": "per_head", "vllm-fp8": "per_tensor"}  # vLLM's fp8: one scale (1.0) per layer

    def granularity(name: str) -> str | None:
        return next((g for prefix, g in gran.items() if name.startswith(prefix)), None)

    keys = [(tp, CONFIGS[c]["kv_dtype"], granularity(c), f"throughput {c}") for c in configs.split(",")]
    if tp > max(len(s.devices), 1):
        report.not_run(keys, f"not run: needs {tp} GPUs, {len(s.devices)} visible")
        return []
    out = (s.workdir if s.smoke else REPO / "benchmarks" / "results") / f"throughput-tp{tp}-{device_slug()}{'-smoke' if s.smoke else ''}.json"

    def argv(left: float) -> list[str]:
        a = [sys.executable, "-m", "benchmarks.serving.throughput", "--configs", configs, "--out", str(out),
             "--workdir", str(s.workdir / "throughput"), "--tensor-parallel-size", str(tp), "--repeats", "1"]  # fmt: skip
        if s.smoke:
            return [*a, "--smoke"]
        # Short: KV-bound for bf16 (~60-70 of 128 requests fit at 0.2 x 80 GB per GPU), not for 8-bit.
        return [*a, "--num-requests", "128", "--input-len", "1024", "--output-len", "256", "--warmup-requests", "8",
                "--max-num-seqs", "128", "--gpu-memory-utilization", "0.2", "--child-timeout", "150",
                "--time-budget", str(max(60, int(left - 20)))]  # fmt: skip

    def check() -> None:
        st = report.runner.state[f"throughput-tp{tp}"]
        r = json.loads(out.read_text()) if out.exists() else {"rows": []}  # rows are written after every config
        for row in r["rows"]:
            err = row.get("error")
            report.row(tp, row.get("kv_dtype"), granularity(row["name"]),
                       f"throughput {row['name']}", None if err and err.startswith("skipped") else not err,
                       row.get("output_tokens_per_s"), **{k: row[k] for k in ("error", "kv_capacity_tokens", "peak_running_requests",
                       "engine_start_s", "wall_s", "backend") if k in row}, json=str(out.relative_to(REPO) if out.is_relative_to(REPO) else out))  # fmt: skip
        done = {row["name"] for row in r["rows"]}
        missing = [k for k in keys if k[3].split(" ", 1)[1] not in done]
        if missing:
            why = "time budget: stopped at the overall deadline" if st.status == "timeout" else f"throughput-tp{tp} {st.status}: {st.reason}"
            report.not_run(missing, why if st.status != "ok" else "not in the throughput JSON")

    return [Job(f"throughput-tp{tp}", argv_fn=argv, exclusive=True, timeout_s=600, min_time_s=150 if s.gpu else 60,
                env=base_env(s), cwd=REPO),
            Job(f"check-throughput-tp{tp}", action=check, deps=(f"throughput-tp{tp}",), after_any=True)]


def build_jobs(s: Settings, report: Report) -> list[Job]:
    """Priority order: calibration and generation first, then serving, throughput last."""
    models = ["kv2"] if s.smoke else ["kv8", "kv2"]
    jobs = model_jobs(s, models)
    if "calibration" in s.steps or "generation" in s.steps or "serve" in s.steps:
        for m in models:
            jobs += calibration_jobs(s, report, m, compare="calibration" in s.steps)
            jobs.append(sidecar_job(s, m))
    if "generation" in s.steps:
        if s.smoke:
            jobs += generation_jobs(s, report, "kv2", [1], dtypes=("fp8_e4m3",))
        else:
            jobs += generation_jobs(s, report, "kv8", [2])
            jobs += generation_jobs(s, report, "kv2", [4])  # replicated KV heads
    if "serve" in s.steps:
        jobs += serve_jobs(s, report, "kv2" if s.smoke else "kv8", 1 if s.smoke else 2)
    if "throughput" in s.steps:
        jobs += throughput_jobs(s, report, 1 if s.smoke else 2)
    if "generation" in s.steps and not s.smoke:
        jobs += generation_jobs(s, report, "kv2", [2])  # one KV head per rank: beyond the list, if time is left
    return jobs


# ----------------------------------------------------------------------------- main
def print_table(rows: list[dict]) -> None:
    print(f"\n{'tp':>2}  {'kv_dtype':<8}  {'gran':<10}  {'status':<7}  {'value':>12}  check")
    for r in rows:
        v = r["value"]
        v = f"{v:.3g}" if isinstance(v, float) else str(v)
        why = r.get("reason") or r.get("error") or "; ".join(r.get("problems") or [])
        print(f"{r['tp']:>2}  {str(r['kv_dtype']):<8}  {str(r['granularity']):<10}  {r['status']:<7}  {v:>12}  {r['check']}"
              + (f"  ({why[:110]})" if why else ""))  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", "--dry-run", dest="smoke", action="store_true",
                    help="tp=1 only on vLLM's CPU build: one calibration, one generation, a short serve, a throughput smoke")
    ap.add_argument("--time-budget", type=float, default=None, help="seconds for everything (default 500 GPU, 1800 smoke)")
    ap.add_argument("--steps", default="calibration,generation,serve,throughput")
    ap.add_argument("--max-parallel", type=int, default=None, help="engines side by side (default 8 GPU, 1 CPU)")
    ap.add_argument("--compile", action="store_true", help="vLLM's default compilation instead of the fast start (slower)")
    ap.add_argument("--kv-cache-mib", type=int, default=512, help="fixed KV cache per engine (GPU)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/kvquant-tp"))
    ap.add_argument("--out", type=Path, default=None)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    t0 = time.time()
    args = parse_args(argv)
    import torch

    from benchmarks.common import device_info, versions
    from benchmarks.harness import command, device_slug

    gpu = torch.cuda.is_available()
    n = torch.cuda.device_count() if gpu else 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = [d.strip() for d in visible.split(",") if d.strip()][:n] if visible else [str(i) for i in range(n)]
    if args.workdir.exists():
        shutil.rmtree(args.workdir)
    args.workdir.mkdir(parents=True)
    budget = args.time_budget or (500.0 if gpu and not args.smoke else 1800.0)
    s = Settings(smoke=args.smoke, gpu=gpu, devices=devices, workdir=args.workdir.resolve(), deadline=t0 + budget,
                 compile=args.compile, kv_cache_bytes=args.kv_cache_mib * 2**20, steps=set(args.steps.split(",")),
                 tp_sizes=[1] if args.smoke else [2, 4],
                 out=args.out or REPO / "benchmarks" / "results" / f"tp-{device_slug()}{'-smoke' if args.smoke else ''}.json")  # fmt: skip
    if not gpu and not args.smoke:
        raise SystemExit("no CUDA GPU: run with --cpu-smoke (tp=1 orchestration check)")
    os.environ.update(MULTICAST_OFF)
    header = {"device": device_info(), "num_gpus": n, "versions": versions(),
              "command": command("benchmarks.tp.check", argv), "smoke": args.smoke, "started": t0,
              "time_budget_s": budget, "settings": {"compile": args.compile, "kv_cache_mib": args.kv_cache_mib,
              "steps": sorted(s.steps), "max_tokens": MAX_TOKENS, "env": MULTICAST_OFF}}  # fmt: skip
    report = Report(s, header)
    if args.smoke:
        for step in ("calibration", "generation", "serve", "throughput"):
            report.not_run([(2, None, None, f"{step} at tp>1")], "not run: CPU smoke (tp=1 only)")
    jobs = build_jobs(s, report)
    runner = Runner(jobs, devices=devices, max_parallel=args.max_parallel or (8 if gpu else 1), deadline=s.deadline,
                    log_dir=s.workdir / "logs", on_change=report.write)  # fmt: skip
    report.runner = runner
    runner.run()
    report.result["total_seconds"] = round(time.time() - t0, 1)
    report.write()
    rows = report.result["rows"]
    print_table(rows)
    failed = [r for r in rows if r["passed"] is False]
    print(f"\n{sum(r['passed'] is True for r in rows)} passed, {len(failed)} failed, "
          f"{sum(r['passed'] is None for r in rows)} not run; wrote {s.out} ({report.result['total_seconds']} s)")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
