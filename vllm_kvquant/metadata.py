"""The kvquant backend's batch metadata and its builder: every launch parameter, once per batch.

Decodes are ordered first in every batch (``reorder_batch_threshold = 1``). The builder turns
vLLM's common metadata into one :class:`.kernels.DecodePlan` (grid, split count, workspace
views, argument tuples; FlashInfer's plan/run split) and one :class:`.prefill.PrefillPlan`,
shared by every layer of the KV-cache group, so a layer's call only launches.

Two kinds of build:

- ``build`` (eager and piecewise steps): exact plans. The decode kernel covers the first
  ``num_decodes`` requests, the prefill kernel the rest; a kernel with nothing to do is not
  planned (the layer then skips it).
- ``build_for_cudagraph_capture`` (full CUDA graphs, ``AttentionCGSupport.ALWAYS``): a graph is
  replayed with new device contents (query_start_loc, seq_lens, block_table, slot_mapping)
  and any mix of decodes and prefills, without re-running ``forward``. Both plans then cover
  every padded request with grids from upper bounds (``num_reqs``, ``num_actual_tokens``):
  the decode kernel serves requests with one new token, the prefill kernel those with more;
  each reads its lengths on the device and padding requests (no new tokens) do nothing.
  Only graphs that vLLM replays for uniform decode batches alone (FULL_AND_PIECEWISE,
  FULL_DECODE_ONLY, or one token) leave the prefill plan out; under FULL every graph has it,
  whatever the capture batch looks like.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from vllm.v1.attention.backend import AttentionCGSupport, AttentionMetadataBuilder, CommonAttentionMetadata

from . import compat, warmup
from .config import KVQuantConfig
from .kernels.decode_attention import DEFAULT_CONFIG, DecodePlan, alloc_decode_workspace
from .kernels.decode_config import device_num_sms
from .layer_scales import attach_layer_scales, layer_state
from .prefill import ContextWorkspace, PrefillPlan, fa3_unavailable_reason, prefill_workspace_tokens

__all__ = ["KVQuantMetadata", "KVQuantMetadataBuilder", "decode_kernel", "prefill_workspace_tokens", "step_counts"]

logger = logging.getLogger("vllm.kvquant")


def decode_kernel(vllm_config: Any) -> str:
    """The configured decode kernel. ``auto`` is ``triton``: the one kernel that serves full CUDA
    graphs of mixed batches (:mod:`.peer_decode` holds the fa3 / flashinfer alternatives)."""
    kernel = KVQuantConfig.from_additional_config(compat.additional_config(vllm_config)).kernel
    return "triton" if kernel == "auto" else kernel


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
    #: Decode plans by number of query heads (one entry unless layers differ); empty: no decodes.
    decode: dict[int, DecodePlan] = field(default_factory=dict)
    #: The fa3 / flashinfer decode plan (a ``decode_runner.DecodePlan``) when one of them is configured.
    decode_other: Any = None
    #: None: no prefill this batch.
    prefill: PrefillPlan | None = None
    #: Built for CUDA-graph capture: both plans cover every (padded) request.
    graph_safe: bool = False
    #: Set by the layers' ``forward``. A step built by ``build`` whose metadata never reached
    #: ``forward`` was replayed from a full CUDA graph (a replay runs no Python): see :func:`step_counts`.
    ran_forward: bool = False


#: Every builder of this process, for :func:`step_counts`.
_BUILDERS: "weakref.WeakSet[KVQuantMetadataBuilder]" = weakref.WeakSet()


def step_counts() -> dict[str, int]:
    """This process's mixed steps (decodes and prefills in one batch) built by ``build``, and how
    many of them were replayed from a full CUDA graph instead of running ``forward``: behaviour,
    whatever vLLM's logs say. Summed over builders (one per KV-cache group)."""
    total = {"mixed_steps": 0, "mixed_steps_full_graph": 0}
    for builder in list(_BUILDERS):
        builder._settle_mixed()
        for key in total:
            total[key] += builder.counts[key]
    return total


