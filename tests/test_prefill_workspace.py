"""The fa3 prefill path over a 16-bit workspace: `kernels.context_fill` and FA3's paged call.

`fill_context` (Triton interpreter) against its PyTorch reference on a grid of formats, dtypes,
head sizes, KV heads, block sizes, scale granularities and ragged contexts; then the runner's
fa3 path with a stand-in for FA3's *paged* varlen call (checks the arguments against FA3's
contract and computes what FA3 computes: causal bottom-right, window, soft cap, GQA) against
the prefill reference; and the fallbacks (workspace too small, CUDA-graph plans) to the merge
path. The real FA3 runs in the GPU test at the end.
"""

from __future__ import annotations

import _triton_env  # noqa: F401  (sets TRITON_INTERPRET=1 before triton is imported)
import pytest
import torch
from test_prefill_runner import NUM_DECODES, FakeFA3, _batch, _check, _reference, paged
from test_prefill_runner import _plan as runner_plan

from vllm_kvquant import prefill as prefill_mod
from vllm_kvquant.kernels.context_fill import fill_context, fill_context_ref, workspace_offsets
from vllm_kvquant.kernels.paged_cache import PagedKVCache
from vllm_kvquant.prefill import ContextWorkspace, PrefillPlan, PrefillRunner


class FakePagedFA3(FakeFA3):
    """FA3's varlen call in both forms the runner uses: fresh tokens (the merge path, checked by
    `FakeFA3`) and paged K/V with ``seqused_k`` and ``block_table`` (the workspace path)."""

    def __init__(self, scale, window, cap):
        super().__init__(scale, window, cap)
        self.paged_calls = 0

    def __call__(self, **kw):
        if "block_table" not in kw:
            return super().__call__(**kw)
        self.paged_calls += 1
        self.num_splits = kw.get("num_splits")
        q, k, v, out = kw["q"], kw["k"], kw["v"], kw["out"]
        qsl, used, table = kw["cu_seqlens_q"], kw["seqused_k"], kw["block_table"]
        assert kw["fa_version"] == 3 and kw["causal"] is True and kw["softmax_scale"] == self.scale
        assert kw["window_size"] == (None if not self.window else [self.window - 1, 0])
        assert kw["softcap"] == (self.cap or 0.0) and "cu_seqlens_k" not in kw and "return_softmax_lse" not in kw
        assert k.dtype == v.dtype == q.dtype and k.is_contiguous() and table.dtype == torch.int32
        assert qsl.dtype == used.dtype == torch.int32 and used.shape[0] == qsl.shape[0] - 1 == table.shape[0]
        bs, hkv, d = k.shape[1:]
        group = q.shape[1] // hkv
        qlens = (qsl[1:] - qsl[:-1]).tolist()
        assert kw["max_seqlen_q"] >= max(qlens) and kw["max_seqlen_k"] >= int(used.max())
        for i, (s, n) in enumerate(zip(qsl[:-1].tolist(), used.tolist())):
            nq = qlens[i]
            if nq == 0:
                continue
            pages = table[i, : -(-n // bs)].long()
            assert int(pages.max()) < k.shape[0], "block_table points past the workspace"
            kk = k[pages].reshape(-1, hkv, d)[:n].float().repeat_interleave(group, dim=1)
            vv = v[pages].reshape(-1, hkv, d)[:n].float().repeat_interleave(group, dim=1)
            qq = q[s : s + nq].float()
            scores = torch.einsum("qhd,khd->hqk", qq, kk) * self.scale
            if self.cap:
                scores = self.cap * torch.tanh(scores / self.cap)
            pos = torch.arange(n - nq, n)[:, None]  # bottom-right aligned
            key = torch.arange(n)[None, :]
            visible = key <= pos
            if self.window:
                visible &= key > pos - self.window
            scores = scores.masked_fill(~visible.to(scores.device), float("-inf"))
            out[s : s + nq] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), vv).to(out.dtype)
        return out


