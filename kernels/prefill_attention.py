"""Triton prefill attention over an 8-bit paged KV cache (FP8 e4m3 or INT8, static scales).

Prefill tokens attend causally to their own step's K/V, read straight from the fp16/bf16
``key``/``value`` tensors (never through the cache), and, where the sequence already has
context in the quantized cache (chunked prefill, prefix-cache hits, recompute after
preemption), to that context, dequantized in registers. The semantics are exactly those of
:func:`.reference.paged_prefill_attention_ref`.

Design (flash-attention style, fp32 accumulation, online softmax in base 2):

- Grid ``(query tiles, num_kv_heads)``. A tile is ``BLOCK_M`` query tokens of one sequence
  times every query head of the KV head's group, flattened into ``BLOCK_M * GROUP_PAD`` rows,
  so each K/V tile is loaded once for the whole GQA group.
- Program -> (sequence, tile) needs no host-side index and no device sync: sequence ``i``
  owns tile ids ``[qsl[i] // BLOCK_M + i, qsl[i + 1] // BLOCK_M + i + 1)`` (never overlapping),
  each program binary-searches ``query_start_loc`` for its sequence, and the grid size
  ``num_tokens // BLOCK_M + num_seqs`` bounds every tile id. Spare programs exit at once.
- Phase 1 walks the cached context (0 iterations when ``context_len == 0``, so pure prefill
  costs one extra load), gathering each key's page through the block table, so any block
  size works. The 8-bit values convert exactly to fp16/bf16 and go through the tensor
  cores unscaled: ``k_scale`` is folded into the logits' multiplier and ``v_scale`` is
  applied to the accumulator once, at the end of phase 1, while it still holds only the
  context's P.V (the online-softmax rescales are linear, so this is exact).
- Phase 2 walks the step's own K/V up to the causal diagonal: tiles wholly below the
  diagonal skip the causal mask.
- Sliding window (``k_pos > q_pos - window``) starts both loops at the first tile a row can
  see; the logits soft cap is ``cap * tanh(logits / cap)`` before masking, as in the reference.

On CPU tensors the Triton kernel runs only under ``TRITON_INTERPRET=1`` (how CI tests it);
otherwise the PyTorch reference serves (vLLM's CPU build).
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

from .dtypes import SUPPORTED_ACT_DTYPES, SUPPORTED_HEAD_SIZES, KVQuantDType, as_storage
from .reference import paged_prefill_attention_ref

__all__ = ["paged_prefill_attention"]

_LOG2E = 1.4426950408889634


@triton.jit
def _find_seq(qsl_ptr, pid, num_seqs, BLOCK_M: tl.constexpr):
    """Largest ``i`` with ``qsl[i] // BLOCK_M + i <= pid`` (the sequence owning tile ``pid``)."""
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_tile = tl.load(qsl_ptr + mid) // BLOCK_M + mid
        if first_tile <= pid:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _mm(a, b, DOT_FP32: tl.constexpr):
    """``a @ b`` of fp16/bf16 tiles into fp32.

    DOT_FP32 (interpreter only) upcasts the already-rounded operands first: Triton's
    interpreter gets bf16 ``tl.dot`` wrong; the products are the same.
    """
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _logits_log2(q, k, mult, soft_cap, SOFT_CAP: tl.constexpr, DOT_FP32: tl.constexpr):
    """``q @ k`` turned into base-2 logits: ``mult`` folds softmax scale (and k_scale)."""
    qk = _mm(q, k, DOT_FP32)
    if SOFT_CAP:
        # mult holds softmax_scale * k_scale / cap; tanh via exp keeps to portable ops.
        x = qk * mult
        t = 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)
        return t * (soft_cap * 1.4426950408889634)
    else:
        return qk * mult


