"""Conversion from compressed-tensors safetensors, vLLM kv_cache_scales.json and LightLLM calib JSON."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from vllm_kvquant.scales import (
    SIDECAR_FILENAME,
    Granularity,
    KVCacheDType,
    ScalesError,
    convert_to_sidecar,
    detect_format,
    load_scales,
    save_scales,
)
from vllm_kvquant.scales.convert import from_compressed_tensors, from_lightllm, from_vllm_json

HEADS = 2
NAMES = [f"model.layers.{i}.self_attn.attn" for i in range(2)]


def write_config(model_dir: Path, **extra) -> Path:
    model_dir.mkdir(parents=True, exist_ok=True)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": HEADS, "hidden_size": 256, **extra}
    (model_dir / "config.json").write_text(json.dumps(cfg))
    return model_dir


def ct_tensors(shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    tensors = {"model.embed_tokens.weight": torch.zeros(4, 4), "model.layers.0.self_attn.k_proj.weight_scale": torch.ones(1)}
    for i in range(2):
        n = 1 if shape in ((), (1,)) else HEADS
        base = torch.arange(1, n + 1, dtype=torch.float32) * (i + 1)
        tensors[f"model.layers.{i}.self_attn.k_scale"] = (base * 0.01).reshape(shape).to(torch.bfloat16 if i else torch.float32)
        tensors[f"model.layers.{i}.self_attn.v_scale"] = (base * 0.02).reshape(shape)
    return tensors


@pytest.mark.parametrize("shape", [(), (1,)])
def test_compressed_tensors_per_tensor(tmp_path, shape) -> None:
    model = write_config(tmp_path / "m")
    save_file(ct_tensors(shape), str(model / "model.safetensors"))
    scales = from_compressed_tensors(model)
    assert scales.granularity is Granularity.PER_TENSOR and scales.kv_dtype is KVCacheDType.FP8_E4M3
    assert list(scales.layers) == NAMES
    assert scales.layers[NAMES[0]].k_scale == pytest.approx((0.01,))
    assert scales.layers[NAMES[1]].v_scale == pytest.approx((0.04,))
    assert (scales.model.num_kv_heads, scales.model.head_size) == (HEADS, 64)
    assert scales.calibration.tool == "convert:compressed-tensors"


@pytest.mark.parametrize("shape", [(HEADS,), (HEADS, 1)])
def test_compressed_tensors_per_head(tmp_path, shape) -> None:
    model = write_config(tmp_path / "m", head_dim=128)
    save_file(ct_tensors(shape), str(model / "model.safetensors"))
    scales = from_compressed_tensors(model)
    assert scales.granularity is Granularity.PER_HEAD and scales.model.head_size == 128
    assert scales.layers[NAMES[0]].k_scale == pytest.approx((0.01, 0.02))
    assert scales.layers[NAMES[1]].v_scale == pytest.approx((0.04, 0.08))


@pytest.mark.parametrize("shape", [(HEADS, 16), (HEADS * 16,)])
def test_compressed_tensors_per_channel_and_mixed(tmp_path, shape) -> None:
    """Channel-wise K scales beside per-head V scales: per_channel, each head's V repeated over its channels."""
    model = write_config(tmp_path / "m", head_dim=16)
    tensors = {}
    for i in range(2):
        tensors[f"model.layers.{i}.self_attn.k_scale"] = (torch.arange(1, HEADS * 16 + 1) * 0.001 * (i + 1)).reshape(shape)
        tensors[f"model.layers.{i}.self_attn.v_scale"] = torch.tensor([0.02, 0.03]) if i else torch.tensor(0.05)
    save_file(tensors, str(model / "model.safetensors"))
    scales = from_compressed_tensors(model)
    assert scales.granularity is Granularity.PER_CHANNEL and scales.layers[NAMES[0]].channels == 16
    assert scales.layers[NAMES[1]].k_scale[17] == pytest.approx(0.036)
    assert scales.layers[NAMES[1]].v_scale == pytest.approx((0.02,) * 16 + (0.03,) * 16)
    assert scales.layers[NAMES[0]].v_scale == pytest.approx((0.05,) * 32)
    convert_to_sidecar(model, model / SIDECAR_FILENAME, source_format=None, kv_dtype="int8", model_dir=None)
    loaded = load_scales(model / SIDECAR_FILENAME)
    assert loaded.granularity is Granularity.PER_CHANNEL and loaded.layers[NAMES[1]].k_scale[17] == pytest.approx(0.036 * 448 / 127)


