"""Quantize-on-write kernel vs. the PyTorch reference.

CPU tests run the Triton kernel in Triton's interpreter (``TRITON_INTERPRET=1``, set by
``_triton_env`` when there is no CUDA); ``gpu`` tests use large shapes on a real GPU.
Results are compared in quantized units: fp8 codes as ordered integers, int8 directly.
"""

from __future__ import annotations

import _triton_env  # noqa: F401  (sets TRITON_INTERPRET=1 before triton is imported)

import pytest
import torch

from vllm_kvquant.kernels import quantize_cache as qc
from vllm_kvquant.kernels.dtypes import KVQuantDType, qmax_of, torch_dtype_of
from vllm_kvquant.kernels.paged_cache import PagedKVCache
from vllm_kvquant.kernels.quantize_cache import CacheWriter, WriteConfig, pick_config, quantize_to_cache
from vllm_kvquant.kernels.reference import quantize_to_cache_ref

FP8, INT8 = KVQuantDType.FP8_E4M3, KVQuantDType.INT8
LAYOUTS = ("split", "block_interleaved", "hnd_packed")


# ---------------------------------------------------------------- helpers


def make_caches(layout: str, nb: int, bs: int, h: int, d: int, storage: torch.dtype, device: str = "cpu"):
    """K/V cache views ``[nb, bs, h, d]`` of one owner tensor, pre-filled with random bytes."""
    if layout == "split":  # kv_cache[0] / kv_cache[1] of [2, nb, bs, h, d]
        owner = torch.empty(2, nb, bs, h, d, dtype=torch.uint8, device=device)
        views = owner[0], owner[1]
    elif layout == "block_interleaved":  # kv_cache[:, 0] / [:, 1] of [nb, 2, bs, h, d]
        owner = torch.empty(nb, 2, bs, h, d, dtype=torch.uint8, device=device)
        views = owner[:, 0], owner[:, 1]
    elif layout == "hnd_packed":  # vLLM's [nb, h, bs, 2d] with K|V in the last dim
        owner = torch.empty(nb, h, bs, 2 * d, dtype=torch.uint8, device=device)
        views = owner.transpose(1, 2).split(d, dim=-1)
    else:
        raise AssertionError(layout)
    owner.copy_(torch.randint(0, 256, owner.shape, dtype=torch.uint8))
    if storage != torch.uint8:
        owner = owner.view(storage)
        views = tuple(v.view(storage) for v in views)
    return views


def make_kv(t: int, h: int, d: int, dtype: torch.dtype, device: str = "cpu", amp: float = 4.0):
    """K/V as views of a fused qkv tensor (token stride != h * d), with some tiny rows."""
    hq = 2 * h
    qkv = torch.randn(t, (hq + 2 * h) * d, device=device).mul_(amp)
    qkv[::7] *= 1e-3  # exercise fp8 subnormals
    qkv = qkv.to(dtype)
    key = qkv[:, hq * d : (hq + h) * d].view(t, h, d)
    value = qkv[:, (hq + h) * d :].view(t, h, d)
    return key, value


def make_scales(key: torch.Tensor, value: torch.Tensor, kv_dtype: KVQuantDType, per_head: bool | str):
    """Scales a bit below amax/qmax, so a few values saturate; ``per_head`` "channel": one scale per
    KV head and channel (``[heads, head_size]``), from each channel's own amax."""
    qmax = qmax_of(kv_dtype)
    if per_head == "channel":
        ks = key.float().abs().amax(dim=0) / qmax * 0.8
        vs = value.float().abs().amax(dim=0) / qmax * 0.9
        return ks.clamp_min(1e-4), vs.clamp_min(1e-4)
    dims = (0, 2) if per_head else (0, 1, 2)
    ks = key.float().abs().amax(dim=dims).reshape(-1) / qmax * 0.8
    vs = value.float().abs().amax(dim=dims).reshape(-1) / qmax * 0.9
    return ks.clamp_min(1e-4), vs.clamp_min(1e-4)


