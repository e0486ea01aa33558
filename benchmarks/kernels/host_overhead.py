"""Per-layer cost of what the attention backend calls: kvquant's lean path vs vLLM's FA3 path.

    python -m benchmarks.kernels.host_overhead          # -> benchmarks/results/host-overhead-<device>.json (~1 min, H100)
    python -m benchmarks.kernels.host_overhead --smoke  # CPU, TRITON_INTERPRET=1: our rows' code path, tiny shapes

Llama-3-8B attention (32 query heads, 8 KV heads, head 128, block 16, bf16), shapes
``batch x context`` 1x512, 8x512, 32x2048, 64x4096. Each row times exactly the call a layer
makes per step, with the batch metadata built once (as vLLM builds it once per step):

- ``kvquant-decode``: ``KVQuantAttentionImpl.forward`` on a decode-only batch (one new token
  per request, ``context`` tokens each), metadata from the backend's own builder, the cache
  from ``get_kv_cache_shape`` split by ``compat.split_kv_cache`` (fp8_e4m3, per-head scales).
- ``kvquant-write``: ``KVQuantAttentionImpl.do_kv_cache_update`` of that decode step (``batch`` tokens).
- ``kvquant-prefill``: ``forward`` on a chunked-prefill batch: ``query_len = min(context, 512)``
  new tokens per request over ``context - query_len`` cached ones.
- ``vllm-fa3-decode`` / ``vllm-fa3-prefill``: ``vllm.vllm_flash_attn.flash_attn_varlen_func`` as
  vLLM's FLASH_ATTN backend calls it per layer (bf16 paged cache, ``cu_seqlens_q``,
  ``seqused_k``, ``block_table``, causal, descales expanded per call, AOT ``scheduler_metadata``
  built once per batch), on the same batches.
- ``vllm-reshape-and-cache``: ``torch.ops._C_cache_ops.reshape_and_cache_flash`` (bf16 cache) of
  the decode step's ``batch`` tokens.

``us_per_call``: eager wall time per call, averaged over many back-to-back calls with one
synchronisation at the end (the host cost when the GPU keeps up, the kernel time when it does
not); ``host_us``: the same loop's time before that synchronisation (issue cost);
``graph_us``: kernel time per call replaying a CUDA graph of ``GRAPH_CALLS`` calls (the same
launches). ``copy_gbps``: device-to-device copy bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))  # backend_batches: the backend driven without an engine

SMOKE = bool({"--smoke", "--cpu-smoke"} & set(sys.argv[1:]))
if SMOKE:  # before Triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from benchmarks.common import device_info, measure_copy_gbps, versions  # noqa: E402
from benchmarks.harness import command, device_slug, write_result  # noqa: E402

SHAPES = ((1, 512), (8, 512), (32, 2048), (64, 4096))
SMOKE_SHAPES = ((1, 32), (3, 40))
PREFILL_CHUNK = 512  # new tokens per request in the prefill rows (smoke: 16)
GRAPH_CALLS = 10
LLAMA3_8B = dict(num_heads=32, num_kv_heads=8, head_size=128, block_size=16)
TINY = dict(num_heads=4, num_kv_heads=2, head_size=64, block_size=16)


def eager_us(fn: Callable[[], object], smoke: bool, budget_s: float = 0.25) -> tuple[float, float, int]:
    """(wall us per call incl. one final sync, issue us per call, calls) over back-to-back calls."""
    sync = (lambda: None) if smoke else torch.cuda.synchronize
    fn()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    single = time.perf_counter() - t0
    calls = 2 if smoke else max(20, min(1000, int(budget_s / max(single, 1e-6))))
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    issued = time.perf_counter() - t0
    sync()
    wall = time.perf_counter() - t0
    return wall / calls * 1e6, issued / calls * 1e6, calls


def graph_us(fn: Callable[[], object]) -> float:
    """Kernel time per call: a CUDA graph of GRAPH_CALLS calls, replayed (median, do_bench)."""
    import triton.testing

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(GRAPH_CALLS):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    ms = triton.testing.do_bench(graph.replay, warmup=10, rep=50, return_mode="median")
    return ms * 1e3 / GRAPH_CALLS


def measure(row: dict, fn: Callable[[], object], smoke: bool) -> dict:
    try:
        us, host, calls = eager_us(fn, smoke)
        row.update(status="ok", us_per_call=round(us, 2), host_us=round(host, 2), calls=calls)
        if not smoke:
            try:
                row["graph_us"] = round(graph_us(fn), 2)
            except Exception as e:  # noqa: BLE001 - a path that cannot be captured still has its eager number
                row.update(graph_us=None, graph_error=f"{type(e).__name__}: {e}"[:300])
                torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001
        row.update(status="error", error=f"{type(e).__name__}: {e}"[:500])
        traceback.print_exc()
    print_row(row)
    return row


def _vllm_rows(setup, batch: int, ctx: int, decode, prefill, dims: dict) -> list[dict]:
    """vLLM's own per-layer calls on the same batches (bf16 cache of the same shape)."""
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    from vllm_kvquant import compat

    dev, hkv, d = setup.device, dims["num_kv_heads"], dims["head_size"]
    kv = torch.zeros(setup.kv_cache.shape, dtype=torch.bfloat16, device=dev)
    key_cache, value_cache = compat.split_kv_cache(kv, d)
    one = torch.ones(1, dtype=torch.float32, device=dev)
    rows = []
    for name, (m, q, k, v, out) in (("vllm-fa3-decode", decode), ("vllm-fa3-prefill", prefill)):
        row = dict(name=name, batch=batch, context=ctx, num_tokens=q.shape[0], query_len=m.max_query_len,
                   kv_dtype="bf16")  # fmt: skip
        try:
            from vllm.vllm_flash_attn import get_scheduler_metadata

            sched = get_scheduler_metadata(
                batch_size=m.num_reqs, max_seqlen_q=m.max_query_len, max_seqlen_k=m.max_seq_len,
                num_heads_q=dims["num_heads"], num_heads_kv=hkv, headdim=d, cache_seqlens=m.seq_lens,
                qkv_dtype=torch.bfloat16, cu_seqlens_q=m.query_start_loc, page_size=dims["block_size"], causal=True,
                window_size=(-1, -1), num_splits=0,
            )  # fmt: skip
            row["scheduler_metadata"] = True
        except Exception as e:  # noqa: BLE001
            sched, row["scheduler_metadata"] = None, f"{type(e).__name__}: {e}"[:200]
        shape = (m.num_reqs, hkv)

        def fa3(m=m, q=q, out=out, sched=sched, shape=shape):
            flash_attn_varlen_func(
                q=q, k=key_cache, v=value_cache, out=out, cu_seqlens_q=m.query_start_loc,
                max_seqlen_q=m.max_query_len, seqused_k=m.seq_lens, max_seqlen_k=m.max_seq_len,
                softmax_scale=d**-0.5, causal=True, alibi_slopes=None, window_size=None,
                block_table=m.block_table_tensor, softcap=0.0, scheduler_metadata=sched, fa_version=3,
                q_descale=None, k_descale=one.expand(shape), v_descale=one.expand(shape), num_splits=0,
            )  # fmt: skip

        rows.append(measure(row, fa3, False))
    m, q, k, v, _ = decode
    row = dict(name="vllm-reshape-and-cache", batch=batch, context=ctx, num_tokens=k.shape[0], kv_dtype="bf16")
    rows.append(measure(row, lambda: torch.ops._C_cache_ops.reshape_and_cache_flash(
        k, v, key_cache, value_cache, m.slot_mapping, "auto", one, one), False))  # fmt: skip
    return rows


