"""The interface every decode kernel of the backend implements, ours and the peers alike.

A decode kernel has two sides, both made once at start-up for the kernel the ``kernel`` option
names (``peer_decode.choice``: ``create_planner`` / ``create_runner``, which also refuse a kernel
that cannot run):

- **per batch**, a :class:`DecodePlanner` (owned by the metadata builder, one per KV-cache group)
  fills a :class:`DecodePlan` once per batch in :meth:`DecodePlan.build`, never per layer: the
  batch's block table and lengths plus what its kernel precomputes (our Triton plan, FA3's
  scheduler metadata, FlashInfer's ``plan()``);
- **per layer**, a :class:`DecodeRunner` runs ``run(query, cache, plan, out, *, q_scale=None)`` on
  that plan, ``cache`` the layer's :class:`~vllm_kvquant.kernels.PagedKVCache` (K/V views, scales,
  format: made once per layer, the argument every launcher of the backend takes).

Both are built from one :class:`DecodeSpec` (the layer's constants). A kernel subclasses the two
classes, sets ``kernel`` / ``name`` and implements ``_prepare`` / ``_run``; nothing else of the
backend knows which kernel runs. Ours (:class:`TritonDecodePlanner`, :class:`TritonDecodeRunner`:
``kernels/decode_plan.py``'s lean launch path) is here; the peers (vLLM's FA3, FlashInfer) are in
``vllm_kvquant/peer_decode/``, one file each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .config import CONFIG_KEY
from .kernels import decode_attention as _triton_decode
from .kernels.decode_config import device_num_sms
from .kernels.decode_plan import DecodeLayer
from .kernels.decode_plan import DecodePlan as TritonPlan
from .kernels.dtypes import KVQuantDType
from .kernels.paged_cache import PagedKVCache

__all__ = ["DecodePlan", "DecodePlanner", "DecodeRunner", "DecodeSpec", "TritonDecodePlanner", "TritonDecodeRunner"]


def kernel_option(kernel: Any) -> str:
    """How errors name the option: ``additional_config['kvquant']['kernel'] = 'fa3'``."""
    return f"additional_config['{CONFIG_KEY}']['kernel'] = {kernel!r}"


@dataclass(frozen=True)
class DecodeSpec:
    """The constants of one attention layer's decode."""

    num_heads: int
    num_kv_heads: int
    head_size: int
    scale: float
    sliding_window: int | None
    logits_soft_cap: float | None
    kv_dtype: KVQuantDType
    model_dtype: torch.dtype
    device: torch.device
    per_head: bool = False  # scales per KV head or per channel (not one per layer)
    per_channel: bool = False  # scales per KV head and channel ([num_kv_heads, head_size])
    max_num_seqs: int = 256

    @classmethod
    def of(cls, **kwargs: Any) -> "DecodeSpec":
        """From keyword arguments as the factories take them (``kv_dtype``/``device`` as names too)."""
        kwargs["kv_dtype"] = KVQuantDType(kwargs["kv_dtype"])
        kwargs["device"] = torch.device(kwargs["device"])
        kwargs["scale"] = float(kwargs["scale"])
        return cls(**kwargs)

    @property
    def window_left(self) -> int:
        """Tokens before the current one a query may see (-1: all), as FA3 and FlashInfer count."""
        return self.sliding_window - 1 if self.sliding_window and self.sliding_window > 0 else -1

    @property
    def soft_cap(self) -> float:
        return abs(float(self.logits_soft_cap)) if self.logits_soft_cap else 0.0


# --------------------------------------------------------------------------------------------
# Per batch
# --------------------------------------------------------------------------------------------


