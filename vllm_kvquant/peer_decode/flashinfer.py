"""``"kernel": "flashinfer"``: FlashInfer's paged decode on our fp8 cache.

``BatchDecodeWithPagedKVCacheWrapper`` (tensor cores, as vLLM 0.26's FlashInfer backend builds it)
with bf16/fp16 queries. Our K/V views are passed as ``kv_layout="HND"`` views ``[num_blocks,
num_kv_heads, block_size, head_size]``: FlashInfer reads every stride of a ``(k, v)`` tuple (they
must be equal, which views of one cache are), so nothing is copied. Per-tensor scales go in as
exact host floats given to the runner (FlashInfer's ``k_scale``/``v_scale``); per-KV-head and
per-channel scales are folded, K's into the query (``(q * s_k) . k``: one multiply into a
preallocated buffer, one extra rounding to the model dtype), V's into the output
(``(sum p v) * s_v``, in place), so the kernel reads the same bytes whatever the granularity. Per batch: the page table, then the wrapper's
``plan()`` on the host.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from ..decode_runner import DecodePlan, DecodePlanner, DecodeRunner, DecodeSpec, kernel_option
from ..errors import KVQuantConfigError

FP8 = torch.float8_e4m3fn
#: FlashInfer's decode head sizes (vLLM 0.26 FlashInferBackend.get_supported_head_sizes, <= 256).
FLASHINFER_HEAD_SIZES = (64, 128, 256)
#: FlashInfer float workspace (vLLM uses ~394 MiB for prefill and decode; decode needs less).
FLASHINFER_WORKSPACE_BYTES = 256 << 20


@functools.lru_cache(maxsize=None)
def flashinfer_missing() -> str | None:
    """Why FlashInfer cannot run in this process; None when it can."""
    try:
        import flashinfer  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"FlashInfer is not installed ({type(e).__name__}: {e}); pip install flashinfer-python==0.6.14"
    return None


def gpu_reasons(capability: tuple[int, int] | None, missing: str | None) -> list[str]:
    """What keeps FlashInfer off this CUDA GPU (empty: nothing)."""
    reasons = []
    if capability is not None and capability < (8, 0):
        reasons.append(f"FlashInfer needs sm_80 or newer and this GPU is sm_{capability[0]}{capability[1]}")
    if missing:
        reasons.append(missing)
    return reasons


def model_reasons(model_dtype: torch.dtype, head_size: int) -> list[str]:
    """What keeps FlashInfer off this model (empty: nothing)."""
    if head_size not in FLASHINFER_HEAD_SIZES:
        return [f"FlashInfer decodes head sizes {list(FLASHINFER_HEAD_SIZES)}, not {head_size}"]
    return []


def scale_reasons(per_channel: bool) -> list[str]:
    """Nothing keeps FlashInfer off any granularity: per-channel scales fold into query and output."""
    return []


def flashinfer_page_table(
    block_table: torch.Tensor, seq_lens_cpu: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FlashInfer's page table of a batch: ``indptr`` and ``last_page_len`` on the host (its
    ``plan()`` reads them there), ``indices`` (the used block-table entries, row by row) on the
    block table's device, gathered without a host synchronisation."""
    n = int(seq_lens_cpu.shape[0])
    lens = seq_lens_cpu.to(torch.int64)
    pages = (lens + block_size - 1) // block_size
    indptr = torch.zeros(n + 1, dtype=torch.int32)
    torch.cumsum(pages, 0, out=indptr[1:])
    last = (lens - (pages - 1).clamp(min=0) * block_size).to(torch.int32)  # 1..block_size, 0 if empty
    rows = torch.repeat_interleave(torch.arange(n), pages)
    cols = torch.arange(int(indptr[-1])) - torch.repeat_interleave(indptr[:-1].to(torch.int64), pages)
    dev = block_table.device
    indices = block_table[rows.to(dev, non_blocking=True), cols.to(dev, non_blocking=True)].to(torch.int32)
    return indptr, indices, last


