"""Decode-attention benchmark: kvquant's 8-bit paged decode vs. vLLM 0.26's decode paths.

``bench_decode(...) -> list[dict]``, one row per (path, batch, context):

- ``kvquant-decode-fp8`` / ``kvquant-decode-int8``: :func:`paged_decode_attention`.
- ``vllm-fa3-decode-bf16``: FlashAttention-3 (``vllm.vllm_flash_attn.flash_attn_varlen_func``,
  ``fa_version=3``) over a bf16 paged cache.
- ``vllm-fa3-decode-fp8``: FA3 over the same fp8 cache as ours, with an fp8 query (vLLM
  quantizes the query for FA3; that small kernel is not timed) and ``q/k/v_descale``.
- ``vllm-triton-decode-fp8``: TRITON_ATTN's ``unified_attention`` with the fp8 cache, bf16 query,
  ``k/v_descale`` and the 3-D (segmented softmax) buffers its backend allocates.

FA3 rows take the faster of ``num_splits=32`` (vLLM's full-CUDA-graph decode setting) and
``0`` (FA3's own heuristic), both with ``scheduler_metadata``; the row says which.

Timing: each call is captured into a CUDA graph that cycles through enough copies of the
problem (distinct block tables and queries over one big cache) to exceed ``rotate_bytes``, so
L2 never holds the working set; ``triton.testing.do_bench(graph.replay,
return_mode="median")`` / calls.  ``gbps`` counts the bytes that must move: K+V of every
sequence at the cache's element size + query + output.  ``pct_of_copy`` compares with a
measured device-to-device copy (read + write bytes).  Every vLLM path runs inside try/except
so a failing path records ``error`` instead of stopping the run.

Cross-checks on copy 0: ours vs. the PyTorch reference (``max_abs_err_ref``), FA3-fp8 vs.
ours-fp8 on the same fp8 cache (``max_abs_diff_vs_kvquant_fp8``; includes FA3's fp8 query
rounding), likewise for the Triton fp8 path.
"""

from __future__ import annotations

import functools
import math
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import time_rotating  # noqa: E402

try:
    from vllm_kvquant.kernels.decode_attention import alloc_decode_workspace, choose_num_splits, paged_decode_attention
    from vllm_kvquant.kernels.reference import paged_decode_attention_ref
except ImportError:  # running from a source checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from kernels.decode_attention import alloc_decode_workspace, choose_num_splits, paged_decode_attention
    from kernels.reference import paged_decode_attention_ref

FP8 = torch.float8_e4m3fn
#: Static scales used for the synthetic caches (real = stored * scale).
K_SCALE = {"fp8": 0.02, "int8": 0.035}
V_SCALE = {"fp8": 0.015, "int8": 0.03}


def _log(verbose: bool, *a: Any) -> None:
    if verbose:
        print(*a, flush=True)


def _fill_random_(cache: torch.Tensor, kind: str, scale: float, chunk_blocks: int = 4096) -> None:
    """Random stored values (never zeros) in chunks, so big caches need no big fp32 temporaries."""
    for s in range(0, cache.shape[0], chunk_blocks):
        part = cache[s : s + chunk_blocks]
        x = torch.randn(part.shape, device=cache.device, dtype=torch.float32)
        if kind == "bf16":
            part.copy_(x.to(torch.bfloat16))
        elif kind == "fp8":
            part.copy_((x / scale).clamp(-448, 448).to(FP8))
        else:
            part.copy_(torch.round(x / scale).clamp(-127, 127).to(torch.int8))


@functools.lru_cache(maxsize=None)
def _copy_bandwidth_gbps() -> float:
    import triton.testing

    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    a.random_(0, 255)
    ms = triton.testing.do_bench(lambda: b.copy_(a), return_mode="median")
    del a, b
    return 2 * n / (ms * 1e-3) / 1e9


def _import_vllm():
    from vllm.v1.attention.ops.triton_unified_attention import unified_attention
    from vllm.v1.kv_cache_interface import KVQuantMode
    from vllm.vllm_flash_attn import flash_attn_varlen_func, get_scheduler_metadata

    return flash_attn_varlen_func, get_scheduler_metadata, unified_attention, KVQuantMode