@dataclass
class DecodePlan:
    """What every layer's decode of one batch reads: built once per batch by the builder.

    ``max_seq_len`` is an upper bound of ``seq_lens`` (FA3 sizes its schedule with it). The
    kernel-specific fields are filled by that kernel's planner only.
    """

    kernel: str
    num_seqs: int
    block_table: torch.Tensor  # [num_seqs, max_blocks] int32
    seq_lens: torch.Tensor  # [num_seqs] int32
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    max_seq_len: int
    varlen: bool = False
    triton: TritonPlan | None = None
    fa3_scheduler_metadata: torch.Tensor | None = None
    fa3_schedule_for: tuple[int, bool] | None = None  # (window_left, has soft cap) it was made for
    fa3_num_splits: int = 0
    flashinfer_wrapper: Any = None

    @classmethod
    def build(
        cls,
        block_table: torch.Tensor,
        seq_lens: torch.Tensor,
        query_start_loc: torch.Tensor,
        max_seq_len: int,
        *,
        planner: "DecodePlanner",
        seq_lens_cpu: torch.Tensor | None = None,
        use_cuda_graph: bool = False,
        varlen: bool = False,
    ) -> "DecodePlan":
        """The plan of the first ``seq_lens.shape[0]`` requests, done by the builder's planner.

        Default: one query token each, request ``i`` is query row ``i``. ``varlen`` (triton
        only): query rows from ``query_start_loc``, requests whose query length is not 1 are
        skipped on the device (a full CUDA graph replayed over any decode/prefill mix).
        ``seq_lens_cpu`` is required by FlashInfer, whose ``plan()`` runs on the host.
        ``use_cuda_graph``: the batch runs inside a captured CUDA graph, so per-batch data goes
        into the planner's persistent buffers.
        """
        n = int(seq_lens.shape[0])
        plan = cls(
            kernel=planner.kernel,
            num_seqs=n,
            block_table=block_table[:n],
            seq_lens=seq_lens,
            query_start_loc=query_start_loc[: n + 1],
            max_seq_len=int(max_seq_len),
            varlen=varlen,
        )
        planner.prepare(plan, seq_lens_cpu=seq_lens_cpu, use_cuda_graph=use_cuda_graph)
        return plan


class DecodePlanner:
    """The per-batch side of a kernel, owned by the metadata builder (one per KV-cache group).

    Every layer of the group must share the spec (FlashInfer's plan bakes in the scale, window
    and soft cap; its runner checks). ``__init__`` allocates nothing; :meth:`allocate` makes the
    persistent buffers (the factory calls it).
    """

    kernel: ClassVar[str] = ""

    def __init__(self, spec: DecodeSpec, block_size: int, max_num_blocks_per_seq: int) -> None:
        self.spec = spec
        self.block_size = int(block_size)
        self.max_num_blocks_per_seq = int(max_num_blocks_per_seq)

    def allocate(self, workspace: torch.Tensor | None = None) -> None:
        """Persistent buffers for up to ``spec.max_num_seqs`` requests (none by default)."""

    def prepare(self, plan: DecodePlan, *, seq_lens_cpu: torch.Tensor | None, use_cuda_graph: bool) -> None:
        if plan.varlen and self.kernel != "triton":
            raise ValueError(f"kvquant decode: a varlen plan (mixed-batch CUDA graphs) needs kernel 'triton', not '{self.kernel}'")
        self._prepare(plan, seq_lens_cpu, use_cuda_graph)

    def _prepare(self, plan: DecodePlan, seq_lens_cpu: torch.Tensor | None, use_cuda_graph: bool) -> None:
        raise NotImplementedError


# --------------------------------------------------------------------------------------------
# Per layer
# --------------------------------------------------------------------------------------------


