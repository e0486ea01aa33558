"""Compile every Triton kernel variant the kvquant backend can launch, once, at engine start-up.

Why: Triton compiles a kernel variant the first time a launch needs it, which costs that step
one to a few seconds; vLLM (0.26+) logs each one after its own warm-up as ``Triton kernel JIT
compilation during inference: <kernel>``. vLLM's warm-up runs the model on a few dummy batches,
which reach only some of ours (its profile run has no attention metadata, eager engines capture
nothing), so the backend warms its own up: each metadata builder registers here, and before
vLLM's ``compile_or_warm_up_model`` (``compat.run_before_worker_warmup``: the KV cache is bound,
nothing is captured yet) :func:`warm_up_worker` launches, for one layer of each distinct kind,
one batch per variant on the layer's real cache, then logs the time once.

What selects a variant (besides the layer's constants and dtypes, fixed per layer): integers
and pointer alignments that vary per batch do not (``kernels.launch.unspecialized``); the
remaining per-batch choices, each enumerated here from the same functions the launch paths use:

- cache write: the launch shape (``quantize_cache.pick_config``) of the step's token count,
  ``1 .. max_num_batched_tokens`` (:func:`write_token_counts`);
- decode (kernel ``triton``): split or not, and the reduce kernel's padded split count, over
  ``1 .. max_num_seqs`` decodes (:func:`decode_batch_sizes`);
- prefill: the Triton pass (``MODE_MERGE`` after FA3 on Hopper, ``MODE_FULL`` elsewhere,
  ``MODE_QUANTIZED``) per tiling of the longest prefill (:func:`prefill_query_lens`), and the
  16-bit workspace fill (``kernels.context_fill``) where the FA3 path has a workspace.

Nothing changes state: the writes' slots are all -1 (skipped), decode and prefill read page 0
and write scratch tensors, online scales are not observed. CUDA-graph plans (``all_rows``) are
left to vLLM's capture, which runs after this and before its JIT monitor starts. Where kernels
do not compile (vLLM's CPU build: PyTorch references; the Triton interpreter) the worker hook
does nothing; :func:`warm_up_builder` itself runs anywhere (the CPU tests drive it).
"""

from __future__ import annotations

import logging
import time
import weakref
from collections import Counter
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch

from . import compat
from .kernels.decode_attention import DEFAULT_CONFIG  # the builder's
from .kernels.decode_config import DecodeKernelConfig, choose_num_splits, next_pow2
from .kernels.quantize_cache import pick_config
from .layer_scales import layer_state
from .prefill import PrefillPlan, PrefillRunner

__all__ = ["WarmupReport", "decode_batch_sizes", "prefill_query_lens", "register", "warm_up_builder",
           "warm_up_worker", "write_token_counts"]  # fmt: skip

logger = logging.getLogger("vllm.kvquant")

#: Builders of this process not warmed up yet (one per KV-cache group of each engine).
_PENDING: "weakref.WeakSet[Any]" = weakref.WeakSet()


def write_token_counts(max_tokens: int, num_kv_heads: int, head_size: int) -> tuple[int, ...]:
    """The smallest token count of each cache-write launch shape up to ``max_tokens``."""
    first: dict[Any, int] = {}
    for n in range(1, max(1, int(max_tokens)) + 1):
        first.setdefault(pick_config(n, num_kv_heads, head_size), n)
    return tuple(sorted(first.values()))


def decode_batch_sizes(
    max_num_seqs: int, num_kv_heads: int, head_size: int, num_sms: int, config: DecodeKernelConfig = DEFAULT_CONFIG
) -> tuple[int, ...]:
    """The smallest decode count of each (split?, padded split count) up to ``max_num_seqs``, as
    ``kernels.decode_plan.DecodePlan.build`` chooses them."""
    first: dict[tuple[bool, int], int] = {}
    for n in range(1, max(1, int(max_num_seqs)) + 1):
        splits = choose_num_splits(n, num_kv_heads, head_size, num_sms, None, config=config)
        first.setdefault((splits > 1, max(2, next_pow2(splits)) if splits > 1 else 0), n)
    return tuple(sorted(first.values()))


