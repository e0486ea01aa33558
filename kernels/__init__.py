"""Triton kernels for the 8-bit paged KV cache, with PyTorch references.

Importable as ``vllm_kvquant.kernels``; it never imports vLLM.
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
from .decode_attention import paged_decode_attention
from .prefill_attention import paged_prefill_attention
from .quantize_cache import quantize_to_cache
from .decode_attention import MAX_NUM_SPLITS, alloc_decode_workspace, decode_workspace_shape