def make_slots(t: int, n: int, nb: int, bs: int, index_dtype: torch.dtype = torch.int64, device: str = "cpu"):
    """``n <= t`` distinct slots: ragged, ~20% padding (-1), block boundaries included."""
    perm = torch.randperm(nb * bs)
    edges = torch.tensor([0, bs - 1, bs, 2 * bs - 1, (nb - 1) * bs, nb * bs - 1]).unique()
    edges = edges[edges < nb * bs]
    rest = perm[~torch.isin(perm, edges)]
    slots = torch.cat([edges, rest])[:n]
    slots = slots[torch.randperm(n)]
    slots[torch.rand(n) < 0.2] = -1
    return slots.to(index_dtype).to(device)


def ordered_codes(cache: torch.Tensor, kv_dtype: KVQuantDType) -> torch.Tensor:
    """Quantized values as ordered integers, so that 1 = one quantization step (fp8: 1 ulp)."""
    if kv_dtype is INT8:
        return cache.view(torch.int8).to(torch.int16)
    u = cache.view(torch.uint8).to(torch.int16)
    mag = u & 0x7F
    return torch.where(u >= 0x80, -mag, mag)


def written_mask(slots: torch.Tensor, nb: int, bs: int) -> torch.Tensor:
    m = torch.zeros(nb * bs, dtype=torch.bool, device=slots.device)
    s = slots[slots >= 0].long()
    m[s] = True
    return m.view(nb, bs)


def check_against_ref(key, value, kc, vc, slots, ks, vs, kv_dtype, config=None, max_ulp=1):
    """Run kernel and reference on copies of the same caches; compare in quantized units."""
    kc_ref, vc_ref = kc.clone(), vc.clone()
    before_k, before_v = kc.clone(), vc.clone()
    quantize_to_cache(key, value, kc, vc, slots, ks, vs, kv_dtype, config=config)
    storage = torch_dtype_of(kv_dtype)
    quantize_to_cache_ref(key, value, kc_ref.view(storage), vc_ref.view(storage), slots, ks, vs, kv_dtype)
    nb, bs = kc.shape[:2]
    written = written_mask(slots, nb, bs)
    for got, ref, before in ((kc, kc_ref, before_k), (vc, vc_ref, before_v)):
        g, r, b = (x.view(torch.uint8) for x in (got, ref, before))
        assert torch.equal(g[~written], b[~written]), "kernel touched slots it must not write"
        diff = (ordered_codes(got, kv_dtype) - ordered_codes(ref, kv_dtype)).abs()
        assert int(diff.max()) <= max_ulp, f"max diff {int(diff.max())} quantized units"
    return kc, vc


# ---------------------------------------------------------------- CPU grid (interpreter)