def bench_shape(batch: int, ctx: int, dims: dict, kv_dtype: str, smoke: bool, chunk: int) -> list[dict]:
    from backend_batches import Buffers, make_setup

    device = "cpu" if smoke else "cuda"
    bs = dims["block_size"]
    blocks_per_req = -(-ctx // bs)
    setup = make_setup(
        **dims, num_blocks=batch * blocks_per_req + 2, max_blocks=blocks_per_req, max_num_seqs=max(256, batch),
        kv_dtype=kv_dtype, device=device,
    )  # fmt: skip
    g = torch.Generator(device=device).manual_seed(0)

    def inputs(n: int):
        qkv = torch.randn(n, (dims["num_heads"] + 2 * dims["num_kv_heads"]) * dims["head_size"], generator=g,
                          device=device).to(torch.bfloat16)  # fmt: skip
        q, k, v = qkv.split([dims["num_heads"] * dims["head_size"], *[dims["num_kv_heads"] * dims["head_size"]] * 2], -1)
        q = q.view(n, dims["num_heads"], dims["head_size"])  # views of one projection, as vLLM passes them
        k, v = (t.view(n, dims["num_kv_heads"], dims["head_size"]) for t in (k, v))
        return q, k, v, torch.empty_like(q)

    q_len = min(ctx, chunk)
    batches = {}
    for kind, lens, ctxs in (("decode", [1] * batch, [ctx - 1] * batch), ("prefill", [q_len] * batch, [ctx - q_len] * batch)):
        bufs = Buffers.alloc(setup, batch, sum(lens))
        m = bufs.fill(setup, lens, ctxs)
        batches[kind] = (m, *inputs(sum(lens)))
    impl, layer, kv_cache = setup.impl, setup.layer, setup.kv_cache
    rows = []
    base = dict(batch=batch, context=ctx, kv_dtype=kv_dtype)
    for kind in ("decode", "prefill"):
        m, q, k, v, out = batches[kind]
        md = setup.builder.build(0, m)  # once per batch, as vLLM does per step
        row = dict(name=f"kvquant-{kind}", **base, num_tokens=q.shape[0], query_len=m.max_query_len)

        def fwd(md=md, q=q, k=k, v=v, out=out):
            impl.forward(layer, q, k, v, kv_cache, md, out)

        measure(row, fwd, smoke)
        if kind == "decode" and md.decode:
            row["num_splits"] = next(iter(md.decode.values())).num_splits
        if kind == "prefill" and impl._prefill is not None:
            row["prefill_path"] = impl._prefill.path
        rows.append(row)
    m, q, k, v, _ = batches["decode"]
    row = dict(name="kvquant-write", **base, num_tokens=k.shape[0])
    rows.append(measure(row, lambda: impl.do_kv_cache_update(layer, k, v, kv_cache, m.slot_mapping), smoke))
    if smoke:
        for name in ("vllm-fa3-decode", "vllm-fa3-prefill", "vllm-reshape-and-cache"):
            rows.append(dict(name=name, batch=batch, context=ctx, kv_dtype="bf16", status="skipped",
                             reason="needs vLLM's CUDA kernels"))  # fmt: skip
    else:
        try:
            rows += _vllm_rows(setup, batch, ctx, batches["decode"], batches["prefill"], dims)
        except Exception as e:  # noqa: BLE001 - e.g. a vLLM without FA3: our rows still count
            rows.append(dict(name="vllm", batch=batch, context=ctx, status="error", error=f"{type(e).__name__}: {e}"))
            traceback.print_exc()
    del setup, batches
    if not smoke:
        torch.cuda.empty_cache()
    return rows


PAIRS = (("decode", "kvquant-decode", "vllm-fa3-decode"), ("prefill", "kvquant-prefill", "vllm-fa3-prefill"),
         ("write", "kvquant-write", "vllm-reshape-and-cache"))  # fmt: skip


def ratios(rows: list[dict]) -> dict:
    """kvquant / vLLM per shape and call: ``us_per_call`` (the target: <= 1) and ``graph_us``."""
    by = {(r["name"], r["batch"], r["context"]): r for r in rows if r.get("status") == "ok"}
    out = {}
    for batch, ctx in sorted({(r["batch"], r["context"]) for r in rows}):
        for call, ours, theirs in PAIRS:
            a, b = by.get((ours, batch, ctx)), by.get((theirs, batch, ctx))
            if a and b:
                out[f"{call}-{batch}x{ctx}"] = {
                    "us_per_call": round(a["us_per_call"] / b["us_per_call"], 3),
                    "graph_us": round(a["graph_us"] / b["graph_us"], 3) if a.get("graph_us") and b.get("graph_us") else None,
                }
    return out


def print_row(r: dict) -> None:
    head = f"{r['batch']:>3}x{r['context']:<6} {r['name']:<24}"
    if r.get("status") == "ok":
        graph = f" graph {r['graph_us']:>9.2f} us" if r.get("graph_us") is not None else ""
        print(f"{head} {r['us_per_call']:>9.2f} us/call (host {r['host_us']:>8.2f}){graph}", flush=True)
    else:
        print(f"{head} {str(r.get('status')).upper()}: {r.get('reason') or r.get('error', '')}"[:200], flush=True)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="default benchmarks/results/host-overhead-<device>.json")
    ap.add_argument("--smoke", "--cpu-smoke", action="store_true", help="CPU under TRITON_INTERPRET=1, tiny shapes")
    ap.add_argument("--kv-dtype", default="fp8_e4m3", choices=("fp8_e4m3", "int8"))
    a = ap.parse_args(argv)
    if not a.smoke and not torch.cuda.is_available():
        ap.error("needs a CUDA GPU (or --smoke on CPU)")
    if a.smoke and os.environ.get("TRITON_INTERPRET") != "1":
        ap.error("--smoke needs TRITON_INTERPRET=1 set before Triton is imported")
    t0 = time.time()
    copy_gbps = None if a.smoke else round(measure_copy_gbps(), 1)
    dims = TINY if a.smoke else LLAMA3_8B
    chunk = 16 if a.smoke else PREFILL_CHUNK
    rows = []
    for batch, ctx in SMOKE_SHAPES if a.smoke else SHAPES:
        rows += bench_shape(batch, ctx, dims, a.kv_dtype, a.smoke, chunk)
    from vllm_kvquant.kernels.launch import direct_launch_supported

    result = {
        "device": device_info(),
        "versions": versions(),
        "command": command("benchmarks.kernels.host_overhead", argv),
        "copy_gbps": copy_gbps,
        "config": {**dims, "dtype": "bfloat16", "kv_dtype": a.kv_dtype, "scales": "per-head",
                   "prefill_chunk": chunk, "graph_calls": GRAPH_CALLS,
                   "direct_launch": (not a.smoke) and direct_launch_supported()},
        "seconds": round(time.time() - t0, 1),
        "ratios": ratios(rows),
        "rows": rows,
    }  # fmt: skip
    out = a.out or REPO / "benchmarks" / "results" / (
        "host-overhead-cpu-smoke.json" if a.smoke else f"host-overhead-{device_slug()}.json"
    )
    write_result(out, result)
    print(f"wrote {out} in {result['seconds']} s", flush=True)
    return result


if __name__ == "__main__":
    main()
