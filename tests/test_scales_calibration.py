"""Calibration math: amax recording, TP combination, scale formula, file building."""

from __future__ import annotations

import json

import pytest
import torch

from vllm_kvquant.scales import (
    DEFAULT_FLOOR,
    AmaxRecorder,
    CalibrationInfo,
    Granularity,
    KVCacheDType,
    ModelFacts,
    ScalesError,
    build_scales_file,
    combine_rank_stats,
    kv_heads_for_rank,
    load_scales,
    save_scales,
    scales_from_amax,
)

NAMES = tuple(f"model.layers.{i}.self_attn.attn" for i in range(2))


def _batches(heads: int, seed: int = 0) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    g = torch.Generator().manual_seed(seed)
    return [
        {n: (torch.randn(t, heads, 16, generator=g) * (h + 1), torch.randn(t, heads, 16, generator=g)) for h, n in enumerate(NAMES)}
        for t in (5, 9, 3)
    ]


def _record(batches, heads_slice=slice(None), **kwargs) -> AmaxRecorder:
    rec = AmaxRecorder(**kwargs)
    for batch in batches:
        for name, (k, v) in batch.items():
            rec.update(name, k[:, heads_slice], v[:, heads_slice])
    return rec


def test_recorder_matches_torch_amax() -> None:
    batches = _batches(4)
    stats = _record(batches).stats()
    for name in NAMES:
        k_all = torch.cat([b[name][0] for b in batches])
        v_all = torch.cat([b[name][1] for b in batches])
        assert torch.equal(stats[name][0], k_all.abs().amax(dim=0))  # per KV head and channel
        assert torch.equal(stats[name][1], v_all.abs().amax(dim=0))


def test_recorder_details() -> None:
    rec = AmaxRecorder()
    k = torch.zeros(2, 2, 4, dtype=torch.float16)
    k[0, 1, 0] = float("nan")
    k[1, 0, 2] = -3.0
    rec.record("a", k, torch.ones(2, 2, 4, dtype=torch.bfloat16))  # KVRecorder protocol name
    assert rec.stats()["a"][0].tolist() == [[0.0, 0.0, 3.0, 0.0], [0.0] * 4]
    assert rec.nonfinite == {"a": 1} and rec.num_tokens == {"a": 2} and rec.layer_names == ["a"]
    with pytest.raises(ScalesError, match=r"layer 'a': key has shape \(2, 8\)"):
        rec.update("a", torch.zeros(2, 8), torch.zeros(2, 8))
    with pytest.raises(ScalesError, match=r"layer 'a': got 3 KV heads of size 4, earlier batches had 2 of size 4"):
        rec.update("a", torch.zeros(1, 3, 4), torch.zeros(1, 3, 4))


def test_percentile_mode() -> None:
    batches = _batches(2)
    rec = _record(batches, method="percentile", percentile=99.0)
    stats = rec.stats()
    k_all = torch.cat([b[NAMES[0]][0] for b in batches]).abs()
    expected = torch.quantile(k_all.transpose(0, 1).reshape(2, -1), 0.99, dim=1)
    assert torch.allclose(stats[NAMES[0]][0], expected)  # everything fits in the reservoir: exact
    small = _record(batches, method="percentile", percentile=99.0, max_samples=64)
    assert small._samples[NAMES[0]][0].samples.shape == (2, 64)
    assert (small.stats()[NAMES[0]][0] <= _record(batches).stats()[NAMES[0]][0].amax(dim=1)).all()
    with pytest.raises(ScalesError, match="percentile = 0"):
        AmaxRecorder(method="percentile", percentile=0)


@pytest.mark.parametrize("heads,tp", [(4, 2), (4, 4), (2, 4), (2, 8), (1, 2)])
def test_combine_tp_equals_tp1(heads: int, tp: int) -> None:
    batches = _batches(heads)
    full = _record(batches).stats()
    per_rank = [_record(batches, heads_slice=kv_heads_for_rank(heads, tp, r)).stats() for r in range(tp)]
    combined = combine_rank_stats(per_rank, heads, tp)
    single = combine_rank_stats([full], heads, 1)
    for name in NAMES:
        assert torch.equal(combined[name][0], full[name][0]) and torch.equal(combined[name][1], full[name][1])
        assert torch.equal(single[name][0], full[name][0])
    facts = ModelFacts(2, heads, 16, NAMES)
    for granularity in ("per_head", "per_channel"):
        a = build_scales_file(combined, "fp8_e4m3", granularity, facts, CalibrationInfo("absmax"))
        b = build_scales_file(full, "fp8_e4m3", granularity, facts, CalibrationInfo("absmax"))
        assert a == b


