"""How the backend hands each vLLM attention layer its scales, without an engine.

A fake vLLM config holds fake attention layers (what ``static_forward_context`` holds); the
sidecar is real. Covers the tp shard, the dtype override, KV-sharing layers and the errors.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

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
