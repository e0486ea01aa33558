"""The start-up kernel warm-up (vllm_kvquant/warmup.py) on CPU: it enumerates exactly the variants
the launch paths can choose, runs every launch through the Triton interpreter without touching the
cache or the online scales, and hooks vLLM's worker warm-up once. The GPU twin
(tests/test_jit_warmup_gpu.py) serves a mixed workload and checks vLLM's JIT monitor stays quiet."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import types
from types import SimpleNamespace

import _triton_env  # noqa: F401  (sets TRITON_INTERPRET=1 before triton is imported)
import pytest
import torch

pytest.importorskip("vllm")

from backend_batches import make_setup  # noqa: E402

from vllm_kvquant import compat, warmup  # noqa: E402
from vllm_kvquant.kernels.decode_config import choose_num_splits, next_pow2  # noqa: E402
from vllm_kvquant.kernels.quantize_cache import pick_config  # noqa: E402
from vllm_kvquant.layer_scales import layer_state  # noqa: E402
from vllm_kvquant.prefill import PrefillRunner  # noqa: E402


def test_write_token_counts_cover_every_launch_shape() -> None:
    # Llama-3-8B: 8 KV heads of 128 -> 1, 2 or 4 tokens per program (2, 4, 8 warps).
    assert warmup.write_token_counts(16384, 8, 128) == (1, 2048, 4096)
    for hkv, d, max_tokens in ((8, 128, 3000), (2, 64, 9000), (4, 256, 512)):
        reps = warmup.write_token_counts(max_tokens, hkv, d)
        assert {pick_config(n, hkv, d) for n in range(1, max_tokens + 1)} == {pick_config(n, hkv, d) for n in reps}
        assert len({pick_config(n, hkv, d) for n in reps}) == len(reps) and max(reps) <= max_tokens


def test_decode_batch_sizes_cover_every_split_choice() -> None:
    # An H200 (132 SMs), 8 KV heads: ceil(132 / n) splits, padded to 64, 32, 16, 8, 4, 2; none from 132 on.
    assert warmup.decode_batch_sizes(256, 8, 128, 132) == (1, 5, 9, 17, 33, 66, 132)

    def choice(n: int, hkv: int, sms: int) -> tuple[bool, int]:
        s = choose_num_splits(n, hkv, 128, sms)
        return s > 1, (max(2, next_pow2(s)) if s > 1 else 0)

    for hkv, sms, seqs in ((8, 132, 100), (2, 8, 8), (1, 114, 1024)):
        reps = warmup.decode_batch_sizes(seqs, hkv, 128, sms)
        assert {choice(n, hkv, sms) for n in range(1, seqs + 1)} == {choice(n, hkv, sms) for n in reps}


def test_prefill_query_lens_cover_every_tiling() -> None:
    runner = PrefillRunner(num_heads=32, num_kv_heads=8, head_size=128, scale=0.088, sliding_window=None,
                           logits_soft_cap=None, mode="bf16", device="cpu", path="triton")  # fmt: skip
    for max_tokens in (2, 37, 64, 2048):
        reps = warmup.prefill_query_lens(runner, max_tokens)
        every = {runner.kernel_config(n) for n in range(2, max_tokens + 1)}
        assert every == {runner.kernel_config(n) for n in reps} and len(reps) == len(every) and max(reps) <= max_tokens
    quantized = PrefillRunner(num_heads=32, num_kv_heads=8, head_size=128, scale=0.088, sliding_window=None,
                              logits_soft_cap=None, mode="quantized", device="cpu", path="triton")  # fmt: skip
    assert warmup.prefill_query_lens(quantized, 2048) == (2,)  # one tiling whatever the batch


class _NoObserve:
    def observe(self, *args) -> None:
        raise AssertionError("the warm-up must not feed online scales")


@pytest.mark.parametrize("kv_dtype", ["int8", "fp8_e4m3"])
def test_warm_up_builder_launches_every_variant_and_changes_nothing(kv_dtype) -> None:
    setup = make_setup(kv_dtype=kv_dtype, num_blocks=16, max_num_seqs=8)
    setup.kv_cache.copy_(torch.randint(0, 256, setup.kv_cache.shape, dtype=torch.uint8))
    before = setup.kv_cache.clone()
    setup.layer.kv_cache = setup.kv_cache  # as vLLM binds it
    state = layer_state(setup.layer)
    k_scale = state.k_scale.clone()
    state.online = _NoObserve()

    report = warmup.warm_up_builder(setup.builder, max_tokens=40)
    runner = setup.impl._prefill
    assert runner is not None and runner.path == "triton"  # the interpreter, not the PyTorch reference
    assert not setup.impl._kernels.writer.reference and not setup.impl._kernels.decode.reference
    decodes = warmup.decode_batch_sizes(8, setup.num_kv_heads, setup.head_size, setup.builder.num_sms)
    splits = sum(choose_num_splits(n, setup.num_kv_heads, setup.head_size, setup.builder.num_sms) > 1 for n in decodes)
    assert dict(report.launches) == {
        "cache_write": len(warmup.write_token_counts(40, setup.num_kv_heads, setup.head_size)),
        "decode": len(decodes) + splits,
        "prefill": len(warmup.prefill_query_lens(runner, 40)),
    }
    assert report.layer_kinds == 1 and report.seconds > 0
    assert torch.equal(setup.kv_cache, before) and torch.equal(state.k_scale, k_scale)


def test_warm_up_builder_skips_layers_without_a_cache() -> None:
    setup = make_setup(kv_dtype="int8", num_blocks=4)
    report = warmup.warm_up_builder(setup.builder, max_tokens=8)  # no kv_cache bound to the layer yet
    assert report.layer_kinds == 0 and not report.launches


def test_hook_runs_before_the_workers_warm_up_once(monkeypatch) -> None:
    calls: list[str] = []
    module = types.ModuleType("kvq_fake_worker")

    class Worker:
        def compile_or_warm_up_model(self):
            calls.append("vllm")
            return "times"

    class CPUWorker(Worker):
        def compile_or_warm_up_model(self):
            calls.append("vllm-cpu")
            return "cpu-times"

    module.Worker, module.CPUWorker = Worker, CPUWorker
    monkeypatch.setitem(sys.modules, "kvq_fake_worker", module)
    monkeypatch.setattr(compat, "_WORKER_WARMUP_HOOKS", [])

    def hook(worker) -> None:
        calls.append(f"kvquant:{type(worker).__name__}")

    for qualname in ("kvq_fake_worker.Worker", "kvq_fake_worker.Worker", "kvq_fake_worker.CPUWorker"):
        cfg = SimpleNamespace(parallel_config=SimpleNamespace(worker_cls=qualname))
        assert compat.run_before_worker_warmup(cfg, hook)
    assert Worker().compile_or_warm_up_model() == "times"
    assert CPUWorker().compile_or_warm_up_model() == "cpu-times"
    assert calls == ["kvquant:Worker", "vllm", "kvquant:CPUWorker", "vllm-cpu"]
    for cfg in (SimpleNamespace(parallel_config=None), SimpleNamespace(parallel_config=SimpleNamespace(worker_cls="auto"))):
        assert not compat.run_before_worker_warmup(cfg, hook)


def test_worker_hook_warms_up_only_compiled_kernels_and_honours_vllms_switch(monkeypatch, kvquant_caplog) -> None:
    kvquant_caplog.set_level(logging.INFO, logger="vllm.kvquant")
    setup = make_setup(kv_dtype="int8", num_blocks=4)
    setup.layer.kv_cache = setup.kv_cache
    ran: list[object] = []
    monkeypatch.setattr(warmup, "warm_up_builder", lambda b: ran.append(b) or warmup.WarmupReport(layer_kinds=1))
    warmup._PENDING.add(setup.builder)
    warmup.warm_up_worker(SimpleNamespace(vllm_config=SimpleNamespace()))
    assert ran == [] and not list(warmup._PENDING)  # CPU: PyTorch references or the interpreter, nothing to compile

    monkeypatch.setattr(warmup, "_compiles", lambda b: True)
    warmup._PENDING.add(setup.builder)
    off = SimpleNamespace(kernel_config=SimpleNamespace(enable_jit_warmup=False))
    warmup.warm_up_worker(SimpleNamespace(vllm_config=off))
    assert ran == [] and "kernel warm-up off" in kvquant_caplog.text
    warmup._PENDING.add(setup.builder)
    warmup.warm_up_worker(SimpleNamespace(vllm_config=SimpleNamespace()))
    assert ran == [setup.builder] and "compiled the backend's Triton kernels" in kvquant_caplog.text


def test_per_batch_arguments_select_no_variant() -> None:
    """The arguments the warm-up does not enumerate are unspecialized in the compiled kernels
    (Triton ignores unknown names, so a typo would silently specialize again)."""
    code = (
        "import json\n"
        "from vllm_kvquant.kernels import decode_triton, prefill_kernel, context_fill\n"
        "fns = [decode_triton.decode_split_kernel, decode_triton.decode_reduce_kernel,\n"
        "       prefill_kernel.prefill_attention_kernel, context_fill._fill_context_kernel]\n"
        "print(json.dumps({f.fn.__name__: [p.name for p in f.params if p.do_not_specialize] for f in fns}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled kernels, not interpreted
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    marked = json.loads(proc.stdout.strip().splitlines()[-1])
    assert marked == {
        "_decode_split_kernel": ["num_splits", "fill_splits", "stride_bts", "stride_pls", "stride_plh"],
        "_decode_reduce_kernel": ["num_splits", "fill_splits", "stride_pls", "stride_plh"],
        "prefill_attention_kernel": ["bt_ptr", "lens_ptr", "num_seqs", "stride_lh", "stride_bt"],
        "_fill_context_kernel": ["bt_ptr", "seq_lens_ptr", "stride_bt"],
    }


def test_prefill_mode_quantized_warms_its_one_tiling() -> None:
    from vllm_kvquant.config import KVQuantConfig

    setup = make_setup(kv_dtype="fp8_e4m3", num_blocks=8, max_num_seqs=2, options={"prefill": "quantized"})
    setup.impl.options = KVQuantConfig(prefill="quantized")  # what the impl reads from vLLM's config
    setup.layer.kv_cache = setup.kv_cache
    report = warmup.warm_up_builder(setup.builder, max_tokens=64)
    assert setup.impl._prefill.mode == "quantized" and report.launches["prefill"] == 1
