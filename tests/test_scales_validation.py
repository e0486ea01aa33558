"""Every bad sidecar is refused with a message naming the file, the layer and the value."""

from __future__ import annotations

import copy
import json
import logging
import re
from typing import Any, Callable

import pytest

from vllm_kvquant.scales import (
    SIDECAR_FILENAME,
    Granularity,
    KVCacheDType,
    ScalesError,
    ScalesMismatchError,
    ScalesValidationError,
    ShardingError,
    SidecarNotFoundError,
    load_scales,
    resolve_scales,
    save_scales,
    shard_scales,
    validate_for_model,
)

L0, L1 = "model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"
F = re.escape(SIDECAR_FILENAME)


def valid(granularity: str = "per_head") -> dict[str, Any]:
    per_head = granularity == "per_head"
    if granularity == "per_channel":  # 2 KV heads x 64 channels
        data = valid("per_head")
        data["granularity"] = granularity
        for entry in data["layers"].values():
            for field in ("k_scale", "v_scale"):
                entry[field] = [[s * (1 + c / 64) for c in range(64)] for s in entry[field]]
        return data
    return {
        "format": "vllm-kvquant-scales",
        "format_version": 1,
        "kv_dtype": "fp8_e4m3",
        "granularity": granularity,
        "model": {"num_layers": 2, "num_kv_heads": 2, "head_size": 64, "layer_names": [L0, L1]},
        "calibration": {"tool": "vllm-kvquant", "method": "absmax", "margin": 1.0, "percentile": None},
        "layers": {
            L0: {"k_scale": [0.01, 0.02] if per_head else 0.01, "v_scale": [0.03, 0.04] if per_head else 0.03},
            L1: {"k_scale": [0.01, 0.02] if per_head else 0.01, "v_scale": [0.03, 0.04] if per_head else 0.03},
        },
    }


def edit(fn: Callable[[dict], Any], granularity: str = "per_head") -> str:
    data = copy.deepcopy(valid(granularity))
    fn(data)
    return json.dumps(data)


def _set(path: list, value: Any) -> Callable[[dict], None]:
    def apply(data: dict) -> None:
        node = data
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return apply