class KVQuantMetadataBuilder(AttentionMetadataBuilder[KVQuantMetadata]):
    # Mixed prefill/decode batches can be captured whole (cudagraph_mode=FULL): see the module doc.
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.ALWAYS
    reorder_batch_threshold: int | None = 1

    def __init__(self, kv_cache_spec: Any, layer_names: list[str], vllm_config: Any, device: torch.device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        # Scales go onto the layers now, before any CUDA graph is captured.
        attach_layer_scales(vllm_config, layer_names, device)
        self.num_kv_heads = int(kv_cache_spec.num_kv_heads)
        self.head_size = int(kv_cache_spec.head_size)
        layers = compat.attention_layers(vllm_config, layer_names).values()
        heads = {int(h) for h in (getattr(layer, "num_heads", None) for layer in layers) if h}
        if not heads:
            heads = {int(vllm_config.model_config.get_num_attention_heads(vllm_config.parallel_config))}
        self.num_q_heads = sorted(heads)
        self.max_num_seqs = int(vllm_config.scheduler_config.max_num_seqs)
        self.device = torch.device(device)
        self.num_sms = device_num_sms(self.device, DEFAULT_CONFIG)
        # One split-KV workspace for every batch and layer (layers run one after another).
        self.decode_workspace = alloc_decode_workspace(
            self.max_num_seqs, max(self.num_q_heads), self.head_size, num_kv_heads=self.num_kv_heads, device=self.device
        )

        self.prefill_workspace = self._init_prefill_workspace(vllm_config, kv_cache_spec)
        self.counts = {"mixed_steps": 0, "mixed_steps_full_graph": 0}
        self._pending_mixed: KVQuantMetadata | None = None  # the last mixed step, until the next build
        _BUILDERS.add(self)

        self.decode_planner = None
        if decode_kernel(vllm_config) != "triton":
            self._init_other_decode(vllm_config, kv_cache_spec, list(layers))
        warmup.register(self)  # every kernel variant compiled at start-up (vllm_kvquant/warmup.py)

    def _init_prefill_workspace(self, vllm_config: Any, kv_cache_spec: Any) -> ContextWorkspace | None:
        """The prefill's 16-bit workspace for FA3 (see :mod:`.prefill`), allocated now, once."""
        options = KVQuantConfig.from_additional_config(compat.additional_config(vllm_config))
        self.prefill_from_cache_only = options.prefill == "quantized"
        if options.prefill_workspace_mib == 0:
            return None
        if fa3_unavailable_reason(self.device, self.head_size) is not None:
            return None
        dtype = vllm_config.model_config.dtype
        tokens = prefill_workspace_tokens(
            options.prefill_workspace_mib, self.num_kv_heads, self.head_size, torch.empty((), dtype=dtype).element_size()
        )
        block_size = int(kv_cache_spec.block_size)
        if tokens < block_size:
            return None
        ws = ContextWorkspace.allocate(tokens, block_size, self.num_kv_heads, self.head_size, dtype, self.device)
        which = "prefills" if self.prefill_from_cache_only else "prefills with cached context"
        logger.info("kvquant: prefill context workspace of %d tokens (%.0f MiB): %s attend in FA3 over a 16-bit copy",
                    ws.num_pages * block_size, ws.nbytes / 2**20, which)  # fmt: skip
        return ws

    @classmethod
    def get_cudagraph_support(cls, vllm_config: Any, kv_cache_spec: Any) -> AttentionCGSupport:
        # fa3 / flashinfer decode only the leading one-token requests: full graphs of pure-decode batches.
        if decode_kernel(vllm_config) != "triton":
            return AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
        return cls._cudagraph_support

    def _init_other_decode(self, vllm_config: Any, kv_cache_spec: Any, layers: list) -> None:
        """Plan fa3 / flashinfer decodes (``vllm_kvquant.peer_decode``; refuses what cannot run)."""
        from .peer_decode.choice import create_planner

        first = layers[0]
        impl = first.impl
        block_size = int(kv_cache_spec.block_size)
        self.decode_planner = create_planner(
            decode_kernel(vllm_config), num_heads=max(self.num_q_heads), num_kv_heads=self.num_kv_heads,
            head_size=self.head_size, block_size=block_size, scale=impl.scale, sliding_window=impl.sliding_window,
            logits_soft_cap=impl.logits_soft_cap, kv_dtype=layer_state(first).kv_dtype,
            per_channel=layer_state(first).per_channel,
            model_dtype=vllm_config.model_config.dtype, device=self.device, max_num_seqs=self.max_num_seqs,
            max_num_blocks_per_seq=-(-int(vllm_config.model_config.max_model_len) // block_size),
        )  # fmt: skip
        comp = vllm_config.compilation_config
        full = comp.cudagraph_mode is not None and comp.cudagraph_mode.has_full_cudagraphs()
        self._full_graph_max_tokens = int(comp.max_cudagraph_capture_size or 0) if full else 0

    def _other_decode_plan(self, m: CommonAttentionMetadata, num_decodes: int, graph: bool) -> Any:
        from .decode_runner import DecodePlan as KernelDecodePlan

        # Replayed from a full graph (as vLLM's FLASH_ATTN decides): per-batch data into persistent buffers.
        graph = graph or (num_decodes == m.num_reqs and m.num_actual_tokens <= self._full_graph_max_tokens)
        upper = getattr(m, "seq_lens_cpu_upper_bound", None)
        return KernelDecodePlan.build(
            m.block_table_tensor, m.seq_lens[:num_decodes], m.query_start_loc, m.max_seq_len,
            planner=self.decode_planner, seq_lens_cpu=None if upper is None else upper[:num_decodes],
            use_cuda_graph=graph,
        )  # fmt: skip

    def build_for_cudagraph_capture(self, common_attn_metadata: CommonAttentionMetadata) -> KVQuantMetadata:
        m = common_attn_metadata
        # Lengths are data, not shapes: capture with no cached context (capturing with
        # max_model_len-long sequences is slow); replays bring their own lengths.
        qsl = m.query_start_loc
        m.seq_lens.copy_(qsl[1:] - qsl[:-1])
        return self._build(m, graph_safe=True)

    def build(
        self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False
    ) -> KVQuantMetadata:
        if self._pending_mixed is not None:
            self._settle_mixed()
        metadata = self._build(common_attn_metadata, graph_safe=False)
        if metadata.num_decodes and metadata.num_prefills:
            self._pending_mixed = metadata
        return metadata

    def _settle_mixed(self) -> None:
        """Count the last mixed step: by now its layers ran ``forward`` unless a graph replayed it."""
        m, self._pending_mixed = self._pending_mixed, None
        if m is not None:
            self.counts["mixed_steps"] += 1
            self.counts["mixed_steps_full_graph"] += not m.ran_forward

    def _decode_plans(self, num_seqs: int, m: CommonAttentionMetadata) -> dict[int, DecodePlan]:
        return {
            hq: DecodePlan.build(
                num_seqs, m.block_table_tensor, m.seq_lens, m.query_start_loc, num_q_heads=hq,
                num_kv_heads=self.num_kv_heads, head_size=self.head_size, workspace=self.decode_workspace,
                config=DEFAULT_CONFIG, num_sms=self.num_sms,
            )  # fmt: skip
            for hq in self.num_q_heads
        }

    def _build(self, m: CommonAttentionMetadata, *, graph_safe: bool) -> KVQuantMetadata:
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
            graph_safe=graph_safe,
        )
        if self.decode_planner is not None:  # fa3 / flashinfer: decodes first, full graphs of decodes only
            if num_decodes:
                metadata.decode_other = self._other_decode_plan(m, num_decodes, graph_safe)
            num_decodes = 0
        elif graph_safe:
            # Upper bounds only: the replayed batch may mix decodes and prefills in any way.
            metadata.decode = self._decode_plans(m.num_reqs, m)
            # A capture's max_query_len of 1 does not make a decode-only graph: under FULL, vLLM
            # captures mixed graphs on one-token dummy requests too (compat doc). A graph of one
            # token serves one request of one token: the decode kernel's.
            mixed = m.num_actual_tokens > 1 and compat.full_graphs_replay_mixed_batches(self.vllm_config)
            if m.max_query_len > 1 or mixed:
                metadata.prefill = PrefillPlan.build(
                    m.query_start_loc, m.seq_lens, m.block_table_tensor,
                    num_tokens=m.num_actual_tokens, max_query_len=m.num_actual_tokens, all_rows=True,
                )  # fmt: skip
            return metadata
        if num_decodes:
            metadata.decode = self._decode_plans(num_decodes, m)
        if num_prefills:
            nd = metadata.num_decodes
            metadata.prefill = PrefillPlan.build(
                m.query_start_loc, m.seq_lens, m.block_table_tensor,
                num_tokens=m.num_actual_tokens, max_query_len=m.max_query_len,
                num_decodes=nd, num_decode_tokens=num_decode_tokens, has_context=_may_have_context(m, nd),
                workspace=self.prefill_workspace, seq_lens_cpu=getattr(m, "seq_lens_cpu_upper_bound", None),
                from_cache_only=self.prefill_from_cache_only, query_start_loc_cpu=getattr(m, "query_start_loc_cpu", None),
            )  # fmt: skip
        return metadata


def _may_have_context(m: CommonAttentionMetadata, first: int) -> bool:
    """Whether any request from ``first`` on may have cached context (host data only, no sync)."""
    upper = getattr(m, "seq_lens_cpu_upper_bound", None)
    qsl = getattr(m, "query_start_loc_cpu", None)
    if upper is None or qsl is None:
        return True
    n = m.num_reqs
    new_tokens = qsl[first + 1 : n + 1] - qsl[first:n]
    return bool((upper[first:n] - new_tokens > 0).any())
