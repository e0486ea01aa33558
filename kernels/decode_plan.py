"""The lean launch path of paged decode attention: a per-batch plan and a per-layer launcher.

Why: the backend calls decode attention once per layer per step with the same batch, caches
and options. :class:`DecodePlan` does the per-batch work once (split count, grid, workspace
views, argument tuples); :class:`DecodeLayer` validates one layer's caches, scales and options
once; :meth:`DecodeLayer.run` then only assembles the per-call arguments (query and output
pointers and strides) and launches through :class:`.launch.FastKernel`: no validation, no
allocation, no host synchronisation, no Python loop over requests.

Plans come in two kinds: ``query_start_loc=None`` (request ``i`` is query row ``i``, the public
API) and *varlen* (rows from ``query_start_loc``; requests whose query length is not 1 are
skipped in-kernel), which is what the backend uses, with a grid over the batch's decodes
(eager) or over every padded request (CUDA-graph capture, any decode/prefill mix on replay).
"""

from __future__ import annotations

import math
import os

import torch

from .decode_config import (
    DEFAULT_CONFIG,
    MAX_HEAD_SIZE,
    DecodeKernelConfig,
    choose_num_splits,
    device_num_sms,
    next_pow2,
    workspace_numel,
)
from .decode_triton import HAVE_TRITON, decode_reduce_kernel, decode_split_kernel
from .dtypes import SUPPORTED_ACT_DTYPES, check_paged_caches
from .launch import FastKernel
from .paged_cache import PagedKVCache
from .reference import paged_decode_attention_ref
from .scales_layout import flat_scale

if HAVE_TRITON:
    import triton.language as tl

__all__ = ["DecodePlan", "DecodeLayer", "uses_reference", "split_kernel_constants"]


def uses_reference(device: torch.device) -> bool:
    """PyTorch reference instead of Triton: no Triton, or CPU tensors outside the interpreter."""
    return not HAVE_TRITON or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1")


_PLAN_KEYS: dict[tuple, int] = {}


def split_kernel_constants(
    cfg: DecodeKernelConfig, *, head_size: int, num_q_heads: int, num_kv_heads: int, block_size: int, kv_dtype: str,
    act_dtype: torch.dtype, k_gran: int, v_gran: int, use_window: bool, use_softcap: bool, device_type: str,
) -> tuple:  # fmt: skip
    """The split kernel's layer constexprs, in its signature's order (HEAD_SIZE .. PAGE_MASKS).

    Shared by :class:`DecodeLayer` and the ahead-of-time compile report
    (``benchmarks/kernels/decode_sass.py``), so that both compile the same variant."""
    block_n = cfg.tile_tokens(head_size)
    group = num_q_heads // num_kv_heads
    dot_dtype = tl.float16 if (cfg.dot_in_fp16 or act_dtype == torch.float16) else tl.bfloat16
    if dot_dtype == tl.bfloat16 and device_type == "cpu":
        dot_dtype = tl.float32  # the Triton interpreter (numpy) mis-computes bf16 casts and dots
    q_rescale = dot_dtype == tl.float16 and act_dtype == torch.bfloat16
    asm_dequant = device_type == "cuda" and dot_dtype == tl.float16 and cfg.uses_asm(kv_dtype)  # not interpreted
    return (
        head_size, max(16, next_pow2(head_size)), group, max(16, next_pow2(group)), block_size, block_n,
        cfg.min_tiles_per_split(head_size), cfg.long_tiles_per_split(head_size, kv_dtype), k_gran, v_gran, use_window,
        use_softcap, dot_dtype, asm_dequant, q_rescale, cfg.page_masks,
    )  # fmt: skip


def _align(*tensors: torch.Tensor) -> tuple[int, ...]:
    """Pointer alignment classes (Triton specializes on 16-byte alignment)."""
    return tuple(t.data_ptr() & 15 for t in tensors)


