"""Plain-PyTorch references for every kernel in this package.

They are slow and simple on purpose: the Triton kernels are tested against them, and the
vLLM backend falls back to them where Triton cannot run. Attention is computed in fp32
after dequantizing the whole context.

Conventions shared with the kernels:
- A cache is ``[num_blocks, block_size, num_kv_heads, head_size]`` (any strides), holding
  ``torch.float8_e4m3fn`` for ``fp8_e4m3`` or ``torch.int8`` for ``int8``.
- A scale is an fp32 tensor of ``1`` (per tensor), ``num_kv_heads`` (per head) or
  ``num_kv_heads * head_size`` values (per head and channel, ``[num_kv_heads, head_size]``);
  ``real = quantized * scale`` (:mod:`.scales_layout`).
- ``slot_mapping[t] = block * block_size + offset``; negative slots are padding and skipped.
"""

from __future__ import annotations

import math

import torch

from .dtypes import KVQuantDType, qmax_of, torch_dtype_of
from .scales_layout import broadcast_scale


def quantize_ref(x: torch.Tensor, scale: torch.Tensor, kv_dtype: KVQuantDType | str) -> torch.Tensor:
    """Quantize ``x[..., num_kv_heads, head_size]`` with saturation (never NaN/Inf)."""
    kv_dtype = KVQuantDType(kv_dtype)
    s = broadcast_scale(scale, x.shape[-2], x.shape[-1]).to(x.device)
    qmax = qmax_of(kv_dtype)
    y = (x.to(torch.float32) / s).clamp(-qmax, qmax)
    if kv_dtype is KVQuantDType.INT8:
        return torch.round(y).to(torch.int8)
    return y.to(torch.float8_e4m3fn)


