"""Fill a BF16/FP16 paged workspace with each prefill's whole sequence: the cached context
dequantized from the 8-bit cache, the step's new tokens copied unquantized (prefill mode
``bf16``) or, in mode ``quantized``, dequantized from the cache as well.

Why: chunked prefills and prefix-cache hits attend to context that is already in the 8-bit cache.
FlashAttention-3 attends at ~600 TFLOP/s on an H200 but reads only 16-bit K/V with a 16-bit
query (its fp8 mode needs an fp8 query, which costs accuracy). Dequantizing the context once per
layer call (1 byte read, 2 written per element) and running FA3 once over [context; new] with its
causal mask keeps the query in bf16 and costs a small fraction of the attention itself, where our
own Triton context pass ran at ~250 TFLOP/s.

Layout: the workspace is ``[num_pages, block_size, num_kv_heads, head_size]`` (FA3's paged
layout); request ``i`` owns the consecutive pages ``offset[i] .. offset[i] + cdiv(seq_len_i,
block_size)``, so its token ``t`` sits at page ``offset[i] + t // block_size``. Token ``t <
context_len`` comes from the cache (``* scale``), token ``t >= context_len`` is row
``query_start_loc[i] + t - context_len`` of the step's K/V.

:func:`fill_context_ref` is the PyTorch reference (and the CPU path).
"""

from __future__ import annotations

import torch

from .decode_config import next_pow2
from .launch import unspecialized
from .paged_cache import PagedKVCache
from .prefill_attention import _interpreting
from .scales_layout import broadcast_scale, scale_granularity

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover
    triton = None
    tl = None
    HAVE_TRITON = False

__all__ = ["fill_context", "fill_context_ref", "workspace_offsets"]


def workspace_offsets(seq_lens: torch.Tensor, block_size: int) -> torch.Tensor:
    """First workspace page of each request: exclusive prefix sum of its page count (device op)."""
    pages = (seq_lens.to(torch.int32) + (block_size - 1)) // block_size
    return (torch.cumsum(pages, 0, dtype=torch.int32) - pages).to(torch.int32)


if HAVE_TRITON:

    @triton.jit
    def _load_scales(scale_ptr, offs_h, offs_d, hd_mask, NUM_KV_HEADS: tl.constexpr, HEAD_SIZE: tl.constexpr,
                     GRAN: tl.constexpr):  # fmt: skip
        """The scale of every [token, head, channel] element: per channel ``[1, H, D]``, per head
        ``[1, H, 1]``, per tensor a scalar (``GRAN``: :mod:`.scales_layout`'s 2, 1, 0)."""
        if GRAN == 2:
            return tl.load(scale_ptr + offs_h[:, None] * HEAD_SIZE + offs_d[None, :], mask=hd_mask, other=0.0)[None, :, :]
        elif GRAN == 1:
            return tl.load(scale_ptr + offs_h, mask=offs_h < NUM_KV_HEADS, other=0.0)[None, :, None]
        else:
            return tl.load(scale_ptr)

    # The block table and lengths are sliced past the batch's decodes; the row length is the engine's.
    @triton.jit(**unspecialized("stride_bt", "bt_ptr", "seq_lens_ptr"))
    def _fill_context_kernel(
        key_ptr, value_ptr, kc_ptr, vc_ptr, k_scale_ptr, v_scale_ptr, ws_k_ptr, ws_v_ptr,
        bt_ptr, qsl_ptr, seq_lens_ptr, offset_ptr,
        stride_nt, stride_nh, stride_vt, stride_vh,
        stride_kb, stride_kt, stride_kh, stride_cvb, stride_cvt, stride_cvh,
        stride_bt,
        NUM_KV_HEADS: tl.constexpr, HKV_PAD: tl.constexpr, HEAD_SIZE: tl.constexpr, HEAD_PAD: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, K_GRAN: tl.constexpr, V_GRAN: tl.constexpr, FROM_CACHE_ONLY: tl.constexpr,
    ):  # fmt: skip
        req = tl.program_id(0)
        page = tl.program_id(1)
        seq_len = tl.load(seq_lens_ptr + req)
        if page * BLOCK_SIZE >= seq_len:
            return
        q_start = tl.load(qsl_ptr + req)
        if FROM_CACHE_ONLY:  # prefill mode quantized: the new tokens too, as the cache holds them
            ctx_len = seq_len
        else:
            ctx_len = seq_len - (tl.load(qsl_ptr + req + 1) - q_start)
        src = tl.load(bt_ptr + req.to(tl.int64) * stride_bt + page).to(tl.int64)
        dst = (tl.load(offset_ptr + req) + page).to(tl.int64)

        offs_t = tl.arange(0, BLOCK_SIZE)
        offs_h = tl.arange(0, HKV_PAD)
        offs_d = tl.arange(0, HEAD_PAD)
        pos = page * BLOCK_SIZE + offs_t
        hd_mask = (offs_h[:, None] < NUM_KV_HEADS) & (offs_d[None, :] < HEAD_SIZE)  # [H, D]
        in_ctx = (pos < ctx_len)[:, None, None] & hd_mask[None, :, :]  # [T, H, D]
        is_new = ((pos >= ctx_len) & (pos < seq_len))[:, None, None] & hd_mask[None, :, :]
        t3 = offs_t[:, None, None]
        h3 = offs_h[None, :, None]
        d3 = offs_d[None, None, :]
        row = (q_start + pos - ctx_len).to(tl.int64)[:, None, None]
        k_scale = _load_scales(k_scale_ptr, offs_h, offs_d, hd_mask, NUM_KV_HEADS, HEAD_SIZE, K_GRAN)
        v_scale = _load_scales(v_scale_ptr, offs_h, offs_d, hd_mask, NUM_KV_HEADS, HEAD_SIZE, V_GRAN)
        out_ty = ws_k_ptr.dtype.element_ty
        ws_off = dst * (BLOCK_SIZE * NUM_KV_HEADS * HEAD_SIZE) + t3 * (NUM_KV_HEADS * HEAD_SIZE) + h3 * HEAD_SIZE + d3

        k_ctx = tl.load(kc_ptr + src * stride_kb + t3 * stride_kt + h3 * stride_kh + d3, mask=in_ctx, other=0.0)
        k_new = tl.load(key_ptr + row * stride_nt + h3 * stride_nh + d3, mask=is_new, other=0.0)
        k = tl.where(in_ctx, k_ctx.to(tl.float32) * k_scale, k_new.to(tl.float32))
        tl.store(ws_k_ptr + ws_off, k.to(out_ty), mask=in_ctx | is_new)

        v_ctx = tl.load(vc_ptr + src * stride_cvb + t3 * stride_cvt + h3 * stride_cvh + d3, mask=in_ctx, other=0.0)
        v_new = tl.load(value_ptr + row * stride_vt + h3 * stride_vh + d3, mask=is_new, other=0.0)
        v = tl.where(in_ctx, v_ctx.to(tl.float32) * v_scale, v_new.to(tl.float32))
        tl.store(ws_v_ptr + ws_off, v.to(out_ty), mask=in_ctx | is_new)


