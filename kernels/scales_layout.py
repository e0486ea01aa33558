"""How a K or V scale tensor maps onto the cache: one scale, one per KV head, or one per KV head and channel.

Every kernel takes ``real = stored * scale`` with ``scale`` fp32 of ``1`` (per tensor),
``num_kv_heads`` (per head) or ``num_kv_heads * head_size`` values (per channel, head-major:
``[num_kv_heads, head_size]``). The granularity is a kernel constexpr (:data:`PER_TENSOR`,
:data:`PER_HEAD`, :data:`PER_CHANNEL`), so per-head kernels compile exactly as before; per-channel
kernels load one ``[head_size]`` vector per program instead of a scalar (K's folds into the query,
V's multiplies the output), reading the same cache bytes.
"""

from __future__ import annotations

import torch

PER_TENSOR, PER_HEAD, PER_CHANNEL = 0, 1, 2


def scale_granularity(scale: torch.Tensor, num_kv_heads: int, head_size: int, name: str = "scale") -> int:
    """:data:`PER_TENSOR`, :data:`PER_HEAD` or :data:`PER_CHANNEL` from the number of values; a
    ValueError naming ``name`` and the expected counts otherwise."""
    n = scale.numel()
    if n == 1:
        return PER_TENSOR
    if n == num_kv_heads:
        return PER_HEAD
    if n == num_kv_heads * head_size:
        return PER_CHANNEL
    raise ValueError(
        f"{name} has {n} values; expected 1 (per tensor), {num_kv_heads} (per KV head) or "
        f"{num_kv_heads} x {head_size} = {num_kv_heads * head_size} (per KV head and channel)"
    )


def flat_scale(
    scale: object, name: str, num_kv_heads: int, head_size: int, device: torch.device | None = None
) -> tuple[torch.Tensor, int]:
    """``(contiguous flat fp32 scale, granularity)`` for a kernel argument; a view when ``scale``
    already is contiguous fp32 (online scales are updated in place and must stay the same memory)."""
    if not isinstance(scale, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(scale).__name__}")
    if not scale.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {scale.dtype}")
    granularity = scale_granularity(scale, num_kv_heads, head_size, name)
    if device is not None and scale.device != device:
        raise ValueError(f"{name} is on {scale.device} but the cache is on {device}")
    flat = scale.reshape(-1)
    if flat.dtype != torch.float32:
        flat = flat.float()
    return flat.contiguous(), granularity


def broadcast_scale(scale: torch.Tensor, num_kv_heads: int, head_size: int) -> torch.Tensor:
    """fp32 ``[num_kv_heads, 1]`` (per tensor / per head) or ``[num_kv_heads, head_size]`` (per
    channel): multiplies or divides ``[..., num_kv_heads, head_size]`` values (the references)."""
    granularity = scale_granularity(scale, num_kv_heads, head_size)
    s = scale.to(torch.float32).reshape(-1)
    if granularity == PER_CHANNEL:
        return s.view(num_kv_heads, head_size)
    return s.expand(num_kv_heads)[:, None] if granularity == PER_TENSOR else s[:, None]