GRID_CFG = WriteConfig(block_t=16, block_h=4, num_warps=4)  # one program per case: fast interpreter runs


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("head_size", [64, 80, 128])
@pytest.mark.parametrize("per_head", [False, True, "channel"], ids=["per_tensor", "per_head", "per_channel"])
@pytest.mark.parametrize("kv_dtype", [FP8, INT8], ids=["fp8", "int8"])
@pytest.mark.parametrize("act", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_matches_reference(act, kv_dtype, per_head, head_size, block_size, layout):
    torch.manual_seed(hash((str(act), kv_dtype.value, per_head, head_size, block_size, layout)) % 2**31)
    t, h, nb = 16, 4, 3
    key, value = make_kv(t, h, head_size, act)
    ks, vs = make_scales(key, value, kv_dtype, per_head)
    storage = torch_dtype_of(kv_dtype) if layout == "split" else torch.uint8
    kc, vc = make_caches(layout, nb, block_size, h, head_size, storage)
    index_dtype = torch.int32 if block_size == 16 else torch.int64
    slots = make_slots(t, t - 3, nb, block_size, index_dtype)
    check_against_ref(key, value, kc, vc, slots, ks, vs, kv_dtype, config=GRID_CFG)


@pytest.mark.parametrize("kv_dtype", [FP8, INT8], ids=["fp8", "int8"])
@pytest.mark.parametrize("per_head", [False, True], ids=["per_tensor", "per_head"])
def test_head_size_256(kv_dtype, per_head):
    torch.manual_seed(256)
    t, h, d, nb, bs = 20, 2, 256, 2, 16
    key, value = make_kv(t, h, d, torch.bfloat16)
    ks, vs = make_scales(key, value, kv_dtype, per_head)
    kc, vc = make_caches("block_interleaved", nb, bs, h, d, torch.uint8)
    slots = make_slots(t, t, nb, bs)
    check_against_ref(key, value, kc, vc, slots, ks, vs, kv_dtype, config=WriteConfig(16, 2, 4))


@pytest.mark.parametrize("kv_dtype", [FP8, INT8], ids=["fp8", "int8"])
def test_default_config(kv_dtype):
    """The launch heuristic's own shape (one token per program at this size)."""
    torch.manual_seed(1)
    t, h, d, nb, bs = 12, 2, 96, 2, 16
    key, value = make_kv(t, h, d, torch.float16)
    ks, vs = make_scales(key, value, kv_dtype, True)
    kc, vc = make_caches("split", nb, bs, h, d, torch.uint8)
    check_against_ref(key, value, kc, vc, make_slots(t, t - 1, nb, bs), ks, vs, kv_dtype)


@pytest.mark.parametrize("kv_dtype", [FP8, INT8], ids=["fp8", "int8"])
def test_head_blocks_and_token_tail(kv_dtype):
    """6 heads in blocks of 4 (masked head tail), 16 tokens per program over 21 slots."""
    torch.manual_seed(2)
    t, h, d, nb, bs = 25, 6, 112, 3, 16
    key, value = make_kv(t, h, d, torch.bfloat16)
    ks, vs = make_scales(key, value, kv_dtype, True)
    kc, vc = make_caches("hnd_packed", nb, bs, h, d, torch.uint8)
    slots = make_slots(t, 21, nb, bs)
    check_against_ref(key, value, kc, vc, slots, ks, vs, kv_dtype, config=WriteConfig(16, 4, 4))


@pytest.mark.parametrize("kv_dtype", [FP8, INT8], ids=["fp8", "int8"])
def test_strided_head_dim_and_fp32_input(kv_dtype):
    """Last-dim stride != 1 (generic addressing path) and fp32 activations."""
    torch.manual_seed(3)
    t, h, d, nb, bs = 16, 4, 64, 2, 16
    key = torch.randn(t, d, h).transpose(1, 2)  # stride(-1) == h
    value = torch.randn(t, d, h).transpose(1, 2)
    ks, vs = make_scales(key, value, kv_dtype, False)
    kc, vc = make_caches("split", nb, bs, h, d, torch.uint8)
    check_against_ref(key, value, kc, vc, make_slots(t, t, nb, bs), ks, vs, kv_dtype, config=WriteConfig(16, 4, 4))


@pytest.mark.parametrize("kv_dtype", [FP8, INT8], ids=["fp8", "int8"])
def test_reciprocal_variant_within_one_unit(kv_dtype):
    torch.manual_seed(6)
    t, h, d, nb, bs = 16, 4, 64, 2, 16
    key, value = make_kv(t, h, d, torch.bfloat16)
    kc, vc = make_caches("split", nb, bs, h, d, torch.uint8)
    cfg = WriteConfig(16, 4, 4, reciprocal=True)
    for per_head in (True, "channel"):
        ks, vs = make_scales(key, value, kv_dtype, per_head)
        check_against_ref(key, value, kc, vc, make_slots(t, t, nb, bs), ks, vs, kv_dtype, config=cfg)


def test_two_dim_key_value_accepted():
    """``[tokens, heads * head_size]`` views are read as ``[tokens, heads, head_size]``."""
    torch.manual_seed(4)
    t, h, d, nb, bs = 8, 2, 64, 1, 16
    key, value = make_kv(t, h, d, torch.float16)
    ks, vs = make_scales(key, value, FP8, False)
    kc, vc = make_caches("split", nb, bs, h, d, torch.uint8)
    slots = make_slots(t, t, nb, bs)
    k2, v2 = key.reshape(t, h * d), value.reshape(t, h * d)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    quantize_to_cache(k2, v2, kc, vc, slots, ks, vs, "fp8_e4m3", config=WriteConfig(8, 2, 4))
    quantize_to_cache_ref(key, value, kc_ref, vc_ref, slots, ks, vs, FP8)
    assert (ordered_codes(kc, FP8) - ordered_codes(kc_ref, FP8)).abs().max() <= 1
    assert (ordered_codes(vc, FP8) - ordered_codes(vc_ref, FP8)).abs().max() <= 1


def test_fp8_rounding_is_exact_on_all_codes_and_midpoints():
    """Every e4m3 value, the midpoints between neighbours (ties to even) and nudges around them."""
    pos = torch.arange(0, 0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # 0 .. 448
    mids = (pos[:-1] + pos[1:]) / 2
    near = torch.cat([mids * (1 + 2**-20), mids * (1 - 2**-20), pos * (1 + 2**-22)])
    vals = torch.cat([pos, mids, near, torch.tensor([1e-9, 2.0**-10, 3 * 2.0**-11, 450.0, 464.0, 1e30])])
    vals = torch.cat([vals, -vals])
    d, h = 64, 1
    t = (vals.numel() + d - 1) // d
    x = torch.zeros(t * d)
    x[: vals.numel()] = vals
    key = x.view(t, h, d)
    kc, vc = make_caches("split", t, 1, h, d, torch.uint8)
    slots = torch.arange(t)
    one = torch.ones(1)
    quantize_to_cache(key, key, kc, vc, slots, one, one, FP8, config=WriteConfig(8, 1, 4))
    want = key.to(torch.float8_e4m3fn).view(torch.uint8)  # below saturation: plain RNE cast
    sat = key.abs() > 448
    want = torch.where(sat, torch.where(key > 0, 0x7E, 0xFE).to(torch.uint8), want)
    got = kc.view(torch.uint8).reshape(t, h, d)
    assert torch.equal(got, want)


def test_int8_ties_round_half_to_even():
    vals = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -126.5, 0.49999997, -0.49999997, 3.0, -3.0])
    d = 16
    key = torch.zeros(1, 1, d)
    key[0, 0, : vals.numel()] = vals
    kc, vc = make_caches("split", 1, 16, 1, d, torch.uint8)
    one = torch.ones(1)
    quantize_to_cache(key, key, kc, vc, torch.tensor([5]), one, one, INT8)
    assert torch.equal(kc.view(torch.int8)[0, 5, 0], torch.round(key[0, 0]).to(torch.int8))


