"""Quantize-on-write: store the step's K/V into the 8-bit paged cache (Triton).

Semantics are exactly :func:`.reference.quantize_to_cache_ref`, bit for bit:
``q = saturate(x / scale)`` with an IEEE divide (``div_rn``; Triton's ``/`` is the approximate
``div.full.f32``); FP8 e4m3 rounds to nearest-even (hardware ``cvt.rn.satfinite`` on sm89+,
an exact software encoder elsewhere), INT8 rounds half-to-even like ``torch.round`` (``rint``).
Finite or infinite inputs saturate to +-448 (fp8) / +-127 (int8); NaN inputs give an
unspecified code (NaN or a saturated value for fp8, any value for int8), as the reference
does not define them either.

Design (memory-bound, ~3 bytes moved per element):
- one program handles ``BLOCK_T`` tokens x ``BLOCK_H`` heads x the whole (padded) head, both K
  and V, so each thread issues several independent 16-byte loads;
- every stride is a kernel argument, so one kernel serves views of a fused qkv tensor and
  any cache layout (``kv[0]``/``kv[1]``, ``kv[:, 0]``, HND, K|V packed in the last dim);
- no host sync, no allocation that depends on data: safe inside CUDA graphs;
- :class:`CacheWriter` (the backend's path) validates one layer's caches and scales once,
  memoizes the launch shape per slot count and launches through :class:`.launch.FastKernel`;
  :func:`quantize_to_cache` validates every argument on every call (direct callers).

On CPU tensors the wrapper uses the PyTorch reference unless ``TRITON_INTERPRET=1``, in
which case the Triton kernel runs in Triton's interpreter (how CI tests it).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .dtypes import KVQuantDType, check_paged_caches, parse_kv_dtype, qmax_of
from .launch import FastKernel
from .paged_cache import PagedKVCache
from .reference import quantize_to_cache_ref
from .scales_layout import PER_CHANNEL, PER_TENSOR, flat_scale

_ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_RINT_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23: (y + M) - M rounds fp32 |y| < 2**22 half-to-even


@dataclass(frozen=True)
class WriteConfig:
    """Launch shape of the write kernel; :func:`pick_config` is the default heuristic."""

    block_t: int  # tokens per program (power of two)
    block_h: int  # KV heads per program (power of two)
    num_warps: int
    reciprocal: bool = False  # multiply by 1/scale instead of an IEEE divide (may differ by 1 unit)


#: Heuristic knobs, module-level so a benchmark can tweak them without editing code.
TILE_ELEMS_MAX = 4096  # elements of one head-block tile (block_h * padded head size)
PROGRAM_ELEMS = 4096  # target elements per program per tensor (K or V)
MIN_PROGRAMS = 1024  # keep at least this many programs before packing tokens together
ELEMS_PER_THREAD = 16  # per tensor: two 16-byte vectors of fp16/bf16
MAX_WARPS = 8


def _pow2_floor(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def pick_config(num_tokens: int, num_kv_heads: int, head_size: int) -> WriteConfig:
    """Autotune-free launch shape: big enough programs for H100 bandwidth, enough of them.

    Depends only on shapes, so the (few) compiled variants are stable across steps.
    """
    block_d = triton.next_power_of_2(head_size)
    block_h = min(triton.next_power_of_2(num_kv_heads), max(1, TILE_ELEMS_MAX // block_d))
    tile = block_h * block_d
    block_t = min(_pow2_floor(PROGRAM_ELEMS // tile), _pow2_floor(num_tokens // MIN_PROGRAMS))
    block_t = max(1, block_t)
    elems = block_t * tile
    num_warps = max(1, min(MAX_WARPS, _pow2_floor(elems // (32 * ELEMS_PER_THREAD))))
    return WriteConfig(block_t=block_t, block_h=block_h, num_warps=num_warps)


def _quantize_to_cache_kernel(
    # per call
    key_ptr, value_ptr, slot_ptr,
    num_slots,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    # per layer
    kc_ptr, vc_ptr, ks_ptr, vs_ptr,
    block_size,
    stride_kcb, stride_kcs, stride_kch, stride_kcd,
    stride_vcb, stride_vcs, stride_vch, stride_vcd,
    ks_stride, vs_stride,
    # per layer (CONTIG_D: also per call strides) and per launch config
    NUM_HEADS: tl.constexpr, HEAD_SIZE: tl.constexpr, BLOCK_D: tl.constexpr, QMAX: tl.constexpr,
    IS_INT8: tl.constexpr, USE_RINT: tl.constexpr, SOFT_FP8: tl.constexpr,
    K_CHANNEL: tl.constexpr, V_CHANNEL: tl.constexpr, CONTIG_D: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, RECIPROCAL: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_h = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)

    slot = tl.load(slot_ptr + offs_t, mask=offs_t < num_slots, other=-1).to(tl.int64)
    valid = slot >= 0
    slot = tl.where(valid, slot, 0)
    blk = slot // block_size
    off = slot % block_size
    tok = offs_t.to(tl.int64)

    h_mask = offs_h < NUM_HEADS
    mask = valid[:, None, None] & h_mask[None, :, None] & (offs_d < HEAD_SIZE)[None, None, :]
    t3 = tok[:, None, None]
    h3 = offs_h[None, :, None]
    d3 = offs_d[None, None, :]
    b3 = blk[:, None, None]
    o3 = off[:, None, None]
    if CONTIG_D:
        k_src = key_ptr + t3 * stride_kt + h3 * stride_kh + d3
        v_src = value_ptr + t3 * stride_vt + h3 * stride_vh + d3
        k_dst = kc_ptr + b3 * stride_kcb + o3 * stride_kcs + h3 * stride_kch + d3
        v_dst = vc_ptr + b3 * stride_vcb + o3 * stride_vcs + h3 * stride_vch + d3
    else:
        k_src = key_ptr + t3 * stride_kt + h3 * stride_kh + d3 * stride_kd
        v_src = value_ptr + t3 * stride_vt + h3 * stride_vh + d3 * stride_vd
        k_dst = kc_ptr + b3 * stride_kcb + o3 * stride_kcs + h3 * stride_kch + d3 * stride_kcd
        v_dst = vc_ptr + b3 * stride_vcb + o3 * stride_vcs + h3 * stride_vch + d3 * stride_vcd

    # Per channel ([heads, head_size], contiguous): each channel is quantized with its own scale.
    if K_CHANNEL or V_CHANNEL:
        hd_off = offs_h[:, None] * HEAD_SIZE + offs_d[None, :]
        hd_mask = h_mask[:, None] & (offs_d < HEAD_SIZE)[None, :]
    if K_CHANNEL:
        ks = tl.load(ks_ptr + hd_off, mask=hd_mask, other=1.0).to(tl.float32)[None, :, :]
    else:
        ks = tl.load(ks_ptr + offs_h * ks_stride, mask=h_mask, other=1.0).to(tl.float32)[None, :, None]
    if V_CHANNEL:
        vs = tl.load(vs_ptr + hd_off, mask=hd_mask, other=1.0).to(tl.float32)[None, :, :]
    else:
        vs = tl.load(vs_ptr + offs_h * vs_stride, mask=h_mask, other=1.0).to(tl.float32)[None, :, None]

    k = tl.load(k_src, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_src, mask=mask, other=0.0).to(tl.float32)
    if RECIPROCAL:
        k = k * tl.math.div_rn(tl.full(ks.shape, 1.0, tl.float32), ks)  # once per head
        v = v * tl.math.div_rn(tl.full(vs.shape, 1.0, tl.float32), vs)
    else:
        k = tl.math.div_rn(k, ks)
        v = tl.math.div_rn(v, vs)
    k = tl.minimum(tl.maximum(k, -QMAX), QMAX)
    v = tl.minimum(tl.maximum(v, -QMAX), QMAX)
    if IS_INT8:
        if USE_RINT:  # cvt.rni: half-to-even, exactly torch.round
            k = libdevice.rint(k)
            v = libdevice.rint(v)
        else:  # interpreter has no libdevice; same result for |y| <= 127
            k = (k + _RINT_MAGIC) - _RINT_MAGIC
            v = (v + _RINT_MAGIC) - _RINT_MAGIC
        tl.store(k_dst, k.to(tl.int8), mask=mask)
        tl.store(v_dst, v.to(tl.int8), mask=mask)
    elif SOFT_FP8:
        # Software e4m3fn encoding (caches passed as uint8), used where the hardware cast is
        # missing (before sm89) or wrong (the interpreter drops the carry when rounding up
        # to a power of two). K and V are encoded together, joined on a new last axis of 2
        # (registers only): no nested @jit helper, so the kernel can be jitted lazily in either
        # mode. Normal results keep 3 of fp32's 23 mantissa bits (round-to-nearest-even on the
        # bit pattern) and rebias the exponent 127 -> 7; subnormals (|y| < 2**-6) are multiples
        # of 2**-9: code = rint(|y| * 512) in 0..8; the sign bit is copied (so -0.0 -> 0x80
        # like torch) and NaN -> 0x7F.
        y = tl.join(k, v)
        a = tl.abs(y)
        b = a.to(tl.int32, bitcast=True)
        normal = ((b + 0x7FFFF + ((b >> 20) & 1)) >> 20) - (120 << 3)
        subnormal = (((a * 512.0) + _RINT_MAGIC) - _RINT_MAGIC).to(tl.int32)
        code = tl.where(a < 0.015625, subnormal, normal)
        code = tl.where(a != a, 0x7F, code) | ((y.to(tl.int32, bitcast=True) >> 24) & 0x80)
        k_code, v_code = tl.split(code)
        tl.store(k_dst, k_code.to(tl.uint8), mask=mask)
        tl.store(v_dst, v_code.to(tl.uint8), mask=mask)
    else:  # hardware cvt.rn.satfinite (sm89+)
        tl.store(k_dst, k.to(tl.float8e4nv), mask=mask)
        tl.store(v_dst, v.to(tl.float8e4nv), mask=mask)


_KERNELS: dict[bool, object] = {}


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _kernel():
    """JIT the kernel on first use, so ``TRITON_INTERPRET`` set after import still counts."""
    mode = _interpret()
    k = _KERNELS.get(mode)
    if k is None:
        # num_slots changes every step; its divisibility buys nothing, so don't recompile on it
        k = _KERNELS[mode] = triton.jit(_quantize_to_cache_kernel, do_not_specialize=["num_slots"])
    return k


def _needs_soft_fp8(device: torch.device) -> bool:
    """Software fp8 rounding under the interpreter, before sm89 (no e4m3 cvt) and on ROCm (fnuz)."""
    if _interpret() or device.type != "cuda" or torch.version.hip:
        return True
    return _capability(device.index if device.index is not None else torch.cuda.current_device()) < (8, 9)


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _as_3d(x: torch.Tensor, name: str, num_heads: int, head_size: int) -> torch.Tensor:
    if x.dim() == 2 and x.shape[1] == num_heads * head_size and x.stride(1) == 1:
        x = x.view(x.shape[0], num_heads, head_size)
    if x.dim() != 3:
        raise ValueError(f"{name} must be [num_tokens, num_kv_heads, head_size], got shape {tuple(x.shape)}")
    if x.dtype not in _ACT_DTYPES:
        raise ValueError(f"{name} must be float16, bfloat16 or float32, got {x.dtype}")
    if tuple(x.shape[1:]) != (num_heads, head_size):
        raise ValueError(
            f"{name} has {x.shape[1]} heads of size {x.shape[2]} but the cache holds "
            f"{num_heads} heads of size {head_size}"
        )
    return x


def _scale_and_stride(s: torch.Tensor, name: str, num_heads: int, head_size: int):
    """``(flat fp32 scale, head stride, per channel)``: head stride 0 for one shared scale (the
    scale's device was checked by :class:`PagedKVCache`)."""
    flat, granularity = flat_scale(s, name, num_heads, head_size)
    return flat, (0 if granularity == PER_TENSOR else 1), granularity == PER_CHANNEL


class CacheWriter:
    """One layer's cache write: caches, scales and format validated once, launched lean per call.

    :meth:`write` does no validation: the backend hands it the layer's own ``key``/``value``
    (``[num_tokens, num_kv_heads, head_size]`` or ``[num_tokens, num_kv_heads * head_size]``)
    and vLLM's slot mapping. The launch shape depends only on the slot count (memoized).
    """

    def __init__(self, cache: PagedKVCache) -> None:
        self.cache = cache
        self.kv_dtype = kv_dtype = cache.kv_dtype
        block_size, num_heads, head_size = check_paged_caches(cache.key_cache, cache.value_cache)
        self.device = device = cache.device
        self.num_heads, self.head_size = num_heads, head_size
        self.k_scale, ks_stride, k_channel = _scale_and_stride(cache.k_scale, "k_scale", num_heads, head_size)
        self.v_scale, vs_stride, v_channel = _scale_and_stride(cache.v_scale, "v_scale", num_heads, head_size)
        kc, vc = self.key_cache, self.value_cache = cache.key_cache, cache.value_cache
        self.reference = device.type == "cpu" and not _interpret()
        if self.reference:
            return
        soft_fp8 = kv_dtype is KVQuantDType.FP8_E4M3 and _needs_soft_fp8(device)
        if soft_fp8:
            kc, vc = kc.view(torch.uint8), vc.view(torch.uint8)
        ks, vs = self.k_scale, self.v_scale
        layer = (block_size, *kc.stride(), *vc.stride(), ks_stride, vs_stride)
        self._layer_args = (kc, vc, ks, vs, *layer)
        self._layer_ptrs = (kc.data_ptr(), vc.data_ptr(), ks.data_ptr(), vs.data_ptr(), *layer)
        self._const = (
            num_heads, head_size, triton.next_power_of_2(head_size), qmax_of(kv_dtype), kv_dtype is KVQuantDType.INT8,
            device.type == "cuda" and not _interpret(), soft_fp8, k_channel, v_channel,
        )  # fmt: skip
        self._cache_contig = kc.stride(3) == 1 and vc.stride(3) == 1
        self._plans: dict[int, tuple] = {}
        self._kernel = FastKernel(_kernel(), device)

    def write(
        self, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor, config: WriteConfig | None = None
    ) -> None:
        """Token ``t < len(slot_mapping)`` goes to slot ``slot_mapping[t]`` (negative: skipped)."""
        num_slots = slot_mapping.shape[0]
        if num_slots == 0:
            return
        if key.dim() == 2:
            key = key.view(key.shape[0], self.num_heads, self.head_size)
        if value.dim() == 2:
            value = value.view(value.shape[0], self.num_heads, self.head_size)
        if self.reference:
            quantize_to_cache_ref(
                key, value, self.key_cache, self.value_cache, slot_mapping, self.k_scale, self.v_scale, self.kv_dtype
            )
            return
        if slot_mapping.stride(0) != 1:
            slot_mapping = slot_mapping.contiguous()
        plan = self._plans.get(num_slots) if config is None else None
        if plan is None:  # launch shape of this slot count: memoized (shape-only, graph safe)
            cfg = config or pick_config(num_slots, self.num_heads, self.head_size)
            grid = (-(-num_slots // cfg.block_t), -(-self.num_heads // cfg.block_h), 1)
            plan = (grid, (cfg.block_t, cfg.block_h, cfg.reciprocal), cfg.num_warps)
            if config is None:
                self._plans[num_slots] = plan
        grid, cfg_const, num_warps = plan
        ks_, vs_ = key.stride(), value.stride()
        k_ptr, v_ptr, s_ptr = key.data_ptr(), value.data_ptr(), slot_mapping.data_ptr()
        contig = ks_[2] == 1 and vs_[2] == 1 and self._cache_contig
        const = (*self._const, contig, *cfg_const)
        call = (num_slots, *ks_, *vs_)
        launch_key = (cfg_const, num_warps, key.dtype, value.dtype, slot_mapping.dtype, ks_, vs_, k_ptr & 15, v_ptr & 15, s_ptr & 15)
        layer_args, layer_ptrs = self._layer_args, self._layer_ptrs

        def args(direct: bool) -> tuple:
            if direct:
                return (k_ptr, v_ptr, s_ptr, *call, *layer_ptrs, *const)
            return (key, value, slot_mapping, *call, *layer_args, *const)

        self._kernel.launch(launch_key, grid, args, num_warps=num_warps)


def quantize_to_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor,
    v_scale: torch.Tensor,
    kv_dtype: KVQuantDType | str,
    *,
    config: WriteConfig | None = None,
) -> None:
    """Quantize ``key``/``value`` ``[num_tokens, num_kv_heads, head_size]`` into the caches.

    Token ``t < len(slot_mapping)`` goes to ``slot_mapping[t]`` (negative: skipped); later
    tokens are ignored. Caches are ``[num_blocks, block_size, num_kv_heads, head_size]`` of
    any one-byte dtype and any strides. ``config`` overrides the launch heuristic (tuning).
    Every argument is validated on every call; the backend uses :class:`CacheWriter`.
    """
    kv_dtype = parse_kv_dtype(kv_dtype)
    block_size, num_heads, head_size = check_paged_caches(key_cache, value_cache)
    key = _as_3d(key, "key", num_heads, head_size)
    value = _as_3d(value, "value", num_heads, head_size)
    if key.shape[0] != value.shape[0]:
        raise ValueError(f"key has {key.shape[0]} tokens but value has {value.shape[0]}")
    if slot_mapping.dim() != 1 or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_mapping must be 1-D int32/int64, got {slot_mapping.dtype} {tuple(slot_mapping.shape)}")
    num_slots = slot_mapping.shape[0]
    if num_slots > key.shape[0]:
        raise ValueError(f"slot_mapping has {num_slots} entries for {key.shape[0]} tokens")
    device = key_cache.device
    for name, t in (("key", key), ("value", value), ("value_cache", value_cache), ("slot_mapping", slot_mapping)):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but key_cache is on {device}")
    CacheWriter(PagedKVCache(key_cache, value_cache, k_scale, v_scale, kv_dtype)).write(key, value, slot_mapping, config)
