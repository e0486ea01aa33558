"""Paged decode attention over the 8-bit (FP8 e4m3 / INT8) KV cache, in Triton.

One query token per sequence (at position ``seq_len - 1``) attends to ``seq_lens[i]`` cached
tokens; :func:`paged_decode_attention` has exactly the semantics of
:func:`.reference.paged_decode_attention_ref`.

Design (memory bound: the point of an 8-bit cache is half the bytes per decode step)
- One program = (sequence, KV head, split).  It holds *all* query heads of its KV head
  (``GROUP = Hq / Hkv`` rows, padded to >= 16 for ``tl.dot``), so every K/V byte is read once.
- Each loop iteration gathers a tile of ``block_n`` tokens (several pages: head 128 -> 128
  tokens = 8 pages of 16) through the block table, loads the 1-byte K and V tiles (cp.async,
  double-buffered at the default ``num_stages``), converts them to fp16 (exact for e4m3 and
  int8; a bf16 query is divided by a power of two that keeps it in fp16's range, see
  :class:`DecodeKernelConfig` ``dot_in_fp16`` / ``asm_dequant_*``), and runs an
  online softmax in fp32 with ``exp2``.  ``softmax_scale * k_scale * log2(e)`` multiplies the
  fp32 score tile (one scalar per program: per-head scales are per KV head; scaling the
  [group x tile] scores instead of pre-scaling Q costs nothing and avoids rounding Q twice);
  ``v_scale`` multiplies the output once at the end.  Per-channel scales (``[num_kv_heads,
  head_size]``) cost the same: each program loads its KV head's two ``[head_size]`` vectors once,
  folds K's into the query before the loop (``(q * s_k / max s_k) . k_stored``, ``max s_k`` into
  the scalar) and multiplies the output by V's (``(sum p v_stored) * s_v``); the loop is unchanged.
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
- Modules: :mod:`.decode_config` (knobs, split count, workspace size), :mod:`.decode_triton`
  (the Triton kernels), :mod:`.decode_plan` (the lean per-batch plan / per-layer launcher the
  backend uses, including the varlen mode for full CUDA graphs over mixed batches), and this
  module's :func:`paged_decode_attention`, which validates every argument (for direct callers).

Tuning knobs: :class:`DecodeKernelConfig` (tile bytes/tokens, warps, pipeline stages, split
heuristic, dot dtype); pass ``config=``, replace :data:`DEFAULT_CONFIG`, or set
``KVQUANT_DECODE_CONFIG="num_stages=3,block_n=64"`` before import.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar, cast

import torch

from . import decode_config as _cfg
from .decode_config import MAX_HEAD_SIZE, MAX_NUM_SPLITS, DecodeKernelConfig, _config_from_env  # noqa: F401
from .decode_plan import DecodeLayer, DecodePlan, uses_reference
from .dtypes import SUPPORTED_ACT_DTYPES, KVQuantDType, as_storage, check_paged_caches, parse_kv_dtype
from .paged_cache import PagedKVCache
from .reference import paged_decode_attention_ref
from .scales_layout import flat_scale

__all__ = [
    "MAX_NUM_SPLITS",
    "DecodeKernelConfig",
    "DEFAULT_CONFIG",
    "DecodeLayer",
    "DecodePlan",
    "paged_decode_attention",
    "choose_num_splits",
    "decode_workspace_shape",
    "alloc_decode_workspace",
]

#: Config used when a call passes none; replace it (module attribute) to tune.
DEFAULT_CONFIG: DecodeKernelConfig = _cfg.DEFAULT_CONFIG

F = TypeVar("F", bound=Callable[..., Any])


def _tunable(fn: F) -> F:
    """``fn`` of :mod:`.decode_config` with ``config=None`` meaning this module's
    :data:`DEFAULT_CONFIG` as it is at call time, so that replacing it tunes every call."""

    @functools.wraps(fn)
    def call(*args: Any, config: DecodeKernelConfig | None = None, **kwargs: Any) -> Any:
        return fn(*args, config=config or DEFAULT_CONFIG, **kwargs)

    return cast(F, call)


choose_num_splits = _tunable(_cfg.choose_num_splits)
decode_workspace_shape = _tunable(_cfg.decode_workspace_shape)
alloc_decode_workspace = _tunable(_cfg.alloc_decode_workspace)


def _validate(query, key_cache, value_cache, block_table, seq_lens, k_scale, v_scale, out, max_num_splits):
    if query.dim() != 3:
        raise ValueError(f"query must be [num_seqs, num_q_heads, head_size], got shape {tuple(query.shape)}")
    if query.dtype not in SUPPORTED_ACT_DTYPES:
        raise ValueError(f"query dtype {query.dtype} unsupported; expected one of {SUPPORTED_ACT_DTYPES}")
    num_seqs, num_q_heads, head_size = query.shape
    if not (16 <= head_size <= MAX_HEAD_SIZE) or head_size % 8 != 0:
        raise ValueError(f"head size {head_size} unsupported; need a multiple of 8 in [16, {MAX_HEAD_SIZE}]")
    for name, cache in (("key_cache", key_cache), ("value_cache", value_cache)):
        if cache.dim() == 4 and cache.shape[3] != head_size:
            raise ValueError(f"{name} head size {cache.shape[3]} != query head size {head_size}")
    _, num_kv_heads, _ = check_paged_caches(key_cache, value_cache)
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
    for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
        flat_scale(scale, name, num_kv_heads, head_size)
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

    Every argument is validated on every call; the backend uses :class:`DecodePlan` and
    :class:`DecodeLayer` instead, which validate once.
    """
    kv_dtype = parse_kv_dtype(kv_dtype)
    num_seqs, num_q_heads, head_size, num_kv_heads = _validate(
        query, key_cache, value_cache, block_table, seq_lens, k_scale, v_scale, out, max_num_splits
    )
    if sliding_window is not None and not isinstance(sliding_window, int):
        raise ValueError(f"sliding_window must be an int (tokens) or None, got {sliding_window!r}")
    window = sliding_window if sliding_window and sliding_window > 0 else 0  # <= 0: no window
    cap = abs(float(logits_soft_cap)) if logits_soft_cap else 0.0  # cap*tanh(x/cap) is even in cap

    if uses_reference(query.device):
        ref =  paged_decode_attention_ref(
            query, as_storage(key_cache, kv_dtype), as_storage(value_cache, kv_dtype), block_table[:num_seqs],
            seq_lens[:num_seqs], k_scale, v_scale, kv_dtype, softmax_scale,
            sliding_window=window or None, logits_soft_cap=cap or None,
        )  # fmt: skip
        if out is None:
            return ref
        out.copy_(ref)
        return out

    if out is None:
        out = torch.empty_like(query)
    cfg = config or DEFAULT_CONFIG
    layer = DecodeLayer(
        PagedKVCache(key_cache, value_cache, k_scale, v_scale, kv_dtype), num_q_heads=num_q_heads,
        act_dtype=query.dtype, softmax_scale=softmax_scale, sliding_window=window, logits_soft_cap=cap, config=cfg,
    )  # fmt: skip
    if num_seqs == 0:
        return out
    plan = DecodePlan.build(
        num_seqs, block_table, seq_lens, None, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
        head_size=head_size, workspace=workspace, max_num_splits=max_num_splits, config=cfg,
    )  # fmt: skip
    return layer.run(query, out, plan)
