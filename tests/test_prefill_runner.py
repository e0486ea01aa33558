"""`PrefillRunner` / `PrefillPlan`: what the backend calls, on every path it can take.

Batches are laid out as vLLM hands them to the backend: decodes (one token) first, then
prefills with and without cached context, then padded requests (0 tokens) and padding rows.
The runner writes the prefill rows only (the ``fa3`` path over all rows also writes decode
rows, which the decode kernel overwrites afterwards). Paths here: ``triton`` (Triton
interpreter), ``reference`` (PyTorch, vLLM's CPU build) and ``fa3`` with a stand-in for
``flash_attn_varlen_func`` that checks the arguments against FA3's documented contract and
computes what FA3 computes (`prefill_fresh_attention_ref`). The real FA3 runs in the GPU tests.
Tolerances as in test_prefill_attention.py (fp16 1e-2, bf16 3e-2).
"""

from __future__ import annotations

import _triton_env  # noqa: F401  (sets TRITON_INTERPRET=1 before triton is imported)
import pytest
import torch
from test_decode_attention import paged
from test_prefill_attention import TOL, make_case, reference

from vllm_kvquant import prefill as prefill_mod
from vllm_kvquant.config import PREFILL_CHOICES, KVQuantConfig
from vllm_kvquant.errors import KVQuantConfigError
from vllm_kvquant.kernels.paged_cache import PagedKVCache
from vllm_kvquant.kernels.reference import PREFILL_MODES, prefill_fresh_attention_ref
from vllm_kvquant.prefill import PrefillPlan, PrefillRunner

# decodes first (vLLM reorders them so), prefills (no context / context on and off block
# boundaries / two tokens), padded requests
SEQS = ((30, 1), (5, 1), (0, 33), (16, 7), (21, 20), (9, 2), (0, 0), (0, 0))
NUM_DECODES = 2


class FakeFA3:
    """`flash_attn_varlen_func` as the runner must call it (FA3 varlen, causal self-attention)."""

    def __init__(self, scale, window, cap):
        self.scale, self.window, self.cap, self.calls = scale, window, cap, 0

    def __call__(self, *, q, k, v, out, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                 causal, window_size, softcap, return_softmax_lse, fa_version, num_splits):  # fmt: skip
        self.calls += 1
        assert fa_version == 3 and causal is True and return_softmax_lse is True and num_splits >= 0
        assert cu_seqlens_k is cu_seqlens_q and cu_seqlens_q.dtype == torch.int32 and int(cu_seqlens_q[0]) == 0
        assert out.shape == q.shape and out.dtype == q.dtype and q.stride(-1) == 1 and out.stride(-1) == 1
        qlens = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).tolist()
        assert max_seqlen_q == max_seqlen_k >= max(qlens)
        assert softmax_scale == self.scale and isinstance(softcap, float) and softcap == (self.cap or 0.0)
        assert window_size == (None if not self.window else [self.window - 1, 0])  # (left, right) inclusive
        fresh, lse = prefill_fresh_attention_ref(
            q.cpu(), k.cpu(), v.cpu(), cu_seqlens_q.cpu(), softmax_scale, self.window, self.cap,
        )  # fmt: skip
        s, e = int(cu_seqlens_q[0]), int(cu_seqlens_q[-1])
        out[s:e] = fresh[s:e].to(out.device)  # FA3 writes the rows of its sequences only
        return out, lse.to(q.device)  # [num_heads, total_q] fp32, natural log


def _batch(act_dtype=torch.bfloat16, kv_dtype="int8", group=2, seqs=SEQS, pad_tokens=6, block_size=16, **kw):
    case = make_case(act_dtype=act_dtype, kv_dtype=kv_dtype, group=group, block_size=block_size, seqs=seqs,
                     pad_tokens=pad_tokens, write_new=True, **kw)  # fmt: skip
    qsl = case["query_start_loc"]
    case["seq_lens"] = case["context_lens"] + (qsl[1:] - qsl[:-1])
    return case


