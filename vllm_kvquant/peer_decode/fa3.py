"""``"kernel": "fa3"``: the FlashAttention-3 kernel inside vLLM on our fp8 cache.

vLLM's ``vllm.vllm_flash_attn`` (``fa_version=3``) reads our fp8 cache views directly (FA3 needs
only a contiguous last dimension). FA3's fp8 path takes fp8 queries: the query is quantized the
way vLLM's attention layer does it (static scale, 1.0 unless a q scale is given), which costs
accuracy (see the GPU tests). Our per-tensor / per-KV-head K/V scales become its
``[num_seqs, num_kv_heads]`` descales as stride-0 ``expand`` views (no copy, no allocation);
per-channel scales have no place there and are refused at start-up (:func:`scale_reasons`). FA3
writes bf16 for fp8 inputs, so only bfloat16 models. Hopper (sm_90) only. Per batch: FA3's
scheduler metadata (vLLM's "AOT schedule"), with the splits bounded under CUDA graphs.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from ..decode_runner import DecodePlan, DecodePlanner, DecodeRunner, DecodeSpec

FP8 = torch.float8_e4m3fn
#: Splits FA3 may use per (sequence, KV head) under CUDA graphs (vLLM's
#: ``flash_attn_max_num_splits_for_cuda_graph`` default).
FA3_MAX_SPLITS_CUDA_GRAPH = 32


@functools.lru_cache(maxsize=None)
def fa3_missing() -> str | None:
    """Why vLLM's FA3 cannot run in this process; None when it can."""
    try:
        from vllm.vllm_flash_attn.flash_attn_interface import FA3_AVAILABLE, FA3_UNAVAILABLE_REASON
    except Exception as e:  # noqa: BLE001 - any import failure is a reason to refuse
        return f"vllm.vllm_flash_attn cannot be imported ({type(e).__name__}: {e})"
    return None if FA3_AVAILABLE else f"vLLM's FA3 kernels are unavailable ({FA3_UNAVAILABLE_REASON})"


def gpu_reasons(capability: tuple[int, int] | None, missing: str | None) -> list[str]:
    """What keeps FA3 off this CUDA GPU (empty: nothing)."""
    reasons = []
    if capability is None or capability[0] != 9:
        sm = f"sm_{capability[0]}{capability[1]}" if capability else "unknown"
        reasons.append(f"FA3 needs a Hopper GPU (sm_90) and this GPU is {sm}")
    if missing:
        reasons.append(missing)
    return reasons


def model_reasons(model_dtype: torch.dtype, head_size: int) -> list[str]:
    """What keeps FA3 off this model (empty: nothing)."""
    reasons = []
    if model_dtype != torch.bfloat16:
        reasons.append(f"FA3 writes bfloat16 output for fp8 inputs and the model runs in {model_dtype}")
    if head_size % 16 or head_size > 256:
        reasons.append(f"FA3 with fp8 needs a head size that is a multiple of 16 and <= 256, not {head_size}")
    return reasons


def scale_reasons(per_channel: bool) -> list[str]:
    """What keeps FA3 off these scales (empty: nothing)."""
    if not per_channel:
        return []
    return [
        "FA3 takes one K and one V descale per KV head and cannot apply per-channel scales (the sidecar's "
        "granularity is per_channel: K's would have to scale the fp8 query per channel, V's the output); "
        "calibrate with --granularity per_head for fa3, or use 'flashinfer'"
    ]


