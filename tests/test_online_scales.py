"""The online fallback: per-head scales measured from the first real batch, then frozen.

Three levels: the math in ``vllm_kvquant.scales.online`` (margin, floor, per head, masking,
freezing in place), the observer the cache write calls (dummy/capture runs ignored, detaches
after freezing, one summary line), and the engine with the trained tiny model and no sidecar
(fp8 and int8 online stay close to BF16; int8 with unit scales only when asked for).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from vllm_kvquant.scales.errors import ScalesError
from vllm_kvquant.scales.online import (
    ONLINE_MARGINS,
    freeze_from_first_batch_,
    masked_head_amax,
    measure_scales,
    online_margin,
)

HEADS, HEAD_SIZE = 3, 8


def _kv(tokens: int, amax_k: list[float], amax_v: list[float], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 K/V [tokens, heads, head_size] whose per-head max |x| is exactly the given value."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for amax in (amax_k, amax_v):
        x = (torch.rand(tokens, HEADS, HEAD_SIZE, generator=g) * 2 - 1) * 0.5
        for h, a in enumerate(amax):
            x[:, h] *= a
            x[tokens // 2, h, h % HEAD_SIZE] = -a if h % 2 else a  # the max, exactly representable
        out.append(x.to(torch.bfloat16))
    return out[0], out[1]


# ----------------------------------------------------------------------------- the math


@pytest.mark.parametrize(("kv_dtype", "qmax"), [("fp8_e4m3", 448.0), ("int8", 127.0)])
def test_scale_is_first_batch_amax_times_margin_over_qmax_per_head(kv_dtype: str, qmax: float) -> None:
    key, value = _kv(6, [1.0, 4.0, 0.25], [2.0, 0.5, 8.0])
    valid = torch.ones(6, dtype=torch.bool)
    k, v = measure_scales(key, value, valid, kv_dtype)
    margin = online_margin(kv_dtype)
    assert margin == ONLINE_MARGINS[kv_dtype] and margin > 1
    assert k.tolist() == pytest.approx([a * margin / qmax for a in (1.0, 4.0, 0.25)])
    assert v.tolist() == pytest.approx([a * margin / qmax for a in (2.0, 0.5, 8.0)])
    k3, _ = measure_scales(key, value, valid, kv_dtype, margin=3.0)
    assert k3.tolist() == pytest.approx([a * 3.0 / qmax for a in (1.0, 4.0, 0.25)])


def test_all_zero_head_gets_the_floor() -> None:
    key, value = _kv(4, [1.0, 1.0, 1.0], [1.0, 1.0, 1.0])
    key[:, 1] = 0
    k, _ = measure_scales(key, value, torch.ones(4, dtype=torch.bool), "int8", floor=1e-8)
    assert k[1].item() == pytest.approx(1e-8) and k[0].item() == pytest.approx(2.0 / 127)


def test_padding_rows_never_count_even_when_nan() -> None:
    key, value = _kv(5, [1.0, 2.0, 3.0], [1.0, 1.0, 1.0])
    key[3:] = float("nan")  # padding rows of a CUDA-graph batch may hold anything
    value[3:] = 1e4
    key[:3], value[:3] = _kv(3, [1.0, 2.0, 3.0], [1.0, 1.0, 1.0])
    valid = torch.tensor([True, True, True, False, False])
    assert masked_head_amax(key, valid).tolist() == pytest.approx([1.0, 2.0, 3.0], rel=1e-2)
    assert masked_head_amax(value, valid).tolist() == pytest.approx([1.0, 1.0, 1.0], rel=1e-2)


def test_a_non_finite_real_token_does_not_poison_its_head() -> None:
    key, _ = _kv(4, [1.0, 2.0, 3.0], [1.0, 1.0, 1.0])
    key[0, 2, 0] = float("inf")
    key[1, 0, 0] = float("nan")
    amax = masked_head_amax(key, torch.ones(4, dtype=torch.bool))
    assert torch.isfinite(amax).all()
    assert amax[1].item() == pytest.approx(2.0, rel=1e-2)


def test_freezes_on_the_first_real_batch_in_place() -> None:
    k_scale = torch.ones(HEADS)
    v_scale = torch.ones(HEADS)
    frozen = torch.zeros(1, dtype=torch.bool)
    ptrs = (k_scale.data_ptr(), v_scale.data_ptr())
    dummy_k, dummy_v = _kv(8, [50.0] * 3, [50.0] * 3)
    # A dummy / capture run: every slot is -1. Nothing changes, nothing freezes.
    freeze_from_first_batch_(k_scale, v_scale, frozen, dummy_k, dummy_v, torch.full((8,), False), "fp8_e4m3")
    assert k_scale.tolist() == [1.0] * 3 and not frozen.item()
    # The first real batch (with a padding row) sets the scales ...
    key, value = _kv(4, [1.0, 2.0, 4.0], [0.5, 0.5, 0.5])
    valid = torch.tensor([True, True, True, True])
    freeze_from_first_batch_(k_scale, v_scale, frozen, key, value, valid, "fp8_e4m3")
    expected = [a * 2.0 / 448 for a in (1.0, 2.0, 4.0)]
    assert frozen.item() and k_scale.tolist() == pytest.approx(expected)
    # ... and later, larger batches never change them again (they saturate instead).
    big_k, big_v = _kv(4, [100.0] * 3, [100.0] * 3)
    freeze_from_first_batch_(k_scale, v_scale, frozen, big_k, big_v, valid, "fp8_e4m3")
    assert k_scale.tolist() == pytest.approx(expected)
    assert v_scale.tolist() == pytest.approx([0.5 * 2.0 / 448] * 3)
    assert (k_scale.data_ptr(), v_scale.data_ptr()) == ptrs  # CUDA graphs hold these addresses


def test_values_beyond_the_margin_saturate() -> None:
    from vllm_kvquant.kernels.reference import quantize_to_cache_ref

    key, value = _kv(2, [1.0, 1.0, 1.0], [1.0, 1.0, 1.0])
    k_scale, v_scale, frozen = torch.ones(HEADS), torch.ones(HEADS), torch.zeros(1, dtype=torch.bool)
    freeze_from_first_batch_(k_scale, v_scale, frozen, key, value, torch.ones(2, dtype=torch.bool), "int8")
    later = torch.full((1, HEADS, HEAD_SIZE), 1.5).to(torch.bfloat16)  # within the 2x margin
    later[0, :, 0] = 5.0  # beyond it
    cache = torch.zeros(1, 4, HEADS, HEAD_SIZE, dtype=torch.int8)
    vcache = torch.zeros_like(cache)
    quantize_to_cache_ref(later, later, cache, vcache, torch.tensor([0]), k_scale, v_scale, "int8")
    restored = cache[0, 0].float() * k_scale[:, None]
    assert restored[:, 1:].flatten().tolist() == pytest.approx([1.5] * HEADS * (HEAD_SIZE - 1), rel=0.02)
    assert restored[:, 0].tolist() == pytest.approx([2.0] * HEADS, rel=1e-3)  # saturated at margin x amax


def test_bad_shapes_are_refused_with_the_shapes() -> None:
    key, value = _kv(4, [1.0] * 3, [1.0] * 3)
    with pytest.raises(ScalesError, match=r"valid has shape \(3,\); expected \[4\]"):
        masked_head_amax(key, torch.ones(3, dtype=torch.bool))
    with pytest.raises(ScalesError, match=r"expected K/V of shape \[tokens, kv_heads, head_size\], got \(4, 24\)"):
        masked_head_amax(key.reshape(4, -1), torch.ones(4, dtype=torch.bool))
    with pytest.raises(ScalesError, match=r"k_scale must be fp32 with one value per KV head \(3\)"):
        freeze_from_first_batch_(
            torch.ones(2), torch.ones(3), torch.zeros(1, dtype=torch.bool), key, value, torch.ones(4, dtype=torch.bool), "int8"
        )


# ----------------------------------------------------------------------------- the observer


def _state(kv_dtype: str = "int8") -> SimpleNamespace:
    from vllm_kvquant.kernels.dtypes import KVQuantDType

    return SimpleNamespace(
        kv_dtype=KVQuantDType(kv_dtype), k_scale=torch.ones(HEADS), v_scale=torch.ones(HEADS), source="x", online=None
    )


@pytest.fixture
def online(monkeypatch):
    """The observer module with a fresh registry, and capture state under the test's control."""
    from vllm_kvquant import online_scales

    capture = {"capturing": False, "decode": False}
    monkeypatch.setattr(online_scales, "_capturing", lambda key: capture["capturing"])
    monkeypatch.setattr(online_scales, "_capturing_decode_graph", lambda: capture["decode"])
    monkeypatch.setattr(online_scales, "capture", capture, raising=False)
    return online_scales