def prefill_query_lens(runner: PrefillRunner, max_tokens: int) -> tuple[int, ...]:
    """The smallest longest-prefill length (>= 2 new tokens) of each Triton prefill tiling up to
    ``max_tokens`` (tilings follow the power-of-two bucket of that length)."""
    max_tokens = max(2, int(max_tokens))
    lengths = [1 << k for k in range(1, max_tokens.bit_length()) if 1 << k <= max_tokens] + [max_tokens]
    first: dict[Any, int] = {}
    for n in lengths:
        first.setdefault(runner.kernel_config(n), n)
    return tuple(sorted(first.values()))


@dataclass
class WarmupReport:
    """What one warm-up launched: kernel launches by kernel, the layer kinds, the seconds."""

    launches: Counter = field(default_factory=Counter)
    layer_kinds: int = 0
    seconds: float = 0.0

    def add(self, other: "WarmupReport") -> None:
        self.launches.update(other.launches)
        self.layer_kinds += other.layer_kinds
        self.seconds += other.seconds


def _layer_kind(impl: Any, state: Any, kv_cache: torch.Tensor) -> tuple:
    """Everything of a layer that its kernels' variants depend on (layers alike share them)."""
    return (
        type(impl), impl.num_heads, impl.num_kv_heads, impl.head_size, impl.sliding_window, impl.logits_soft_cap,
        impl.options, state.kv_dtype, state.k_scale.numel(), state.v_scale.numel(), state.k_scale.data_ptr() & 15,
        state.v_scale.data_ptr() & 15, kv_cache.dtype, kv_cache.stride(), kv_cache.data_ptr() & 15,
    )  # fmt: skip


