"""Sidecar format v1: dataclasses, JSON mapping, save/load round trip, JSON Schema."""

from __future__ import annotations

import json
import subprocess
import sys

import jsonschema
import pytest

from vllm_kvquant.scales import (
    SIDECAR_FILENAME,
    CalibrationInfo,
    Granularity,
    KVCacheDType,
    LayerScales,
    ModelFacts,
    ScalesFile,
    ScalesValidationError,
    find_sidecar,
    load_schema,
    parse_scales,
    load_scales,
    save_scales,
)

NAMES = ("model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn")


def make_scales(granularity: str = "per_tensor", kv_dtype: str = "fp8_e4m3") -> ScalesFile:
    per_head = granularity == "per_head"
    layers = {
        n: LayerScales(n, (0.01 * (i + 1), 0.02) if per_head else (0.01 * (i + 1),), (0.03, 0.04) if per_head else (0.03,))
        for i, n in enumerate(NAMES)
    }
    calib = CalibrationInfo(
        method="absmax", tool="vllm-kvquant", tool_version="0.1.0", data="wiki.txt", num_tokens=4096,
        margin=1.0, percentile=None, created="2026-11-24T00:00:00Z",
    )
    return ScalesFile(KVCacheDType(kv_dtype), Granularity(granularity), ModelFacts(2, 2, 64, NAMES), calib, layers)


def test_qmax() -> None:
    assert KVCacheDType.FP8_E4M3.qmax == 448.0
    assert KVCacheDType.INT8.qmax == 127.0
    assert str(KVCacheDType.INT8) == "int8"


@pytest.mark.parametrize("granularity", ["per_tensor", "per_head"])
@pytest.mark.parametrize("kv_dtype", ["fp8_e4m3", "int8"])
def test_round_trip(tmp_path, granularity: str, kv_dtype: str) -> None:
    scales = make_scales(granularity, kv_dtype)
    path = save_scales(scales, tmp_path / SIDECAR_FILENAME)
    loaded = load_scales(path)
    assert loaded.layers == scales.layers
    assert loaded.model == scales.model
    assert loaded.calibration == scales.calibration
    assert (loaded.kv_dtype, loaded.granularity) == (scales.kv_dtype, scales.granularity)
    assert loaded.source_path == str(path)
    assert load_scales(tmp_path).layers == scales.layers  # the model dir works too
    assert [p.name for p in tmp_path.iterdir()] == [SIDECAR_FILENAME]  # no temp file left behind


def test_json_layout(tmp_path) -> None:
    path = save_scales(make_scales("per_tensor"), tmp_path / "s.json")
    text = path.read_text()
    data = json.loads(text)
    assert text.startswith("{\n  ")  # pretty printed
    assert data["format"] == "vllm-kvquant-scales" and data["format_version"] == 1
    assert data["layers"][NAMES[0]] == {"k_scale": 0.01, "v_scale": 0.03}
    head = json.loads(save_scales(make_scales("per_head"), tmp_path / "h.json").read_text())
    assert head["layers"][NAMES[1]] == {"k_scale": [0.02, 0.02], "v_scale": [0.03, 0.04]}


@pytest.mark.parametrize("granularity", ["per_tensor", "per_head"])
def test_written_files_match_schema(tmp_path, granularity: str) -> None:
    schema = load_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    data = json.loads(save_scales(make_scales(granularity), tmp_path / "s.json").read_text())
    jsonschema.Draft202012Validator(schema).validate(data)


def test_schema_rejects_bad_values() -> None:
    validator = jsonschema.Draft202012Validator(load_schema())
    data = make_scales("per_tensor").to_json_dict()
    data["layers"][NAMES[0]]["k_scale"] = -1.0
    assert not validator.is_valid(data)
    head = make_scales("per_head").to_json_dict()
    head["layers"][NAMES[0]]["k_scale"] = 0.5  # per_head needs a list
    assert not validator.is_valid(head)


def test_one_element_list_is_per_tensor() -> None:
    data = make_scales("per_tensor").to_json_dict()
    data["layers"][NAMES[0]] = {"k_scale": [0.5], "v_scale": 0.25}
    scales = parse_scales(data)
    assert scales.layers[NAMES[0]] == LayerScales(NAMES[0], (0.5,), (0.25,))


def test_save_refuses_invalid_and_writes_nothing(tmp_path) -> None:
    bad = make_scales("per_tensor")
    bad.layers[NAMES[1]] = LayerScales(NAMES[1], (0.0,), (0.1,))
    target = tmp_path / SIDECAR_FILENAME
    with pytest.raises(ScalesValidationError, match=rf"{SIDECAR_FILENAME}: layer '{NAMES[1]}': k_scale = 0.0 is not positive"):
        save_scales(bad, target)
    assert list(tmp_path.iterdir()) == []


def test_find_sidecar(tmp_path) -> None:
    assert find_sidecar(tmp_path) is None
    assert find_sidecar(None) is None
    assert find_sidecar("meta-llama/Llama-3.1-8B-Instruct") is None  # hub id, not a local dir
    save_scales(make_scales(), tmp_path / SIDECAR_FILENAME)
    assert find_sidecar(tmp_path) == tmp_path / SIDECAR_FILENAME
    assert find_sidecar(str(tmp_path)) == tmp_path / SIDECAR_FILENAME


def test_retarget_fp8_to_int8() -> None:
    scales = make_scales("per_head").retarget("int8")
    assert scales.kv_dtype is KVCacheDType.INT8
    assert scales.layers[NAMES[0]].k_scale[0] == pytest.approx(0.01 * 448 / 127)
    assert make_scales().retarget("fp8_e4m3") == make_scales()


def test_import_is_light() -> None:
    """scales/ itself pulls in neither torch, vLLM nor safetensors (the parent package may)."""
    code = (
        "import sys, vllm_kvquant; before = set(sys.modules); import vllm_kvquant.scales as s; "
        "print(sorted(m for m in ('torch', 'vllm', 'safetensors') if m in sys.modules and m not in before))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