def _workspace_case(kv_dtype, act_dtype, head_size, hkv, block_size, per_head, seed):
    g = torch.Generator().manual_seed(seed)
    seqs = ((0, 9), (16, 7), (21, 20), (3, 1), (40, 2))  # (context, new): none, on/off page boundaries
    nb = sum(-(-(c + n) // block_size) for c, n in seqs) + 3
    store = torch.int8 if kv_dtype == "int8" else torch.float8_e4m3fn
    raw = torch.randn(nb, hkv, block_size, 2 * head_size, generator=g) * 50
    raw = raw.round().clamp(-127, 127) if kv_dtype == "int8" else raw.clamp(-448, 448)
    kv = raw.to(store).view(torch.uint8)
    key_cache, value_cache = kv.transpose(1, 2).split(head_size, dim=-1)  # the backend's views
    total = sum(n for _, n in seqs)
    qkv = torch.randn(total, 3 * hkv, head_size, generator=g).to(act_dtype)  # key/value: strided views
    key, value = qkv[:, :hkv], qkv[:, hkv : 2 * hkv]
    perm = torch.randperm(nb, generator=g).int()
    max_pages = max(-(-(c + n) // block_size) for c, n in seqs)
    table = torch.zeros(len(seqs), max_pages + 2, dtype=torch.int32)
    used = 0
    for i, (c, n) in enumerate(seqs):
        p = -(-(c + n) // block_size)
        table[i, :p] = perm[used : used + p]
        used += p
    qsl = torch.tensor([0] + [n for _, n in seqs], dtype=torch.int32).cumsum(0).int()
    seq_lens = torch.tensor([c + n for c, n in seqs], dtype=torch.int32)
    shape = (hkv, head_size) if per_head == "channel" else (hkv if per_head else 1,)  # channel: per head and channel
    k_scale = torch.rand(*shape, generator=g) * 0.02 + 0.005
    v_scale = torch.rand(*shape, generator=g) * 0.02 + 0.005
    return dict(key=key, value=value, cache=PagedKVCache(key_cache, value_cache, k_scale, v_scale, kv_dtype),
                block_table=table, query_start_loc=qsl, seq_lens=seq_lens, max_pages=max_pages)  # fmt: skip


_GRID = [
    (kvd, act, hs, hkv, bs, per_head)
    for kvd in ("fp8_e4m3", "int8")
    for act, hs, hkv, bs, per_head in (
        (torch.bfloat16, 128, 2, 16, True), (torch.float16, 64, 1, 16, False), (torch.bfloat16, 80, 3, 32, True),
        (torch.float16, 256, 2, 16, True), (torch.bfloat16, 64, 8, 64, False), (torch.bfloat16, 80, 3, 16, "channel"),
        (torch.float16, 128, 2, 32, "channel"),
    )
]  # fmt: skip


@pytest.mark.parametrize("kvd,act,hs,hkv,bs,per_head", _GRID)
def test_fill_context_matches_reference(kvd, act, hs, hkv, bs, per_head):
    case = _workspace_case(kvd, act, hs, hkv, bs, per_head, seed=hs + hkv + bs)
    n = case["seq_lens"].shape[0]
    offsets = workspace_offsets(case["seq_lens"], bs)
    pages = int(((case["seq_lens"] + bs - 1) // bs).sum())
    assert offsets.tolist()[0] == 0 and offsets.dtype == torch.int32
    results = []
    for fill in (fill_context, fill_context_ref):
        ws_k = torch.full((pages + 2, bs, hkv, hs), float("nan"), dtype=act)
        ws_v = torch.full_like(ws_k, float("nan"))
        args = {k: v for k, v in case.items() if k != "max_pages"}
        if fill is fill_context:
            fill(**args, ws_key=ws_k, ws_value=ws_v, offsets=offsets, num_reqs=n, max_pages=case["max_pages"])
        else:
            fill(**args, ws_key=ws_k, ws_value=ws_v, offsets=offsets, num_reqs=n)
        results.append((ws_k, ws_v))
    (k1, v1), (k2, v2) = results
    # exact, except that the interpreter (numpy) truncates fp32 -> bf16 where CUDA rounds: one ulp
    tol = dict(atol=0, rtol=torch.finfo(act).eps if act == torch.bfloat16 else 0)
    torch.testing.assert_close(k1, k2, equal_nan=True, **tol)
    torch.testing.assert_close(v1, v2, equal_nan=True, **tol)
    # every token of every sequence written, nothing else; new tokens copied exactly
    qsl, lens, offs = case["query_start_loc"].tolist(), case["seq_lens"].tolist(), offsets.tolist()
    for i in range(n):
        flat = k1[offs[i] : offs[i] + -(-lens[i] // bs)].reshape(-1, hkv, hs)
        assert not flat[: lens[i]].isnan().any() and flat[lens[i] :].isnan().all()
        new = qsl[i + 1] - qsl[i]
        torch.testing.assert_close(flat[lens[i] - new : lens[i]], case["key"][qsl[i] : qsl[i + 1]], atol=0, rtol=0)
    assert k1[pages:].isnan().all(), "wrote past the batch's pages"


@pytest.mark.parametrize("kvd,act,hs,hkv,bs,per_head", [_GRID[0], _GRID[7]])
def test_fill_from_cache_only_matches_reference(kvd, act, hs, hkv, bs, per_head):
    """Prefill mode quantized: the new tokens too come from the cache (``key``/``value`` unread)."""
    case = _workspace_case(kvd, act, hs, hkv, bs, per_head, seed=11)
    n, max_pages = case["seq_lens"].shape[0], case.pop("max_pages")
    offsets = workspace_offsets(case["seq_lens"], bs)
    pages = int(((case["seq_lens"] + bs - 1) // bs).sum())
    case["key"] = case["value"] = torch.full_like(case["key"], float("nan"))  # never read
    results = []
    for fill, extra in ((fill_context, {"max_pages": max_pages}), (fill_context_ref, {})):
        ws_k = torch.full((pages, bs, hkv, hs), float("nan"), dtype=act)
        ws_v = torch.full_like(ws_k, float("nan"))
        fill(**case, ws_key=ws_k, ws_value=ws_v, offsets=offsets, num_reqs=n, from_cache_only=True, **extra)
        results.append((ws_k, ws_v))
    (k1, v1), (k2, v2) = results
    tol = dict(atol=0, rtol=torch.finfo(act).eps if act == torch.bfloat16 else 0)
    torch.testing.assert_close(k1, k2, equal_nan=True, **tol)
    torch.testing.assert_close(v1, v2, equal_nan=True, **tol)
    ks = case["cache"].k_scale.float().view(-1, 1)
    lens, offs = case["seq_lens"].tolist(), offsets.tolist()
    for i in range(n):  # every token of the sequence = its cache entry * scale
        p = -(-lens[i] // bs)
        want = (case["cache"].key_cache[case["block_table"][i, :p].long()].float() * ks).reshape(-1, hkv, hs)[: lens[i]]
        got = k1[offs[i] : offs[i] + p].reshape(-1, hkv, hs)[: lens[i]]
        torch.testing.assert_close(got.float(), want.to(act).float(), **tol)


def test_fill_context_dequantizes_with_scales():
    case = _workspace_case("int8", torch.float32, 64, 2, 16, True, seed=5)
    bs = 16
    offsets = workspace_offsets(case["seq_lens"], bs)
    ws_k = torch.zeros(40, bs, 2, 64)
    ws_v = torch.zeros_like(ws_k)
    args = {k: v for k, v in case.items() if k != "max_pages"}
    fill_context_ref(**args, ws_key=ws_k, ws_value=ws_v, offsets=offsets, num_reqs=5)
    # request 1: context 16 tokens = its first page exactly, from cache page table[1, 0]
    src = int(case["block_table"][1, 0])
    want = case["cache"].key_cache[src].float() * case["cache"].k_scale.view(1, 2, 1)
    torch.testing.assert_close(ws_k[int(offsets[1])], want)
    channel = _workspace_case("int8", torch.float32, 64, 2, 16, "channel", seed=5)  # one scale per head and channel
    fill_context_ref(**{k: v for k, v in channel.items() if k != "max_pages"}, ws_key=ws_k, ws_value=ws_v,
                     offsets=offsets, num_reqs=5)  # fmt: skip
    want = channel["cache"].value_cache[src].float() * channel["cache"].v_scale.view(1, 2, 64)
    torch.testing.assert_close(ws_v[int(offsets[1])], want)


def _fa3_runner(case, monkeypatch, window=None, cap=None, mode="bf16"):
    hq, d = case["query"].shape[1:]
    fake = FakePagedFA3(d**-0.5, window, cap)
    monkeypatch.setattr(prefill_mod, "fa3_unavailable_reason", lambda device, head_size: None)
    monkeypatch.setattr(prefill_mod, "_flash_attn_varlen_func", lambda: fake)
    runner = PrefillRunner(num_heads=hq, num_kv_heads=case["key"].shape[1], head_size=d, scale=d**-0.5,
                           sliding_window=window, logits_soft_cap=cap, mode=mode, device=case["query"].device)  # fmt: skip
    assert runner.path == "fa3"
    return runner, fake


def _plan(case, workspace, all_rows=False, mode="bf16", query_start_loc_cpu=None):
    return runner_plan(case, all_rows, workspace=workspace, seq_lens_cpu=case["seq_lens"].cpu(),
                       from_cache_only=mode == "quantized", query_start_loc_cpu=query_start_loc_cpu)  # fmt: skip


@pytest.mark.parametrize("kv_dtype", ["fp8_e4m3", "int8"])
@pytest.mark.parametrize("act_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("window,cap,mode", [(None, None, "bf16"), (9, None, "bf16"), (None, 20.0, "bf16"),
                                             (None, None, "quantized"), (9, 20.0, "quantized")])  # fmt: skip
def test_fa3_path_over_workspace_matches_reference(kv_dtype, act_dtype, window, cap, mode, monkeypatch):
    case = _batch(act_dtype=act_dtype, kv_dtype=kv_dtype, group=2)
    runner, fake = _fa3_runner(case, monkeypatch, window, cap, mode)
    hkv, d = case["key"].shape[1:]
    ws = ContextWorkspace.allocate(512, 16, hkv, d, act_dtype, "cpu")
    plan = _plan(case, ws, mode=mode)
    assert plan.context_fill is not None and plan.context_fill[0].max_seq_len == int(case["seq_lens"][NUM_DECODES:].max())
    _check(case, runner, plan, window=window, cap=cap)
    assert (fake.paged_calls, fake.calls) == (1, 0), "one paged FA3 call, no merge pass"
    # quantized: one split, so that a row's bits do not depend on the batch or the chunking
    assert fake.num_splits == (1 if mode == "quantized" else None)


def test_workspace_too_small_or_graph_plan_falls_back_to_merge(monkeypatch):
    case = _batch(act_dtype=torch.bfloat16, kv_dtype="int8", group=2)
    runner, fake = _fa3_runner(case, monkeypatch)
    hkv, d = case["key"].shape[1:]
    small = ContextWorkspace.allocate(16, 16, hkv, d, torch.bfloat16, "cpu")  # one page: the batch needs more
    plan = _plan(case, small)
    assert plan.context_fill is None
    _check(case, runner, plan)
    assert (fake.paged_calls, fake.calls) == (0, 1)
    big = ContextWorkspace.allocate(4096, 16, hkv, d, torch.bfloat16, "cpu")
    assert _plan(case, big, all_rows=True).context_fill is None  # CUDA-graph plans keep the merge path
    no_ctx = PrefillPlan.build(case["query_start_loc"], case["seq_lens"], case["block_table"], num_tokens=10,
                               max_query_len=10, has_context=False, workspace=big, seq_lens_cpu=case["seq_lens"])  # fmt: skip
    assert no_ctx.context_fill is None
    # mode quantized: pure prefills go through the workspace too (their new tokens from the cache)
    no_ctx_q = PrefillPlan.build(case["query_start_loc"], case["seq_lens"], case["block_table"], num_tokens=10,
                                 max_query_len=10, has_context=False, workspace=big, seq_lens_cpu=case["seq_lens"],
                                 from_cache_only=True)  # fmt: skip
    assert no_ctx_q.context_fill is not None


@pytest.mark.parametrize("mode", ["bf16", "quantized"])
def test_workspace_slabs_when_the_sequences_exceed_it(mode, monkeypatch):
    """A step whose sequences do not fit the workspace at once runs it in slabs of consecutive
    requests (each filled from the workspace's start, one paged FA3 call each), not the merge
    path; the answer is the reference's. Slabs need the host's row offsets, a workspace that holds
    the longest request, and at most ``max_slabs`` slabs."""
    case = _batch(act_dtype=torch.bfloat16, kv_dtype="fp8_e4m3", group=2)
    runner, fake = _fa3_runner(case, monkeypatch, mode=mode)
    hkv, d = case["key"].shape[1:]
    qsl_cpu = case["query_start_loc"].cpu()
    # The prefills need 3, 2, 3 and 1 pages of 16 tokens (two padding requests none).
    four = ContextWorkspace.allocate(64, 16, hkv, d, torch.bfloat16, "cpu")
    plan = _plan(case, four, mode=mode, query_start_loc_cpu=qsl_cpu)
    slabs = plan.context_fill
    assert [(c.req_lo, c.req_hi) for c in slabs] == [(0, 1), (1, 2), (2, 6)]
    rows = (qsl_cpu[NUM_DECODES:] - qsl_cpu[NUM_DECODES]).tolist()
    assert [(c.row_lo, c.row_hi) for c in slabs] == [(rows[0], rows[1]), (rows[1], rows[2]), (rows[2], rows[6])]
    assert [c.query_start_loc.tolist()[0] for c in slabs] == [0, 0, 0] and slabs[2].max_query_len == 20
    assert [c.max_pages for c in slabs] == [3, 2, 3] and all(int(c.offsets[0]) == 0 for c in slabs)
    _check(case, runner, plan)
    assert (fake.paged_calls, fake.calls) == (3, 0), "three paged FA3 calls, no merge pass"
    # Without the host's rows, with a workspace smaller than one request, or beyond max_slabs: merge.
    assert _plan(case, four, mode=mode).context_fill is None
    two = ContextWorkspace.allocate(32, 16, hkv, d, torch.bfloat16, "cpu")
    assert _plan(case, two, mode=mode, query_start_loc_cpu=qsl_cpu).context_fill is None
    n = plan.num_reqs
    args = (four, plan.query_start_loc, plan.seq_lens[:n], case["seq_lens"][NUM_DECODES:].cpu(), torch.tensor(rows))
    assert prefill_mod.ContextFillPlan.slabs(*args, max_slabs=3) is not None
    assert prefill_mod.ContextFillPlan.slabs(*args, max_slabs=2) is None


def test_workspace_option_and_size():
    from vllm_kvquant.config import KVQuantConfig
    from vllm_kvquant.errors import KVQuantConfigError
    from vllm_kvquant.metadata import prefill_workspace_tokens

    assert KVQuantConfig().prefill_workspace_mib == 256
    assert KVQuantConfig.from_additional_config({"kvquant": {"prefill_workspace_mib": 0}}).prefill_workspace_mib == 0
    for bad in (-1, "64", True, 1.5):
        with pytest.raises(KVQuantConfigError, match=r"\['prefill_workspace_mib'\] must be an integer >= 0 \(MiB\), got"):
            KVQuantConfig.from_additional_config({"kvquant": {"prefill_workspace_mib": bad}})
    assert prefill_workspace_tokens(256, 8, 128, 2) == 65536  # Llama-3-8B K and V in bf16
    assert prefill_workspace_tokens(0, 8, 128, 2) == 0


def test_workspace_allocation():
    ws = ContextWorkspace.allocate(100, 16, 8, 128, torch.bfloat16, "cpu")
    assert ws.num_pages == 7 and ws.block_size == 16 and ws.key.shape == (7, 16, 8, 128)
    assert ws.nbytes == 2 * 7 * 16 * 8 * 128 * 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kv_dtype", ["fp8_e4m3", "int8"])
@pytest.mark.parametrize("window,cap", [(None, None), (9, None), (None, 20.0)])
def test_gpu_fa3_over_workspace_matches_reference(kv_dtype, window, cap):
    reason = prefill_mod.fa3_unavailable_reason(torch.device("cuda"), 128)
    if reason:
        pytest.skip(reason)
    case = _batch(act_dtype=torch.bfloat16, kv_dtype=kv_dtype, group=2, head_size=128, device="cuda")
    hq, d = case["query"].shape[1:]
    runner = PrefillRunner(num_heads=hq, num_kv_heads=case["key"].shape[1], head_size=d, scale=d**-0.5,
                           sliding_window=window, logits_soft_cap=cap, mode="bf16", device="cuda")  # fmt: skip
    ws = ContextWorkspace.allocate(1024, 16, case["key"].shape[1], d, torch.bfloat16, "cuda")
    plan = _plan(case, ws)
    assert plan.context_fill is not None
    _check(case, runner, plan, window=window, cap=cap)
    # same answer as the merge path
    merge = _plan(case, None)
    q = case["query"]
    a, b = (torch.full(q.shape, float("nan"), dtype=q.dtype, device=q.device) for _ in range(2))
    for p, o in ((plan, a), (merge, b)):
        runner.run(q, case["key"], case["value"], paged(case), p, o)
    s = int(case["query_start_loc"][NUM_DECODES])
    e = int(case["query_start_loc"][-1])
    torch.testing.assert_close(a[s:e].float(), b[s:e].float(), atol=3e-2, rtol=3e-2)
    # A workspace of 4 pages: the step runs in 3 slabs on the real FA3, with the same answer.
    small = ContextWorkspace.allocate(64, 16, case["key"].shape[1], d, torch.bfloat16, "cuda")
    slabs = _plan(case, small, query_start_loc_cpu=case["query_start_loc"].cpu())
    assert slabs.context_fill is not None and len(slabs.context_fill) == 3
    _check(case, runner, slabs, window=window, cap=cap)
    c = torch.full(q.shape, float("nan"), dtype=q.dtype, device=q.device)
    runner.run(q, case["key"], case["value"], paged(case), slabs, c)
    torch.testing.assert_close(c[s:e].float(), a[s:e].float(), atol=3e-2, rtol=3e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kv_dtype", ["fp8_e4m3", "int8"])
def test_gpu_quantized_over_workspace_repeatable(kv_dtype):
    """Mode quantized on the real FA3 over the workspace: right (against the reference), and a
    700-token prompt prefilled whole or as 188 new tokens over 512 from the prefix cache, with a
    decode and another prefill beside it, gives bit-identical rows (what the mode promises)."""
    reason = prefill_mod.fa3_unavailable_reason(torch.device("cuda"), 128)
    if reason:
        pytest.skip(reason)
    base = _batch(act_dtype=torch.bfloat16, kv_dtype=kv_dtype, group=4, head_size=128, device="cuda",
                  seqs=((0, 700),), pad_tokens=0)  # fmt: skip
    hq, d = base["query"].shape[1:]
    hkv = base["key"].shape[1]
    runner = PrefillRunner(num_heads=hq, num_kv_heads=hkv, head_size=d, scale=d**-0.5, sliding_window=None,
                           logits_soft_cap=None, mode="quantized", device="cuda")  # fmt: skip
    assert runner.path == "fa3"
    ws = ContextWorkspace.allocate(4096, 16, hkv, d, torch.bfloat16, "cuda")
    args = (paged(base),)
    plan1 = PrefillPlan.build(base["query_start_loc"], base["seq_lens"], base["block_table"], num_tokens=700,
                              max_query_len=700, has_context=False, workspace=ws, seq_lens_cpu=base["seq_lens"].cpu(),
                              from_cache_only=True)  # fmt: skip
    assert plan1.context_fill is not None
    out1 = torch.full_like(base["query"], float("nan"))
    runner.run(base["query"], base["key"], base["value"], *args, plan1, out1)
    want = _reference(base, mode="quantized").float()
    torch.testing.assert_close(out1.float().cpu(), want, atol=3e-2, rtol=3e-2)
    # again: a decode (request 0), the prompt's last 188 tokens over 512 cached, a 30-token prefill of the same pages
    q2 = torch.cat([base["query"][:1], base["query"][512:], base["query"][:30]])
    dev = q2.device
    bt2 = base["block_table"][:1].expand(3, -1).contiguous()
    seq_lens2 = torch.tensor([9, 700, 30], dtype=torch.int32)
    plan2 = PrefillPlan.build(
        torch.tensor([0, 1, 189, 219], dtype=torch.int32, device=dev), seq_lens2.to(dev), bt2, num_tokens=219,
        max_query_len=188, num_decodes=1, num_decode_tokens=1, workspace=ws, seq_lens_cpu=seq_lens2,
        from_cache_only=True,
    )  # fmt: skip
    assert plan2.context_fill is not None
    out2 = torch.full_like(q2, float("nan"))
    runner.run(q2, q2[:, :hkv], q2[:, :hkv], *args, plan2, out2)  # key/value never read in mode quantized
    assert torch.equal(out2[1:189], out1[512:]), (out2[1:189].float() - out1[512:].float()).abs().max()
    assert torch.equal(out2[189:], out1[:30])

