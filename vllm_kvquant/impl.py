"""Per-layer attention of the kvquant backend.

- ``do_kv_cache_update``: quantize the step's K/V into the 8-bit paged cache (Triton).
- ``forward``: prefills attend to their own K/V in fp16/bf16 and to any cached context
  dequantized (:mod:`.prefill`); decodes read only the 8-bit cache (FP8/INT8 kernel,
  dequantized in-kernel).

Host path: each layer validates its caches, scales and options once (:class:`LayerKernels`,
rebuilt only if vLLM hands it another cache tensor or the layer other scales); the batch's
launch parameters come from the metadata (:mod:`.metadata`), so a call only launches.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.v1.attention.backend import AttentionImpl, AttentionType

from . import calibration_hooks, compat
from .config import KVQuantConfig
from .kernels import CacheWriter, DecodeLayer, PagedKVCache
from .layer_scales import LAYER_ATTR, LayerQuantState, layer_state
from .metadata import KVQuantMetadata
from .prefill import PrefillRunner
from .validation import check_supported


class LayerKernels:
    """One layer's launchers over one cache tensor and one set of scales (built once)."""

    __slots__ = ("kv_cache", "state", "cache", "writer", "decode")

    def __init__(self, impl: "KVQuantAttentionImpl", kv_cache: torch.Tensor, state: LayerQuantState) -> None:
        self.kv_cache, self.state = kv_cache, state
        key_cache, value_cache = compat.split_kv_cache(kv_cache, impl.head_size)
        self.cache = PagedKVCache(key_cache, value_cache, state.k_scale, state.v_scale, state.kv_dtype)
        self.writer = CacheWriter(self.cache)
        self.decode: DecodeLayer | None = None  # made at the first decode (needs the query dtype)

    def current(self, kv_cache: torch.Tensor, state: LayerQuantState | None) -> bool:
        s, c = self.state, self.cache  # the cache holds the scale tensors it was made with
        return kv_cache is self.kv_cache and state is s and s.k_scale is c.k_scale and s.v_scale is c.v_scale

    def decode_layer(self, impl: "KVQuantAttentionImpl", act_dtype: torch.dtype) -> DecodeLayer:
        self.decode = DecodeLayer(
            self.cache, num_q_heads=impl.num_heads, act_dtype=act_dtype, softmax_scale=impl.scale,
            sliding_window=impl.sliding_window, logits_soft_cap=impl.logits_soft_cap,
        )  # fmt: skip
        return self.decode


def _current_options() -> tuple[KVQuantConfig, int]:
    """The kvquant options and max_num_seqs of the vLLM config being built (defaults outside one)."""
    from vllm.config import get_current_vllm_config_or_none

    vllm_config = get_current_vllm_config_or_none()
    if vllm_config is None:
        return KVQuantConfig(), 256
    options = KVQuantConfig.from_additional_config(compat.additional_config(vllm_config))
    scheduler = getattr(vllm_config, "scheduler_config", None)
    return options, int(getattr(scheduler, "max_num_seqs", None) or 256)


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
        self.options, self.max_num_seqs = _current_options()
        self._kernels: LayerKernels | None = None
        self._prefill: PrefillRunner | None = None
        self._other_decode: Any = None  # decode_runner.DecodeRunner for kernel fa3 / flashinfer

    def _layer_kernels(self, layer: Any, kv_cache: torch.Tensor) -> LayerKernels:
        """This layer's launchers, rebuilt when vLLM hands it another cache or scales (rare)."""
        lk = self._kernels
        if lk is None or not lk.current(kv_cache, getattr(layer, LAYER_ATTR, None)):
            lk = self._kernels = LayerKernels(self, kv_cache, layer_state(layer))
        return lk

    def _prefill_runner(self, device: torch.device) -> PrefillRunner:
        self._prefill = PrefillRunner(
            num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_size=self.head_size, scale=self.scale,
            sliding_window=self.sliding_window, logits_soft_cap=self.logits_soft_cap, mode=self.options.prefill,
            device=device,
        )  # fmt: skip
        return self._prefill

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
        lk = self._layer_kernels(layer, kv_cache)
        state = lk.state
        recorder = calibration_hooks.active_recorder()
        if recorder is not None:  # calibration (eager only): the exact K/V written below
            written = slot_mapping >= 0
            n = slot_mapping.shape[0]
            recorder.record(layer.layer_name, key[:n][written], value[:n][written])
        if state.online is not None: state.online.observe(key, value, slot_mapping, state)  # noqa: E701 (online scales)
        lk.writer.write(key, value, slot_mapping)

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
        lk = self._layer_kernels(layer, kv_cache)
        out = output if output.dim() == 3 else output.view(-1, self.num_heads, self.head_size)
        m = attn_metadata
        m.ran_forward = True  # not replayed from a full CUDA graph (metadata.step_counts)
        # Prefill first: under CUDA graphs its FA3 part also writes decode rows, which the
        # decode kernel then overwrites.
        if m.prefill is not None:
            (self._prefill or self._prefill_runner(query.device)).run(query, key, value, lk.cache, m.prefill, out)
        if m.decode:
            decode = lk.decode
            if decode is None or decode.act_dtype is not query.dtype:
                decode = lk.decode_layer(self, query.dtype)
            decode.run(query, out, m.decode[self.num_heads])
        elif m.decode_other is not None:  # fa3 / flashinfer (kvquant option "kernel"): the leading decode rows
            nd = m.num_decode_tokens
            (self._other_decode or self._other_decode_runner(query, lk.state)).run(
                query[:nd], lk.cache, m.decode_other, out[:nd], q_scale=getattr(layer, "_q_scale", None)
            )
        return output

    def _other_decode_runner(self, query: torch.Tensor, state: LayerQuantState) -> Any:
        from .peer_decode.choice import create_runner

        self._other_decode = create_runner(
            self.options.kernel, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_size=self.head_size,
            scale=self.scale, sliding_window=self.sliding_window, logits_soft_cap=self.logits_soft_cap,
            kv_dtype=state.kv_dtype, model_dtype=query.dtype, device=query.device,
            per_head=state.k_scale.numel() > 1 or state.v_scale.numel() > 1, per_channel=state.per_channel,
            max_num_seqs=self.max_num_seqs,
            k_scale=state.k_scale, v_scale=state.v_scale,
        )  # fmt: skip
        return self._other_decode
