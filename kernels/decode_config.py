"""Launch configuration of paged decode attention: tuning knobs, split count, workspace size.

Everything here depends on shapes, the device and the config only, never on sequence
lengths, so the launches it describes are CUDA-graph safe.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "MAX_NUM_SPLITS",
    "MAX_HEAD_SIZE",
    "DecodeKernelConfig",
    "DEFAULT_CONFIG",
    "choose_num_splits",
    "decode_workspace_shape",
    "alloc_decode_workspace",
    "workspace_numel",
    "device_num_sms",
    "next_pow2",
]

#: Hard upper bound on KV splits per (sequence, KV head).
MAX_NUM_SPLITS = 64
#: Largest head size the kernel takes (padded to a power of two in-kernel).
MAX_HEAD_SIZE = 256


@dataclass(frozen=True)
class DecodeKernelConfig:
    """Launch/tuning parameters. Tile, warps and split target measured on an H100
    (python -m benchmarks.kernels.tune); the fp16 dots, the per-format conversion path and its
    stages on an H200 (python -m benchmarks.kernels.decode_lab, 2026-12-04); Llama-3-8B shapes.

    Compiled for sm_90 (Triton 3.6, head 128, fp8, bf16): a 128-token tile with
    ``num_stages=5`` double-buffers K/V (2 x 32 KB in flight per program, ~75 KB shared
    memory, 168 registers -> 3 programs per SM); ``num_stages`` 3-4 single-buffers them
    (the block-table load takes a pipeline stage).
    """

    #: Bytes of one K tile per loop iteration: tokens per tile = tile_bytes // padded head size
    #: (clamped to [16, 256]); 16 KB -> 128 tokens (8 pages of 16) at head size 128.
    tile_bytes: int = 16384
    #: Explicit tokens per tile (power of two >= 16); overrides ``tile_bytes``.
    block_n: int | None = None
    num_warps: int = 4
    #: Warps for padded head size 256 (4 warps reach the 255-register cap there).
    num_warps_large_head: int = 8
    #: Software-pipelining depth of the loop (cp.async stages on Hopper); see class doc.
    num_stages: int = 5
    #: Each active split covers at least this many tokens (bounds workspace traffic).
    min_tokens_per_split: int = 256
    #: Split heuristic: aim for a grid of about this many programs per SM. 8 won the H100
    #: sweep (benchmarks/kernels/tune.py: 4/8/12/16/24/32 x stages 2/5, Llama-3-8B shapes).
    target_ctas_per_sm: int = 8
    #: Per-sequence split choice in-kernel, per format (None: off, every split with
    #: ``min_tokens_per_split`` runs): a sequence uses only as many of the plan's splits as give
    #: each this many tokens, but at least the splits that fill ``fill_programs_per_sm`` programs
    #: per SM with the batch; a sequence left with one split is written by the split kernel (no
    #: partials, no reduce). ``split_long_tokens`` sets every format (tuning runs); else
    #: ``split_long_tokens_fp8`` / ``_int8``. H100 (decode_lab, 2026-12-06, 12 shapes x {off,
    #: 512, 1024, 1536, 2048}, Llama-3-8B shapes): fp8 with 2048 64 x 1k 76.0 -> 67.5 us,
    #: 128 x 2k 224 -> 215, 8 x 4k 44.5 -> 40.2, 1 x 32k 43.3 -> 41.0, no shape slower but
    #: 1 x 4k (15.6 -> 16.5); int8 loses where serving runs with 1024-2048 (64 x 1k 71.6 ->
    #: 76.8, 32 x 2k 69.4 -> 79.3) and gains nothing with 512: off.
    split_long_tokens: int | None = None
    split_long_tokens_fp8: int | None = 2048
    split_long_tokens_int8: int | None = None
    fill_programs_per_sm: int = 3
    reduce_num_warps: int = 4
    #: Run the dots in fp16 for bf16 queries too: the 8-bit K/V convert to fp16 exactly and in
    #: one step (to bf16 it takes three), and P is rounded to fp16's 11 bits instead of bf16's 8.
    #: A bf16 query is divided in-kernel by a power of two that keeps it in fp16's range. Off:
    #: dots in the query dtype (Triton's own conversions, no asm).
    dot_in_fp16: bool = True
    #: With fp16 dots on a GPU, per format: convert K/V with inline PTX and stage V through
    #: fp16 shared memory (``decode_triton._v_to_fp16``). H200 (Triton 3.6, Llama-3-8B shapes,
    #: python -m benchmarks.kernels.decode_lab): int8 64x16k 865 -> 710 us with it (Triton's own int8 -> fp16
    #: conversion is slower); fp8 674 us without, 696-712 with (more shared-memory traffic, fewer
    #: programs per SM), so fp8 keeps Triton's single ``cvt.rn.f16x2.e4m3x2`` per pair.
    asm_dequant_fp8: bool = False
    asm_dequant_int8: bool = True
    #: ``num_stages`` of the asm path (its fp16 staging buffers take shared memory: 5 stages
    #: leave room for 2 programs per SM, 3 for 3; 3 measured fastest).
    asm_num_stages: int = 3
    #: SM count assumed where no CUDA device is queried (Triton interpreter on CPU).
    cpu_num_sms: int = 8
    #: Mask the K/V loads per page of the sequence instead of per token (the slots of the
    #: sequence's last page past its end, and before a sliding window, are read; their scores
    #: are -inf and their V rows zeroed in-kernel). A mask constant over a page lets a V page
    #: stored channel-major (tokens contiguous, ``decode_lab --layouts v-channel-major``) load
    #: in 16-byte vectors; per-token masks keep such loads at one byte. Not yet measured: off.
    page_masks: bool = False
    #: Register cap per thread of the split kernel (Triton's ``maxnreg``) for every format; None:
    #: per format below. Programs per SM follow from registers: at 4 warps, 168 -> 3, 128 -> 4
    #: (``python -m benchmarks.kernels.decode_sass`` shows what a cap compiles to).
    maxnreg: int | None = None
    #: int8's cap where the kernel runs 4 warps (padded head <= 128). Triton 3.6 compiles int8's
    #: unsplit variant (batches that fill the GPU) to 188 registers, 2 programs per SM; capped,
    #: 3 without spilling. H100 (decode_lab, 2026-12-06): 256 x 1k 238.8 -> 216.6 us (74% -> 82%
    #: of copy); 64 x 1k / 16k, 8 x 32k, 128 x 2k unchanged (split variants already use 168).
    #: fp8 compiles to 168 by itself (capping changed its code and not its speed: left alone).
    int8_maxnreg: int | None = 168

    def __post_init__(self) -> None:
        for name in ("split_long_tokens", "split_long_tokens_fp8", "split_long_tokens_int8"):
            tokens = getattr(self, name)
            if tokens is not None and int(tokens) < 1:
                raise ValueError(f"{name} must be >= 1 (or None), got {tokens}")
        if int(self.fill_programs_per_sm) < 1:
            raise ValueError(f"fill_programs_per_sm must be >= 1, got {self.fill_programs_per_sm}")
        for name in ("maxnreg", "int8_maxnreg"):
            cap = getattr(self, name)
            if cap is not None and not 32 <= int(cap) <= 255:
                raise ValueError(f"{name} must be in [32, 255] registers (or None), got {cap}")

    @classmethod
    def from_spec(cls, spec: str) -> "DecodeKernelConfig":
        """Defaults overridden by ``"num_stages=3, block_n=64, page_masks=1"`` (tuning runs); a
        ValueError names an unknown field or a bad value."""
        kw: dict = {}
        for item in filter(None, (x.strip() for x in spec.split(","))):
            key, _, val = (x.strip() for x in item.partition("="))
            field = cls.__dataclass_fields__.get(key)
            if field is None:
                raise ValueError(f"unknown DecodeKernelConfig field {key!r} in {spec!r}")
            if field.type == "bool":
                if val.lower() not in ("1", "true", "yes", "0", "false", "no"):
                    raise ValueError(f"{key} takes 1/0 (true/false), got {val!r}")
                kw[key] = val.lower() in ("1", "true", "yes")
            else:
                try:
                    kw[key] = None if val == "None" else int(val)
                except ValueError:
                    raise ValueError(f"{key} takes an integer, got {val!r}") from None
        return cls(**kw)

    def tile_tokens(self, head_size: int) -> int:
        """Tokens per K/V tile at ``head_size``: a power of two >= 16 (else ValueError)."""
        if self.block_n is not None:
            block_n = int(self.block_n)
        else:
            block_n = max(16, min(256, self.tile_bytes // max(16, next_pow2(head_size))))
        if block_n < 16 or block_n & (block_n - 1):
            raise ValueError(f"config tile of {block_n} tokens: need a power of two >= 16")
        return block_n

    def uses_asm(self, kv_dtype: str) -> bool:
        """Whether ``kv_dtype`` ("fp8_e4m3" | "int8") takes the inline-PTX conversion (fp16 dots only)."""
        return self.dot_in_fp16 and (self.asm_dequant_int8 if kv_dtype == "int8" else self.asm_dequant_fp8)

    def stages(self, kv_dtype: str) -> int:
        return self.asm_num_stages if self.uses_asm(kv_dtype) else self.num_stages

    def split_launch_options(self, kv_dtype: str, head_size: int) -> dict[str, int]:
        """Triton launch options of the split kernel (``maxnreg`` only when set)."""
        options = dict(num_warps=self.warps(head_size), num_stages=self.stages(kv_dtype))
        cap = self.maxnreg
        if cap is None and kv_dtype == "int8" and next_pow2(head_size) <= 128:
            cap = self.int8_maxnreg
        if cap is not None:
            options["maxnreg"] = int(cap)
        return options

    def warps(self, head_size: int) -> int:
        return self.num_warps if next_pow2(head_size) <= 128 else self.num_warps_large_head

    def min_tiles_per_split(self, head_size: int) -> int:
        return max(1, self.min_tokens_per_split // self.tile_tokens(head_size))

    def long_tokens(self, kv_dtype: str) -> int | None:
        """``split_long_tokens`` for ``kv_dtype`` ("fp8_e4m3" | "int8"); None: off."""
        if self.split_long_tokens is not None:
            return self.split_long_tokens
        return self.split_long_tokens_int8 if kv_dtype == "int8" else self.split_long_tokens_fp8

    def long_tiles_per_split(self, head_size: int, kv_dtype: str) -> int:
        """The kernel's ``LONG_TILES`` for ``kv_dtype`` (0: per-sequence split choice off)."""
        tokens = self.long_tokens(kv_dtype)
        if tokens is None:
            return 0
        return max(1, _cdiv(int(tokens), self.tile_tokens(head_size)))

    def fill_splits(self, num_seqs: int, num_kv_heads: int, num_sms: int) -> int:
        """Splits per sequence that give the batch ``fill_programs_per_sm`` programs per SM."""
        return max(1, _cdiv(self.fill_programs_per_sm * max(int(num_sms), 1), max(int(num_seqs) * int(num_kv_heads), 1)))