def test_combine_replicated_takes_max() -> None:
    per_rank = [{"x": (torch.tensor([1.0]), torch.tensor([5.0]))}, {"x": (torch.tensor([2.0]), torch.tensor([4.0]))}]
    assert [t.tolist() for t in combine_rank_stats(per_rank, 1, 2)["x"]] == [[2.0], [5.0]]
    with pytest.raises(ScalesError, match=r"layer 'x': rank 0 has statistics of shapes \[\(1,\), \(1,\)\] .*expected \[\(2,\), \(2,\)\]"):
        combine_rank_stats(per_rank[:1], 2, 1)
    with pytest.raises(ScalesError, match="got statistics from 1 ranks, expected tp_size = 2"):
        combine_rank_stats(per_rank[:1], 2, 2)


def test_scale_formula_and_floor() -> None:
    amax = torch.tensor([448.0, 0.0, 44.8])
    assert scales_from_amax(amax, "fp8_e4m3").tolist() == pytest.approx([1.0, DEFAULT_FLOOR, 0.1])
    assert scales_from_amax(amax, KVCacheDType.INT8, margin=2.0).tolist() == pytest.approx([896 / 127, DEFAULT_FLOOR, 89.6 / 127])
    assert scales_from_amax(amax, "int8", granularity="per_tensor").tolist() == pytest.approx([448 / 127])
    assert scales_from_amax(torch.zeros(2), "int8", floor=1e-3).tolist() == pytest.approx([1e-3, 1e-3])
    with pytest.raises(ScalesError, match="margin"):
        scales_from_amax(amax, "int8", margin=0)


@pytest.mark.parametrize("granularity", ["per_tensor", "per_head"])
def test_build_file_validates_and_round_trips(tmp_path, granularity: str) -> None:
    stats = {NAMES[0]: (torch.tensor([127.0, 0.0]), torch.tensor([12.7, 1.27])), NAMES[1]: (torch.ones(2), torch.ones(2))}
    calib = CalibrationInfo("absmax", tool="vllm-kvquant", num_tokens=17, margin=1.0)
    scales = build_scales_file(stats, "int8", granularity, ModelFacts(2, 2, 16, NAMES), calib)
    assert scales.granularity is Granularity(granularity)
    expected_k = (1.0,) if granularity == "per_tensor" else (1.0, DEFAULT_FLOOR)
    assert scales.layers[NAMES[0]].k_scale == pytest.approx(expected_k)
    assert load_scales(save_scales(scales, tmp_path / "s.json")).layers == scales.layers


def test_build_file_missing_layer() -> None:
    with pytest.raises(ScalesError, match=r"layer 'model.layers.1.self_attn.attn' was never seen during calibration"):
        build_scales_file({NAMES[0]: (torch.ones(2), torch.ones(2))}, "int8", "per_head", ModelFacts(2, 2, 16, NAMES), CalibrationInfo("absmax"))


def test_per_channel_scales_from_channel_stats(tmp_path) -> None:
    """per_channel keeps one scale per KV head and channel; per_head and per_tensor reduce the same stats."""
    k = torch.tensor([[127.0, 12.7, 0.0, 1.27], [2.54, 254.0, 25.4, 127.0]])  # 2 heads x 4 channels
    v = torch.ones(2, 4)
    stats = {NAMES[0]: (k, v), NAMES[1]: (k * 2, v)}
    facts = ModelFacts(2, 2, 4, NAMES)
    calib = CalibrationInfo("absmax", margin=1.25)
    scales = build_scales_file(stats, "int8", "per_channel", facts, calib)
    layer = scales.layers[NAMES[0]]
    assert layer.channels == 4 and len(layer.k_scale) == 8
    assert layer.k_scale == pytest.approx([1.25, 0.125, DEFAULT_FLOOR, 0.0125, 0.025, 2.5, 0.25, 1.25])
    per_head = build_scales_file(stats, "int8", "per_head", facts, calib).layers[NAMES[0]]
    assert per_head.k_scale == pytest.approx([1.25, 2.5])
    assert scales_from_amax(k, "int8", granularity="per_tensor").tolist() == pytest.approx([2.0])
    loaded = load_scales(save_scales(scales, tmp_path / "s.json"))
    assert loaded.layers == scales.layers and loaded.granularity is Granularity.PER_CHANNEL
    data = json.loads((tmp_path / "s.json").read_text())
    assert data["layers"][NAMES[0]]["k_scale"][1] == pytest.approx([0.025, 2.5, 0.25, 1.25])  # one list per KV head


def test_per_channel_needs_channel_stats() -> None:
    stats = {n: (torch.ones(2), torch.ones(2)) for n in NAMES}  # per-head statistics (percentile method)
    with pytest.raises(ScalesError, match=r"per_channel needs K/V statistics of shape \[2, 16\].*got \(2,\)"):
        build_scales_file(stats, "int8", "per_channel", ModelFacts(2, 2, 16, NAMES), CalibrationInfo("percentile"))
    with pytest.raises(ScalesError, match="use --method absmax"):
        scales_from_amax(torch.ones(2), "int8", granularity="per_channel")