def test_compressed_tensors_sharded_index_and_int8(tmp_path) -> None:
    model = write_config(tmp_path / "m")
    tensors = ct_tensors((1,))
    part1 = {k: v for k, v in tensors.items() if ".1." not in k}
    part2 = {k: v for k, v in tensors.items() if ".1." in k}
    save_file(part1, str(model / "model-00001-of-00002.safetensors"))
    save_file(part2, str(model / "model-00002-of-00002.safetensors"))
    weight_map = {k: "model-00001-of-00002.safetensors" for k in part1} | {k: "model-00002-of-00002.safetensors" for k in part2}
    (model / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert detect_format(model) == "compressed-tensors"
    scales = from_compressed_tensors(model, kv_dtype="int8")
    assert scales.kv_dtype is KVCacheDType.INT8
    assert scales.layers[NAMES[1]].k_scale == pytest.approx((0.02 * 448 / 127,), rel=1e-2)  # bf16 storage
    assert scales.layers[NAMES[0]].v_scale == pytest.approx((0.02 * 448 / 127,))


def test_compressed_tensors_other_names_and_int_scheme(tmp_path) -> None:
    model = write_config(tmp_path / "m", quantization_config={"kv_cache_scheme": {"num_bits": 8, "type": "int"}})
    tensors = {f"model.layers.{i}.self_attn.{kv}_proj.{kind}": torch.tensor(0.5)
               for i in range(2) for kv, kind in (("k", "k_scale"), ("v", "output_scale"))}
    save_file(tensors, str(model / "model.safetensors"))
    scales = from_compressed_tensors(model / "model.safetensors")
    assert scales.kv_dtype is KVCacheDType.INT8 and list(scales.layers) == NAMES


def test_compressed_tensors_errors(tmp_path) -> None:
    model = write_config(tmp_path / "m")
    tensors = ct_tensors(())
    del tensors["model.layers.1.self_attn.v_scale"]
    save_file(tensors, str(model / "model.safetensors"))
    with pytest.raises(ScalesError, match=r"layer 'model.layers.1.self_attn.attn' has a k_scale but no v_scale"):
        from_compressed_tensors(model)
    save_file({"model.layers.0.self_attn.k_scale": torch.ones(3), "model.layers.0.self_attn.v_scale": torch.ones(3)}, str(model / "model.safetensors"))
    with pytest.raises(ScalesError, match=r"model.safetensors: tensor 'model.layers.0.self_attn.k_scale' has 3 values.*"
                                          r"expected 1 \(per-tensor\), 2 \(per-head.* or 2 x 64 = 128 \(per-channel\)"):
        from_compressed_tensors(model)
    save_file({"w": torch.ones(1)}, str(model / "model.safetensors"))
    with pytest.raises(ScalesError, match="no k_scale/v_scale tensors"):
        from_compressed_tensors(model)


def vllm_json(path: Path, ranks: dict[str, dict[str, float]], dtype: str = "float8_e4m3fn") -> Path:
    path.write_text(json.dumps({"model_type": "llama", "kv_cache": {"dtype": dtype, "scaling_factor": ranks}}))
    return path


def test_vllm_json(tmp_path, kvquant_caplog) -> None:
    model = write_config(tmp_path / "m")
    src = vllm_json(model / "kv_cache_scales.json", {"0": {"0": 0.5, "1": 0.6}})
    assert detect_format(src) == "vllm-json"
    scales = from_vllm_json(src, model_dir=model)
    assert scales.granularity is Granularity.PER_TENSOR
    assert [(ls.k_scale, ls.v_scale) for ls in scales.layers.values()] == [((0.5,), (0.5,)), ((0.6,), (0.6,))]
    same = from_vllm_json(vllm_json(tmp_path / "two.json", {"0": {"0": 0.5, "1": 0.6}, "1": {"0": 0.5, "1": 0.6}}), model_dir=model)
    assert same.layers == scales.layers
    with kvquant_caplog.at_level(logging.WARNING, logger="vllm.kvquant"):
        diff = from_vllm_json(vllm_json(tmp_path / "d.json", {"0": {"0": 0.5, "1": 0.6}, "1": {"0": 0.7, "1": 0.1}}), model_dir=model)
    assert diff.layers[NAMES[0]].k_scale == (0.7,) and diff.layers[NAMES[1]].k_scale == (0.6,)
    assert "different scales for different TP ranks" in kvquant_caplog.text
    custom = from_vllm_json(src, model_dir=model, layer_name_template="model.language_model.layers.{i}.self_attn.attn")
    assert list(custom.layers)[0] == "model.language_model.layers.0.self_attn.attn"


def test_vllm_json_errors(tmp_path) -> None:
    model = write_config(tmp_path / "m")
    with pytest.raises(ScalesError, match=r"bad\.json: kv_cache.dtype = 'int8' is not supported"):
        from_vllm_json(vllm_json(tmp_path / "bad.json", {"0": {"0": 0.5, "1": 0.6}}, dtype="int8"), model_dir=model)
    with pytest.raises(ScalesError, match=r"TP rank 0 has scales .* \(missing: \[1\]"):
        from_vllm_json(vllm_json(tmp_path / "few.json", {"0": {"0": 0.5}}), model_dir=model)
    with pytest.raises(ScalesError, match=r"neg\.json: layer 'model.layers.1.self_attn.attn': scaling_factor\['0'\]\['1'\] = -0.6 is not positive"):
        from_vllm_json(vllm_json(tmp_path / "neg.json", {"0": {"0": 0.5, "1": -0.6}}), model_dir=model)


def lightllm_json(path: Path, per_head: bool) -> Path:
    if per_head:
        rows = [[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]]
    else:
        rows = [[0.1, 0.2], [0.3, 0.4]]
    path.write_text(json.dumps({
        "version": "1.0", "architectures": "LlamaForCausalLM", "quant_type": "per_head" if per_head else "per_tensor",
        "qmin": -448.0, "qmax": 448.0, "num_layers": 2, "num_head": HEADS,
        "scales_shape": [2, len(rows[0])], "scales": rows,
    }))
    return path


def test_lightllm_per_tensor(tmp_path) -> None:
    model = write_config(tmp_path / "m")
    src = lightllm_json(tmp_path / "kv_cache_calib.json", per_head=False)
    assert detect_format(src) == "lightllm"
    scales = from_lightllm(src, model_dir=model)
    assert scales.granularity is Granularity.PER_TENSOR
    assert scales.layers[NAMES[1]].k_scale == (0.3,) and scales.layers[NAMES[1]].v_scale == (0.4,)
    int8 = from_lightllm(src, model_dir=model, kv_dtype="int8")
    assert int8.layers[NAMES[0]].k_scale == pytest.approx((0.1 * 448 / 127,))


def test_lightllm_per_head(tmp_path) -> None:
    model = write_config(tmp_path / "m")
    scales = from_lightllm(lightllm_json(tmp_path / "c.json", per_head=True), model_dir=model)
    assert scales.granularity is Granularity.PER_HEAD
    assert scales.layers[NAMES[0]].k_scale == (0.1, 0.2) and scales.layers[NAMES[0]].v_scale == (0.3, 0.4)
    assert scales.layers[NAMES[1]].v_scale == (0.7, 0.8)


def test_lightllm_mismatch(tmp_path) -> None:
    model = write_config(tmp_path / "m", num_key_value_heads=4)
    with pytest.raises(ScalesError, match=r"c\.json: num_head = 2 but .*config.json has 4 KV heads"):
        from_lightllm(lightllm_json(tmp_path / "c.json", per_head=True), model_dir=model)


@pytest.mark.parametrize("kind", ["compressed-tensors", "vllm-json", "lightllm", "kvquant"])
def test_convert_to_sidecar(tmp_path, kind: str) -> None:
    model = write_config(tmp_path / "m")
    if kind == "compressed-tensors":
        save_file(ct_tensors((HEADS,)), str(model / "model.safetensors"))
        src = model
    elif kind == "vllm-json":
        src = vllm_json(tmp_path / "kv_cache_scales.json", {"0": {"0": 0.5, "1": 0.6}})
    elif kind == "lightllm":
        src = lightllm_json(tmp_path / "kv_cache_calib.json", per_head=True)
    else:
        src = tmp_path / "old.json"
        save_scales(from_lightllm(lightllm_json(tmp_path / "c.json", per_head=False), model_dir=model), src)
    assert detect_format(src) == kind
    out = model / SIDECAR_FILENAME
    # model_dir=None: config.json is found next to the output
    result = convert_to_sidecar(src, out, source_format=None, kv_dtype="int8", model_dir=None)
    loaded = load_scales(out)
    assert loaded.layers == result.layers and loaded.kv_dtype is KVCacheDType.INT8
    assert result.source_path == str(out)
    assert list(loaded.layers) == NAMES


def test_convert_needs_config_and_known_format(tmp_path) -> None:
    src = vllm_json(tmp_path / "kv.json", {"0": {"0": 0.5, "1": 0.6}})
    with pytest.raises(ScalesError, match=r"needs the model's config.json"):
        convert_to_sidecar(src, tmp_path / "out" / SIDECAR_FILENAME, source_format=None, kv_dtype=None, model_dir=None)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"hello": 1}))
    with pytest.raises(ScalesError, match=r"other\.json: unrecognised scales format \(top-level keys: \['hello'\]\)"):
        detect_format(other)
    with pytest.raises(ScalesError, match="source format 'gguf' is not supported"):
        convert_to_sidecar(src, tmp_path / "o.json", source_format="gguf", kv_dtype=None, model_dir=None)