def _attach(online, n: int = 1) -> tuple[list[SimpleNamespace], object]:
    registry = online.OnlineScalesRegistry()
    states = [_state() for _ in range(n)]
    online.attach_online(((f"model.layers.{i}.self_attn.attn", s) for i, s in enumerate(states)), (0, 1), registry)
    return states, registry


def test_observer_ignores_dummy_runs_then_freezes_and_detaches(online, kvquant_caplog) -> None:
    (state,), _ = _attach(online)
    observer = state.online
    assert state.source == "online (not measured yet)"
    key, value = _kv(6, [1.0, 2.0, 4.0], [1.0, 1.0, 1.0])
    with kvquant_caplog.at_level(logging.INFO, logger="vllm.kvquant"):
        observer.observe(key, value, torch.full((6,), -1), state)  # warm-up / dummy run
        assert state.online is observer and state.k_scale.tolist() == [1.0] * 3
        observer.observe(key, value, torch.tensor([5, 6, 7, 8, -1, -1]), state)  # real tokens + padding
    assert state.online is None  # later writes pay one attribute check
    assert observer.num_tokens == 4
    assert state.source.startswith("online (measured from the first batch, 4 tokens")
    assert state.k_scale.tolist() == pytest.approx([a * 2.0 / 127 for a in (1.0, 2.0, 4.0)], rel=1e-2)
    lines = [r.getMessage() for r in kvquant_caplog.records if r.levelno == logging.INFO]
    assert len(lines) == 1 and "frozen for 1 layer(s)" in lines[0] and "4 real tokens" in lines[0]


