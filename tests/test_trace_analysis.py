"""benchmarks/serving/trace_analysis.py on a small synthetic chrome trace: steps from vLLM's
``execute_*`` annotations, kernels matched to steps through their launches, categories by name
(attention split by step), busy / idle time and the top kernels."""

from __future__ import annotations

import gzip
import json

import pytest

from benchmarks.serving import trace_analysis as ta

FA3 = "void flash::FlashAttnFwdSm90<flash::CollectiveMainloopFwdSm90<2, cute::tuple<cute::C<1>>, cutlass::bfloat16_t>>(Params)"


@pytest.mark.parametrize(
    "name, family",
    [
        ("_decode_split_kernel", "decode_attention"),
        ("_decode_reduce_kernel", "decode_attention"),
        ("prefill_attention_kernel", "prefill_attention"),
        ("_fill_context_kernel", "prefill_attention"),
        ("_quantize_to_cache_kernel", "cache_write"),
        ("void vllm::reshape_and_cache_flash_kernel<__nv_bfloat16, unsigned char, (vllm::Fp8KVCacheDataType)1>(...)", "cache_write"),
        (FA3, "attention"),  # not "gemm", although its name holds "cutlass"
        ("void flash::flash_fwd_splitkv_combine_kernel<Kernel_traits, 128>(Params)", "attention"),
        ("void flash::prepare_varlen_num_blocks_kernel(int, int)", "attention"),
        ("kernel_unified_attention_3d", "attention"),
        ("nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNT", "gemm"),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "gemm"),
        ("void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x2_tn_align8>(Params)", "gemm"),
        ("triton_poi_fused_mul_silu_0", "other"),
        ("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_1", "other"),
        ("void vllm::rms_norm_kernel<c10::BFloat16, 8, 3>(...)", "other"),
    ],
)
def test_kernel_table(name, family) -> None:
    assert ta.kernel_family(name) == family


def test_short_names_and_step_kinds() -> None:
    assert ta.short_name(FA3) == "flash::FlashAttnFwdSm90"
    assert ta.short_name("_decode_split_kernel") == "_decode_split_kernel"
    assert ta.step_kind(0, 64) == "decode" and ta.step_kind(2, 0) == "prefill" and ta.step_kind(1, 63) == "mixed"