class FA3DecodePlanner(DecodePlanner):
    """FA3's scheduler metadata once per batch; under CUDA graphs in a persistent buffer."""

    kernel = "fa3"

    def allocate(self, workspace: torch.Tensor | None = None) -> None:
        # Largest FA3 scheduler metadata: 1 + round_up(batch, 4) * 4 (as vLLM's FA builder).
        size = 1 + -(-self.spec.max_num_seqs // 4) * 4 * 4
        self._fa3_metadata = torch.zeros(size, dtype=torch.int32, device=self.spec.device)

    def _prepare(self, plan: DecodePlan, seq_lens_cpu: torch.Tensor | None, use_cuda_graph: bool) -> None:
        from vllm.vllm_flash_attn import get_scheduler_metadata

        s = self.spec
        plan.fa3_num_splits = FA3_MAX_SPLITS_CUDA_GRAPH if use_cuda_graph else 0
        meta = get_scheduler_metadata(
            batch_size=plan.num_seqs, max_seqlen_q=1, max_seqlen_k=plan.max_seq_len, num_heads_q=s.num_heads,
            num_heads_kv=s.num_kv_heads, headdim=s.head_size, cache_seqlens=plan.seq_lens, qkv_dtype=FP8,
            cu_seqlens_q=plan.query_start_loc, page_size=self.block_size, causal=True,
            window_size=(s.window_left, 0) if s.window_left >= 0 else (-1, -1), has_softcap=s.soft_cap > 0,
            num_splits=plan.fa3_num_splits,
        )  # fmt: skip
        if use_cuda_graph:  # the captured kernel reads this buffer's address; zero the tail (as vLLM)
            n = meta.shape[0]
            self._fa3_metadata[:n].copy_(meta)
            self._fa3_metadata[n:].zero_()
            meta = self._fa3_metadata[:n]
        plan.fa3_scheduler_metadata = meta
        plan.fa3_schedule_for = (s.window_left, s.soft_cap > 0)


def _per_kv_head(scale: torch.Tensor) -> torch.Tensor:
    """``[1]`` or ``[num_kv_heads]`` -> ``[1, num_kv_heads or 1]`` (broadcasts over sequences)."""
    return scale.reshape(1, -1)


class FA3DecodeRunner(DecodeRunner):
    name = "fa3"

    def __init__(self, spec: DecodeSpec, *, flash_attn: Any = None) -> None:
        """``flash_attn``: vLLM's ``flash_attn_varlen_func`` unless given (CPU tests pass a stand-in)."""
        super().__init__(spec)
        # vLLM's fix of degenerate strides on size-1 dims (one KV head per rank): FA3's TMA
        # loads need 16-byte aligned strides. Metadata only, no copy.
        from vllm.utils.torch_utils import canonicalize_singleton_dim_strides

        if flash_attn is None:
            from vllm.vllm_flash_attn import flash_attn_varlen_func as flash_attn
        self._fa = flash_attn
        self._canonical = canonicalize_singleton_dim_strides
        self._q8 = torch.empty(spec.max_num_seqs, spec.num_heads, spec.head_size, dtype=FP8, device=spec.device)
        self._unit_q_scale = torch.ones(1, dtype=torch.float32, device=spec.device)
        self._window = [spec.window_left, 0] if spec.window_left >= 0 else None
        self._schedule_key = (spec.window_left, spec.soft_cap > 0)
        self._quant = None  # vLLM's static fp8 quant kernel (QuantFP8's CUDA path); PyTorch elsewhere
        if spec.device.type == "cuda":
            try:
                from vllm import _custom_ops as ops

                self._quant = ops.scaled_fp8_quant
            except Exception:  # noqa: BLE001 - a build without vLLM's C ops
                pass

    def quantize_query(self, query: torch.Tensor, q_scale: torch.Tensor) -> torch.Tensor:
        """fp8 query ``clamp(q / q_scale)`` into the preallocated buffer, as vLLM's QuantFP8."""
        n, hq, d = query.shape
        dst = self._q8[:n]
        src = query.reshape(n, hq * d)
        if self._quant is not None:
            group = (-1, -1) if q_scale.numel() == 1 else (-1, hq // q_scale.numel() * d)
            self._quant(src, q_scale, output=dst.view(n, hq * d), group_shape=group)
        else:
            scale = q_scale.reshape(1, -1, 1).float()
            dst.copy_((query.float().view(n, scale.shape[1], -1) / scale).clamp(-448.0, 448.0).view(n, hq, d))
        return dst

    def _run(self, query, cache, plan, out, q_scale):
        s = self.spec
        n = query.shape[0]
        q_scale = self._unit_q_scale if q_scale is None else q_scale.float()
        q8 = self.quantize_query(query, q_scale)
        kc = self._canonical(cache.key_cache)
        vc = self._canonical(cache.value_cache)
        k_scale, v_scale = cache.k_scale, cache.v_scale
        shape = (n, s.num_kv_heads)
        # The batch's schedule fits layers with the planner's window and soft cap; others (e.g.
        # alternating sliding-window layers) let FA3 schedule in-kernel, as vLLM does then.
        meta = plan.fa3_scheduler_metadata if plan.fa3_schedule_for == self._schedule_key else None
        self._fa(
            q=q8, k=kc, v=vc, out=out, cu_seqlens_q=plan.query_start_loc, max_seqlen_q=1, seqused_k=plan.seq_lens,
            max_seqlen_k=plan.max_seq_len, softmax_scale=s.scale, causal=True, window_size=self._window,
            block_table=plan.block_table, softcap=s.soft_cap, scheduler_metadata=meta,
            fa_version=3, q_descale=_per_kv_head(q_scale).expand(shape), k_descale=_per_kv_head(k_scale).expand(shape),
            v_descale=_per_kv_head(v_scale).expand(shape), num_splits=plan.fa3_num_splits,
        )  # fmt: skip
        return out
