"""``vllm-kvquant calibrate`` without an engine: data reading and sample selection, the
recorder seeing exactly what the backend's cache write stores, the tensor-parallel
combination (stats -> file) and the refusal of CUDA graphs while calibrating.

The engine-level checks are in ``test_calibrate_e2e.py``.
"""

from __future__ import annotations

import _triton_env  # noqa: F401  (sets TRITON_INTERPRET=1 before triton is imported)

import json
import math
from argparse import Namespace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from vllm_kvquant import calibrate
from vllm_kvquant.calibrate import (
    CalibrationData,
    calibration_info,
    check_args,
    load_calibration_data,
    read_texts,
    scales_from_rank_stats,
    select_samples,
    special_prefix,
)
from vllm_kvquant.scales import AmaxRecorder, ScalesError, kv_heads_for_rank, load_scales, save_scales

NAMES = [f"model.layers.{i}.self_attn.attn" for i in (0, 1, 2, 10)]  # 10 sorts after 2


# ---------------------------------------------------------------- read_texts


def test_read_plain_text(tmp_path: Path) -> None:
    f = tmp_path / "a.txt"
    f.write_text("one document\nwith two lines\n")
    assert read_texts(f) == ["one document\nwith two lines\n"]
    assert read_texts(str(f)) == read_texts(f)


def test_read_jsonl(tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "first"}\n\n{"text": "second", "id": 2}\n')
    assert read_texts(f) == ["first", "second"]


@pytest.mark.parametrize(
    "lines, lineno, message",
    [
        (['{"text": "ok"}', "", "{not json"], 3, "not a JSON line"),
        (['{"text": "ok"}', '{"content": "no text field"}'], 2, "string 'text' field"),
        (['["a", "list"]'], 1, "string 'text' field"),
        (['{"text": 5}'], 1, "string 'text' field"),
    ],
)
def test_read_jsonl_bad_line_names_file_and_line(tmp_path: Path, lines, lineno: int, message: str) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=message) as info:
        read_texts(f)
    assert str(info.value).startswith(f"{f}:{lineno}: ")


