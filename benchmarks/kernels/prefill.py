"""Prefill attention: kvquant's prefill paths vs vLLM's FlashAttention-3 (bf16 and fp8 caches).

    python -m benchmarks.kernels.prefill          # -> benchmarks/results/prefill-<device>.json (< 2 min on an H100)
    python -m benchmarks.kernels.prefill --smoke  # CPU, TRITON_INTERPRET=1: our rows' code path on tiny shapes

Shapes (requests x new tokens, over cached context): ``1x8k`` (8192 new, no context),
``16x2k`` (16 x 2048 new, no context), ``chunk2k-ctx16k`` (one 2048-token chunk over 16384
cached tokens), ``32x512-ctx1536`` and ``64x512-ctx3584`` (prefix-cache hits: 512 new tokens
over 1536 / 3584 cached ones per request). Llama-3-8B attention: 32 query heads, 8 KV heads, head 128, block 16, bf16,
per-tensor scales. Every call gets the layer's whole tensors and a per-batch plan, as the
backend hands them (vLLM's split K|V cache views ``[blocks, block, heads, head]``).

Rows (``name``, ``kv_dtype``):

- ``kvquant-prefill-fa3`` (fp8, int8): ``PrefillRunner`` mode ``bf16``, path ``fa3`` with a
  :class:`ContextWorkspace` sized for the shape (``workspace_mib``): requests with context are
  copied into it as 16-bit K/V and FA3 attends once (without context: FA3 on the new tokens).
- ``kvquant-prefill-fa3-merge`` (fp8, int8): the same path without a workspace: vLLM's FA3 varlen
  kernel on the new tokens + our Triton context pass merging by log-sum-exp.
- ``kvquant-prefill-triton`` (fp8, int8): mode ``bf16``, path ``triton`` (one Triton kernel).
- ``kvquant-prefill-quantized`` (fp8, int8): mode ``quantized`` (everything from the 8-bit cache)
  as the backend runs it on Hopper: every sequence dequantized into the workspace, one FA3 call
  (one split). ``kvquant-prefill-quantized-triton``: the same mode on its Triton fallback (CUDA-graph
  replays, batches beyond the workspace, ``prefill_workspace_mib: 0``).
- ``kvquant-prefill-fa3-allrows`` (fp8): the fa3 path with the CUDA-graph-safe plan (``all_rows``:
  FA3's ``max_seqlen`` and the grid from the token count, the context pass always launched).
- ``kvquant-prefill-fa3-default-ws`` (fp8, int8): what a user gets, the fa3 path with the
  backend's default workspace (``prefill_workspace_mib``, 256 MiB): a shape whose sequences
  exceed it runs in slabs of requests (``workspace_slabs``), each filled and attended in turn.
- ``vllm-fa3-prefill`` (bf16, fp8): ``flash_attn_varlen_func`` as vLLM's FLASH_ATTN backend calls
  it: the whole sequence from the paged cache (``block_table``, ``seqused_k``, causal,
  ``scheduler_metadata`` built once per batch as its metadata builder does); fp8: fp8 cache,
  query quantized to fp8 beforehand (vLLM's attention layer does it; not timed), descales.

``us``: median GPU time per call of a CUDA-graph replay (``triton.testing.do_bench``);
``host_us``: CPU time to issue one eager call (no sync); ``tflops``: 4 x heads x head_size x
visible (query, key) pairs / time. ``max_abs_diff_fa3_vs_triton`` on the fa3 rows: the two
bf16-mode paths on the same inputs (same semantics; differences are rounding).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


if "--smoke" in sys.argv[1:]:  # before Triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from benchmarks.common import device_info, host_us_per_call, measure_copy_gbps, time_rotating, versions  # noqa: E402
from benchmarks.harness import REPO, command, device_slug, write_result  # noqa: E402
from vllm_kvquant.kernels.paged_cache import PagedKVCache  # noqa: E402
from vllm_kvquant.config import KVQuantConfig  # noqa: E402
from vllm_kvquant.prefill import ContextWorkspace, PrefillPlan, PrefillRunner, fa3_unavailable_reason  # noqa: E402
from vllm_kvquant.prefill import prefill_workspace_tokens  # noqa: E402

#: (name, requests, new tokens per request, cached tokens per request)
SHAPES = (("1x8k", 1, 8192, 0), ("16x2k", 16, 2048, 0), ("chunk2k-ctx16k", 1, 2048, 16384),
          ("32x512-ctx1536", 32, 512, 1536), ("64x512-ctx3584", 64, 512, 3584))  # fmt: skip
SMOKE_SHAPES = (("1x40", 1, 40, 0), ("3x17", 3, 17, 0), ("chunk24-ctx50", 1, 24, 50))
#: (row name, mode, path, all_rows, workspace): all_rows is the CUDA-graph-safe plan (grid and FA3
#: bounds from the token count, every request covered, the context pass always launched);
#: workspace: the plan carries a 16-bit context workspace (FA3 over [context; new], or in mode
#: quantized over every sequence read back from the cache).
OURS = (("kvquant-prefill-fa3", "bf16", "fa3", False, True), ("kvquant-prefill-fa3-merge", "bf16", "fa3", False, False),
        ("kvquant-prefill-triton", "bf16", "triton", False, False),
        ("kvquant-prefill-quantized", "quantized", "fa3", False, True),
        ("kvquant-prefill-quantized-triton", "quantized", "triton", False, False),
        ("kvquant-prefill-fa3-allrows", "bf16", "fa3", True, False),
        ("kvquant-prefill-fa3-default-ws", "bf16", "fa3", False, "default"))  # fmt: skip
K_SCALE, V_SCALE = 0.02, 0.015
FP8 = torch.float8_e4m3fn


@dataclass
class Problem:
    """One shape's tensors: query/K/V of the new tokens, caches holding context + new tokens."""

    name: str
    reqs: int
    new: int
    ctx: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    out: torch.Tensor
    qsl: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor

    @property
    def pairs(self) -> int:  # visible (query, key) pairs, causal
        return self.reqs * (self.new * self.ctx + self.new * (self.new + 1) // 2)


def make_problem(name, reqs, new, ctx, hq, hkv, d, bs, device) -> Problem:
    g = torch.Generator(device="cpu").manual_seed(0)
    n = reqs * new
    qkv = torch.randn(n, (hq + 2 * hkv) * d, generator=g).to(device=device, dtype=torch.bfloat16)
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)  # views of one projection, as vLLM passes them
    blocks_per_req = -(-(ctx + new) // bs)
    perm = torch.randperm(reqs * blocks_per_req, generator=g).to(torch.int32).view(reqs, blocks_per_req)
    return Problem(
        name, reqs, new, ctx, q.view(n, hq, d), k.view(n, hkv, d), v.view(n, hkv, d),
        torch.empty(n, hq, d, dtype=torch.bfloat16, device=device),
        torch.arange(0, n + 1, new, dtype=torch.int32, device=device),
        torch.full((reqs,), ctx + new, dtype=torch.int32, device=device), perm.to(device),
    )  # fmt: skip


def make_cache(kind: str, num_blocks: int, hkv: int, d: int, bs: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's cache tensor ``[blocks, heads, block, 2 * head]`` split into K and V views."""
    raw = torch.randn(num_blocks, hkv, bs, 2 * d, device=device)
    if kind == "bf16":
        raw = raw.to(torch.bfloat16)
    elif kind == "fp8":
        raw = (raw / K_SCALE).clamp(-448, 448).to(FP8).view(torch.uint8)  # vLLM allocates fp8 caches as uint8
    else:
        raw = torch.round(raw / K_SCALE).clamp(-127, 127).to(torch.int8).view(torch.uint8)
    key_cache, value_cache = raw.transpose(1, 2).split(d, dim=-1)
    return key_cache, value_cache


def _timed(fn: Callable[[], object], smoke: bool) -> tuple[float, str, float]:
    """(us per call, timing kind, host us per call)."""
    if smoke:
        fn()
        t0 = time.perf_counter()
        fn()
        us = (time.perf_counter() - t0) * 1e6
        return us, "cpu-interpreter", us
    us, kind = time_rotating(lambda _: fn(), 1, True, 25, 100)
    return us, kind, host_us_per_call(fn, calls=30)


def _vllm_fa3():
    from vllm.vllm_flash_attn import flash_attn_varlen_func, get_scheduler_metadata

    return flash_attn_varlen_func, get_scheduler_metadata


def bench(shapes, *, hq=32, hkv=8, d=128, bs=16, smoke=False) -> list[dict]:
    device = torch.device("cpu" if smoke else "cuda")
    scale = d**-0.5
    rows: list[dict] = []
    no_fa3 = fa3_unavailable_reason(device, d)
    vllm_err = None
    if not smoke:
        try:
            flash_attn_varlen_func, get_scheduler_metadata = _vllm_fa3()
        except Exception as e:  # noqa: BLE001
            vllm_err = f"vLLM's FA3 is not importable: {type(e).__name__}: {e}"
    for name, reqs, new, ctx in shapes:
        p = make_problem(name, reqs, new, ctx, hq, hkv, d, bs, device)
        num_blocks = p.block_table.numel()
        base = dict(shape=name, batch=reqs, new_tokens=new, context=ctx, num_tokens=reqs * new)

        def finish(row: dict, fn: Callable[[], object]) -> None:
            try:
                us, kind, host = _timed(fn, smoke)
                row.update(status="ok", us=round(us, 2), timing=kind, host_us=round(host, 2),
                           tflops=round(4 * hq * d * p.pairs / (us * 1e-6) / 1e12, 1))  # fmt: skip
            except Exception as e:  # noqa: BLE001
                row.update(status="error", error=f"{type(e).__name__}: {e}")
                traceback.print_exc()

        outs: dict[tuple[str, str], torch.Tensor] = {}
        default_tokens = prefill_workspace_tokens(KVQuantConfig().prefill_workspace_mib, hkv, d, 2)
        default_ws = ContextWorkspace.allocate(default_tokens, bs, hkv, d, torch.bfloat16, device)
        for kind in ("fp8", "int8"):
            kc, vc = make_cache(kind, num_blocks, hkv, d, bs, device)
            ks = torch.tensor([K_SCALE], device=device)
            vs = torch.tensor([V_SCALE], device=device)
            kvd = "fp8_e4m3" if kind == "fp8" else "int8"
            ws = ContextWorkspace.allocate(num_blocks * bs, bs, hkv, d, torch.bfloat16, device)
            ws_args = dict(workspace=ws, seq_lens_cpu=p.seq_lens.cpu())
            plans = {  # (all_rows, workspace, mode)
                (False, False, "bf16"): PrefillPlan.build(p.qsl, p.seq_lens, p.block_table, num_tokens=p.q.shape[0],
                                                          max_query_len=new, has_context=ctx > 0),
                (False, True, "bf16"): PrefillPlan.build(p.qsl, p.seq_lens, p.block_table, num_tokens=p.q.shape[0],
                                                         max_query_len=new, has_context=ctx > 0, **ws_args),
                (False, True, "quantized"): PrefillPlan.build(p.qsl, p.seq_lens, p.block_table, num_tokens=p.q.shape[0],
                                                              max_query_len=new, has_context=ctx > 0, **ws_args,
                                                              from_cache_only=True),
                (True, False, "bf16"): PrefillPlan.build(p.qsl, p.seq_lens, p.block_table, num_tokens=p.q.shape[0],
                                                         max_query_len=p.q.shape[0], all_rows=True),
            }  # fmt: skip
            plans[(False, False, "quantized")] = plans[(False, False, "bf16")]
            # What a user gets: the backend's default workspace, in slabs where the step exceeds it.
            plans[(False, "default", "bf16")] = PrefillPlan.build(
                p.qsl, p.seq_lens, p.block_table, num_tokens=p.q.shape[0], max_query_len=new, has_context=ctx > 0,
                workspace=default_ws, seq_lens_cpu=p.seq_lens.cpu(), query_start_loc_cpu=p.qsl.cpu(),
            )  # fmt: skip
            ours: dict[str, dict] = {}
            for row_name, mode, path, all_rows, with_ws in OURS:
                if all_rows and kind != "fp8":
                    continue
                plan = plans[(all_rows, with_ws, mode)]
                row = ours[row_name] = dict(name=row_name, kv_dtype=kind, **base)
                if with_ws:
                    used = default_ws if with_ws == "default" else ws
                    row.update(workspace_mib=round(used.nbytes / 2**20, 1), workspace_used=plan.context_fill is not None,
                               workspace_slabs=len(plan.context_fill or ()))  # fmt: skip
                rows.append(row)
                if path == "fa3" and no_fa3:
                    row.update(status="skipped", reason=no_fa3)
                    continue
                runner = PrefillRunner(num_heads=hq, num_kv_heads=hkv, head_size=d, scale=scale, sliding_window=None,
                                       logits_soft_cap=None, mode=mode, device=device, path=path)  # fmt: skip

                def fn(runner=runner, cache=PagedKVCache(kc, vc, ks, vs, kvd), plan=plan):
                    runner.run(p.q, p.k, p.v, cache, plan, p.out)

                finish(row, fn)
                if row["status"] == "ok":
                    fn()
                    outs[(row_name, kind)] = p.out.clone()
                    if smoke:  # the runner's rows vs the PyTorch reference
                        from vllm_kvquant.kernels.reference import paged_prefill_attention_ref

                        ref = paged_prefill_attention_ref(
                            p.q, p.k, p.v, kc.view(FP8 if kind == "fp8" else torch.int8),
                            vc.view(FP8 if kind == "fp8" else torch.int8), p.block_table, p.qsl,
                            p.seq_lens - new, ks, vs, kvd, scale, mode=mode,
                        )  # fmt: skip
                        row["max_abs_err_ref"] = (p.out.float() - ref.float()).abs().max().item()
            fa3, tri = outs.get(("kvquant-prefill-fa3", kind)), outs.get(("kvquant-prefill-triton", kind))
            if fa3 is not None and tri is not None:
                ours["kvquant-prefill-fa3"]["max_abs_diff_fa3_vs_triton"] = (fa3.float() - tri.float()).abs().max().item()
            del kc, vc, ws

        for kind in ("bf16", "fp8"):
            row = dict(name="vllm-fa3-prefill", kv_dtype=kind, **base)
            rows.append(row)
            if smoke or vllm_err or no_fa3:
                row.update(status="skipped", reason="needs a CUDA GPU" if smoke else (vllm_err or no_fa3))
                continue
            kc, vc = make_cache("bf16" if kind == "bf16" else "fp8", num_blocks, hkv, d, bs, device)
            try:
                if kind == "fp8":
                    kc, vc, q = kc.view(FP8), vc.view(FP8), p.q.to(FP8)  # q_descale 1.0: vLLM's default
                    ds = lambda x: torch.full((1,), x, device=device).expand(reqs, hkv)  # noqa: E731
                    descales = dict(q_descale=ds(1.0), k_descale=ds(K_SCALE), v_descale=ds(V_SCALE))
                    qkv_dtype = FP8
                else:
                    q, descales, qkv_dtype = p.q, {}, torch.bfloat16
                try:
                    sched = get_scheduler_metadata(
                        batch_size=reqs, max_seqlen_q=new, max_seqlen_k=ctx + new, num_heads_q=hq, num_heads_kv=hkv,
                        headdim=d, cache_seqlens=p.seq_lens, qkv_dtype=qkv_dtype, cu_seqlens_q=p.qsl, page_size=bs,
                        causal=True, window_size=(-1, -1), num_splits=0,
                    )  # fmt: skip
                    row["scheduler_metadata"] = True
                except Exception as e:  # noqa: BLE001
                    sched, row["scheduler_metadata"] = None, f"{type(e).__name__}: {e}"

                def fn(q=q, kc=kc, vc=vc, sched=sched, descales=descales):
                    flash_attn_varlen_func(
                        q=q, k=kc, v=vc, out=p.out, cu_seqlens_q=p.qsl, max_seqlen_q=new, seqused_k=p.seq_lens,
                        max_seqlen_k=ctx + new, softmax_scale=scale, causal=True, window_size=[-1, -1],
                        block_table=p.block_table, softcap=0, scheduler_metadata=sched, fa_version=3, **descales,
                    )  # fmt: skip

                finish(row, fn)
            except Exception as e:  # noqa: BLE001
                row.update(status="error", error=f"{type(e).__name__}: {e}")
                traceback.print_exc()
            del kc, vc
        print_rows([r for r in rows if r["shape"] == name])
        del p
        if not smoke:
            torch.cuda.empty_cache()
    return rows


def print_rows(rows: list[dict]) -> None:
    for r in rows:
        head = f"{r['shape']:<15} {r['name']:<26} {r['kv_dtype']:<5}"
        if r["status"] == "ok":
            extra = f" diff-vs-triton={r['max_abs_diff_fa3_vs_triton']:.2g}" if "max_abs_diff_fa3_vs_triton" in r else ""
            print(f"{head} {r['us']:>10.1f} us {r['tflops']:>6.1f} TFLOP/s host {r['host_us']:>7.1f} us{extra}", flush=True)
        else:
            print(f"{head} {r['status'].upper()}: {r.get('reason') or r.get('error', '')}"[:200], flush=True)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="default benchmarks/results/prefill-<device>.json")
    ap.add_argument("--smoke", action="store_true", help="CPU under TRITON_INTERPRET=1: plumbing only, tiny shapes")
    ap.add_argument("--shapes", nargs="+", default=None, metavar="NAME",
                    help=f"subset of {[s[0] for s in SHAPES]} (smoke: {[s[0] for s in SMOKE_SHAPES]})")  # fmt: skip
    a = ap.parse_args(argv)
    table = SMOKE_SHAPES if a.smoke else SHAPES
    unknown = sorted(set(a.shapes or ()) - {s[0] for s in table})
    if unknown:
        ap.error(f"unknown shape(s) {unknown}; choose from {[s[0] for s in table]}")
    if not a.smoke and not torch.cuda.is_available():
        ap.error("needs a CUDA GPU (or --smoke on CPU)")
    if a.smoke and os.environ.get("TRITON_INTERPRET") != "1":
        ap.error("--smoke needs TRITON_INTERPRET=1 set before Triton is imported")
    t0 = time.time()
    copy_gbps = None if a.smoke else measure_copy_gbps()
    dims = dict(hq=4, hkv=2, d=64, bs=16) if a.smoke else dict(hq=32, hkv=8, d=128, bs=16)
    rows = bench([s for s in table if a.shapes is None or s[0] in a.shapes], smoke=a.smoke, **dims)
    result = {
        "device": device_info(),
        "versions": versions(),
        "command": command("benchmarks.kernels.prefill", argv),
        "copy_gbps": copy_gbps,
        "config": {**dims, "dtype": "bfloat16", "scales": "per-tensor",
                   "timing": "one call on the CPU under the Triton interpreter (plumbing only)" if a.smoke else
                   "CUDA-graph replay, median (do_bench); host_us: eager issue time per call"},
        "seconds": round(time.time() - t0, 1),
        "rows": rows,
    }  # fmt: skip
    out = a.out or REPO / "benchmarks" / "results" / ("prefill-cpu-smoke.json" if a.smoke else f"prefill-{device_slug()}.json")
    write_result(out, result)
    print(f"wrote {out} ({result['seconds']} s)")
    return result


if __name__ == "__main__":
    main()
