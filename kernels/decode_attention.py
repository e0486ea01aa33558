"""Paged decode attention over the 8-bit (FP8 e4m3 / INT8) KV cache, in Triton.

One query token per sequence (at position ``seq_len - 1``) attends to ``seq_lens[i]`` cached
tokens; :func:`paged_decode_attention` has exactly the semantics of
:func:`.reference.paged_decode_attention_ref`.

Design (memory bound: the point of an 8-bit cache is half the bytes per decode step)
- One program = (sequence, KV head, split).  It holds *all* query heads of its KV head
  (``GROUP = Hq / Hkv`` rows, padded to >= 16 for ``tl.dot``), so every K/V byte is read once.
- Each loop iteration gathers a tile of ``block_n`` tokens (several pages: head 128 -> 128
  tokens = 8 pages of 16) through the block table, loads the 1-byte K and V tiles (cp.async,
  double-buffered at the default ``num_stages``), converts them to the
  dot dtype (fp8 -> fp16/bf16 exact; int8 -> fp16/bf16 exact for |x| <= 127), and runs an
  online softmax in fp32 with ``exp2``.  ``softmax_scale * k_scale * log2(e)`` multiplies the
  fp32 score tile (one scalar per program: per-head scales are per KV head; scaling the
  [group x tile] scores instead of pre-scaling Q costs nothing and avoids rounding Q twice);
  ``v_scale`` multiplies the output once at the end.
- Split-KV (flash-decoding): grid ``(num_seqs, num_kv_heads, num_splits)``.  ``num_splits``
  depends only on (num_seqs, num_kv_heads, head_size, SM count, max_num_splits), never on the
  values of ``seq_lens``, so the launch is CUDA-graph safe; each split derives its tile range
  from ``seq_len`` in-kernel (>= ``min_tokens_per_split`` tokens each, so short sequences use
  few splits).  Splits write a normalised partial output and its log2-sum-exp to an fp32
  workspace (``-inf`` for empty splits); a small second kernel merges the active splits.
  With ``num_splits == 1`` the first kernel writes the output directly and no reduce runs.
- No host synchronisation and no data-dependent allocation in the wrapper; pass a
  preallocated ``workspace`` (:func:`alloc_decode_workspace`) to allocate nothing at all.
- ``seq_len == 0`` rows (CUDA-graph padding) read nothing and produce zeros.
- On CPU without ``TRITON_INTERPRET=1`` it falls back to the PyTorch reference.

Tuning knobs: :class:`DecodeKernelConfig` (tile bytes/tokens, warps, pipeline stages, split
heuristic, dot dtype); pass ``config=``, replace :data:`DEFAULT_CONFIG`, or set
``KVQUANT_DECODE_CONFIG="num_stages=3,block_n=64"`` before import.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch

from .dtypes import SUPPORTED_ACT_DTYPES, KVQuantDType, as_storage
from .reference import paged_decode_attention_ref

try:  # vLLM's CPU build may run without Triton: then only the reference path exists.
    import triton
    import triton.language as tl

    _HAVE_TRITON = True
except ImportError:  # pragma: no cover - exercised only where Triton is absent
    triton = None
    tl = None
    _HAVE_TRITON = False

__all__ = [
    "MAX_NUM_SPLITS",
    "DecodeKernelConfig",
    "DEFAULT_CONFIG",
    "paged_decode_attention",
    "choose_num_splits",
    "decode_workspace_shape",
    "alloc_decode_workspace",
]

#: Hard upper bound on KV splits per (sequence, KV head).
MAX_NUM_SPLITS = 64
#: Largest head size the kernel takes (padded to a power of two in-kernel).
MAX_HEAD_SIZE = 256

_LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class DecodeKernelConfig:
    """Launch/tuning parameters.  Defaults measured on an H100 (benchmarks/tune.py), Llama-3-8B shapes.

    Compiled for sm_90 (Triton 3.6, head 128, fp8, bf16): a 128-token tile with
    ``num_stages=5`` double-buffers K/V (2 x 32 KB in flight per program, ~75 KB shared
    memory, 168 registers -> 3 programs per SM); ``num_stages`` 3-4 single-buffers them
    (the block-table load takes a pipeline stage).
    """

    #: Bytes of one K tile per loop iteration: tokens per tile = tile_bytes // padded head size
    #: (clamped to [16, 256]); 16 KB -> 128 tokens (8 pages of 16) at head size 128.
    tile_bytes: int = 16384
    #: Explicit tokens per tile (power of two >= 16); overrides ``tile_bytes``.
    block_n: int | None = None
    num_warps: int = 4
    #: Warps for padded head size 256 (4 warps reach the 255-register cap there).
    num_warps_large_head: int = 8
    #: Software-pipelining depth of the loop (cp.async stages on Hopper); see class doc.
    num_stages: int = 5
    #: Each active split covers at least this many tokens (bounds workspace traffic).
    min_tokens_per_split: int = 256
    #: Split heuristic: aim for a grid of about this many programs per SM. 8 won the H100
    #: sweep (benchmarks/tune.py: 4/8/12/16/24/32 x stages 2/5, Llama-3-8B shapes).
    target_ctas_per_sm: int = 8
    reduce_num_warps: int = 4
    #: Run the dots in fp16 even for bf16 queries (the query must then fit fp16's range).
    #: Off: dots run in the query dtype.
    dot_in_fp16: bool = False
    #: SM count assumed where no CUDA device is queried (Triton interpreter on CPU).
    cpu_num_sms: int = 8

    def tile_tokens(self, head_size: int) -> int:
        if self.block_n is not None:
            return int(self.block_n)
        return max(16, min(256, self.tile_bytes // max(16, _next_pow2(head_size))))

    def warps(self, head_size: int) -> int:
        return self.num_warps if _next_pow2(head_size) <= 128 else self.num_warps_large_head

    def min_tiles_per_split(self, head_size: int) -> int:
        return max(1, self.min_tokens_per_split // self.tile_tokens(head_size))


def _config_from_env() -> DecodeKernelConfig:
    """``KVQUANT_DECODE_CONFIG="num_stages=3,block_n=64"`` overrides defaults (for tuning runs)."""
    spec = os.environ.get("KVQUANT_DECODE_CONFIG", "").strip()
    if not spec:
        return DecodeKernelConfig()
    kw = {}
    for item in spec.split(","):
        key, _, val = item.partition("=")
        key = key.strip()
        if key not in DecodeKernelConfig.__dataclass_fields__:
            raise ValueError(f"KVQUANT_DECODE_CONFIG: unknown field {key!r}")
        val = val.strip()
        kw[key] = (val.lower() in ("1", "true", "yes")) if key == "dot_in_fp16" else (None if val == "None" else int(val))
    return DecodeKernelConfig(**kw)


DEFAULT_CONFIG = _config_from_env()


def _next_pow2(x: int) -> int:
    return 1 << max(int(x) - 1, 0).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=None)
def _cuda_num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sms(device: torch.device, config: DecodeKernelConfig) -> int:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _cuda_num_sms(index)
    return config.cpu_num_sms


def choose_num_splits(
    num_seqs: int,
    num_kv_heads: int,
    head_size: int,
    num_sms: int,
    max_num_splits: int | None = None,
    config: DecodeKernelConfig | None = None,
) -> int:
    """Splits per (sequence, KV head): a function of shapes and the device only (graph safe)."""
    cfg = config or DEFAULT_CONFIG
    cap = MAX_NUM_SPLITS if max_num_splits is None else max(1, min(int(max_num_splits), MAX_NUM_SPLITS))
    groups = max(int(num_seqs) * int(num_kv_heads), 1)
    target = cfg.target_ctas_per_sm * max(int(num_sms), 1)
    return max(1, min(cap, _cdiv(target, groups)))


def _workspace_numel(num_seqs: int, num_q_heads: int, head_size: int, num_splits: int) -> int:
    # [num_seqs, Hq, splits, head_size] partial outputs, then [num_seqs, Hq, splits] LSEs.
    return num_seqs * num_q_heads * num_splits * (head_size + 1)


def decode_workspace_shape(
    max_num_seqs: int,
    num_q_heads: int,
    head_size: int,
    max_num_splits: int | None = None,
    *,
    num_kv_heads: int | None = None,
    device: torch.device | str | None = None,
    config: DecodeKernelConfig | None = None,
) -> tuple[int]:
    """Shape of an fp32 workspace that serves every batch of up to ``max_num_seqs``.

    Without ``num_kv_heads`` this is the loose bound ``max_num_seqs * max_num_splits``
    partials; with it (and ``device`` for the SM count) it is the largest need of the split
    heuristic over all batch sizes, usually far smaller.
    """
    cfg = config or DEFAULT_CONFIG
    cap = MAX_NUM_SPLITS if max_num_splits is None else max(1, min(int(max_num_splits), MAX_NUM_SPLITS))
    if num_kv_heads is None:
        rows = max_num_seqs * cap
    else:
        dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        sms = _num_sms(dev, cfg)
        rows = 0
        for n in range(1, max_num_seqs + 1):
            s = choose_num_splits(n, num_kv_heads, head_size, sms, cap, cfg)
            if s > 1:
                rows = max(rows, n * s)
    return (max(_workspace_numel(rows, num_q_heads, head_size, 1), 1),)


def alloc_decode_workspace(
    max_num_seqs: int,
    num_q_heads: int,
    head_size: int,
    max_num_splits: int | None = None,
    *,
    num_kv_heads: int | None = None,
    device: torch.device | str | None = None,
    config: DecodeKernelConfig | None = None,
) -> torch.Tensor:
    """Preallocated fp32 workspace for :func:`paged_decode_attention` (reuse it under graphs)."""
    shape = decode_workspace_shape(
        max_num_seqs, num_q_heads, head_size, max_num_splits, num_kv_heads=num_kv_heads, device=device, config=config
    )
    return torch.empty(shape, dtype=torch.float32, device=device)


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------

if _HAVE_TRITON:

    @triton.jit
    def _split_tile_range(
        seq_len,
        split,
        num_splits,
        window,
        BLOCK_N: tl.constexpr,
        MIN_TILES: tl.constexpr,
        USE_WINDOW: tl.constexpr,
    ):
        """First attended token, this split's tile range [lo, hi), and the active split count."""
        if USE_WINDOW:
            start = tl.maximum(seq_len - window, 0)
        else:
            start = seq_len * 0
        tile_lo = start // BLOCK_N
        tile_end = tl.cdiv(seq_len, BLOCK_N)
        num_tiles = tile_end - tile_lo
        tiles_per_split = tl.maximum(tl.cdiv(num_tiles, num_splits), MIN_TILES)
        lo = tile_lo + split * tiles_per_split
        hi = tl.minimum(lo + tiles_per_split, tile_end)
        num_active = tl.cdiv(num_tiles, tiles_per_split)
        return start, lo, hi, num_active

    @triton.jit
    def _decode_split_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        bt_ptr,
        seq_lens_ptr,
        k_scale_ptr,
        v_scale_ptr,
        out_ptr,
        part_o_ptr,
        part_lse_ptr,
        sm_scale,
        soft_cap,
        window,
        num_splits,
        stride_qs,
        stride_qh,
        stride_qd,
        stride_kb,
        stride_kt,
        stride_kh,
        stride_kd,
        stride_vb,
        stride_vt,
        stride_vh,
        stride_vd,
        stride_bts,
        stride_btb,
        stride_os,
        stride_oh,
        stride_od,
        stride_pos,
        stride_poh,
        stride_pok,
        stride_pls,
        stride_plh,
        HEAD_SIZE: tl.constexpr,
        HEAD_PAD: tl.constexpr,
        GROUP: tl.constexpr,
        GROUP_PAD: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        BLOCK_N: tl.constexpr,
        MIN_TILES: tl.constexpr,
        PER_HEAD_SCALE: tl.constexpr,
        USE_WINDOW: tl.constexpr,
        USE_SOFTCAP: tl.constexpr,
        SPLIT: tl.constexpr,
        DOT_DTYPE: tl.constexpr,
    ):
        seq = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        seq_len = tl.load(seq_lens_ptr + seq)
        start, lo, hi, num_active = _split_tile_range(
            seq_len, split, num_splits, window, BLOCK_N, MIN_TILES, USE_WINDOW
        )

        offs_g = tl.arange(0, GROUP_PAD)
        offs_d = tl.arange(0, HEAD_PAD)
        offs_n = tl.arange(0, BLOCK_N)
        g_mask = offs_g < GROUP
        d_mask = offs_d < HEAD_SIZE
        heads = kvh * GROUP + offs_g
        seq64 = seq.to(tl.int64)

        q = tl.load(
            q_ptr + seq64 * stride_qs + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
            mask=g_mask[:, None] & d_mask[None, :],
            other=0.0,
        ).to(DOT_DTYPE)

        if PER_HEAD_SCALE:
            k_scale = tl.load(k_scale_ptr + kvh)
            v_scale = tl.load(v_scale_ptr + kvh)
        else:
            k_scale = tl.load(k_scale_ptr)
            v_scale = tl.load(v_scale_ptr)
        if USE_SOFTCAP:
            qk_scale = sm_scale * k_scale / soft_cap  # tanh argument
            cap_log2 = soft_cap * 1.4426950408889634
        else:
            qk_scale = sm_scale * k_scale * 1.4426950408889634  # log2 domain

        m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_PAD], dtype=tl.float32)

        bt_row = bt_ptr + seq64 * stride_bts
        k_base = k_ptr + kvh.to(tl.int64) * stride_kh + offs_d[None, :] * stride_kd
        v_base = v_ptr + kvh.to(tl.int64) * stride_vh + offs_d[None, :] * stride_vd

        for t in range(lo, hi):
            tok = t * BLOCK_N + offs_n
            valid = (tok < seq_len) & (tok >= start)
            page = tl.load(bt_row + (tok // BLOCK_SIZE) * stride_btb, mask=valid, other=0).to(tl.int64)
            slot = (tok % BLOCK_SIZE).to(tl.int64)
            if HEAD_PAD == HEAD_SIZE:
                kv_mask = valid[:, None]
            else:
                kv_mask = valid[:, None] & d_mask[None, :]
            k = tl.load(
                k_base + page[:, None] * stride_kb + slot[:, None] * stride_kt, mask=kv_mask, other=0.0
            ).to(DOT_DTYPE)
            v = tl.load(
                v_base + page[:, None] * stride_vb + slot[:, None] * stride_vt, mask=kv_mask, other=0.0
            ).to(DOT_DTYPE)

            s = tl.dot(q, tl.trans(k)) * qk_scale  # [GROUP_PAD, BLOCK_N] fp32
            if USE_SOFTCAP:
                # cap * tanh(x), tanh(x) = 1 - 2 / (exp(2x) + 1); saturates cleanly at +-1.
                s = cap_log2 * (1.0 - 2.0 / (tl.exp2(s * (2.0 * 1.4426950408889634)) + 1.0))
            s = tl.where(valid[None, :], s, float("-inf"))

            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_ref)
            p = tl.exp2(s - m_ref[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v)
            m_i = m_new

        has = l_i > 0.0
        o = acc / tl.where(has, l_i, 1.0)[:, None] * v_scale
        out_mask = g_mask[:, None] & d_mask[None, :]
        if SPLIT:
            po = part_o_ptr + seq64 * stride_pos + heads[:, None] * stride_poh + split * stride_pok + offs_d[None, :]
            tl.store(po, o, mask=out_mask)
            lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
            tl.store(part_lse_ptr + seq64 * stride_pls + heads * stride_plh + split, lse, mask=g_mask)
        else:
            po = out_ptr + seq64 * stride_os + heads[:, None] * stride_oh + offs_d[None, :] * stride_od
            tl.store(po, o.to(out_ptr.dtype.element_ty), mask=out_mask)

    @triton.jit
    def _decode_reduce_kernel(
        part_o_ptr,
        part_lse_ptr,
        seq_lens_ptr,
        out_ptr,
        window,
        num_splits,
        stride_pos,
        stride_poh,
        stride_pok,
        stride_pls,
        stride_plh,
        stride_os,
        stride_oh,
        stride_od,
        HEAD_SIZE: tl.constexpr,
        HEAD_PAD: tl.constexpr,
        SPLITS_PAD: tl.constexpr,
        BLOCK_N: tl.constexpr,
        MIN_TILES: tl.constexpr,
        USE_WINDOW: tl.constexpr,
    ):
        seq = tl.program_id(0)
        head = tl.program_id(1)
        seq_len = tl.load(seq_lens_ptr + seq)
        _start, _lo, _hi, num_active = _split_tile_range(
            seq_len, 0, num_splits, window, BLOCK_N, MIN_TILES, USE_WINDOW
        )
        seq64 = seq.to(tl.int64)
        offs_s = tl.arange(0, SPLITS_PAD)
        offs_d = tl.arange(0, HEAD_PAD)
        s_mask = offs_s < num_active
        d_mask = offs_d < HEAD_SIZE
        lse = tl.load(
            part_lse_ptr + seq64 * stride_pls + head * stride_plh + offs_s, mask=s_mask, other=float("-inf")
        )
        m = tl.max(lse, 0)
        m = tl.where(m == float("-inf"), 0.0, m)
        w = tl.where(s_mask, tl.exp2(lse - m), 0.0)
        denom = tl.sum(w, 0)
        o = tl.load(
            part_o_ptr + seq64 * stride_pos + head * stride_poh + offs_s[:, None] * stride_pok + offs_d[None, :],
            mask=s_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        res = tl.sum(o * w[:, None], 0) / tl.where(denom > 0.0, denom, 1.0)
        tl.store(
            out_ptr + seq64 * stride_os + head * stride_oh + offs_d * stride_od,
            res.to(out_ptr.dtype.element_ty),
            mask=d_mask,
        )


# --------------------------------------------------------------------------------------------
# Wrapper
# --------------------------------------------------------------------------------------------


def _check_scale(name: str, scale: torch.Tensor, num_kv_heads: int) -> None:
    if not isinstance(scale, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(scale).__name__}")
    if scale.numel() not in (1, num_kv_heads):
        raise ValueError(f"{name} has {scale.numel()} values; expected 1 or num_kv_heads={num_kv_heads}")


def _validate(query, key_cache, value_cache, block_table, seq_lens, k_scale, v_scale, out, max_num_splits):
    if query.dim() != 3:
        raise ValueError(f"query must be [num_seqs, num_q_heads, head_size], got shape {tuple(query.shape)}")
    if query.dtype not in SUPPORTED_ACT_DTYPES:
        raise ValueError(f"query dtype {query.dtype} unsupported; expected one of {SUPPORTED_ACT_DTYPES}")
    num_seqs, num_q_heads, head_size = query.shape
    if not (16 <= head_size <= MAX_HEAD_SIZE) or head_size % 8 != 0:
        raise ValueError(f"head size {head_size} unsupported; need a multiple of 8 in [16, {MAX_HEAD_SIZE}]")
    for name, cache in (("key_cache", key_cache), ("value_cache", value_cache)):
        if cache.dim() != 4:
            raise ValueError(f"{name} must be [num_blocks, block_size, num_kv_heads, head_size], got {tuple(cache.shape)}")
        if cache.element_size() != 1:
            raise ValueError(f"{name} must hold 1-byte elements (fp8/int8/uint8), got {cache.dtype}")
        if cache.shape[3] != head_size:
            raise ValueError(f"{name} head size {cache.shape[3]} != query head size {head_size}")
    if key_cache.shape[:3] != value_cache.shape[:3]:
        raise ValueError(f"key_cache {tuple(key_cache.shape)} and value_cache {tuple(value_cache.shape)} differ")
    num_kv_heads = key_cache.shape[2]
    if num_kv_heads == 0 or num_q_heads % num_kv_heads != 0:
        raise ValueError(f"num_q_heads={num_q_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    if block_table.dim() != 2 or block_table.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"block_table must be a 2-D int32/int64 tensor, got {block_table.dtype} {tuple(block_table.shape)}")
    if seq_lens.dim() != 1 or seq_lens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"seq_lens must be a 1-D int32/int64 tensor, got {seq_lens.dtype} {tuple(seq_lens.shape)}")
    if block_table.shape[0] < num_seqs or seq_lens.shape[0] < num_seqs:
        raise ValueError(
            f"block_table ({block_table.shape[0]} rows) and seq_lens ({seq_lens.shape[0]}) must cover {num_seqs} sequences"
        )
    _check_scale("k_scale", k_scale, num_kv_heads)
    _check_scale("v_scale", v_scale, num_kv_heads)
    if out is not None and (out.shape != query.shape or out.dtype != query.dtype):
        raise ValueError(f"out must be {query.dtype} {tuple(query.shape)}, got {out.dtype} {tuple(out.shape)}")
    if max_num_splits is not None and int(max_num_splits) < 1:
        raise ValueError(f"max_num_splits must be >= 1, got {max_num_splits}")
    dev = query.device
    for name, t in (
        ("key_cache", key_cache),
        ("value_cache", value_cache),
        ("block_table", block_table),
        ("seq_lens", seq_lens),
        ("k_scale", k_scale),
        ("v_scale", v_scale),
    ):
        if t.device != dev:
            raise ValueError(f"{name} is on {t.device} but query is on {dev}")
    return num_seqs, num_q_heads, head_size, num_kv_heads


def paged_decode_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    k_scale: torch.Tensor,
    v_scale: torch.Tensor,
    kv_dtype: KVQuantDType | str,
    softmax_scale: float | None = None,
    *,
    out: torch.Tensor | None = None,
    sliding_window: int | None = None,
    logits_soft_cap: float | None = None,
    max_num_splits: int | None = None,
    workspace: torch.Tensor | None = None,
    config: DecodeKernelConfig | None = None,
) -> torch.Tensor:
    """Decode attention of ``query [num_seqs, Hq, D]`` over the paged 8-bit cache.

    Same semantics as :func:`.reference.paged_decode_attention_ref`; returns ``out`` (allocated
    like ``query`` when not given).  Caches may be fp8/int8 or uint8 storage, any strides.
    ``sliding_window``: attend to the last ``sliding_window`` tokens (None or <= 0: all).
    ``max_num_splits``: cap on KV splits (1 disables split-KV).  ``workspace``: contiguous fp32
    buffer of at least :func:`decode_workspace_shape` elements, used only when the launch splits.
    """
    try:
        kv_dtype = KVQuantDType(kv_dtype)
    except ValueError:
        raise ValueError(f"unsupported kv_dtype {kv_dtype!r}; expected one of {[d.value for d in KVQuantDType]}") from None
    num_seqs, num_q_heads, head_size, num_kv_heads = _validate(
        query, key_cache, value_cache, block_table, seq_lens, k_scale, v_scale, out, max_num_splits
    )
    key_cache = as_storage(key_cache, kv_dtype)
    value_cache = as_storage(value_cache, kv_dtype)
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(head_size)
    if sliding_window is not None and not isinstance(sliding_window, int):
        raise ValueError(f"sliding_window must be an int (tokens) or None, got {sliding_window!r}")
    window = sliding_window if sliding_window and sliding_window > 0 else 0  # <= 0: no window
    cap = abs(float(logits_soft_cap)) if logits_soft_cap else 0.0  # cap*tanh(x/cap) is even in cap

    if not _HAVE_TRITON or (query.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1"):
        ref = paged_decode_attention_ref(
            query, key_cache, value_cache, block_table[:num_seqs], seq_lens[:num_seqs], k_scale, v_scale, kv_dtype,
            softmax_scale, sliding_window=window or None, logits_soft_cap=cap or None,
        )  # fmt: skip
        if out is None:
            return ref
        out.copy_(ref)
        return out

    if out is None:
        out = torch.empty_like(query)
    if num_seqs == 0:
        return out
    cfg = config or DEFAULT_CONFIG
    block_n = cfg.tile_tokens(head_size)
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"config tile of {block_n} tokens: need a power of two >= 16")
    min_tiles = cfg.min_tiles_per_split(head_size)
    if k_scale.dtype != torch.float32:
        k_scale = k_scale.float()
    if v_scale.dtype != torch.float32:
        v_scale = v_scale.float()
    per_head = k_scale.numel() > 1 or v_scale.numel() > 1
    if per_head:  # one pointer layout for both: broadcast a per-tensor scale (tiny copy)
        k_scale = k_scale.reshape(-1).expand(num_kv_heads).contiguous() if k_scale.numel() == 1 else k_scale.reshape(-1)
        v_scale = v_scale.reshape(-1).expand(num_kv_heads).contiguous() if v_scale.numel() == 1 else v_scale.reshape(-1)

    group = num_q_heads // num_kv_heads
    head_pad = max(16, _next_pow2(head_size))
    group_pad = max(16, _next_pow2(group))
    block_size = key_cache.shape[1]
    num_splits = choose_num_splits(
        num_seqs, num_kv_heads, head_size, _num_sms(query.device, cfg), max_num_splits, cfg
    )
    dot_dtype = tl.float16 if (cfg.dot_in_fp16 or query.dtype == torch.float16) else tl.bfloat16
    if dot_dtype == tl.bfloat16 and query.device.type == "cpu":
        dot_dtype = tl.float32  # the Triton interpreter (numpy) mis-computes bf16 casts and dots
    split = num_splits > 1

    if split:
        need = _workspace_numel(num_seqs, num_q_heads, head_size, num_splits)
        if workspace is None:
            workspace = torch.empty((need,), dtype=torch.float32, device=query.device)
        elif workspace.dtype != torch.float32 or not workspace.is_contiguous() or workspace.numel() < need:
            raise ValueError(
                f"workspace must be a contiguous fp32 tensor with >= {need} elements "
                f"(got {workspace.dtype}, {workspace.numel()}); see decode_workspace_shape()"
            )
        n_o = num_seqs * num_q_heads * num_splits * head_size
        part_o = workspace.view(-1)[:n_o].view(num_seqs, num_q_heads, num_splits, head_size)
        part_lse = workspace.view(-1)[n_o : n_o + num_seqs * num_q_heads * num_splits].view(
            num_seqs, num_q_heads, num_splits
        )
    else:
        part_o = out  # unused placeholders (dead code under SPLIT=False)
        part_lse = out
    po_strides = (part_o.stride(0), part_o.stride(1), part_o.stride(2)) if split else (0, 0, 0)
    pl_strides = (part_lse.stride(0), part_lse.stride(1)) if split else (0, 0)

    _decode_split_kernel[(num_seqs, num_kv_heads, num_splits)](
        query, key_cache, value_cache, block_table, seq_lens, k_scale, v_scale,
        out, part_o, part_lse,
        float(softmax_scale), cap, window, num_splits,
        *query.stride(), *key_cache.stride(), *value_cache.stride(), *block_table.stride(),
        *out.stride(), *po_strides, *pl_strides,
        HEAD_SIZE=head_size, HEAD_PAD=head_pad, GROUP=group, GROUP_PAD=group_pad,
        BLOCK_SIZE=block_size, BLOCK_N=block_n, MIN_TILES=min_tiles,
        PER_HEAD_SCALE=per_head, USE_WINDOW=window > 0, USE_SOFTCAP=cap > 0.0, SPLIT=split,
        DOT_DTYPE=dot_dtype,
        num_warps=cfg.warps(head_size), num_stages=cfg.num_stages,
    )  # fmt: skip
    if split:
        _decode_reduce_kernel[(num_seqs, num_q_heads)](
            part_o, part_lse, seq_lens, out, window, num_splits,
            *po_strides, *pl_strides, *out.stride(),
            HEAD_SIZE=head_size, HEAD_PAD=head_pad, SPLITS_PAD=max(2, _next_pow2(num_splits)),
            BLOCK_N=block_n, MIN_TILES=min_tiles, USE_WINDOW=window > 0,
            num_warps=cfg.reduce_num_warps,
        )  # fmt: skip
    return out
