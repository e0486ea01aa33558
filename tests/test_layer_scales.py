"""How the backend hands each vLLM attention layer its scales, without an engine.

A fake vLLM config holds fake attention layers (what ``static_forward_context`` holds); the
sidecar is real. Covers the tp shard, the dtype override, KV-sharing layers, the errors and,
without a sidecar, the fallbacks (online by default, unit or error when asked for).
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

from vllm_kvquant.backend import KVQuantAttentionBackend  # noqa: E402
from vllm_kvquant.errors import KVQuantConfigError  # noqa: E402
from vllm_kvquant.layer_scales import LAYER_ATTR, _cache, attach_layer_scales, layer_state  # noqa: E402
from vllm_kvquant.scales import (  # noqa: E402
    CalibrationInfo,
    Granularity,
    KVCacheDType,
    LayerScales,
    ModelFacts,
    ScalesFile,
    ScalesMismatchError,
    SidecarNotFoundError,
    save_scales,
)

NAMES = [f"model.layers.{i}.self_attn.attn" for i in range(2)]


class FakeAttention:
    def __init__(self, name: str, shares: str | None = None) -> None:
        self.layer_name = name
        self.kv_sharing_target_layer_name = shares

    def get_attn_backend(self):
        return KVQuantAttentionBackend


def _sidecar(model_dir: Path, num_kv_heads: int = 2) -> Path:
    layers = {
        n: LayerScales(n, tuple(0.01 * (i + 1) * (h + 1) for h in range(num_kv_heads)), (0.5,) * num_kv_heads)
        for i, n in enumerate(NAMES)
    }
    scales = ScalesFile(
        KVCacheDType.INT8, Granularity.PER_HEAD, ModelFacts(2, num_kv_heads, 64, tuple(NAMES)),
        CalibrationInfo(method="absmax"), layers,
    )  # fmt: skip
    return save_scales(scales, model_dir / "kvquant_scales.json")


def _config(model_dir: Path, layers: dict, num_kv_heads: int = 2, **options) -> SimpleNamespace:
    _cache.clear()
    return SimpleNamespace(
        model_config=SimpleNamespace(
            model=str(model_dir), get_total_num_kv_heads=lambda: num_kv_heads, get_head_size=lambda: 64
        ),
        compilation_config=SimpleNamespace(static_forward_context=layers, cudagraph_mode=SimpleNamespace(name="NONE")),
        additional_config={"kvquant": options} if options else {},
    )


def test_layers_get_their_scales_and_sharing_layers_their_owners(tmp_path: Path) -> None:
    _sidecar(tmp_path)
    layers = {n: FakeAttention(n) for n in NAMES}
    layers["model.layers.2.self_attn.attn"] = FakeAttention("model.layers.2.self_attn.attn", shares=NAMES[0])
    attach_layer_scales(_config(tmp_path, layers), list(layers), "cpu")
    state1 = layer_state(layers[NAMES[1]])
    assert state1.kv_dtype.value == "int8"
    assert state1.k_scale.tolist() == pytest.approx([0.02, 0.04])
    assert layer_state(layers["model.layers.2.self_attn.attn"]) is layer_state(layers[NAMES[0]])


def test_dtype_override_converts_scales(tmp_path: Path) -> None:
    _sidecar(tmp_path)
    layers = {n: FakeAttention(n) for n in NAMES}
    attach_layer_scales(_config(tmp_path, layers, dtype="fp8_e4m3"), NAMES, "cpu")
    state = layer_state(layers[NAMES[0]])
    assert state.kv_dtype.value == "fp8_e4m3"
    assert state.k_scale.tolist() == pytest.approx([0.01 * 127 / 448, 0.02 * 127 / 448])


def _per_channel_sidecar(model_dir: Path, num_kv_heads: int = 4) -> Path:
    d = 64
    layers = {
        n: LayerScales(n, tuple(0.01 * (i + 1) * (h + 1) + 1e-4 * c for h in range(num_kv_heads) for c in range(d)),
                       tuple(0.5 + 1e-3 * c for h in range(num_kv_heads) for c in range(d)), channels=d)
        for i, n in enumerate(NAMES)
    }  # fmt: skip
    scales = ScalesFile(
        KVCacheDType.INT8, Granularity.PER_CHANNEL, ModelFacts(2, num_kv_heads, d, tuple(NAMES)),
        CalibrationInfo(method="absmax", margin=1.25), layers,
    )  # fmt: skip
    return save_scales(scales, model_dir / "kvquant_scales.json")


def test_per_channel_scales_reach_each_rank_as_its_heads_channel_vectors(tmp_path: Path, monkeypatch) -> None:
    """tp 2 over 4 KV heads: rank 1 holds heads 2 and 3, each with its 64 channel scales ([2, 64])."""
    from vllm_kvquant import layer_scales

    _per_channel_sidecar(tmp_path)
    monkeypatch.setattr(layer_scales, "_tp_rank_and_size", lambda: (1, 2))
    layers = {n: FakeAttention(n) for n in NAMES}
    attach_layer_scales(_config(tmp_path, layers, num_kv_heads=4), NAMES, "cpu")
    state = layer_state(layers[NAMES[1]])
    assert state.per_channel and state.k_scale.shape == state.v_scale.shape == (2, 64)
    assert state.k_scale[0, 0].item() == pytest.approx(0.06) and state.k_scale[1, 63].item() == pytest.approx(0.0863)
    assert state.v_scale[1].tolist() == pytest.approx([0.5 + 1e-3 * c for c in range(64)])
    assert state.online is None


def test_per_channel_dtype_override_keeps_the_channel_vectors(tmp_path: Path) -> None:
    _per_channel_sidecar(tmp_path, num_kv_heads=2)
    layers = {n: FakeAttention(n) for n in NAMES}
    attach_layer_scales(_config(tmp_path, layers, dtype="fp8_e4m3"), NAMES, "cpu")
    state = layer_state(layers[NAMES[0]])
    assert state.kv_dtype.value == "fp8_e4m3" and state.k_scale.shape == (2, 64)
    assert state.k_scale[1, 1].item() == pytest.approx((0.02 + 1e-4) * 127 / 448)


def test_sidecar_for_another_model_is_refused(tmp_path: Path) -> None:
    _sidecar(tmp_path, num_kv_heads=2)
    layers = {n: FakeAttention(n) for n in NAMES}
    with pytest.raises(ScalesMismatchError, match="KV heads"):
        attach_layer_scales(_config(tmp_path, layers, num_kv_heads=4), NAMES, "cpu")


def test_unknown_option_is_refused(tmp_path: Path) -> None:
    layers = {n: FakeAttention(n) for n in NAMES}
    with pytest.raises(KVQuantConfigError, match=r"unknown option\(s\) \['scale'\]"):
        attach_layer_scales(_config(tmp_path, layers, scale="x.json"), NAMES, "cpu")


def test_layer_without_scales_is_reported(tmp_path: Path) -> None:
    with pytest.raises(KVQuantConfigError, match="model.layers.7.self_attn.attn.*has no scales attached"):
        layer_state(SimpleNamespace(layer_name="model.layers.7.self_attn.attn", **{LAYER_ATTR: None}))


# ----------------------------------------------------------------------------- without a sidecar


def test_no_sidecar_measures_online_the_heads_of_this_rank(tmp_path: Path, monkeypatch) -> None:
    """The default fallback: per-head placeholders of this rank's KV heads, each with an observer."""
    from vllm_kvquant import layer_scales, online_scales

    monkeypatch.setattr(layer_scales, "_tp_rank_and_size", lambda: (1, 2))
    layers = {n: FakeAttention(n) for n in NAMES}
    sharer = "model.layers.2.self_attn.attn"
    layers[sharer] = FakeAttention(sharer, shares=NAMES[1])
    attach_layer_scales(_config(tmp_path, layers, num_kv_heads=4), list(layers), "cpu")
    for name in NAMES:
        state = layer_state(layers[name])
        assert state.kv_dtype.value == "fp8_e4m3"
        assert state.k_scale.tolist() == [1.0, 1.0] and state.v_scale.tolist() == [1.0, 1.0]  # 2 of 4 heads
        assert isinstance(state.online, online_scales.OnlineScales) and state.online.k_scale is state.k_scale
        assert state.source == "online (not measured yet)"
    assert layer_state(layers[sharer]) is layer_state(layers[NAMES[1]])
    assert len(online_scales.REGISTRY.observers) == 2 and online_scales.REGISTRY.tp == (1, 2)