def dequantize_ref(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize_ref`, in fp32."""
    s = broadcast_scale(scale, q.shape[-2], q.shape[-1]).to(q.device)
    return q.to(torch.float32) * s


def quantize_to_cache_ref(
    key: torch.Tensor, value: torch.Tensor,  # [tokens, kv_heads, head_size]
    key_cache: torch.Tensor, value_cache: torch.Tensor,  # [blocks, block_size, kv_heads, head_size]
    slot_mapping: torch.Tensor,  # [tokens]: negative = skip
    k_scale: torch.Tensor, v_scale: torch.Tensor, kv_dtype: KVQuantDType | str,
) -> None:  # fmt: skip
    """Write the step's K/V (``[tokens, kv_heads, head_size]``) into the paged caches."""
    kv_dtype = KVQuantDType(kv_dtype)
    block_size = key_cache.shape[1]
    n = slot_mapping.shape[0]
    slots = slot_mapping.to(torch.int64)
    valid = slots >= 0
    slots = slots[valid]
    blocks, offsets = slots // block_size, slots % block_size
    qk = quantize_ref(key[:n][valid], k_scale, kv_dtype)
    qv = quantize_ref(value[:n][valid], v_scale, kv_dtype)
    key_cache[blocks, offsets] = qk.to(key_cache.dtype) if key_cache.dtype == qk.dtype else qk.view(key_cache.dtype)
    value_cache[blocks, offsets] = qv.to(value_cache.dtype) if value_cache.dtype == qv.dtype else qv.view(value_cache.dtype)


def gather_context_ref(
    cache: torch.Tensor, block_table_row: torch.Tensor, length: int, scale: torch.Tensor, kv_dtype: KVQuantDType | str
) -> torch.Tensor:
    """Dequantized ``[length, kv_heads, head_size]`` context of one sequence."""
    kv_dtype = KVQuantDType(kv_dtype)
    block_size = cache.shape[1]
    if length == 0:
        return torch.empty(0, cache.shape[2], cache.shape[3], dtype=torch.float32, device=cache.device)
    nblocks = (length + block_size - 1) // block_size
    blocks = block_table_row[:nblocks].to(torch.int64)
    q = cache[blocks].reshape(-1, cache.shape[2], cache.shape[3])[:length]
    q = q.view(torch_dtype_of(kv_dtype)) if q.dtype != torch_dtype_of(kv_dtype) else q
    return dequantize_ref(q, scale)


def _attend(
    q: torch.Tensor,  # [n_q, Hq, D] fp32
    k: torch.Tensor,  # [n_k, Hkv, D] fp32
    v: torch.Tensor,
    q_positions: torch.Tensor,  # [n_q] absolute positions
    softmax_scale: float,
    sliding_window: int | None,
    logits_soft_cap: float | None,
    return_lse: bool = False,
):
    """Causal (optionally windowed / soft-capped) GQA attention; with ``return_lse`` also the
    natural-log log-sum-exp of each row's (capped) logits, ``[Hq, n_q]``."""
    hq, hkv = q.shape[1], k.shape[1]
    group = hq // hkv
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    logits = torch.einsum("qhd,khd->hqk", q, k) * softmax_scale
    if logits_soft_cap:
        logits = logits_soft_cap * torch.tanh(logits / logits_soft_cap)
    k_pos = torch.arange(k.shape[0], device=q.device)
    mask = k_pos[None, :] > q_positions[:, None]
    if sliding_window:
        mask |= k_pos[None, :] <= q_positions[:, None] - sliding_window
    logits = logits.masked_fill(mask[None], float("-inf"))
    # Tokens no query attends to (before every window) contribute nothing, whatever they hold: the
    # cache may keep anything there (NaN bytes too), and 0 * NaN would not be 0.
    v = v.masked_fill(mask.all(0)[:, None, None], 0.0)
    probs = torch.softmax(logits, dim=-1)
    out = torch.einsum("hqk,khd->qhd", probs, v)
    if return_lse:
        return out, torch.logsumexp(logits, dim=-1)
    return out


def paged_decode_attention_ref(
    query: torch.Tensor,  # [num_seqs, Hq, D]
    key_cache: torch.Tensor, value_cache: torch.Tensor,
    block_table: torch.Tensor,  # [num_seqs, max_blocks] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32, includes the token being decoded
    k_scale: torch.Tensor, v_scale: torch.Tensor, kv_dtype: KVQuantDType | str,
    softmax_scale: float | None = None, sliding_window: int | None = None, logits_soft_cap: float | None = None,
) -> torch.Tensor:  # fmt: skip
    """One query token per sequence attending to its whole (quantized) cached context: the
    ``quantized`` prefill of one new token per sequence, whose K/V the cache already holds."""
    num_seqs = query.shape[0]
    return paged_prefill_attention_ref(
        query, None, None, key_cache, value_cache, block_table,
        torch.arange(num_seqs + 1, device=query.device), seq_lens[:num_seqs] - 1,
        k_scale, v_scale, kv_dtype, softmax_scale, sliding_window, logits_soft_cap, mode="quantized",
    )  # fmt: skip


#: Prefill modes: ``bf16`` attends to the step's own K/V unquantized (and to cached context
#: dequantized); ``quantized`` reads everything, the step's own tokens included, from the cache.
PREFILL_MODES: tuple[str, ...] = ("bf16", "quantized")


def paged_prefill_attention_ref(
    query: torch.Tensor,  # [num_tokens, Hq, D]
    key: torch.Tensor | None,  # [num_tokens, Hkv, D] this step's K, unquantized (mode="bf16" only)
    value: torch.Tensor | None,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,  # [num_seqs, max_blocks]
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    context_lens: torch.Tensor,  # [num_seqs] int32: tokens already in the cache before this step
    k_scale: torch.Tensor,
    v_scale: torch.Tensor,
    kv_dtype: KVQuantDType | str,
    softmax_scale: float | None = None,
    sliding_window: int | None = None,
    logits_soft_cap: float | None = None,
    mode: str = "bf16",
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens (new token ``j`` at position ``ctx + j``).

    ``mode="bf16"``: to (dequantized cached context) + (their own fp16/bf16 K/V).
    ``mode="quantized"``: to cache positions ``[0, ctx + j]`` only, dequantized; the cache must
    already hold this step's K/V (vLLM writes them before attention), ``key``/``value`` are unused.
    Rows of sequences with no new tokens, and rows after the last sequence, are left unset.
    """
    if mode not in PREFILL_MODES:
        raise ValueError(f"prefill mode {mode!r} is not one of {list(PREFILL_MODES)}")
    softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(query.shape[-1])
    out = torch.empty_like(query)
    for i in range(context_lens.shape[0]):
        s, e = int(query_start_loc[i]), int(query_start_loc[i + 1])
        if e == s:
            continue
        ctx = int(context_lens[i])
        n_cached = ctx + (e - s) if mode == "quantized" else ctx
        k = gather_context_ref(key_cache, block_table[i], n_cached, k_scale, kv_dtype)
        v = gather_context_ref(value_cache, block_table[i], n_cached, v_scale, kv_dtype)
        if mode == "bf16":
            k = torch.cat([k, key[s:e].float()])
            v = torch.cat([v, value[s:e].float()])
        pos = torch.arange(ctx, ctx + e - s, device=query.device)
        out[s:e] = _attend(query[s:e].float(), k, v, pos, softmax_scale, sliding_window, logits_soft_cap).to(query.dtype)
    return out


def prefill_fresh_attention_ref(
    query: torch.Tensor,  # [num_tokens, Hq, D]
    key: torch.Tensor,  # [num_tokens, Hkv, D]
    value: torch.Tensor,
    query_start_loc: torch.Tensor,  # [num_seqs + 1]
    softmax_scale: float | None = None,
    sliding_window: int | None = None,
    logits_soft_cap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What FlashAttention's varlen kernel returns for ``cu_seqlens_q = cu_seqlens_k =
    query_start_loc``, ``causal=True``, ``window_size=(sliding_window - 1, 0)``, ``softcap``
    and ``return_softmax_lse=True``: each sequence's new tokens attending causally to each
    other only, in ``query``'s dtype, and the natural-log LSE ``[num_heads, num_tokens]`` fp32
    (rows outside every sequence: output 0, LSE -inf)."""
    softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(query.shape[-1])
    out = torch.zeros_like(query)
    lse = torch.full((query.shape[1], query.shape[0]), float("-inf"), dtype=torch.float32, device=query.device)
    for i in range(query_start_loc.shape[0] - 1):
        s, e = int(query_start_loc[i]), int(query_start_loc[i + 1])
        if e == s:
            continue
        pos = torch.arange(e - s, device=query.device)
        o, l = _attend(query[s:e].float(), key[s:e].float(), value[s:e].float(), pos, softmax_scale,
                       sliding_window, logits_soft_cap, return_lse=True)  # fmt: skip
        out[s:e] = o.to(query.dtype)
        lse[:, s:e] = l
    return out, lse
