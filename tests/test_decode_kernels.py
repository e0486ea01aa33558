"""Decode kernel choice (``kernel`` option): selection, start-up refusals and their messages, the
per-batch plan, and each runner's wiring, on CPU.

FA3 and FlashInfer cannot run here: their runners are driven with stand-ins that implement the
library call's documented semantics (FA3: fp8 q/k/v times their ``[num_seqs, num_kv_heads]``
descales; FlashInfer: unit-scale attention over ``HND`` views), so what is tested is ours: the
query quantization, descale views, scale folding, cache views and plan plumbing. The kernels
themselves are checked on a GPU in ``test_decode_kernels_gpu.py``.
"""

from __future__ import annotations

import math

import _triton_env  # noqa: F401  (TRITON_INTERPRET=1 without CUDA)
import pytest
import torch

from vllm_kvquant import compat
from vllm_kvquant.backend import KVQuantAttentionBackend
from vllm_kvquant.config import KERNEL_CHOICES, KVQuantConfig
from vllm_kvquant.decode_runner import DecodePlan, DecodeSpec, TritonDecodeRunner
from vllm_kvquant.peer_decode import (
    DecodeEnv,
    FA3DecodeRunner,
    FlashInferDecodePlanner,
    FlashInferDecodeRunner,
    create_planner,
    create_runner,
    flashinfer_page_table,
    resolve_kernel,
)
from vllm_kvquant.errors import KVQuantConfigError
from vllm_kvquant.kernels.dtypes import KVQuantDType
from vllm_kvquant.kernels.paged_cache import PagedKVCache
from vllm_kvquant.kernels.reference import paged_decode_attention_ref, quantize_to_cache_ref

FP8 = torch.float8_e4m3fn
HOPPER_OK = DecodeEnv("cuda", (9, 0), None, None)
QMAX = {"fp8_e4m3": 448.0, "int8": 127.0}


def _resolve(kernel, env=HOPPER_OK, kv_dtype="fp8_e4m3", model_dtype=torch.bfloat16, head_size=128):
    return resolve_kernel(kernel, kv_dtype=kv_dtype, model_dtype=model_dtype, head_size=head_size, env=env)


# ------------------------------------------------------------------ option and selection


def test_config_kernel_option():
    assert KVQuantConfig.from_additional_config(None).kernel == "auto"
    for k in KERNEL_CHOICES:
        assert KVQuantConfig.from_additional_config({"kvquant": {"kernel": k}}).kernel == k
    with pytest.raises(KVQuantConfigError) as e:
        KVQuantConfig.from_additional_config({"kvquant": {"kernel": "cuda"}})
    assert "additional_config['kvquant']['kernel'] = 'cuda' is not supported" in str(e.value)
    assert "'flashinfer'" in str(e.value)


@pytest.mark.parametrize("kv_dtype", ["fp8_e4m3", "int8"])
@pytest.mark.parametrize("env", [DecodeEnv("cpu"), HOPPER_OK, DecodeEnv("cuda", (8, 0), "x", "y")])
def test_auto_and_triton_are_triton_everywhere(env, kv_dtype):
    assert _resolve("auto", env, kv_dtype) == "triton"
    assert _resolve("triton", env, kv_dtype, model_dtype=torch.float16, head_size=80) == "triton"


def test_fa3_and_flashinfer_where_they_can_run():
    assert _resolve("fa3") == "fa3"
    assert _resolve("flashinfer", model_dtype=torch.float16, head_size=64) == "flashinfer"
    assert _resolve("flashinfer", DecodeEnv("cuda", (8, 0), "no fa3", None)) == "flashinfer"


