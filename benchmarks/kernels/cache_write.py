"""GPU benchmark of the quantize-on-write kernel against vLLM's ``reshape_and_cache_flash``.

Inputs are what vLLM passes: K/V as views of a fused qkv tensor (GQA, 4 query heads per KV
head), a block-shuffled int64 slot mapping, caches ``[num_blocks, block_size, H, D]`` split
from one ``[2, ...]`` tensor. Bandwidth counts K/V bytes read + cache bytes written + the
slot mapping. Run: ``python -m benchmarks.kernels.cache_write [--out results.json]`` (``python -m
benchmarks.kernels.decode`` runs it too, into the decode results).
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from typing import Callable

import torch

from benchmarks.common import buffer_sets, device_info, host_us_per_call, measure_copy_gbps, time_rotating, versions
from vllm_kvquant.kernels.quantize_cache import WriteConfig, pick_config, quantize_to_cache

_DTYPE_NAME = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def _make_set(n: int, h: int, d: int, bs: int, dtype: torch.dtype, cache_dtype: torch.dtype) -> dict:
    hq = 4 * h
    qkv = torch.randn(n, (hq + 2 * h) * d, device="cuda", dtype=dtype)
    num_blocks = -(-n // bs)
    blocks = torch.randperm(num_blocks, device="cuda")
    t = torch.arange(n, device="cuda")
    kv = torch.zeros(2, num_blocks, bs, h, d, dtype=cache_dtype, device="cuda")
    return {
        "key": qkv[:, hq * d : (hq + h) * d].view(n, h, d),
        "value": qkv[:, (hq + h) * d :].view(n, h, d),
        "slots": (blocks[t // bs] * bs + t % bs).to(torch.int64),
        "key_cache": kv[0],
        "value_cache": kv[1],
    }


def _time(n: int, h: int, d: int, bs: int, dtype: torch.dtype, cache_dtype: torch.dtype, call: Callable[[dict], None]) -> tuple[float, float]:
    """(GPU us per call, replayed from a CUDA graph over rotating input sets; host us per eager call)."""
    out_elem = torch.empty(0, dtype=cache_dtype).element_size()
    per_set = n * h * d * (6 * dtype.itemsize + 2 * out_elem)  # the whole qkv (4 + 1 + 1 heads) + caches
    sets = [_make_set(n, h, d, bs, dtype, cache_dtype) for _ in range(buffer_sets(per_set))]
    us, _mode = time_rotating(lambda i: call(sets[i]), len(sets), True, 25, 100)
    host = host_us_per_call(lambda: call(sets[0]))
    del sets
    torch.cuda.empty_cache()
    return us, host

def _row(name: str, kv_dtype: str, n: int, h: int, d: int, bs: int, dtype: torch.dtype, out_elem: int, us: float) -> dict:
    nbytes = 2 * n * h * d * (dtype.itemsize + out_elem) + 8 * n
    return {
        "name": name,
        "kv_dtype": kv_dtype,
        "batch": n,
        "context": n,
        "num_tokens": n,
        "num_kv_heads": h,
        "head_size": d,
        "block_size": bs,
        "act_dtype": _DTYPE_NAME.get(dtype, str(dtype)),
        "us": round(us, 3),
        "gbps": round(nbytes / (us * 1e-6) / 1e9, 1),
    }


def bench_quantize_write(
    num_tokens_list: tuple[int, ...] = (1024, 4096, 16384, 32768),
    num_kv_heads: int = 8,
    head_size: int = 128,
    block_size: int = 16,
    dtype: torch.dtype = torch.bfloat16,
    include_reciprocal: bool = False,
) -> list[dict]:
    """Rows for kvquant fp8/int8 writes and vLLM's bf16/fp8 ``reshape_and_cache_flash``."""
    h, d, bs = num_kv_heads, head_size, block_size
    k_scale = torch.tensor([0.05], device="cuda")
    v_scale = torch.tensor([0.04], device="cuda")
    try:
        from vllm import _custom_ops as ops
    except Exception as e:  # noqa: BLE001 - vLLM is optional for this benchmark
        warnings.warn(f"vLLM unavailable, skipping reshape_and_cache_flash rows: {e}")
        ops = None

    rows: list[dict] = []
    for n in num_tokens_list:
        variants = [("kvquant-write-fp8", "fp8_e4m3", "fp8", None), ("kvquant-write-int8", "int8", "int8", None)]
        if include_reciprocal:
            c = pick_config(n, h, d)
            recip = WriteConfig(c.block_t, c.block_h, c.num_warps, reciprocal=True)
            variants += [("kvquant-write-fp8-recip", "fp8_e4m3", "fp8", recip), ("kvquant-write-int8-recip", "int8", "int8", recip)]
        for name, kvq, short, cfg in variants:

            def ours(s: dict, kvq: str = kvq, cfg: WriteConfig | None = cfg) -> None:
                quantize_to_cache(s["key"], s["value"], s["key_cache"], s["value_cache"], s["slots"], k_scale, v_scale, kvq, config=cfg)

            us, host = _time(n, h, d, bs, dtype, torch.uint8, ours)
            rows.append(_row(name, short, n, h, d, bs, dtype, 1, us) | {"host_us": round(host, 1)})
        if ops is None:
            continue
        for kv_cache_dtype, cache_dtype, short in (("auto", dtype, _DTYPE_NAME.get(dtype, "bf16")), ("fp8", torch.uint8, "fp8")):

            def theirs(s: dict, kcd: str = kv_cache_dtype) -> None:
                ops.reshape_and_cache_flash(s["key"], s["value"], s["key_cache"], s["value_cache"], s["slots"], kcd, k_scale, v_scale)

            try:
                us, host = _time(n, h, d, bs, dtype, cache_dtype, theirs)
            except (AttributeError, RuntimeError) as e:  # op missing from this vLLM build
                warnings.warn(f"reshape_and_cache_flash({kv_cache_dtype}) failed, row skipped: {e}")
                continue
            rows.append(_row(f"vllm-reshape_and_cache_flash-{short}", short, n, h, d, bs, dtype, cache_dtype.itemsize, us) | {"host_us": round(host, 1)})
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-size", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--reciprocal", action="store_true", help="also time the multiply-by-reciprocal variant")
    p.add_argument("--out", type=Path, help="write {'env', 'copy_gbps', 'rows'} as JSON here")
    a = p.parse_args(argv)
    copy = measure_copy_gbps()
    rows = bench_quantize_write(tuple(a.tokens), a.heads, a.head_size, a.block_size, include_reciprocal=a.reciprocal)
    print(f"{device_info()['name']}: copy {copy:.0f} GB/s (read+write)")
    print(f"{'name':36} {'tokens':>7} {'us':>9} {'GB/s':>8} {'%copy':>6}")
    for r in rows:
        print(f"{r['name']:36} {r['num_tokens']:>7} {r['us']:>9.2f} {r['gbps']:>8.0f} {100 * r['gbps'] / copy:>6.1f}")
    if a.out:
        env = {"device": device_info(), "versions": versions()}
        a.out.write_text(json.dumps({"env": env, "copy_gbps": round(copy, 1), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
