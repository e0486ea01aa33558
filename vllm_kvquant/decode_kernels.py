"""Decode attention of the kvquant backend: one kernel, chosen once at start-up.

``--additional-config '{"kvquant": {"kernel": "auto|triton|fa3|flashinfer"}}'``

- ``triton``: ours (``kernels/decode_attention.py``, through its lean launch path: a
  ``kernels.DecodePlan`` per batch, a ``DecodeLayer`` per layer and cache): fp8 and int8
  caches, bf16/fp16 queries, any GPU Triton runs on; on CPU the PyTorch reference (or the
  interpreter). The only kernel with a *varlen* plan (query rows from ``query_start_loc``,
  requests with more than one new token skipped), which full CUDA graphs over mixed batches need.
- ``fa3``: the FlashAttention-3 kernel inside vLLM (``vllm.vllm_flash_attn``, ``fa_version=3``)
  reading our fp8 cache views directly (FA3 needs only a contiguous last dimension). FA3's fp8
  path takes fp8 queries: the query is quantized the way vLLM's attention layer does it
  (static scale, 1.0 unless a q scale is given), which costs accuracy (see the GPU tests).
  Our per-tensor / per-KV-head K/V scales become its ``[num_seqs, num_kv_heads]`` descales as
  stride-0 ``expand`` views (no copy, no allocation). FA3 writes bf16 for fp8 inputs, so only
  bfloat16 models. Hopper (sm_90) only.
- ``flashinfer``: FlashInfer's paged decode (``BatchDecodeWithPagedKVCacheWrapper``, tensor
  cores, as vLLM 0.26's FlashInfer backend builds it) with bf16/fp16 queries on our fp8 cache.
  Our K/V views are passed as ``kv_layout="HND"`` views ``[num_blocks, num_kv_heads,
  block_size, head_size]``: FlashInfer reads every stride of a ``(k, v)`` tuple (they must be
  equal, which views of one cache are), so nothing is copied. Per-tensor scales go in as exact
  host floats given to :meth:`DecodeRunner.create` (FlashInfer's ``k_scale``/``v_scale``);
  per-KV-head scales are folded, K's into the query (one multiply into a preallocated buffer,
  one extra rounding to the model dtype), V's into the output (in place).
- ``auto`` (default): ``triton`` everywhere until the side-by-side measurements
  (``benchmarks/decode.py``) justify another rule per GPU and dtype. First H100 run
  (``benchmarks/results/decode-nvidia-h100-80gb-hbm3.json``, Llama-3-8B shapes): fa3 is
  0.75-0.93x triton's time (the fp8 query costs accuracy), flashinfer is triton's level.

Asking for a kernel that cannot run (not installed, int8 cache, head size, GPU, model dtype) is
a :class:`KVQuantConfigError` naming the option and the reason, raised by
:meth:`DecodeRunner.create` / :meth:`DecodePlanner.create` at start-up.

Per-batch work (FA3's scheduler metadata, FlashInfer's ``plan()``) happens once per batch in
:meth:`DecodePlan.build`, called by the metadata builder, never per layer.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .config import CONFIG_KEY, KERNEL_CHOICES
from .errors import KVQuantConfigError
from .kernels import decode_attention as _triton_decode
from .kernels.decode_config import device_num_sms
from .kernels.decode_plan import DecodeLayer
from .kernels.decode_plan import DecodePlan as TritonPlan
from .kernels.dtypes import KVQuantDType, as_storage

__all__ = ["DecodeEnv", "DecodePlan", "DecodePlanner", "DecodeRunner", "flashinfer_page_table", "resolve_kernel"]

FP8 = torch.float8_e4m3fn
#: FlashInfer's decode head sizes (vLLM 0.26 FlashInferBackend.get_supported_head_sizes, <= 256).
FLASHINFER_HEAD_SIZES = (64, 128, 256)
#: Splits FA3 may use per (sequence, KV head) under CUDA graphs (vLLM's
#: ``flash_attn_max_num_splits_for_cuda_graph`` default).
FA3_MAX_SPLITS_CUDA_GRAPH = 32
#: FlashInfer float workspace (vLLM uses ~394 MiB for prefill and decode; decode needs less).
FLASHINFER_WORKSPACE_BYTES = 256 << 20


def _option(kernel: Any) -> str:
    return f"additional_config['{CONFIG_KEY}']['kernel'] = {kernel!r}"


# --------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodeEnv:
    """What this process can run, probed once; tests build their own to check every refusal."""

    device_type: str
    capability: tuple[int, int] | None = None
    fa3_missing: str | None = "not probed"  # why vLLM's FA3 cannot run; None when it can
    flashinfer_missing: str | None = "not probed"

    @classmethod
    def probe(cls, device: torch.device | str) -> "DecodeEnv":
        device = torch.device(device)
        if device.type != "cuda":
            return cls(device.type, None, "no CUDA device", "no CUDA device")
        return cls("cuda", torch.cuda.get_device_capability(device), _fa3_missing(), _flashinfer_missing())


@functools.lru_cache(maxsize=None)
def _fa3_missing() -> str | None:
    try:
        from vllm.vllm_flash_attn.flash_attn_interface import FA3_AVAILABLE, FA3_UNAVAILABLE_REASON
    except Exception as e:  # noqa: BLE001 - any import failure is a reason to refuse
        return f"vllm.vllm_flash_attn cannot be imported ({type(e).__name__}: {e})"
    return None if FA3_AVAILABLE else f"vLLM's FA3 kernels are unavailable ({FA3_UNAVAILABLE_REASON})"


@functools.lru_cache(maxsize=None)
def _flashinfer_missing() -> str | None:
    try:
        import flashinfer  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"FlashInfer is not installed ({type(e).__name__}: {e}); pip install flashinfer-python==0.6.14"
    return None


def resolve_kernel(
    kernel: str, *, kv_dtype: KVQuantDType | str, model_dtype: torch.dtype, head_size: int, env: DecodeEnv
) -> str:
    """The kernel that will run (``auto`` resolved), or a start-up error saying why not."""
    if kernel not in KERNEL_CHOICES:
        raise KVQuantConfigError(f"{_option(kernel)} is not supported; use one of {list(KERNEL_CHOICES)}")
    kv_dtype = KVQuantDType(kv_dtype)
    if kernel in ("auto", "triton"):
        return "triton"  # auto: the only kernel for int8 and CPU, and no measured rule yet
    reasons = []
    name = "FA3" if kernel == "fa3" else "FlashInfer"
    if kv_dtype is not KVQuantDType.FP8_E4M3:
        reasons.append(f"{name} reads fp8_e4m3 caches only and this cache stores {kv_dtype.value} (int8 runs on 'triton')")
    if env.device_type != "cuda":
        reasons.append(f"{name} needs a CUDA GPU and this process runs on {env.device_type}")
    elif kernel == "fa3":
        if env.capability is None or env.capability[0] != 9:
            sm = f"sm_{env.capability[0]}{env.capability[1]}" if env.capability else "unknown"
            reasons.append(f"FA3 needs a Hopper GPU (sm_90) and this GPU is {sm}")
        if env.fa3_missing:
            reasons.append(env.fa3_missing)
    else:
        if env.capability is not None and env.capability < (8, 0):
            reasons.append(f"FlashInfer needs sm_80 or newer and this GPU is sm_{env.capability[0]}{env.capability[1]}")
        if env.flashinfer_missing:
            reasons.append(env.flashinfer_missing)
    if kernel == "fa3":
        if model_dtype != torch.bfloat16:
            reasons.append(f"FA3 writes bfloat16 output for fp8 inputs and the model runs in {model_dtype}")
        if head_size % 16 or head_size > 256:
            reasons.append(f"FA3 with fp8 needs a head size that is a multiple of 16 and <= 256, not {head_size}")
    elif head_size not in FLASHINFER_HEAD_SIZES:
        reasons.append(f"FlashInfer decodes head sizes {list(FLASHINFER_HEAD_SIZES)}, not {head_size}")
    if reasons:
        raise KVQuantConfigError(f"{_option(kernel)} cannot run: " + "; ".join(reasons) + ". Use 'triton' or 'auto'.")
    return kernel


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
    per_head: bool = False
    max_num_seqs: int = 256

    @property
    def window_left(self) -> int:
        """Tokens before the current one a query may see (-1: all), as FA3 and FlashInfer count."""
        return self.sliding_window - 1 if self.sliding_window and self.sliding_window > 0 else -1

    @property
    def soft_cap(self) -> float:
        return abs(float(self.logits_soft_cap)) if self.logits_soft_cap else 0.0


def _spec(kwargs: dict) -> DecodeSpec:
    kwargs = dict(kwargs)
    kwargs["kv_dtype"] = KVQuantDType(kwargs["kv_dtype"])
    kwargs["device"] = torch.device(kwargs["device"])
    return DecodeSpec(**kwargs)


# --------------------------------------------------------------------------------------------
# Per-batch plan
# --------------------------------------------------------------------------------------------


@dataclass
class DecodePlan:
    """What every layer's decode of one batch reads: built once per batch by the builder.

    ``max_seq_len`` is an upper bound of ``seq_lens`` (FA3 sizes its schedule with it).
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


