"""Launch a ``@triton.jit`` kernel without Triton's Python dispatch, once it is compiled.

Why: ``kernel[grid](*args)`` binds and specializes every argument, builds a cache key from a
dict of options and constexprs, and asks the driver for each tensor's device pointer, on
every call: tens of microseconds for a kernel with ~40 arguments, per layer per step. The
backend launches the same few kernel variants thousands of times, so :class:`FastKernel`
launches each variant once through the JIT (which compiles or finds it) and keeps the
returned ``CompiledKernel``; later launches with the same *key* call its launcher directly,
with device pointers passed as plain integers.

The caller's key must determine Triton's specialization of every argument: constexpr values,
launch options, exact values of integer arguments that may be specialized (== 1, divisibility
by 16), dtypes and 16-byte alignment of pointers. The backend keys on plan, layer and the
strides/alignment of the per-call tensors (see decode_attention.py / quantize_cache.py).

The direct path is used only on CUDA, with a Triton whose ``JITFunction.run`` launches exactly
as this module does (checked once against its source), while no launch hook (profiler) is set,
and unless ``KVQUANT_DIRECT_LAUNCH=0``. Everywhere else (the interpreter, CPU, other Triton
versions) every launch goes through the JIT.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import time
from typing import Any, Callable

import torch

try:
    import triton
    from triton import knobs as _knobs

    _HAVE_TRITON = True
except ImportError:  # pragma: no cover - only where Triton (or its knobs module) is absent
    triton = None
    _knobs = None
    _HAVE_TRITON = False

__all__ = ["FastKernel", "direct_launch_supported", "current_stream", "unspecialized", "SLOW_LAUNCH_S"]

logger = logging.getLogger("vllm.kvquant")  # vLLM's namespace: its handler and format (no vLLM import)

#: A JIT launch slower than this compiled (or loaded from disk) a variant: logged, since while
#: serving it stalls every request in flight (a launch that finds its variant in memory takes
#: well under a millisecond).
SLOW_LAUNCH_S = 0.05

#: The launch statement of ``JITFunction.run`` that :meth:`FastKernel.launch` reproduces.
_EXPECTED_LAUNCH = "kernel.run(grid_0, grid_1, grid_2, stream, kernel.function, kernel.packed_metadata, launch_metadata"


def unspecialized(*names: str) -> dict[str, list[str]]:
    """``triton.jit`` options under which the named arguments select no compiled variant.

    Triton compiles a variant per specialization of its arguments: an integer equal to 1 or
    divisible by 16, a pointer aligned to 16 bytes. Per-batch integers (request and split counts
    and the strides that follow from them), strides fixed per engine but unknown to the kernels'
    start-up warm-up (the block table's row length) and pointers into per-batch slices
    (``seq_lens[num_decodes:]``) would otherwise pick variants while serving that
    ``vllm_kvquant/warmup.py`` cannot foresee, each a JIT compilation on the request that meets
    it. Unspecialized, a kernel's variants follow from its constexprs, dtypes and layer constants.
    """
    options: dict[str, list[str]] = {"do_not_specialize": list(names)}
    if _HAVE_TRITON and "do_not_specialize_on_alignment" in inspect.signature(triton.jit).parameters:
        options["do_not_specialize_on_alignment"] = list(names)
    return options


@functools.lru_cache(maxsize=None)
def direct_launch_supported() -> bool:
    """Whether this Triton launches compiled kernels the way :class:`FastKernel` does."""
    if not _HAVE_TRITON or os.environ.get("KVQUANT_DIRECT_LAUNCH", "1") == "0":
        return False
    try:
        from triton.runtime.jit import JITFunction

        source = " ".join(inspect.getsource(JITFunction.run).split())
    except (ImportError, OSError, TypeError):  # pragma: no cover
        return False
    return " ".join(_EXPECTED_LAUNCH.split()) in source


def _hooks_active() -> bool:
    """A launch hook (e.g. a profiler) is installed: let the JIT call it."""
    runtime = _knobs.runtime
    for hook in (runtime.launch_enter_hook, runtime.launch_exit_hook):
        calls = getattr(hook, "calls", None)
        if calls if calls is not None else hook is not None:
            return True
    return False


try:  # what Triton itself uses to find the current stream (a capture stream while capturing)
    from torch._C import _cuda_getCurrentRawStream as _raw_stream
except ImportError:  # pragma: no cover - CPU-only torch builds

    def _raw_stream(index: int) -> int:
        return torch.cuda.current_stream(index).cuda_stream


def current_stream(device_index: int) -> int:
    return _raw_stream(device_index)


def _is_compiled(kernel: Any) -> bool:
    return all(hasattr(kernel, a) for a in ("run", "function", "packed_metadata")) and kernel.function is not None


class FastKernel:
    """A jitted kernel plus the compiled variants it has launched, by caller key.

    ``launch(key, grid, make_args, num_warps=..., num_stages=...)``: ``make_args(direct)``
    returns the kernel's full positional argument tuple (constexprs included, in signature
    order); with ``direct=True`` pointer arguments may be given as ``int`` device addresses.
    """

    __slots__ = ("fn", "compiled", "device_index", "direct")

    def __init__(self, fn: Any, device: torch.device) -> None:
        self.fn = fn
        self.compiled: dict[Any, Any] = {}
        self.device_index = device.index if device.index is not None else 0
        self.direct = device.type == "cuda" and direct_launch_supported()

    def launch(self, key: Any, grid: tuple[int, int, int], make_args: Callable[[bool], tuple], **options: Any) -> None:
        kernel = self.compiled.get(key) if self.direct else None
        if kernel is not None and not _hooks_active():
            kernel.run(
                grid[0], grid[1], grid[2], _raw_stream(self.device_index), kernel.function, kernel.packed_metadata,
                None, None, None, *make_args(True),
            )  # fmt: skip
            return
        t0 = time.perf_counter()
        kernel = self.fn[grid](*make_args(False), **options)
        if self.direct:
            seconds = time.perf_counter() - t0
            if seconds > SLOW_LAUNCH_S:
                # Names the variant, so that the start-up warm-up (vllm_kvquant/warmup.py) can cover it.
                logger.info("kvquant: Triton launch of %s took %.2f s (compiled or loaded a variant): key %s, grid %s, "
                            "options %s", getattr(self.fn, "__name__", self.fn), seconds, key, grid, options)  # fmt: skip
            kernel = kernel.result() if hasattr(kernel, "result") else kernel
            if _is_compiled(kernel):
                self.compiled[key] = kernel
