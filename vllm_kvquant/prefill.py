"""Prefill attention of the kvquant backend: the path is chosen once per layer, a plan once per batch.

:class:`PrefillRunner` (one per attention layer) validates its options and picks its path at
construction, so :meth:`PrefillRunner.run` does no validation, no allocation of its own and no
host sync. :class:`PrefillPlan` (one per batch, built by the metadata builder) holds what every
layer's call needs. Paths (``runner.path``):

- ``fa3`` (mode ``bf16`` on Hopper with vLLM's FlashAttention-3). Requests with cached context,
  when the plan carries a :class:`ContextWorkspace` plan (eager batches whose sequences fit it):
  one Triton pass (``kernels.context_fill``) writes each request's whole sequence into a
  16-bit paged workspace (context dequantized, new tokens unquantized), and FA3 attends once
  over it (paged, causal, sliding window, soft cap): FA3's speed, bf16 queries. Otherwise
  (no context, CUDA-graph plans, sequences beyond the workspace): FA3's varlen kernel attends
  each prefill's new tokens to each other, writing ``out`` and its log-sum-exp; then the
  Triton kernel (``MODE_MERGE``) attends to the 8-bit cached context and merges the two by
  log-sum-exp in its epilogue, in place. Tiles that see no context exit at once, so pure
  prefills cost what FA3 costs.
- ``triton``: one Triton kernel; mode ``bf16``: ``MODE_FULL`` (context from the cache + the
  step's own K/V unquantized), where FA3 is missing (non-Hopper GPU, Triton interpreter);
  mode ``quantized``: ``MODE_QUANTIZED`` (everything from the cache, causal).
- ``reference``: PyTorch, on CPU without ``TRITON_INTERPRET=1`` (vLLM's CPU build).

Modes: ``bf16`` (default) attends to the step's own K/V unquantized: the most accurate, but a
prompt's first pass differs (slightly) from a later pass whose start comes from the 8-bit
prefix cache. ``quantized`` attends to exactly the values that later reads see, so a greedy
request gives the same answer whatever the prefix-cache and chunking state.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .errors import KVQuantConfigError
from .kernels.context_fill import fill_context, workspace_offsets
from .kernels.dtypes import SUPPORTED_HEAD_SIZES
from .kernels.paged_cache import PagedKVCache
from .kernels.prefill_attention import (
    MODE_FULL,
    MODE_MERGE,
    MODE_QUANTIZED,
    PrefillKernelConfig,
    _interpreting,
    launch_prefill,
    make_launcher,
)
from .kernels.reference import PREFILL_MODES, paged_prefill_attention_ref

logger = logging.getLogger("vllm.kvquant")

PATHS = ("fa3", "triton", "reference")


@dataclass
class ContextWorkspace:
    """16-bit pages that FA3 reads whole prefill sequences from: allocated once (the metadata
    builder sizes it at start-up), shared by every layer and batch."""

    key: torch.Tensor  # [num_pages, block_size, num_kv_heads, head_size]
    value: torch.Tensor

    @classmethod
    def allocate(
        cls, tokens: int, block_size: int, num_kv_heads: int, head_size: int, dtype: torch.dtype,
        device: torch.device | str,
    ) -> "ContextWorkspace":  # fmt: skip
        pages = max(1, -(-int(tokens) // block_size))
        shape = (pages, block_size, num_kv_heads, head_size)
        return cls(torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device))

    @property
    def num_pages(self) -> int:
        return self.key.shape[0]

    @property
    def block_size(self) -> int:
        return self.key.shape[1]

    @property
    def nbytes(self) -> int:
        return 2 * self.key.numel() * self.key.element_size()


def prefill_workspace_tokens(budget_mib: int, num_kv_heads: int, head_size: int, elem_bytes: int) -> int:
    """Tokens of K and V at ``elem_bytes`` that fit the prefill context workspace's MiB budget."""
    return max(0, budget_mib * 2**20 // (2 * num_kv_heads * head_size * elem_bytes))


#: Most workspace slabs of one step; a step that needs more keeps the merge path.
MAX_SLABS = 32


@dataclass
class ContextFillPlan:
    """One slab of a batch's prefill sequences in the workspace (built once per batch): requests
    ``req_lo .. req_hi`` of the plan, whose new tokens are the plan's rows ``row_lo .. row_hi``.
    A step whose sequences exceed the workspace runs several slabs one after another, each
    filling the workspace from its start and attending with one FA3 call."""

    workspace: ContextWorkspace
    offsets: torch.Tensor  # [num_reqs] int32: first workspace page of each request of the slab
    block_table: torch.Tensor  # [num_reqs, max_pages] int32: workspace pages, for FA3
    max_pages: int  # upper bound on any request's pages (host)
    max_seq_len: int  # upper bound on any request's sequence (host)
    req_lo: int = 0
    req_hi: int = 0
    row_lo: int = 0
    row_hi: int | None = None  # None: every row of the plan from row_lo on
    query_start_loc: torch.Tensor | None = None  # [num_reqs + 1] rows relative to row_lo (FA3); None: the plan's
    max_query_len: int | None = None  # host upper bound on the slab's new tokens per request; None: the plan's

    @classmethod
    def _slab(cls, workspace, seq_lens, seq_lens_cpu, pages_cpu, lo: int, hi: int) -> "ContextFillPlan":
        max_pages = int(pages_cpu[lo:hi].max())
        offsets = workspace_offsets(seq_lens[lo:hi], workspace.block_size)
        table = offsets[:, None] + torch.arange(max_pages, dtype=torch.int32, device=offsets.device)[None, :]
        return cls(workspace, offsets, table, max_pages, int(seq_lens_cpu[lo:hi].max()), lo, hi)

    @classmethod
    def slabs(
        cls, workspace: ContextWorkspace, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
        seq_lens_cpu: torch.Tensor, query_start_loc_cpu: torch.Tensor | None, max_slabs: int = MAX_SLABS,
    ) -> "tuple[ContextFillPlan, ...] | None":  # fmt: skip
        """The plan's requests in consecutive groups that each fit the workspace (by host upper
        bounds): one slab (the plan's own rows) when all fit. Several need the host's
        ``query_start_loc_cpu`` (relative to the plan's first row) to cut the rows; None (merge
        path) without it, when one request alone exceeds the workspace, or beyond ``max_slabs``."""
        bs, cap = workspace.block_size, workspace.num_pages
        pages_cpu = (seq_lens_cpu.to(torch.int64) + bs - 1) // bs
        if pages_cpu.numel() == 0:
            return None
        if int(pages_cpu.sum()) <= cap:
            return (cls._slab(workspace, seq_lens, seq_lens_cpu, pages_cpu, 0, pages_cpu.numel()),)
        pages = pages_cpu.tolist()
        if query_start_loc_cpu is None or max(pages) > cap:
            return None
        groups, lo, used = [], 0, 0
        for i, n in enumerate(pages):
            if used + n > cap:
                groups.append((lo, i))
                lo, used = i, 0
            used += n
        groups.append((lo, len(pages)))
        if len(groups) > max_slabs:
            return None
        rows = query_start_loc_cpu.tolist()
        out = []
        for lo, hi in groups:
            slab = cls._slab(workspace, seq_lens, seq_lens_cpu, pages_cpu, lo, hi)
            slab.row_lo, slab.row_hi = rows[lo], rows[hi]
            slab.query_start_loc = query_start_loc[lo : hi + 1] - rows[lo] if rows[lo] else query_start_loc[lo : hi + 1]
            slab.max_query_len = max(rows[i + 1] - rows[i] for i in range(lo, hi))
            out.append(slab)
        return tuple(out)


@dataclass
class PrefillPlan:
    """One batch's prefill launch data, shared by every layer (see :meth:`build`).

    ``query_start_loc`` indexes the rows ``[row_start:]`` of the tensors ``run()`` receives.
    """

    query_start_loc: torch.Tensor  # [num_reqs + 1] int32 (device)
    seq_lens: torch.Tensor  # [num_reqs] int32: cached context + new tokens
    block_table: torch.Tensor  # [num_reqs(+), max_blocks]
    num_reqs: int
    num_tokens: int  # upper bound on query_start_loc[-1]: sizes the launch grid
    max_query_len: int  # upper bound on any request's new tokens
    row_start: int = 0  # first row of query/key/value/out that the plan covers
    all_rows: bool = False  # graph-safe: every request of the batch; q_len <= 1 and empty ones skipped
    has_context: bool = True  # False: no request has cached context (the context pass is skipped)
    #: fa3 path: FA3 over a 16-bit copy of each sequence, one slab or several (see ContextFillPlan)
    context_fill: tuple[ContextFillPlan, ...] | None = None

    @classmethod
    def build(
        cls,
        query_start_loc: torch.Tensor,
        seq_lens: torch.Tensor,
        block_table: torch.Tensor,
        *,
        num_tokens: int,
        max_query_len: int,
        num_decodes: int = 0,
        num_decode_tokens: int = 0,
        all_rows: bool = False,
        has_context: bool = True,
        workspace: ContextWorkspace | None = None,
        seq_lens_cpu: torch.Tensor | None = None,
        from_cache_only: bool = False,
        query_start_loc_cpu: torch.Tensor | None = None,
    ) -> "PrefillPlan":
        """Build once per batch, for all layers (a few small device ops, more with workspace slabs; no host sync).

        Args:
            query_start_loc: ``[num_reqs + 1]`` int32 device, the whole batch's
                (``CommonAttentionMetadata.query_start_loc``; padded requests repeat the end).
            seq_lens: ``[num_reqs]`` int32 device, context + new tokens of each request.
            block_table: ``[num_reqs(+), max_blocks]`` device page ids.
            num_tokens: rows of the batch's query (``num_actual_tokens``; padded under graphs).
            max_query_len: an upper bound on the new tokens of any request the plan covers
                (exact is faster when not ``all_rows``; under CUDA graphs pass ``num_tokens``).
            num_decodes, num_decode_tokens: the leading requests / rows the decode kernel
                serves (batches are reordered decode-first); ignored with ``all_rows``.
            all_rows: cover every request (CUDA-graph safe: nothing depends on the batch's
                composition; requests with 0 or 1 new tokens are skipped on the device). The
                plan then covers all rows and the ``fa3`` path also writes decode rows: call
                the decode kernel after ``run()``.
            has_context: pass False only when no covered request has cached context (known on
                the host, e.g. from ``seq_lens_cpu_upper_bound``); never under CUDA graphs.
            workspace, seq_lens_cpu: the fa3 path's :class:`ContextWorkspace` and host upper
                bounds of the whole batch's ``seq_lens``; with both (and context, not
                ``all_rows``) the plan fills the workspace when the sequences fit it, else in
                slabs of requests that each fit it (:meth:`ContextFillPlan.slabs`).
            query_start_loc_cpu: the whole batch's ``query_start_loc`` on the host
                (``CommonAttentionMetadata.query_start_loc_cpu``): needed for slabs.
            from_cache_only: prefill mode ``quantized``: every sequence goes through the
                workspace, new tokens read back from the cache, also without cached context.
        """
        if all_rows or (num_decodes == 0 and num_decode_tokens == 0):
            plan = cls(
                query_start_loc=query_start_loc, seq_lens=seq_lens, block_table=block_table,
                num_reqs=query_start_loc.shape[0] - 1, num_tokens=num_tokens, max_query_len=max_query_len,
                all_rows=all_rows, has_context=has_context,
            )  # fmt: skip
        else:
            qsl = query_start_loc[num_decodes:]
            plan = cls(
                query_start_loc=qsl - num_decode_tokens if num_decode_tokens else qsl,
                seq_lens=seq_lens[num_decodes:],
                block_table=block_table[num_decodes:],
                num_reqs=qsl.shape[0] - 1,
                num_tokens=num_tokens - num_decode_tokens,
                max_query_len=max_query_len,
                row_start=num_decode_tokens,
                has_context=has_context,
            )
        if workspace is not None and seq_lens_cpu is not None and (has_context or from_cache_only) and not all_rows:
            n = plan.num_reqs
            host = seq_lens_cpu[num_decodes : num_decodes + n]
            rows = None
            if query_start_loc_cpu is not None:
                rows = query_start_loc_cpu[num_decodes : num_decodes + n + 1]
                rows = rows - rows[0]
            plan.context_fill = ContextFillPlan.slabs(workspace, plan.query_start_loc, plan.seq_lens[:n], host, rows)
        return plan

    @property
    def context_lens(self) -> torch.Tensor:
        """Cached tokens before this step, per request (computed on demand: reference path, tests)."""
        qsl = self.query_start_loc
        return self.seq_lens[: self.num_reqs] - (qsl[1:] - qsl[:-1])


def fa3_unavailable_reason(device: torch.device, head_size: int) -> str | None:
    """Why vLLM's FlashAttention-3 cannot serve the fresh-token part here (None: it can)."""
    if device.type != "cuda":
        return f"device {device} is not CUDA"
    major, minor = torch.cuda.get_device_capability(device)
    if major != 9:
        return f"FA3 needs compute capability 9.x (Hopper), this GPU is {major}.{minor}"
    if head_size % 8 or head_size > 256:
        return f"FA3 does not support head size {head_size}"
    try:
        from vllm.vllm_flash_attn.flash_attn_interface import fa_version_unsupported_reason, is_fa_version_supported
    except ImportError as e:  # CPU build, ROCm, or a vLLM without its flash-attention package
        return f"vllm.vllm_flash_attn is not importable ({e})"
    if not is_fa_version_supported(3):
        return fa_version_unsupported_reason(3) or "FA3 is not supported here"
    return None


def _flash_attn_varlen_func() -> Callable[..., Any]:
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func


def _error(msg: str) -> KVQuantConfigError:
    return KVQuantConfigError(f"kvquant prefill: {msg}")


class PrefillRunner:
    """Prefill attention of one layer; ``run()`` is the per-step call (see the module docstring)."""

    def __init__(
        self,
        *,
        num_heads: int,
        num_kv_heads: int,
        head_size: int,
        scale: float,
        sliding_window: int | None,
        logits_soft_cap: float | None,
        mode: str,
        device: torch.device | str,
        path: str | None = None,
    ) -> None:
        """``path`` forces one of :data:`PATHS` (benchmarks, tests); None picks the fastest that runs."""
        if mode not in PREFILL_MODES:
            raise _error(f"mode {mode!r} is not one of {list(PREFILL_MODES)}")
        if head_size not in SUPPORTED_HEAD_SIZES:
            raise _error(f"head size {head_size} is not one of {list(SUPPORTED_HEAD_SIZES)}")
        if num_kv_heads <= 0 or num_heads % num_kv_heads:
            raise _error(f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
        if sliding_window is not None and (not isinstance(sliding_window, int) or sliding_window < 0):
            raise _error(f"sliding_window must be an int >= 0 (0 or None = off), got {sliding_window!r}")
        if logits_soft_cap is not None and not logits_soft_cap >= 0:
            raise _error(f"logits_soft_cap must be >= 0 (0 or None = off), got {logits_soft_cap!r}")
        if path is not None and path not in PATHS:
            raise _error(f"path {path!r} is not one of {list(PATHS)}")
        self.num_heads, self.num_kv_heads, self.head_size = num_heads, num_kv_heads, head_size
        self.scale = float(scale)
        self.sliding_window = sliding_window or None
        self.logits_soft_cap = float(logits_soft_cap) if logits_soft_cap else None
        self.mode = mode
        self.device = torch.device(device)
        self.path, self.why_not_fa3 = self._choose_path(path)
        self._kernel_mode = MODE_QUANTIZED if mode == "quantized" else (MODE_MERGE if self.path == "fa3" else MODE_FULL)
        self._cfg_args = dict(
            num_heads=num_heads, num_kv_heads=num_kv_heads, head_size=head_size, softmax_scale=self.scale,
            sliding_window=self.sliding_window, logits_soft_cap=self.logits_soft_cap, device=self.device,
        )
        # Graph-safe tiling (BLOCK_M independent of the batch) and smaller tiles for short prompts.
        self._cfg_fixed = PrefillKernelConfig.make(**self._cfg_args, max_query_len=None)
        self._cfgs: dict[int, PrefillKernelConfig] = {}
        self._launcher = make_launcher(self.device)
        if self.path == "fa3":
            self._fa = _flash_attn_varlen_func()
            self._fa_window = None if self.sliding_window is None else [self.sliding_window - 1, 0]
            self._fa_softcap = self.logits_soft_cap or 0.0
        logger.debug("kvquant prefill: mode %s, path %s%s", mode, self.path,
                     f" (no FA3: {self.why_not_fa3})" if self.why_not_fa3 and mode == "bf16" else "")  # fmt: skip

    def _choose_path(self, forced: str | None) -> tuple[str, str | None]:
        cpu_reference = self.device.type == "cpu" and not _interpreting()
        why_not = fa3_unavailable_reason(self.device, self.head_size)
        if forced == "fa3" and why_not:
            raise _error(f"path 'fa3' is not available: {why_not}")
        if forced == "triton" and cpu_reference:
            raise _error("path 'triton' needs a CUDA device or TRITON_INTERPRET=1")
        if forced:
            return forced, why_not
        if cpu_reference:
            return "reference", why_not
        return ("fa3" if why_not is None else "triton"), why_not

    def _config(self, plan: PrefillPlan) -> PrefillKernelConfig:
        return self.kernel_config(None if plan.all_rows else plan.max_query_len)

    def kernel_config(self, max_query_len: int | None) -> PrefillKernelConfig:
        """The Triton kernel's tiling for a batch whose longest request has ``max_query_len`` new
        tokens (None: unknown, as in CUDA-graph plans); the start-up warm-up enumerates these."""
        # Mode quantized keeps one tile shape whatever the batch, so that a row's arithmetic (MMA
        # shape, reduction order) and hence its bits do not depend on the chunking either.
        if max_query_len is None or self.mode == "quantized":
            return self._cfg_fixed
        bucket = 1 << max(max_query_len - 1, 0).bit_length()
        cfg = self._cfgs.get(bucket)
        if cfg is None:
            cfg = self._cfgs[bucket] = PrefillKernelConfig.make(**self._cfg_args, max_query_len=bucket)
        return cfg

    def run(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        cache: PagedKVCache,
        plan: PrefillPlan,
        out: torch.Tensor,
    ) -> None:
        """Write the prefill rows of ``out`` (``[num_tokens, num_heads, head_size]``).

        ``query``/``key``/``value``/``out`` are the layer's whole tensors (rows from
        ``plan.row_start`` on are used); ``cache`` the layer's 8-bit cache (the views of
        ``compat.split_kv_cache``, any strides), already holding this step's K/V, and its scales
        (fp32 ``[1]``, ``[num_kv_heads]`` or ``[num_kv_heads, head_size]``). Mode ``quantized``
        never reads ``key``/``value``.
        """
        if plan.num_reqs == 0:
            return None
        s = plan.row_start
        if s:
            query, key, value, out = query[s:], key[s:], value[s:], out[s:]
        if self.path == "reference":
            return self._run_reference(query, key, value, cache, plan, out)
        lse = None
        if self.path == "fa3" and plan.context_fill is not None:
            return self._run_fa3_over_workspace(query, key, value, cache, plan, out)
        if self.path == "fa3" and self.mode == "bf16":
            _, lse = self._fa(
                q=query, k=key, v=value, out=out,
                cu_seqlens_q=plan.query_start_loc, cu_seqlens_k=plan.query_start_loc,
                max_seqlen_q=plan.max_query_len, max_seqlen_k=plan.max_query_len,
                softmax_scale=self.scale, causal=True, window_size=self._fa_window, softcap=self._fa_softcap,
                return_softmax_lse=True, fa_version=3, num_splits=1,
            )  # fmt: skip
            if not plan.has_context:
                return None
        launch_prefill(
            self._config(plan), self._kernel_mode, query, key, value, cache.key_cache, cache.value_cache, out,
            plan.block_table, plan.query_start_loc, plan.seq_lens, cache.k_scale, cache.v_scale, cache.is_int8,
            plan.num_tokens, plan.num_reqs, lens_are_seq=True, all_rows=plan.all_rows, lse=lse,
            launcher=self._launcher,
        )  # fmt: skip
        return None

    def _run_fa3_over_workspace(self, query, key, value, cache: PagedKVCache, plan: PrefillPlan, out) -> None:
        """Each request's whole sequence into the 16-bit workspace, then one paged FA3 call; slab
        after slab when the step's sequences exceed the workspace (same stream: a slab's fill
        starts after the previous slab's FA3 has read the workspace).

        Mode ``quantized`` reads the new tokens back from the cache too, and asks FA3 for one
        split: a row's arithmetic (key blocks from position 0, one reduction order) then does not
        depend on how the sequence was chunked or what else is in the batch."""
        quantized = self.mode == "quantized"
        extra = {"num_splits": 1} if quantized else {}
        for cf in plan.context_fill:
            ws = cf.workspace
            lo, hi = cf.req_lo, cf.req_hi
            seq_lens = plan.seq_lens[lo:hi]
            fill_context(
                key, value, cache, ws.key, ws.value, plan.block_table[lo:hi], plan.query_start_loc[lo : hi + 1],
                seq_lens, cf.offsets, hi - lo, cf.max_pages, from_cache_only=quantized,
            )  # fmt: skip
            rows = slice(cf.row_lo, cf.row_hi)
            self._fa(
                q=query[rows], k=ws.key, v=ws.value, out=out[rows],
                cu_seqlens_q=plan.query_start_loc if cf.query_start_loc is None else cf.query_start_loc,
                max_seqlen_q=plan.max_query_len if cf.max_query_len is None else cf.max_query_len,
                seqused_k=seq_lens, max_seqlen_k=cf.max_seq_len, block_table=cf.block_table,
                softmax_scale=self.scale, causal=True, window_size=self._fa_window, softcap=self._fa_softcap,
                fa_version=3, **extra,
            )  # fmt: skip
        return None

    def _run_reference(self, query, key, value, cache: PagedKVCache, plan, out) -> None:
        """PyTorch (vLLM's CPU build): slow but simple; writes the same rows as the kernels."""
        ref = paged_prefill_attention_ref(
            query, key, value, cache.key_cache, cache.value_cache, plan.block_table, plan.query_start_loc,
            plan.context_lens, cache.k_scale, cache.v_scale, cache.kv_dtype, self.scale, self.sliding_window,
            self.logits_soft_cap, mode=self.mode,
        )  # fmt: skip
        qsl = plan.query_start_loc.tolist()
        min_len = 2 if plan.all_rows else 1
        for i in range(plan.num_reqs):
            if qsl[i + 1] - qsl[i] >= min_len:
                out[qsl[i] : qsl[i + 1]] = ref[qsl[i] : qsl[i + 1]]
