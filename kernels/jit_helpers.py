"""``@triton.jit`` helpers shared by the decode and prefill kernels (inlined where called)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_kv_scale(scale_ptr, kv_head, offs_d, HEAD_SIZE: tl.constexpr, GRAN: tl.constexpr):
    """KV head ``kv_head``'s dequantization scale (``GRAN``: :mod:`.scales_layout`'s 0, 1, 2): the one
    shared scalar, its own scalar, or its ``[HEAD_PAD]`` channel vector (0 past ``HEAD_SIZE``)."""
    if GRAN == 2:
        return tl.load(scale_ptr + kv_head * HEAD_SIZE + offs_d, mask=offs_d < HEAD_SIZE, other=0.0)
    elif GRAN == 1:
        return tl.load(scale_ptr + kv_head)
    else:
        return tl.load(scale_ptr)


@triton.jit
def fold_k_scale(q, k_scale, GRAN: tl.constexpr):
    """``(q, scalar)`` with ``q . (k_stored * k_scale) == (q' . k_stored) * scalar``.

    Per channel, ``q' = q * k_scale / max(k_scale)`` in fp32 (the query keeps its range, so an fp16
    dot operand neither overflows nor loses more than its small channels' low bits) and the scalar
    is ``max(k_scale)``; otherwise ``q`` and ``k_scale`` unchanged."""
    if GRAN == 2:
        k_max = tl.max(k_scale, 0)
        return q.to(tl.float32) * (k_scale / k_max)[None, :], k_max
    else:
        return q, k_scale