# (id, file text, regex the message must match after the file name)
BAD_FILES = [
    ("malformed-json", '{"format": "vllm-kvquant-scales",\n  "format_version": 1,,}', r": is not valid JSON: .* at line 2, column 23"),
    ("not-an-object", "[1, 2, 3]", r": the top level must be a JSON object, got a list"),
    ("unknown-format", edit(_set(["format"], "something-else")), r': format = "something-else" is not a kvquant sidecar'),
    ("bad-version", edit(_set(["format_version"], 2)), r": format_version = 2 is not supported .*upgrade vllm-kvquant"),
    ("string-version", edit(_set(["format_version"], "1")), r': format_version = "1" is not supported'),
    ("unsupported-dtype", edit(_set(["kv_dtype"], "fp8_e5m2")), r': kv_dtype = "fp8_e5m2" is not supported'),
    ("unknown-granularity", edit(_set(["granularity"], "per_block")), r': granularity = "per_block" is unknown'),
    ("missing-field", edit(lambda d: d.pop("calibration")), r": calibration is missing \(required top-level field\)"),
    ("missing-method", edit(lambda d: d["calibration"].pop("method")), r": calibration.method = null must be a non-empty string"),
    ("zero-heads", edit(_set(["model", "num_kv_heads"], 0)), r": model.num_kv_heads = 0 must be a positive integer"),
    ("bool-head-size", edit(_set(["model", "head_size"], True)), r": model.head_size = true must be a positive integer"),
    ("names-count", edit(_set(["model", "num_layers"], 3)), r": model.layer_names = .* has 2 names but model.num_layers = 3"),
    ("duplicate-names", edit(_set(["model", "layer_names"], [L0, L0])), rf": layer '{L0}': model.layer_names\[1\] = \"{L0}\" duplicates model.layer_names\[0\]"),
    ("nan", edit(_set(["layers", L1, "k_scale"], [float("nan"), 0.1])), rf": layer '{L1}': k_scale\[0\] = nan is not finite \(scales must be finite and > 0\)"),
    ("inf", edit(_set(["layers", L1, "v_scale"], [0.1, float("inf")])), rf": layer '{L1}': v_scale\[1\] = inf is not finite"),
    ("zero", edit(_set(["layers", L0, "k_scale"], [0.0, 0.1])), rf": layer '{L0}': k_scale\[0\] = 0.0 is not positive"),
    ("negative", edit(_set(["layers", L1, "k_scale"], [0.1, -0.5])), rf": layer '{L1}': k_scale\[1\] = -0.5 is not positive \(scales must be finite and > 0\)"),
    ("string-scale", edit(_set(["layers", L0, "v_scale"], [0.1, "0.2"])), rf": layer '{L0}': v_scale\[1\] = \"0.2\" is a str, not a number"),
    ("bool-scale", edit(_set(["layers", L0, "k_scale"], True), "per_tensor"), rf": layer '{L0}': k_scale = true is a bool, not a number"),
    ("wrong-head-count", edit(_set(["layers", L1, "k_scale"], [0.1, 0.2, 0.3])), rf": layer '{L1}': k_scale = \[0.1, 0.2, 0.3\] has 3 values; granularity per_head needs one per KV head \(model.num_kv_heads = 2\)"),
    ("per-head-scalar", edit(_set(["layers", L1, "v_scale"], 0.5)), rf": layer '{L1}': v_scale = 0.5 is not a list"),
    ("per-tensor-list", edit(_set(["layers", L0, "k_scale"], [0.1, 0.2]), "per_tensor"), rf": layer '{L0}': k_scale = \[0.1, 0.2\] has 2 values; granularity per_tensor needs one number"),
    ("per-channel-short-vector", edit(lambda d: d["layers"][L1]["k_scale"][1].pop(), "per_channel"), rf": layer '{L1}': k_scale\[1\] = \[.* has 63 values; granularity per_channel needs one per channel \(model.head_size = 64\)"),
    ("per-channel-nan", edit(lambda d: d["layers"][L0]["k_scale"][0].__setitem__(5, float("nan")), "per_channel"), rf": layer '{L0}': k_scale\[0\]\[5\] = nan is not finite \(scales must be finite and > 0\)"),
    ("per-channel-negative", edit(lambda d: d["layers"][L1]["v_scale"][1].__setitem__(63, -0.5), "per_channel"), rf": layer '{L1}': v_scale\[1\]\[63\] = -0.5 is not positive"),
    ("per-channel-zero", edit(lambda d: d["layers"][L0]["v_scale"][0].__setitem__(0, 0), "per_channel"), rf": layer '{L0}': v_scale\[0\]\[0\] = 0.0 is not positive"),
    ("per-channel-flat", edit(_set(["layers", L0, "k_scale"], [0.1, 0.2]), "per_channel"), rf": layer '{L0}': k_scale\[0\] = 0.1 is not a list; granularity per_channel needs 64 scales per KV head"),
    ("per-channel-head-count", edit(lambda d: d["layers"][L0]["k_scale"].append([0.1] * 64), "per_channel"), rf": layer '{L0}': k_scale = .* has 3 entries; granularity per_channel needs one list per KV head \(model.num_kv_heads = 2\)"),
    ("per-channel-scalar", edit(_set(["layers", L1, "v_scale"], 0.5), "per_channel"), rf": layer '{L1}': v_scale = 0.5 is not a list; granularity per_channel needs a list of 2 lists"),
    ("missing-layer", edit(lambda d: d["layers"].pop(L1)), rf": layer '{L1}' is listed in model.layer_names but has no entry in 'layers'"),
    ("unknown-layer", edit(_set(["layers", "model.layers.9.self_attn.attn"], {"k_scale": [1.0, 1.0], "v_scale": [1.0, 1.0]})), r": layer 'model.layers.9.self_attn.attn' is not listed in model.layer_names \(unknown layer"),
    ("missing-v-scale", edit(lambda d: d["layers"][L0].pop("v_scale")), rf": layer '{L0}': v_scale is missing"),
    ("typo-key", edit(_set(["layers", L0, "k_scales"], 0.1)), rf": layer '{L0}': keys = \[\"k_scales\"\] are not allowed"),
]


