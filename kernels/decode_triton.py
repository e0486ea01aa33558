"""The Triton kernels of paged decode attention (see :mod:`.decode_attention` for the design).

Arguments come in the order the launch path assembles them: per call (query, output), per
layer (caches, scales, options), per batch plan (block table, lengths, workspace), then the
constexprs of the layer and of the plan.

``VARLEN``: program ``i`` serves request ``i`` of a vLLM batch only if its query length
``qsl[i+1] - qsl[i]`` is 1 (a decode), reading its query row and writing its output row at
``qsl[i]``; other requests (prefills, CUDA-graph padding) exit at once. This lets one launch
over an upper bound of requests serve any mix of decodes and prefills (full CUDA graphs).
Without it, program ``i`` reads row ``i`` (the public ``[num_seqs, Hq, D]`` API).
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - exercised only where Triton is absent
    triton = None
    tl = None
    HAVE_TRITON = False

from .launch import unspecialized

__all__ = ["HAVE_TRITON", "decode_split_kernel", "decode_reduce_kernel"]

decode_split_kernel = None
decode_reduce_kernel = None

if HAVE_TRITON:
    from .jit_helpers import fold_k_scale, load_kv_scale

    # int8 -> fp16, four per instance: ``0x6400 | (x ^ 0x80)`` is the fp16 ``1152 + x`` (two byte
    # permutes), then one packed fp16 subtract per pair.
    _INT8_TO_FP16_ASM = tl.constexpr("""{
    .reg .b32 t, c, m;
    xor.b32 t, $2, 0x80808080;
    mov.b32 c, 0x64646464;
    mov.b32 m, 0x64806480;
    prmt.b32 $0, t, c, 0x4140;
    prmt.b32 $1, t, c, 0x4342;
    sub.rn.f16x2 $0, $0, m;
    sub.rn.f16x2 $1, $1, m;
    }""")
    # e4m3 -> fp16, four per instance: one hardware conversion per pair.
    _FP8_TO_FP16_ASM = tl.constexpr("""{
    .reg .b16 lo, hi;
    mov.b32 {lo, hi}, $2;
    cvt.rn.f16x2.e4m3x2 $0, lo;
    cvt.rn.f16x2.e4m3x2 $1, hi;
    }""")

    @triton.jit
    def _k_to_fp16(x):
        """K tile -> fp16 where the dot wants it (Triton converts in the dot-operand layout)."""
        if x.dtype == tl.int8:
            return tl.inline_asm_elementwise(
                asm=_INT8_TO_FP16_ASM, constraints="=r,=r,r", args=[x], dtype=tl.float16, is_pure=True, pack=4
            )
        else:
            return x.to(tl.float16)  # one cvt.rn.f16x2.e4m3x2 per pair

    @triton.jit
    def _v_to_fp16(x):
        """V tile -> fp16 where it is loaded (16-byte rows), so that its transpose into the
        dot operand moves 16-bit values (``ldmatrix``) instead of single bytes.

        Why: P @ V reduces over tokens, which V stores 1 byte apart; Triton's own path gathers
        each operand byte with a separate shared-memory load and packs them with integer ops
        (about half of the loop's instructions). ``is_pure=False`` keeps Triton from moving the
        layout change above the conversion. Measured on an H200 (Triton 3.6): see
        ``DecodeKernelConfig.asm_dequant_int8``."""
        if x.dtype == tl.int8:
            return tl.inline_asm_elementwise(
                asm=_INT8_TO_FP16_ASM, constraints="=r,=r,r", args=[x], dtype=tl.float16, is_pure=False, pack=4
            )
        else:
            return tl.inline_asm_elementwise(
                asm=_FP8_TO_FP16_ASM, constraints="=r,=r,r", args=[x.to(tl.int8, bitcast=True)],
                dtype=tl.float16, is_pure=False, pack=4,
            )

    @triton.jit
    def _split_tile_range(
        seq_len_ptr,
        split,
        num_splits,
        fill_splits,
        window,
        BLOCK_N: tl.constexpr,
        MIN_TILES: tl.constexpr,
        LONG_TILES: tl.constexpr,
        USE_WINDOW: tl.constexpr,
    ):
        """The sequence's length, first attended token, this split's tile range [lo, hi), and the
        active split count.

        ``LONG_TILES`` > 0: a sequence uses only as many of its ``num_splits`` as give each at
        least ``LONG_TILES`` tiles, but never fewer than ``fill_splits`` (the splits per sequence
        that fill the GPU with this batch): few long programs where the batch fills the GPU, many
        short ones where it does not. 0: every split that gets ``MIN_TILES``."""
        seq_len = tl.load(seq_len_ptr)
        if USE_WINDOW:
            start = tl.maximum(seq_len - window, 0)
        else:
            start = seq_len * 0
        tile_lo = start // BLOCK_N
        tile_end = tl.cdiv(seq_len, BLOCK_N)
        num_tiles = tile_end - tile_lo
        if LONG_TILES > 0:
            splits = tl.minimum(num_splits, tl.maximum(tl.cdiv(num_tiles, LONG_TILES), fill_splits))
        else:
            splits = num_splits
        tiles_per_split = tl.maximum(tl.cdiv(num_tiles, splits), MIN_TILES)
        lo = tile_lo + split * tiles_per_split
        hi = tl.minimum(lo + tiles_per_split, tile_end)
        num_active = tl.cdiv(num_tiles, tiles_per_split)
        return seq_len, start, lo, hi, num_active

    @triton.jit
    def _plan_row(qsl_ptr, VARLEN: tl.constexpr):
        """This program's plan entry (grid axis 0), its query/output row, and whether to skip it
        (VARLEN: not exactly one query token, a prefill or padding; read only under VARLEN)."""
        seq = tl.program_id(0)
        if VARLEN:
            row = tl.load(qsl_ptr + seq)
            skip = tl.load(qsl_ptr + seq + 1) - row != 1
        else:
            row = seq
            skip = seq < 0  # never
        return seq, row, skip

    # The split count and the workspace strides follow the batch size, the block table's row
    # length the engine: none of them selects a variant (launch.unspecialized).
    @triton.jit(**unspecialized("num_splits", "fill_splits", "stride_bts", "stride_pls", "stride_plh"))
    def _decode_split_kernel(
        # per call
        q_ptr, out_ptr,
        stride_qs, stride_qh, stride_qd,
        stride_os, stride_oh, stride_od,
        # per layer
        k_ptr, v_ptr, k_scale_ptr, v_scale_ptr,
        sm_scale, soft_cap, window,
        stride_kb, stride_kt, stride_kh, stride_kd,
        stride_vb, stride_vt, stride_vh, stride_vd,
        # per batch plan
        bt_ptr, seq_lens_ptr, qsl_ptr, part_o_ptr, part_lse_ptr,
        num_splits, fill_splits,
        stride_bts, stride_btb,
        stride_pos, stride_poh, stride_pok,
        stride_pls, stride_plh,
        # layer constexprs
        HEAD_SIZE: tl.constexpr, HEAD_PAD: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, MIN_TILES: tl.constexpr, LONG_TILES: tl.constexpr,
        K_GRAN: tl.constexpr, V_GRAN: tl.constexpr, USE_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr,
        DOT_DTYPE: tl.constexpr, ASM_DEQUANT: tl.constexpr, Q_RESCALE: tl.constexpr, PAGE_MASKS: tl.constexpr,
        # plan constexprs
        SPLIT: tl.constexpr, VARLEN: tl.constexpr,
    ):  # fmt: skip
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        seq, row, skip = _plan_row(qsl_ptr, VARLEN)
        if VARLEN:
            if skip:
                return
        seq_len, start, lo, hi, num_active = _split_tile_range(
            seq_lens_ptr + seq, split, num_splits, fill_splits, window, BLOCK_N, MIN_TILES, LONG_TILES, USE_WINDOW
        )
        if SPLIT:
            # A split with no tiles of this sequence: the reduce reads only the active splits.
            if split >= tl.maximum(num_active, 1):
                return

        offs_g = tl.arange(0, GROUP_PAD)
        offs_d = tl.arange(0, HEAD_PAD)
        offs_n = tl.arange(0, BLOCK_N)
        g_mask = offs_g < GROUP
        d_mask = offs_d < HEAD_SIZE
        heads = kvh * GROUP + offs_g
        seq64 = seq.to(tl.int64)
        row64 = row.to(tl.int64)

        q = tl.load(
            q_ptr + row64 * stride_qs + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
            mask=g_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        # Per-channel K scales fold into the query: (q * s_k) . k_stored, then one scalar as before.
        q, k_scale = fold_k_scale(q, load_kv_scale(k_scale_ptr, kvh, offs_d, HEAD_SIZE, K_GRAN), K_GRAN)
        if Q_RESCALE:
            # A bf16 query into fp16 dots: divide by a power of two that keeps |q| <= 2**14 (no
            # overflow). Components that end up below 2**-14 become fp16 subnormals and lose bits.
            qf = q.to(tl.float32)
            q_exp = tl.maximum(tl.ceil(tl.log2(tl.max(tl.max(tl.abs(qf), 1), 0))) - 14.0, 0.0)
            q = (qf * tl.exp2(-q_exp)).to(DOT_DTYPE)
            q_mult = tl.exp2(q_exp)
        else:
            q_mult = 1.0
            q = q.to(DOT_DTYPE)

        k_scale = k_scale * q_mult
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

        first_page = start // BLOCK_SIZE
        end_page = tl.cdiv(seq_len, BLOCK_SIZE)
        for t in range(lo, hi):
            tok = t * BLOCK_N + offs_n
            valid = (tok < seq_len) & (tok >= start)
            if PAGE_MASKS:  # constant over each page: loads may vectorize along tokens
                pidx = tok // BLOCK_SIZE
                load_mask = (pidx < end_page) & (pidx >= first_page)
            else:
                load_mask = valid
            page = tl.load(bt_row + (tok // BLOCK_SIZE) * stride_btb, mask=load_mask, other=0).to(tl.int64)
            slot = (tok % BLOCK_SIZE).to(tl.int64)
            if HEAD_PAD == HEAD_SIZE:
                kv_mask = load_mask[:, None]
            else:
                kv_mask = load_mask[:, None] & d_mask[None, :]
            k = tl.load(k_base + page[:, None] * stride_kb + slot[:, None] * stride_kt, mask=kv_mask, other=0.0)
            v = tl.load(v_base + page[:, None] * stride_vb + slot[:, None] * stride_vt, mask=kv_mask, other=0.0)
            if ASM_DEQUANT:  # fp16 dots on a GPU (exact: e4m3 and int8 are subsets of fp16)
                k = _k_to_fp16(k)
                v = _v_to_fp16(v)
            else:
                k = k.to(DOT_DTYPE)
                v = v.to(DOT_DTYPE)
            if PAGE_MASKS:  # slots read outside the sequence hold anything (NaN too): p = 0 must meet v = 0
                v = tl.where(valid[:, None], v, 0.0)

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
        # Loaded after the loop: a per-channel [HEAD_PAD] vector live across it costs registers
        # (int8 at its 168-register cap spilled 8 bytes with the load before the loop).
        v_scale = load_kv_scale(v_scale_ptr, kvh, offs_d, HEAD_SIZE, V_GRAN)
        o = acc / tl.where(has, l_i, 1.0)[:, None] * v_scale
        out_mask = g_mask[:, None] & d_mask[None, :]
        # One active split (a short sequence in a batch planned for long ones): this program saw
        # the whole sequence and writes the output itself; the reduce skips the sequence.
        direct = True
        if SPLIT:
            direct = num_active <= 1
        if not direct:
            part = part_o_ptr + seq64 * stride_pos + heads[:, None] * stride_poh + split * stride_pok + offs_d[None, :]
            tl.store(part, o, mask=out_mask)
            lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
            tl.store(part_lse_ptr + seq64 * stride_pls + heads * stride_plh + split, lse, mask=g_mask)
        else:
            po = out_ptr + row64 * stride_os + heads[:, None] * stride_oh + offs_d[None, :] * stride_od
            tl.store(po, o.to(out_ptr.dtype.element_ty), mask=out_mask)

    @triton.jit(**unspecialized("num_splits", "fill_splits", "stride_pls", "stride_plh"))
    def _decode_reduce_kernel(
        # per call
        out_ptr,
        stride_os, stride_oh, stride_od,
        # per layer
        window,
        # per batch plan
        seq_lens_ptr, qsl_ptr, part_o_ptr, part_lse_ptr,
        num_splits, fill_splits,
        stride_pos, stride_poh, stride_pok,
        stride_pls, stride_plh,
        # layer constexprs
        HEAD_SIZE: tl.constexpr, HEAD_PAD: tl.constexpr, BLOCK_N: tl.constexpr, MIN_TILES: tl.constexpr,
        LONG_TILES: tl.constexpr, USE_WINDOW: tl.constexpr,
        # plan constexprs
        SPLITS_PAD: tl.constexpr, VARLEN: tl.constexpr,
    ):  # fmt: skip
        seq, row, skip = _plan_row(qsl_ptr, VARLEN)
        if VARLEN:
            if skip:
                return
        head = tl.program_id(1)
        _seq_len, _start, _lo, _hi, num_active = _split_tile_range(
            seq_lens_ptr + seq, 0, num_splits, fill_splits, window, BLOCK_N, MIN_TILES, LONG_TILES, USE_WINDOW
        )
        if num_active <= 1:  # the split kernel wrote this sequence's output (one program saw it all)
            return
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
            out_ptr + row.to(tl.int64) * stride_os + head * stride_oh + offs_d * stride_od,
            res.to(out_ptr.dtype.element_ty),
            mask=d_mask,
        )

    decode_split_kernel = _decode_split_kernel
    decode_reduce_kernel = _decode_reduce_kernel
