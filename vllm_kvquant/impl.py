"""Per-layer attention of the kvquant backend.

- ``do_kv_cache_update``: quantize the step's K/V into the 8-bit paged cache (Triton).
- ``forward``: decodes read only the 8-bit cache (FP8/INT8 kernel, dequantized in-kernel);
  prefills attend to their own K/V in fp16/bf16 and to any cached context dequantized.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.v1.attention.backend import AttentionImpl, AttentionType

from . import calibration_hooks, compat
from .backend import KVQuantMetadata
from .kernels import paged_decode_attention, paged_prefill_attention, quantize_to_cache
from .layer_scales import layer_state
from .validation import check_supported


class KVQuantAttentionImpl(AttentionImpl[KVQuantMetadata]):
    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int | None = None,
        alibi_slopes: list[float] | None = None,
        sliding_window: int | None = None,
        kv_cache_dtype: str = "auto",
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        sinks: torch.Tensor | None = None,
        **unsupported: Any,
    ) -> None:
        check_supported(
            f"an attention layer with {num_heads} heads of size {head_size}",
            head_size=head_size,
            kv_cache_dtype=kv_cache_dtype,
            attn_type=str(getattr(attn_type, "value", attn_type)),
            use_alibi=alibi_slopes is not None,
            has_sink=sinks is not None,
        )
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        if self.num_heads % self.num_kv_heads:
            check_supported(f"{num_heads} query heads over {self.num_kv_heads} KV heads", head_size=-1)
        self.sliding_window = sliding_window
        self.logits_soft_cap = logits_soft_cap or None
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name

    def do_kv_cache_update(
        self,
        layer: Any,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        if self.kv_sharing_target_layer_name is not None:
            return
        state = layer_state(layer)
        recorder = calibration_hooks.active_recorder()
        if recorder is not None:  # calibration (eager only): the exact K/V written below
            written = slot_mapping >= 0
            n = slot_mapping.shape[0]
            recorder.record(layer.layer_name, key[:n][written], value[:n][written])
        key_cache, value_cache = compat.split_kv_cache(kv_cache, self.head_size)
        quantize_to_cache(
            key, value, key_cache, value_cache, slot_mapping, state.k_scale, state.v_scale, state.kv_dtype
        )

    def forward(
        self,
        layer: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: KVQuantMetadata,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
        **_: Any,
    ) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("kvquant does not fuse output quantization")
        if attn_metadata is None:  # profiling run
            return output.fill_(0)
        state = layer_state(layer)
        key_cache, value_cache = compat.split_kv_cache(kv_cache, self.head_size)
        out = output.view(-1, self.num_heads, self.head_size)
        m = attn_metadata
        nd = m.num_decode_tokens
        if m.num_decodes:
            paged_decode_attention(
                query[:nd],
                key_cache,
                value_cache,
                m.block_table[: m.num_decodes],
                m.seq_lens[: m.num_decodes],
                state.k_scale,
                state.v_scale,
                state.kv_dtype,
                self.scale,
                out=out[:nd],
                sliding_window=self.sliding_window,
                logits_soft_cap=self.logits_soft_cap,
            )
        if m.num_prefills:
            end = nd + m.num_prefill_tokens
            paged_prefill_attention(
                query[nd:end],
                key[nd:end],
                value[nd:end],
                key_cache,
                value_cache,
                m.prefill_block_table,
                m.prefill_query_start_loc,
                m.prefill_context_lens,
                state.k_scale,
                state.v_scale,
                state.kv_dtype,
                self.scale,
                out=out[nd:end],
                max_query_len=m.max_prefill_query_len,
                sliding_window=self.sliding_window,
                logits_soft_cap=self.logits_soft_cap,
            )
        return output