@pytest.mark.parametrize("kv_dtype", [FP8, INT8], ids=["fp8", "int8"])
def test_saturation_never_nan_or_inf(kv_dtype):
    vals = [1e4, -1e4, 65504.0, -65504.0, float("inf"), float("-inf"), 448.5, -127.6]
    d = 16
    key = torch.zeros(1, 1, d, dtype=torch.float16)
    key[0, 0, : len(vals)] = torch.tensor(vals)
    kc, vc = make_caches("split", 1, 16, 1, d, torch.uint8)
    scale = torch.tensor([1.0])
    quantize_to_cache(key, key, kc, vc, torch.tensor([3]), scale, scale, kv_dtype)
    q = kc.view(torch_dtype_of(kv_dtype))[0, 3, 0, : len(vals)].float()
    qmax = qmax_of(kv_dtype)
    assert torch.isfinite(q).all()
    want = torch.tensor(vals).clamp(-qmax, qmax)
    if kv_dtype is INT8:
        want = torch.round(want)
    assert torch.equal(q, want.to(torch_dtype_of(kv_dtype)).float())


def test_all_padding_and_empty_mapping_write_nothing():
    key, value = make_kv(4, 2, 64, torch.float16)
    kc, vc = make_caches("split", 1, 16, 2, 64, torch.uint8)
    before = kc.clone(), vc.clone()
    s = torch.ones(1)
    quantize_to_cache(key, value, kc, vc, torch.full((4,), -1), s, s, INT8)
    quantize_to_cache(key, value, kc, vc, torch.empty(0, dtype=torch.int64), s, s, INT8)
    assert torch.equal(kc, before[0]) and torch.equal(vc, before[1])