def _config_from_env() -> DecodeKernelConfig:
    """``KVQUANT_DECODE_CONFIG="num_stages=3,block_n=64"`` overrides defaults (for tuning runs)."""
    try:
        return DecodeKernelConfig.from_spec(os.environ.get("KVQUANT_DECODE_CONFIG", ""))
    except ValueError as e:
        raise ValueError(f"KVQUANT_DECODE_CONFIG: {e}") from None


DEFAULT_CONFIG = _config_from_env()


def next_pow2(x: int) -> int:
    return 1 << max(int(x) - 1, 0).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=None)
def _cuda_num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def device_num_sms(device: torch.device, config: DecodeKernelConfig) -> int:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _cuda_num_sms(index)
    return config.cpu_num_sms


def choose_num_splits(
    num_seqs: int,
    num_kv_heads: int,
    head_size: int,
    num_sms: int,
    max_num_splits: int | None = None,
    *,
    config: DecodeKernelConfig | None = None,
) -> int:
    """Splits per (sequence, KV head): a function of shapes and the device only (graph safe)."""
    cfg = config or DEFAULT_CONFIG
    cap = MAX_NUM_SPLITS if max_num_splits is None else max(1, min(int(max_num_splits), MAX_NUM_SPLITS))
    groups = max(int(num_seqs) * int(num_kv_heads), 1)
    target = cfg.target_ctas_per_sm * max(int(num_sms), 1)
    return max(1, min(cap, _cdiv(target, groups)))


