"""Triton prefill attention over an 8-bit paged KV cache (FP8 e4m3 or INT8, static scales).

One kernel, three modes (a constexpr), each exactly the semantics of
:func:`.reference.paged_prefill_attention_ref` (``mode`` ``bf16`` or ``quantized``):

- ``FULL`` (prefill mode ``bf16``, all in Triton): new tokens attend causally to their own
  step's K/V, read straight from the fp16/bf16 ``key``/``value`` tensors, and to any context
  already in the quantized cache (chunked prefill, prefix-cache hits), dequantized in registers.
- ``MERGE`` (prefill mode ``bf16`` with FlashAttention for the fresh part): ``out`` already
  holds the fresh tokens' causal self-attention and ``lse`` its log-sum-exp (what FA3's varlen
  kernel returns); the kernel attends to the cached context only and merges both by
  log-sum-exp in its epilogue, in place. Tiles that see no context exit at once, leaving the
  fresh output as it is.
- ``QUANTIZED`` (prefill mode ``quantized``): everything is read from the cache (the step's
  K/V were written there before attention), causally over cache positions ``[0, q_pos]``,
  so a prompt's attention is the same whether its start came from the prefix cache or not.

Design (flash-attention style, fp32 accumulation, online softmax in base 2):

- Grid ``(query tiles, num_kv_heads)``. A tile is ``BLOCK_M`` query tokens of one sequence
  times every query head of the KV head's group, flattened into ``BLOCK_M * GROUP_PAD`` rows,
  so each K/V tile is loaded once for the whole GQA group.
- Program -> (sequence, tile) needs no host-side index and no device sync: sequence ``i``
  owns tile ids ``[qsl[i] // BLOCK_M + i, qsl[i + 1] // BLOCK_M + i + 1)`` (never overlapping),
  each program binary-searches ``query_start_loc`` for its sequence, and the grid size
  ``num_tokens // BLOCK_M + num_seqs`` bounds every tile id. Spare programs exit at once, so
  the grid may come from upper bounds (CUDA graphs). ``ALL_ROWS`` also skips requests with one
  new token (the decode kernel's) and empty (padding) requests.
- The cache loop gathers each key's page through the block table, so any block size works.
  The 8-bit values convert exactly to fp16/bf16 and go through the tensor cores unscaled:
  ``k_scale`` is folded into the logits' multiplier and ``v_scale`` is applied to the
  accumulator once, after the loop, while it holds only the cache's P.V (the online-softmax
  rescales are linear, so this is exact). Per-channel scales (``[num_kv_heads, head_size]``):
  K's fold into the query of the cache loop (``(q * s_k / max s_k) . k_stored``, one extra
  rounding of that query), V's multiply the accumulator per channel; the loop is unchanged.
- ``FULL`` then walks the step's own K/V up to the causal diagonal; tiles wholly below the
  diagonal skip the causal mask.
- Sliding window (``k_pos > q_pos - window``) starts each loop at the first tile a row can
  see; the logits soft cap is ``cap * tanh(logits / cap)`` before masking, as in the reference.

On CPU tensors the Triton kernel runs only under ``TRITON_INTERPRET=1`` (how CI tests it);
otherwise the PyTorch reference serves (vLLM's CPU build).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .dtypes import SUPPORTED_ACT_DTYPES, SUPPORTED_HEAD_SIZES, KVQuantDType, as_storage
from .launch import FastKernel
from .prefill_kernel import MODE_FULL, MODE_MERGE, MODE_QUANTIZED, prefill_attention_kernel
from .reference import PREFILL_MODES, paged_prefill_attention_ref
from .scales_layout import flat_scale, scale_granularity

__all__ = [
    "MODE_FULL", "MODE_MERGE", "MODE_QUANTIZED", "PrefillKernelConfig", "launch_prefill", "make_launcher",
    "paged_prefill_attention",
]

_LOG2E = 1.4426950408889634


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def _deep_pipeline_on(device_index: int) -> bool:
    # Three K/V stages fit the shared memory of Hopper / datacenter Blackwell; two elsewhere.
    return torch.cuda.get_device_capability(device_index)[0] in (9, 10)


@dataclass(frozen=True)
class PrefillKernelConfig:
    """Everything about a launch that is fixed per layer (and per query-length bucket).

    Build it once (:meth:`make`) and hand it to :func:`launch_prefill` on every call: the launch
    then does no validation, no allocation and no host sync.
    """

    num_heads: int
    num_kv_heads: int
    head_size: int
    group_pad: int
    head_pad: int
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    new_mult: float
    ctx_mult: float
    soft_cap: float
    window: int
    interpret: bool

    @classmethod
    def make(
        cls, *, num_heads: int, num_kv_heads: int, head_size: int, softmax_scale: float,
        sliding_window: int | None, logits_soft_cap: float | None, max_query_len: int | None,
        device: torch.device, interpret: bool | None = None,
    ) -> "PrefillKernelConfig":
        """Tile sizes from a sweep on an H100 (triton 3.6) over chunked-prefill (1k new on 2k
        cached) and pure-prefill (4x4k) shapes, head sizes 64..256. Rows per tile =
        ``BLOCK_M * GROUP_PAD``. ``max_query_len`` (None = unknown, as under CUDA graphs) only
        shrinks the token tile for short prompts."""
        interpret = _interpreting() if interpret is None else interpret
        group_pad = triton.next_power_of_2(num_heads // num_kv_heads)
        head_pad = triton.next_power_of_2(head_size)
        if interpret or device.type != "cuda":
            rows, block_n, warps, stages = 32, 16, 4, 1
        else:
            stages = 3 if _deep_pipeline_on(device.index if device.index is not None else torch.cuda.current_device()) else 2
            if head_pad <= 64:
                rows, block_n, warps = 128, 64, 8
            elif head_pad <= 128:
                rows, block_n, warps = 128, 128, 8
            else:
                rows, block_n, warps, stages = 128, 64, 8, 2
        rows = max(rows, group_pad)
        block_m = max(rows // group_pad, 1)
        if max_query_len is not None:  # short prompts: smaller token tile (>= 16 rows for tl.dot)
            block_m = max(min(block_m, triton.next_power_of_2(max(max_query_len, 1))), max(16 // group_pad, 1))
        cap = float(logits_soft_cap) if logits_soft_cap else 0.0
        # Logits go through cap * tanh(x / cap) with a soft cap: the multiplier then yields x / cap.
        new_mult = softmax_scale / cap if cap else softmax_scale * _LOG2E
        return cls(
            num_heads=num_heads, num_kv_heads=num_kv_heads, head_size=head_size, group_pad=group_pad,
            head_pad=head_pad, block_m=block_m,
            block_n=block_n, num_warps=warps, num_stages=stages, new_mult=new_mult, ctx_mult=new_mult,
            soft_cap=cap, window=int(sliding_window) if sliding_window else 0, interpret=interpret,
        )


_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def make_launcher(device: torch.device) -> FastKernel:
    """A per-layer launcher: compiled variants are then launched without Triton's dispatch."""
    return FastKernel(prefill_attention_kernel, device)


