"""Decode attention and quantize-on-write, kvquant vs vLLM's own paths, side by side in one run.

    python benchmarks/decode.py --out benchmarks/results/decode-h100.json [--tune]

Writes the JSON format of DEVELOPERS.md (device, versions, command, copy_gbps, rows with
name, kv_dtype, batch, context, us, gbps, pct_copy_bw) and prints a table. Shapes: Llama-3-8B
attention (32 query heads, 8 KV heads, head 128, block 16).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_decode import bench_decode, print_table, tune_decode  # noqa: E402
from bench_quantize import bench_quantize_write  # noqa: E402
from common import device_info, measure_copy_gbps, versions  # noqa: E402


def _normalise(row: dict, copy_gbps: float, kind: str) -> dict:
    row = dict(row)
    row["kind"] = kind
    if row.get("gbps") is not None:
        row["pct_copy_bw"] = round(100.0 * row["gbps"] / copy_gbps, 1)
    else:
        row["pct_copy_bw"] = None
    row.setdefault("us", None)
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/decode.json"))
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    p.add_argument("--write-tokens", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    p.add_argument("--tune", action="store_true", help="also sweep decode kernel configs (ours only)")
    a = p.parse_args(argv)

    copy_gbps = measure_copy_gbps()
    print(f"device-to-device copy: {copy_gbps:.0f} GB/s (read + write)", flush=True)
    rows = [_normalise(r, copy_gbps, "decode") for r in bench_decode(batches=tuple(a.batches), contexts=tuple(a.contexts))]
    print_table(rows)
    write_rows = bench_quantize_write(tuple(a.write_tokens))
    for r in write_rows:
        r.setdefault("batch", r.get("num_tokens"))
        r.setdefault("context", r.get("num_tokens"))
    rows += [_normalise(r, copy_gbps, "write") for r in write_rows]
    tuning = [_normalise(r, copy_gbps, "tune") for r in tune_decode(verbose=False)] if a.tune else []

    result = {
        "device": device_info(),
        "versions": versions(),
        "command": " ".join(["python"] + sys.argv),
        "copy_gbps": copy_gbps,
        "rows": rows,
    }
    if tuning:
        result["tuning"] = tuning
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1, default=str))
    print(f"\n{'name':34} {'batch':>5} {'ctx':>6} {'us':>9} {'GB/s':>7} {'%copy':>6}")
    for r in rows:
        if r.get("error"):
            print(f"{r['name']:34} {r['batch']:>5} {r['context']:>6} ERROR {str(r['error'])[:60]}")
        else:
            print(f"{r['name']:34} {r['batch']:>5} {r['context']:>6} {r['us']:>9.1f} {r['gbps']:>7.0f} {r['pct_copy_bw']:>6.1f}")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
