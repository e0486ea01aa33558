"""Decode attention (every kernel choice of kvquant, vLLM's FA3 / Triton, FlashInfer) and the cache
write, side by side in one run.

    python -m benchmarks.kernels.decode          # -> benchmarks/results/decode-<device>.json
    python -m benchmarks.kernels.decode --smoke  # CPU: plumbing only -> decode-cpu-smoke.json

Writes ``device``, ``versions``, ``command``, ``copy_gbps`` and ``rows`` (name, kind, kv_dtype,
batch, context, us, gbps, pct_copy, status [ok | skipped | error] with reason/error; see
bench_decode.py for what each row runs) and prints a table. Default shapes: Llama-3-8B attention
(32 query heads, 8 KV heads, head 128, block 16, bf16) at the batch x context pairs of
``bench_decode.DEFAULT_SHAPES``; about 3 minutes on an H100, FlashInfer's JIT included.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.common import device_info, measure_copy_gbps, versions
from benchmarks.harness import REPO, command, device_slug, write_result
from benchmarks.kernels.bench_decode import (
    DEFAULT_SHAPES, ROW_NAMES, SMOKE_SHAPES, BenchConfig, bench_decode, print_table, tune_decode,
)  # fmt: skip


def _shape(text: str) -> tuple[int, int]:
    try:
        b, c = text.lower().split("x")
        return int(b), int(c)
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r}: expected BATCHxCONTEXT, e.g. 64x4096") from None


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None, help="default benchmarks/results/decode-<device>.json")
    p.add_argument("--shapes", type=_shape, nargs="+", default=None, help="BATCHxCONTEXT pairs")
    p.add_argument("--batches", type=int, nargs="+", help="with --contexts: the full grid instead of --shapes")
    p.add_argument("--contexts", type=int, nargs="+")
    p.add_argument("--rows", nargs="+", default=list(ROW_NAMES), choices=ROW_NAMES, metavar="NAME",
                   help=f"rows to run (default all: {' '.join(ROW_NAMES)})")  # fmt: skip
    p.add_argument("--write-tokens", type=int, nargs="*", default=[4096, 32768], help="cache-write rows (none: skip)")
    p.add_argument("--head-size", type=int, default=128)
    p.add_argument("--num-kv-heads", type=int, default=8)
    p.add_argument("--num-q-heads", type=int, default=32)
    p.add_argument("--no-check", action="store_true", help="skip the comparison with the PyTorch reference")
    p.add_argument("--smoke", action="store_true", help="CPU plumbing check on tiny shapes (no timing value)")
    p.add_argument("--tune", action="store_true", help="also sweep our Triton kernel's launch configs")
    a = p.parse_args(argv)

    if a.batches or a.contexts:
        if not (a.batches and a.contexts):
            p.error("--batches and --contexts go together")
        shapes = [(b, c) for b in a.batches for c in a.contexts]
    else:
        shapes = a.shapes or (SMOKE_SHAPES if a.smoke else DEFAULT_SHAPES)
    cfg = BenchConfig(num_q_heads=a.num_q_heads, num_kv_heads=a.num_kv_heads, head_size=a.head_size,
                      check=not a.no_check, device="cpu" if a.smoke else "cuda")  # fmt: skip
    if a.smoke:
        cfg.num_q_heads, cfg.num_kv_heads, cfg.head_size, cfg.max_copies = 4, 2, 64, 2
    copy_gbps = None if a.smoke else measure_copy_gbps()
    if copy_gbps:
        print(f"device-to-device copy: {copy_gbps:.0f} GB/s (read + write)", flush=True)
    rows = bench_decode(shapes, tuple(a.rows), cfg, copy_gbps=copy_gbps)
    if a.write_tokens and not a.smoke:
        from benchmarks.kernels.cache_write import bench_quantize_write

        for r in bench_quantize_write(tuple(a.write_tokens), cfg.num_kv_heads, cfg.head_size):
            r.update(kind="write", status="ok", pct_copy=round(100.0 * r["gbps"] / copy_gbps, 1))
            rows.append(r)
    result = {
        "device": device_info(),
        "versions": versions(),
        "command": command("benchmarks.kernels.decode", argv),
        "copy_gbps": copy_gbps,
        "config": {"num_q_heads": cfg.num_q_heads, "num_kv_heads": cfg.num_kv_heads, "head_size": cfg.head_size,
                   "block_size": cfg.block_size, "dtype": str(cfg.dtype).replace("torch.", ""),
                   "scales": "per-tensor (rows ending in -per-channel: per KV head and channel)",
                   "timing": "CUDA-graph replay over rotating caches, median"},
        "rows": rows,
    }  # fmt: skip
    if a.tune and not a.smoke:
        result["tuning"] = tune_decode(verbose=False)
    out = a.out or REPO / "benchmarks" / "results" / ("decode-cpu-smoke.json" if a.smoke else f"decode-{device_slug()}.json")
    write_result(out, result)
    print()
    print_table(rows)
    skipped = [f"{r['name']} ({r['reason'][:80]})" for r in rows if r["status"] == "skipped" and r["batch"] == shapes[0][0]
               and r["context"] == shapes[0][1]]  # fmt: skip
    if skipped:
        print("skipped rows:", "; ".join(skipped))
    errors = [r for r in rows if r["status"] == "error"]
    if errors:
        print(f"{len(errors)} row(s) failed, e.g. {errors[0]['name']}: {errors[0]['error'][:200]}")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
