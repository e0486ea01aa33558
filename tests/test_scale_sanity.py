"""Scale sanity: scales below the 1e-8 floor or whose ``qmax * scale`` overflows the model dtype
are refused (by loading, ``vllm-kvquant validate`` and engine start-up) with a message naming the
file, the layer, K or V, the head and the value; scales far outside what calibration gives warn.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from vllm_kvquant.cli import main
from vllm_kvquant.scales import (
    DEFAULT_FLOOR,
    SIDECAR_FILENAME,
    ScalesError,
    ScalesValidationError,
    load_scales,
    validate_for_model,
)
from vllm_kvquant.scales.validate import (
    SCALE_FLOOR,
    UNUSUAL_AMAX_HIGH,
    UNUSUAL_AMAX_LOW,
    check_scale_values,
    normalize_model_dtype,
    unusual_scales,
    validate_scales,
)

HERE = Path(__file__).resolve().parent
L0, L1 = "model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"
MODEL = dict(num_layers=2, num_kv_heads=2, head_size=64, layer_names=[L0, L1])


def sidecar(kv_dtype: str = "fp8_e4m3", granularity: str = "per_head", **overrides: Any) -> dict[str, Any]:
    """A valid sidecar dict; ``overrides`` maps '<layer index>.<k|v>[.<head>]' to a value."""
    per_head = granularity == "per_head"
    layers = {
        name: {"k_scale": [0.01, 0.02] if per_head else 0.02, "v_scale": [0.03, 0.04] if per_head else 0.04}
        for name in (L0, L1)
    }
    for key, value in overrides.items():
        layer, which, *head = key.split(".")
        entry = layers[(L0, L1)[int(layer)]]
        field = f"{which}_scale"
        if head:
            entry[field][int(head[0])] = value
        else:
            entry[field] = value
    return {
        "format": "vllm-kvquant-scales", "format_version": 1, "kv_dtype": kv_dtype, "granularity": granularity,
        "model": {"num_layers": 2, "num_kv_heads": 2, "head_size": 64, "layer_names": [L0, L1]},
        "calibration": {"method": "absmax"},
        "layers": layers,
    }  # fmt: skip


def write(tmp_path: Path, data: dict[str, Any], name: str = SIDECAR_FILENAME) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


# ---------------------------------------------------------------- refused on load


REFUSED = [
    # (id, sidecar kwargs, layer at fault, regex after "<file>: layer '<layer>': ")
    ("1e-45-k-head1", {"1.k.1": 1e-45}, L1,
     r"k_scale\[1\] = 1e-45 is below the 1e-8 floor \(the K scale of KV head 1\): calibration never writes less"),
    ("1e38-v-head0", {"0.v.0": 1e38}, L0,
     r"v_scale\[0\] = 1e\+38 is too large \(the V scale of KV head 0\): qmax \* scale = 448 \(fp8_e4m3\) \* 1e\+38 = "
     r"4\.48e\+40 overflows the model dtype bfloat16 \(max 3\.39e\+38\), so dequantized values would be inf; the model "
     r"dtype is not known here, so it was checked against bfloat16"),
    ("1e38-int8", {"kv_dtype": "int8", "1.k.0": 1e38}, L1,
     r"k_scale\[0\] = 1e\+38 is too large \(the K scale of KV head 0\): qmax \* scale = 127 \(int8\) \* 1e\+38 = 1\.27e\+40"),
    ("just-below-floor", {"0.v.1": 9e-9}, L0, r"v_scale\[1\] = 9e-09 is below the 1e-8 floor \(the V scale of KV head 1\)"),
    ("per-tensor-tiny", {"granularity": "per_tensor", "0.k": 1e-45}, L0,
     r"k_scale = 1e-45 is below the 1e-8 floor \(the per-tensor K scale of every KV head\)"),
    ("per-tensor-huge", {"granularity": "per_tensor", "1.v": 1e38}, L1,
     r"v_scale = 1e\+38 is too large \(the per-tensor V scale of every KV head\)"),
]  # fmt: skip


@pytest.mark.parametrize("kwargs,layer,pattern", [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_load_refuses(tmp_path: Path, kwargs: dict, layer: str, pattern: str) -> None:
    path = write(tmp_path, sidecar(**kwargs))
    with pytest.raises(ScalesValidationError, match=re.escape(f"{path}: layer '{layer}': ") + pattern) as info:
        load_scales(path)
    assert info.value.file == str(path) and info.value.layer == layer


def test_floor_itself_passes_also_as_written_from_fp32(tmp_path: Path) -> None:
    assert SCALE_FLOOR == DEFAULT_FLOOR  # the formula's floor is the floor that is checked
    for value in (1e-8, 9.99999993922529e-09):  # float(torch.tensor(1e-8)): what calibration writes
        scales = load_scales(write(tmp_path, sidecar(**{"0.k.0": value})))
        assert scales.layers[L0].k_scale[0] == value


def test_retarget_keeps_floored_scales_at_the_floor(tmp_path: Path) -> None:
    scales = load_scales(write(tmp_path, sidecar("int8", **{"0.k.0": 1e-8})))
    fp8 = scales.retarget("fp8_e4m3")  # x 127/448 would take 1e-8 below the floor
    assert fp8.layers[L0].k_scale[0] == SCALE_FLOOR
    assert fp8.layers[L0].k_scale[1] == pytest.approx(0.02 * 127 / 448)
    validate_scales(fp8)


# ---------------------------------------------------------------- the model dtype


@pytest.mark.parametrize(
    "kv_dtype,ok,too_large",
    [("fp8_e4m3", 146.0, 147.0), ("int8", 515.0, 516.0)],  # 65504 / 448 = 146.2, 65504 / 127 = 515.8
)
def test_float16_overflow_bound(tmp_path: Path, kv_dtype: str, ok: float, too_large: float) -> None:
    fine = load_scales(write(tmp_path, sidecar(kv_dtype, **{"0.v.1": ok}), "ok.json"))
    validate_for_model(fine, **MODEL, model_dtype="float16")
    big = load_scales(write(tmp_path, sidecar(kv_dtype, **{"0.v.1": too_large})))  # fits bfloat16
    validate_for_model(big, **MODEL, model_dtype="bfloat16")
    with pytest.raises(ScalesValidationError) as info:
        validate_for_model(big, **MODEL, model_dtype="torch.float16")
    message = str(info.value)
    assert message.startswith(f"{tmp_path / SIDECAR_FILENAME}: layer '{L0}': v_scale[1] = {too_large!r} is too large")
    assert "(the V scale of KV head 1)" in message and "overflows the model dtype float16 (max 6.55e+04)" in message
    assert "not known" not in message  # the dtype was given


def test_normalize_model_dtype() -> None:
    torch = pytest.importorskip("torch")
    assert normalize_model_dtype(torch.float16) == normalize_model_dtype("half") == "float16"
    assert normalize_model_dtype(torch.bfloat16) == normalize_model_dtype("BF16") == "bfloat16"
    assert normalize_model_dtype(None) is None and normalize_model_dtype("auto") is None
    with pytest.raises(ScalesError, match=r"model dtype 'int8' is not supported \(use float16 or bfloat16\)"):
        normalize_model_dtype("int8")


def test_check_scale_values_on_a_loaded_file(tmp_path: Path) -> None:
    scales = load_scales(write(tmp_path, sidecar(granularity="per_tensor", **{"1.k": 200.0})))
    check_scale_values(scales)  # bfloat16
    with pytest.raises(ScalesValidationError, match=rf"layer '{L1}': k_scale = 200\.0 is too large \(the per-tensor K"):
        check_scale_values(scales, "float16")


# ---------------------------------------------------------------- warnings


def test_unusual_scales_warn_with_reason(tmp_path: Path, kvquant_caplog) -> None:
    # implied amax: 448 * 1e-7 = 4.5e-5 (< 1e-4), 448 * 50 = 22400 (> 1e4)
    path = write(tmp_path, sidecar(**{"0.k.1": 1e-7, "1.v.0": 50.0}))
    with kvquant_caplog.at_level(logging.WARNING, logger="vllm.kvquant"):
        load_scales(path)
    records = [r for r in kvquant_caplog.records if r.levelno == logging.WARNING]
    assert len(records) == 1
    message = records[0].getMessage()
    assert message.startswith(f"{path}: 2 scale(s) far outside what calibrating a real model gives")
    assert (
        f"layer '{L0}': k_scale[1] = 1e-07 (the K scale of KV head 1) implies |K| amax 448 * scale = 4.48e-05, "
        "below 0.0001: any |K| above 4.48e-05 saturates; expected only for a head whose K was all zeros" in message
    )
    assert (
        f"layer '{L1}': v_scale[0] = 50 (the V scale of KV head 0) implies |V| amax 448 * scale = 2.24e+04, "
        "above 10000: calibrated K/V amax stay below a few thousand" in message
    )


def test_ordinary_scales_do_not_warn(tmp_path: Path, kvquant_caplog) -> None:
    # the bounds themselves are ordinary: amax exactly 1e-4 and 1e4
    data = sidecar("int8", **{"0.k.0": UNUSUAL_AMAX_LOW / 127, "0.v.0": UNUSUAL_AMAX_HIGH / 127, "1.k.1": 1.0})
    with kvquant_caplog.at_level(logging.WARNING, logger="vllm.kvquant"):
        load_scales(write(tmp_path, data))
    assert kvquant_caplog.records == []
    assert unusual_scales(data) == []


# ---------------------------------------------------------------- vllm-kvquant validate


@pytest.mark.parametrize(
    "override,expected",
    [
        ({"1.k.1": 1e-45}, rf"layer '{L1}': k_scale\[1\] = 1e-45 is below the 1e-8 floor \(the K scale of KV head 1\)"),
        ({"0.v.0": 1e38}, rf"layer '{L0}': v_scale\[0\] = 1e\+38 is too large \(the V scale of KV head 0\).*bfloat16"),
    ],
    ids=["1e-45", "1e38"],
)
def test_cli_validate_refuses(tmp_path: Path, capsys, override: dict, expected: str) -> None:
    path = write(tmp_path, sidecar(**override))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert re.search("vllm-kvquant validate: error: " + re.escape(f"{path}: ") + expected, err), err


def _model_dir(tmp_path: Path, dtype: str) -> Path:
    model_dir = tmp_path / f"model-{dtype}"
    model_dir.mkdir()
    config = {"num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 256, "head_dim": 64,
              "num_hidden_layers": 2, "dtype": dtype}  # fmt: skip
    (model_dir / "config.json").write_text(json.dumps(config))
    return model_dir


def test_cli_validate_checks_the_model_dtype(tmp_path: Path, capsys) -> None:
    path = write(tmp_path, sidecar(**{"0.k.0": 200.0}))  # 448 * 200 = 89600: fits bf16, not fp16

    assert main(["validate", str(path)]) == 0
    out, err = capsys.readouterr()
    assert f"{path}: OK (2 layers, fp8_e4m3, per_head); qmax * scale fits bfloat16 (model dtype unknown: assumed bfloat16" in out
    assert "1 warning(s) above" in out
    assert f"vllm-kvquant validate: warning: {path}: layer '{L0}': k_scale[0] = 200 (the K scale of KV head 0)" in err

    assert main(["validate", str(path), "--model-dir", str(_model_dir(tmp_path, "bfloat16"))]) == 0
    assert "fits bfloat16 (from config.json)" in capsys.readouterr().out

    assert main(["validate", str(path), "--model-dir", str(_model_dir(tmp_path, "float16"))]) == 2
    err = capsys.readouterr().err
    assert f"{path}: layer '{L0}': k_scale[0] = 200.0 is too large (the K scale of KV head 0)" in err
    assert "overflows the model dtype float16" in err

    assert main(["validate", str(path), "--model-dtype", "float16"]) == 2
    assert "overflows the model dtype float16" in capsys.readouterr().err

    assert main(["validate", str(path), "--model-dir", str(_model_dir(tmp_path, "float32"))]) == 0
    assert "config.json says float32, which vLLM runs as bfloat16" in capsys.readouterr().out


def test_cli_validate_clean_file_has_no_warnings(tmp_path: Path, capsys) -> None:
    path = write(tmp_path, sidecar())
    assert main(["validate", str(tmp_path), "--model-dtype", "float16"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == f"{path}: OK (2 layers, fp8_e4m3, per_head); qmax * scale fits float16 (--model-dtype)"
    assert "warning" not in err


# ---------------------------------------------------------------- engine start-up


def _startup_config(model_dir: Path, layers: dict):
    from types import SimpleNamespace

    from vllm_kvquant.layer_scales import _cache

    _cache.clear()
    return SimpleNamespace(
        model_config=SimpleNamespace(model=str(model_dir), get_total_num_kv_heads=lambda: 2, get_head_size=lambda: 64),
        compilation_config=SimpleNamespace(static_forward_context=layers, cudagraph_mode=SimpleNamespace(name="NONE")),
        additional_config={},
    )


@pytest.mark.parametrize("override,expected", [({"1.k.1": 1e-45}, "k_scale[1] = 1e-45 is below the 1e-8 floor"),
                                               ({"0.v.0": 1e38}, "v_scale[0] = 1e+38 is too large")], ids=["1e-45", "1e38"])
def test_startup_path_refuses(tmp_path: Path, override: dict, expected: str) -> None:
    """What the backend runs when vLLM builds its metadata (fake layers, real sidecar lookup)."""
    pytest.importorskip("vllm")
    from vllm_kvquant.backend import KVQuantAttentionBackend
    from vllm_kvquant.layer_scales import attach_layer_scales

    class FakeAttention:
        kv_sharing_target_layer_name = None

        def __init__(self, name: str) -> None:
            self.layer_name = name

        def get_attn_backend(self):
            return KVQuantAttentionBackend

    path = write(tmp_path, sidecar(**override))
    layers = {n: FakeAttention(n) for n in (L0, L1)}
    with pytest.raises(ScalesValidationError) as info:
        attach_layer_scales(_startup_config(tmp_path, layers), [L0, L1], "cpu")
    assert str(info.value).startswith(f"{path}: layer '") and expected in str(info.value)


def test_engine_refuses_to_start(tmp_path: Path) -> None:
    """A real vLLM CPU engine with kvquant and a sidecar holding 1e38 / 1e-45 does not start."""
    pytest.importorskip("vllm")
    from vllm_kvquant.tiny_model import TinyLlamaSpec, make_tiny_llama

    model_dir = make_tiny_llama(tmp_path / "tiny", TinyLlamaSpec())
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    for override, expected in (({"0.v.0": 1e38}, "v_scale[0] = 1e+38 is too large (the V scale of KV head 0)"),
                               ({"1.k.1": 1e-45}, "k_scale[1] = 1e-45 is below the 1e-8 floor (the K scale of KV head 1)")):
        path = write(tmp_path, sidecar(**override), "bad.json")
        engine = dict(model=str(model_dir), attention_backend="kvquant", dtype="bfloat16", max_model_len=256,
                      enforce_eager=True, additional_config={"kvquant": {"scales": str(path)}})  # fmt: skip
        spec = {"engine": engine, "rounds": [["hello"]], "max_tokens": 2}
        proc = subprocess.run(
            [sys.executable, str(HERE / "engine_runner.py"), json.dumps(spec), str(tmp_path / "out.json")],
            capture_output=True, text=True, timeout=900, env=env,
        )  # fmt: skip
        output = proc.stdout + proc.stderr
        assert proc.returncode != 0, output[-3000:]
        assert f"{path}: layer '" in output and expected in output, output[-6000:]
