"""benchmarks.kernels.decode_lab's cache layouts: the same logical K/V in each, and our decode
kernel (Triton interpreter on CPU) right on every one of them, so a layout timed on the GPU
machine is a layout the kernel computes correctly."""

from __future__ import annotations

import _triton_env  # noqa: F401  (TRITON_INTERPRET=1 without CUDA)
import pytest
import torch

from benchmarks.kernels import decode_lab
from benchmarks.kernels.decode_lab import LAYOUTS, SCALE, SCALE_GRANULARITIES, make_case, make_scales, parse_config
from vllm_kvquant.kernels.decode_attention import DecodeKernelConfig, DecodeLayer, DecodePlan
from vllm_kvquant.kernels.paged_cache import PagedKVCache
from vllm_kvquant.kernels.reference import paged_decode_attention_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPE = dict(batch=3, context=70, hq=8, hkv=2, d=32, bs=16, copies=2)


def _case(kv_dtype: str, layout: str):
    return make_case(SHAPE["batch"], SHAPE["context"], kv_dtype, SHAPE["hq"], SHAPE["hkv"], SHAPE["d"], SHAPE["bs"],
                     SHAPE["copies"], seed=3, layout=layout, device=DEVICE)  # fmt: skip


@pytest.mark.parametrize("kv_dtype", ["fp8_e4m3", "int8"])
def test_layouts_hold_the_same_values(kv_dtype):
    (k0, v0, t0, _, q0), (k1, v1, t1, _, q1) = (_case(kv_dtype, lay) for lay in LAYOUTS)
    assert torch.equal(k0, k1) and torch.equal(v0, v1)  # logical [block, token, head, channel] values
    assert all(torch.equal(a, b) for a, b in zip(t0 + q0, t1 + q1))
    assert v0.stride()[1] != 1 and v1.stride()[1] == 1 and v1.stride()[3] == SHAPE["bs"]  # tokens contiguous


@pytest.mark.parametrize("page_masks", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kv_dtype", ["fp8_e4m3", "int8"])
def test_kernel_matches_reference_on_each_layout(kv_dtype, layout, page_masks):
    key, value, tables, seq_lens, queries = _case(kv_dtype, layout)
    seq_lens = torch.tensor([70, 1, 45], dtype=torch.int32, device=DEVICE)  # ragged, one a single token
    ks, vs = (torch.tensor([s], device=DEVICE) for s in SCALE[kv_dtype])
    cfg = DecodeKernelConfig(block_n=32, min_tokens_per_split=32, page_masks=page_masks)
    cache = PagedKVCache(key, value, ks, vs, kv_dtype)
    layer = DecodeLayer(cache, num_q_heads=SHAPE["hq"], act_dtype=torch.bfloat16, config=cfg)
    assert not layer.reference  # the Triton kernel (interpreted on CPU), not the PyTorch fallback
    for splits in (1, 3):
        plan = DecodePlan.build(SHAPE["batch"], tables[1], seq_lens, None, num_q_heads=SHAPE["hq"],
                                num_kv_heads=SHAPE["hkv"], head_size=SHAPE["d"], max_num_splits=splits, config=cfg)  # fmt: skip
        out = layer.run(queries[1], torch.full_like(queries[1], float("nan")), plan)
        ref = paged_decode_attention_ref(queries[1], cache.key_cache, cache.value_cache, tables[1], seq_lens, ks, vs,
                                         kv_dtype)  # fmt: skip
        torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


def test_config_specs():
    assert parse_config("") == DecodeKernelConfig()
    assert parse_config("page_masks=1,num_stages=3").page_masks is True
    with pytest.raises(SystemExit, match="unknown DecodeKernelConfig field 'stages'"):
        parse_config("stages=3")


def test_unknown_layout_is_refused():
    with pytest.raises(SystemExit, match="unknown cache layout 'hnd'"):
        make_case(1, 16, "int8", 2, 1, 32, 16, 1, layout="hnd", device="cpu")


def test_split_kernel_resources_give_programs_per_sm() -> None:
    """Registers bound occupancy at 168 (3 programs of 4 warps), shared memory at 100 KB (2)."""
    from types import SimpleNamespace

    def layer(regs, shared):
        k = SimpleNamespace(n_regs=regs, n_spills=0, metadata=SimpleNamespace(shared=shared, num_warps=4))
        return SimpleNamespace(_split=SimpleNamespace(compiled={"key": k}))

    assert decode_lab.split_kernel_resources(layer(168, 74752)) == dict(
        regs=168, spills=0, shared_bytes=74752, programs_per_sm=3)  # fmt: skip
    assert decode_lab.split_kernel_resources(layer(128, 107520))["programs_per_sm"] == 2
    assert decode_lab.split_kernel_resources(SimpleNamespace(_split=SimpleNamespace(compiled={}))) == {}


@pytest.mark.parametrize("granularity", SCALE_GRANULARITIES)
@pytest.mark.parametrize("kv_dtype", ["fp8_e4m3", "int8"])
def test_kernel_matches_reference_with_each_scale_granularity(kv_dtype, granularity):
    """``--scales``: the lab's per-head / per-channel scales (varied, so a wrong scale shows)
    reach the kernel and the reference alike."""
    key, value, tables, seq_lens, queries = _case(kv_dtype, "backend")
    ks, vs = make_scales(kv_dtype, granularity, SHAPE["hkv"], SHAPE["d"], device=DEVICE)
    assert ks.numel() == {"per_tensor": 1, "per_head": SHAPE["hkv"], "per_channel": SHAPE["hkv"] * SHAPE["d"]}[granularity]
    assert granularity == "per_tensor" or len(set(ks.flatten().tolist())) > 1
    cfg = DecodeKernelConfig(block_n=32, min_tokens_per_split=32)
    cache = PagedKVCache(key, value, ks, vs, kv_dtype)
    layer = DecodeLayer(cache, num_q_heads=SHAPE["hq"], act_dtype=torch.bfloat16, config=cfg)
    plan = DecodePlan.build(SHAPE["batch"], tables[0], seq_lens, None, num_q_heads=SHAPE["hq"],
                            num_kv_heads=SHAPE["hkv"], head_size=SHAPE["d"], max_num_splits=3, config=cfg)  # fmt: skip
    out = layer.run(queries[0], torch.full_like(queries[0], float("nan")), plan)
    ref = paged_decode_attention_ref(queries[0], cache.key_cache, cache.value_cache, tables[0], seq_lens, ks, vs, kv_dtype)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


def test_unknown_scale_granularity_is_refused():
    with pytest.raises(SystemExit, match="unknown scale granularity 'per_row'"):
        make_scales("int8", "per_row", 2, 32, device="cpu")