class DecodeRunner:
    """One layer's decode kernel. ``run(query, cache, plan, out)``.

    ``query``/``out``: ``[num_seqs, num_heads, head_size]``, row ``i`` for request ``i`` (any
    strides with a contiguous last dim); with a varlen plan the step's whole ``[num_tokens,
    ...]`` tensors. ``cache``: a :class:`PagedKVCache` over the K/V views of
    :func:`vllm_kvquant.compat.split_kv_cache` (any strides) and the layer's scales (fp32 ``[1]``,
    ``[num_kv_heads]`` or ``[num_kv_heads, head_size]``); ``q_scale`` (fa3 only): the static fp8
    query scale (vLLM's ``layer._q_scale``; 1.0 if None).
    """

    name: ClassVar[str] = ""

    def __init__(self, spec: DecodeSpec) -> None:
        self.spec = spec

    def run(
        self,
        query: torch.Tensor,
        cache: PagedKVCache,
        plan: DecodePlan,
        out: torch.Tensor,
        *,
        q_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if plan.kernel != self.name:
            raise ValueError(f"kvquant decode: a '{plan.kernel}' plan was built for the '{self.name}' kernel")
        if cache.kv_dtype is not self.spec.kv_dtype:
            raise ValueError(f"kvquant decode: a {cache.kv_dtype.value} cache given to a {self.spec.kv_dtype.value} runner")
        return self._run(query, cache, plan, out, q_scale)

    def _run(self, query: torch.Tensor, cache: PagedKVCache, plan: DecodePlan, out: torch.Tensor,
             q_scale: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
        raise NotImplementedError


# --------------------------------------------------------------------------------------------
# Ours: the Triton kernel of kernels/
# --------------------------------------------------------------------------------------------


class TritonDecodePlanner(DecodePlanner):
    """Our kernel's per-batch plan (``kernels.DecodePlan``) over one split-KV workspace."""

    kernel = "triton"

    def allocate(self, workspace: torch.Tensor | None = None) -> None:
        """``workspace``: the split-KV fp32 workspace for up to ``max_num_seqs`` (allocated here when
        not given; one serves every layer and batch)."""
        s, cfg = self.spec, _triton_decode.DEFAULT_CONFIG
        self._num_sms = device_num_sms(s.device, cfg)
        self._workspace = workspace if workspace is not None else _triton_decode.alloc_decode_workspace(
            s.max_num_seqs, s.num_heads, s.head_size, num_kv_heads=s.num_kv_heads, device=s.device, config=cfg
        )

    def _prepare(self, plan: DecodePlan, seq_lens_cpu: torch.Tensor | None, use_cuda_graph: bool) -> None:
        s = self.spec
        plan.triton = TritonPlan.build(
            plan.num_seqs, plan.block_table, plan.seq_lens, plan.query_start_loc if plan.varlen else None,
            num_q_heads=s.num_heads, num_kv_heads=s.num_kv_heads, head_size=s.head_size, workspace=self._workspace,
            config=_triton_decode.DEFAULT_CONFIG, num_sms=self._num_sms,
        )  # fmt: skip


class TritonDecodeRunner(DecodeRunner):
    """Our kernel through its lean path: one ``DecodeLayer`` per cache (validated once, kept)."""

    name = "triton"

    def __init__(self, spec: DecodeSpec) -> None:
        super().__init__(spec)
        self._layers: dict[tuple, DecodeLayer] = {}
        self._last: tuple | None = None

    def _layer(self, query: torch.Tensor, cache: PagedKVCache) -> DecodeLayer:
        last = self._last
        if last is not None and last[0] is cache and last[1] is query.dtype:
            return last[2]
        kc, vc = cache.key_cache, cache.value_cache
        key = (kc.data_ptr(), tuple(kc.shape), kc.stride(), vc.data_ptr(), vc.stride(), cache.k_scale.data_ptr(),
               cache.v_scale.data_ptr(), cache.kv_dtype, query.dtype)  # fmt: skip
        layer = self._layers.get(key)
        if layer is None:
            if len(self._layers) >= 64:  # a layer sees one cache; only benchmarks rotate through many
                self._layers.clear()
            s = self.spec
            layer = self._layers[key] = DecodeLayer(
                cache, num_q_heads=s.num_heads, act_dtype=query.dtype, softmax_scale=s.scale,
                sliding_window=s.sliding_window, logits_soft_cap=s.logits_soft_cap, config=_triton_decode.DEFAULT_CONFIG,
            )  # fmt: skip
        self._last = (cache, query.dtype, layer)
        return layer

    def _run(self, query, cache, plan, out, q_scale):
        # The one call into our Triton kernel (kernels/decode_plan.py: no validation, no allocation).
        return self._layer(query, cache).run(query, out, plan.triton)