def test_a_first_decode_step_is_measured_too(online) -> None:
    (state,), _ = _attach(online)
    key, value = _kv(1, [1.0, 2.0, 4.0], [1.0, 1.0, 1.0])
    state.online.observe(key, value, torch.tensor([0]), state)  # one token: a decode-only first step
    assert state.online is None and state.k_scale[2].item() == pytest.approx(4.0 * 2 / 127)


def test_flat_key_rows_and_a_short_slot_mapping(online) -> None:
    """K/V as [tokens, heads * head_size]; rows past the slot mapping are never written, so never measured."""
    (state,), _ = _attach(online)
    key, value = _kv(4, [1.0, 2.0, 4.0], [1.0, 1.0, 1.0])
    key[3] = 100.0
    state.online.observe(key.reshape(4, -1), value.reshape(4, -1), torch.tensor([0, 1, 2]), state)
    assert state.k_scale.tolist() == pytest.approx([a * 2 / 127 for a in (1.0, 2.0, 4.0)], rel=1e-2)


def test_decode_graph_capture_records_nothing(online) -> None:
    """A full graph of uniform decode batches: the layers froze at an earlier (eager) prefill."""
    (state,), _ = _attach(online)
    online.capture.update(capturing=True, decode=True)
    key, value = _kv(4, [1.0, 2.0, 4.0], [1.0, 1.0, 1.0])
    state.online.observe(key, value, torch.tensor([0, 1, 2, 3]), state)
    assert state.online is not None and state.k_scale.tolist() == [1.0] * 3
    assert not state.online.frozen.item()