def launch_prefill(
    cfg: PrefillKernelConfig,
    mode: int,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    out: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    lens: torch.Tensor,
    k_scale: torch.Tensor,
    v_scale: torch.Tensor,
    kv_int8: bool,
    num_tokens: int,
    num_seqs: int,
    *,
    lens_are_seq: bool,
    all_rows: bool = False,
    lse: torch.Tensor | None = None,
    launcher: FastKernel | None = None,
) -> None:
    """The bare launch (no checks): callers validate once, see :func:`paged_prefill_attention`.

    ``lens`` is ``seq_lens`` (context + new tokens, ``lens_are_seq``) or ``context_lens``;
    ``num_tokens`` bounds ``query_start_loc[-1]`` and ``num_seqs`` is its length - 1.
    ``mode`` MODE_MERGE needs ``lse`` ``[num_heads, >= num_tokens]`` fp32 (any strides) and the
    fresh output in ``out``. In MODE_QUANTIZED ``key``/``value`` are not read. ``launcher``
    (:func:`make_launcher`) skips Triton's per-call dispatch once a variant is compiled.
    """
    grid = (num_tokens // cfg.block_m + num_seqs, cfg.num_kv_heads, 1)
    if lse is None:
        lse, lse_strides = k_scale, (0, 0)  # placeholder, never read outside MODE_MERGE
    else:
        lse_strides = lse.stride()
    tensors = (query, key, value, key_cache, value_cache, out, lse, block_table, query_start_loc, lens, k_scale, v_scale)
    scalars = (
        cfg.new_mult, cfg.ctx_mult, cfg.soft_cap, cfg.window, num_seqs,
        *query.stride(), *key.stride(), *value.stride(), *key_cache.stride(), *value_cache.stride(),
        *out.stride(), *lse_strides, block_table.stride(0),
    )  # fmt: skip
    const = (
        cfg.num_heads // cfg.num_kv_heads, cfg.group_pad, cfg.block_m, cfg.block_n, cfg.head_size, cfg.head_pad,
        key_cache.shape[1], scale_granularity(k_scale, cfg.num_kv_heads, cfg.head_size),
        scale_granularity(v_scale, cfg.num_kv_heads, cfg.head_size), kv_int8, cfg.soft_cap != 0.0,
        cfg.window != 0, _TL_DTYPE[query.dtype], cfg.interpret, mode, all_rows, lens_are_seq,
    )  # fmt: skip
    options = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if launcher is None:
        prefill_attention_kernel[grid](*tensors, *scalars, *const, **options)
        return
    ptrs = tuple(t.data_ptr() for t in tensors)
    # Everything Triton specializes on: dtypes, 16-byte alignment, exact integers, constexprs.
    spec = (tuple(t.dtype for t in tensors), tuple(p & 15 for p in ptrs), scalars[3:], const, cfg.num_warps, cfg.num_stages)
    launcher.launch(spec, grid, lambda direct: (*(ptrs if direct else tensors), *scalars, *const), **options)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(f"paged_prefill_attention: {msg}")


def _scale_arg(scale: torch.Tensor, name: str, num_kv_heads: int, head_size: int, device: torch.device) -> torch.Tensor:
    try:
        return flat_scale(scale, name, num_kv_heads, head_size, device)[0]
    except ValueError as e:
        raise ValueError(f"paged_prefill_attention: {e}") from None


def _validate(query, key, value, key_cache, value_cache, block_table, query_start_loc, context_lens,
              k_scale, v_scale, out, sliding_window, logits_soft_cap, mode):  # fmt: skip
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
    _check(key_cache.shape[1] > 0, "block size must be positive")
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
    k_scale = _scale_arg(k_scale, "k_scale", num_kv_heads, head_size, device)
    v_scale = _scale_arg(v_scale, "v_scale", num_kv_heads, head_size, device)
    if sliding_window is not None:
        _check(sliding_window >= 0, f"sliding_window must be >= 0 (0 or None = off), got {sliding_window}")
    if logits_soft_cap is not None:
        _check(logits_soft_cap >= 0, f"logits_soft_cap must be >= 0 (0 or None = off), got {logits_soft_cap}")
    _check(mode in PREFILL_MODES, f"mode {mode!r} is not one of {list(PREFILL_MODES)}")
    if out is not None:
        _check(out.shape == query.shape and out.dtype == query.dtype and out.device == device,
               f"out must be {tuple(query.shape)} {query.dtype} on {device}, got "
               f"{tuple(out.shape)} {out.dtype} on {out.device}")
    return k_scale, v_scale


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
    mode: str = "bf16",
) -> torch.Tensor:
    """Causal prefill attention over (dequantized cached context) + (the step's own tokens).

    The safe entry point for direct callers (validates everything on each call); the vLLM
    backend goes through ``vllm_kvquant.prefill.PrefillRunner`` instead.

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
        mode: ``"bf16"`` (new tokens' own K/V unquantized) or ``"quantized"`` (everything read
            from the cache, which must already hold this step's K/V; ``key``/``value`` unused).
    """
    kv_dtype = KVQuantDType(kv_dtype)
    k_scale, v_scale = _validate(query, key, value, key_cache, value_cache, block_table, query_start_loc,
                                 context_lens, k_scale, v_scale, out, sliding_window, logits_soft_cap, mode)
    if out is None:
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    num_tokens, num_heads, head_size = query.shape
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(head_size)
    num_seqs = query_start_loc.numel() - 1
    if num_seqs == 0 or num_tokens == 0:
        return out

    if query.device.type == "cpu" and not _interpreting():
        ref = paged_prefill_attention_ref(
            query, key, value, as_storage(key_cache, kv_dtype), as_storage(value_cache, kv_dtype), block_table,
            query_start_loc, context_lens, k_scale, v_scale, kv_dtype, softmax_scale, sliding_window,
            logits_soft_cap, mode=mode,
        )
        # Only rows that belong to a sequence are written, as on the GPU path.
        qsl = query_start_loc.tolist()
        for i in range(num_seqs):
            out[qsl[i] : qsl[i + 1]] = ref[qsl[i] : qsl[i + 1]]
        return out

    cfg = PrefillKernelConfig.make(
        num_heads=num_heads, num_kv_heads=key.shape[1], head_size=head_size, softmax_scale=softmax_scale,
        sliding_window=sliding_window, logits_soft_cap=logits_soft_cap,
        max_query_len=num_tokens if max_query_len is None else min(max_query_len, num_tokens), device=query.device,
    )
    launch_prefill(
        cfg, MODE_QUANTIZED if mode == "quantized" else MODE_FULL, query, key, value, key_cache, value_cache, out,
        block_table, query_start_loc, context_lens, k_scale, v_scale, kv_dtype is KVQuantDType.INT8,
        num_tokens, num_seqs, lens_are_seq=False,
    )
    return out
