"""Triton prefill attention over the 8-bit paged cache vs. `paged_prefill_attention_ref`.

Every kernel mode: FULL (bf16 prefill in Triton), MERGE (context merged into a fresh-token
output + LSE as FA3 returns them; here made by `prefill_fresh_attention_ref`) and QUANTIZED
(everything read from the cache), per request or over all rows of a padded batch.
Without CUDA the kernel runs in Triton's CPU interpreter (``TRITON_INTERPRET=1``).
Tolerances against the fp32 reference (the kernel rounds P to the activation dtype for the
P.V matmul and rounds its output; MERGE also starts from a rounded fresh output): fp16
atol = rtol = 1e-2, bf16 atol = rtol = 3e-2.
"""

from __future__ import annotations

import functools
import itertools
import math

import _triton_env  # noqa: F401  (sets TRITON_INTERPRET=1 before triton is imported)
import pytest
import torch

from vllm_kvquant.kernels.prefill_attention import (
    MODE_FULL,
    MODE_MERGE,
    MODE_QUANTIZED,
    PrefillKernelConfig,
    launch_prefill,
    paged_prefill_attention,
)
from vllm_kvquant.kernels.reference import (
    paged_prefill_attention_ref,
    prefill_fresh_attention_ref,
    quantize_to_cache_ref,
)

TOL = {torch.float16: dict(atol=1e-2, rtol=1e-2), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}
KV_TORCH = {"fp8_e4m3": torch.float8_e4m3fn, "int8": torch.int8}


