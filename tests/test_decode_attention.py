"""Triton paged decode attention over the 8-bit cache vs. `paged_decode_attention_ref`.

Without CUDA the kernel runs in Triton's CPU interpreter (``TRITON_INTERPRET=1``).
The reference dequantizes the same stored bytes in fp32, so the only differences are the
dot-operand rounding of P (and Q for bf16 dots) and the final rounding to fp16/bf16:
tolerance atol = rtol = 2e-2 elementwise, plus relative L2 error < 1e-2.
Every output is poisoned with NaN first and must be fully written.
"""

from __future__ import annotations

import itertools
import math

import _triton_env  # noqa: F401  (sets TRITON_INTERPRET=1 before triton is imported)
import pytest
import torch

from vllm_kvquant.kernels.decode_attention import (
    MAX_NUM_SPLITS,
    DecodeKernelConfig,
    DecodeLayer,
    DecodePlan,
    alloc_decode_workspace,
    choose_num_splits,
    decode_workspace_shape,
    paged_decode_attention,
)
from vllm_kvquant.kernels.decode_config import workspace_numel
from vllm_kvquant.kernels.paged_cache import PagedKVCache
from vllm_kvquant.kernels.reference import paged_decode_attention_ref, quantize_to_cache_ref

ATOL = RTOL = 2e-2
REL_L2 = 1e-2
KV_TORCH = {"fp8_e4m3": torch.float8_e4m3fn, "int8": torch.int8}
QMAX = {"fp8_e4m3": 448.0, "int8": 127.0}
# Small tiles so short interpreter-sized sequences still cross several tiles and splits.
SMALL = DecodeKernelConfig(block_n=32, min_tokens_per_split=32)  # tile < page for bs 64/128, > page for bs 16


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def paged(case: dict) -> PagedKVCache:
    """A case's caches, scales and format as the lean paths take them (decode and prefill cases)."""
    return PagedKVCache(case["key_cache"], case["value_cache"], case["k_scale"], case["v_scale"], case["kv_dtype"])


def make_case(
    *,
    act_dtype=torch.float16,
    kv_dtype="fp8_e4m3",
    per_head=True,  # True, False (one scale) or "channel" (one per KV head and channel)
    head_size=64,
    num_kv_heads=2,
    group=1,
    block_size=16,
    seq_lens=(1, 16, 17, 150),
    cache_layout="plain",  # "plain" | "vllm" ([nb, Hkv, bs, 2D] uint8 split into K/V views)
    strided_query=False,
    q_mult=2.0,
    spare_blocks=5,
    device=None,
    seed=0,
):
    """Random K/V quantized into *every* slot of a cache; shuffled non-contiguous block tables."""
    device = device or _device()
    g = torch.Generator().manual_seed(seed)
    num_seqs = len(seq_lens)
    hq = num_kv_heads * group
    blocks_per_seq = [max(1, math.ceil(n / block_size)) for n in seq_lens]
    max_blocks = max(blocks_per_seq) + 1
    num_blocks = sum(blocks_per_seq) + spare_blocks

    k_all = torch.randn(num_blocks * block_size, num_kv_heads, head_size, generator=g)
    v_all = torch.randn(num_blocks * block_size, num_kv_heads, head_size, generator=g)
    if per_head == "channel":  # channels of very different ranges, each with its own scale
        k_all *= torch.exp(torch.randn(num_kv_heads, head_size, generator=g))
        v_all *= torch.exp(0.5 * torch.randn(num_kv_heads, head_size, generator=g))
    amax_k = k_all.abs().amax(dim=(0, 2))
    amax_v = v_all.abs().amax(dim=(0, 2))
    if per_head == "channel":
        k_scale = k_all.abs().amax(dim=0) / QMAX[kv_dtype] * (1 + torch.rand(num_kv_heads, head_size, generator=g))
        v_scale = v_all.abs().amax(dim=0) / QMAX[kv_dtype] * (1 + torch.rand(num_kv_heads, head_size, generator=g))
    elif per_head:
        k_scale = amax_k / QMAX[kv_dtype] * (1 + torch.rand(num_kv_heads, generator=g))
        v_scale = amax_v / QMAX[kv_dtype] * (1 + torch.rand(num_kv_heads, generator=g))
    else:
        k_scale = (amax_k.max() / QMAX[kv_dtype]).reshape(1) * 1.2
        v_scale = (amax_v.max() / QMAX[kv_dtype]).reshape(1) * 1.1

    if cache_layout == "vllm":
        kv = torch.empty(num_blocks, num_kv_heads, block_size, 2 * head_size, dtype=torch.uint8)
        key_cache, value_cache = kv.transpose(1, 2).split(head_size, dim=-1)
        kq, vq = key_cache.view(KV_TORCH[kv_dtype]), value_cache.view(KV_TORCH[kv_dtype])
    else:
        key_cache = torch.empty(num_blocks, block_size, num_kv_heads, head_size, dtype=KV_TORCH[kv_dtype])
        value_cache = torch.empty_like(key_cache)
        kq, vq = key_cache, value_cache
    slots = torch.arange(num_blocks * block_size, dtype=torch.int64)
    quantize_to_cache_ref(k_all, v_all, kq, vq, slots, k_scale, v_scale, kv_dtype)

    perm = torch.randperm(num_blocks, generator=g)
    block_table = torch.full((num_seqs, max_blocks), 10**6, dtype=torch.int32)  # garbage past the end
    pos = 0
    for i, nb in enumerate(blocks_per_seq):
        block_table[i, :nb] = perm[pos : pos + nb].int()
        pos += nb

    if strided_query:  # a view into a fused qkv-like buffer
        big = torch.randn(num_seqs, hq + 2 * num_kv_heads, head_size + 8, generator=g) * q_mult
        query = big.to(act_dtype)[:, :hq, 4 : 4 + head_size]
    else:
        query = (torch.randn(num_seqs, hq, head_size, generator=g) * q_mult).to(act_dtype)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32)
    to = lambda t: t.to(device)  # noqa: E731
    return dict(
        query=to(query),
        key_cache=to(key_cache),
        value_cache=to(value_cache),
        block_table=to(block_table),
        seq_lens=to(seq_lens_t),
        k_scale=to(k_scale.float()),
        v_scale=to(v_scale.float()),
        kv_dtype=kv_dtype,
    )