def fill_context(
    key: torch.Tensor,
    value: torch.Tensor,
    cache: PagedKVCache,
    ws_key: torch.Tensor,
    ws_value: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    offsets: torch.Tensor,
    num_reqs: int,
    max_pages: int,
    from_cache_only: bool = False,
) -> None:
    """Write requests ``0 .. num_reqs`` into the workspace (see the module docstring).

    ``key``/``value`` ``[num_tokens, num_kv_heads, head_size]`` (rows as ``query_start_loc``
    counts them; last dim contiguous); ``cache`` the 8-bit cache (K/V views ``[num_blocks,
    block_size, num_kv_heads, head_size]``, last dim contiguous) and its scales;
    ``ws_key``/``ws_value`` contiguous ``[num_pages, block_size, num_kv_heads, head_size]``;
    ``offsets`` from :func:`workspace_offsets`; ``max_pages`` an upper bound on any request's
    pages (the launch grid; a request's extra programs exit at once). ``from_cache_only``
    (prefill mode ``quantized``): every token, new ones included, dequantized from the cache
    (which already holds this step's K/V); ``key``/``value`` are not read.
    """
    if num_reqs == 0 or max_pages == 0:
        return
    if not HAVE_TRITON or (key.device.type == "cpu" and not _interpreting()):
        fill_context_ref(key, value, cache, ws_key, ws_value, block_table, query_start_loc, seq_lens, offsets, num_reqs,
                         from_cache_only)  # fmt: skip
        return
    _, block_size, hkv, d = ws_key.shape
    key_cache, value_cache, k_scale, v_scale = cache.key_cache, cache.value_cache, cache.k_scale, cache.v_scale
    _fill_context_kernel[(num_reqs, max_pages)](
        key, value, key_cache, value_cache, k_scale, v_scale, ws_key, ws_value,
        block_table, query_start_loc, seq_lens, offsets,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        block_table.stride(0),
        NUM_KV_HEADS=hkv, HKV_PAD=next_pow2(hkv), HEAD_SIZE=d, HEAD_PAD=max(16, next_pow2(d)),
        BLOCK_SIZE=block_size, K_GRAN=scale_granularity(k_scale, hkv, d, "k_scale"),
        V_GRAN=scale_granularity(v_scale, hkv, d, "v_scale"),
        FROM_CACHE_ONLY=from_cache_only, num_warps=4,
    )  # fmt: skip


def fill_context_ref(
    key, value, cache: PagedKVCache, ws_key, ws_value, block_table, query_start_loc, seq_lens, offsets, num_reqs,
    from_cache_only=False,
) -> None:  # fmt: skip
    """PyTorch reference of :func:`fill_context` (host loop over requests)."""
    key_cache, value_cache, k_scale, v_scale = cache.key_cache, cache.value_cache, cache.k_scale, cache.v_scale
    block_size, hkv = ws_key.shape[1], ws_key.shape[2]
    qsl = query_start_loc[: num_reqs + 1].tolist()
    lens = seq_lens[:num_reqs].tolist()
    offs = offsets[:num_reqs].tolist()
    ks = broadcast_scale(k_scale, hkv, ws_key.shape[3])
    vs = broadcast_scale(v_scale, hkv, ws_key.shape[3])
    for i in range(num_reqs):
        n, new = lens[i], qsl[i + 1] - qsl[i]
        ctx = n - new
        pages = -(-n // block_size)
        if pages == 0:
            continue
        src = block_table[i, :pages].long()
        k_all = (key_cache[src].float() * ks).reshape(pages * block_size, hkv, -1)[:n]
        v_all = (value_cache[src].float() * vs).reshape(pages * block_size, hkv, -1)[:n]
        if not from_cache_only:
            k_all[ctx:] = key[qsl[i] : qsl[i + 1]].float()
            v_all[ctx:] = value[qsl[i] : qsl[i + 1]].float()
        wk = ws_key[offs[i] : offs[i] + pages].view(pages * block_size, hkv, -1)
        wv = ws_value[offs[i] : offs[i] + pages].view(pages * block_size, hkv, -1)
        wk[:n] = k_all.to(ws_key.dtype)
        wv[:n] = v_all.to(ws_value.dtype)