def _runner(case, mode, path, monkeypatch, window=None, cap=None):
    hq, d = case["query"].shape[1:]
    scale = d**-0.5
    if path == "fa3":
        fake = FakeFA3(scale, window, cap)
        monkeypatch.setattr(prefill_mod, "fa3_unavailable_reason", lambda device, head_size: None)
        monkeypatch.setattr(prefill_mod, "_flash_attn_varlen_func", lambda: fake)
    if path == "reference":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    runner = PrefillRunner(num_heads=hq, num_kv_heads=case["key"].shape[1], head_size=d, scale=scale,
                           sliding_window=window, logits_soft_cap=cap, mode=mode, device=case["query"].device)  # fmt: skip
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return runner


def _plan(case, all_rows, **kw):
    qsl_cpu = case["query_start_loc"].cpu()
    qlens = (qsl_cpu[1:] - qsl_cpu[:-1])[NUM_DECODES:]
    return PrefillPlan.build(
        case["query_start_loc"], case["seq_lens"], case["block_table"], num_tokens=case["query"].shape[0],
        max_query_len=case["query"].shape[0] if all_rows else int(qlens.max()), all_rows=all_rows,
        num_decodes=NUM_DECODES, num_decode_tokens=int(qsl_cpu[NUM_DECODES]), **kw,
    )  # fmt: skip


def _reference(case, **kw):
    return reference({k: v for k, v in case.items() if k != "seq_lens"}, **kw)


def _check(case, runner, plan, window=None, cap=None):
    q = case["query"]
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=q.device)
    runner.run(q, case["key"], case["value"], paged(case), plan, out)
    out = out.cpu()
    want = _reference(case, mode=runner.mode, sliding_window=window, logits_soft_cap=cap)
    qsl = case["query_start_loc"].tolist()
    for i in range(len(qsl) - 1):
        s, e = qsl[i], qsl[i + 1]
        if i < NUM_DECODES:  # served by the decode kernel
            if not (runner.path == "fa3" and plan.all_rows):
                assert out[s:e].isnan().all(), f"decode request {i} was written"
            continue
        assert not out[s:e].isnan().any(), f"prefill request {i}: rows not written"
        torch.testing.assert_close(out[s:e].float(), want[s:e].float(), **TOL[q.dtype])
    assert out[qsl[-1] :].isnan().all(), "padding rows were written"


@pytest.mark.parametrize("all_rows", [False, True], ids=["prefill-rows", "all-rows"])
@pytest.mark.parametrize(
    "mode,path", [("bf16", "triton"), ("bf16", "fa3"), ("bf16", "reference"), ("quantized", "triton"),
                  ("quantized", "fa3"), ("quantized", "reference")],
)  # fmt: skip
def test_runner_matches_reference(mode, path, all_rows, monkeypatch):
    case = _batch()
    runner = _runner(case, mode, path, monkeypatch)
    assert runner.path == path and runner.mode == mode
    _check(case, runner, _plan(case, all_rows))
    if path == "fa3" and mode == "quantized":  # no workspace in the plan: one Triton pass, FA3 not called
        assert runner._fa.calls == 0


@pytest.mark.parametrize("mode,path", [("bf16", "fa3"), ("bf16", "triton"), ("quantized", "triton")])
@pytest.mark.parametrize("window,cap", [(6, None), (None, 4.0), (11, 7.0)])
def test_runner_window_and_soft_cap(mode, path, window, cap, monkeypatch):
    case = _batch(act_dtype=torch.float16, kv_dtype="fp8_e4m3", group=4, q_mult=3.0)
    runner = _runner(case, mode, path, monkeypatch, window, cap)
    for all_rows in (False, True):
        _check(case, runner, _plan(case, all_rows), window, cap)


