"""The Triton prefill-attention kernel (three modes); launched by :mod:`.prefill_attention`,
which documents the design and the semantics of each mode."""

from __future__ import annotations

import triton
import triton.language as tl

from .jit_helpers import fold_k_scale, load_kv_scale
from .launch import unspecialized

MODE_FULL, MODE_MERGE, MODE_QUANTIZED = 0, 1, 2


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


# Per batch: the request count, the LSE's row stride (the prefill's token count), the block
# table's row length (engine) and the block table / lengths sliced past the batch's decodes.
@triton.jit(**unspecialized("num_seqs", "stride_lh", "stride_bt", "bt_ptr", "lens_ptr"))
def prefill_attention_kernel(
    q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, out_ptr, lse_ptr,
    bt_ptr, qsl_ptr, lens_ptr, ks_ptr, vs_ptr,
    new_mult, ctx_mult, soft_cap, window, num_seqs,
    stride_qt, stride_qh, stride_qd,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_kcb, stride_kcs, stride_kch, stride_kcd,
    stride_vcb, stride_vcs, stride_vch, stride_vcd,
    stride_ot, stride_oh, stride_od,
    stride_lh, stride_lt,
    stride_bt,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD: tl.constexpr, HEAD_PAD: tl.constexpr,
    PAGE: tl.constexpr, K_GRAN: tl.constexpr, V_GRAN: tl.constexpr,
    KV_INT8: tl.constexpr, SOFT_CAP: tl.constexpr, WINDOW: tl.constexpr,
    DTYPE: tl.constexpr, DOT_FP32: tl.constexpr,
    MODE: tl.constexpr, ALL_ROWS: tl.constexpr, LENS_ARE_SEQ: tl.constexpr,
):
    ROWS: tl.constexpr = BLOCK_M * GROUP_PAD
    pid = tl.program_id(0)
    kvh = tl.program_id(1)

    seq = _find_seq(qsl_ptr, pid, num_seqs, BLOCK_M)
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    tile = pid - (q_start // BLOCK_M + seq)
    m_start = tile * BLOCK_M
    skip = m_start >= q_len
    if ALL_ROWS:  # one new token: the decode kernel's request
        skip = skip | (q_len <= 1)
    lens = tl.load(lens_ptr + seq)
    if LENS_ARE_SEQ:
        ctx_len = lens - q_len
    else:
        ctx_len = lens
    if MODE == 1:  # MERGE: no context visible to this tile -> the fresh output stays as it is
        skip = skip | (ctx_len <= 0)
        if WINDOW:
            skip = skip | (m_start >= window - 1)
    if skip:
        return

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

    # ---- the quantized cache, dequantized in registers ----
    # Per-channel K scales fold into the query of the cache loop: (q * s_k) . k_stored.
    q_ctx, k_scale = fold_k_scale(q, load_kv_scale(ks_ptr, kvh, offs_d, HEAD, K_GRAN), K_GRAN)
    q_ctx = q_ctx.to(DTYPE)
    v_scale = load_kv_scale(vs_ptr, kvh, offs_d, HEAD, V_GRAN)  # per channel: [HEAD_PAD]
    mult = ctx_mult * k_scale
    q_pos = ctx_len + q_rel  # absolute positions
    if MODE == 2:  # QUANTIZED: the step's own tokens are in the cache too
        kv_end = ctx_len + tl.minimum(q_len, m_start + BLOCK_M)
    else:
        kv_end = ctx_len
    lo = 0
    if WINDOW:
        lo = tl.maximum(ctx_len + m_start - window + 1, 0)
        lo = (lo // BLOCK_N) * BLOCK_N
    bt_row = bt_ptr + seq.to(tl.int64) * stride_bt
    for start_n in range(lo, kv_end, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < kv_end
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
        # Any one-byte storage (uint8 / int8 / fp8) is reinterpreted, then converted exactly.
        if KV_INT8:
            k = k.to(tl.int8, bitcast=True).to(tl.float32).to(DTYPE)
            v = v.to(tl.int8, bitcast=True).to(tl.float32).to(DTYPE)
        else:
            k = k.to(tl.float8e4nv, bitcast=True).to(DTYPE)
            v = v.to(tl.float8e4nv, bitcast=True).to(DTYPE)
        s = _logits_log2(q_ctx, k, mult, soft_cap, SOFT_CAP, DOT_FP32)
        visible = n_ok[None, :]
        if MODE == 2:
            visible = visible & (offs_n[None, :] <= q_pos[:, None])
        if WINDOW:
            visible = visible & (offs_n[None, :] > q_pos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
        acc, l_i, m_i = _softmax_step(acc, l_i, m_i, s, v, DTYPE, DOT_FP32)
    # The accumulator holds only the cache's P.V so far: apply v_scale once (per channel: a row vector).
    acc = acc * v_scale

    # ---- FULL: this step's own K/V, causal ----
    if MODE == 0:
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

    out_offs = tok[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :] * stride_od
    out_mask = row_ok[:, None] & d_ok[None, :]
    if MODE == 1:
        # out holds the fresh tokens' normalized attention, lse its natural log-sum-exp.
        o_new = tl.load(out_ptr + out_offs, mask=out_mask, other=0.0).to(tl.float32)
        lse2 = tl.load(lse_ptr + head * stride_lh + tok * stride_lt, mask=row_ok, other=0.0) * 1.4426950408889634
        m = tl.maximum(m_i, lse2)
        m = tl.where(m == float("-inf"), 0.0, m)
        a_ctx = tl.exp2(m_i - m)
        a_new = tl.exp2(lse2 - m)
        den = l_i * a_ctx + a_new
        den = tl.where(den == 0.0, 1.0, den)
        o = (acc * a_ctx[:, None] + o_new * a_new[:, None]) / den[:, None]
    else:
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        o = acc / l_safe[:, None]
    tl.store(out_ptr + out_offs, o.to(DTYPE), mask=out_mask)
