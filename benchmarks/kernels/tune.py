"""Sweep the decode kernel's launch configuration (ours only) and print the best per shape.

    python -m benchmarks.kernels.tune --out tune.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.kernels.bench_decode import tune_decode


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("tune.json"))
    p.add_argument("--kv-dtypes", nargs="+", default=["fp8"])
    p.add_argument("--best-env", type=Path, help="write the best overall config as KVQUANT_DECODE_CONFIG syntax")
    a = p.parse_args()
    # Tile size, warps and stages were swept first (16 KB tiles, 4 warps, 5 stages won); the
    # grid is what is left: how many splits per (sequence, KV head) fill the SMs without a tail.
    configs = [
        dict(num_stages=s, tile_bytes=16384, num_warps=4, target_ctas_per_sm=t)
        for s in (2, 5) for t in (4, 8, 12, 16, 24, 32)
    ]  # fmt: skip
    shapes = ((64, 4096), (64, 16384), (8, 4096), (8, 32768), (1, 4096), (1, 32768))
    rows = tune_decode(configs=configs, shapes=shapes, kv_dtypes=tuple(a.kv_dtypes), verbose=False)
    a.out.write_text(json.dumps(rows, indent=1, default=str))
    best: dict = {}
    for r in rows:
        if r.get("error"):
            continue
        key = (r["name"], r["batch"], r["context"])
        if key not in best or r["us"] < best[key]["us"]:
            best[key] = r
    for (name, b, ctx), r in sorted(best.items()):
        print(f"{name:22} b={b:<3} ctx={ctx:<6} {r['us']:8.1f} us {r.get('pct_of_copy', 0):5.1f}% {r['config']}")
    totals: dict = {}
    for r in rows:
        if not r.get("error"):
            totals.setdefault(json.dumps(r["config"], sort_keys=True), []).append(r["us"])
    ranked = sorted(totals.items(), key=lambda kv: sum(kv[1]))
    for cfg, us in ranked[:5]:
        print("overall", cfg, round(sum(us), 1))
    if a.best_env and ranked:
        best_cfg = json.loads(ranked[0][0])
        a.best_env.write_text(",".join(f"{k}={v}" for k, v in best_cfg.items()))


if __name__ == "__main__":
    main()