@pytest.mark.parametrize(
    ("mode", "uniform", "decode_graph"), [("FULL", True, True), ("FULL", False, False), ("PIECEWISE", False, False)]
)
def test_which_captures_are_decode_graphs(mode: str, uniform: bool, decode_graph: bool, monkeypatch) -> None:
    """Read from vLLM's forward context: full graphs of uniform batches only (FULL_AND_PIECEWISE's
    decode routine); cudagraph_mode=FULL's graphs (uniform=False) may replay a prefill."""
    pytest.importorskip("vllm")
    from vllm import forward_context
    from vllm.config import CUDAGraphMode
    from vllm.forward_context import BatchDescriptor

    from vllm_kvquant import online_scales

    assert not online_scales._capturing_decode_graph()  # no forward context
    context = SimpleNamespace(cudagraph_runtime_mode=CUDAGraphMode[mode], batch_descriptor=BatchDescriptor(8, 8, uniform))
    monkeypatch.setattr(forward_context, "_forward_context", context)
    assert online_scales._capturing_decode_graph() is decode_graph


def test_other_graph_captures_record_the_device_side_measurement(online, kvquant_caplog) -> None:
    """A graph that may replay a prefill (cudagraph_mode=FULL, or a piecewise graph holding the cache
    write): the measurement goes into the graph (here, on CPU tensors, it runs at once) with no
    host sync, so Python cannot detach, and a warning says why."""
    (state,), registry = _attach(online)
    online.capture.update(capturing=True, decode=False)
    observer = state.online
    key, value = _kv(4, [1.0, 2.0, 4.0], [1.0, 1.0, 1.0])
    with kvquant_caplog.at_level(logging.WARNING, logger="vllm.kvquant"):
        observer.observe(key, value, torch.full((4,), -1), state)  # the capture's dummy batch
        assert state.k_scale.tolist() == [1.0] * 3
        observer.observe(key, value, torch.tensor([0, 1, 2, 3]), state)  # "replay" with real tokens
    assert state.k_scale[2].item() == pytest.approx(4.0 * 2 / 127) and observer.frozen.item()
    assert state.online is observer and observer.in_graph
    assert sum("captured inside a CUDA graph that may replay a prefill" in r.getMessage() for r in kvquant_caplog.records) == 1
    online.capture.update(capturing=False)  # a later eager batch learns it is frozen and detaches
    observer.observe(*_kv(2, [9.0] * 3, [9.0] * 3), torch.tensor([9, 10]), state)
    assert state.online is None and state.k_scale[2].item() == pytest.approx(4.0 * 2 / 127)
    assert observer.num_tokens is None and registry.num_frozen == 1


def test_one_summary_per_process_once_every_layer_froze(online, kvquant_caplog) -> None:
    states, registry = _attach(online, n=3)
    key, value = _kv(3, [1.0, 2.0, 4.0], [0.5, 1.0, 1.0])
    with kvquant_caplog.at_level(logging.INFO, logger="vllm.kvquant"):
        for i, state in enumerate(states):
            state.online.observe(key * (i + 1), value, torch.tensor([0, 1, 2]), state)
            infos = [r.getMessage() for r in kvquant_caplog.records if r.levelno == logging.INFO]
            assert len(infos) == (1 if i == 2 else 0)
    line = infos[0]
    assert "frozen for 3 layer(s)" in line and "3 KV heads each on tp rank 0 of 1" in line and "margin 2x" in line
    k_min, k_max = 1.0 * 2 / 127, 12.0 * 2 / 127
    assert f"K scale {k_min:.4g} .. {k_max:.4g}" in line
    assert f"V scale {0.5 * 2 / 127:.4g} .. {1.0 * 2 / 127:.4g}" in line


def test_a_head_of_zeros_in_the_first_batch_is_warned_about(online, kvquant_caplog) -> None:
    (state,), _ = _attach(online)
    key, value = _kv(3, [1.0, 2.0, 4.0], [1.0, 1.0, 1.0])
    value[:, 1] = 0
    with kvquant_caplog.at_level(logging.WARNING, logger="vllm.kvquant"):
        state.online.observe(key, value, torch.tensor([0, 1, 2]), state)
    assert "['model.layers.0.self_attn.attn']" in kvquant_caplog.text and "held only zeros" in kvquant_caplog.text
    assert "vllm-kvquant calibrate" in kvquant_caplog.text