def test_default_granularity() -> None:
    from vllm_kvquant.scales import default_granularity

    assert default_granularity("int8") is Granularity.PER_CHANNEL
    assert default_granularity("fp8_e4m3") is Granularity.PER_HEAD


def test_rope_partners() -> None:
    from vllm_kvquant.scales.calibration import rope_partners

    assert rope_partners(8, {"rotary_dim": 8, "neox": True}) == [4, 5, 6, 7, 0, 1, 2, 3]
    assert rope_partners(8, {"rotary_dim": 8, "neox": False}) == [1, 0, 3, 2, 5, 4, 7, 6]
    assert rope_partners(8, {"rotary_dim": 4, "neox": True}) == [2, 3, 0, 1, 4, 5, 6, 7]  # partial rotary
    assert rope_partners(4, None) == [0, 1, 2, 3]


def test_k_pair_norms_bound_every_rotation_and_set_per_channel_k_scales() -> None:
    """RoPE turns a pair (i, i + d/2) by any angle: the recorded pair norm bounds both channels at
    every position, so per-channel K scales from it never clip a rotation of what was seen, up to
    the head's K amax, where they stop (never a coarser step than per_head, which clips there too)."""
    from vllm_kvquant.scales.calibration import rope_partners

    partners = rope_partners(4, {"rotary_dim": 4, "neox": True})  # pairs (0, 2) and (1, 3)
    rec = AmaxRecorder(k_partners=partners)
    key = torch.tensor([[[3.0, 0.5, 4.0, 0.0]], [[0.0, -1.0, 1.0, 0.5]]])  # 2 tokens, 1 head
    value = torch.tensor([[[1.0, 2.0, 3.0, 4.0]], [[0.5, 0.5, 0.5, 0.5]]])
    rec.record(NAMES[0], key, value)
    k_amax, v_amax, k_pair = rec.stats()[NAMES[0]]
    assert k_amax.tolist() == [[3.0, 1.0, 4.0, 0.5]] and v_amax.tolist() == [[1.0, 2.0, 3.0, 4.0]]
    assert k_pair[0].tolist() == pytest.approx([5.0, 1.25**0.5, 5.0, 1.25**0.5])
    angle = torch.atan2(torch.tensor(4.0), torch.tensor(3.0))  # rotate pair (0, 2) so that channel 0 holds the whole norm
    rotated = key[0, 0, 0] * torch.cos(angle) + key[0, 0, 2] * torch.sin(angle)
    assert float(rotated) == pytest.approx(5.0, rel=1e-4) and float(rotated) > k_amax[0, 0]
    stats = {n: rec.stats()[NAMES[0]] for n in NAMES}
    facts = ModelFacts(2, 1, 4, NAMES)
    channel = build_scales_file(stats, "int8", "per_channel", facts, CalibrationInfo("absmax")).layers[NAMES[0]]
    # pair (0, 2): norm 5 capped at the head's amax 4; pair (1, 3): norm 1.118, below it
    assert channel.k_scale == pytest.approx([4 / 127, 1.25**0.5 / 127, 4 / 127, 1.25**0.5 / 127])
    assert channel.v_scale == pytest.approx([1 / 127, 2 / 127, 3 / 127, 4 / 127])
    head = build_scales_file(stats, "int8", "per_head", facts, CalibrationInfo("absmax")).layers[NAMES[0]]
    assert head.k_scale == pytest.approx([4 / 127])  # per head: the plain amax, as before
    with pytest.raises(ScalesError, match="RoPE pairing covers 4 channels"):
        rec.record(NAMES[1], torch.zeros(1, 1, 8), torch.zeros(1, 1, 8))


@pytest.mark.gpu
def test_k_pair_norms_of_cuda_tensors() -> None:
    """The backend records CUDA K/V while calibrating: the pair norms must match the CPU result."""
    from vllm_kvquant.scales.calibration import rope_partners

    partners = rope_partners(8, {"rotary_dim": 8, "neox": True})
    g = torch.Generator().manual_seed(0)
    key, value = torch.randn(6, 2, 8, generator=g), torch.randn(6, 2, 8, generator=g)
    on_cpu, on_gpu = AmaxRecorder(k_partners=partners), AmaxRecorder(k_partners=partners)
    on_cpu.record(NAMES[0], key, value)
    on_gpu.record(NAMES[0], key.cuda(), value.cuda())
    for want, got in zip(on_cpu.stats()[NAMES[0]], on_gpu.stats()[NAMES[0]]):
        assert got.device.type == "cpu"
        torch.testing.assert_close(got, want)
