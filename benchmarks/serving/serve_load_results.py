"""The serve-load results file: written after every step (and copied to ``$OUT``), parts of
several device calls merged, the summary and the console table."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import harness
from benchmarks.serving.serve_load_env import log


def write_result(path: Path, result: dict) -> None:
    harness.write_result(path, result, log=log)


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

