"""Tensor-parallel split of per-head scales, mirroring vLLM's QKVParallelLinear."""

from __future__ import annotations

import pytest
import torch

from vllm_kvquant.scales import (
    CalibrationInfo,
    Granularity,
    KVCacheDType,
    LayerScales,
    ModelFacts,
    ScalesFile,
    ScalesValidationError,
    ShardingError,
    kv_heads_for_rank,
    layer_scales_for_rank,
    scales_as_tensors,
    shard_scales,
)


@pytest.mark.parametrize(
    "tp,expected",
    [(1, [[0, 1, 2, 3]]), (2, [[0, 1], [2, 3]]), (4, [[0], [1], [2], [3]])],
)
def test_split_four_heads(tp: int, expected: list[list[int]]) -> None:
    assert [kv_heads_for_rank(4, tp, r) for r in range(tp)] == expected


def test_replication_two_heads_tp8() -> None:
    assert [kv_heads_for_rank(2, 8, r) for r in range(8)] == [[0]] * 4 + [[1]] * 4
    assert [kv_heads_for_rank(1, 4, r) for r in range(4)] == [[0]] * 4


@pytest.mark.parametrize(
    "heads,tp,pattern",
    [
        (4, 3, r"f\.json: cannot split 4 KV heads over tensor-parallel size 3: the KV head count must be divisible"),
        (3, 2, r"cannot split 3 KV heads over tensor-parallel size 2"),
        (4, 6, r"cannot split 4 KV heads over tensor-parallel size 6: .*multiple of the KV head count"),
    ],
)
def test_cannot_split(heads: int, tp: int, pattern: str) -> None:
    with pytest.raises(ShardingError, match=pattern):
        kv_heads_for_rank(heads, tp, 0, file="f.json")


def test_bad_rank() -> None:
    with pytest.raises(ShardingError, match=r"rank = 2 is outside tensor-parallel size 2"):
        kv_heads_for_rank(4, 2, 2)


def _file(granularity: Granularity, heads: int = 4) -> ScalesFile:
    names = ("model.layers.0.self_attn.attn",)
    if granularity is Granularity.PER_HEAD:
        ls = LayerScales(names[0], tuple(0.1 * (h + 1) for h in range(heads)), tuple(1.0 + h for h in range(heads)))
    else:
        ls = LayerScales(names[0], (0.5,), (0.25,))
    return ScalesFile(KVCacheDType.FP8_E4M3, granularity, ModelFacts(1, heads, 64, names), CalibrationInfo("absmax"), {names[0]: ls}, "s.json")


def test_shard_per_head() -> None:
    scales = _file(Granularity.PER_HEAD)
    shard = shard_scales(scales, 2, 1)
    ls = shard.layers["model.layers.0.self_attn.attn"]
    assert shard.kv_heads == (2, 3)
    assert ls.k_scale == pytest.approx((0.3, 0.4)) and ls.v_scale == (3.0, 4.0)
    assert shard_scales(scales, 1, 0).layers == scales.layers
    k, v = scales_as_tensors(ls, "cpu")
    assert k.dtype == torch.float32 and k.shape == (2,) and torch.allclose(v, torch.tensor([3.0, 4.0]))


def test_shard_replicated_heads() -> None:
    scales = _file(Granularity.PER_HEAD, heads=2)
    got = [shard_scales(scales, 8, r).layers["model.layers.0.self_attn.attn"].v_scale for r in range(8)]
    assert got == [(1.0,)] * 4 + [(2.0,)] * 4


def test_shard_per_tensor_is_unchanged() -> None:
    scales = _file(Granularity.PER_TENSOR)
    ls = scales.layers["model.layers.0.self_attn.attn"]
    assert layer_scales_for_rank(ls, 4, 3, 4) is ls
    k, v = scales_as_tensors(shard_scales(scales, 4, 3).layers[ls.name])
    assert k.shape == (1,) and float(k) == 0.5 and float(v) == 0.25


def test_shard_error_names_file() -> None:
    with pytest.raises(ShardingError, match=r"s\.json: cannot split 4 KV heads over tensor-parallel size 3"):
        shard_scales(_file(Granularity.PER_HEAD), 3, 0)


def _per_channel_file(heads: int, head_size: int = 4) -> ScalesFile:
    names = ("model.layers.0.self_attn.attn",)
    k = tuple(0.01 * (h + 1) + 0.001 * c for h in range(heads) for c in range(head_size))
    v = tuple(1.0 + h + 0.1 * c for h in range(heads) for c in range(head_size))
    ls = LayerScales(names[0], k, v, channels=head_size)
    facts = ModelFacts(1, heads, head_size, names)
    return ScalesFile(KVCacheDType.INT8, Granularity.PER_CHANNEL, facts, CalibrationInfo("absmax"), {names[0]: ls}, "s.json")


def test_shard_per_channel_moves_channel_vectors_with_their_heads() -> None:
    scales = _per_channel_file(heads=4)
    ls = shard_scales(scales, 2, 1).layers["model.layers.0.self_attn.attn"]
    assert ls.channels == 4 and ls.num_heads == 2
    assert ls.v_scale == pytest.approx((3.0, 3.1, 3.2, 3.3, 4.0, 4.1, 4.2, 4.3))
    k, v = scales_as_tensors(ls)
    assert k.shape == v.shape == (2, 4) and k[1, 3] == pytest.approx(0.043)
    replicated = [shard_scales(_per_channel_file(heads=2), 4, r).layers[ls.name].k_scale[:1] for r in range(4)]
    assert replicated == [pytest.approx((0.01,))] * 2 + [pytest.approx((0.02,))] * 2


def test_shard_per_channel_wrong_length_names_file_layer_and_field() -> None:
    scales = _per_channel_file(heads=4)
    ls = scales.layers["model.layers.0.self_attn.attn"]
    short = LayerScales(ls.name, ls.k_scale, ls.v_scale[:-1], channels=4)
    with pytest.raises(ScalesValidationError, match=r"s\.json: layer 'model\.layers\.0\.self_attn\.attn': v_scale = .* "
                       r"has 15 values but the model has 4 KV heads x 4 channels = 16"):
        layer_scales_for_rank(short, 2, 0, 4, file="s.json")