@pytest.mark.parametrize(
    "kernel, kwargs, needle",
    [
        ("fa3", dict(env=DecodeEnv("cpu")), "FA3 needs a CUDA GPU and this process runs on cpu"),
        ("flashinfer", dict(env=DecodeEnv("cpu")), "FlashInfer needs a CUDA GPU and this process runs on cpu"),
        ("fa3", dict(kv_dtype="int8"), "FA3 reads fp8_e4m3 caches only and this cache stores int8"),
        ("flashinfer", dict(kv_dtype="int8"), "FlashInfer reads fp8_e4m3 caches only"),
        ("fa3", dict(env=DecodeEnv("cuda", (8, 0), None, None)), "FA3 needs a Hopper GPU (sm_90) and this GPU is sm_80"),
        ("fa3", dict(env=DecodeEnv("cuda", (10, 0), None, None)), "this GPU is sm_100"),
        ("fa3", dict(env=DecodeEnv("cuda", (9, 0), "vLLM's FA3 kernels are unavailable (no .so)", None)),
         "vLLM's FA3 kernels are unavailable (no .so)"),
        ("fa3", dict(model_dtype=torch.float16), "FA3 writes bfloat16 output for fp8 inputs and the model runs in torch.float16"),
        ("fa3", dict(head_size=72), "multiple of 16 and <= 256, not 72"),
        ("flashinfer", dict(env=DecodeEnv("cuda", (9, 0), None, "FlashInfer is not installed (ImportError)")),
         "FlashInfer is not installed"),
        ("flashinfer", dict(head_size=96), "FlashInfer decodes head sizes [64, 128, 256], not 96"),
        ("flashinfer", dict(env=DecodeEnv("cuda", (7, 5), None, None)), "needs sm_80 or newer and this GPU is sm_75"),
        ("cuda", {}, "additional_config['kvquant']['kernel'] = 'cuda' is not supported"),
    ],
)  # fmt: skip
def test_refusals_name_the_option_and_the_reason(kernel, kwargs, needle):
    with pytest.raises(KVQuantConfigError) as e:
        _resolve(kernel, **kwargs)
    msg = str(e.value)
    assert needle in msg
    assert f"additional_config['kvquant']['kernel'] = {kernel!r}" in msg


def test_per_channel_scales_refuse_fa3_and_fold_into_flashinfer():
    """fa3's descales are per KV head: per-channel scales are a start-up refusal naming the option."""
    with pytest.raises(KVQuantConfigError) as e:
        resolve_kernel("fa3", kv_dtype="fp8_e4m3", model_dtype=torch.bfloat16, head_size=128, env=HOPPER_OK,
                       per_channel=True)  # fmt: skip
    msg = str(e.value)
    assert "additional_config['kvquant']['kernel'] = 'fa3'" in msg and "cannot apply per-channel scales" in msg
    assert "--granularity per_head" in msg
    assert resolve_kernel("flashinfer", kv_dtype="fp8_e4m3", model_dtype=torch.bfloat16, head_size=128,
                          env=HOPPER_OK, per_channel=True) == "flashinfer"  # fmt: skip
    assert resolve_kernel("triton", kv_dtype="int8", model_dtype=torch.bfloat16, head_size=128,
                          env=HOPPER_OK, per_channel=True) == "triton"  # fmt: skip


def test_every_reason_is_listed():
    with pytest.raises(KVQuantConfigError) as e:
        _resolve("fa3", DecodeEnv("cuda", (8, 6), "FA3 missing here", None), "int8", torch.float16, 72)
    msg = str(e.value)
    for needle in ("int8", "sm_86", "FA3 missing here", "torch.float16", "not 72", "Use 'triton' or 'auto'"):
        assert needle in msg