@pytest.mark.parametrize("text,pattern", [(t, p) for _, t, p in BAD_FILES], ids=[i for i, _, _ in BAD_FILES])
def test_bad_file_is_refused_with_clear_message(tmp_path, text: str, pattern: str) -> None:
    path = tmp_path / SIDECAR_FILENAME
    path.write_text(text)
    with pytest.raises(ScalesValidationError, match=re.escape(str(path)) + pattern):
        load_scales(path)


def test_bad_file_count() -> None:
    assert len(BAD_FILES) >= 14


def test_error_carries_fields(tmp_path) -> None:
    path = tmp_path / SIDECAR_FILENAME
    path.write_text(edit(_set(["layers", L1, "k_scale"], [0.1, -0.5])))
    with pytest.raises(ScalesValidationError) as info:
        load_scales(path)
    assert (info.value.file, info.value.layer, info.value.field, info.value.value) == (str(path), L1, "k_scale[1]", -0.5)
    assert isinstance(info.value, ValueError)


def test_not_utf8_and_missing_file(tmp_path) -> None:
    path = tmp_path / SIDECAR_FILENAME
    path.write_bytes(b"\xff\xfe{}")
    with pytest.raises(ScalesValidationError, match=re.escape(str(path)) + ": is not UTF-8"):
        load_scales(path)
    with pytest.raises(ScalesError, match=r"nope\.json: no such file"):
        load_scales(tmp_path / "nope.json")


def _sidecar(tmp_path, granularity: str = "per_head") -> Any:
    path = tmp_path / SIDECAR_FILENAME
    path.write_text(json.dumps(valid(granularity)))
    return load_scales(path)


MODEL = dict(num_layers=2, num_kv_heads=2, head_size=64, layer_names=[L0, L1])


def test_matches_model(tmp_path) -> None:
    validate_for_model(_sidecar(tmp_path), **MODEL, kv_dtype="fp8_e4m3")


@pytest.mark.parametrize(
    "change,pattern",
    [
        ({"num_kv_heads": 4}, r"the sidecar was made for 2 KV heads, the model has 4"),
        ({"head_size": 128}, r"model.head_size = 64: the sidecar was made for head size 64, the model has 128"),
        ({"num_layers": 3, "layer_names": [L0, L1, "model.layers.2.self_attn.attn"]},
         r"the sidecar was made for 2 attention layers, the model has 3[\s\S]*layer 'model.layers.2.self_attn.attn' of the model has no scales in file .*" + F),
        ({"layer_names": ["m.layers.0.attn", L1]}, r"layer 'm.layers.0.attn' of the model has no scales in file"),
        ({"kv_dtype": "int8"}, r"kv_dtype = 'fp8_e4m3': the sidecar was made for fp8_e4m3, the cache is int8"),
    ],
    ids=["heads", "head-size", "layers", "layer-name", "dtype"],
)
def test_mismatch_vs_model(tmp_path, change: dict, pattern: str) -> None:
    scales = _sidecar(tmp_path)
    with pytest.raises(ScalesMismatchError, match=re.escape(str(tmp_path / SIDECAR_FILENAME)) + r" does not match the running model[\s\S]*" + pattern):
        validate_for_model(scales, **{**MODEL, **change})


