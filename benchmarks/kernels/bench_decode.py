"""Decode attention side by side: kvquant's kernel choices and vLLM 0.26's / FlashInfer's own paths.

``bench_decode(shapes, ...) -> list[dict]``, one row per (name, batch, context):

- ``kvquant-triton-fp8-per-channel`` / ``kvquant-triton-int8-per-channel``: the same with per-channel
  scales (one K and one V scale per KV head and channel, ``[num_kv_heads, head_size]``), the other
  rows' scales being per-tensor: the cost of folding K's into the query and V's into the output.
- ``kvquant-triton-fp8`` / ``kvquant-triton-int8`` / ``kvquant-fa3-fp8`` / ``kvquant-flashinfer-fp8``:
  what the kvquant backend runs: :class:`vllm_kvquant.decode_runner.DecodeRunner` on a cache
  allocated through ``KVQuantAttentionBackend.get_kv_cache_shape`` and split by
  ``vllm_kvquant.compat.split_kv_cache`` (the backend's own layout and views), with the plan
  built as the metadata builder builds it for a full-CUDA-graph decode batch. The fa3 row
  includes its fp8 query quantization; the flashinfer row its K-scale-into-query and V-scale
  multiplies.
- ``vllm-fa3-bf16`` / ``vllm-fa3-fp8``: ``flash_attn_varlen_func(fa_version=3)`` as vLLM's
  FLASH_ATTN backend calls it under full CUDA graphs (AOT scheduler metadata, ``num_splits=32``)
  on vLLM's default (NHD) cache layout; fp8 with an fp8 query (vLLM quantizes it before the
  attention op, fused into the preceding ops by torch.compile: not timed) and descales.
- ``vllm-triton-fp8``: TRITON_ATTN's ``unified_attention`` as its backend calls it on CUDA: fp8
  query with ``q_descale``, ``k/v_descale`` expanded, the 3-D (segmented softmax) buffers and
  ``seq_threshold_3D = 128 // num_kv_heads`` (16 for 8 KV heads, a default capture size).
- ``flashinfer-bf16`` / ``flashinfer-fp8``: FlashInfer's ``BatchDecodeWithPagedKVCacheWrapper``
  (tensor cores, CUDA-graph buffers) as vLLM's FlashInfer backend runs it on a Hopper without
  XQA: bf16 query, float ``k_scale`` / ``v_scale`` (FlashInfer multiplies the output by
  ``v_scale`` in a separate kernel).

Rows whose library is missing are kept with ``status: "skipped"`` and the reason; a failing
path records ``status: "error"``. Timing: every call is captured into one CUDA graph cycling
through ``n_copies`` disjoint cache regions (same block table, different pages) and queries,
enough to exceed ``rotate_bytes`` so L2 never holds the working set; ``do_bench(graph.replay,
median)`` / copies. ``gbps`` counts the bytes that must move (K+V at the cache element size,
query, output); ``pct_copy`` compares with a device-to-device copy measured in the same run.
"""

from __future__ import annotations

import math
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import torch

from benchmarks.common import time_rotating
from vllm_kvquant import compat
from vllm_kvquant.backend import KVQuantAttentionBackend
from vllm_kvquant.decode_runner import DecodePlan, DecodePlanner
from vllm_kvquant.peer_decode import create_planner, create_runner, flashinfer_page_table
from vllm_kvquant.errors import KVQuantConfigError
from vllm_kvquant.kernels.paged_cache import PagedKVCache
from vllm_kvquant.kernels.reference import paged_decode_attention_ref

FP8 = torch.float8_e4m3fn
#: In an order that reuses each cache (kvquant fp8, int8; vLLM fp8; vLLM bf16) before the next.
ROW_NAMES = (
    "kvquant-triton-fp8", "kvquant-triton-fp8-per-channel", "kvquant-fa3-fp8", "kvquant-flashinfer-fp8",
    "kvquant-triton-int8", "kvquant-triton-int8-per-channel",
    "vllm-fa3-fp8", "vllm-triton-fp8", "flashinfer-fp8", "vllm-fa3-bf16", "flashinfer-bf16",
)  # fmt: skip
PER_CHANNEL_SUFFIX = "-per-channel"
#: Sized for ~3 minutes on an H100 with FlashInfer's JIT: the issue's target shapes and more.
#: The issue's shapes, plus serving's regime at 1-2k tokens of context (64 and 256 running requests
#: of a 1024-token prompt: `vllm serve` at max concurrency 64 / 256), where splits are short.
DEFAULT_SHAPES = ((1, 4096), (1, 32768), (8, 4096), (8, 32768), (16, 8192), (64, 1024), (64, 4096), (64, 16384),
                  (64, 32768), (128, 2048), (128, 8192), (256, 1024))  # fmt: skip