def _trace() -> list[dict]:
    """Two steps on one stream: a decode step (a CUDA graph: one launch, three kernels) and a mixed
    step (FA3 prefill + our decode + a GEMM); a memcpy; a kernel of an earlier, unprofiled launch."""
    ev: list[dict] = []

    def annotation(name, ts, dur):
        ev.append({"ph": "X", "cat": "user_annotation", "name": name, "ts": ts, "dur": dur, "pid": 1, "tid": 1})
        ev.append({"ph": "X", "cat": "gpu_user_annotation", "name": name, "ts": ts + 5, "dur": dur, "pid": 0, "tid": 7})

    def launch(name, ts, corr, cat="cuda_runtime"):
        ev.append({"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": 2, "args": {"correlation": corr}})

    def kernel(name, ts, dur, corr, cat="kernel"):
        ev.append({"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 0, "tid": 7, "args": {"correlation": corr}})

    kernel("old_kernel", 50, 10, 1)
    launch("cudaLaunchKernel", 40, 1)  # launched before the profiled steps began
    annotation("execute_context_0(0)_generation_64(64)", 100, 30)  # decode step
    launch("cudaGraphLaunch", 110, 2)
    kernel("nvjet_tst_128x64", 120, 40, 2)
    kernel("_decode_split_kernel", 160, 25, 2)
    kernel("_decode_reduce_kernel", 185, 5, 2)
    launch("cudaMemcpyAsync", 135, 3)  # sampling, after the annotation ended: still this step
    kernel("Memcpy DtoH (Device -> Pinned)", 195, 5, 3, cat="gpu_memcpy")
    # GPU idle 200..230, then the mixed step's kernels.
    annotation("execute_context_1(512)_generation_63(63)", 200, 40)  # mixed step
    launch("cuLaunchKernelEx", 205, 4, cat="cuda_driver")
    kernel("_quantize_to_cache_kernel", 230, 10, 4)
    launch("cudaLaunchKernel", 210, 5)
    kernel(FA3, 240, 50, 5)
    launch("cuLaunchKernelEx", 215, 6, cat="cuda_driver")
    kernel("_decode_split_kernel", 290, 20, 6)
    launch("cudaLaunchKernel", 220, 7)
    kernel("sm90_xmma_gemm_bf16", 300, 30, 7)  # overlaps the decode kernel by 10 us (another stream)
    kernel("lost_kernel", 335, 5, 99)  # no launch event recorded: placed after the GEMM (GPU order)
    kernel("early_orphan", 10, 5, 98)  # no launch event and nothing ran before it: left out
    return ev


def test_steps_from_annotations_and_launches() -> None:
    steps, unattributed = ta.find_steps(_trace())
    assert [s.kind for s in steps] == ["decode", "mixed"]
    assert unattributed == {"by_gpu_order": 1, "no_launch": 1, "before_first_step": 1}
    assert [len(s.kernels) for s in steps] == [4, 5] and steps[1].kernels[-1].name == "lost_kernel"
    table = ta.step_table(steps)
    decode, mixed = table
    # decode: first kernel 120 -> next step's first kernel 230; busy 120..190 and 195..200 = 75 us.
    assert decode["span_us"] == 110 and decode["busy_us"] == 75 and decode["idle_us"] == 35
    assert decode["decode_attention_us"] == 30 and decode["gemm_us"] == 40 and decode["other_us"] == 5
    # mixed: 230..340 (last kernel end), busy 230..330 and 335..340 = 105 us; FA3 is prefill (our kernel
    # did the decodes).
    assert mixed["span_us"] == 110 and mixed["busy_us"] == 105 and mixed["idle_us"] == 5
    assert mixed["prefill_attention_us"] == 50 and mixed["decode_attention_us"] == 20 and mixed["cache_write_us"] == 10
    assert mixed["attention_mixed_us"] == 0 and mixed["context_tokens"] == 512 and mixed["generation_requests"] == 63


def test_fa3_in_a_mixed_step_without_our_decode_is_mixed_attention() -> None:
    ev = [e for e in _trace() if e.get("name") != "_decode_split_kernel" or e["ts"] < 200]
    steps, _ = ta.find_steps(ev)
    assert ta.step_table(steps)[1]["attention_mixed_us"] == 50
    detailed = [dict(e, name="execute_513_context_1(sq512sk512sqsq262144sqsk262144)_generation_63(sq63sk9000sqsq63sqsk9000)")
                if e.get("name", "").startswith("execute_context_1") else e for e in ev]  # fmt: skip
    steps, _ = ta.find_steps(detailed)
    assert [s.kind for s in steps] == ["decode", "mixed"] and steps[1].context_tokens == 512


def test_summary_and_trace_files(tmp_path) -> None:
    summary = ta.summarize(ta.find_steps(_trace())[0], top=3)
    assert summary["steps"] == summary["annotated_steps"] == 2 and set(summary["per_kind"]) == {"decode", "mixed"}
    assert summary["per_kind"]["decode"] == {
        "steps": 1, "mean_span_us": 110.0, "mean_busy_us": 75.0, "mean_idle_us": 35.0, "mean_decode_attention_us": 30.0,
        "mean_prefill_attention_us": 0.0, "mean_attention_mixed_us": 0.0, "mean_cache_write_us": 0.0,
        "mean_gemm_us": 40.0, "mean_other_us": 5.0, "mean_kernels": 4.0, "mean_context_tokens": 0.0,
        "mean_generation_requests": 64.0, "median_idle_us": 35.0, "max_idle_us": 35.0,
        "each": [{"span_us": 110.0, "busy_us": 75.0, "idle_us": 35.0, "kernels": 4, "context_tokens": 0,
                  "generation_requests": 64, "decode_attention_us": 30.0, "prefill_attention_us": 0.0,
                  "attention_mixed_us": 0.0, "cache_write_us": 0.0, "gemm_us": 40.0, "other_us": 5.0}],
    }  # fmt: skip
    assert summary["kernel_time_us"] == 190.0
    assert [(k["name"], k["category"], k["total_us"], k["count"]) for k in summary["top_kernels"]] == [
        ("flash::FlashAttnFwdSm90", "prefill_attention", 50.0, 1), ("_decode_split_kernel", "decode_attention", 45.0, 2),
        ("nvjet_tst_128x64", "gemm", 40.0, 1)]  # fmt: skip
    path = tmp_path / "w.pt.trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": _trace()}, f)
    result = ta.analyze(path)
    assert result["steps"] == 2 and result["kernel_attribution"]["by_gpu_order"] == 1 and result["trace"] == path.name
    plain = tmp_path / "w.json"
    plain.write_text(json.dumps(_trace()))
    assert ta.analyze(plain)["per_kind"] == result["per_kind"]