def bench_decode(
    batches=(1, 8, 64),
    contexts=(1024, 4096, 16384, 32768),
    num_q_heads=32,
    num_kv_heads=8,
    head_size=128,
    block_size=16,
    dtype=torch.bfloat16,
    *,
    paths=("kvquant-fp8", "kvquant-int8", "fa3-bf16", "fa3-fp8", "triton-fp8"),
    rotate_bytes: int = 256 << 20,
    max_copies: int = 256,
    use_cuda_graph: bool = True,
    check: bool = True,
    warmup: int = 25,
    rep: int = 100,
    verbose: bool = True,
) -> list[dict]:
    assert torch.cuda.is_available(), "bench_decode needs a CUDA GPU"
    dev = torch.device("cuda")
    torch.manual_seed(0)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    copy_gbps = _copy_bandwidth_gbps()
    _log(verbose, f"device-to-device copy: {copy_gbps:.0f} GB/s; {sms} SMs")
    vllm_mod = None
    vllm_err = None
    if any(p.startswith(("fa3", "triton")) for p in paths):
        try:
            vllm_mod = _import_vllm()
        except Exception as e:  # noqa: BLE001
            vllm_err = f"vLLM import failed: {type(e).__name__}: {e}"
            _log(verbose, vllm_err)

    rows: list[dict] = []
    hq, hkv, d, bs = num_q_heads, num_kv_heads, head_size, block_size
    sm_scale = 1.0 / math.sqrt(d)
    act_bytes = torch.empty((), dtype=dtype).element_size()

    for batch in batches:
        for ctx in contexts:
            nbs = math.ceil(ctx / bs)
            kv_bytes_1b = batch * ctx * hkv * d * 2  # K+V at one byte per element
            n_copies = max(1, min(max_copies, math.ceil(rotate_bytes / kv_bytes_1b)))
            num_blocks = n_copies * batch * nbs
            perm = torch.randperm(num_blocks, device=dev).int().view(n_copies, batch, nbs)
            seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
            cu_q = torch.arange(batch + 1, dtype=torch.int32, device=dev)
            queries = torch.randn(n_copies, batch, hq, d, device=dev).to(dtype)
            out = torch.empty(batch, hq, d, device=dev, dtype=dtype)
            results: dict[str, torch.Tensor] = {}
            caches: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

            def get_cache(kind: str):
                if kind not in caches:
                    for other in list(caches):  # keep at most one cache dtype (plus fp8) alive
                        if other != "fp8":
                            del caches[other]
                    tdt = {"bf16": dtype, "fp8": FP8, "int8": torch.int8}[kind]
                    kc = torch.empty(num_blocks, bs, hkv, d, dtype=tdt, device=dev)
                    vc = torch.empty_like(kc)
                    _fill_random_(kc, kind, K_SCALE.get(kind, 1.0))
                    _fill_random_(vc, kind, V_SCALE.get(kind, 1.0))
                    caches[kind] = (kc, vc)
                return caches[kind]

            def base_row(name: str, kv: str, elem: int, q_elem: int = act_bytes) -> dict:
                return dict(
                    name=name, kv_dtype=kv, batch=batch, context=ctx, us=None, gbps=None, num_splits=None,
                    bytes=batch * ctx * hkv * d * 2 * elem + batch * hq * d * (q_elem + act_bytes),
                    n_copies=n_copies, copy_gbps=copy_gbps,
                )  # fmt: skip

            def finish(row: dict, timed: tuple[float, str]) -> dict:
                us, row["timing"] = timed
                row["us"] = us
                row["gbps"] = row["bytes"] / (us * 1e-6) / 1e9
                row["pct_of_copy"] = 100.0 * row["gbps"] / copy_gbps
                return row

            # ---------------- ours ----------------
            for kind in ("fp8", "int8"):
                if f"kvquant-{kind}" not in paths:
                    continue
                row = base_row(f"kvquant-decode-{kind}", kind, 1)
                try:
                    kc, vc = get_cache(kind)
                    kvd = "fp8_e4m3" if kind == "fp8" else "int8"
                    ks = torch.tensor([K_SCALE[kind]], device=dev)
                    vs = torch.tensor([V_SCALE[kind]], device=dev)
                    ws = alloc_decode_workspace(batch, hq, d, num_kv_heads=hkv, device=dev)
                    row["num_splits"] = choose_num_splits(batch, hkv, d, sms)

                    def fn(c, kc=kc, vc=vc, kvd=kvd, ks=ks, vs=vs, ws=ws):
                        paged_decode_attention(queries[c], kc, vc, perm[c], seq_lens, ks, vs, kvd, sm_scale,
                                               out=out, workspace=ws)  # fmt: skip

                    finish(row, time_rotating(fn, n_copies, use_cuda_graph, warmup, rep))
                    fn(0)
                    results[kind] = out.clone()
                    if check:
                        ref = paged_decode_attention_ref(queries[0], kc, vc, perm[0], seq_lens, ks, vs, kvd, sm_scale)
                        row["max_abs_err_ref"] = (results[kind].float() - ref.float()).abs().max().item()
                        del ref
                except Exception as e:  # noqa: BLE001
                    row["error"] = f"{type(e).__name__}: {e}"
                    _log(verbose, traceback.format_exc())
                rows.append(row)
                _log(verbose, _fmt(row))

            # ---------------- vLLM FA3 ----------------
            for kind in ("bf16", "fp8"):
                if f"fa3-{kind}" not in paths:
                    continue
                row = base_row(f"vllm-fa3-decode-{kind}", kind, 2 if kind == "bf16" else 1, 1 if kind == "fp8" else act_bytes)
                if vllm_mod is None:
                    row["error"] = vllm_err or "vLLM paths not requested"
                    rows.append(row)
                    continue
                flash_attn_varlen_func, get_scheduler_metadata, _, _ = vllm_mod
                try:
                    kc, vc = get_cache(kind)
                    if kind == "fp8":
                        qs = queries.to(FP8)  # q_descale = 1 (vLLM's default q scale)
                        descale = lambda v: torch.full((1,), v, device=dev).expand(batch, hkv)  # noqa: E731
                        q_descale, k_descale, v_descale = descale(1.0), descale(K_SCALE["fp8"]), descale(V_SCALE["fp8"])
                        qkv_dtype = FP8
                    else:
                        qs = queries
                        q_descale = k_descale = v_descale = None
                        qkv_dtype = dtype
                    best = None
                    for splits in (32, 0):
                        try:
                            sched = get_scheduler_metadata(
                                batch_size=batch, max_seqlen_q=1, max_seqlen_k=ctx, num_heads_q=hq, num_heads_kv=hkv,
                                headdim=d, cache_seqlens=seq_lens, qkv_dtype=qkv_dtype, cu_seqlens_q=cu_q,
                                page_size=bs, causal=True, window_size=(-1, -1), num_splits=splits,
                            )  # fmt: skip
                        except Exception:  # noqa: BLE001
                            sched = None

                        def fn(c, kc=kc, vc=vc, qs=qs, sched=sched, splits=splits):
                            flash_attn_varlen_func(
                                q=qs[c], k=kc, v=vc, out=out, cu_seqlens_q=cu_q, max_seqlen_q=1, seqused_k=seq_lens,
                                max_seqlen_k=ctx, softmax_scale=sm_scale, causal=True, window_size=None,
                                block_table=perm[c], softcap=0.0, scheduler_metadata=sched, fa_version=3,
                                q_descale=q_descale, k_descale=k_descale, v_descale=v_descale, num_splits=splits,
                            )  # fmt: skip

                        timed = time_rotating(fn, n_copies, use_cuda_graph, warmup, rep)
                        if best is None or timed[0] < best[0][0]:
                            best = (timed, splits, sched is not None, fn)
                    finish(row, best[0])
                    row["fa3_num_splits"] = best[1]
                    row["fa3_scheduler_metadata"] = best[2]
                    best[3](0)
                    if kind == "fp8" and "fp8" in results:
                        row["max_abs_diff_vs_kvquant_fp8"] = (out.float() - results["fp8"].float()).abs().max().item()
                    del qs
                except Exception as e:  # noqa: BLE001
                    row["error"] = f"{type(e).__name__}: {e}"
                    _log(verbose, traceback.format_exc())
                rows.append(row)
                _log(verbose, _fmt(row))

            # ---------------- vLLM TRITON_ATTN (unified_attention) ----------------
            if "triton-fp8" in paths:
                row = base_row("vllm-triton-decode-fp8", "fp8", 1)
                if vllm_mod is None:
                    row["error"] = vllm_err or "vLLM paths not requested"
                else:
                    _, _, unified_attention, KVQuantMode = vllm_mod
                    try:
                        kc, vc = get_cache("fp8")
                        # As TritonAttentionMetadataBuilder: threshold = 128 // Hkv (snapped to a
                        # capture size under CUDA graphs: 16 for Hkv=8), 16 softmax segments.
                        seq_threshold_3d = 128 // hkv
                        segs = 16
                        dpad = 1 << (d - 1).bit_length()
                        segm_out = torch.empty(seq_threshold_3d, hq, segs, dpad, dtype=torch.float32, device=dev)
                        segm_max = torch.empty(seq_threshold_3d, hq, segs, dtype=torch.float32, device=dev)
                        segm_sum = torch.empty(seq_threshold_3d, hq, segs, dtype=torch.float32, device=dev)
                        k_descale = torch.full((1,), K_SCALE["fp8"], device=dev).expand(batch, hkv)
                        v_descale = torch.full((1,), V_SCALE["fp8"], device=dev).expand(batch, hkv)
                        row["num_splits"] = segs if batch <= seq_threshold_3d else 1

                        def fn(c, kc=kc, vc=vc):
                            unified_attention(
                                q=queries[c], k=kc, v=vc, out=out, cu_seqlens_q=cu_q, max_seqlen_q=1,
                                seqused_k=seq_lens, max_seqlen_k=ctx, softmax_scale=sm_scale, causal=True,
                                window_size=(-1, -1), block_table=perm[c], softcap=0, q_descale=None,
                                k_descale=k_descale, v_descale=v_descale, seq_threshold_3D=seq_threshold_3d,
                                num_par_softmax_segments=segs, softmax_segm_output=segm_out,
                                softmax_segm_max=segm_max, softmax_segm_expsum=segm_sum,
                                kv_quant_mode=KVQuantMode.FP8_PER_TENSOR,
                            )  # fmt: skip

                        finish(row, time_rotating(fn, n_copies, use_cuda_graph, warmup, rep))
                        fn(0)
                        if "fp8" in results:
                            row["max_abs_diff_vs_kvquant_fp8"] = (out.float() - results["fp8"].float()).abs().max().item()
                    except Exception as e:  # noqa: BLE001
                        row["error"] = f"{type(e).__name__}: {e}"
                        _log(verbose, traceback.format_exc())
                rows.append(row)
                _log(verbose, _fmt(row))

            del caches, queries, perm
            torch.cuda.empty_cache()
    return rows