SMOKE_SHAPES = ((2, 64), (3, 100))
#: Static scales of the synthetic caches (real = stored * scale), per-tensor.
K_SCALE = {"fp8": 0.02, "int8": 0.035}
V_SCALE = {"fp8": 0.015, "int8": 0.03}
KV_STORE = {"fp8": FP8, "int8": torch.int8}
#: Sequences compared with the PyTorch reference per row (the reference loops over sequences).
CHECK_SEQS = 4


@dataclass
class BenchConfig:
    """Llama-3-8B attention by default: 32 query heads, 8 KV heads, head 128, block 16, bf16."""

    num_q_heads: int = 32
    num_kv_heads: int = 8
    head_size: int = 128
    block_size: int = 16
    dtype: torch.dtype = torch.bfloat16
    rotate_bytes: int = 256 << 20
    max_copies: int = 64
    warmup: int = 25
    rep: int = 100
    check: bool = True
    device: str = "cuda"


def _fill_random_(cache: torch.Tensor, kind: str, scale: float, chunk_blocks: int = 2048) -> None:
    """Random stored values in chunks (no big fp32 temporaries); ``kind`` bf16 | fp8 | int8."""
    for s in range(0, cache.shape[0], chunk_blocks):
        part = cache[s : s + chunk_blocks]
        x = torch.randn(part.shape, device=cache.device, dtype=torch.float32)
        if kind == "fp8":
            part.copy_((x / scale).clamp(-448, 448).to(FP8))
        elif kind == "int8":
            part.copy_(torch.round(x / scale).clamp(-127, 127).to(torch.int8))
        else:
            part.copy_(x.to(part.dtype))