def test_sharing_layer_attached_before_its_owner_shares_one_state(tmp_path: Path) -> None:
    layers = {n: FakeAttention(n) for n in NAMES}
    sharer = "model.layers.2.self_attn.attn"
    layers[sharer] = FakeAttention(sharer, shares=NAMES[0])
    config = _config(tmp_path, layers, dtype="int8")
    attach_layer_scales(config, [sharer], "cpu")  # the sharing layer's KV-cache group comes first
    attach_layer_scales(config, NAMES, "cpu")
    owner = layer_state(layers[NAMES[0]])
    assert layer_state(layers[sharer]) is owner and owner.online is not None
    owner.online.observe(torch.ones(2, 2, 64, dtype=torch.bfloat16), torch.ones(2, 2, 64), torch.tensor([0, 1]), owner)
    assert layer_state(layers[sharer]).k_scale.tolist() == pytest.approx([2.0 / 127] * 2)


def test_a_sidecar_means_no_online_measurement(tmp_path: Path) -> None:
    _sidecar(tmp_path)
    layers = {n: FakeAttention(n) for n in NAMES}
    attach_layer_scales(_config(tmp_path, layers), NAMES, "cpu")
    assert all(layer_state(layers[n]).online is None for n in NAMES)


def test_unit_scales_only_when_asked_for(tmp_path: Path, kvquant_caplog) -> None:
    layers = {n: FakeAttention(n) for n in NAMES}
    with kvquant_caplog.at_level(logging.WARNING, logger="vllm.kvquant"):
        attach_layer_scales(_config(tmp_path, layers, dtype="int8", fallback="unit"), NAMES, "cpu")
    state = layer_state(layers[NAMES[0]])
    assert state.k_scale.tolist() == [1.0] and state.online is None
    assert "scale 1.0 for every layer" in kvquant_caplog.text and "every |value| < 0.5 rounds to 0" in kvquant_caplog.text