class DecodePlanner:
    """The per-batch side of a kernel, owned by the metadata builder (one per KV-cache group).

    ``DecodePlanner.create(kernel, *, num_heads, num_kv_heads, head_size, block_size, scale,
    sliding_window, logits_soft_cap, kv_dtype, model_dtype, device, max_num_seqs,
    max_num_blocks_per_seq)``: every layer of the group must share these (FlashInfer's plan
    bakes in the scale, window and soft cap; :meth:`DecodeRunner.run` checks).
    """

    def __init__(self, kernel: str, spec: DecodeSpec, block_size: int, max_num_blocks_per_seq: int) -> None:
        self.kernel = kernel
        self.spec = spec
        self.block_size = block_size
        self.max_num_blocks_per_seq = max_num_blocks_per_seq
        self._workspace: torch.Tensor | None = None
        self._num_sms = 0
        self._fa3_metadata: torch.Tensor | None = None
        self._fi_workspace: torch.Tensor | None = None
        self._fi_eager = None
        self._fi_graph: dict[int, Any] = {}

    @classmethod
    def create(
        cls,
        kernel: str,
        *,
        num_heads: int,
        num_kv_heads: int,
        head_size: int,
        block_size: int,
        scale: float,
        sliding_window: int | None,
        logits_soft_cap: float | None,
        kv_dtype: KVQuantDType | str,
        model_dtype: torch.dtype,
        device: torch.device | str,
        max_num_seqs: int,
        max_num_blocks_per_seq: int,
        workspace: torch.Tensor | None = None,
        env: DecodeEnv | None = None,
    ) -> "DecodePlanner":
        """``workspace``: triton's split-KV fp32 workspace for up to ``max_num_seqs`` (allocated
        here when not given; one serves every layer and batch)."""
        s = _spec(dict(
            num_heads=num_heads, num_kv_heads=num_kv_heads, head_size=head_size, scale=float(scale),
            sliding_window=sliding_window, logits_soft_cap=logits_soft_cap, kv_dtype=kv_dtype,
            model_dtype=model_dtype, device=device, max_num_seqs=max_num_seqs,
        ))  # fmt: skip
        env = env or DecodeEnv.probe(s.device)
        name = resolve_kernel(kernel, kv_dtype=s.kv_dtype, model_dtype=s.model_dtype, head_size=s.head_size, env=env)
        planner = cls(name, s, int(block_size), int(max_num_blocks_per_seq))
        if name == "triton":
            cfg = _triton_decode.DEFAULT_CONFIG
            planner._num_sms = device_num_sms(s.device, cfg)
            planner._workspace = workspace if workspace is not None else _triton_decode.alloc_decode_workspace(
                s.max_num_seqs, s.num_heads, s.head_size, num_kv_heads=s.num_kv_heads, device=s.device, config=cfg
            )
        elif name == "fa3":
            # Largest FA3 scheduler metadata: 1 + round_up(batch, 4) * 4 (as vLLM's FA builder).
            size = 1 + -(-s.max_num_seqs // 4) * 4 * 4
            planner._fa3_metadata = torch.zeros(size, dtype=torch.int32, device=s.device)
        elif name == "flashinfer":
            planner._fi_workspace = torch.zeros(FLASHINFER_WORKSPACE_BYTES, dtype=torch.uint8, device=s.device)
            planner._fi_indptr = torch.zeros(s.max_num_seqs + 1, dtype=torch.int32, device=s.device)
            planner._fi_last_page_len = torch.zeros(s.max_num_seqs, dtype=torch.int32, device=s.device)
            planner._fi_indices = torch.zeros(s.max_num_seqs * planner.max_num_blocks_per_seq, dtype=torch.int32, device=s.device)
        return planner

    def prepare(self, plan: DecodePlan, *, seq_lens_cpu: torch.Tensor | None, use_cuda_graph: bool) -> None:
        if plan.varlen and self.kernel != "triton":
            raise ValueError(f"kvquant decode: a varlen plan (mixed-batch CUDA graphs) needs kernel 'triton', not '{self.kernel}'")
        if self.kernel == "triton":
            s = self.spec
            plan.triton = TritonPlan.build(
                plan.num_seqs, plan.block_table, plan.seq_lens, plan.query_start_loc if plan.varlen else None,
                num_q_heads=s.num_heads, num_kv_heads=s.num_kv_heads, head_size=s.head_size, workspace=self._workspace,
                config=_triton_decode.DEFAULT_CONFIG, num_sms=self._num_sms,
            )  # fmt: skip
        elif self.kernel == "fa3":
            self._prepare_fa3(plan, use_cuda_graph)
        elif self.kernel == "flashinfer":
            if seq_lens_cpu is None:
                raise ValueError("kvquant flashinfer decode: DecodePlan.build needs seq_lens_cpu (FlashInfer plans on the host)")
            self._prepare_flashinfer(plan, seq_lens_cpu[: plan.num_seqs], use_cuda_graph)

    # FA3: scheduler metadata once per batch (vLLM's "AOT schedule"), splits bounded under graphs.
    def _prepare_fa3(self, plan: DecodePlan, use_cuda_graph: bool) -> None:
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

    # FlashInfer: page indptr / indices / last-page lengths, then the wrapper's plan().
    def _prepare_flashinfer(self, plan: DecodePlan, seq_lens_cpu: torch.Tensor, use_cuda_graph: bool) -> None:
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


# --------------------------------------------------------------------------------------------
# Per-layer runners
# --------------------------------------------------------------------------------------------


class DecodeRunner:
    """One layer's decode kernel. ``run(query, key_cache, value_cache, k_scale, v_scale, plan, out)``.

    ``query``/``out``: ``[num_seqs, num_heads, head_size]``, row ``i`` for request ``i`` (any
    strides with a contiguous last dim); with a varlen plan the step's whole ``[num_tokens,
    ...]`` tensors. Caches: the K/V views of :func:`vllm_kvquant.compat.split_kv_cache`
    (uint8/fp8/int8 storage, any strides); scales: fp32 ``[1]`` or ``[num_kv_heads]``;
    ``q_scale`` (fa3 only): the static fp8 query scale (vLLM's ``layer._q_scale``; 1.0 if None).
    """

    name: ClassVar[str] = ""

    def __init__(self, spec: DecodeSpec) -> None:
        self.spec = spec

    @staticmethod
    def create(
        kernel: str,
        *,
        num_heads: int,
        num_kv_heads: int,
        head_size: int,
        scale: float,
        sliding_window: int | None,
        logits_soft_cap: float | None,
        kv_dtype: KVQuantDType | str,
        model_dtype: torch.dtype,
        device: torch.device | str,
        per_head: bool,
        max_num_seqs: int = 256,
        k_scale: torch.Tensor | float | None = None,
        v_scale: torch.Tensor | float | None = None,
        env: DecodeEnv | None = None,
    ) -> "DecodeRunner":
        """``k_scale``/``v_scale``: the layer's static per-tensor scales, read to the host once here
        (FlashInfer takes them as exact host scalars; without them it folds them into the query)."""
        s = _spec(dict(
            num_heads=num_heads, num_kv_heads=num_kv_heads, head_size=head_size, scale=float(scale),
            sliding_window=sliding_window, logits_soft_cap=logits_soft_cap, kv_dtype=kv_dtype,
            model_dtype=model_dtype, device=device, per_head=per_head, max_num_seqs=max_num_seqs,
        ))  # fmt: skip
        env = env or DecodeEnv.probe(s.device)
        name = resolve_kernel(kernel, kv_dtype=s.kv_dtype, model_dtype=s.model_dtype, head_size=s.head_size, env=env)
        if name == "flashinfer":
            return FlashInferDecodeRunner(s, k_scale=k_scale, v_scale=v_scale)
        return {"triton": TritonDecodeRunner, "fa3": FA3DecodeRunner}[name](s)

    def run(
        self,
        query: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        k_scale: torch.Tensor,
        v_scale: torch.Tensor,
        plan: DecodePlan,
        out: torch.Tensor,
        *,
        q_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if plan.kernel != self.name:
            raise ValueError(f"kvquant decode: a '{plan.kernel}' plan was built for the '{self.name}' kernel")
        return self._run(query, key_cache, value_cache, k_scale, v_scale, plan, out, q_scale)

    def _run(self, query, key_cache, value_cache, k_scale, v_scale, plan, out, q_scale) -> torch.Tensor:
        raise NotImplementedError


class TritonDecodeRunner(DecodeRunner):
    """Our kernel through its lean path: one ``DecodeLayer`` per cache (validated once, kept)."""

    name = "triton"

    def __init__(self, spec: DecodeSpec) -> None:
        super().__init__(spec)
        self._layers: dict[tuple, DecodeLayer] = {}
        self._last: tuple | None = None

    def _layer(self, query, key_cache, value_cache, k_scale, v_scale) -> DecodeLayer:
        last = self._last
        if last is not None and last[0] is key_cache and last[1] is value_cache and last[2] is k_scale \
                and last[3] is v_scale and last[4] is query.dtype:  # fmt: skip
            return last[5]
        key = (key_cache.data_ptr(), tuple(key_cache.shape), key_cache.stride(), value_cache.data_ptr(),
               value_cache.stride(), k_scale.data_ptr(), v_scale.data_ptr(), query.dtype)  # fmt: skip
        layer = self._layers.get(key)
        if layer is None:
            if len(self._layers) >= 64:  # a layer sees one cache; only benchmarks rotate through many
                self._layers.clear()
            s = self.spec
            layer = self._layers[key] = DecodeLayer(
                key_cache, value_cache, k_scale, v_scale, s.kv_dtype, num_q_heads=s.num_heads, act_dtype=query.dtype,
                softmax_scale=s.scale, sliding_window=s.sliding_window, logits_soft_cap=s.logits_soft_cap,
                config=_triton_decode.DEFAULT_CONFIG,
            )  # fmt: skip
        self._last = (key_cache, value_cache, k_scale, v_scale, query.dtype, layer)
        return layer

    def _run(self, query, key_cache, value_cache, k_scale, v_scale, plan, out, q_scale):
        # The one call into our Triton kernel (kernels/decode_plan.py: no validation, no allocation).
        return self._layer(query, key_cache, value_cache, k_scale, v_scale).run(query, out, plan.triton)


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

    def _run(self, query, key_cache, value_cache, k_scale, v_scale, plan, out, q_scale):
        s = self.spec
        n = query.shape[0]
        q_scale = self._unit_q_scale if q_scale is None else q_scale.float()
        q8 = self.quantize_query(query, q_scale)
        kc = self._canonical(as_storage(key_cache, s.kv_dtype))
        vc = self._canonical(as_storage(value_cache, s.kv_dtype))
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


class FlashInferDecodeRunner(DecodeRunner):
    name = "flashinfer"

    def __init__(self, spec: DecodeSpec, *, k_scale: Any = None, v_scale: Any = None) -> None:
        super().__init__(spec)
        self._q = torch.empty(spec.max_num_seqs, spec.num_heads, spec.head_size, dtype=spec.model_dtype, device=spec.device)
        self._checked: set[int] = set()
        # Per-tensor scales as host floats: FlashInfer multiplies its fp32 softmax scale by k_scale
        # (exact) and the output by v_scale. Per-KV-head scales have no such slot: they are folded
        # into the query and the output (one extra rounding of q * k_scale to the model dtype).
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
                f"{_option('flashinfer')}: every layer must share softmax scale, sliding window and soft cap "
                f"(the batch was planned with {planned}, this layer has {(s.scale, s.window_left, s.soft_cap)}); "
                "use 'triton'"
            )
        self._checked.add(id(wrapper))

    def _run(self, query, key_cache, value_cache, k_scale, v_scale, plan, out, q_scale):
        s = self.spec
        wrapper = plan.flashinfer_wrapper
        self._check_plan(wrapper)
        kc = as_storage(key_cache, s.kv_dtype).transpose(1, 2)  # HND views, no copy
        vc = as_storage(value_cache, s.kv_dtype).transpose(1, 2)
        if self._host_scales is not None:
            k_host, v_host = self._host_scales
            return wrapper.run(query, (kc, vc), k_scale=k_host, v_scale=v_host, out=out)
        n, g = query.shape[0], s.num_heads // s.num_kv_heads
        q = self._q[:n]
        # K scale folded into the query: one rounding of (q * k_scale) in fp32 to the model dtype.
        torch.mul(query.view(n, s.num_kv_heads, g, s.head_size), k_scale.reshape(1, -1, 1, 1),
                  out=q.view(n, s.num_kv_heads, g, s.head_size))  # fmt: skip
        wrapper.run(q, (kc, vc), out=out)
        out.view(n, s.num_kv_heads, g, s.head_size).mul_(v_scale.reshape(1, -1, 1, 1))
        return out