def test_cpu_without_interpreter_uses_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch.manual_seed(5)
    key, value = make_kv(10, 2, 80, torch.bfloat16)
    ks, vs = make_scales(key, value, INT8, True)
    kc, vc = make_caches("block_interleaved", 2, 16, 2, 80, torch.uint8)
    slots = make_slots(10, 9, 2, 16)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    quantize_to_cache(key, value, kc, vc, slots, ks, vs, INT8)
    quantize_to_cache_ref(key, value, kc_ref, vc_ref, slots, ks, vs, INT8)
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)


def test_pick_config_heuristic():
    small = pick_config(16, 8, 128)
    assert (small.block_t, small.block_h) == (1, 8)
    big = pick_config(32768, 8, 128)
    assert big.block_t * big.block_h * 128 <= qc.PROGRAM_ELEMS and big.block_t >= 2 and big.num_warps <= qc.MAX_WARPS
    wide = pick_config(4096, 64, 256)
    assert wide.block_h * 256 <= qc.TILE_ELEMS_MAX


# ---------------------------------------------------------------- validation


def _valid_args(h=2, d=64):
    key, value = make_kv(4, h, d, torch.float16)
    kc, vc = make_caches("split", 1, 16, h, d, torch.uint8)
    s = torch.ones(1)
    return dict(
        key=key, value=value, key_cache=kc, value_cache=vc, slot_mapping=torch.arange(4),
        k_scale=s, v_scale=s, kv_dtype="int8",
    )  # fmt: skip


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(kv_dtype="fp4"), "kv_dtype must be one of"),
        (dict(key=torch.zeros(4, 2, 64, dtype=torch.int32)), "float16, bfloat16 or float32"),
        (dict(key=torch.zeros(4, 3, 64, dtype=torch.float16)), "3 heads of size 64"),
        (dict(value=torch.zeros(4, 2, 32, dtype=torch.float16)), "2 heads of size 32"),
        (dict(key=torch.zeros(4, 2, 64, 1, dtype=torch.float16)), r"key must be \[num_tokens"),
        (dict(value=torch.zeros(3, 2, 64, dtype=torch.float16)), "4 tokens but value has 3"),
        (dict(k_scale=torch.ones(3)), "k_scale has 3 values"),
        (dict(k_scale=torch.ones(2, 63)), r"k_scale has 126 values; expected 1 \(per tensor\), 2 \(per KV head\) or 2 x 64 = 128"),
        (dict(v_scale=torch.ones(1, dtype=torch.int32)), "v_scale must be a float"),
        (dict(key_cache=torch.zeros(1, 16, 2, 64, dtype=torch.float16)), "one-byte dtype"),
        (dict(value_cache=torch.zeros(16, 2, 64, dtype=torch.uint8)), r"value_cache must be \[num_blocks"),
        (dict(value_cache=torch.zeros(2, 16, 2, 64, dtype=torch.uint8)), "differ"),
        (dict(slot_mapping=torch.zeros(4)), "slot_mapping must be 1-D int32/int64"),
        (dict(slot_mapping=torch.arange(5)), "5 entries for 4 tokens"),
    ],
)
def test_validation_errors(change, match):
    args = _valid_args()
    args.update(change)
    with pytest.raises(ValueError, match=match):
        quantize_to_cache(**args)