def test_create_on_cpu_refuses_gpu_kernels_at_start_up():
    common = dict(num_heads=8, num_kv_heads=2, head_size=64, scale=0.125, sliding_window=None,
                  logits_soft_cap=None, kv_dtype="fp8_e4m3", model_dtype=torch.bfloat16, device="cpu")  # fmt: skip
    assert DecodeEnv.probe("cpu") == DecodeEnv("cpu", None, "no CUDA device", "no CUDA device")
    assert isinstance(create_runner("auto", per_head=True, **common), TritonDecodeRunner)
    for kernel in ("fa3", "flashinfer"):
        with pytest.raises(KVQuantConfigError, match="needs a CUDA GPU and this process runs on cpu"):
            create_runner(kernel, per_head=False, **common)
        with pytest.raises(KVQuantConfigError, match=f"'{kernel}' cannot run"):
            create_planner(kernel, block_size=16, max_num_seqs=4, max_num_blocks_per_seq=8, **common)
    planner = create_planner("triton", block_size=16, max_num_seqs=4, max_num_blocks_per_seq=8, **common)
    assert planner.kernel == "triton"


# ------------------------------------------------------------------ plan


def test_flashinfer_page_table():
    bs = 16
    lens = torch.tensor([0, 1, 16, 17, 40], dtype=torch.int32)
    bt = torch.randperm(5 * 4).to(torch.int32).view(5, 4)
    indptr, indices, last = flashinfer_page_table(bt, lens, bs)
    assert indptr.tolist() == [0, 0, 1, 2, 4, 7]
    assert last.tolist() == [0, 1, 16, 1, 8]
    assert indices.dtype == torch.int32
    expect = torch.cat([bt[i, : -(-int(n) // bs)] for i, n in enumerate(lens)])
    assert indices.tolist() == expect.tolist()


def _triton_planner(num_heads=4, num_kv_heads=2, head_size=64, window=None, cap=None, kv_dtype="fp8_e4m3"):
    return create_planner(
        "auto", num_heads=num_heads, num_kv_heads=num_kv_heads, head_size=head_size, block_size=16,
        scale=1 / math.sqrt(head_size), sliding_window=window, logits_soft_cap=cap, kv_dtype=kv_dtype,
        model_dtype=torch.bfloat16, device="cpu", max_num_seqs=8, max_num_blocks_per_seq=8,
    )  # fmt: skip


def test_plan_build_and_kernel_mismatch():
    bt = torch.zeros(8, 4, dtype=torch.int32)
    qsl = torch.arange(9, dtype=torch.int32)
    plan = DecodePlan.build(bt, torch.ones(3, dtype=torch.int32), qsl, 64, planner=_triton_planner())
    assert (plan.kernel, plan.num_seqs, plan.block_table.shape[0], plan.query_start_loc.numel()) == ("triton", 3, 3, 4)
    assert plan.triton.num_seqs == 3 and not plan.triton.varlen
    spec = DecodeSpec(4, 2, 64, 0.125, None, None, KVQuantDType.FP8_E4M3, torch.bfloat16, torch.device("cpu"))
    planner = FlashInferDecodePlanner(spec, block_size=16, max_num_blocks_per_seq=4)
    with pytest.raises(ValueError, match="needs seq_lens_cpu"):
        DecodePlan.build(bt, torch.ones(3, dtype=torch.int32), qsl, 64, planner=planner)
    with pytest.raises(ValueError, match="a varlen plan .* needs kernel 'triton', not 'flashinfer'"):
        DecodePlan.build(bt, torch.ones(3, dtype=torch.int32), qsl, 64, planner=planner, varlen=True)
    plan.kernel = "fa3"
    runner = TritonDecodeRunner(spec)
    q = torch.zeros(3, 4, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="a 'fa3' plan was built for the 'triton' kernel"):
        runner.run(q, None, plan, q)
    plan.kernel = "triton"
    kv = torch.zeros(4, 16, 2, 64, dtype=torch.uint8)
    int8_cache = PagedKVCache(kv, kv, torch.ones(1), torch.ones(1), "int8")
    with pytest.raises(ValueError, match="kvquant decode: a int8 cache given to a fp8_e4m3 runner"):
        runner.run(q, int8_cache, plan, q)


# ------------------------------------------------------------------ runners


def _case(kv_dtype="fp8_e4m3", per_head=True, seq_lens=(1, 17, 50, 33), num_kv_heads=2, group=4, head_size=64,
          block_size=16, dtype=torch.bfloat16, seed=0):  # fmt: skip
    """A cache allocated and split by the backend's own helpers, filled through the reference write."""
    g = torch.Generator().manual_seed(seed)
    pages = [math.ceil(n / block_size) for n in seq_lens]
    num_blocks = sum(pages) + 3
    kv = torch.zeros(KVQuantAttentionBackend.get_kv_cache_shape(num_blocks, block_size, num_kv_heads, head_size, "fp8"),
                     dtype=torch.uint8)  # fmt: skip
    key_cache, value_cache = compat.split_kv_cache(kv, head_size)
    k = torch.randn(num_blocks * block_size, num_kv_heads, head_size, generator=g)
    v = torch.randn(num_blocks * block_size, num_kv_heads, head_size, generator=g)
    if per_head == "channel":  # one scale per KV head and channel, channels of different ranges
        k *= torch.exp(torch.randn(num_kv_heads, head_size, generator=g))
        v *= torch.exp(0.5 * torch.randn(num_kv_heads, head_size, generator=g))
        k_scale, v_scale = k.abs().amax(dim=0) / QMAX[kv_dtype] * 1.1, v.abs().amax(dim=0) / QMAX[kv_dtype] * 1.2
    else:
        n = num_kv_heads if per_head else 1
        k_scale = k.abs().amax(dim=(0, 2) if per_head else None).reshape(n) / QMAX[kv_dtype] * 1.1
        v_scale = v.abs().amax(dim=(0, 2) if per_head else None).reshape(n) / QMAX[kv_dtype] * 1.2
    slots = torch.randperm(num_blocks * block_size, generator=g)
    quantize_to_cache_ref(k, v, key_cache, value_cache, slots, k_scale, v_scale, kv_dtype)
    perm = torch.randperm(num_blocks, generator=g).to(torch.int32)
    bt = torch.zeros(len(seq_lens), max(pages) + 1, dtype=torch.int32)
    at = 0
    for i, p in enumerate(pages):
        bt[i, :p] = perm[at : at + p]
        at += p
    q = (torch.randn(len(seq_lens), num_kv_heads * group, head_size, generator=g) * 2).to(dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    return dict(q=q, kc=key_cache, vc=value_cache, bt=bt, lens=lens, ks=k_scale, vs=v_scale, kv_dtype=kv_dtype,
                qsl=torch.arange(len(seq_lens) + 1, dtype=torch.int32),
                cache=PagedKVCache(key_cache, value_cache, k_scale, v_scale, kv_dtype))  # fmt: skip


def _spec(c, window=None, cap=None, dtype=torch.bfloat16) -> DecodeSpec:
    return DecodeSpec(c["q"].shape[1], c["kc"].shape[2], c["q"].shape[2], 1 / math.sqrt(c["q"].shape[2]), window, cap,
                      KVQuantDType(c["kv_dtype"]), dtype, torch.device("cpu"), per_head=c["ks"].numel() > 1,
                      per_channel=c["ks"].dim() == 2, max_num_seqs=8)  # fmt: skip


def _ref(c, q=None, window=None, cap=None):
    q = c["q"] if q is None else q
    return paged_decode_attention_ref(q, c["kc"], c["vc"], c["bt"], c["lens"], c["ks"], c["vs"], c["kv_dtype"],
                                      1 / math.sqrt(q.shape[-1]), sliding_window=window, logits_soft_cap=cap)  # fmt: skip


@pytest.mark.parametrize("kv_dtype, per_head, window, cap", [
    ("fp8_e4m3", True, None, None), ("int8", False, None, None), ("fp8_e4m3", False, 20, None), ("int8", True, None, 30.0),
    ("int8", "channel", None, None), ("fp8_e4m3", "channel", 20, None),
])  # fmt: skip
def test_triton_runner_matches_reference(kv_dtype, per_head, window, cap):
    c = _case(kv_dtype, per_head)
    runner = create_runner("auto", num_heads=8, num_kv_heads=2, head_size=64, scale=1 / 8, sliding_window=window,
                                 logits_soft_cap=cap, kv_dtype=kv_dtype, model_dtype=torch.bfloat16, device="cpu",
                                 per_head=bool(per_head), per_channel=per_head == "channel", max_num_seqs=8)  # fmt: skip
    plan = DecodePlan.build(c["bt"], c["lens"], c["qsl"], 50, planner=_triton_planner(8, 2, 64, window, cap, kv_dtype))
    out = torch.full_like(c["q"], float("nan"))
    runner.run(c["q"], c["cache"], plan, out)
    torch.testing.assert_close(out.float(), _ref(c, window=window, cap=cap).float(), atol=2e-2, rtol=2e-2)


def test_triton_runner_varlen_plan_skips_non_decode_rows():
    """Full CUDA graphs over mixed batches: rows from query_start_loc, multi-token requests skipped."""
    c = _case("fp8_e4m3", True)
    runner = create_runner("triton", num_heads=8, num_kv_heads=2, head_size=64, scale=1 / 8, sliding_window=None,
                                 logits_soft_cap=None, kv_dtype="fp8_e4m3", model_dtype=torch.bfloat16, device="cpu",
                                 per_head=True, max_num_seqs=8)  # fmt: skip
    qsl = torch.tensor([0, 1, 4, 5, 7], dtype=torch.int32)  # query lengths 1, 3, 1, 2
    rows = torch.randn(7, 8, 64).to(torch.bfloat16)
    rows[0], rows[4] = c["q"][0], c["q"][2]
    plan = DecodePlan.build(c["bt"], c["lens"], qsl, 50, planner=_triton_planner(8), varlen=True)
    out = torch.full_like(rows, float("nan"))
    runner.run(rows, c["cache"], plan, out)
    ref = _ref(c)
    torch.testing.assert_close(out[[0, 4]].float(), ref[[0, 2]].float(), atol=2e-2, rtol=2e-2)
    assert torch.isnan(out[[1, 2, 3, 5, 6]].float()).all()  # prefill rows are not the decode kernel's


class _FakeFA3:
    """``flash_attn_varlen_func(fa_version=3)`` semantics on fp8 inputs, after FA3's own checks."""

    def __init__(self):
        self.calls = []

    def __call__(self, *, q, k, v, out, cu_seqlens_q, max_seqlen_q, seqused_k, max_seqlen_k, softmax_scale, causal,
                 window_size, block_table, softcap, scheduler_metadata, fa_version, q_descale, k_descale, v_descale,
                 num_splits):  # fmt: skip
        n, hq, d = q.shape
        hkv = k.shape[2]
        assert fa_version == 3 and causal and max_seqlen_q == 1
        assert q.dtype == k.dtype == v.dtype == FP8 and out.dtype == torch.bfloat16  # FA3: same dtype, bf16 out
        assert q.stride(-1) == k.stride(-1) == v.stride(-1) == out.stride(-1) == 1
        assert k.shape == v.shape and k.dim() == 4 and k.shape[3] == d
        assert block_table.dtype == seqused_k.dtype == cu_seqlens_q.dtype == torch.int32
        assert block_table.shape[0] == n and seqused_k.shape == (n,) and cu_seqlens_q.shape == (n + 1,)
        for t in (q_descale, k_descale, v_descale):
            assert t.shape == (n, hkv) and t.dtype == torch.float32
        self.calls.append(dict(window_size=window_size, softcap=softcap, num_splits=num_splits, q=q.clone(),
                               q_descale=q_descale.clone(), scheduler_metadata=scheduler_metadata))  # fmt: skip
        g = hq // hkv
        qd = q.float() * q_descale.repeat_interleave(g, dim=1)[..., None]
        window = window_size[0] + 1 if window_size else None
        ref = paged_decode_attention_ref(qd, k, v, block_table, seqused_k, k_descale[0], v_descale[0], "fp8_e4m3",
                                         softmax_scale, sliding_window=window, logits_soft_cap=softcap or None)  # fmt: skip
        out.copy_(ref)
        return out


@pytest.mark.parametrize("per_head, window, cap, q_scale", [
    (True, None, None, None), (False, 20, None, None), (True, None, 30.0, 0.5),
])  # fmt: skip
def test_fa3_runner_wiring(per_head, window, cap, q_scale):
    c = _case("fp8_e4m3", per_head)
    fake = _FakeFA3()
    runner = FA3DecodeRunner(_spec(c, window, cap), flash_attn=fake)
    meta = torch.zeros(17, dtype=torch.int32)  # a schedule made for a layer without window and soft cap
    plan = DecodePlan(kernel="fa3", num_seqs=4, block_table=c["bt"], seq_lens=c["lens"], query_start_loc=c["qsl"],
                      max_seq_len=50, fa3_num_splits=32, fa3_scheduler_metadata=meta, fa3_schedule_for=(-1, False))  # fmt: skip
    out = torch.full_like(c["q"], float("nan"))
    qs = None if q_scale is None else torch.tensor([q_scale])
    runner.run(c["q"], c["cache"], plan, out, q_scale=qs)
    call = fake.calls[0]
    assert call["window_size"] == ([window - 1, 0] if window else None) and call["softcap"] == (cap or 0.0)
    assert call["num_splits"] == 32
    assert call["scheduler_metadata"] is (meta if window is None and cap is None else None)  # FA3 schedules others
    q8 = (c["q"].float() / (q_scale or 1.0)).clamp(-448, 448).to(FP8)  # vLLM's static fp8 query
    assert torch.equal(call["q"].view(torch.uint8), q8.view(torch.uint8))
    assert torch.all(call["q_descale"] == (q_scale or 1.0))
    # Exact but for the fp8 query: vs a reference fed the same rounded query ...
    ref8 = _ref(c, q=(q8.float() * (q_scale or 1.0)).to(torch.bfloat16), window=window, cap=cap)
    torch.testing.assert_close(out.float(), ref8.float(), atol=2e-2, rtol=2e-2)
    # ... while the fp8 query itself costs accuracy vs the bf16 query (bounded here, measured on GPU).
    err = (out.float() - _ref(c, window=window, cap=cap).float()).abs().max().item()
    assert 0 < err < 0.25


def test_fa3_query_quantization_saturates_and_groups():
    c = _case("fp8_e4m3", True)
    runner = FA3DecodeRunner(_spec(c), flash_attn=_FakeFA3())
    q = torch.tensor([1000.0, -1000.0, 3.0, 0.1]).repeat(8 * 16).view(1, 8, 64).to(torch.bfloat16)
    q8 = runner.quantize_query(q, torch.tensor([2.0])).float()
    assert q8.view(-1)[:3].tolist() == [448.0, -448.0, 1.5]  # saturates, never inf/nan
    assert torch.equal(q8, (q.float() / 2).clamp(-448, 448).to(FP8).float())
    per_kv_head = runner.quantize_query(q, torch.tensor([1.0, 4.0])).float()  # 2 KV heads: groups of 4 query heads
    expect = (q.float() / torch.tensor([1.0, 4.0]).repeat_interleave(4)[None, :, None]).clamp(-448, 448).to(FP8)
    assert torch.equal(per_kv_head, expect.float()) and per_kv_head[0, 4:].abs().max() < 448


class _FakeFlashInferWrapper:
    """A planned ``BatchDecodeWithPagedKVCacheWrapper`` (HND, unit k/v scales) over the plan's pages."""

    def __init__(self, plan, sm_scale, window_left=-1, soft_cap=0.0):
        self.plan, self._sm_scale, self._window_left, self._logits_soft_cap = plan, sm_scale, window_left, soft_cap

    def run(self, q, kv, out, k_scale=None, v_scale=None):
        kc, vc = kv
        assert kc.shape[1] == vc.shape[1] == 2 and kc.stride() == vc.stride() and kc.dtype == FP8  # HND views
        assert q.dtype == out.dtype and q.stride(-1) == 1
        one = torch.ones(1)
        window = self._window_left + 1 if self._window_left >= 0 else None
        sm_scale = self._sm_scale * (k_scale if k_scale is not None else 1.0)  # host floats, as FlashInfer
        ref = paged_decode_attention_ref(q, kc.transpose(1, 2), vc.transpose(1, 2), self.plan.block_table,
                                         self.plan.seq_lens, one, one, "fp8_e4m3", sm_scale,
                                         sliding_window=window, logits_soft_cap=self._logits_soft_cap or None)  # fmt: skip
        out.copy_(ref)
        if v_scale is not None:
            out *= v_scale
        return out


@pytest.mark.parametrize("per_head, window, cap, dtype, host", [
    (True, None, None, torch.bfloat16, False), (False, 20, 30.0, torch.float16, False),
    (False, None, 30.0, torch.bfloat16, True), ("channel", None, None, torch.bfloat16, False),
    ("channel", 20, 30.0, torch.float16, False),
])  # fmt: skip
def test_flashinfer_runner_folds_scales(per_head, window, cap, dtype, host):
    """Per-KV-head and per-channel scales folded into q and out; per-tensor ones given at create as host floats."""
    c = _case("fp8_e4m3", per_head, dtype=dtype)
    spec = _spec(c, window, cap, dtype)
    runner = FlashInferDecodeRunner(spec, **(dict(k_scale=c["ks"], v_scale=c["vs"]) if host else {}))
    assert (runner._host_scales is not None) == host
    plan = DecodePlan(kernel="flashinfer", num_seqs=4, block_table=c["bt"], seq_lens=c["lens"], query_start_loc=c["qsl"],
                      max_seq_len=50)  # fmt: skip
    plan.flashinfer_wrapper = _FakeFlashInferWrapper(plan, spec.scale, spec.window_left, spec.soft_cap)
    out = torch.full_like(c["q"], float("nan"))
    runner.run(c["q"], c["cache"], plan, out)
    torch.testing.assert_close(out.float(), _ref(c, window=window, cap=cap).float(), atol=2e-2, rtol=2e-2)
    plan.flashinfer_wrapper = _FakeFlashInferWrapper(plan, spec.scale * 2)
    with pytest.raises(KVQuantConfigError, match="every layer must share softmax scale, sliding window and soft cap"):
        runner.run(c["q"], c["cache"], plan, out)


# ------------------------------------------------------------------ benchmark plumbing


def test_decode_benchmark_smoke(tmp_path):
    """``python -m benchmarks.kernels.decode --smoke``: the backend's cache helpers, every row present, GPU rows skipped."""
    from benchmarks.kernels import decode
    from benchmarks.kernels.bench_decode import ROW_NAMES

    out = tmp_path / "decode.json"
    result = decode.main(["--smoke", "--shapes", "2x40", "--out", str(out)])
    assert out.exists() and set(result) >= {"device", "versions", "command", "copy_gbps", "rows"}
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == list(ROW_NAMES)
    for name in ("kvquant-triton-fp8", "kvquant-triton-int8", "kvquant-triton-fp8-per-channel",
                 "kvquant-triton-int8-per-channel"):  # fmt: skip
        assert rows[name]["status"] == "ok" and rows[name]["us"] > 0 and rows[name]["max_abs_err_ref"] < 2e-2
    assert rows["kvquant-triton-int8-per-channel"]["scales"] == "per-channel" and rows["kvquant-triton-int8"]["kv_dtype"] == "int8"
    assert "needs a CUDA GPU" in rows["kvquant-fa3-fp8"]["reason"]
    assert all(rows[n]["status"] == "skipped" and rows[n]["reason"] for n in ROW_NAMES if "triton-" not in n or "vllm" in n)