class FlashInferDecodePlanner(DecodePlanner):
    """Page indptr / indices / last-page lengths, then the wrapper's ``plan()``; one wrapper per
    batch size under CUDA graphs (persistent buffers), one for eager batches."""

    kernel = "flashinfer"

    def __init__(self, spec: DecodeSpec, block_size: int, max_num_blocks_per_seq: int) -> None:
        super().__init__(spec, block_size, max_num_blocks_per_seq)
        self._fi_eager = None
        self._fi_graph: dict[int, Any] = {}

    def allocate(self, workspace: torch.Tensor | None = None) -> None:
        s = self.spec
        self._fi_workspace = torch.zeros(FLASHINFER_WORKSPACE_BYTES, dtype=torch.uint8, device=s.device)
        self._fi_indptr = torch.zeros(s.max_num_seqs + 1, dtype=torch.int32, device=s.device)
        self._fi_last_page_len = torch.zeros(s.max_num_seqs, dtype=torch.int32, device=s.device)
        self._fi_indices = torch.zeros(s.max_num_seqs * self.max_num_blocks_per_seq, dtype=torch.int32, device=s.device)

    def _prepare(self, plan: DecodePlan, seq_lens_cpu: torch.Tensor | None, use_cuda_graph: bool) -> None:
        if seq_lens_cpu is None:
            raise ValueError("kvquant flashinfer decode: DecodePlan.build needs seq_lens_cpu (FlashInfer plans on the host)")
        seq_lens_cpu = seq_lens_cpu[: plan.num_seqs]
        s, bs, n = self.spec, self.block_size, plan.num_seqs
        if n > s.max_num_seqs:
            raise ValueError(f"kvquant flashinfer decode: batch of {n} > max_num_seqs={s.max_num_seqs}")
        indptr, indices, last = flashinfer_page_table(plan.block_table, seq_lens_cpu, bs)
        wrapper = self._flashinfer_wrapper(n, use_cuda_graph)
        wrapper.plan(
            indptr, indices, last, s.num_heads, s.num_kv_heads, s.head_size, bs,
            pos_encoding_mode="NONE", window_left=s.window_left, logits_soft_cap=s.soft_cap or None,
            q_data_type=s.model_dtype, kv_data_type=FP8, o_data_type=s.model_dtype, sm_scale=s.scale,
        )  # fmt: skip
        plan.flashinfer_wrapper = wrapper

    def _flashinfer_wrapper(self, n: int, use_cuda_graph: bool):
        from flashinfer import BatchDecodeWithPagedKVCacheWrapper

        if not use_cuda_graph:
            if self._fi_eager is None:
                self._fi_eager = BatchDecodeWithPagedKVCacheWrapper(self._fi_workspace, "HND", use_tensor_cores=True)
            return self._fi_eager
        if n not in self._fi_graph:  # fixed batch size per captured graph, persistent buffers
            self._fi_graph[n] = BatchDecodeWithPagedKVCacheWrapper(
                self._fi_workspace, "HND", use_cuda_graph=True, use_tensor_cores=True,
                paged_kv_indptr_buffer=self._fi_indptr[: n + 1], paged_kv_indices_buffer=self._fi_indices,
                paged_kv_last_page_len_buffer=self._fi_last_page_len[:n],
            )  # fmt: skip
        return self._fi_graph[n]


class FlashInferDecodeRunner(DecodeRunner):
    name = "flashinfer"

    def __init__(self, spec: DecodeSpec, *, k_scale: Any = None, v_scale: Any = None) -> None:
        super().__init__(spec)
        self._q = torch.empty(spec.max_num_seqs, spec.num_heads, spec.head_size, dtype=spec.model_dtype, device=spec.device)
        self._checked: set[int] = set()
        # Per-tensor scales as host floats: FlashInfer multiplies its fp32 softmax scale by k_scale
        # (exact) and the output by v_scale. Per-KV-head and per-channel scales have no such slot:
        # they are folded into the query and the output (one extra rounding of q * k_scale to the
        # model dtype).
        self._host_scales: tuple[float, float] | None = None
        if not spec.per_head and k_scale is not None and v_scale is not None:
            self._host_scales = (float(k_scale), float(v_scale))

    def _check_plan(self, wrapper: Any) -> None:
        """The plan's scale, window and soft cap are this layer's (vLLM asserts the same)."""
        if id(wrapper) in self._checked:
            return
        s = self.spec
        planned = (wrapper._sm_scale, wrapper._window_left, wrapper._logits_soft_cap or 0.0)
        if planned != (s.scale, s.window_left, s.soft_cap):
            raise KVQuantConfigError(
                f"{kernel_option('flashinfer')}: every layer must share softmax scale, sliding window and soft cap "
                f"(the batch was planned with {planned}, this layer has {(s.scale, s.window_left, s.soft_cap)}); "
                "use 'triton'"
            )
        self._checked.add(id(wrapper))

    def _run(self, query, cache, plan, out, q_scale):
        s = self.spec
        wrapper = plan.flashinfer_wrapper
        self._check_plan(wrapper)
        kc = cache.key_cache.transpose(1, 2)  # HND views, no copy
        vc = cache.value_cache.transpose(1, 2)
        k_scale, v_scale = cache.k_scale, cache.v_scale
        if self._host_scales is not None:
            k_host, v_host = self._host_scales
            return wrapper.run(query, (kc, vc), k_scale=k_host, v_scale=v_host, out=out)
        n = query.shape[0]
        q = fold_k_scale(query, k_scale, self._q[:n], s.num_kv_heads)
        wrapper.run(q, (kc, vc), out=out)
        return unfold_v_scale_(out, v_scale, s.num_kv_heads)


def _by_kv_head(x: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """``[n, Hq, D]`` viewed as ``[n, Hkv, group, D]`` (query heads of one KV head are adjacent)."""
    n, hq, d = x.shape
    return x.view(n, num_kv_heads, hq // num_kv_heads, d)


def _scale_view(scale: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """A per-tensor ``[1]``, per-KV-head ``[Hkv]`` or per-channel ``[Hkv, D]`` scale as
    ``[1, 1 or Hkv, 1, 1 or D]``."""
    return scale.reshape(1, 1, 1, 1) if scale.numel() == 1 else scale.reshape(1, num_kv_heads, 1, -1)


def fold_k_scale(query: torch.Tensor, k_scale: torch.Tensor, out: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """``out = query * k_scale`` per KV head (and channel), rounded once to ``out``'s dtype: then
    ``out . k_stored`` is ``query . (k_stored * k_scale)`` for any per-head or per-channel scale."""
    torch.mul(_by_kv_head(query, num_kv_heads), _scale_view(k_scale, num_kv_heads), out=_by_kv_head(out, num_kv_heads))
    return out


def unfold_v_scale_(out: torch.Tensor, v_scale: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """``out *= v_scale`` per KV head (and channel), in place: ``(sum p v_stored) * s_v``."""
    _by_kv_head(out, num_kv_heads).mul_(_scale_view(v_scale, num_kv_heads))
    return out