def run_and_check(case, *, softmax_scale=None, sliding_window=None, logits_soft_cap=None, out_view=False, **kw):
    q = case["query"]
    if out_view:  # output written through a strided view of a larger buffer
        big = torch.full((q.shape[0], q.shape[1] + 3, q.shape[2] + 16), float("nan"), dtype=q.dtype, device=q.device)
        out = big[:, 1 : 1 + q.shape[1], 8 : 8 + q.shape[2]]
    else:
        out = torch.full_like(q, float("nan"))
    res = paged_decode_attention(
        **case,
        softmax_scale=softmax_scale,
        out=out,
        sliding_window=sliding_window,
        logits_soft_cap=logits_soft_cap,
        **kw,
    )
    assert res is out
    ref_case = dict(case)
    ref_case["key_cache"] = case["key_cache"].view(KV_TORCH[case["kv_dtype"]])
    ref_case["value_cache"] = case["value_cache"].view(KV_TORCH[case["kv_dtype"]])
    ref = paged_decode_attention_ref(
        **ref_case, softmax_scale=softmax_scale, sliding_window=sliding_window, logits_soft_cap=logits_soft_cap
    )
    assert not torch.isnan(out).any(), "some output elements were not written"
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref.float(), atol=ATOL, rtol=RTOL)
    rel = (out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-6)
    assert rel < REL_L2, f"relative L2 error {rel:.2e}"
    if out_view:
        assert torch.isnan(big[:, 0]).all() and torch.isnan(big[:, :, :8]).all(), "wrote outside the out view"
    return out, ref


