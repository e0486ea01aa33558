"""Every decode kernel choice on a GPU vs ``paged_decode_attention_ref`` (fp32 over the same bytes).

Caches are allocated by ``KVQuantAttentionBackend.get_kv_cache_shape`` and split by
``compat.split_kv_cache`` (the views the backend hands the kernels). Tolerances, elementwise
``|out - ref| <= atol + rtol * |ref|`` and relative L2 error:

- ``triton`` (fp8, int8) and ``flashinfer`` (fp8): 2e-2 / 2e-2 and rel-L2 < 1e-2 (bf16 operands
  of the dots, bf16 output). FlashInfer takes per-tensor scales as exact host floats; per-KV-head
  K scales are folded into the bf16 query, so there the reference is fed the same rounded
  ``q * k_scale`` and the rounding's own cost is reported (``flashinfer per-head accuracy``).
- ``fa3``: FA3's fp8 path quantizes the query (scale 1.0, as vLLM) and the softmax weights P to
  fp8. Against a reference fed the same fp8 query: 1e-1 / 1e-1 and rel-L2 < 3e-2 (P in fp8).
  The cost of the fp8 query itself (vs the bf16-query reference) is reported (``fa3 accuracy``)
  and bounded by rel-L2 < 0.15. The test data make the softmax sharp on purpose (K scaled up
  to 8x per head, q ~ 3 N(0, 1): logits with std up to ~25), where rounding the query shows
  most (H100: rel-L2 0.04-0.10, max abs 0.2-2.0 on outputs of magnitude ~1-4); vLLM's own FA3
  fp8 path pays the same (benchmarks/kernels/decode.py: ``max_abs_err_ref`` of vllm-fa3-fp8).
Reports are ``warnings`` so they appear in pytest's summary even under ``-q``.

A kernel whose library or GPU is missing (FA3 off Hopper, FlashInfer not installed) skips with
the start-up error's reason. Each kernel also runs captured in a CUDA graph, re-planned and
replayed with other lengths and block tables (the plan's persistent buffers).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from vllm_kvquant import compat
from vllm_kvquant.backend import KVQuantAttentionBackend
from vllm_kvquant.decode_runner import DecodePlan
from vllm_kvquant.peer_decode import create_planner, create_runner
from vllm_kvquant.errors import KVQuantConfigError
from vllm_kvquant.kernels.paged_cache import PagedKVCache
from vllm_kvquant.kernels.reference import paged_decode_attention_ref, quantize_to_cache_ref

pytestmark = pytest.mark.gpu

FP8 = torch.float8_e4m3fn
QMAX = {"fp8_e4m3": 448.0, "int8": 127.0}
KERNELS = [("triton", "fp8_e4m3"), ("triton", "int8"), ("fa3", "fp8_e4m3"), ("flashinfer", "fp8_e4m3")]
TOL = {"triton": (2e-2, 1e-2), "flashinfer": (2e-2, 1e-2), "fa3": (1e-1, 3e-2)}  # (atol = rtol, rel-L2)
MISSING = ("not installed", "unavailable", "cannot be imported", "needs a Hopper GPU", "needs sm_80")


def _report(msg: str) -> None:
    warnings.warn(msg, stacklevel=2)  # listed in pytest's warnings summary, also under -q


class Case:
    """Random K/V written through the reference quantizer into a backend-shaped cache."""

    def __init__(self, kv_dtype, seq_lens, *, per_head=True, hq=32, hkv=8, d=128, bs=16, max_seq_len=None, seed=0):
        g = torch.Generator(device="cuda").manual_seed(seed)
        self.kv_dtype, self.hq, self.hkv, self.d, self.bs = kv_dtype, hq, hkv, d, bs
        self.max_seq_len = max_seq_len or max(seq_lens)
        self.max_blocks = math.ceil(self.max_seq_len / bs)
        self.num_blocks = len(seq_lens) * self.max_blocks + 7
        kv = torch.zeros(KVQuantAttentionBackend.get_kv_cache_shape(self.num_blocks, bs, hkv, d, "fp8"),
                         dtype=torch.uint8, device="cuda")  # fmt: skip
        self.kc, self.vc = compat.split_kv_cache(kv, d)
        n_tok = self.num_blocks * bs
        k = torch.randn(n_tok, hkv, d, device="cuda", generator=g) * (1 + torch.arange(hkv, device="cuda"))[:, None]
        v = torch.randn(n_tok, hkv, d, device="cuda", generator=g)
        if per_head == "channel":  # [hkv, d]: one scale per KV head and channel
            k *= torch.exp(torch.randn(hkv, d, device="cuda", generator=g))
            self.ks = (k.abs().amax(dim=0) / QMAX[kv_dtype]).float()
            self.vs = (v.abs().amax(dim=0) / QMAX[kv_dtype]).float()
        else:
            dims = (0, 2) if per_head else None
            self.ks = (k.abs().amax(dim=dims) / QMAX[kv_dtype]).reshape(-1).float()
            self.vs = (v.abs().amax(dim=dims) / QMAX[kv_dtype]).reshape(-1).float()
        quantize_to_cache_ref(k, v, self.kc, self.vc, torch.arange(n_tok, device="cuda"), self.ks, self.vs, kv_dtype)
        self.cache = PagedKVCache(self.kc, self.vc, self.ks, self.vs, kv_dtype)
        del k, v
        self.set_batch(seq_lens, seed)

    def set_batch(self, seq_lens, seed):
        """New lengths, shuffled block tables and queries, written in place (graph-safe)."""
        g = torch.Generator(device="cuda").manual_seed(seed + 1)
        n = len(seq_lens)
        perm = torch.randperm(self.num_blocks, device="cuda", generator=g)[: n * self.max_blocks].to(torch.int32)
        q = (torch.randn(n, self.hq, self.d, device="cuda", generator=g) * 3).to(torch.bfloat16)
        lens = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
        if not hasattr(self, "q"):
            self.bt, self.q, self.lens = perm.view(n, self.max_blocks), q, lens
            self.qsl = torch.arange(n + 1, dtype=torch.int32, device="cuda")
        else:
            self.bt.copy_(perm.view(n, self.max_blocks))
            self.q.copy_(q)
            self.lens.copy_(lens)
        self.lens_cpu = self.lens.cpu()

    def ref(self, window=None, cap=None, q=None):
        q = self.q if q is None else q
        return paged_decode_attention_ref(q, self.kc, self.vc, self.bt, self.lens, self.ks, self.vs, self.kv_dtype,
                                          1 / math.sqrt(self.d), sliding_window=window, logits_soft_cap=cap)  # fmt: skip


def _make(kernel, case, window=None, cap=None):
    common = dict(num_heads=case.hq, num_kv_heads=case.hkv, head_size=case.d, scale=1 / math.sqrt(case.d),
                  sliding_window=window, logits_soft_cap=cap, kv_dtype=case.kv_dtype, model_dtype=torch.bfloat16,
                  device="cuda", max_num_seqs=max(64, case.q.shape[0]))  # fmt: skip
    try:
        per_head, per_channel = case.ks.numel() > 1, case.ks.dim() == 2
        host = {} if per_head else dict(k_scale=case.ks, v_scale=case.vs)  # as the backend passes them
        runner = create_runner(kernel, per_head=per_head, per_channel=per_channel, **common, **host)
        planner = create_planner(kernel, block_size=case.bs, max_num_blocks_per_seq=case.max_blocks,
                                 per_channel=per_channel, **common)  # fmt: skip
    except KVQuantConfigError as e:
        if any(m in str(e) for m in MISSING):
            pytest.skip(str(e))
        raise
    assert runner.name == planner.kernel == kernel
    return runner, planner


def _plan(case, planner, use_cuda_graph=False):
    return DecodePlan.build(case.bt, case.lens, case.qsl, case.max_seq_len, planner=planner,
                            seq_lens_cpu=case.lens_cpu, use_cuda_graph=use_cuda_graph)  # fmt: skip


def _errors(out, ref):
    diff = (out.float() - ref.float()).abs()
    return diff.max().item(), (diff.norm() / ref.float().norm()).item()


def _check(kernel, out, case, window=None, cap=None, what=""):
    assert torch.isfinite(out).all()
    tol, rel_l2 = TOL[kernel]
    ref = case.ref(window, cap)
    if kernel == "fa3":  # the fp8 query's own cost, then FA3 vs the same fp8 query
        max_err, l2 = _errors(out, ref)
        _report(f"fa3 accuracy {what}: vs bf16-query reference max_abs={max_err:.4f} rel_l2={l2:.4f}")
        assert l2 < 0.15
        ref = case.ref(window, cap, q=case.q.float().clamp(-448, 448).to(FP8).to(torch.bfloat16))
    elif kernel == "flashinfer" and case.ks.numel() > 1:  # per-KV-head / channel: q * k_scale rounded to bf16
        max_err, l2 = _errors(out, ref)
        _report(f"flashinfer folded-scale accuracy {what}: vs reference max_abs={max_err:.4f} rel_l2={l2:.4f}")
        ks = case.ks.reshape(case.hkv, -1).repeat_interleave(case.hq // case.hkv, dim=0)[None]
        ref = case.ref(window, cap, q=(case.q.float() * ks).to(torch.bfloat16).float() / ks)
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    assert _errors(out, ref)[1] < rel_l2


LENS = [1, 15, 16, 17, 200, 1000, 2047, 2048, 2049, 3333, 4096, 77, 512, 1, 640, 4000]


@pytest.mark.parametrize("kernel, kv_dtype", KERNELS)
@pytest.mark.parametrize("per_head", [False, True, "channel"])
def test_kernel_matches_reference(kernel, kv_dtype, per_head):
    case = Case(kv_dtype, LENS, per_head=per_head)
    if kernel == "fa3" and per_head == "channel":  # FA3's descales are per KV head: refused at start-up
        with pytest.raises(KVQuantConfigError, match="cannot apply per-channel scales"):
            _make(kernel, case)
        return
    runner, planner = _make(kernel, case)
    out = torch.full_like(case.q, float("nan"))
    runner.run(case.q, case.cache, _plan(case, planner), out)
    _check(kernel, out, case, what=f"per_head={per_head}")


@pytest.mark.parametrize("kernel, kv_dtype", KERNELS)
@pytest.mark.parametrize("window, cap", [(1000, None), (None, 30.0), (256, 50.0)])
def test_window_and_soft_cap(kernel, kv_dtype, window, cap):
    case = Case(kv_dtype, LENS[:8], hq=16, hkv=4, d=64, seed=3)
    runner, planner = _make(kernel, case, window, cap)
    out = torch.full_like(case.q, float("nan"))
    runner.run(case.q, case.cache, _plan(case, planner), out)
    _check(kernel, out, case, window, cap, what=f"window={window} cap={cap}")


@pytest.mark.parametrize("kernel, kv_dtype", KERNELS)
def test_long_context_batch(kernel, kv_dtype):
    case = Case(kv_dtype, [16384, 9000, 32768, 1, 12345, 30000, 8192, 4097], per_head=True, seed=5)
    runner, planner = _make(kernel, case)
    out = torch.full_like(case.q, float("nan"))
    runner.run(case.q, case.cache, _plan(case, planner, use_cuda_graph=True), out)
    _check(kernel, out, case, what="long context")


@pytest.mark.parametrize("kernel, kv_dtype", KERNELS)
def test_cuda_graph_replay_after_replanning(kernel, kv_dtype):
    """Capture once; each later batch only rebuilds the plan (persistent buffers) and replays."""
    case = Case(kv_dtype, [100, 2000, 50, 4096, 1, 3000, 17, 900], max_seq_len=4096, seed=7)
    runner, planner = _make(kernel, case)
    out = torch.full_like(case.q, float("nan"))
    plan = _plan(case, planner, use_cuda_graph=True)
    run = lambda p: runner.run(case.q, case.cache, p, out)  # noqa: E731
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        run(plan)  # warm up (compiles, JIT) outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run(plan)
    for step, lens in enumerate(([4000, 1, 333, 2048, 4096, 10, 1500, 64], [7, 4096, 4096, 2, 999, 3000, 128, 1])):
        case.set_batch(lens, seed=11 + step)
        _plan(case, planner, use_cuda_graph=True)  # same buffers the graph reads
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        _check(kernel, out, case, what=f"graph replay {step}")