# ---------------------------------------------------------------- GPU (large shapes, real hardware)


def _gpu_case(t, h, d, act, kv_dtype, per_head, layout, bs=16, config=None, exact_frac=0.9999):
    torch.manual_seed(t + h + d)
    nb = (t + bs - 1) // bs + 8
    key, value = make_kv(t, h, d, act, device="cuda")
    ks, vs = make_scales(key, value, kv_dtype, per_head)
    kc, vc = make_caches(layout, nb, bs, h, d, torch.uint8, device="cuda")
    slots = make_slots(t, t, nb, bs, torch.int64, device="cuda")
    kc_ref, vc_ref = kc.clone(), vc.clone()
    before = kc.clone()
    quantize_to_cache(key, value, kc, vc, slots, ks, vs, kv_dtype, config=config)
    storage = torch_dtype_of(kv_dtype)
    quantize_to_cache_ref(key, value, kc_ref.view(storage), vc_ref.view(storage), slots, ks, vs, kv_dtype)
    torch.cuda.synchronize()
    written = written_mask(slots, nb, bs)
    assert torch.equal(kc[~written], before[~written])
    for got, ref in ((kc, kc_ref), (vc, vc_ref)):
        diff = (ordered_codes(got[written], kv_dtype) - ordered_codes(ref[written], kv_dtype)).abs()
        assert int(diff.max()) <= 1
        frac = float((diff == 0).float().mean())
        assert frac >= exact_frac, f"only {frac:.6f} of values match the reference exactly"


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("per_head", [False, True, "channel"], ids=["per_tensor", "per_head", "per_channel"])
@pytest.mark.parametrize("kv_dtype", [FP8, INT8], ids=["fp8", "int8"])
@pytest.mark.parametrize("act", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_gpu_large(act, kv_dtype, per_head, layout):
    _gpu_case(8192, 8, 128, act, kv_dtype, per_head, layout)


@pytest.mark.gpu
@pytest.mark.parametrize("head_size", [32, 64, 80, 96, 112, 128, 160, 192, 256])
@pytest.mark.parametrize("kv_dtype", [FP8, INT8], ids=["fp8", "int8"])
def test_gpu_head_sizes(kv_dtype, head_size):
    _gpu_case(3000, 4, head_size, torch.bfloat16, kv_dtype, True, "hnd_packed", bs=32)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 7, 256, 4096, 32768])
def test_gpu_heuristic_sizes(tokens):
    _gpu_case(tokens, 8, 128, torch.bfloat16, FP8, False, "split")


@pytest.mark.gpu
def test_gpu_software_fp8_path(monkeypatch):
    """The pre-sm89 encoder, compiled for the GPU, agrees with the hardware cast."""
    monkeypatch.setattr(qc, "_needs_soft_fp8", lambda device: True)
    _gpu_case(4096, 8, 128, torch.bfloat16, FP8, True, "split")


@pytest.mark.gpu
@pytest.mark.parametrize("kv_dtype", [FP8, INT8], ids=["fp8", "int8"])
def test_gpu_reciprocal_variant(kv_dtype):
    cfg = pick_config(4096, 8, 128)
    cfg = WriteConfig(cfg.block_t, cfg.block_h, cfg.num_warps, reciprocal=True)
    _gpu_case(4096, 8, 128, torch.bfloat16, kv_dtype, True, "split", config=cfg, exact_frac=0.99)