def test_fa3_path_skips_context_pass_without_context(monkeypatch):
    """has_context=False: FA3 alone (its output is final); the result is still right."""
    case = _batch(seqs=((0, 1), (0, 1), (0, 17), (0, 9)), pad_tokens=0)
    runner = _runner(case, "bf16", "fa3", monkeypatch)
    plan = _plan(case, False)
    plan.has_context = False

    def no_context_pass(*args, **kwargs):
        raise AssertionError("the context kernel ran although no request has context")

    monkeypatch.setattr(prefill_mod, "launch_prefill", no_context_pass)
    _check(case, runner, plan)
    assert runner._fa.calls == 1


def test_plan_build():
    qsl = torch.tensor([0, 1, 2, 35, 42, 62, 62], dtype=torch.int32)
    seq_lens = torch.tensor([31, 6, 33, 23, 41, 0], dtype=torch.int32)
    bt = torch.arange(24, dtype=torch.int32).view(6, 4)
    plan = PrefillPlan.build(qsl, seq_lens, bt, num_tokens=70, max_query_len=33, num_decodes=2, num_decode_tokens=2)
    assert plan.query_start_loc.tolist() == [0, 33, 40, 60, 60] and plan.query_start_loc.dtype == torch.int32
    assert plan.row_start == 2 and plan.num_tokens == 68 and plan.num_reqs == 4 and not plan.all_rows
    assert plan.context_lens.tolist() == [0, 16, 21, 0]
    assert plan.block_table.data_ptr() == bt[2].data_ptr()
    full = PrefillPlan.build(qsl, seq_lens, bt, num_tokens=70, max_query_len=70, num_decodes=2, num_decode_tokens=2,
                             all_rows=True)  # fmt: skip
    assert full.query_start_loc is qsl and full.seq_lens is seq_lens and full.row_start == 0 and full.num_reqs == 6
    assert full.context_lens.tolist() == [30, 5, 0, 16, 21, 0]
    no_decodes = PrefillPlan.build(qsl, seq_lens, bt, num_tokens=70, max_query_len=33)
    assert no_decodes.query_start_loc is qsl  # no device op when nothing is re-based


@pytest.mark.parametrize("path", ["triton", "reference"])
def test_quantized_runner_repeatable_with_prefix_cache(path, monkeypatch):
    """A 50-token prompt prefilled whole, or with its first 32 tokens from the prefix cache next
    to another request: bit-identical rows in mode quantized."""
    base = _batch(kv_dtype="fp8_e4m3", seqs=((0, 50),), pad_tokens=0)
    runner = _runner(base, "quantized", path, monkeypatch)
    out1 = torch.empty_like(base["query"])
    plan1 = PrefillPlan.build(base["query_start_loc"], base["seq_lens"], base["block_table"], num_tokens=50, max_query_len=50)
    args = (paged(base),)
    runner.run(base["query"], base["key"], base["value"], *args, plan1, out1)
    # Second time: a decode in front, 32 tokens cached, 18 new ones.
    q2 = torch.cat([base["query"][:1], base["query"][32:]])
    dev = q2.device
    bt2 = torch.cat([base["block_table"][:1], base["block_table"][:1]])
    plan2 = PrefillPlan.build(
        torch.tensor([0, 1, 19], dtype=torch.int32, device=dev), torch.tensor([7, 50], dtype=torch.int32, device=dev),
        bt2, num_tokens=19, max_query_len=18, num_decodes=1, num_decode_tokens=1,
    )  # fmt: skip
    out2 = torch.empty_like(q2)
    runner.run(q2, q2[:, :2], q2[:, :2], *args, plan2, out2)  # key/value are never read in mode quantized
    assert torch.equal(out2[1:], out1[32:])