def _sync_trace() -> list[dict]:
    """A mixed step whose attention op syncs the host (``aten::item``), then a decode step."""
    ev: list[dict] = []

    def host(cat, name, ts, dur, corr=None):
        e = {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 1, "tid": 1}
        if corr is not None:
            e["args"] = {"correlation": corr}
        ev.append(e)

    def kernel(name, ts, dur, corr):
        ev.append({"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur, "pid": 0, "tid": 7,
                   "args": {"correlation": corr}})  # fmt: skip

    host("user_annotation", "execute_context_1(512)_generation_63(63)", 100, 200)
    host("cuda_runtime", "cudaLaunchKernel", 102, 2, corr=1)
    kernel("nvjet_tst_128x64_gemm", 105, 35, 1)
    host("cpu_op", "vllm::unified_attention_with_output", 110, 90)
    host("cpu_op", "aten::item", 120, 30)
    host("cpu_op", "aten::_local_scalar_dense", 121, 28)
    host("cuda_runtime", "cudaStreamSynchronize", 125, 20)  # waits for the GEMM
    host("cuda_runtime", "cudaLaunchKernel", 160, 2, corr=2)  # GPU idle 140..170
    kernel("_decode_split_kernel", 170, 10, 2)
    host("cpu_op", "aten::mm", 184, 4)
    host("cuda_runtime", "cudaLaunchKernel", 185, 2, corr=3)
    kernel("nvjet_tst_64x64_gemm", 180, 10, 3)
    host("user_annotation", "execute_context_0(0)_generation_64(64)", 300, 50)
    host("cuda_runtime", "cudaGraphLaunch", 305, 2, corr=4)
    kernel("nvjet_tst_64x64_gemm", 330, 10, 4)
    return ev


def test_idle_gaps_and_host_syncs_name_their_host_ops() -> None:
    events = _sync_trace()
    steps, _ = ta.find_steps(events)
    assert [s.kind for s in steps] == ["mixed", "decode"] and [len(s.syncs) for s in steps] == [1, 0]
    host = ta.HostIndex(events)
    assert host.under(125, 1) == "aten::_local_scalar_dense < aten::item < vllm::unified_attention_with_output"
    assert host.under(160, 1) == "vllm::unified_attention_with_output" and host.under(250, 1) == ""
    idle = ta.idle_breakdown(steps, host)
    assert idle["mixed"]["idle_gaps"] == [
        {"before": "nvjet_tst_64x64_gemm", "after": "(next step)", "launched_under": "", "count": 1,
         "total_us": 140.0, "mean_us_per_step": 140.0},
        {"before": "nvjet_tst_128x64_gemm", "after": "_decode_split_kernel",
         "launched_under": "vllm::unified_attention_with_output", "count": 1, "total_us": 30.0,
         "mean_us_per_step": 30.0},
    ]  # fmt: skip
    assert idle["mixed"]["host_syncs_per_step"] == 1.0 and idle["mixed"]["host_syncs"] == [
        {"call": "cudaStreamSynchronize", "under": "aten::_local_scalar_dense < aten::item < vllm::unified_attention_with_output",
         "count": 1, "total_us": 20.0}]  # fmt: skip
    assert idle["decode"] == {"idle_gaps": [], "host_syncs_per_step": 0.0, "host_syncs": []}
    # The step table's idle time is the sum of these gaps.
    assert ta.step_table(steps)[0]["idle_us"] == 170.0
    assert ta.summarize(steps, host=host)["idle"] == idle


def test_many_steps_of_a_kind_are_not_listed(monkeypatch) -> None:
    monkeypatch.setattr(ta, "MAX_LISTED_STEPS", 0)
    per_kind = ta.summarize(ta.find_steps(_trace())[0], top=3)["per_kind"]
    assert "each" not in per_kind["decode"] and per_kind["decode"]["max_idle_us"] == 35.0