class Problem:
    """One (batch, context): block table, lengths, rotating queries, caches per layout and kind."""

    def __init__(self, cfg: BenchConfig, batch: int, ctx: int) -> None:
        self.cfg, self.batch, self.ctx = cfg, batch, ctx
        dev = torch.device(cfg.device)
        self.nbs = math.ceil(ctx / cfg.block_size)
        self.pages = batch * self.nbs  # pages of one copy
        kv_bytes = batch * ctx * cfg.num_kv_heads * cfg.head_size * 2  # K+V at one byte
        self.n_copies = max(1, min(cfg.max_copies, math.ceil(cfg.rotate_bytes / kv_bytes)))
        self.block_table = torch.randperm(self.pages, device=dev).to(torch.int32).view(batch, self.nbs)
        self.seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
        self.seq_lens_cpu = self.seq_lens.cpu()
        self.query_start_loc = torch.arange(batch + 1, dtype=torch.int32, device=dev)
        self.queries = torch.randn(self.n_copies, batch, cfg.num_q_heads, cfg.head_size, device=dev).to(cfg.dtype)
        self.out = torch.empty(batch, cfg.num_q_heads, cfg.head_size, device=dev, dtype=cfg.dtype)
        self._caches: dict[tuple[str, str], tuple[list, list]] = {}

    def caches(self, layout: str, kind: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-copy K and V views ``[pages, block_size, num_kv_heads, head_size]``.

        ``layout`` "kvquant": the backend's own shape and split helpers; "vllm": vLLM's default
        NHD cache (FLASH_ATTN / FLASHINFER on Hopper), physical ``[blocks, block, heads, 2*dim]``.
        """
        key = (layout, kind)
        if key not in self._caches:
            for other in [k for k in self._caches if k[1] != "fp8"]:
                del self._caches[other]  # keep at most one non-fp8 cache alive
            c = self.cfg
            nb, dev = self.n_copies * self.pages, torch.device(c.device)
            if layout == "kvquant":
                shape = KVQuantAttentionBackend.get_kv_cache_shape(nb, c.block_size, c.num_kv_heads, c.head_size, "fp8")
                kv = torch.empty(shape, dtype=torch.uint8, device=dev)
            else:
                phys = torch.empty(nb, c.block_size, c.num_kv_heads, 2 * c.head_size, dtype=KV_STORE.get(kind, c.dtype), device=dev)
                kv = phys.permute(0, 2, 1, 3)  # vLLM's logical (B, H, N, 2D) over NHD memory
            k, v = compat.split_kv_cache(kv.view(KV_STORE[kind]) if layout == "kvquant" else kv, c.head_size)
            _fill_random_(k, kind, K_SCALE.get(kind, 1.0))
            _fill_random_(v, kind, V_SCALE.get(kind, 1.0))
            p = self.pages
            self._caches[key] = ([k[i * p : (i + 1) * p] for i in range(self.n_copies)],
                                 [v[i * p : (i + 1) * p] for i in range(self.n_copies)])  # fmt: skip
        return self._caches[key]

    def plan(self, planner: DecodePlanner | None, use_cuda_graph: bool) -> DecodePlan:
        return DecodePlan.build(
            self.block_table, self.seq_lens, self.query_start_loc, self.ctx, planner=planner,
            seq_lens_cpu=self.seq_lens_cpu, use_cuda_graph=use_cuda_graph,
        )  # fmt: skip


def _time(fn: Callable[[int], Any], n: int, cfg: BenchConfig) -> tuple[float, str]:
    if cfg.device == "cuda":
        return time_rotating(fn, n, True, cfg.warmup, cfg.rep)
    fn(0)  # CPU smoke: eager wall time, a check of the plumbing rather than a measurement
    times = []
    for i in range(3):
        t0 = time.perf_counter()
        fn(i % n)
        times.append(time.perf_counter() - t0)
    return sorted(times)[1] * 1e6, "eager-cpu"


def _row_kind(name: str) -> tuple[str, bool]:
    """``(cache kind, per-channel scales)`` of a row: ``kvquant-triton-int8-per-channel`` -> ("int8", True)."""
    per_channel = name.endswith(PER_CHANNEL_SUFFIX)
    return name.removesuffix(PER_CHANNEL_SUFFIX).rsplit("-", 1)[1], per_channel


def _scales(kind: str, dev: str, cfg: BenchConfig | None = None, per_channel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor ``[1]``, or per-channel ``[num_kv_heads, head_size]``: 0.5x-1.5x the per-tensor
    scale, fixed by a seed (so the check's reference uses the very same values)."""
    if not per_channel:
        return torch.tensor([K_SCALE[kind]], device=dev), torch.tensor([V_SCALE[kind]], device=dev)
    g = torch.Generator().manual_seed(1)
    spread = lambda: 0.5 + torch.rand(cfg.num_kv_heads, cfg.head_size, generator=g)  # noqa: E731
    return (K_SCALE[kind] * spread()).to(dev), (V_SCALE[kind] * spread()).to(dev)


# ---------------- row callables: each returns fn(copy) and writes prob.out ----------------


def _kvquant(prob: Problem, kernel: str, kind: str, per_channel: bool = False) -> Callable[[int], Any]:
    c = prob.cfg
    kvd = "fp8_e4m3" if kind == "fp8" else "int8"
    common = dict(num_heads=c.num_q_heads, num_kv_heads=c.num_kv_heads, head_size=c.head_size,
                  scale=1.0 / math.sqrt(c.head_size), sliding_window=None, logits_soft_cap=None, kv_dtype=kvd,
                  model_dtype=c.dtype, device=c.device)  # fmt: skip
    ks, vs = _scales(kind, c.device, c, per_channel)
    runner = create_runner(kernel, per_head=per_channel, per_channel=per_channel, max_num_seqs=prob.batch,
                           k_scale=ks, v_scale=vs, **common)  # fmt: skip
    planner = create_planner(kernel, block_size=c.block_size, max_num_seqs=prob.batch,
                             max_num_blocks_per_seq=prob.nbs, per_channel=per_channel, **common)  # fmt: skip
    plan = prob.plan(planner, use_cuda_graph=c.device == "cuda")
    caches = [PagedKVCache(k, v, ks, vs, kvd) for k, v in zip(*prob.caches("kvquant", kind))]
    return lambda i: runner.run(prob.queries[i], caches[i], plan, prob.out)


def _vllm_fa3(prob: Problem, kind: str) -> Callable[[int], Any]:
    from vllm.vllm_flash_attn import flash_attn_varlen_func, get_scheduler_metadata

    c = prob.cfg
    kc, vc = prob.caches("vllm", kind)
    fp8 = kind == "fp8"
    qs = prob.queries.to(FP8) if fp8 else prob.queries  # vLLM's q scale 1.0
    descale = (lambda x: torch.full((1,), x, device=c.device).expand(prob.batch, c.num_kv_heads)) if fp8 else None
    qd, kd, vd = (descale(1.0), descale(K_SCALE["fp8"]), descale(V_SCALE["fp8"])) if fp8 else (None, None, None)
    splits = 32  # vLLM's flash_attn_max_num_splits_for_cuda_graph
    sched = get_scheduler_metadata(
        batch_size=prob.batch, max_seqlen_q=1, max_seqlen_k=prob.ctx, num_heads_q=c.num_q_heads,
        num_heads_kv=c.num_kv_heads, headdim=c.head_size, cache_seqlens=prob.seq_lens,
        qkv_dtype=FP8 if fp8 else c.dtype, cu_seqlens_q=prob.query_start_loc, page_size=c.block_size,
        causal=True, window_size=(-1, -1), num_splits=splits,
    )  # fmt: skip
    return lambda i: flash_attn_varlen_func(
        q=qs[i], k=kc[i], v=vc[i], out=prob.out, cu_seqlens_q=prob.query_start_loc, max_seqlen_q=1,
        seqused_k=prob.seq_lens, max_seqlen_k=prob.ctx, softmax_scale=1.0 / math.sqrt(c.head_size), causal=True,
        window_size=None, block_table=prob.block_table, softcap=0.0, scheduler_metadata=sched, fa_version=3,
        q_descale=qd, k_descale=kd, v_descale=vd, num_splits=splits,
    )  # fmt: skip


def _vllm_triton(prob: Problem) -> Callable[[int], Any]:
    from vllm.v1.attention.ops.triton_unified_attention import unified_attention
    from vllm.v1.kv_cache_interface import KVQuantMode

    c = prob.cfg
    kc, vc = prob.caches("vllm", "fp8")
    qs = prob.queries.to(FP8)  # on CUDA TRITON_ATTN takes the query quantized by the layer
    threshold, segs = 128 // c.num_kv_heads, 16  # MIN_LAUNCH_GRID_SIZE_2D // Hkv, NUM_PAR_SOFTMAX_SEGMENTS
    dpad = 1 << (c.head_size - 1).bit_length()
    segm_out = torch.empty(threshold, c.num_q_heads, segs, dpad, dtype=torch.float32, device=c.device)
    segm_max = torch.empty(threshold, c.num_q_heads, segs, dtype=torch.float32, device=c.device)
    segm_sum = torch.empty_like(segm_max)
    q_scale = torch.ones((), dtype=torch.float32, device=c.device)  # layer._q_scale
    kd = torch.full((1,), K_SCALE["fp8"], device=c.device).expand(prob.batch, c.num_kv_heads)
    vd = torch.full((1,), V_SCALE["fp8"], device=c.device).expand(prob.batch, c.num_kv_heads)
    return lambda i: unified_attention(
        q=qs[i], k=kc[i], v=vc[i], out=prob.out, cu_seqlens_q=prob.query_start_loc, max_seqlen_q=1,
        seqused_k=prob.seq_lens, max_seqlen_k=prob.ctx, softmax_scale=1.0 / math.sqrt(c.head_size), causal=True,
        window_size=(-1, -1), block_table=prob.block_table, softcap=0, q_descale=q_scale, k_descale=kd,
        v_descale=vd, seq_threshold_3D=threshold, num_par_softmax_segments=segs, softmax_segm_output=segm_out,
        softmax_segm_max=segm_max, softmax_segm_expsum=segm_sum, kv_quant_mode=KVQuantMode.FP8_PER_TENSOR,
    )  # fmt: skip


def _flashinfer(prob: Problem, kind: str) -> Callable[[int], Any]:
    from flashinfer import BatchDecodeWithPagedKVCacheWrapper

    c = prob.cfg
    kc, vc = prob.caches("vllm", kind)
    indptr, indices, last = flashinfer_page_table(prob.block_table, prob.seq_lens_cpu, c.block_size)
    dev = torch.device(c.device)
    wrapper = BatchDecodeWithPagedKVCacheWrapper(
        torch.zeros(256 << 20, dtype=torch.uint8, device=dev), "NHD", use_cuda_graph=True, use_tensor_cores=True,
        paged_kv_indptr_buffer=torch.zeros(prob.batch + 1, dtype=torch.int32, device=dev),
        paged_kv_indices_buffer=torch.zeros(indices.numel(), dtype=torch.int32, device=dev),
        paged_kv_last_page_len_buffer=torch.zeros(prob.batch, dtype=torch.int32, device=dev),
    )  # fmt: skip
    wrapper.plan(
        indptr, indices, last, c.num_q_heads, c.num_kv_heads, c.head_size, c.block_size, pos_encoding_mode="NONE",
        q_data_type=c.dtype, kv_data_type=FP8 if kind == "fp8" else c.dtype, o_data_type=c.dtype,
        sm_scale=1.0 / math.sqrt(c.head_size),
    )  # fmt: skip
    scales = dict(q_scale=1.0, k_scale=K_SCALE["fp8"], v_scale=V_SCALE["fp8"]) if kind == "fp8" else {}
    return lambda i: wrapper.run(prob.queries[i], (kc[i], vc[i]), out=prob.out, **scales)


def _make(prob: Problem, name: str) -> Callable[[int], Any]:
    if name.startswith("kvquant-"):
        kind, per_channel = _row_kind(name)
        return _kvquant(prob, name.split("-")[1], kind, per_channel)
    if prob.cfg.device != "cuda":
        raise _Skip("CPU smoke run: vLLM's and FlashInfer's kernels need a CUDA GPU")
    try:
        if name.startswith("vllm-fa3-"):
            return _vllm_fa3(prob, name.rsplit("-", 1)[1])
        if name == "vllm-triton-fp8":
            return _vllm_triton(prob)
        return _flashinfer(prob, name.rsplit("-", 1)[1])
    except ImportError as e:
        raise _Skip(f"{type(e).__name__}: {e}") from e


class _Skip(Exception):
    """The row's library or device is missing: recorded as skipped, not as an error."""


# ---------------- the run ----------------


def _ref_bf16(q, k, v, block_table, seq_lens) -> torch.Tensor:
    """fp32 attention over an unquantized paged cache (the bf16 rows' reference)."""
    out = torch.empty_like(q)
    g = q.shape[1] // k.shape[2]
    for i in range(q.shape[0]):
        n = int(seq_lens[i])
        pages = block_table[i, : -(-n // k.shape[1])].long()
        kk = k[pages].reshape(-1, k.shape[2], k.shape[3])[:n].float().repeat_interleave(g, 1)
        vv = v[pages].reshape(-1, v.shape[2], v.shape[3])[:n].float().repeat_interleave(g, 1)
        p = torch.softmax(torch.einsum("hd,khd->hk", q[i].float(), kk) / math.sqrt(q.shape[-1]), dim=-1)
        out[i] = torch.einsum("hk,khd->hd", p, vv).to(q.dtype)
    return out


def _check(prob: Problem, name: str, row: dict) -> None:
    """Copy 0's first sequences vs a PyTorch reference on the same stored bytes (fp32)."""
    kind, per_channel = _row_kind(name)
    k, v = (x[0] for x in prob.caches("kvquant" if name.startswith("kvquant") else "vllm", kind))
    n = min(CHECK_SEQS, prob.batch)
    q, bt, sl = prob.queries[0][:n], prob.block_table[:n], prob.seq_lens[:n]
    if kind not in KV_STORE:
        ref = _ref_bf16(q, k, v, bt, sl)
    else:
        ks, vs = _scales(kind, prob.cfg.device, prob.cfg, per_channel)
        kvd = "fp8_e4m3" if kind == "fp8" else "int8"
        ref = paged_decode_attention_ref(q, k, v, bt, sl, ks, vs, kvd)
        if name in ("kvquant-fa3-fp8", "vllm-fa3-fp8", "vllm-triton-fp8"):  # error left once Q is fp8
            ref8 = paged_decode_attention_ref(q.to(FP8).to(q.dtype), k, v, bt, sl, ks, vs, kvd)
            row["max_abs_err_ref_fp8_query"] = (prob.out[:n].float() - ref8.float()).abs().max().item()
    row["max_abs_err_ref"] = (prob.out[:n].float() - ref.float()).abs().max().item()


def bench_decode(
    shapes=DEFAULT_SHAPES,
    names=ROW_NAMES,
    cfg: BenchConfig | None = None,
    copy_gbps: float | None = None,
    verbose: bool = True,
) -> list[dict]:
    cfg = cfg or BenchConfig()
    torch.manual_seed(0)
    c = cfg
    act = torch.empty((), dtype=c.dtype).element_size()
    rows: list[dict] = []
    for batch, ctx in shapes:
        prob = Problem(cfg, batch, ctx)
        for name in names:
            kind, per_channel = _row_kind(name)
            elem = act if kind in ("bf16", "fp16") else 1
            q_elem = 1 if name in ("vllm-fa3-fp8", "vllm-triton-fp8") else act
            row = dict(name=name, kind="decode", kv_dtype=kind, scales="per-channel" if per_channel else "per-tensor",
                       batch=batch, context=ctx, us=None, gbps=None,
                       pct_copy=None, status="ok", n_copies=prob.n_copies,
                       bytes=batch * ctx * c.num_kv_heads * c.head_size * 2 * elem
                       + batch * c.num_q_heads * c.head_size * (q_elem + act))  # fmt: skip
            try:
                fn = _make(prob, name)
                row["us"], row["timing"] = _time(fn, prob.n_copies, cfg)
                row["gbps"] = row["bytes"] / (row["us"] * 1e-6) / 1e9
                if copy_gbps:
                    row["pct_copy"] = round(100.0 * row["gbps"] / copy_gbps, 1)
                if cfg.check:
                    fn(0)
                    _check(prob, name, row)
            except (_Skip, KVQuantConfigError) as e:
                row.update(status="skipped", reason=str(e))
            except Exception as e:  # noqa: BLE001 - one failing path must not stop the run
                row.update(status="error", error=f"{type(e).__name__}: {e}")
                if verbose:
                    traceback.print_exc()
            rows.append(row)
            if verbose:
                print(fmt_row(row), flush=True)
        del prob
        if cfg.device == "cuda":
            torch.cuda.empty_cache()
    return rows


def tune_decode(configs=None, shapes=((64, 4096), (64, 16384), (8, 32768)), kv_dtypes=("fp8", "int8"),
                verbose=True, **kw: Any) -> list[dict]:  # fmt: skip
    """Time only our Triton kernel for each :class:`DecodeKernelConfig` in ``configs`` (dicts)."""
    from vllm_kvquant.kernels import decode_attention as da

    configs = configs or [dict(num_stages=s, tile_bytes=t, num_warps=w) for t in (8192, 16384)
                          for s in (3, 4, 5) for w in (4, 8)]  # fmt: skip
    saved, rows = da.DEFAULT_CONFIG, []
    try:
        for conf in configs:
            da.DEFAULT_CONFIG = da.DecodeKernelConfig(**conf)
            cfg = BenchConfig(check=False, **kw)
            for r in bench_decode(shapes, tuple(f"kvquant-triton-{k}" for k in kv_dtypes), cfg, verbose=False):
                r["config"] = dict(conf)
                rows.append(r)
                if verbose:
                    print(conf, fmt_row(r), flush=True)
    finally:
        da.DEFAULT_CONFIG = saved
    return rows


def fmt_row(row: dict) -> str:
    head = f"{row['name']:<31} b={row['batch']:<3} ctx={row['context']:<6}"
    if row["status"] != "ok":
        return f"{head} {row['status'].upper()}: {(row.get('reason') or row.get('error') or '')[:150]}"
    extra = "".join(f" {k}={row[k]:.3g}" for k in ("max_abs_err_ref", "max_abs_err_ref_fp8_query") if row.get(k) is not None)
    pct = f" ({row['pct_copy']:5.1f}% of copy)" if row.get("pct_copy") is not None else ""
    return f"{head} {row['us']:9.1f} us {row['gbps']:7.0f} GB/s{pct}{extra}"


def print_table(rows: list[dict]) -> None:
    """Per (batch, context): microseconds of every row, and kvquant's best vs vLLM's FA3."""
    rows = [r for r in rows if r.get("kind", "decode") == "decode"]
    names = list(dict.fromkeys(r["name"] for r in rows))
    by: dict = {}
    for r in rows:
        by.setdefault((r["batch"], r["context"]), {})[r["name"]] = r.get("us")
    short = [n.replace("kvquant-", "kvq-").replace("flashinfer", "fi") for n in names]
    print("batch ctx    " + " ".join(f"{n:>14}" for n in short) + "  fa3fp8/kvq-triton-fp8")
    for (b, ctx), us in sorted(by.items()):
        cells = " ".join(f"{(f'{us[n]:.1f}' if us.get(n) else '-'):>14}" for n in names)
        ours, fa = us.get("kvquant-triton-fp8"), us.get("vllm-fa3-fp8")
        print(f"{b:<5} {ctx:<6} {cells}  {(f'{fa / ours:.2f}x' if ours and fa else '-'):>10}")