@pytest.mark.gpu
def test_gpu_cuda_graph_replay():
    """Capturable: no host sync or allocation; replays pick up new inputs in place."""
    t, h, d, bs, nb = 512, 8, 128, 16, 40
    key, value = make_kv(t, h, d, torch.bfloat16, device="cuda")
    kc, vc = make_caches("split", nb, bs, h, d, torch.uint8, device="cuda")
    slots = make_slots(t, t, nb, bs, device="cuda")
    ks = torch.full((h,), 0.02, device="cuda")
    vs = torch.full((1,), 0.03, device="cuda")
    quantize_to_cache(key, value, kc, vc, slots, ks, vs, FP8)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        quantize_to_cache(key, value, kc, vc, slots, ks, vs, FP8)
    key.copy_(torch.randn_like(key))
    value.copy_(torch.randn_like(value))
    slots.copy_(make_slots(t, t, nb, bs, device="cuda"))
    graph.replay()
    kc_ref, vc_ref = kc.clone(), vc.clone()
    quantize_to_cache_ref(key, value, kc_ref.view(torch.float8_e4m3fn), vc_ref.view(torch.float8_e4m3fn), slots, ks, vs, FP8)
    torch.cuda.synchronize()
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)


@pytest.mark.parametrize("kv_dtype", [FP8, INT8], ids=["fp8", "int8"])
def test_cache_writer_reused_across_calls(kv_dtype):
    """The backend's writer (validated once, launch shape memoized per slot count) writes what
    the public function writes, call after call, for 2-D and 3-D K/V and any slot count."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    h, d, bs, nb = 2, 64, 16, 6
    ks, vs = torch.full((h,), 0.02, device=dev), torch.full((1,), 0.03, device=dev)
    kc, vc = make_caches("split", nb, bs, h, d, torch.uint8, device=dev)
    kc2, vc2 = kc.clone(), vc.clone()
    writer = CacheWriter(PagedKVCache(kc, vc, ks, vs, kv_dtype))
    for i, t in enumerate((5, 17, 5)):
        key, value = make_kv(t, h, d, torch.bfloat16, device=dev)
        slots = make_slots(t, t, nb, bs, device=dev)
        writer.write(key.reshape(t, h * d) if i == 1 else key, value, slots)
        quantize_to_cache(key, value, kc2, vc2, slots, ks, vs, kv_dtype)
        assert torch.equal(kc, kc2) and torch.equal(vc, vc2)
    assert sorted(writer._plans) == ([5, 17] if not writer.reference else [])


@pytest.mark.gpu
def test_gpu_cache_writer_direct_launch():
    """Repeated writes reuse the compiled kernel (no Triton dispatch) and match the JIT's bytes."""
    t, h, d, bs, nb = 300, 8, 128, 16, 40
    ks, vs = torch.full((h,), 0.02, device="cuda"), torch.full((1,), 0.03, device="cuda")
    kc, vc = make_caches("split", nb, bs, h, d, torch.uint8, device="cuda")
    kc2, vc2 = kc.clone(), vc.clone()
    direct, jit = CacheWriter(PagedKVCache(kc, vc, ks, vs, FP8)), CacheWriter(PagedKVCache(kc2, vc2, ks, vs, FP8))
    jit._kernel.direct = False
    for seed in range(3):
        key, value = make_kv(t, h, d, torch.bfloat16, device="cuda")
        slots = make_slots(t, t, nb, bs, device="cuda")
        direct.write(key, value, slots)
        jit.write(key, value, slots)
        torch.cuda.synchronize()
        assert torch.equal(kc, kc2) and torch.equal(vc, vc2)
    assert direct._kernel.direct and len(direct._kernel.compiled) == 1


@pytest.mark.gpu
def test_gpu_benchmark_smoke():
    """``benchmarks/kernels/cache_write.py`` runs and yields sane rows (vLLM rows only if importable)."""
    from benchmarks.kernels import cache_write as bench

    rows = bench.bench_quantize_write((1024,))
    names = {r["name"] for r in rows}
    assert {"kvquant-write-fp8", "kvquant-write-int8"} <= names
    assert all(r["us"] > 0 and r["gbps"] > 0 and r["batch"] == 1024 for r in rows)