def tune_decode(
    configs=None,
    shapes=((1, 1024), (1, 32768), (8, 4096), (8, 32768), (64, 1024), (64, 4096), (64, 16384)),
    num_q_heads=32,
    num_kv_heads=8,
    head_size=128,
    block_size=16,
    dtype=torch.bfloat16,
    kv_dtypes=("fp8", "int8"),
    verbose=True,
    **kw: Any,
) -> list[dict]:
    """Time only our kernel for each :class:`DecodeKernelConfig` in ``configs`` (dicts of fields)."""
    try:
        from vllm_kvquant.kernels import decode_attention as da
    except ImportError:
        from kernels import decode_attention as da
    if configs is None:
        configs = [
            dict(num_stages=s, tile_bytes=t, num_warps=w)
            for t in (8192, 16384) for s in (3, 4, 5) for w in (4, 8)
        ]  # fmt: skip
    saved = da.DEFAULT_CONFIG
    rows = []
    try:
        for c in configs:
            da.DEFAULT_CONFIG = da.DecodeKernelConfig(**c)
            for b, ctx in shapes:
                for r in bench_decode(
                    batches=(b,), contexts=(ctx,), num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
                    head_size=head_size, block_size=block_size, dtype=dtype,
                    paths=tuple(f"kvquant-{k}" for k in kv_dtypes), check=False, verbose=False, **kw,
                ):  # fmt: skip
                    r["config"] = dict(c)
                    rows.append(r)
                    _log(verbose, f"{c} {_fmt(r)}")
    finally:
        da.DEFAULT_CONFIG = saved
    return rows


