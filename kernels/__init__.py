"""Triton kernels for the 8-bit paged KV cache, with PyTorch references.

Importable as ``vllm_kvquant.kernels``; it never imports vLLM. Each kernel has a public function
that validates every argument (for direct callers) and a lean path for the backend that
validates once per layer and plans once per batch (:class:`DecodeLayer` / :class:`DecodePlan`,
:class:`CacheWriter`).
"""

from .dtypes import (
    SUPPORTED_ACT_DTYPES,
    SUPPORTED_BLOCK_SIZES,
    SUPPORTED_HEAD_SIZES,
    KVQuantDType,
    as_storage,
    qmax_of,
    torch_dtype_of,
)
from .decode_attention import (
    MAX_NUM_SPLITS,
    DecodeLayer,
    DecodePlan,
    alloc_decode_workspace,
    decode_workspace_shape,
    paged_decode_attention,
)
from .paged_cache import PagedKVCache
from .prefill_attention import paged_prefill_attention
from .quantize_cache import CacheWriter, quantize_to_cache