def test_runner_validation(monkeypatch):
    ok = dict(num_heads=8, num_kv_heads=2, head_size=64, scale=0.125, sliding_window=None, logits_soft_cap=None,
              mode="bf16", device="cpu")  # fmt: skip
    for change, match in [
        (dict(mode="int8"), "mode 'int8' is not one of"),
        (dict(head_size=72), "head size 72"),
        (dict(num_kv_heads=3), "8 query heads are not a multiple of 3"),
        (dict(sliding_window=-4), "sliding_window must be an int >= 0"),
        (dict(logits_soft_cap=-1.0), "logits_soft_cap must be >= 0"),
        (dict(path="cuda"), "path 'cuda' is not one of"),
        (dict(path="fa3"), "path 'fa3' is not available: device cpu is not CUDA"),
    ]:
        with pytest.raises(KVQuantConfigError, match=match):
            PrefillRunner(**{**ok, **change})
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(KVQuantConfigError, match="path 'triton' needs a CUDA device or TRITON_INTERPRET=1"):
        PrefillRunner(**ok, path="triton")
    assert PrefillRunner(**ok).path == "reference"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    runner = PrefillRunner(**ok)
    assert runner.path == "triton" and "not CUDA" in runner.why_not_fa3


def test_config_prefill_option():
    assert PREFILL_CHOICES == PREFILL_MODES
    assert KVQuantConfig.from_additional_config({}).prefill == "bf16"
    assert KVQuantConfig.from_additional_config({"kvquant": {"prefill": "quantized"}}).prefill == "quantized"
    with pytest.raises(KVQuantConfigError, match=r"\['prefill'\] = 'fp8' is not supported; use one of \['bf16', 'quantized'\]"):
        KVQuantConfig.from_additional_config({"kvquant": {"prefill": "fp8"}})


# ------------------------------------------------------------------ GPU: the real FA3 + merge path


def _gpu_fa3_reason():
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    return prefill_mod.fa3_unavailable_reason(torch.device("cuda"), 128)


@pytest.mark.gpu
@pytest.mark.parametrize("act_dtype,kv_dtype", [(torch.bfloat16, "fp8_e4m3"), (torch.float16, "int8"), (torch.bfloat16, "int8")])
@pytest.mark.parametrize(
    "head_size,group,block_size,window,cap",
    [(128, 4, 16, None, None), (64, 1, 32, None, None), (96, 8, 64, None, None), (256, 2, 16, None, None),
     (128, 4, 16, 700, None), (128, 2, 32, None, 30.0), (80, 4, 16, 64, 20.0)],
)  # fmt: skip
def test_gpu_fa3_merge_matches_reference(act_dtype, kv_dtype, head_size, group, block_size, window, cap):
    """FA3 (fresh tokens) + Triton MERGE (8-bit context) vs the fp32 reference, eager and all-rows,
    at larger shapes: decodes, a long pure prefill, chunks over long contexts, a 2-token prefill,
    padded requests. Tolerance: bf16 atol = rtol = 3e-2, fp16 1e-2 (the kernels' own)."""
    reason = _gpu_fa3_reason()
    if reason:
        pytest.skip(f"FA3 unavailable: {reason}")
    seqs = ((700, 1), (0, 1), (0, 1500), (2048, 512), (1000, 77), (517, 2), (3, 300), (0, 0))
    case = _batch(act_dtype=act_dtype, kv_dtype=kv_dtype, group=group, seqs=seqs, pad_tokens=13, device="cuda",
                  head_size=head_size, block_size=block_size, q_mult=2.0)  # fmt: skip
    runner = PrefillRunner(num_heads=case["query"].shape[1], num_kv_heads=case["key"].shape[1], head_size=head_size,
                           scale=head_size**-0.5, sliding_window=window, logits_soft_cap=cap, mode="bf16",
                           device="cuda")  # fmt: skip
    assert runner.path == "fa3"
    for all_rows in (False, True):
        _check(case, runner, _plan(case, all_rows), window, cap)
    triton_runner = PrefillRunner(num_heads=case["query"].shape[1], num_kv_heads=case["key"].shape[1],
                                  head_size=head_size, scale=head_size**-0.5, sliding_window=window,
                                  logits_soft_cap=cap, mode="bf16", device="cuda", path="triton")  # fmt: skip
    _check(case, triton_runner, _plan(case, False), window, cap)