def _tol(case) -> dict:
    """Per-channel K scales fold into the query of the cache loop, which rounds ``q * s_k / max s_k``
    to the model dtype once more: with bf16 (8 bits) a rare element of these channel-skewed cases
    moves by up to ~0.05 (measured 0.044 of 20736 elements; the rest stay within bf16's 0.03)."""
    tol = dict(TOL[case["query"].dtype])
    if case["query"].dtype == torch.bfloat16 and case["k_scale"].dim() == 2:
        tol["atol"] = 6e-2
    return tol


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def make_case(
    *,
    act_dtype=torch.float16,
    kv_dtype="fp8_e4m3",
    per_head=True,
    head_size=64,
    num_kv_heads=2,
    group=1,
    block_size=16,
    seqs=((0, 33), (32, 7), (21, 1)),  # (context_len, query_len)
    q_mult=1.0,
    fused_qkv=False,
    cache_layout="plain",  # "plain" | "vllm" (K/V split of [nb, Hkv, bs, 2D], uint8 storage)
    pad_tokens=0,  # rows of query/key/value after the last sequence (must stay untouched)
    write_new=False,  # also write the step's K/V into the cache (what vLLM does before attention)
    device=None,
    seed=0,
):
    device = device or _device()
    g = torch.Generator().manual_seed(seed)
    hq, hkv, d = num_kv_heads * group, num_kv_heads, head_size
    qlens = [q for _, q in seqs]
    ctxs = [c for c, _ in seqs]
    n = sum(qlens) + pad_tokens

    def rnd(*shape, mult=1.0):
        return (torch.randn(*shape, generator=g) * mult).to(act_dtype)

    if fused_qkv:  # q_mult is ignored here; views of one fused qkv projection output, as vLLM passes them
        qkv = rnd(n, (hq + 2 * hkv) * d)
        q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
        q, k, v = q.view(n, hq, d), k.view(n, hkv, d), v.view(n, hkv, d)
        assert not q.is_contiguous()
    else:
        q, k, v = rnd(n, hq, d, mult=q_mult), rnd(n, hkv, d), rnd(n, hkv, d)

    # Shuffled, non-contiguous pages per sequence; a few spare blocks hold junk.
    max_blocks = max(1, max((c + q + block_size - 1) // block_size for c, q in seqs) + 1)
    num_blocks = len(seqs) * max_blocks + 5
    block_table = torch.randperm(num_blocks, generator=g)[: len(seqs) * max_blocks].view(len(seqs), max_blocks)
    block_table = block_table.to(torch.int32)
    kv_t = KV_TORCH[kv_dtype]
    if cache_layout == "vllm":
        raw = torch.randint(0, 256, (num_blocks, hkv, block_size, 2 * d), dtype=torch.uint8, generator=g)
        raw = raw.view(kv_t)
        key_cache, value_cache = raw.transpose(1, 2).split(d, dim=-1)
    else:
        key_cache = torch.randint(-100, 100, (num_blocks, block_size, hkv, d), dtype=torch.int8, generator=g).view(kv_t)
        value_cache = torch.randint(-100, 100, (num_blocks, block_size, hkv, d), dtype=torch.int8, generator=g).view(kv_t)
    if kv_dtype == "fp8_e4m3":  # junk bytes may be NaN in e4m3: make every junk value finite
        key_cache.view(torch.uint8).bitwise_and_(0x77)
        value_cache.view(torch.uint8).bitwise_and_(0x77)
    ns = (hkv, d) if per_head == "channel" else (hkv if per_head else 1,)
    k_scale = torch.rand(*ns, generator=g) * 0.01 + 0.015  # |K| up to ~4.5 sigma inside the range
    v_scale = torch.rand(*ns, generator=g) * 0.01 + 0.02
    if kv_dtype == "int8":
        k_scale, v_scale = k_scale * 3, v_scale * 3
    k_prof = v_prof = torch.ones(hkv, d)
    if per_head == "channel":  # channels of different ranges, each scaled to its own
        k_prof, v_prof = torch.exp(torch.randn(hkv, d, generator=g)), torch.exp(0.5 * torch.randn(hkv, d, generator=g))
        k_scale, v_scale = k_scale * k_prof, v_scale * v_prof
        k, v = (k.float() * k_prof).to(act_dtype), (v.float() * v_prof).to(act_dtype)
    for i, c in enumerate(ctxs):
        if c:
            kc = (rnd(c, hkv, d).float() * k_prof).to(act_dtype)
            vc = (rnd(c, hkv, d).float() * v_prof).to(act_dtype)
            pos = torch.arange(c)
            slots = block_table[i][pos // block_size].long() * block_size + pos % block_size
            quantize_to_cache_ref(kc, vc, key_cache, value_cache, slots, k_scale, v_scale, kv_dtype)
    qsl = torch.tensor([0] + list(itertools.accumulate(qlens)), dtype=torch.int32)
    if write_new:
        for i, (c, ql) in enumerate(seqs):
            s = int(qsl[i])
            pos = torch.arange(c, c + ql)
            slots = block_table[i][pos // block_size].long() * block_size + pos % block_size
            quantize_to_cache_ref(k[s : s + ql], v[s : s + ql], key_cache, value_cache, slots, k_scale, v_scale, kv_dtype)
    context_lens = torch.tensor(ctxs, dtype=torch.int32)
    args = dict(
        query=q, key=k, value=v, key_cache=key_cache, value_cache=value_cache, block_table=block_table,
        query_start_loc=qsl, context_lens=context_lens, k_scale=k_scale, v_scale=v_scale, kv_dtype=kv_dtype,
    )
    return {name: (t.to(device) if isinstance(t, torch.Tensor) else t) for name, t in args.items()}


def reference(case, **kw):
    c = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
    return paged_prefill_attention_ref(**c, **kw)


def run_and_check(case, poison=True, max_query_len=None, **kw):
    q = case["query"]
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=q.device) if poison else None
    got = paged_prefill_attention(**case, out=out, max_query_len=max_query_len, **kw)
    if poison:
        assert got is out
    n = int(case["query_start_loc"][-1])
    got = got[:n].cpu()
    assert not got.isnan().any(), "some output rows were not written"
    want = reference(case, **kw)[:n]
    torch.testing.assert_close(got.float(), want.float(), **_tol(case))
    return got


# Ragged batch: pure prefill, context on a block boundary, context mid-block; query
# lengths 1, 7 and 33 (several query tiles), expressed in blocks so every block size applies.
def _ragged(bs: int):
    return ((0, 33), (2 * bs, 7), (bs + 5, 1), (3, 33), (bs - 1, 7))


_ACT = (torch.float16, torch.bfloat16)
_KV = ("fp8_e4m3", "int8")
_SCALE = (False, True, "channel")  # one scale, per KV head, per KV head and channel
_HEAD = (64, 80, 128)
_GQA = (1, 4)
_BS = (16, 32, 64)


def _grid():
    """Every (act, kv, scale) combination with every head size (36 cases); GQA ratio and block
    size rotate so that each (head, GQA, block size) triple and each dtype x GQA/block pair occur."""
    cases = []
    shapes = list(itertools.product(_HEAD, _GQA, _BS))  # 18
    for i, (act, kv, per_head) in enumerate(itertools.product(_ACT, _KV, _SCALE)):
        for j, head in enumerate(_HEAD):
            gqa = _GQA[(i + j) % 2]
            bs = _BS[(i // 2 + j) % 3]
            cases.append((act, kv, per_head, head, gqa, bs))
    covered = {(h, g, b) for (_, _, _, h, g, b) in cases}
    cases += [(torch.float16, "fp8_e4m3", True, h, g, b) for (h, g, b) in shapes if (h, g, b) not in covered]
    return cases


@pytest.mark.parametrize(
    "act_dtype,kv_dtype,per_head,head_size,group,block_size",
    _grid(),
    ids=lambda p: str(p).replace("torch.", ""),
)
def test_matches_reference(act_dtype, kv_dtype, per_head, head_size, group, block_size):
    case = make_case(
        act_dtype=act_dtype, kv_dtype=kv_dtype, per_head=per_head, head_size=head_size,
        group=group, block_size=block_size, seqs=_ragged(block_size),
    )
    run_and_check(case)


@pytest.mark.parametrize("kv_dtype", _KV)
@pytest.mark.parametrize(
    "window,cap,group",
    [(5, None, 1), (20, None, 4), (47, None, 2), (None, 5.0, 4), (13, 8.0, 1), (1, None, 2)],
)
def test_sliding_window_and_soft_cap(kv_dtype, window, cap, group):
    case = make_case(
        kv_dtype=kv_dtype, group=group, block_size=16, q_mult=3.0,
        seqs=((0, 33), (40, 7), (64, 33), (5, 1), (17, 20)),
    )
    run_and_check(case, sliding_window=window, logits_soft_cap=cap)


@pytest.mark.parametrize("head_size", [32, 96, 112, 160, 192, 256])
def test_other_head_sizes(head_size):
    case = make_case(
        act_dtype=torch.bfloat16, kv_dtype="int8", head_size=head_size, group=2, block_size=32,
        seqs=((0, 9), (37, 17)),
    )
    run_and_check(case)


def test_block_size_128_and_gqa_8():
    case = make_case(group=8, num_kv_heads=1, block_size=128, seqs=((0, 7), (128, 33), (200, 1)))
    run_and_check(case)


def test_vllm_views_strides_and_padding():
    """Fused-qkv views, vLLM's K|V-split cache in uint8 storage, a strided `out`, int64
    block table, an empty sequence and trailing padding rows that must stay untouched."""
    case = make_case(
        act_dtype=torch.bfloat16, kv_dtype="fp8_e4m3", group=4, block_size=32, fused_qkv=True,
        cache_layout="vllm", seqs=((48, 7), (0, 0), (0, 33), (31, 1)), pad_tokens=5,
    )
    case["key_cache"] = case["key_cache"].view(torch.uint8)
    case["value_cache"] = case["value_cache"].view(torch.uint8)
    case["block_table"] = case["block_table"].to(torch.int64)
    q = case["query"]
    big = torch.full((q.shape[0], q.shape[1], q.shape[2] * 2), float("nan"), dtype=q.dtype, device=q.device)
    out = big[..., : q.shape[2]]
    assert not out.is_contiguous()
    paged_prefill_attention(**case, out=out, max_query_len=33)
    n = int(case["query_start_loc"][-1])
    assert out[n:].isnan().all(), "padding rows were written"
    assert big[..., q.shape[2] :].isnan().all(), "wrote outside `out`"
    ref_case = dict(case)
    ref_case["key_cache"] = case["key_cache"].view(torch.float8_e4m3fn)
    ref_case["value_cache"] = case["value_cache"].view(torch.float8_e4m3fn)
    want = reference(ref_case)[:n]
    got = out[:n].cpu()
    assert not got.isnan().any()
    torch.testing.assert_close(got.float(), want.float(), **TOL[q.dtype])


def test_pure_prefill_matches_sdpa():
    """Context 0 everywhere (phase 1 skipped): plain causal attention, checked against SDPA."""
    case = make_case(act_dtype=torch.float16, group=2, head_size=64, seqs=((0, 33), (0, 7), (0, 1), (0, 20)))
    got = paged_prefill_attention(**case, max_query_len=33).float().cpu()
    qsl = case["query_start_loc"].tolist()
    for i in range(len(qsl) - 1):
        s, e = qsl[i], qsl[i + 1]
        q = case["query"][s:e].float().cpu().transpose(0, 1)
        k = case["key"][s:e].float().cpu().repeat_interleave(2, dim=1).transpose(0, 1)
        v = case["value"][s:e].float().cpu().repeat_interleave(2, dim=1).transpose(0, 1)
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(0, 1)
        torch.testing.assert_close(got[s:e], want, **TOL[torch.float16])


def test_softmax_scale_and_empty_batch():
    case = make_case(seqs=((20, 9), (0, 5)))
    run_and_check(case, softmax_scale=0.3)
    empty = make_case(seqs=((0, 0),))
    out = paged_prefill_attention(**empty)
    assert out.shape == empty["query"].shape


def test_cpu_without_interpreter_uses_reference(monkeypatch):
    case = make_case(device="cpu", kv_dtype="int8", group=2, seqs=((16, 7), (0, 3)), pad_tokens=2)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    out = torch.full_like(case["query"], float("nan"))
    paged_prefill_attention(**case, out=out, sliding_window=9, logits_soft_cap=4.0)
    want = reference(case, sliding_window=9, logits_soft_cap=4.0)
    torch.testing.assert_close(out[:10], want[:10], atol=0, rtol=0)
    assert out[10:].isnan().all()


def _bad(case, **changes):
    c = dict(case)
    c.update(changes)
    return c


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda c: _bad(c, query=c["query"].float()), "query dtype"),
        (lambda c: _bad(c, key=c["key"].to(torch.bfloat16)), "must match query"),
        (lambda c: _bad(c, query=c["query"][..., :48], key=c["key"][..., :48], value=c["value"][..., :48]), "head size"),
        (lambda c: _bad(c, query=c["query"][:, :1]), "not a multiple"),
        (lambda c: _bad(c, k_scale=torch.ones(3)), "k_scale has 3 values"),
        (lambda c: _bad(c, v_scale=torch.ones(2, dtype=torch.int32)), "v_scale must be a floating"),
        (lambda c: _bad(c, key_cache=c["key_cache"][..., :32]), "shapes differ"),
        (lambda c: _bad(c, key_cache=c["key_cache"].float(), value_cache=c["value_cache"].float()), "1-byte"),
        (lambda c: _bad(c, context_lens=c["context_lens"][:1]), "context_lens"),
        (lambda c: _bad(c, value=c["value"][:-1]), "shapes differ"),
        (lambda c: _bad(c, block_table=c["block_table"][:1]), "block_table"),
        (lambda c: _bad(c, query_start_loc=c["query_start_loc"].float()), "query_start_loc must be int32"),
        (lambda c: _bad(c, kv_dtype="int4"), "int4"),
    ],
)
def test_validation(mutate, match):
    case = make_case(device="cpu", seqs=((16, 3), (0, 2)))
    with pytest.raises(ValueError, match=match):
        paged_prefill_attention(**mutate(case))


def test_validation_out_and_window():
    case = make_case(device="cpu", seqs=((16, 3),))
    with pytest.raises(ValueError, match="out must be"):
        paged_prefill_attention(**case, out=torch.empty(3, 2, 64))
    with pytest.raises(ValueError, match="sliding_window"):
        paged_prefill_attention(**case, sliding_window=-1)


# ------------------------------------------------------------------ modes (kernel level)

_KMODE = {"full": MODE_FULL, "merge": MODE_MERGE, "quantized": MODE_QUANTIZED}


def run_mode(case, mode, *, all_rows=False, num_tokens=None, max_query_len=None, lse_layout="fa3", **kw):
    """Launch one kernel mode as the runner does; MERGE gets the fresh part from the reference
    (what FA3 returns: rounded output in ``out``, fp32 natural-log LSE ``[heads, tokens]``)."""
    q = case["query"]
    n_rows, hq, d = q.shape
    qsl = case["query_start_loc"]
    qlens = (qsl[1:] - qsl[:-1]).tolist()
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=q.device)
    lse = None
    fresh = None
    if mode == "merge":
        c = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
        fresh, lse_ref = prefill_fresh_attention_ref(c["query"], c["key"], c["value"], c["query_start_loc"], **kw)
        first, last = int(qsl[0]), int(qsl[-1])
        out[first:last] = fresh[first:last].to(q.device)
        if lse_layout == "fa3":
            lse = lse_ref.to(q.device)
        else:  # token-major and strided: the kernel must use the given strides
            big = torch.full((n_rows, 2 * hq), float("nan"), device=q.device)
            big[:, ::2] = lse_ref.t().to(q.device)
            lse = big[:, ::2].t()
    cfg = PrefillKernelConfig.make(
        num_heads=hq, num_kv_heads=case["key"].shape[1], head_size=d,
        softmax_scale=kw.get("softmax_scale") or d**-0.5, sliding_window=kw.get("sliding_window"),
        logits_soft_cap=kw.get("logits_soft_cap"), device=q.device,
        max_query_len=None if all_rows else (max_query_len or max(qlens + [1])),
    )  # fmt: skip
    launch_prefill(
        cfg, _KMODE[mode], q, case["key"], case["value"], case["key_cache"], case["value_cache"], out,
        case["block_table"], qsl, case["context_lens"], case["k_scale"], case["v_scale"], case["kv_dtype"] == "int8",
        num_tokens or n_rows, len(qlens), lens_are_seq=False, all_rows=all_rows, lse=lse,
    )  # fmt: skip
    return out.cpu(), fresh


def check_mode(case, mode, *, all_rows=False, num_tokens=None, lse_layout="fa3", **kw):
    """Rows of served requests match the reference; rows of skipped requests and padding untouched."""
    got, fresh = run_mode(case, mode, all_rows=all_rows, num_tokens=num_tokens, lse_layout=lse_layout, **kw)
    want = reference(case, mode="quantized" if mode == "quantized" else "bf16", **kw)
    qsl = case["query_start_loc"].tolist()
    for i in range(len(qsl) - 1):
        s, e = qsl[i], qsl[i + 1]
        if e - s == 1 and all_rows:  # the decode kernel's request: not written (merge: the fresh rows)
            if mode == "merge":
                assert torch.equal(got[s:e], fresh[s:e])
            else:
                assert got[s:e].isnan().all(), f"request {i} (one token) was written"
            continue
        assert not got[s:e].isnan().any(), f"request {i}: rows not written"
        torch.testing.assert_close(got[s:e].float(), want[s:e].float(), **_tol(case))
    assert got[qsl[-1] :].isnan().all(), "rows after the last request were written"
    return got, fresh


@pytest.mark.parametrize("mode", ["quantized", "merge"])
@pytest.mark.parametrize(
    "act_dtype,kv_dtype,per_head,head_size,group,block_size",
    _grid(),
    ids=lambda p: str(p).replace("torch.", ""),
)
def test_modes_match_reference(mode, act_dtype, kv_dtype, per_head, head_size, group, block_size):
    case = make_case(
        act_dtype=act_dtype, kv_dtype=kv_dtype, per_head=per_head, head_size=head_size,
        group=group, block_size=block_size, seqs=_ragged(block_size), write_new=True,
    )
    check_mode(case, mode)


@pytest.mark.parametrize("mode", ["quantized", "merge"])
@pytest.mark.parametrize("kv_dtype", _KV)
@pytest.mark.parametrize(
    "window,cap,group",
    [(5, None, 1), (20, None, 4), (47, None, 2), (None, 5.0, 4), (13, 8.0, 1), (1, None, 2)],
)
def test_modes_sliding_window_and_soft_cap(mode, kv_dtype, window, cap, group):
    case = make_case(
        kv_dtype=kv_dtype, group=group, block_size=16, q_mult=3.0, write_new=True,
        seqs=((0, 33), (40, 7), (64, 33), (5, 1), (17, 20)),
    )
    check_mode(case, mode, sliding_window=window, logits_soft_cap=cap)


@pytest.mark.parametrize("mode", ["full", "quantized", "merge"])
def test_all_rows_skips_single_tokens_and_padding(mode):
    """Graph-safe launch over a padded batch: decodes (1 token) first, prefills, padded requests
    (0 tokens, repeated end), rows after the last request; grid from upper bounds only."""
    case = make_case(
        act_dtype=torch.bfloat16, kv_dtype="int8", group=4, block_size=16, write_new=True, pad_tokens=9,
        seqs=((20, 1), (33, 1), (0, 1), (0, 33), (40, 7), (17, 1), (31, 19), (0, 0), (0, 0)),
    )
    n_rows = case["query"].shape[0]
    check_mode(case, mode, all_rows=True, num_tokens=n_rows + 40)  # an upper bound, as under CUDA graphs


def test_graph_config_ignores_query_length():
    """Without a query-length bound (CUDA graphs) the token tile is the full one; with a small
    bound it shrinks (eager short prompts)."""
    make = functools.partial(
        PrefillKernelConfig.make, num_heads=8, num_kv_heads=2, head_size=64, softmax_scale=0.1,
        sliding_window=None, logits_soft_cap=None, device=torch.device(_device()),
    )  # fmt: skip
    assert make(max_query_len=None).block_m == make(max_query_len=1 << 20).block_m
    assert make(max_query_len=3).block_m < make(max_query_len=None).block_m


@pytest.mark.parametrize("window", [None, 9])
def test_merge_keeps_fresh_rows_without_context(window):
    """Rows that see no context (no cached tokens, or all of them outside the window) keep the
    fresh output bit for bit; LSE given token-major with a stride exercises the strides."""
    case = make_case(act_dtype=torch.bfloat16, group=2, seqs=((0, 33), (24, 30), (0, 5)), write_new=True)
    got, fresh = check_mode(case, "merge", sliding_window=window, lse_layout="strided")
    assert torch.equal(got[:33], fresh[:33]) and torch.equal(got[63:68], fresh[63:68])
    if window:  # token j of the middle request sees context only while j < window - 1
        assert torch.equal(got[33 + window - 1 : 63], fresh[33 + window - 1 : 63])
        assert not torch.equal(got[33 : 33 + window - 1], fresh[33 : 33 + window - 1])


@pytest.mark.parametrize("kv_dtype", _KV)
def test_quantized_is_independent_of_chunking(kv_dtype):
    """The same 70-token prompt in one pass, or with its first 32 / 64 / 69 tokens from the cache
    (prefix-cache hit, chunked prefill): every shared row is bit-identical."""
    base = make_case(act_dtype=torch.bfloat16, kv_dtype=kv_dtype, group=2, block_size=16, seqs=((0, 70),), write_new=True)
    whole, _ = run_mode(base, "quantized")
    for ctx in (32, 64, 69):
        case = dict(base)
        case["query"] = base["query"][ctx:]
        case["key"], case["value"] = base["key"][ctx:], base["value"][ctx:]
        case["query_start_loc"] = torch.tensor([0, 70 - ctx], dtype=torch.int32, device=base["query"].device)
        case["context_lens"] = torch.tensor([ctx], dtype=torch.int32, device=base["query"].device)
        part, _ = run_mode(case, "quantized")
        assert torch.equal(part, whole[ctx:]), f"context {ctx}: max diff {(part.float() - whole[ctx:].float()).abs().max()}"


def test_reference_quantized_mode_semantics():
    """When the step's K/V are exactly representable in the cache (int8, power-of-two scales,
    bf16), attending to the cache equals attending to the unquantized K/V."""
    case = make_case(act_dtype=torch.bfloat16, kv_dtype="int8", group=2, seqs=((20, 9), (0, 13)), device="cpu")
    for name in ("key", "value"):
        case[name] = (torch.randint(-127, 128, case[name].shape) * 2.0**-5).to(torch.bfloat16)
    case["k_scale"] = torch.full((2,), 2.0**-5)
    case["v_scale"] = torch.full((2,), 2.0**-5)
    slots = []
    qsl, ctx = case["query_start_loc"].tolist(), case["context_lens"].tolist()
    for i in range(2):
        pos = torch.arange(ctx[i], ctx[i] + qsl[i + 1] - qsl[i])
        slots.append(case["block_table"][i][pos // 16].long() * 16 + pos % 16)
    quantize_to_cache_ref(case["key"], case["value"], case["key_cache"], case["value_cache"], torch.cat(slots),
                          case["k_scale"], case["v_scale"], "int8")  # fmt: skip
    a = paged_prefill_attention_ref(**case, mode="bf16")
    b = paged_prefill_attention_ref(**case, mode="quantized")
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    with pytest.raises(ValueError, match="'fp32' is not one of"):
        paged_prefill_attention_ref(**case, mode="fp32")


def test_public_api_quantized_mode():
    case = make_case(kv_dtype="int8", group=2, seqs=((16, 9), (0, 12), (5, 1)), write_new=True)
    run_and_check(case, mode="quantized", max_query_len=12)
    with pytest.raises(ValueError, match="mode 'fp16' is not one of"):
        paged_prefill_attention(**case, mode="fp16")


# ------------------------------------------------------------------ GPU (larger shapes)


@pytest.mark.gpu
@pytest.mark.parametrize("act_dtype,kv_dtype,per_head", [
    (torch.float16, "fp8_e4m3", True), (torch.bfloat16, "int8", True), (torch.bfloat16, "int8", "channel"),
])  # fmt: skip
def test_gpu_large_chunked_prefill(act_dtype, kv_dtype, per_head):
    """4 sequences x 1k new tokens on 2k cached context, head 128, GQA 4."""
    case = make_case(
        act_dtype=act_dtype, kv_dtype=kv_dtype, per_head=per_head, head_size=128, num_kv_heads=2, group=4, block_size=16,
        seqs=((2048, 1024), (2048, 1024), (2000, 1024), (2048, 1000)), device="cuda",
    )
    run_and_check(case, max_query_len=1024)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "head_size,group,block_size,window,cap",
    [(64, 1, 32, None, None), (80, 8, 64, None, None), (256, 2, 128, None, None), (128, 4, 16, 700, 30.0), (96, 4, 32, 64, None)],
)
def test_gpu_shapes(head_size, group, block_size, window, cap):
    case = make_case(
        act_dtype=torch.bfloat16, kv_dtype="fp8_e4m3", head_size=head_size, num_kv_heads=2, group=group,
        block_size=block_size, seqs=((0, 513), (1000, 77), (517, 1), (3, 300)), q_mult=2.0, device="cuda",
    )
    run_and_check(case, sliding_window=window, logits_soft_cap=cap)


@pytest.mark.gpu
def test_gpu_pure_prefill_matches_sdpa():
    case = make_case(
        act_dtype=torch.float16, head_size=128, num_kv_heads=4, group=4, device="cuda",
        seqs=((0, 1024), (0, 1024), (0, 777), (0, 1024)),
    )
    got = paged_prefill_attention(**case, max_query_len=1024)
    qsl = case["query_start_loc"].tolist()
    for i in range(len(qsl) - 1):
        s, e = qsl[i], qsl[i + 1]
        q = case["query"][s:e].transpose(0, 1)
        k = case["key"][s:e].repeat_interleave(4, dim=1).transpose(0, 1)
        v = case["value"][s:e].repeat_interleave(4, dim=1).transpose(0, 1)
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(0, 1)
        torch.testing.assert_close(got[s:e], want, atol=2e-3, rtol=2e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["quantized", "merge"])
@pytest.mark.parametrize(
    "act_dtype,kv_dtype,head_size,group,block_size,window,cap",
    [(torch.bfloat16, "fp8_e4m3", 128, 4, 16, None, None), (torch.float16, "int8", 64, 1, 32, None, None),
     (torch.bfloat16, "int8", 256, 2, 128, None, None), (torch.bfloat16, "fp8_e4m3", 128, 4, 16, 700, 30.0)],
)  # fmt: skip
def test_gpu_modes_large(mode, act_dtype, kv_dtype, head_size, group, block_size, window, cap):
    """Modes QUANTIZED and MERGE at larger shapes, eager and all-rows (tolerances as on CPU)."""
    case = make_case(
        act_dtype=act_dtype, kv_dtype=kv_dtype, head_size=head_size, num_kv_heads=2, group=group, write_new=True,
        block_size=block_size, seqs=((0, 1024), (2048, 512), (517, 1), (1000, 77), (3, 300)), q_mult=2.0, device="cuda",
    )  # fmt: skip
    check_mode(case, mode, sliding_window=window, logits_soft_cap=cap)
    check_mode(case, mode, all_rows=True, sliding_window=window, logits_soft_cap=cap)