class DecodePlan:
    """Launch parameters of one batch, shared by every layer (build once per batch)."""

    __slots__ = (
        "num_seqs", "num_q_heads", "num_kv_heads", "head_size", "num_splits", "fill_splits", "split", "varlen", "grid",
        "reduce_grid", "splits_pad", "block_table", "seq_lens", "query_start_loc", "part_o", "part_lse",
        "key", "split_args", "split_ptrs", "reduce_args", "reduce_ptrs",
    )  # fmt: skip

    @classmethod
    def build(
        cls,
        num_seqs: int,
        block_table: torch.Tensor,
        seq_lens: torch.Tensor,
        query_start_loc: torch.Tensor | None = None,
        *,
        num_q_heads: int,
        num_kv_heads: int,
        head_size: int,
        workspace: torch.Tensor | None = None,
        max_num_splits: int | None = None,
        config: DecodeKernelConfig | None = None,
        num_sms: int | None = None,
    ) -> "DecodePlan":
        """``num_seqs`` programs along the grid's first axis; request ``i`` uses row ``i`` of
        ``block_table``/``seq_lens`` (and ``query_start_loc[i:i+2]`` when given).

        ``workspace``: contiguous fp32 buffer of at least ``decode_workspace_shape`` elements,
        used only when the launch splits (allocated here when missing).
        """
        cfg = config or DEFAULT_CONFIG
        self = cls()
        device = seq_lens.device
        if num_sms is None:
            num_sms = device_num_sms(device, cfg)
        self.num_seqs = int(num_seqs)
        self.num_q_heads, self.num_kv_heads, self.head_size = num_q_heads, num_kv_heads, head_size
        self.num_splits = choose_num_splits(self.num_seqs, num_kv_heads, head_size, num_sms, max_num_splits, config=cfg)
        self.fill_splits = cfg.fill_splits(self.num_seqs, num_kv_heads, num_sms)  # read when LONG_TILES > 0
        self.split = self.num_splits > 1
        self.varlen = query_start_loc is not None
        self.grid = (self.num_seqs, num_kv_heads, self.num_splits)
        self.reduce_grid = (self.num_seqs, num_q_heads, 1)
        self.splits_pad = max(2, next_pow2(self.num_splits))
        self.block_table, self.seq_lens, self.query_start_loc = block_table, seq_lens, query_start_loc
        qsl = query_start_loc if self.varlen else seq_lens  # placeholder: dead code without VARLEN
        if self.split:
            need = workspace_numel(self.num_seqs, num_q_heads, head_size, self.num_splits)
            if workspace is None:
                workspace = torch.empty((need,), dtype=torch.float32, device=device)
            elif workspace.dtype != torch.float32 or not workspace.is_contiguous() or workspace.numel() < need:
                raise ValueError(
                    f"workspace must be a contiguous fp32 tensor with >= {need} elements "
                    f"(got {workspace.dtype}, {workspace.numel()}); see decode_workspace_shape()"
                )
            n_o = self.num_seqs * num_q_heads * self.num_splits * head_size
            flat = workspace.view(-1)
            self.part_o = flat[:n_o].view(self.num_seqs, num_q_heads, self.num_splits, head_size)
            self.part_lse = flat[n_o : n_o + self.num_seqs * num_q_heads * self.num_splits].view(
                self.num_seqs, num_q_heads, self.num_splits
            )
            po_strides = self.part_o.stride()[:3]
            pl_strides = self.part_lse.stride()[:2]
            part_o, part_lse = self.part_o, self.part_lse
        else:
            self.part_o = self.part_lse = None
            po_strides, pl_strides = (0, 0, 0), (0, 0)
            part_o = part_lse = seq_lens  # placeholders: dead code without SPLIT
        tensors = (block_table, seq_lens, qsl, part_o, part_lse)
        splits = (self.num_splits, self.fill_splits)
        self.split_args = (*tensors, *splits, *block_table.stride(), *po_strides, *pl_strides)
        self.split_ptrs = (*(t.data_ptr() for t in tensors), *self.split_args[5:])
        self.reduce_args = (seq_lens, qsl, part_o, part_lse, *splits, *po_strides, *pl_strides)
        self.reduce_ptrs = (*(t.data_ptr() for t in self.reduce_args[:4]), *self.reduce_args[4:])
        # Everything of the plan Triton specializes on (dtypes, alignments, exact integers, flags),
        # as a small int: per-call keys hash it, not the tuple.
        key = (self.varlen, self.split, tuple(t.dtype for t in tensors), _align(*tensors), self.split_args[5:])
        self.key = _PLAN_KEYS.setdefault(key, len(_PLAN_KEYS))
        return self


