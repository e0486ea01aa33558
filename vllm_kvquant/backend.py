"""The ``KVQUANT`` attention backend: what vLLM asks of a backend.

Modules import one way: ``backend`` -> ``impl`` -> ``metadata`` -> ``layer_scales`` (and the
kernels); the batch metadata and its builder live in :mod:`.metadata`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from vllm.v1.attention.backend import AttentionBackend, AttentionType

from . import compat
from .kernels.dtypes import SUPPORTED_ACT_DTYPES, SUPPORTED_BLOCK_SIZES, SUPPORTED_HEAD_SIZES
from .impl import KVQuantAttentionImpl
from .metadata import KVQuantMetadataBuilder


class KVQuantAttentionBackend(AttentionBackend):
    supported_dtypes: ClassVar[list[torch.dtype]] = list(SUPPORTED_ACT_DTYPES)
    supported_kv_cache_dtypes: ClassVar[list[str]] = list(compat.ONE_BYTE_CACHE_DTYPES)
    # The cache write is a separate call (do_kv_cache_update) in every supported release.
    forward_includes_kv_cache_update: bool = False

    @staticmethod
    def get_name() -> str:
        return compat.BACKEND_NAME

    @staticmethod
    def get_impl_cls() -> type[KVQuantAttentionImpl]:
        return KVQuantAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[KVQuantMetadataBuilder]:
        return KVQuantMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(*args: Any, **kwargs: Any) -> list[int]:
        return list(SUPPORTED_BLOCK_SIZES)

    @staticmethod
    def get_kv_cache_shape(
        num_blocks: int, block_size: int, num_kv_heads: int, head_size: int, cache_dtype_str: str = "auto"
    ) -> tuple[int, ...]:
        # Used by releases that ask the backend (0.26); later ones build this same logical shape.
        return (num_blocks, num_kv_heads, block_size, 2 * head_size)

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return list(SUPPORTED_HEAD_SIZES)

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return True

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def validate_configuration(cls, **kwargs: Any) -> list[str]:
        """Reasons this configuration cannot run, worded for a user (empty when it can)."""
        from .validation import unsupported_reasons

        return unsupported_reasons(**kwargs)
