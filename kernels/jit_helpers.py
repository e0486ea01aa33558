"""``@triton.jit`` helpers shared by the decode and prefill kernels (inlined where called)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_head_scale(scale_ptr, kv_head, PER_HEAD: tl.constexpr):
    """KV head ``kv_head``'s dequantization scale: its own (per head) or the one shared scalar."""
    if PER_HEAD:
        return tl.load(scale_ptr + kv_head)
    else:
        return tl.load(scale_ptr)