def _fmt(row: dict) -> str:
    if row.get("error"):
        return f"{row['name']:<24} b={row['batch']:<3} ctx={row['context']:<6} ERROR {row['error'][:120]}"
    extra = ""
    for k in ("max_abs_err_ref", "max_abs_diff_vs_kvquant_fp8"):
        if k in row:
            extra += f" {k}={row[k]:.3g}"
    return (
        f"{row['name']:<24} b={row['batch']:<3} ctx={row['context']:<6} {row['us']:9.1f} us "
        f"{row['gbps']:7.0f} GB/s ({row['pct_of_copy']:5.1f}% of copy) splits={row['num_splits']}{extra}"
    )


def print_table(rows: list[dict]) -> None:
    """Compact comparison: per (batch, context), time of each path and ours-vs-theirs speedups."""
    by = {}
    for r in rows:
        by.setdefault((r["batch"], r["context"]), {})[r["name"]] = r
    names = ["kvquant-decode-fp8", "kvquant-decode-int8", "vllm-fa3-decode-bf16", "vllm-fa3-decode-fp8",
             "vllm-triton-decode-fp8"]  # fmt: skip
    print("batch ctx    " + " ".join(f"{n.replace('decode-', ''):>18}" for n in names) + "  fp8/fa3bf16 fp8/best-vllm-fp8")
    for (b, c), rs in sorted(by.items()):
        us = {n: (rs[n]["us"] if n in rs and rs[n].get("us") else None) for n in names}
        cells = " ".join(f"{(f'{us[n]:.1f}us' if us[n] else '-'):>18}" for n in names)
        ours = us["kvquant-decode-fp8"]
        fa = us["vllm-fa3-decode-bf16"]
        vl = [x for x in (us["vllm-fa3-decode-fp8"], us["vllm-triton-decode-fp8"]) if x]
        s1 = f"{fa / ours:.2f}x" if ours and fa else "-"
        s2 = f"{min(vl) / ours:.2f}x" if ours and vl else "-"
        print(f"{b:<5} {c:<6} {cells}  {s1:>11} {s2:>14}")


if __name__ == "__main__":
    import json
    import os

    res = bench_decode()
    print_table(res)
    out_dir = os.environ.get("OUT")
    if out_dir:
        with open(os.path.join(out_dir, "bench_decode.json"), "w") as f:
            json.dump(res, f, indent=1)