def test_tp_that_cannot_split(tmp_path) -> None:
    data = valid()
    data["model"]["num_kv_heads"] = 3
    for layer in data["layers"].values():
        layer["k_scale"] = layer["v_scale"] = [0.1, 0.2, 0.3]
    path = tmp_path / SIDECAR_FILENAME
    path.write_text(json.dumps(data))
    with pytest.raises(ShardingError, match=re.escape(str(path)) + r": cannot split 3 KV heads over tensor-parallel size 2"):
        shard_scales(load_scales(path), tp_size=2, rank=0)


def test_missing_sidecar_message(tmp_path) -> None:
    with pytest.raises(SidecarNotFoundError) as info:
        load_scales(tmp_path)
    message = str(info.value)
    assert f"no kvquant_scales.json was found in {tmp_path}" in message
    assert "vllm-kvquant calibrate <MODEL> --data <TEXT_FILE>" in message
    assert "vllm-kvquant convert" in message and "fallback" in message


def test_fallback_error_raises(tmp_path) -> None:
    with pytest.raises(SidecarNotFoundError, match="vllm-kvquant calibrate"):
        resolve_scales(tmp_path, kv_dtype="fp8_e4m3", fallback="error", **MODEL)


@pytest.mark.parametrize("kv_dtype", ["fp8_e4m3", "int8"])
def test_fallback_unit_warns(tmp_path, kvquant_caplog, kv_dtype: str) -> None:
    with kvquant_caplog.at_level(logging.WARNING, logger="vllm.kvquant"):
        scales = resolve_scales(tmp_path, kv_dtype=kv_dtype, fallback="unit", **MODEL)
    records = [r for r in kvquant_caplog.records if r.name == "vllm.kvquant" and r.levelno == logging.WARNING]
    assert len(records) == 1
    message = records[0].getMessage()
    assert str(tmp_path) in message and "scale 1.0 for every layer" in message
    assert "vllm-kvquant calibrate" in message and "clipping" in message
    if kv_dtype == "int8":
        assert "int8" in message and "127" in message
    assert scales.calibration.method == "fallback-unit"
    assert scales.granularity is Granularity.PER_TENSOR and scales.kv_dtype is KVCacheDType(kv_dtype)
    assert all(ls.k_scale == (1.0,) and ls.v_scale == (1.0,) for ls in scales.layers.values())
    validate_for_model(scales, **MODEL)


def test_fallback_for_hub_id(kvquant_caplog) -> None:
    with kvquant_caplog.at_level(logging.WARNING, logger="vllm.kvquant"):
        scales = resolve_scales(None, kv_dtype="fp8_e4m3", **MODEL)
    assert "not a local directory" in kvquant_caplog.text
    assert list(scales.layers) == [L0, L1]


def test_explicit_path_wins(tmp_path, kvquant_caplog) -> None:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / SIDECAR_FILENAME).write_text(json.dumps(valid("per_head")))
    explicit = tmp_path / "elsewhere.json"
    explicit.write_text(json.dumps(valid("per_tensor")))
    with kvquant_caplog.at_level(logging.WARNING, logger="vllm.kvquant"):
        chosen = resolve_scales(model_dir, explicit_path=explicit, kv_dtype="fp8_e4m3", **MODEL)
        from_dir = resolve_scales(model_dir, kv_dtype="fp8_e4m3", **MODEL)
    assert chosen.source_path == str(explicit) and chosen.granularity is Granularity.PER_TENSOR
    assert from_dir.source_path == str(model_dir / SIDECAR_FILENAME)
    assert kvquant_caplog.records == []


def test_explicit_dir_without_sidecar(tmp_path) -> None:
    with pytest.raises(SidecarNotFoundError, match="vllm-kvquant calibrate"):
        resolve_scales(None, explicit_path=tmp_path, kv_dtype="fp8_e4m3", **MODEL)


def test_save_validates_against_destination(tmp_path) -> None:
    scales = _sidecar(tmp_path, "per_tensor")
    out = tmp_path / "out" / SIDECAR_FILENAME
    assert save_scales(scales, out) == out
    assert load_scales(out).layers == scales.layers
