"""kernels.paged_cache.PagedKVCache: the one cache argument of every launcher (views, refusals)."""

from __future__ import annotations

import pytest
import torch

from vllm_kvquant.kernels import PagedKVCache
from vllm_kvquant.kernels.dtypes import KVQuantDType


def _views(dtype=torch.uint8):
    kv = torch.zeros(3, 2, 16, 2 * 64, dtype=dtype)  # the backend's [blocks, heads, block, 2 * head] layout
    return kv.transpose(1, 2).split(64, dim=-1)


@pytest.mark.parametrize("name, torch_dtype", [("fp8_e4m3", torch.float8_e4m3fn), ("int8", torch.int8)])
def test_uint8_storage_is_viewed_as_the_format_without_a_copy(name, torch_dtype):
    kc, vc = _views()
    cache = PagedKVCache(kc, vc, torch.ones(1), torch.ones(2), name)
    assert cache.kv_dtype is KVQuantDType(name) and cache.is_int8 == (name == "int8")
    assert cache.key_cache.dtype == cache.value_cache.dtype == torch_dtype
    assert cache.key_cache.data_ptr() == kc.data_ptr() and cache.value_cache.stride() == vc.stride()
    cache.key_cache[1, 2, 0, 5] = 1.0  # writes land in the storage it was given
    assert kc[1, 2, 0, 5] != 0


def test_refusals_name_the_argument():
    kc, vc = _views()
    with pytest.raises(ValueError, match="kv_dtype must be one of"):
        PagedKVCache(kc, vc, torch.ones(1), torch.ones(1), "fp4")
    with pytest.raises(ValueError, match="1 byte per element"):
        PagedKVCache(*_views(torch.float16), torch.ones(1), torch.ones(1), "int8")
    with pytest.raises(TypeError, match=r"PagedKVCache.v_scale must be a torch.Tensor, got float"):
        PagedKVCache(kc, vc, torch.ones(1), 0.5, "int8")
    with pytest.raises(ValueError, match="k_scale is on meta but key_cache is on cpu"):
        PagedKVCache(kc, vc, torch.ones(1, device="meta"), torch.ones(1), "int8")