@pytest.mark.gpu
def test_gpu_fa3_merge_under_cuda_graph():
    """All-rows plan captured once, replayed with another batch composition in the same buffers."""
    reason = _gpu_fa3_reason()
    if reason:
        pytest.skip(f"FA3 unavailable: {reason}")
    a = _batch(seqs=((300, 1), (0, 400), (1000, 200), (0, 0)), pad_tokens=0, device="cuda", head_size=128, group=4)
    b = _batch(seqs=((0, 1), (1000, 200), (50, 1), (0, 399)), pad_tokens=0, device="cuda", head_size=128, group=4, seed=1)
    assert a["query"].shape == b["query"].shape and a["key_cache"].shape == b["key_cache"].shape
    runner = PrefillRunner(num_heads=8, num_kv_heads=2, head_size=128, scale=128**-0.5, sliding_window=None,
                           logits_soft_cap=None, mode="bf16", device="cuda")  # fmt: skip
    bufs = {k: v.clone() for k, v in a.items() if isinstance(v, torch.Tensor)}
    n = bufs["query"].shape[0]
    plan = PrefillPlan.build(bufs["query_start_loc"], bufs["seq_lens"], bufs["block_table"], num_tokens=n,
                             max_query_len=n, all_rows=True)  # fmt: skip
    out = torch.empty_like(bufs["query"])

    cache = PagedKVCache(bufs["key_cache"], bufs["value_cache"], bufs["k_scale"], bufs["v_scale"], "int8")

    def step():
        runner.run(bufs["query"], bufs["key"], bufs["value"], cache, plan, out)

    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for case in (a, b):
        for k, v in case.items():
            if isinstance(v, torch.Tensor):
                bufs[k].copy_(v)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        want = _reference(case)
        qsl = case["query_start_loc"].tolist()
        for i in range(len(qsl) - 1):
            if qsl[i + 1] - qsl[i] >= 2:
                torch.testing.assert_close(out[qsl[i] : qsl[i + 1]].float().cpu(), want[qsl[i] : qsl[i + 1]].float(),
                                           **TOL[torch.bfloat16])  # fmt: skip


# ------------------------------------------------------------------ benchmark plumbing


def test_prefill_benchmark_smoke(tmp_path):
    """``python -m benchmarks.kernels.prefill --smoke``: our rows run the runner's code path and match the
    reference; FA3 and vLLM rows are skipped with their reason; the JSON has its top-level keys."""
    from benchmarks.kernels import prefill as prefill_bench

    out = tmp_path / "prefill.json"
    result = prefill_bench.main(["--smoke", "--shapes", "chunk24-ctx50", "--out", str(out)])
    assert out.exists() and set(result) >= {"device", "versions", "command", "copy_gbps", "rows"}
    rows = {(r["name"], r["kv_dtype"]): r for r in result["rows"]}
    for kind in ("fp8", "int8"):
        for name in ("kvquant-prefill-triton", "kvquant-prefill-quantized-triton"):
            r = rows[(name, kind)]
            assert r["status"] == "ok" and r["us"] > 0 and r["max_abs_err_ref"] < 3e-2, r
        for name in ("kvquant-prefill-fa3", "kvquant-prefill-fa3-merge", "kvquant-prefill-quantized",
                     "kvquant-prefill-fa3-default-ws"):
            assert rows[(name, kind)]["status"] == "skipped"
        assert rows[("kvquant-prefill-fa3-default-ws", kind)]["workspace_slabs"] == 1  # 256 MiB holds the smoke shape
    assert "not CUDA" in rows[("kvquant-prefill-fa3-allrows", "fp8")]["reason"]
    assert rows[("vllm-fa3-prefill", "bf16")]["reason"] == "needs a CUDA GPU"
    assert len(rows) == 15