def test_kv_sharing_layers_share_one_observer(online) -> None:
    registry = online.OnlineScalesRegistry()
    owner = _state()
    online.attach_online([("a", owner), ("b", owner)], (0, 1), registry)
    assert len(registry.observers) == 1


def test_the_cache_write_measures_before_it_quantizes(online) -> None:
    """The hook in ``do_kv_cache_update``: the first batch lands in the cache with its own scales."""
    pytest.importorskip("vllm")
    from vllm_kvquant.impl import KVQuantAttentionImpl
    from vllm_kvquant.layer_scales import LAYER_ATTR

    head_size, heads, block = 64, 2, 16
    impl = KVQuantAttentionImpl(num_heads=4, head_size=head_size, scale=0.125, num_kv_heads=heads, kv_cache_dtype="fp8")
    state = SimpleNamespace(**vars(_state("int8")))
    state.k_scale, state.v_scale = torch.ones(heads), torch.ones(heads)
    online.attach_online([("l0", state)], (0, 1), online.OnlineScalesRegistry())
    layer = SimpleNamespace(layer_name="l0", **{LAYER_ATTR: state})
    g = torch.Generator().manual_seed(0)
    key = (torch.randn(5, heads, head_size, generator=g) * 0.05).to(torch.bfloat16)  # |x| < 0.5: 0 at scale 1
    value = (torch.randn(5, heads, head_size, generator=g) * 0.05).to(torch.bfloat16)
    kv_cache = torch.zeros(2, heads, block, 2 * head_size, dtype=torch.uint8)
    impl.do_kv_cache_update(layer, key, value, kv_cache, torch.tensor([0, 1, 2, 3, 4]))
    assert state.online is None
    stored = kv_cache.view(torch.int8).transpose(1, 2)[0, :5, :, :head_size].float()  # [tokens, heads, head_size]
    restored = stored * state.k_scale[None, :, None]
    assert (stored != 0).float().mean() > 0.9
    assert torch.allclose(restored, key.float(), atol=float(state.k_scale.max()) / 2 + 1e-6)


# ----------------------------------------------------------------------------- the engine


