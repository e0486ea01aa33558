"""The direct launch path (kernels/launch.py) with a stand-in for a jitted kernel.

No GPU here: a fake ``JITFunction`` records JIT launches and returns a fake ``CompiledKernel``
whose ``run`` records direct launches. What is checked: the first launch of a key goes through
the JIT (tensors as arguments) and keeps the compiled kernel; later launches of that key call
its launcher exactly as Triton's ``JITFunction.run`` does (grid, stream, function, packed
metadata, no launch metadata or hooks, then the arguments with pointers as integers); a new
key, an installed launch hook, a CPU device or ``KVQUANT_DIRECT_LAUNCH=0`` use the JIT.
The real launch is exercised on the GPU (tests/test_full_graphs.py's GPU twin, the
decode/write GPU tests), where it is on by default.
"""

from __future__ import annotations

import pytest
import torch

from vllm_kvquant.kernels import launch


class FakeCompiled:
    def __init__(self):
        self.function = 0xF00
        self.packed_metadata = (4, 1, 0)
        self.calls = []

    def run(self, *args):
        self.calls.append(args)


class FakeJit:
    def __init__(self):
        self.jit_calls = []
        self.compiled = FakeCompiled()

    def __getitem__(self, grid):
        def call(*args, **options):
            self.jit_calls.append((grid, args, options))
            return self.compiled

        return call


@pytest.fixture
def cuda_like(monkeypatch):
    monkeypatch.setattr(launch, "_raw_stream", lambda index: 7000 + index)
    monkeypatch.setattr(launch, "direct_launch_supported", lambda: True)
    return torch.device("cuda", 1)


def test_first_launch_jits_then_direct(cuda_like):
    fn = FakeJit()
    k = launch.FastKernel(fn, cuda_like)
    t = torch.zeros(4)
    make = lambda direct: (123 if direct else t, 5, True)  # noqa: E731
    k.launch("key", (3, 2, 1), make, num_warps=4)
    assert fn.jit_calls == [((3, 2, 1), (t, 5, True), {"num_warps": 4})]
    assert fn.compiled.calls == []
    k.launch("key", (9, 2, 1), make, num_warps=4)
    assert len(fn.jit_calls) == 1
    assert fn.compiled.calls == [(9, 2, 1, 7001, 0xF00, (4, 1, 0), None, None, None, 123, 5, True)]
    k.launch("other", (1, 1, 1), make, num_warps=4)  # another specialization: through the JIT
    assert len(fn.jit_calls) == 2 and len(fn.compiled.calls) == 1


class SlowJit(FakeJit):
    """A JIT whose launches take ``seconds`` (a compilation)."""

    __name__ = "slow_kernel"

    def __init__(self, seconds):
        super().__init__()
        self.seconds = seconds

    def __getitem__(self, grid):
        call = super().__getitem__(grid)

        def slow(*args, **options):
            import time

            time.sleep(self.seconds)
            return call(*args, **options)

        return slow


def test_a_compiling_launch_is_logged_with_its_key(cuda_like, caplog):
    """A variant the start-up warm-up missed shows in the server log, named, when it compiles."""
    caplog.set_level("INFO", logger="vllm.kvquant")
    k = launch.FastKernel(SlowJit(launch.SLOW_LAUNCH_S + 0.02), cuda_like)
    k.launch(("plan", 16), (2, 1, 1), lambda direct: (1,), num_warps=4)
    msgs = [r.getMessage() for r in caplog.records if "Triton launch of" in r.getMessage()]
    assert len(msgs) == 1 and "slow_kernel" in msgs[0] and "('plan', 16)" in msgs[0] and "num_warps" in msgs[0]
    k.launch(("plan", 16), (2, 1, 1), lambda direct: (1,), num_warps=4)  # compiled now: direct, not logged
    assert len([r for r in caplog.records if "Triton launch of" in r.getMessage()]) == 1
    caplog.clear()
    fast = launch.FastKernel(FakeJit(), cuda_like)
    fast.launch("key", (1, 1, 1), lambda direct: (1,))
    assert not [r for r in caplog.records if "Triton launch of" in r.getMessage()]


def test_launch_hooks_go_through_the_jit(cuda_like, monkeypatch):
    fn = FakeJit()
    k = launch.FastKernel(fn, cuda_like)
    make = lambda direct: (1,)  # noqa: E731
    k.launch("key", (1, 1, 1), make)
    monkeypatch.setattr(launch, "_hooks_active", lambda: True)
    k.launch("key", (1, 1, 1), make)
    assert len(fn.jit_calls) == 2 and fn.compiled.calls == []


def test_cpu_and_opt_out_never_launch_directly(monkeypatch):
    fn = FakeJit()
    k = launch.FastKernel(fn, torch.device("cpu"))
    for _ in range(2):
        k.launch("key", (1, 1, 1), lambda direct: (direct,))
    assert [c[1] for c in fn.jit_calls] == [(False,), (False,)] and not k.compiled
    launch.direct_launch_supported.cache_clear()
    monkeypatch.setenv("KVQUANT_DIRECT_LAUNCH", "0")
    try:
        assert not launch.direct_launch_supported()
    finally:
        launch.direct_launch_supported.cache_clear()


def test_installed_triton_launches_like_fast_kernel():
    """Guards the version check: this Triton's JITFunction.run has the launch FastKernel mirrors."""
    pytest.importorskip("triton")
    launch.direct_launch_supported.cache_clear()
    assert launch.direct_launch_supported()
    assert not launch._hooks_active()