def workspace_numel(num_seqs: int, num_q_heads: int, head_size: int, num_splits: int) -> int:
    # [num_seqs, Hq, splits, head_size] partial outputs, then [num_seqs, Hq, splits] LSEs.
    return num_seqs * num_q_heads * num_splits * (head_size + 1)


def decode_workspace_shape(
    max_num_seqs: int,
    num_q_heads: int,
    head_size: int,
    max_num_splits: int | None = None,
    *,
    num_kv_heads: int | None = None,
    device: torch.device | str | None = None,
    config: DecodeKernelConfig | None = None,
) -> tuple[int]:
    """Shape of an fp32 workspace that serves every batch of up to ``max_num_seqs``.

    Without ``num_kv_heads`` this is the loose bound ``max_num_seqs * max_num_splits``
    partials; with it (and ``device`` for the SM count) it is the largest need of the split
    heuristic over all batch sizes, usually far smaller.
    """
    cfg = config or DEFAULT_CONFIG
    cap = MAX_NUM_SPLITS if max_num_splits is None else max(1, min(int(max_num_splits), MAX_NUM_SPLITS))
    if num_kv_heads is None:
        rows = max_num_seqs * cap
    else:
        dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        sms = device_num_sms(dev, cfg)
        rows = 0
        for n in range(1, max_num_seqs + 1):
            s = choose_num_splits(n, num_kv_heads, head_size, sms, cap, config=cfg)
            if s > 1:
                rows = max(rows, n * s)
    return (max(workspace_numel(rows, num_q_heads, head_size, 1), 1),)


def alloc_decode_workspace(*args: Any, device: torch.device | str | None = None, **kwargs: Any) -> torch.Tensor:
    """Preallocated fp32 workspace for :func:`.decode_attention.paged_decode_attention` (reuse it
    under graphs); takes the arguments of :func:`decode_workspace_shape`."""
    return torch.empty(decode_workspace_shape(*args, device=device, **kwargs), dtype=torch.float32, device=device)