def test_read_directory_of_txt(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("bee")
    (tmp_path / "a.txt").write_text("ay")
    (tmp_path / "sub" / "c.txt").write_text("see")
    (tmp_path / "notes.md").write_text("ignored")
    (tmp_path / "data.jsonl").write_text('{"text": "ignored"}\n')
    assert read_texts(tmp_path) == ["ay", "bee", "see"]  # sorted paths, recursive, .txt only


def test_read_missing_and_empty(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_texts(tmp_path / "nope.txt")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    (empty_dir / "x.md").write_text("not a .txt")
    with pytest.raises(FileNotFoundError, match=r"empty has no \.txt files"):
        read_texts(empty_dir)
    blank = tmp_path / "blank.txt"
    blank.write_text("  \n\n")
    with pytest.raises(ValueError, match="contains no text"):
        read_texts(blank)
    no_records = tmp_path / "none.jsonl"
    no_records.write_text("\n")
    with pytest.raises(ValueError, match="contains no text"):
        read_texts(no_records)


# ---------------------------------------------------------------- select_samples


def test_select_samples_deterministic_and_counted() -> None:
    stream = list(range(1000))
    a = select_samples(stream, 5, 64, seed=0)
    assert a == select_samples(stream, 5, 64, seed=0)
    assert a != select_samples(stream, 5, 64, seed=1)
    assert len(a) == 5 and all(len(w) == 64 for w in a)
    starts = [w[0] for w in a]
    assert starts == sorted(starts) and all(s % 64 == 0 for s in starts)  # aligned, in stream order
    assert all(w == list(range(w[0], w[0] + 64)) for w in a)  # contiguous, non-overlapping


def test_select_samples_more_samples_only_add_windows() -> None:
    stream = list(range(5000))
    small = select_samples(stream, 4, 100, seed=3)
    large = select_samples(stream, 16, 100, seed=3)
    assert all(w in large for w in small)


def test_select_samples_short_data() -> None:
    assert select_samples(list(range(10)), 8, 64, seed=0) == [list(range(10))]  # one short window
    windows = select_samples(list(range(200)), 8, 64, seed=0)  # only 3 full windows
    assert windows == [list(range(0, 64)), list(range(64, 128)), list(range(128, 192))]
    with pytest.raises(ValueError, match="no tokens"):
        select_samples([], 8, 64, seed=0)
    with pytest.raises(ValueError, match="positive"):
        select_samples(list(range(10)), 0, 64, seed=0)


# ---------------------------------------------------------------- tokenization


class _CharTokenizer:
    """Stand-in tokenizer: one token per character (ids >= 3), BOS = 1 when add_special_tokens, EOS = 2."""

    eos_token_id = 2

    def __init__(self, bos: bool = True) -> None:
        self.bos = bos

    def __call__(self, text: str, add_special_tokens: bool = True, **_):
        ids = [3 + ord(c) % 200 for c in text]
        return {"input_ids": ([1] if self.bos and add_special_tokens else []) + ids}


def test_special_prefix() -> None:
    assert special_prefix(_CharTokenizer(bos=True)) == [1]
    assert special_prefix(_CharTokenizer(bos=False)) == []


@pytest.mark.parametrize("bos", [True, False])
def test_load_calibration_data(tmp_path: Path, monkeypatch, bos: bool) -> None:
    monkeypatch.setattr(calibrate, "load_tokenizer", lambda model: _CharTokenizer(bos))
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": "x" * 150}) for _ in range(4)))  # 4 * 151 tokens with EOS
    cd = load_calibration_data("model", str(data), num_samples=3, seq_len=50, seed=0)
    assert len(cd.samples) == 3 and all(len(s) == 50 for s in cd.samples)
    assert cd.num_tokens == 150 and cd.description == str(data)
    assert all((s[0] == 1) == bos for s in cd.samples)  # served prompts start with BOS: so do samples
    assert all(1 not in s[1:] for s in cd.samples)
    # With room for every window: documents joined by EOS, cut into consecutive windows.
    every = load_calibration_data("model", str(data), num_samples=100, seq_len=50, seed=0)
    body = 50 - bos
    stream = ([3 + ord("x")] * 150 + [2]) * 4
    assert [t for s in every.samples for t in s[bos:]] == stream[: len(stream) // body * body]
    assert load_calibration_data("model", str(data), 3, 50, 0) == cd


# ---------------------------------------------------------------- argument checks


def _args(**kw) -> Namespace:
    base = dict(
        model=".", data="d.txt", num_samples=8, seq_len=128, granularity="per_head", dtype="int8", method="absmax",
        percentile=99.99, margin=1.0, tensor_parallel_size=1, seed=0, out=None, model_dtype="bfloat16",
        gpu_memory_utilization=0.3, max_model_len=None,
    )
    base.update(kw)
    return Namespace(**base)


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(margin=0.0), "--margin must be > 0"),
        (dict(margin=-1.0), "--margin must be > 0"),
        (dict(margin=float("nan")), "--margin must be > 0"),
        (dict(num_samples=0), "--num-samples"),
        (dict(seq_len=0), "--seq-len"),
        (dict(method="percentile", percentile=0.0), "--percentile"),
        (dict(method="percentile", percentile=100.5), "--percentile"),
        (dict(tensor_parallel_size=0), "--tensor-parallel-size"),
        (dict(max_model_len=128), "--max-model-len"),
        (dict(gpu_memory_utilization=1.5), "--gpu-memory-utilization"),
        (dict(model="org/not-a-local-dir"), "--out"),
    ],
)
def test_check_args(kw: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_args(_args(**kw))


def test_check_args_accepts_defaults() -> None:
    check_args(_args())
    check_args(_args(method="percentile", percentile=100.0, max_model_len=129, model="org/x", out="s.json"))


# ---------------------------------------------------------------- recorder vs. the cache write


class _KeepRaw:
    """A calibration_hooks recorder keeping every K/V it is handed (and an AmaxRecorder's view)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, torch.Tensor, torch.Tensor]] = []
        self.amax = AmaxRecorder()

    def record(self, layer_name: str, key: torch.Tensor, value: torch.Tensor) -> None:
        self.calls.append((layer_name, key.clone(), value.clone()))
        self.amax.record(layer_name, key, value)


@pytest.fixture
def recorder():
    from vllm_kvquant import calibration_hooks

    rec = _KeepRaw()
    calibration_hooks.set_recorder(rec)
    yield rec
    calibration_hooks.set_recorder(None)


def _impl_and_layer(kv_dtype: str, per_head: bool, heads: int = 2, head_size: int = 64):
    pytest.importorskip("vllm")
    from vllm_kvquant.impl import KVQuantAttentionImpl
    from vllm_kvquant.kernels.dtypes import KVQuantDType
    from vllm_kvquant.layer_scales import LayerQuantState

    impl = KVQuantAttentionImpl(
        num_heads=2 * heads, head_size=head_size, scale=head_size**-0.5, num_kv_heads=heads, kv_cache_dtype="fp8"
    )
    n = heads if per_head else 1
    qmax = 127.0 if kv_dtype == "int8" else 448.0
    k_scale = torch.linspace(8.0, 10.0, n, dtype=torch.float32) / qmax  # |x| up to ~8 is not saturated
    v_scale = torch.linspace(9.0, 11.0, n, dtype=torch.float32) / qmax
    layer = SimpleNamespace(layer_name="model.layers.3.self_attn.attn")
    layer._kvquant_state = LayerQuantState(KVQuantDType(kv_dtype), k_scale, v_scale, "test")
    return impl, layer


@pytest.mark.parametrize("per_head", [True, False], ids=["per_head", "per_tensor"])
@pytest.mark.parametrize("kv_dtype", ["int8", "fp8_e4m3"])
def test_recorder_sees_exactly_what_the_backend_writes(recorder, kv_dtype: str, per_head: bool) -> None:
    from vllm_kvquant.kernels.reference import dequantize_ref

    heads, head_size, block_size, num_blocks = 2, 64, 16, 4
    impl, layer = _impl_and_layer(kv_dtype, per_head, heads, head_size)
    state = layer._kvquant_state
    g = torch.Generator().manual_seed(0)
    tokens = 12  # the step's K/V; only the first len(slot_mapping) tokens are real
    key = (torch.randn(tokens, heads, head_size, generator=g) * 1.5).to(torch.bfloat16)
    value = (torch.randn(tokens, heads, head_size, generator=g) * 1.5).to(torch.bfloat16)
    slot_mapping = torch.tensor([5, -1, 17, 18, -1, 40, 3, 63, -1, 33], dtype=torch.int64)
    padded = (slot_mapping < 0).nonzero().flatten().tolist() + list(range(len(slot_mapping), tokens))
    key[padded] = 1000.0  # would dominate any statistic they leaked into
    value[padded] = -1000.0
    kv_cache = torch.zeros(num_blocks, heads, block_size, 2 * head_size, dtype=torch.uint8)

    impl.do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)

    written = slot_mapping >= 0
    ((name, rec_k, rec_v),) = recorder.calls
    assert name == layer.layer_name
    assert torch.equal(rec_k, key[: len(slot_mapping)][written])  # the written rows, in order, bit for bit
    assert torch.equal(rec_v, value[: len(slot_mapping)][written])
    assert recorder.amax.num_tokens == {name: int(written.sum())}
    assert float(recorder.amax.stats()[name][0].max()) < 1000.0  # padding never reached the statistics

    # Those rows are what the cache now holds at their slots, within one quantization step.
    from vllm_kvquant import compat

    key_cache, value_cache = compat.split_kv_cache(kv_cache, head_size)
    slots = slot_mapping[written]
    blocks, offsets = slots // block_size, slots % block_size
    for cache, recorded, scale in ((key_cache, rec_k, state.k_scale), (value_cache, rec_v, state.v_scale)):
        from vllm_kvquant.kernels.dtypes import as_storage

        deq = dequantize_ref(as_storage(cache, kv_dtype)[blocks, offsets], scale)
        x = recorded.float()
        s = scale.reshape(-1)[:, None] if scale.numel() > 1 else scale
        if kv_dtype == "int8":
            tol = s / 2 * 1.0001
        else:  # e4m3: 3 mantissa bits -> half an ulp is 1/16 relative; subnormal step 2**-9 * scale
            tol = torch.maximum(x.abs() / 16, (s * 2.0**-10).expand_as(x)) * 1.0001
        assert bool(((deq - x).abs() <= tol).all())
        # Nothing was written anywhere else (padding rows included).
        untouched = torch.ones(cache.shape[:2], dtype=torch.bool)
        untouched[blocks, offsets] = False
        assert not bool(as_storage(cache, "int8")[untouched].ne(0).any())


def test_calibrated_scale_maps_amax_onto_qmax(recorder) -> None:
    """The recorded amax, turned into a scale, puts the largest written value exactly at +-127."""
    from vllm_kvquant.kernels.dtypes import as_storage
    from vllm_kvquant.scales import scales_from_amax

    heads, head_size = 2, 64
    impl, layer = _impl_and_layer("int8", per_head=True, heads=heads, head_size=head_size)
    g = torch.Generator().manual_seed(1)
    key = (torch.randn(20, heads, head_size, generator=g) * torch.tensor([1.0, 3.0])[:, None]).to(torch.bfloat16)
    value = torch.randn(20, heads, head_size, generator=g).to(torch.bfloat16)
    slot_mapping = torch.arange(20, dtype=torch.int64)
    impl.do_kv_cache_update(layer, key, value, torch.zeros(2, heads, 16, 2 * head_size, dtype=torch.uint8), slot_mapping)
    k_amax, v_amax = recorder.amax.stats()[layer.layer_name]
    assert torch.equal(k_amax, key.float().abs().amax(dim=0))  # per KV head and channel
    from vllm_kvquant import compat

    for granularity, dims in (("per_head", (0, 2)), ("per_channel", (0,))):
        layer._kvquant_state.k_scale = scales_from_amax(k_amax, "int8", granularity=granularity)
        layer._kvquant_state.v_scale = scales_from_amax(v_amax, "int8", granularity=granularity)
        kv_cache = torch.zeros(2, heads, 16, 2 * head_size, dtype=torch.uint8)
        impl.do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        for cache in compat.split_kv_cache(kv_cache, head_size):
            codes = as_storage(cache, "int8").reshape(-1, heads, head_size)[:20]
            assert set(codes.abs().amax(dim=dims).reshape(-1).tolist()) == {127}, granularity  # every head / channel


def test_no_recorder_records_nothing() -> None:
    from vllm_kvquant import calibration_hooks

    assert calibration_hooks.active_recorder() is None
    impl, layer = _impl_and_layer("int8", per_head=True)
    key = torch.ones(3, 2, 64, dtype=torch.bfloat16)
    impl.do_kv_cache_update(layer, key, key, torch.zeros(1, 2, 16, 128, dtype=torch.uint8), torch.arange(3))


# ---------------------------------------------------------------- tensor parallel: stats -> file


def _kv_stream(heads: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [
        {
            name: (
                torch.randn(t, heads, 32, generator=g) * torch.arange(1, heads + 1)[:, None],
                torch.randn(t, heads, 32, generator=g) * (i + 1),
            )
            for i, name in enumerate(NAMES)
        }
        for t in (7, 33, 5)
    ]


def _rank_stats(stream, heads: int, tp: int, **recorder_kw) -> list[dict]:
    """What each rank's recorder would return: it only ever sees the KV heads the rank holds."""
    per_rank = []
    for rank in range(tp):
        idx = kv_heads_for_rank(heads, tp, rank)
        rec = AmaxRecorder(seed=rank, **recorder_kw)
        for batch in stream:
            for name in reversed(NAMES):  # arrival order must not matter
                k, v = batch[name]
                rec.record(name, k[:, idx], v[:, idx])
        per_rank.append(rec.stats())
    return per_rank


def _write(per_rank, heads: int, tp: int, path: Path, method: str = "absmax", **args_kw) -> Path:
    args = _args(method=method, tensor_parallel_size=tp, **args_kw)
    data = CalibrationData(samples=[[1] * 45], num_tokens=45, description="corpus.txt")
    info = calibration_info(args, data, created="2025-01-01T00:00:00Z")
    scales = scales_from_rank_stats(
        per_rank, num_kv_heads=heads, head_size=32, tp_size=tp, kv_dtype=args.dtype, granularity=args.granularity, info=info
    )
    return save_scales(scales, path)


@pytest.mark.parametrize("method", ["absmax", "percentile"])
@pytest.mark.parametrize("granularity", ["per_head", "per_tensor", "per_channel"])
@pytest.mark.parametrize("heads, tp", [(4, 2), (4, 4), (4, 8), (2, 8)])
def test_tp_file_equals_tp1_file(tmp_path: Path, heads: int, tp: int, granularity: str, method: str) -> None:
    stream = _kv_stream(heads)
    kw = dict(granularity=granularity, percentile=99.0)
    if method == "percentile" and granularity == "per_channel":  # the percentile sample is per KV head
        with pytest.raises(ScalesError, match="use --method absmax"):
            _write(_rank_stats(stream, heads, tp, method=method, percentile=99.0), heads, tp, tmp_path / "p.json", method, **kw)
        return
    ref = _write(_rank_stats(stream, heads, 1, method=method, percentile=99.0), heads, 1, tmp_path / "tp1.json", method, **kw)
    out = _write(_rank_stats(stream, heads, tp, method=method, percentile=99.0), heads, tp, tmp_path / "tpN.json", method, **kw)
    assert out.read_text() == ref.read_text()
    scales = load_scales(out)
    assert list(scales.model.layer_names) == NAMES  # numeric layer order

    from vllm_kvquant.cli import main

    assert main(["validate", str(out), "--tensor-parallel-size", str(tp)]) == 0


def test_file_scales_follow_the_formula(tmp_path: Path) -> None:
    heads = 4
    stream = _kv_stream(heads)
    for batch in stream:  # head 3 of the last layer never sees anything but zeros -> the 1e-8 floor
        batch[NAMES[-1]][0][:, 3] = 0.0
    per_rank = _rank_stats(stream, heads, 1)
    path = _write(per_rank, heads, 1, tmp_path / "s.json", margin=1.25)
    raw = json.loads(path.read_text())
    for name in NAMES:
        k_amax, v_amax = per_rank[0][name]
        for amax, written in ((k_amax, raw["layers"][name]["k_scale"]), (v_amax, raw["layers"][name]["v_scale"])):
            expected = [max(a * 1.25 / 127.0, 1e-8) for a in amax.amax(dim=1).tolist()]  # per head: max of its channels
            assert written == pytest.approx(expected, rel=1e-6)
    assert raw["layers"][NAMES[-1]]["k_scale"][3] == pytest.approx(1e-8, rel=1e-6)  # fp32(1e-8)
    cal = raw["calibration"]
    assert cal["margin"] == 1.25 and cal["method"] == "absmax" and cal["percentile"] is None
    assert cal["num_tokens"] == 45 and cal["data"] == "corpus.txt" and cal["created"] == "2025-01-01T00:00:00Z"
    assert cal["num_samples"] == 1 and cal["seq_len"] == 128 and cal["seed"] == 0


def test_rank_stats_errors() -> None:
    stream = _kv_stream(4)
    per_rank = _rank_stats(stream, 4, 2)
    info = calibration_info(_args(), CalibrationData([[1]], 1, "x"))
    common = dict(num_kv_heads=4, head_size=32, kv_dtype="int8", granularity="per_head", info=info)
    with pytest.raises(ScalesError, match="expected tp_size = 4"):
        scales_from_rank_stats(per_rank, tp_size=4, **common)
    per_rank[1] = {n: s for n, s in per_rank[1].items() if n != NAMES[0]}
    with pytest.raises(ScalesError, match="other layers"):
        scales_from_rank_stats(per_rank, tp_size=2, **common)


# ---------------------------------------------------------------- CUDA graphs refused


def _fake_vllm_config(mode_name: str | None):
    mode = None if mode_name is None else SimpleNamespace(name=mode_name)
    return SimpleNamespace(
        compilation_config=SimpleNamespace(cudagraph_mode=mode),
        additional_config={"kvquant": {"calibration": True}},
        model_config=SimpleNamespace(
            model="/nonexistent/model-for-test", get_total_num_kv_heads=lambda: 2, get_head_size=lambda: 64
        ),
    )


@pytest.mark.parametrize("mode", ["FULL", "PIECEWISE", "FULL_AND_PIECEWISE"])
def test_calibration_refuses_cuda_graphs(mode: str) -> None:
    from vllm_kvquant.errors import KVQuantConfigError
    from vllm_kvquant.layer_scales import _refuse_cuda_graphs, load_model_scales

    with pytest.raises(KVQuantConfigError) as info:
        _refuse_cuda_graphs(_fake_vllm_config(mode))
    message = str(info.value)
    assert "eager mode only" in message and f"cudagraph_mode={mode}" in message and "enforce_eager=True" in message
    # ... and the calibration-mode scale loading goes through that check.
    with pytest.raises(KVQuantConfigError, match="eager mode only"):
        load_model_scales(_fake_vllm_config(mode), ["model.layers.0.self_attn.attn"])


def test_calibration_allows_eager() -> None:
    from vllm_kvquant.layer_scales import _refuse_cuda_graphs, load_model_scales

    _refuse_cuda_graphs(_fake_vllm_config("NONE"))
    _refuse_cuda_graphs(_fake_vllm_config(None))
    scales, options = load_model_scales(_fake_vllm_config("NONE"), ["model.layers.0.self_attn.attn"])
    assert options.calibration and scales.calibration.method == "fallback-unit"
    assert math.isclose(scales.layers["model.layers.0.self_attn.attn"].k_scale[0], 1.0)


def test_calibration_engine_args() -> None:
    engine = calibrate.calibration_engine_args(_args(model="m"), max_model_len=129)
    assert engine["enforce_eager"] is True
    assert engine["enable_prefix_caching"] is False and engine["enable_chunked_prefill"] is False
    assert engine["attention_backend"] == "kvquant" and engine["additional_config"] == {"kvquant": {"calibration": True}}
    assert engine["worker_extension_cls"] == "vllm_kvquant.worker_extension.KVQuantWorkerExtension"
    assert engine["max_model_len"] == 129 and engine["gpu_memory_utilization"] == 0.3
