"""The ``KVQUANT`` attention backend: what vLLM asks of a backend, and the batch metadata.

Decodes are ordered first in every batch (``reorder_batch_threshold = 1``): the first
``num_decodes`` requests have one query token each and read only the 8-bit cache; the rest
are prefills (with or without cached context).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
)

from . import compat
from .kernels.dtypes import SUPPORTED_ACT_DTYPES, SUPPORTED_BLOCK_SIZES, SUPPORTED_HEAD_SIZES
from .layer_scales import attach_layer_scales


class KVQuantAttentionBackend(AttentionBackend):
    supported_dtypes: ClassVar[list[torch.dtype]] = list(SUPPORTED_ACT_DTYPES)
    supported_kv_cache_dtypes: ClassVar[list[str]] = list(compat.ONE_BYTE_CACHE_DTYPES)
    # The cache write is a separate call (do_kv_cache_update) in every supported release.
    forward_includes_kv_cache_update: bool = False

    @staticmethod
    def get_name() -> str:
        return compat.BACKEND_NAME

    @staticmethod
    def get_impl_cls():  # -> type[KVQuantAttentionImpl]
        from .impl import KVQuantAttentionImpl

        return KVQuantAttentionImpl

    @staticmethod
    def get_builder_cls() -> type["KVQuantMetadataBuilder"]:
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


@dataclass
class KVQuantMetadata:
    num_actual_tokens: int
    num_decodes: int
    num_decode_tokens: int
    num_prefills: int
    num_prefill_tokens: int
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    slot_mapping: torch.Tensor
    # Prefill requests only, re-based so that their first token is row 0.
    prefill_query_start_loc: torch.Tensor | None = None
    prefill_context_lens: torch.Tensor | None = None
    prefill_block_table: torch.Tensor | None = None
    max_prefill_query_len: int = 0


class KVQuantMetadataBuilder(AttentionMetadataBuilder[KVQuantMetadata]):
    # Full CUDA graphs for pure one-token decode batches; mixed batches run piecewise.
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
    reorder_batch_threshold: int | None = 1

    def __init__(self, kv_cache_spec: Any, layer_names: list[str], vllm_config: Any, device: torch.device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        # Scales go onto the layers now, before any CUDA graph is captured.
        attach_layer_scales(vllm_config, layer_names, device)

    def build_for_cudagraph_capture(self, common_attn_metadata: CommonAttentionMetadata) -> KVQuantMetadata:
        metadata = self.build(0, common_attn_metadata)
        # Capturing with max_model_len-long sequences is slow; lengths are data, not shapes.
        metadata.seq_lens.fill_(1)
        return metadata

    def build(
        self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False
    ) -> KVQuantMetadata:
        m = common_attn_metadata
        num_decodes, num_prefills, num_decode_tokens, num_prefill_tokens = compat.split_decodes_and_prefills(m)
        metadata = KVQuantMetadata(
            num_actual_tokens=m.num_actual_tokens,
            num_decodes=num_decodes,
            num_decode_tokens=num_decode_tokens,
            num_prefills=num_prefills,
            num_prefill_tokens=num_prefill_tokens,
            max_query_len=m.max_query_len,
            max_seq_len=m.max_seq_len,
            query_start_loc=m.query_start_loc,
            seq_lens=m.seq_lens,
            block_table=m.block_table_tensor,
            slot_mapping=m.slot_mapping,
        )
        if num_prefills:
            qsl = m.query_start_loc[num_decodes : num_decodes + num_prefills + 1] - num_decode_tokens
            query_lens = qsl[1:] - qsl[:-1]
            metadata.prefill_query_start_loc = qsl
            metadata.prefill_context_lens = m.seq_lens[num_decodes : num_decodes + num_prefills] - query_lens
            metadata.prefill_block_table = m.block_table_tensor[num_decodes : num_decodes + num_prefills]
            qsl_cpu = m.query_start_loc_cpu[num_decodes : num_decodes + num_prefills + 1]
            metadata.max_prefill_query_len = int((qsl_cpu[1:] - qsl_cpu[:-1]).max())
        return metadata
