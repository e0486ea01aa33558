"""One layer's paged 8-bit K/V cache and the scales that dequantize it, as one argument.

Every launcher that reads or writes the cache (the cache write, our decode kernel, the prefill
context pass and workspace fill, the peer decode kernels) needs the same five things together:
the K and V cache views, their scales and the storage format. :class:`PagedKVCache` carries them
as one value, made once per layer (the backend's ``LayerKernels``), so that the per-layer runner
interface reads ``run(query, cache, plan, out)`` everywhere and no launcher re-lists them.

It checks only what is cheap and always true (format name, one byte per element, one device);
shapes and scale granularity are checked by the launcher that uses them, once per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .dtypes import KVQuantDType, as_storage, parse_kv_dtype

__all__ = ["PagedKVCache"]


@dataclass(frozen=True)
class PagedKVCache:
    """``key_cache``/``value_cache``: ``[num_blocks, block_size, num_kv_heads, head_size]`` views
    (any strides), held as the format's torch dtype (fp8 e4m3 or int8; uint8 storage is viewed
    so on construction). ``k_scale``/``v_scale``: fp32, ``[1]`` (per tensor), ``[num_kv_heads]``
    (per head) or ``[num_kv_heads, head_size]`` (per channel); dequantized = stored * scale.
    """

    key_cache: torch.Tensor
    value_cache: torch.Tensor
    k_scale: torch.Tensor
    v_scale: torch.Tensor
    kv_dtype: KVQuantDType

    def __post_init__(self) -> None:
        kv_dtype = parse_kv_dtype(self.kv_dtype)
        for name in ("key_cache", "value_cache", "k_scale", "v_scale"):
            if not isinstance(getattr(self, name), torch.Tensor):
                raise TypeError(f"PagedKVCache.{name} must be a torch.Tensor, got {type(getattr(self, name)).__name__}")
        device = self.key_cache.device
        for name in ("value_cache", "k_scale", "v_scale"):
            if getattr(self, name).device != device:
                raise ValueError(f"{name} is on {getattr(self, name).device} but key_cache is on {device}")
        object.__setattr__(self, "kv_dtype", kv_dtype)
        object.__setattr__(self, "key_cache", as_storage(self.key_cache, kv_dtype))
        object.__setattr__(self, "value_cache", as_storage(self.value_cache, kv_dtype))

    @property
    def device(self) -> torch.device:
        return self.key_cache.device

    @property
    def is_int8(self) -> bool:
        return self.kv_dtype is KVQuantDType.INT8
