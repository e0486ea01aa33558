"""The 8-bit KV formats the kernels store, and what each needs to know about them."""

from __future__ import annotations

from enum import Enum

import torch


class KVQuantDType(str, Enum):
    """Storage format of the quantized cache; the values match the sidecar's ``kv_dtype``."""

    FP8_E4M3 = "fp8_e4m3"
    INT8 = "int8"


_QMAX = {KVQuantDType.FP8_E4M3: 448.0, KVQuantDType.INT8: 127.0}
_TORCH = {KVQuantDType.FP8_E4M3: torch.float8_e4m3fn, KVQuantDType.INT8: torch.int8}

#: Head sizes the kernels are built and tested for (non-powers of two are masked).
SUPPORTED_HEAD_SIZES: tuple[int, ...] = (32, 64, 80, 96, 112, 128, 160, 192, 256)
#: Query/KV element types the kernels accept.
SUPPORTED_ACT_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16)
#: Paged-cache block sizes the kernels are built and tested for.
SUPPORTED_BLOCK_SIZES: tuple[int, ...] = (16, 32, 64, 128)


def qmax_of(kv_dtype: KVQuantDType | str) -> float:
    """Largest magnitude the format stores (saturation bound)."""
    return _QMAX[KVQuantDType(kv_dtype)]


def torch_dtype_of(kv_dtype: KVQuantDType | str) -> torch.dtype:
    return _TORCH[KVQuantDType(kv_dtype)]


def as_storage(cache: torch.Tensor, kv_dtype: KVQuantDType | str) -> torch.Tensor:
    """View a one-byte cache tensor (uint8, int8 or fp8) as the format's torch dtype."""
    if cache.element_size() != 1:
        raise ValueError(f"a quantized KV cache needs 1 byte per element, got {cache.dtype}")
    target = torch_dtype_of(kv_dtype)
    return cache if cache.dtype == target else cache.view(target)


def parse_kv_dtype(kv_dtype: KVQuantDType | str) -> KVQuantDType:
    """The storage format named by ``kv_dtype``; a ValueError naming the choices otherwise."""
    try:
        return KVQuantDType(kv_dtype)
    except ValueError:
        raise ValueError(f"kv_dtype must be one of {[d.value for d in KVQuantDType]}, got {kv_dtype!r}") from None


def check_paged_caches(key_cache: torch.Tensor, value_cache: torch.Tensor) -> tuple[int, int, int]:
    """``(block_size, num_kv_heads, head_size)`` of two matching one-byte paged caches
    ``[num_blocks, block_size, num_kv_heads, head_size]`` (any strides); a ValueError naming the
    faulty argument otherwise."""
    for name, cache in (("key_cache", key_cache), ("value_cache", value_cache)):
        if cache.dim() != 4:
            raise ValueError(f"{name} must be [num_blocks, block_size, num_kv_heads, head_size], got {tuple(cache.shape)}")
        if cache.element_size() != 1:
            raise ValueError(f"{name} must hold 1-byte elements (a one-byte dtype: uint8, int8 or fp8), got {cache.dtype}")
    if key_cache.shape != value_cache.shape:
        raise ValueError(f"key_cache {tuple(key_cache.shape)} and value_cache {tuple(value_cache.shape)} differ")
    _, block_size, num_kv_heads, head_size = key_cache.shape
    return block_size, num_kv_heads, head_size