class _LayerWarmup:
    """One layer's launches, on its real cache, with the model's fused q/k/v layout."""

    def __init__(self, builder: Any, impl: Any, layer: Any, kv_cache: torch.Tensor, dtype: torch.dtype) -> None:
        self.builder, self.impl, self.layer = builder, impl, layer
        self.kernels = impl._layer_kernels(layer, kv_cache)  # what serving will use (kept by the impl)
        self.device, self.dtype = kv_cache.device, dtype
        self.report = WarmupReport(layer_kinds=1)
        block_size = int(builder.kv_cache_spec.block_size)
        self.block_size = block_size
        max_model_len = int(getattr(builder.vllm_config.model_config, "max_model_len", 0) or block_size)
        self.max_blocks = max(2, -(-max_model_len // block_size))

    def qkv(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``n`` rows of q, k, v as views of one fused projection (how vLLM's layers get them)."""
        hq, hkv, d = self.impl.num_heads, self.impl.num_kv_heads, self.impl.head_size
        buf = torch.zeros(n, (hq + 2 * hkv) * d, dtype=self.dtype, device=self.device)
        q = buf[:, : hq * d].view(n, hq, d)
        k = buf[:, hq * d : (hq + hkv) * d].view(n, hkv, d)
        v = buf[:, (hq + hkv) * d :].view(n, hkv, d)
        return q, k, v

    def writes(self, token_counts: tuple[int, ...]) -> None:
        for n in token_counts:
            _, k, v = self.qkv(n)
            self.kernels.writer.write(k, v, torch.full((n,), -1, dtype=torch.int64, device=self.device))
            self.report.launches["cache_write"] += 1

    def decodes(self, batch_sizes: tuple[int, ...]) -> None:
        if self.builder.decode_planner is not None:  # fa3 / flashinfer decode: not Triton
            return
        lk, hq = self.kernels, self.impl.num_heads
        layer = lk.decode if lk.decode is not None and lk.decode.act_dtype is self.dtype else lk.decode_layer(self.impl, self.dtype)
        n_max = max(batch_sizes)
        table = torch.zeros(n_max, self.max_blocks, dtype=torch.int32, device=self.device)
        for n in batch_sizes:
            batch = SimpleNamespace(
                block_table_tensor=table[:n], seq_lens=torch.ones(n, dtype=torch.int32, device=self.device),
                query_start_loc=torch.arange(n + 1, dtype=torch.int32, device=self.device),
            )  # fmt: skip
            plan = self.builder._decode_plans(n, batch)[hq]
            q, _, _ = self.qkv(n)
            layer.run(q, torch.empty_like(q), plan)
            self.report.launches["decode"] += 1 + bool(plan.split)

    def prefills(self, max_tokens: int) -> None:
        runner = self.impl._prefill or self.impl._prefill_runner(self.device)
        if runner.path == "reference":
            return
        query_lens = prefill_query_lens(runner, max_tokens)
        for n in query_lens:  # one request of n new tokens on one page of context
            self._prefill(runner, n, workspace=None)
            self.report.launches["prefill"] += 1
        if runner.path == "fa3" and self.builder.prefill_workspace is not None:
            self._prefill(runner, min(query_lens), workspace=self.builder.prefill_workspace)
            self.report.launches["context_fill"] += 1

    def _prefill(self, runner: PrefillRunner, n: int, workspace: Any) -> None:
        dev, bs = self.device, self.block_size
        seq_len = n + bs
        pages = -(-seq_len // bs)
        table = torch.zeros(1, max(pages, self.max_blocks), dtype=torch.int32, device=dev)
        seq_lens = torch.tensor([seq_len], dtype=torch.int32, device=dev)
        plan = PrefillPlan.build(
            torch.tensor([0, n], dtype=torch.int32, device=dev), seq_lens, table, num_tokens=n, max_query_len=n,
            has_context=True, workspace=workspace, seq_lens_cpu=seq_lens.cpu() if workspace is not None else None,
        )  # fmt: skip
        if workspace is not None and plan.context_fill is None:
            raise RuntimeError(f"kvquant warm-up: {seq_len} tokens do not fit the prefill workspace")
        q, k, v = self.qkv(n)
        runner.run(q, k, v, self.kernels.cache, plan, torch.zeros_like(q))


def warm_up_builder(builder: Any, *, max_tokens: int | None = None) -> WarmupReport:
    """Launch every kernel variant for the layers of one metadata builder (one KV-cache group).

    ``max_tokens``: the most tokens a step holds (default: vLLM's ``max_num_batched_tokens``).
    Layers without a bound cache (or sharing another layer's) are skipped; one layer of each
    distinct kind is launched.
    """
    t0 = time.perf_counter()
    vllm_config = builder.vllm_config
    if max_tokens is None:
        max_tokens = int(vllm_config.scheduler_config.max_num_batched_tokens)
    dtype = vllm_config.model_config.dtype
    report = WarmupReport()
    kinds: set[tuple] = set()
    for name, layer in compat.attention_layers(vllm_config, list(builder.layer_names)).items():
        impl, kv_cache = getattr(layer, "impl", None), compat.layer_kv_cache(layer)
        if kv_cache is None or impl is None or getattr(impl, "kv_sharing_target_layer_name", None) is not None:
            continue
        state = layer_state(layer)
        kind = _layer_kind(impl, state, kv_cache)
        if kind in kinds:
            continue
        kinds.add(kind)
        warm = _LayerWarmup(builder, impl, layer, kv_cache, dtype)
        warm.writes(write_token_counts(max_tokens, impl.num_kv_heads, impl.head_size))
        warm.decodes(decode_batch_sizes(builder.max_num_seqs, impl.num_kv_heads, impl.head_size, builder.num_sms))
        warm.prefills(max_tokens)
        report.add(warm.report)
    if report.layer_kinds and builder.device.type == "cuda":
        torch.cuda.synchronize(builder.device)
    report.seconds = time.perf_counter() - t0
    return report


def register(builder: Any) -> None:
    """Called by every metadata builder: its layers are warmed up when its worker warms up."""
    _PENDING.add(builder)
    compat.run_before_worker_warmup(builder.vllm_config, warm_up_worker)


def _compiles(builder: Any) -> bool:
    """Whether the builder's kernels are compiled (CUDA), not references or interpreted."""
    return builder.device.type == "cuda"


def warm_up_worker(worker: Any) -> None:
    """The start-up hook (``compat.run_before_worker_warmup``): warm every pending builder up."""
    builders = list(_PENDING)
    _PENDING.clear()
    if not compat.jit_warmup_enabled(getattr(worker, "vllm_config", None)):
        logger.info("kvquant: kernel warm-up off (vLLM's kernel_config.enable_jit_warmup is false)")
        return
    builders = [b for b in builders if _compiles(b)]
    if not builders:
        return
    total = WarmupReport()
    for builder in builders:
        total.add(warm_up_builder(builder))
    launches = ", ".join(f"{k} {v}" for k, v in sorted(total.launches.items()))
    logger.info("kvquant: compiled the backend's Triton kernels in %.1f s (%d layer kind(s); launches: %s)",
                total.seconds, total.layer_kinds, launches)  # fmt: skip