@triton.jit
def _softmax_step(acc, l_i, m_i, s, v, DTYPE: tl.constexpr, DOT_FP32: tl.constexpr):
    """One online-softmax update with masked base-2 logits ``s`` (-inf where masked)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # Rows with nothing visible yet keep m = -inf; subtract 0 instead to avoid inf - inf.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _mm(p.to(DTYPE), v, DOT_FP32)
    return acc, l_i, m_new


@triton.jit
def _prefill_attention_kernel(
    q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, out_ptr,
    bt_ptr, qsl_ptr, ctx_ptr, ks_ptr, vs_ptr,
    new_mult, ctx_mult, soft_cap, window, num_seqs,
    stride_qt, stride_qh, stride_qd,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_kcb, stride_kcs, stride_kch, stride_kcd,
    stride_vcb, stride_vcs, stride_vch, stride_vcd,
    stride_ot, stride_oh, stride_od,
    stride_bt,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD: tl.constexpr, HEAD_PAD: tl.constexpr,
    PAGE: tl.constexpr, K_PER_HEAD: tl.constexpr, V_PER_HEAD: tl.constexpr,
    KV_INT8: tl.constexpr, SOFT_CAP: tl.constexpr, WINDOW: tl.constexpr,
    DTYPE: tl.constexpr, DOT_FP32: tl.constexpr,
):
    ROWS: tl.constexpr = BLOCK_M * GROUP_PAD
    pid = tl.program_id(0)
    kvh = tl.program_id(1)

    seq = _find_seq(qsl_ptr, pid, num_seqs, BLOCK_M)
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    tile = pid - (q_start // BLOCK_M + seq)
    m_start = tile * BLOCK_M
    if m_start >= q_len:
        return
    ctx_len = tl.load(ctx_ptr + seq)

    rows = tl.arange(0, ROWS)
    q_rel = m_start + rows // GROUP_PAD  # token index inside the sequence's new tokens
    g = rows % GROUP_PAD
    row_ok = (q_rel < q_len) & (g < GROUP)
    offs_d = tl.arange(0, HEAD_PAD)
    d_ok = offs_d < HEAD
    tok = (q_start + q_rel).to(tl.int64)
    head = kvh * GROUP + g

    q = tl.load(
        q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :] * stride_qd,
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )

    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, HEAD_PAD], tl.float32)
    offs_n0 = tl.arange(0, BLOCK_N)

    # ---- phase 1: cached context, dequantized in registers ----
    if K_PER_HEAD:
        k_scale = tl.load(ks_ptr + kvh)
    else:
        k_scale = tl.load(ks_ptr)
    if V_PER_HEAD:
        v_scale = tl.load(vs_ptr + kvh)
    else:
        v_scale = tl.load(vs_ptr)
    mult = ctx_mult * k_scale
    q_pos = ctx_len + q_rel  # absolute positions
    lo = 0
    if WINDOW:
        lo = tl.maximum(ctx_len + m_start - window + 1, 0)
        lo = (lo // BLOCK_N) * BLOCK_N
    bt_row = bt_ptr + seq.to(tl.int64) * stride_bt
    for start_n in range(lo, ctx_len, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < ctx_len
        page = tl.load(bt_row + offs_n // PAGE, mask=n_ok, other=0).to(tl.int64)
        slot = offs_n % PAGE
        k = tl.load(
            kc_ptr + (page * stride_kcb + slot * stride_kcs + kvh * stride_kch)[None, :]
            + offs_d[:, None] * stride_kcd,
            mask=n_ok[None, :] & d_ok[:, None],
            other=0.0,
        )
        v = tl.load(
            vc_ptr + (page * stride_vcb + slot * stride_vcs + kvh * stride_vch)[:, None]
            + offs_d[None, :] * stride_vcd,
            mask=n_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        if KV_INT8:  # int8 -> fp32 -> fp16/bf16 (all exact)
            k = k.to(tl.float32).to(DTYPE)
            v = v.to(tl.float32).to(DTYPE)
        else:  # e4m3 -> fp16/bf16 (exact)
            k = k.to(DTYPE)
            v = v.to(DTYPE)
        s = _logits_log2(q, k, mult, soft_cap, SOFT_CAP, DOT_FP32)
        visible = n_ok[None, :]
        if WINDOW:
            visible = visible & (offs_n[None, :] > q_pos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
        acc, l_i, m_i = _softmax_step(acc, l_i, m_i, s, v, DTYPE, DOT_FP32)
    # The accumulator holds only the context's P.V so far: apply v_scale once.
    acc = acc * v_scale

    # ---- phase 2: this step's own K/V, causal ----
    k_base = k_ptr + kvh.to(tl.int64) * stride_kh
    v_base = v_ptr + kvh.to(tl.int64) * stride_vh
    lo = 0
    if WINDOW:
        lo = tl.maximum(m_start - window + 1, 0)
        lo = (lo // BLOCK_N) * BLOCK_N
    # Keys below m_start are visible to every row of the tile (up to the window).
    diag = (m_start // BLOCK_N) * BLOCK_N
    hi = tl.minimum(q_len, m_start + BLOCK_M)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < q_len
        ntok = (q_start + offs_n).to(tl.int64)
        k = tl.load(
            k_base + ntok[None, :] * stride_kt + offs_d[:, None] * stride_kd,
            mask=n_ok[None, :] & d_ok[:, None],
            other=0.0,
        )
        v = tl.load(
            v_base + ntok[:, None] * stride_vt + offs_d[None, :] * stride_vd,
            mask=n_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        s = _logits_log2(q, k, new_mult, soft_cap, SOFT_CAP, DOT_FP32)
        if WINDOW:
            visible = (offs_n[None, :] <= q_rel[:, None]) & (offs_n[None, :] > q_rel[:, None] - window)
            s = tl.where(visible, s, float("-inf"))
        elif start_n >= diag:
            s = tl.where(offs_n[None, :] <= q_rel[:, None], s, float("-inf"))
        acc, l_i, m_i = _softmax_step(acc, l_i, m_i, s, v, DTYPE, DOT_FP32)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    tl.store(
        out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :] * stride_od,
        o.to(DTYPE),
        mask=row_ok[:, None] & d_ok[None, :],
    )


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _select_config(head_pad: int, group_pad: int, max_query_len: int, interpret: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M tokens, BLOCK_N keys, num_warps, num_stages) for one launch.

    Rows per tile = BLOCK_M * GROUP_PAD. Chosen from a sweep on an H100 (triton 3.6) over
    chunked-prefill (1k new on 2k cached) and pure-prefill (4x4k) shapes, head sizes 64..256.
    """
    if interpret:
        rows, block_n, warps, stages = 32, 16, 4, 1
    else:
        stages = 3 if _deep_pipeline() else 2
        if head_pad <= 64:
            rows, block_n, warps = 128, 64, 8
        elif head_pad <= 128:
            rows, block_n, warps = 128, 128, 8
        else:
            rows, block_n, warps, stages = 128, 64, 8, 2
    rows = max(rows, group_pad)
    block_m = max(rows // group_pad, 1)
    # Short prompts: shrink the token tile (keeping at least 16 rows for tl.dot).
    block_m = max(min(block_m, triton.next_power_of_2(max(max_query_len, 1))), max(16 // group_pad, 1))
    return block_m, block_n, warps, stages


@functools.lru_cache(maxsize=None)
def _deep_pipeline_on(device_index: int) -> bool:
    # Three K/V stages fit the shared memory of Hopper / datacenter Blackwell; two elsewhere.
    return torch.cuda.get_device_capability(device_index)[0] in (9, 10)


def _deep_pipeline() -> bool:
    return torch.cuda.is_available() and _deep_pipeline_on(torch.cuda.current_device())


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(f"paged_prefill_attention: {msg}")


def _scale_arg(scale: torch.Tensor, name: str, num_kv_heads: int, device: torch.device) -> torch.Tensor:
    _check(isinstance(scale, torch.Tensor), f"{name} must be a tensor")
    _check(scale.is_floating_point(), f"{name} must be a floating-point tensor, got {scale.dtype}")
    _check(
        scale.numel() in (1, num_kv_heads),
        f"{name} has {scale.numel()} values; expected 1 (per tensor) or {num_kv_heads} (per KV head)",
    )
    _check(scale.device == device, f"{name} is on {scale.device}, query on {device}")
    scale = scale.reshape(-1)
    if scale.dtype != torch.float32:
        scale = scale.to(torch.float32)
    return scale


def paged_prefill_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    k_scale: torch.Tensor,
    v_scale: torch.Tensor,
    kv_dtype: KVQuantDType | str,
    softmax_scale: float | None = None,
    *,
    out: torch.Tensor | None = None,
    max_query_len: int | None = None,
    sliding_window: int | None = None,
    logits_soft_cap: float | None = None,
) -> torch.Tensor:
    """Causal prefill attention to (dequantized cached context) + (the step's own K/V).

    Args:
        query: ``[num_tokens, num_heads, head_size]`` fp16/bf16, any strides.
        key, value: ``[num_tokens, num_kv_heads, head_size]``, the step's K/V unquantized
            (same dtype as ``query``, any strides: views of a fused qkv output are fine).
        key_cache, value_cache: ``[num_blocks, block_size, num_kv_heads, head_size]`` one-byte
            caches (fp8 e4m3 / int8 / uint8 storage), any strides.
        block_table: ``[num_seqs(+), max_blocks]`` int32/int64 page ids, row ``i`` for sequence ``i``.
        query_start_loc: ``[num_seqs + 1]`` int32, new tokens of sequence ``i`` are rows
            ``query_start_loc[i]:query_start_loc[i+1]`` of ``query``/``key``/``value``.
        context_lens: ``[num_seqs]`` int32, tokens already cached before this step (0 = plain
            prefill). New token ``j`` of sequence ``i`` sits at position ``context_lens[i] + j``.
        k_scale, v_scale: fp32 ``[1]`` or ``[num_kv_heads]``; ``real = quantized * scale``.
        kv_dtype: ``"fp8_e4m3"`` or ``"int8"``.
        softmax_scale: defaults to ``head_size ** -0.5``.
        out: optional output ``[num_tokens, num_heads, head_size]`` (query's dtype, any strides);
            rows of tokens outside every sequence are left untouched.
        max_query_len: optional host-side bound on the longest query, used only to size tiles.
        sliding_window: keys with ``q_pos - k_pos >= sliding_window`` are masked (None/0 = off).
        logits_soft_cap: ``cap * tanh(logits / cap)`` before masking (None/0 = off).
    """
    # ---- cheap validation (shapes, dtypes, devices; no device syncs) ----
    kv_dtype = KVQuantDType(kv_dtype)
    for name, t in (("query", query), ("key", key), ("value", value)):
        _check(isinstance(t, torch.Tensor) and t.dim() == 3, f"{name} must be a 3-D tensor [tokens, heads, head_size]")
    _check(query.dtype in SUPPORTED_ACT_DTYPES, f"query dtype {query.dtype} is not one of {SUPPORTED_ACT_DTYPES}")
    _check(key.dtype == query.dtype and value.dtype == query.dtype,
           f"key/value dtype ({key.dtype}, {value.dtype}) must match query ({query.dtype})")
    num_tokens, num_heads, head_size = query.shape
    _check(head_size in SUPPORTED_HEAD_SIZES, f"head size {head_size} is not one of {SUPPORTED_HEAD_SIZES}")
    _check(key.shape == value.shape, f"key {tuple(key.shape)} and value {tuple(value.shape)} shapes differ")
    num_kv_heads = key.shape[1]
    _check(key.shape[0] == num_tokens and key.shape[2] == head_size,
           f"key/value {tuple(key.shape)} do not match query {tuple(query.shape)}")
    _check(num_kv_heads > 0 and num_heads % num_kv_heads == 0,
           f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    for name, c in (("key_cache", key_cache), ("value_cache", value_cache)):
        _check(isinstance(c, torch.Tensor) and c.dim() == 4,
               f"{name} must be 4-D [num_blocks, block_size, num_kv_heads, head_size]")
        _check(c.element_size() == 1, f"{name} must have 1-byte elements, got {c.dtype}")
    _check(key_cache.shape == value_cache.shape,
           f"key_cache {tuple(key_cache.shape)} and value_cache {tuple(value_cache.shape)} shapes differ")
    _check(key_cache.shape[2] == num_kv_heads and key_cache.shape[3] == head_size,
           f"cache {tuple(key_cache.shape)} does not hold {num_kv_heads} KV heads of size {head_size}")
    block_size = key_cache.shape[1]
    _check(block_size > 0, "block size must be positive")
    _check(query_start_loc.dim() == 1 and query_start_loc.numel() >= 1, "query_start_loc must be 1-D [num_seqs + 1]")
    num_seqs = query_start_loc.numel() - 1
    _check(context_lens.dim() == 1 and context_lens.numel() == num_seqs,
           f"context_lens has shape {tuple(context_lens.shape)}; expected [{num_seqs}]")
    _check(block_table.dim() == 2 and block_table.shape[0] >= num_seqs,
           f"block_table must be 2-D with at least {num_seqs} rows, got {tuple(block_table.shape)}")
    for name, t in (("query_start_loc", query_start_loc), ("context_lens", context_lens), ("block_table", block_table)):
        _check(t.dtype in (torch.int32, torch.int64), f"{name} must be int32 or int64, got {t.dtype}")
    device = query.device
    for name, t in (("key", key), ("value", value), ("key_cache", key_cache), ("value_cache", value_cache),
                    ("block_table", block_table), ("query_start_loc", query_start_loc),
                    ("context_lens", context_lens)):
        _check(t.device == device, f"{name} is on {t.device}, query on {device}")
    k_scale = _scale_arg(k_scale, "k_scale", num_kv_heads, device)
    v_scale = _scale_arg(v_scale, "v_scale", num_kv_heads, device)
    if sliding_window is not None:
        _check(sliding_window >= 0, f"sliding_window must be >= 0 (0 or None = off), got {sliding_window}")
    if logits_soft_cap is not None:
        _check(logits_soft_cap >= 0, f"logits_soft_cap must be >= 0 (0 or None = off), got {logits_soft_cap}")
    if out is None:
        out = torch.empty(query.shape, dtype=query.dtype, device=device)
    else:
        _check(out.shape == query.shape and out.dtype == query.dtype and out.device == device,
               f"out must be {tuple(query.shape)} {query.dtype} on {device}, got "
               f"{tuple(out.shape)} {out.dtype} on {out.device}")
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(head_size)
    key_cache = as_storage(key_cache, kv_dtype)
    value_cache = as_storage(value_cache, kv_dtype)

    if num_seqs == 0 or num_tokens == 0:
        return out

    interpret = _interpreting()
    if device.type == "cpu" and not interpret:
        ref = paged_prefill_attention_ref(
            query, key, value, key_cache, value_cache, block_table, query_start_loc, context_lens,
            k_scale, v_scale, kv_dtype, softmax_scale, sliding_window, logits_soft_cap,
        )
        # Only rows that belong to a sequence are written, as on the GPU path.
        qsl = query_start_loc.tolist()
        for i in range(num_seqs):
            out[qsl[i] : qsl[i + 1]] = ref[qsl[i] : qsl[i + 1]]
        return out

    group = num_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    head_pad = triton.next_power_of_2(head_size)
    block_m, block_n, num_warps, num_stages = _select_config(
        head_pad, group_pad, num_tokens if max_query_len is None else min(max_query_len, num_tokens), interpret
    )
    window = int(sliding_window) if sliding_window else 0
    cap = float(logits_soft_cap) if logits_soft_cap else 0.0
    if cap:
        # Logits go through cap * tanh(x / cap): the multiplier yields x / cap.
        new_mult = softmax_scale / cap
    else:
        new_mult = softmax_scale * _LOG2E
    ctx_mult = new_mult  # times k_scale inside the kernel

    grid = (num_tokens // block_m + num_seqs, num_kv_heads)
    _prefill_attention_kernel[grid](
        query, key, value, key_cache, value_cache, out,
        block_table, query_start_loc, context_lens, k_scale, v_scale,
        new_mult, ctx_mult, cap, window, num_seqs,
        *query.stride(), *key.stride(), *value.stride(),
        *key_cache.stride(), *value_cache.stride(),
        *out.stride(),
        block_table.stride(0),
        GROUP=group, GROUP_PAD=group_pad,
        BLOCK_M=block_m, BLOCK_N=block_n,
        HEAD=head_size, HEAD_PAD=head_pad,
        PAGE=block_size, K_PER_HEAD=k_scale.numel() > 1, V_PER_HEAD=v_scale.numel() > 1,
        KV_INT8=kv_dtype is KVQuantDType.INT8, SOFT_CAP=bool(cap), WINDOW=bool(window),
        DTYPE=tl.float16 if query.dtype == torch.float16 else tl.bfloat16, DOT_FP32=interpret,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