# ---- main grid: dtype x kv dtype x scale granularity x head size, cycling GQA/block/splits ----
_GQA = [(2, 1), (2, 4), (1, 8)]  # (num_kv_heads, group): ratio 1, 4, 8 (MQA-like)
_BLOCK = [16, 32, 64, 128]
_SPLITS = [1, 3, None]  # forced single, forced multi, heuristic
_GRID = []
for i, (act, kvd, per_head, hs) in enumerate(
    itertools.product((torch.float16, torch.bfloat16), ("fp8_e4m3", "int8"), (False, True, "channel"), (64, 80, 128))
):
    # Offsets chosen so every head size meets every GQA ratio and block size (checked by hand).
    hkv, grp = _GQA[(i + i // 3) % 3]
    bs = _BLOCK[(i + i // 3 + i // 6) % 4]
    _GRID.append((act, kvd, per_head, hs, hkv, grp, bs, _SPLITS[(i // 2 + i // 3) % 3]))


def _grid_id(p):
    act, kvd, per_head, hs, hkv, grp, bs, splits = p
    a = "f16" if act == torch.float16 else "bf16"
    gran = {False: "tensor", True: "head", "channel": "channel"}[per_head]
    return f"{a}-{kvd}-{gran}-d{hs}-kv{hkv}x{grp}-bs{bs}-s{splits or 'auto'}"


@pytest.mark.parametrize("act,kvd,per_head,hs,hkv,grp,bs,splits", _GRID, ids=[_grid_id(p) for p in _GRID])
def test_decode_grid(act, kvd, per_head, hs, hkv, grp, bs, splits):
    lens = (1, bs, bs + 1, 2 * bs + 60)  # the long one spans 3+ tiles, so 3 splits are all used
    case = make_case(
        act_dtype=act, kv_dtype=kvd, per_head=per_head, head_size=hs, num_kv_heads=hkv, group=grp,
        block_size=bs, seq_lens=lens, seed=hs + bs,
    )  # fmt: skip
    run_and_check(case, max_num_splits=splits, config=SMALL)


@pytest.mark.parametrize("kvd", ["fp8_e4m3", "int8"])
def test_default_config_long_sequence_many_splits(kvd):
    # Default tiles (128 tokens at head 128, >= 256 tokens per split): 1100 tokens -> 5 active splits.
    case = make_case(kv_dtype=kvd, act_dtype=torch.bfloat16, head_size=128, num_kv_heads=1, group=4,
                     seq_lens=(1100, 64, 0, 257))  # fmt: skip
    run_and_check(case, max_num_splits=8)
    run_and_check(case, max_num_splits=1)


def test_head_size_256():
    case = make_case(head_size=256, num_kv_heads=1, group=4, block_size=16, seq_lens=(1, 40, 90), kv_dtype="fp8_e4m3")
    run_and_check(case, max_num_splits=2, config=SMALL)
    run_and_check(case, max_num_splits=1)


@pytest.mark.parametrize("hs", [32, 96, 112, 160, 192])
def test_other_head_sizes(hs):
    case = make_case(head_size=hs, num_kv_heads=1, group=2, block_size=32, seq_lens=(5, 70), kv_dtype="int8", seed=hs)
    run_and_check(case, max_num_splits=2, config=SMALL)


def test_mqa_group_32():
    case = make_case(head_size=64, num_kv_heads=1, group=32, block_size=16, seq_lens=(33, 2), act_dtype=torch.bfloat16)
    run_and_check(case, max_num_splits=2, config=SMALL)


@pytest.mark.parametrize("splits", [1, 4])
@pytest.mark.parametrize("window", [1, 8, 40, 1000])
def test_sliding_window(window, splits):
    case = make_case(head_size=64, num_kv_heads=2, group=2, block_size=16, seq_lens=(1, 17, 100, 0), seed=window)
    run_and_check(case, sliding_window=window, max_num_splits=splits, config=SMALL)


def _poison_unattended_slots(case: dict, window: int | None) -> None:
    """Write 0x7f (fp8: NaN; int8: 127) into every slot a request's pages hold but its query must
    not see: past its end in its last page, and before its sliding window."""
    bs = case["key_cache"].shape[1]
    for i, n in enumerate(case["seq_lens"].tolist()):
        first = max(n - window, 0) if window else 0
        for t in [*range(first), *range(n, -(-n // bs) * bs)]:
            page = int(case["block_table"][i, t // bs])
            for c in (case["key_cache"], case["value_cache"]):
                c.view(torch.uint8)[page, t % bs] = 0x7F


@pytest.mark.parametrize("kvd", ["fp8_e4m3", "int8"])
@pytest.mark.parametrize("window, splits", [(None, 1), (None, 3), (40, 1), (7, 4)])
def test_page_masks_ignore_what_the_pages_hold_outside_the_sequence(kvd, window, splits):
    """``page_masks``: whole pages are read, so slots outside a request's attended range reach the
    kernel; NaN or extreme bytes there must change nothing."""
    case = make_case(kv_dtype=kvd, head_size=64, num_kv_heads=2, group=4, block_size=16, seq_lens=(1, 17, 100, 0, 45),
                     act_dtype=torch.bfloat16, seed=31)  # fmt: skip
    _poison_unattended_slots(case, window)
    cfg = DecodeKernelConfig(block_n=32, min_tokens_per_split=32, page_masks=True)
    run_and_check(case, sliding_window=window, max_num_splits=splits, config=cfg)
    run_and_check(case, sliding_window=window, logits_soft_cap=20.0, max_num_splits=splits, config=cfg)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kvd", ["fp8_e4m3", "int8"])
@pytest.mark.parametrize("window", [None, 40])
def test_gpu_page_masks(kvd, window):
    """The page-masked loads compiled for the GPU (default tile, head 128, GQA 4; int8 through the
    inline-PTX path): right, and blind to what a request's pages hold outside it."""
    case = make_case(kv_dtype=kvd, head_size=128, num_kv_heads=2, group=4, block_size=16,
                     seq_lens=(1, 17, 100, 0, 45, 3000), act_dtype=torch.bfloat16, seed=32, device="cuda")  # fmt: skip
    _poison_unattended_slots(case, window)
    for splits in (1, None):
        run_and_check(case, sliding_window=window, max_num_splits=splits, config=DecodeKernelConfig(page_masks=True))


@pytest.mark.parametrize("splits", [1, 3])
def test_soft_cap(splits):
    case = make_case(head_size=64, num_kv_heads=2, group=4, block_size=32, seq_lens=(1, 33, 120), q_mult=4.0,
                     act_dtype=torch.bfloat16, kv_dtype="int8")  # fmt: skip
    run_and_check(case, logits_soft_cap=5.0, max_num_splits=splits, config=SMALL)
    run_and_check(case, logits_soft_cap=5.0, sliding_window=50, softmax_scale=0.3, max_num_splits=splits, config=SMALL)


@pytest.mark.parametrize("splits", [1, 4])
def test_zero_length_padding_rows(splits):
    # Padding rows have garbage block tables (1e6); they must read nothing and output zeros.
    case = make_case(head_size=64, seq_lens=(0, 37, 0, 1, 0), seed=3)
    out, _ = run_and_check(case, max_num_splits=splits, config=SMALL)
    assert (out[0] == 0).all() and (out[2] == 0).all() and (out[4] == 0).all()


def test_all_zero_lengths():
    case = make_case(head_size=64, seq_lens=(0, 0), seed=4)
    out = torch.full_like(case["query"], float("nan"))
    paged_decode_attention(**case, out=out, max_num_splits=4, config=SMALL)
    assert (out == 0).all()


@pytest.mark.parametrize("kvd", ["fp8_e4m3", "int8"])
def test_vllm_layout_strided_query_and_out(kvd):
    case = make_case(kv_dtype=kvd, head_size=128, num_kv_heads=2, group=4, block_size=16, seq_lens=(3, 49, 200),
                     cache_layout="vllm", strided_query=True, act_dtype=torch.bfloat16)  # fmt: skip
    assert case["key_cache"].dtype == torch.uint8 and not case["key_cache"].is_contiguous()
    assert not case["query"].is_contiguous()
    run_and_check(case, out_view=True, max_num_splits=3, config=SMALL)
    run_and_check(case, out_view=True, max_num_splits=1, config=SMALL)


def test_preallocated_workspace_and_returned_out():
    case = make_case(head_size=64, num_kv_heads=2, group=2, seq_lens=(90, 3, 0), seed=7)
    hq, hs = case["query"].shape[1:]
    ws = alloc_decode_workspace(8, hq, hs, 4, device=case["query"].device)
    assert ws.shape == decode_workspace_shape(8, hq, hs, 4) and ws.dtype == torch.float32
    ws.fill_(float("nan"))  # stale workspace contents must not leak into the result
    out, ref = run_and_check(case, max_num_splits=4, workspace=ws, config=SMALL)
    res = paged_decode_attention(**case, max_num_splits=4, config=SMALL)  # allocates out and workspace
    torch.testing.assert_close(res, out, atol=0, rtol=0)
    with pytest.raises(ValueError, match="workspace"):
        paged_decode_attention(**case, max_num_splits=4, workspace=ws[:10], config=SMALL)


def test_num_splits_is_shape_only():
    # Graph safety: depends on shapes/device only, bounded, and 1 for large batches.
    assert choose_num_splits(1, 8, 128, 132) == MAX_NUM_SPLITS
    assert choose_num_splits(1, 8, 128, 132, max_num_splits=7) == 7
    assert choose_num_splits(1, 8, 128, 132, max_num_splits=10**6) == MAX_NUM_SPLITS
    assert choose_num_splits(256, 8, 128, 132) == 1
    for n in range(1, 300):
        s = choose_num_splits(n, 8, 128, 132)
        assert 1 <= s <= MAX_NUM_SPLITS
    tight = decode_workspace_shape(256, 32, 128, num_kv_heads=8, device="cpu")[0]
    loose = decode_workspace_shape(256, 32, 128)[0]
    assert tight < loose


def test_config_knobs(monkeypatch):
    from vllm_kvquant.kernels import decode_attention as da

    monkeypatch.setenv("KVQUANT_DECODE_CONFIG", "num_stages=3, block_n=64,dot_in_fp16=1")
    cfg = da._config_from_env()
    assert (cfg.num_stages, cfg.tile_tokens(128), cfg.dot_in_fp16) == (3, 64, True)
    monkeypatch.setenv("KVQUANT_DECODE_CONFIG", "page_masks=true,block_n=None")
    assert da._config_from_env() == DecodeKernelConfig(page_masks=True)
    monkeypatch.setenv("KVQUANT_DECODE_CONFIG", "bogus=1")
    with pytest.raises(ValueError, match="KVQUANT_DECODE_CONFIG: unknown DecodeKernelConfig field 'bogus'"):
        da._config_from_env()
    with pytest.raises(ValueError, match="page_masks takes 1/0"):
        DecodeKernelConfig.from_spec("page_masks=maybe")
    with pytest.raises(ValueError, match="num_stages takes an integer, got '3.5'"):
        DecodeKernelConfig.from_spec("num_stages=3.5")
    assert DecodeKernelConfig().tile_tokens(128) == 128 and DecodeKernelConfig().tile_tokens(256) == 64
    case = make_case(head_size=64, seq_lens=(20,), seed=13)
    with pytest.raises(ValueError, match="power of two"):
        paged_decode_attention(**case, config=DecodeKernelConfig(block_n=24))
    # fp16 dots for a bf16 query give the same answer within tolerance
    case = make_case(head_size=64, seq_lens=(20, 70), act_dtype=torch.bfloat16, seed=14)
    run_and_check(case, max_num_splits=2, config=DecodeKernelConfig(block_n=16, min_tokens_per_split=16, dot_in_fp16=True))


def test_register_cap_reaches_the_launch_and_still_matches():
    """Register caps (programs per SM) are launch options of the split kernel only, checked on
    construction; the kernel's answer does not change (interpreter here; GPU in decode_lab)."""
    cfg = DecodeKernelConfig.from_spec("maxnreg=160, asm_dequant_fp8=1")
    assert cfg.split_launch_options("fp8_e4m3", 128) == {"num_warps": 4, "num_stages": cfg.asm_num_stages, "maxnreg": 160}
    assert cfg.split_launch_options("int8", 128)["maxnreg"] == 160  # one cap for every format
    default = DecodeKernelConfig()  # int8 capped at 168 with 4 warps (measured), fp8 and 8-warp heads not
    assert default.split_launch_options("int8", 128)["maxnreg"] == 168 == default.split_launch_options("int8", 64)["maxnreg"]
    assert "maxnreg" not in default.split_launch_options("fp8_e4m3", 128)
    assert "maxnreg" not in default.split_launch_options("int8", 256)
    assert "maxnreg" not in DecodeKernelConfig.from_spec("int8_maxnreg=None").split_launch_options("int8", 128)
    for bad in ("maxnreg=16", "maxnreg=300", "int8_maxnreg=8"):
        with pytest.raises(ValueError, match="maxnreg must be in"):
            DecodeKernelConfig.from_spec(bad)
    case = make_case(head_size=64, seq_lens=(20, 70), act_dtype=torch.bfloat16, seed=15)
    run_and_check(case, max_num_splits=2, config=DecodeKernelConfig(block_n=16, min_tokens_per_split=16, maxnreg=128))


@pytest.mark.parametrize("kv_dtype", ["fp8_e4m3", "int8"])
@pytest.mark.parametrize("window", [None, 50])
def test_per_sequence_split_choice(kv_dtype, window):
    """``split_long_tokens``: short sequences of a batch use fewer of the plan's splits, long ones
    all of them, and at least the splits that fill the GPU (``fill_splits``); the split and
    reduce kernels agree on each sequence's active splits, so the answer matches the reference."""
    cfg = DecodeKernelConfig(block_n=16, min_tokens_per_split=16, split_long_tokens=48, fill_programs_per_sm=1)
    assert cfg.long_tiles_per_split(64, kv_dtype) == 3
    # Defaults per format (measured, see DecodeKernelConfig): fp8 2048 tokens = 16 tiles of 128, int8 off.
    assert DecodeKernelConfig().long_tiles_per_split(128, "fp8_e4m3") == 16
    assert DecodeKernelConfig().long_tiles_per_split(128, "int8") == 0
    assert DecodeKernelConfig(split_long_tokens_fp8=None).long_tiles_per_split(128, "fp8_e4m3") == 0
    assert cfg.fill_splits(num_seqs=4, num_kv_heads=2, num_sms=16) == 2 and cfg.fill_splits(64, 8, 16) == 1
    case = make_case(kv_dtype=kv_dtype, head_size=64, seq_lens=(5, 40, 130, 300, 17), seed=31)
    for splits in (1, 3, 8):  # 1: no split at all; 8: more than the short sequences use
        run_and_check(case, sliding_window=window, max_num_splits=splits, config=cfg)
    if window is not None:
        return
    # Active splits per sequence, read from the partial LSEs (-inf where a split had no tokens).
    ns, hq, d = case["query"].shape
    num_splits = choose_num_splits(ns, case["key_cache"].shape[2], d, DecodeKernelConfig().cpu_num_sms, 8)
    assert num_splits == 7, num_splits  # the plan's splits of this batch on the interpreter's 8 "SMs"
    n_o = ns * hq * num_splits * d

    ref = paged_decode_attention_ref(**case)

    def active_splits(config):
        """Partial LSEs written per sequence, into a NaN-filled workspace: the answer must not
        read what no split wrote."""
        ws = torch.full((workspace_numel(ns, hq, d, num_splits),), float("nan"), device=case["query"].device)
        out = paged_decode_attention(**case, max_num_splits=8, config=config, workspace=ws)
        torch.testing.assert_close(out.float(), ref.float(), atol=ATOL, rtol=RTOL)
        lse = ws[n_o : n_o + ns * hq * num_splits].view(ns, hq, num_splits)[:, 0]
        return torch.isfinite(lse).sum(1).tolist()

    base = DecodeKernelConfig(block_n=16, min_tokens_per_split=16, split_long_tokens_fp8=None)
    # 130 tokens = 9 tiles: 5 splits of 2 tiles, or 3 of 3 (48 tokens); 300 tokens: 7 of 3 either way.
    # A sequence of one active split (5 and 17 tokens: 1-2 tiles, 40: 3 tiles of 48 tokens) writes
    # its output from the split kernel: no partials, and splits without tiles write nothing.
    assert active_splits(base) == [0, 3, 5, 7, 2] and active_splits(cfg) == [0, 0, 3, 7, 0]
    with pytest.raises(ValueError, match="split_long_tokens must be >= 1"):
        DecodeKernelConfig(split_long_tokens=0)
    with pytest.raises(ValueError, match="split_long_tokens_int8 must be >= 1"):
        DecodeKernelConfig.from_spec("split_long_tokens_int8=0")
    with pytest.raises(ValueError, match="fill_programs_per_sm must be >= 1, got 0"):
        DecodeKernelConfig.from_spec("fill_programs_per_sm=0")


def test_bf16_query_beyond_fp16_range():
    """fp16 dots divide a bf16 query by a power of two in-kernel: |q| ~ 1e6 (fp16 max 65504) and
    tiny queries still match the reference, no inf/nan."""
    for q_mult, seed in ((3e5, 21), (1e-6, 22)):
        case = make_case(head_size=64, group=4, seq_lens=(5, 40), act_dtype=torch.bfloat16, q_mult=q_mult, seed=seed)
        assert case["query"].abs().max() > 65504 or q_mult < 1
        out = paged_decode_attention(**case, config=DecodeKernelConfig(block_n=16, min_tokens_per_split=16))
        assert torch.isfinite(out).all()
        ref = paged_decode_attention_ref(**case)
        torch.testing.assert_close(out.float(), ref.float(), atol=ATOL, rtol=RTOL)


def test_asm_choice_per_format():
    """The inline-PTX conversion is chosen per storage format (and only with fp16 dots)."""
    cfg = DecodeKernelConfig()
    assert cfg.uses_asm("int8") and not cfg.uses_asm("fp8_e4m3")
    assert (cfg.stages("int8"), cfg.stages("fp8_e4m3")) == (cfg.asm_num_stages, cfg.num_stages)
    assert not DecodeKernelConfig(dot_in_fp16=False).uses_asm("int8")
    assert DecodeKernelConfig(asm_dequant_fp8=True).uses_asm("fp8_e4m3")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kvd", ["fp8_e4m3", "int8"])
@pytest.mark.parametrize("act", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hs,grp,bs", [(64, 1, 16), (80, 4, 16), (128, 4, 64), (128, 8, 16), (256, 2, 32)])
def test_gpu_asm_and_cast_paths_agree(kvd, act, hs, grp, bs):
    """Both conversion paths (inline PTX with V staged as fp16; Triton's casts) on every format:
    each matches the reference, and they agree with each other."""
    case = make_case(head_size=hs, num_kv_heads=2, group=grp, block_size=bs, seq_lens=(1, 17, 300, 1000),
                     act_dtype=act, kv_dtype=kvd, cache_layout="vllm", seed=hs + grp + bs)  # fmt: skip
    asm = DecodeKernelConfig(asm_dequant_fp8=True, asm_dequant_int8=True)
    cast = DecodeKernelConfig(asm_dequant_fp8=False, asm_dequant_int8=False)
    outs = [run_and_check(case, max_num_splits=s, config=c)[0] for c in (asm, cast) for s in (1, 3)]
    tol = 2 * torch.finfo(act).eps  # two output ulps: the paths round partial sums differently
    for o in outs[1:]:
        torch.testing.assert_close(o.float(), outs[0].float(), atol=tol, rtol=tol)


def test_cpu_reference_fallback(monkeypatch):
    case = make_case(head_size=64, seq_lens=(5, 0, 40), device="cpu", seed=11)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    out = paged_decode_attention(**case, sliding_window=16, logits_soft_cap=3.0)
    ref = paged_decode_attention_ref(**case, sliding_window=16, logits_soft_cap=3.0)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


def test_validation_errors():
    case = make_case(head_size=64, num_kv_heads=2, group=2, seq_lens=(3,), seed=12)
    bad = lambda **kw: paged_decode_attention(**{**case, **kw})  # noqa: E731
    with pytest.raises(ValueError, match="query dtype"):
        bad(query=case["query"].float())
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        bad(query=case["query"][:, :3])
    with pytest.raises(ValueError, match="k_scale"):
        bad(k_scale=torch.ones(3, device=case["query"].device))
    with pytest.raises(ValueError, match="head size"):
        bad(key_cache=case["key_cache"][..., :32])
    with pytest.raises(ValueError, match="head size"):
        bad(query=torch.zeros(1, 4, 300, dtype=torch.float16, device=case["query"].device))
    with pytest.raises(ValueError, match="kv_dtype"):
        bad(kv_dtype="fp4")
    with pytest.raises(ValueError, match="1-byte"):
        bad(key_cache=case["key_cache"].to(torch.float16))
    with pytest.raises(ValueError, match="out must be"):
        bad(out=torch.empty(1, 4, 32, dtype=torch.float16, device=case["query"].device))


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("kvd", ["fp8_e4m3", "int8"])
def test_varlen_plan_serves_only_one_token_requests(kvd, splits):
    """The backend's launch: a plan over a vLLM batch (rows from query_start_loc) serves the
    requests with exactly one new token and leaves prefill and padding rows untouched."""
    lens = (37, 5, 90, 0, 20, 64)
    case = make_case(kv_dtype=kvd, head_size=64, num_kv_heads=2, group=2, seq_lens=lens, seed=21)
    q_lens = [1, 3, 1, 0, 4, 1]  # prefills of 3 and 4 tokens, one padding request (0 tokens)
    qsl = torch.tensor([0, *itertools.accumulate(q_lens)], dtype=torch.int32, device=case["query"].device)
    rows = int(qsl[-1])
    g = torch.Generator().manual_seed(5)
    query = (torch.randn(rows, *case["query"].shape[1:], generator=g) * 2).to(case["query"].dtype)
    query = query.to(case["query"].device)
    out = torch.full_like(query, float("nan"))
    layer = DecodeLayer(paged(case), num_q_heads=query.shape[1], act_dtype=query.dtype, config=SMALL)
    plan = DecodePlan.build(len(lens), case["block_table"], case["seq_lens"], qsl, num_q_heads=query.shape[1],
                            num_kv_heads=2, head_size=64, max_num_splits=splits, config=SMALL)  # fmt: skip
    assert plan.varlen and plan.num_splits == splits
    layer.run(query, out, plan)
    decode_reqs = [i for i, n in enumerate(q_lens) if n == 1]
    decode_rows = [int(qsl[i]) for i in decode_reqs]
    ref = paged_decode_attention_ref(
        query[decode_rows], case["key_cache"].view(KV_TORCH[kvd]), case["value_cache"].view(KV_TORCH[kvd]),
        case["block_table"][decode_reqs], case["seq_lens"][decode_reqs], case["k_scale"], case["v_scale"], kvd,
    )  # fmt: skip
    torch.testing.assert_close(out[decode_rows].float(), ref.float(), atol=ATOL, rtol=RTOL)
    others = [r for r in range(rows) if r not in decode_rows]
    assert torch.isnan(out[others]).all(), "rows of prefill requests were written"


def test_layer_and_plan_are_reused_across_calls():
    """One layer object, one plan, many calls with new queries: results match fresh calls."""
    case = make_case(head_size=64, num_kv_heads=2, group=2, seq_lens=(40, 3, 77), seed=22)
    hq = case["query"].shape[1]
    layer = DecodeLayer(paged(case), num_q_heads=hq, act_dtype=case["query"].dtype, config=SMALL)
    ws = alloc_decode_workspace(3, hq, 64, 4, device=case["query"].device)
    plans = [
        DecodePlan.build(3, case["block_table"], case["seq_lens"], None, num_q_heads=hq, num_kv_heads=2,
                         head_size=64, workspace=ws, max_num_splits=s, config=SMALL)
        for s in (4, 1)
    ]  # fmt: skip
    for i in range(3):
        q = torch.randn(case["query"].shape, generator=torch.Generator().manual_seed(i)).to(case["query"])
        for plan in plans:
            out = layer.run(q, torch.empty_like(q), plan)
            expected = paged_decode_attention(**{**case, "query": q}, max_num_splits=plan.num_splits, config=SMALL)
            torch.testing.assert_close(out, expected, atol=0, rtol=0)
    with pytest.raises(ValueError, match="decode plan for 8/2 heads of size 64 used with a layer of 4/2 heads"):
        other = DecodePlan.build(3, case["block_table"], case["seq_lens"], None, num_q_heads=2 * hq, num_kv_heads=2,
                                 head_size=64, max_num_splits=1, config=SMALL)  # fmt: skip
        layer.run(torch.zeros(3, 2 * hq, 64, dtype=q.dtype, device=q.device), torch.empty(3, 2 * hq, 64), other)


# ------------------------------------------------ GPU ------------------------------------------------


def _big_case(kv_dtype, num_seqs, ctx, per_head=True, act=torch.bfloat16, seed=0):
    """Llama-3-8B-like decode shapes built directly on the GPU (fast)."""
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(seed)
    hkv, grp, hs, bs = 8, 4, 128, 16
    nb_seq = math.ceil(ctx / bs)
    num_blocks = num_seqs * nb_seq + 7
    k = torch.randn(num_blocks * bs, hkv, hs, device=dev, generator=g)
    v = torch.randn(num_blocks * bs, hkv, hs, device=dev, generator=g)
    qmax = QMAX[kv_dtype]
    if per_head == "channel":  # channels of different ranges, each with its own scale
        k *= torch.exp(torch.randn(hkv, hs, device=dev, generator=g))
        v *= torch.exp(0.5 * torch.randn(hkv, hs, device=dev, generator=g))
        k_scale, v_scale = k.abs().amax(dim=0) / qmax, v.abs().amax(dim=0) / qmax
    else:
        k_scale = k.abs().amax(dim=(0, 2)) / qmax if per_head else (k.abs().amax() / qmax).reshape(1)
        v_scale = v.abs().amax(dim=(0, 2)) / qmax if per_head else (v.abs().amax() / qmax).reshape(1)
    kc = torch.empty(num_blocks, bs, hkv, hs, dtype=KV_TORCH[kv_dtype], device=dev)
    vc = torch.empty_like(kc)
    quantize_to_cache_ref(k, v, kc, vc, torch.arange(num_blocks * bs, device=dev), k_scale, v_scale, kv_dtype)
    del k, v
    perm = torch.randperm(num_blocks, device=dev, generator=g)[: num_seqs * nb_seq]
    block_table = perm.view(num_seqs, nb_seq).int()
    q = (torch.randn(num_seqs, hkv * grp, hs, device=dev, generator=g) * 2).to(act)
    return dict(query=q, key_cache=kc, value_cache=vc, block_table=block_table,
                seq_lens=torch.full((num_seqs,), ctx, dtype=torch.int32, device=dev),
                k_scale=k_scale.float(), v_scale=v_scale.float(), kv_dtype=kv_dtype)  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("kvd", ["fp8_e4m3", "int8"])
@pytest.mark.parametrize("num_seqs,ctx", [(64, 4096), (1, 32768), (8, 1000)])
@pytest.mark.parametrize("act", [torch.bfloat16, torch.float16])
def test_gpu_large(kvd, num_seqs, ctx, act):
    per_head = {64: True, 1: "channel", 8: False}[num_seqs]  # one granularity per shape
    case = _big_case(kvd, num_seqs, ctx, per_head=per_head, act=act)
    case["seq_lens"][0] = max(ctx - 5, 1)  # ragged
    run_and_check(case)
    run_and_check(case, max_num_splits=1)


@pytest.mark.gpu
@pytest.mark.parametrize("kvd", ["fp8_e4m3", "int8"])
def test_gpu_cuda_graph_replay_with_new_seq_lens(kvd):
    num_seqs, ctx = 4, 3000
    case = _big_case(kvd, num_seqs, ctx)
    hq, hs = case["query"].shape[1:]
    ws = alloc_decode_workspace(num_seqs, hq, hs, num_kv_heads=8, device="cuda")
    out = torch.empty_like(case["query"])
    seq_lens = case["seq_lens"]
    seq_lens.copy_(torch.tensor([3000, 17, 1, 2048], dtype=torch.int32))

    def call():
        paged_decode_attention(**case, out=out, workspace=ws)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        call()  # compile + warm up outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()

    for lens in ([2999, 1500, 0, 16], [1, 3000, 700, 65], [0, 0, 0, 0]):
        seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        replayed = out.clone()
        eager = paged_decode_attention(**case)
        assert not torch.isnan(replayed).any()
        torch.testing.assert_close(replayed, eager, atol=0, rtol=0)
        ref = paged_decode_attention_ref(**case)
        torch.testing.assert_close(replayed.float(), ref.float(), atol=ATOL, rtol=RTOL)


@pytest.mark.gpu
@pytest.mark.parametrize("kvd", ["fp8_e4m3", "int8"])
def test_gpu_direct_launch_matches_jit_launch(kvd):
    """The lean path's direct launches (a kept CompiledKernel) give the JIT launch's bits."""
    case = _big_case(kvd, 8, 3000)
    case["seq_lens"].copy_(torch.tensor([3000, 1, 17, 0, 2048, 999, 128, 2999], dtype=torch.int32))
    hq, hs = case["query"].shape[1:]
    layers = [
        DecodeLayer(paged(case), num_q_heads=hq, act_dtype=case["query"].dtype)
        for _ in range(2)
    ]
    layers[1]._split.direct = layers[1]._reduce.direct = False  # always through Triton's JIT
    qsl = torch.arange(9, dtype=torch.int32, device="cuda")
    plans = [
        DecodePlan.build(8, case["block_table"], case["seq_lens"], q, num_q_heads=hq, num_kv_heads=8, head_size=hs,
                         max_num_splits=s)
        for q in (None, qsl) for s in (None, 1)
    ]  # fmt: skip
    for i in range(3):
        q = torch.randn_like(case["query"])
        for plan in plans:
            direct, jit = (layer.run(q, torch.full_like(q, float("nan")), plan) for layer in layers)
            torch.testing.assert_close(direct, jit, atol=0, rtol=0)
    assert layers[0]._split.direct and layers[0]._split.compiled and layers[0]._reduce.compiled
    assert not layers[1]._split.compiled
