"""The serve-load results file: written after every step (and copied to ``$OUT``), parts of
several device calls merged, the summary and the console table."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from benchmarks import harness
from benchmarks.serving.run_timing import summarize_runs
from benchmarks.serving.serve_load_env import log


def write_result(path: Path, result: dict) -> None:
    harness.write_result(path, result, log=log)


def merge_results(parts: list[dict]) -> dict:
    """Several runs' results (e.g. one config per device call, a trained-model phase, or the same
    configs again) as one: rows in order, each with its ``part`` (index into ``command``) and
    ``run`` (1 for the first row of its config and grid point, 2 for a repeat, ...); the
    per-config records united, a record that a config already has kept as ``<config>#2``, ...;
    device, versions, copy_gbps from the first, each command kept."""
    records = ("consistency", "consistency_dummy", "no_leak", "bad_input", "servers")
    merged = {k: v for k, v in parts[0].items() if k not in ("rows", *records)}
    merged["command"] = [p.get("command") for p in parts]
    merged["copy_gbps_per_part"] = [p.get("copy_gbps") for p in parts]
    merged["rows"] = []
    seen: dict[tuple, int] = {}
    for i, part in enumerate(parts):
        for r in part.get("rows", []):
            point = (r.get("name"), r.get("max_concurrency"), str(r.get("request_rate")))
            seen[point] = seen.get(point, 0) + 1
            merged["rows"].append({**r, "part": i, "run": seen[point]})
    for key in records:
        merged[key] = {}
        for part in parts:
            for name, record in (part.get(key) or {}).items():
                label, n = name, 1
                while label in merged[key]:
                    n += 1
                    label = f"{name}#{n}"
                merged[key][label] = record
    devices = {json.dumps(p.get("device"), sort_keys=True) for p in parts}
    if len(devices) > 1:
        merged["warning"] = f"parts measured on different devices: {sorted(devices)}"
    merged["summary"] = summarize(merged)
    return merged


def medians(rows: list[dict]) -> list[dict]:
    """Per config and grid point, over its completed runs: how many, the median, range and spread of
    the output tok/s (``run_timing.summarize_runs``), the median TPOT and TTFT p50; ``vs_vllm_fp8``: the output tok/s median over
    ``vllm-fp8``'s at the same grid point (end-to-end runs vary by several percent: compare medians)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if not r.get("error") and r.get("output_throughput") is not None:
            groups.setdefault((r["name"], r.get("max_concurrency"), str(r.get("request_rate"))), []).append(r)
    out = []
    for (name, conc, rate), rs in groups.items():
        # throughput.py's summary of repeated runs: median, min, max and spread of the tok/s.
        tput = summarize_runs([{"output_tokens_per_s": float(r["output_throughput"])} for r in rs])
        entry = {"name": name, "max_concurrency": conc, "request_rate": rate, "runs": len(rs), **tput}
        for key in ("p50_tpot_ms", "p50_ttft_ms"):
            vals = [float(r[key]) for r in rs if r.get(key) is not None]
            entry[f"median_{key}"] = round(statistics.median(vals), 2) if vals else None
        out.append(entry)
    base = {(e["max_concurrency"], e["request_rate"]): e["median_output_tokens_per_s"] for e in out if e["name"] == "vllm-fp8"}
    for e in out:
        ref = base.get((e["max_concurrency"], e["request_rate"]))
        e["vs_vllm_fp8"] = round(e["median_output_tokens_per_s"] / ref, 3) if ref else None
    return out


def summarize(result: dict) -> dict:
    """What the issue asks to show: every row failed == 0, the checks' verdicts, and the medians."""
    rows = result.get("rows", [])
    return {
        "rows": len(rows),
        "rows_with_errors": sum(1 for r in rows if r.get("error")),
        "all_failed_zero": bool(rows) and all(r.get("failed") == 0 and not r.get("error") for r in rows),
        "consistency_ok": {k: v.get("ok") for k, v in (result.get("consistency") or {}).items()},
        "consistency_dummy_ok": {k: v.get("ok") for k, v in (result.get("consistency_dummy") or {}).items()},
        "no_leak_ok": {k: v.get("ok") for k, v in (result.get("no_leak") or {}).items()},
        "bad_input_ok": {k: v.get("ok") for k, v in (result.get("bad_input") or {}).items()},
        "medians": medians(rows),
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