def _run(model_dir: Path, out: Path, **extra) -> tuple[dict, str]:
    """One engine run (tests/engine_runner.py) as in test_backend_cpu.py; its JSON and its log."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_backend_cpu import HERE, MAX_TOKENS, _engine, _prompts

    round1, round2 = _prompts()
    spec = {"engine": _engine(model_dir, **extra), "rounds": [round1, round2], "max_tokens": MAX_TOKENS}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    proc = subprocess.run(
        [sys.executable, str(HERE / "engine_runner.py"), json.dumps(spec), str(out)],
        capture_output=True, text=True, timeout=900, env=env,
    )  # fmt: skip
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    return json.loads(out.read_text()), log


@pytest.fixture(scope="module")
def no_sidecar_model(tmp_path_factory) -> tuple[Path, dict]:
    """The trained tiny Llama with no kvquant_scales.json, and its BF16 run."""
    pytest.importorskip("vllm")
    from vllm_kvquant.tiny_model import TRAINED_TINY_LLAMA, make_tiny_llama

    root = tmp_path_factory.mktemp("online")
    model_dir = make_tiny_llama(root / "tiny", TRAINED_TINY_LLAMA)
    assert not (model_dir / "kvquant_scales.json").exists()
    bf16, _ = _run(model_dir, root / "bf16.json")
    return model_dir, bf16


@pytest.mark.vllm
@pytest.mark.parametrize("kv_dtype", ["fp8_e4m3", "int8"])
def test_no_sidecar_runs_online_scales_close_to_bf16(kv_dtype: str, no_sidecar_model, tmp_path: Path) -> None:
    from test_backend_cpu import _assert_close_to_bf16

    model_dir, bf16 = no_sidecar_model
    options = {} if kv_dtype == "fp8_e4m3" else {"kvquant": {"dtype": "int8"}}  # no fallback option: the default
    run, log = _run(model_dir, tmp_path / "out.json", attention_backend="kvquant", additional_config=options)
    assert "measuring per-head" in log and f"vllm-kvquant calibrate {model_dir} --data" in log
    assert "scale 1.0 for every layer" not in log
    assert "frozen for 2 layer(s)" in log  # one summary line per process
    (report,) = run["backend_report"]
    qmax = 448.0 if kv_dtype == "fp8_e4m3" else 127.0
    for layer in report.values():
        assert layer["backend"] == "KVQUANT" and layer["kv_dtype"] == kv_dtype
        assert layer["scales_source"].startswith("online (measured from the first batch")
        for scales in (layer["k_scale"], layer["v_scale"]):
            assert len(scales) == 2 and all(s != 1.0 for s in scales)  # per KV head, measured
            assert all(0.01 < s * qmax / 2.0 < 100 for s in scales)  # a plausible first-batch amax
    assert run["results"][-1]["num_cached_tokens"] >= 32  # round 2 read round 1's quantized blocks
    _assert_close_to_bf16(run, bf16)


@pytest.mark.vllm
def test_int8_unit_scales_only_when_asked_for(no_sidecar_model, tmp_path: Path) -> None:
    model_dir, bf16 = no_sidecar_model
    options = {"kvquant": {"dtype": "int8", "fallback": "unit"}}
    run, log = _run(model_dir, tmp_path / "out.json", attention_backend="kvquant", additional_config=options)
    assert "scale 1.0 for every layer" in log and "every |value| < 0.5 rounds to 0" in log
    assert "measuring per-head" not in log
    (report,) = run["backend_report"]
    assert all(layer["k_scale"] == [1.0] and layer["v_scale"] == [1.0] for layer in report.values())


# ----------------------------------------------------------------------------- CUDA graphs


@pytest.mark.gpu
def test_measurement_recorded_in_a_cuda_graph_freezes_on_the_first_real_replay(kvquant_caplog) -> None:
    """A graph that may replay the first prefill (no vLLM forward context here: not a decode graph):
    capture (a host sync would fail it) with a dummy batch, replay dummy, then real, then larger."""
    from vllm_kvquant import online_scales

    dev = torch.device("cuda")
    state = _state("fp8_e4m3")
    state.k_scale, state.v_scale = torch.ones(HEADS, device=dev), torch.ones(HEADS, device=dev)
    online_scales.attach_online([("l0", state)], (0, 1), online_scales.OnlineScalesRegistry())
    observer = state.online
    ptrs = (state.k_scale.data_ptr(), state.v_scale.data_ptr())
    key = torch.zeros(4, HEADS, HEAD_SIZE, dtype=torch.bfloat16, device=dev)
    value = torch.zeros_like(key)
    slots = torch.full((4,), -1, dtype=torch.long, device=dev)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as torch asks
        observer.observe(key, value, slots, state)
    torch.cuda.current_stream().wait_stream(side)
    assert state.online is observer and not observer.frozen.item()
    graph = torch.cuda.CUDAGraph()
    with kvquant_caplog.at_level(logging.WARNING, logger="vllm.kvquant"), torch.cuda.graph(graph):
        observer.observe(key, value, slots, state)
    assert "captured inside a CUDA graph that may replay a prefill" in kvquant_caplog.text
    graph.replay()
    assert state.k_scale.tolist() == [1.0] * HEADS
    real_k, real_v = _kv(3, [1.0, 2.0, 4.0], [0.5, 0.5, 0.5])
    key[:3].copy_(real_k)
    value[:3].copy_(real_v)
    slots.copy_(torch.tensor([7, 8, 9, -1]))
    graph.replay()
    expected = [a * 2.0 / 448 for a in (1.0, 2.0, 4.0)]
    assert state.k_scale.tolist() == pytest.approx(expected) and observer.frozen.item()
    key.mul_(10)
    graph.replay()
    assert state.k_scale.tolist() == pytest.approx(expected)
    assert (state.k_scale.data_ptr(), state.v_scale.data_ptr()) == ptrs
    observer.observe(key, value, slots, state)  # an eager write afterwards learns it is frozen
    assert state.online is None and state.k_scale.tolist() == pytest.approx(expected)