class DecodeLayer:
    """One attention layer's decode launcher: caches, scales and options validated once."""

    def __init__(
        self,
        cache: PagedKVCache,
        *,
        num_q_heads: int,
        act_dtype: torch.dtype,
        softmax_scale: float | None = None,
        sliding_window: int | None = None,
        logits_soft_cap: float | None = None,
        config: DecodeKernelConfig | None = None,
    ) -> None:
        self.cache = cache
        self.kv_dtype = cache.kv_dtype
        block_size, num_kv_heads, head_size = check_paged_caches(cache.key_cache, cache.value_cache)
        if not (16 <= head_size <= MAX_HEAD_SIZE) or head_size % 8 != 0:
            raise ValueError(f"head size {head_size} unsupported; need a multiple of 8 in [16, {MAX_HEAD_SIZE}]")
        if num_kv_heads == 0 or num_q_heads % num_kv_heads != 0:
            raise ValueError(f"num_q_heads={num_q_heads} is not a multiple of num_kv_heads={num_kv_heads}")
        if act_dtype not in SUPPORTED_ACT_DTYPES:
            raise ValueError(f"query dtype {act_dtype} unsupported; expected one of {SUPPORTED_ACT_DTYPES}")
        if sliding_window is not None and not isinstance(sliding_window, int):
            raise ValueError(f"sliding_window must be an int (tokens) or None, got {sliding_window!r}")
        self.device = device = cache.device
        self.k_scale, k_gran = flat_scale(cache.k_scale, "k_scale", num_kv_heads, head_size)
        self.v_scale, v_gran = flat_scale(cache.v_scale, "v_scale", num_kv_heads, head_size)
        cfg = config or DEFAULT_CONFIG
        block_n = cfg.tile_tokens(head_size)  # validates the tile (also for the reference path)

        self.num_q_heads, self.num_kv_heads, self.head_size = num_q_heads, num_kv_heads, head_size
        self.act_dtype = act_dtype
        self.softmax_scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(head_size)
        self.window = sliding_window if sliding_window and sliding_window > 0 else 0  # <= 0: no window
        self.cap = abs(float(logits_soft_cap)) if logits_soft_cap else 0.0  # cap*tanh(x/cap) is even in cap
        self.key_cache, self.value_cache = cache.key_cache, cache.value_cache
        self.reference = uses_reference(device)
        if self.reference:
            return

        min_tiles = cfg.min_tiles_per_split(head_size)
        head_pad = max(16, next_pow2(head_size))
        use_window = self.window > 0
        self.split_options = cfg.split_launch_options(self.kv_dtype.value, head_size)
        self.reduce_options = dict(num_warps=cfg.reduce_num_warps)
        kc, vc, ks, vs = self.key_cache, self.value_cache, self.k_scale, self.v_scale
        scalars = (self.softmax_scale, self.cap, self.window, *kc.stride(), *vc.stride())
        self._split_args = (kc, vc, ks, vs, *scalars)
        self._split_ptrs = (kc.data_ptr(), vc.data_ptr(), ks.data_ptr(), vs.data_ptr(), *scalars)
        self._split_const = split_kernel_constants(
            cfg, head_size=head_size, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, block_size=block_size,
            kv_dtype=self.kv_dtype.value, act_dtype=act_dtype, k_gran=k_gran, v_gran=v_gran, use_window=use_window,
            use_softcap=self.cap > 0.0, device_type=device.type,
        )  # fmt: skip
        long_tiles = cfg.long_tiles_per_split(head_size, self.kv_dtype.value)
        self._reduce_const = (head_size, head_pad, block_n, min_tiles, long_tiles, use_window)
        self._split = FastKernel(decode_split_kernel, device)
        self._reduce = FastKernel(decode_reduce_kernel, device)
        self._plan: DecodePlan | None = None

    def _bind(self, plan: DecodePlan) -> None:
        """Argument tails for ``plan`` (once per batch, not per call)."""
        if plan.num_q_heads != self.num_q_heads or plan.num_kv_heads != self.num_kv_heads or plan.head_size != self.head_size:
            raise ValueError(
                f"decode plan for {plan.num_q_heads}/{plan.num_kv_heads} heads of size {plan.head_size} used with a "
                f"layer of {self.num_q_heads}/{self.num_kv_heads} heads of size {self.head_size}"
            )
        plan_const = (plan.split, plan.varlen)
        self._split_tail = (*self._split_args, *plan.split_args, *self._split_const, *plan_const)
        self._split_tail_ptrs = (*self._split_ptrs, *plan.split_ptrs, *self._split_const, *plan_const)
        reduce_const = (plan.splits_pad, plan.varlen)
        self._reduce_tail = (self.window, *plan.reduce_args, *self._reduce_const, *reduce_const)
        self._reduce_tail_ptrs = (self.window, *plan.reduce_ptrs, *self._reduce_const, *reduce_const)
        self._plan = plan

    def run(self, query: torch.Tensor, out: torch.Tensor, plan: DecodePlan) -> torch.Tensor:
        """Decode attention of the plan's requests; ``query``/``out`` ``[rows, Hq, D]``, any strides."""
        if plan.num_seqs == 0:
            return out
        if self.reference:
            return self._run_reference(query, out, plan)
        if plan is not self._plan:
            self._bind(plan)
        q_ptr, o_ptr = query.data_ptr(), out.data_ptr()
        qs, os_ = query.stride(), out.stride()
        key = (plan.key, query.dtype, out.dtype, qs, os_, q_ptr & 15, o_ptr & 15)
        split_tail, split_tail_ptrs = self._split_tail, self._split_tail_ptrs

        def split_args(direct: bool) -> tuple:
            if direct:
                return (q_ptr, o_ptr, *qs, *os_, *split_tail_ptrs)
            return (query, out, *qs, *os_, *split_tail)

        self._split.launch(key, plan.grid, split_args, **self.split_options)
        if plan.split:
            reduce_tail, reduce_tail_ptrs = self._reduce_tail, self._reduce_tail_ptrs

            def reduce_args(direct: bool) -> tuple:
                return (o_ptr, *os_, *reduce_tail_ptrs) if direct else (out, *os_, *reduce_tail)

            self._reduce.launch(key, plan.reduce_grid, reduce_args, **self.reduce_options)
        return out

    def _run_reference(self, query: torch.Tensor, out: torch.Tensor, plan: DecodePlan) -> torch.Tensor:
        n = plan.num_seqs
        if plan.varlen:  # host loop over requests: the CPU reference path only
            qsl = plan.query_start_loc[: n + 1].tolist()
            reqs = [i for i in range(n) if qsl[i + 1] - qsl[i] == 1]
            if not reqs:
                return out
            idx = torch.tensor(reqs, device=query.device)
            rows = torch.tensor([qsl[i] for i in reqs], device=query.device)
            q, bt, sl = query[rows], plan.block_table[idx], plan.seq_lens[idx]
        else:
            rows, q, bt, sl = None, query[:n], plan.block_table[:n], plan.seq_lens[:n]
        ref = paged_decode_attention_ref(
            q, self.key_cache, self.value_cache, bt, sl, self.k_scale, self.v_scale, self.kv_dtype,
            self.softmax_scale, sliding_window=self.window or None, logits_soft_cap=self.cap or None,
        )  # fmt: skip
        if rows is None:
            out[:n] = ref.to(out.dtype)
        else:
            out[rows] = ref.to(out.dtype)
        return out