def test_fallback_error_refuses_to_start(tmp_path: Path) -> None:
    layers = {n: FakeAttention(n) for n in NAMES}
    with pytest.raises(SidecarNotFoundError, match=f"no kvquant_scales.json was found in {tmp_path}"):
        attach_layer_scales(_config(tmp_path, layers, fallback="error"), NAMES, "cpu")


def test_online_scales_refuse_kv_transfer(tmp_path: Path) -> None:
    layers = {n: FakeAttention(n) for n in NAMES}
    config = _config(tmp_path, layers)
    config.kv_transfer_config = SimpleNamespace(kv_connector="LMCacheConnectorV1")
    with pytest.raises(KVQuantConfigError, match=r"kv_transfer_config is set.*vllm-kvquant calibrate"):
        attach_layer_scales(config, NAMES, "cpu")


def test_rope_layout_of_a_model() -> None:
    """What calibration asks each worker: the rotary embedding's pairing of K channels."""
    from vllm_kvquant import compat
    from vllm_kvquant.worker_extension import rope_layout

    rope = SimpleNamespace(rotary_dim=64, is_neox_style=True, head_size=64)
    model = torch.nn.Module()
    model.rotary = torch.nn.Module()
    model.rotary.rotary_dim, model.rotary.is_neox_style, model.rotary.head_size = 64, True, 64
    assert rope_layout(model) == {"head_size": 64, "rotary_dim": 64, "neox": True}
    assert rope_layout(torch.nn.Linear(2, 2)) is None and rope_layout(None) is None
    assert compat.worker_model(SimpleNamespace(get_model=lambda: model)) is model
    assert compat.worker_model(SimpleNamespace(model_runner=SimpleNamespace(model=rope))) is rope
