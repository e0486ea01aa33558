"""LightLLM's static FP8 KV calibration file (``kv_cache_calib.json``, ``--kv_quant_calibration_config_path``).

Schema as LightLLM exports it: ``{"version": "1.0", "architectures": str, "quant_type":
"per_head"|"per_tensor", "qmin": float, "qmax": float, "num_layers": int, "num_head": int,
"scales_shape": [num_layers, 2] or [num_layers, 2 * num_head], "scales": [[k..., v...], ...]}``.
Each row holds the K scales then the V scales of one layer; ``num_head`` is the model's total
KV head count; scales are ``amax / qmax`` (same meaning as ours). ``fp8_per_head`` /
``fp8_per_tensor`` spellings of ``quant_type`` are accepted too. When the requested dtype has a
different qmax than the file, scales are rescaled by ``qmax_file / qmax_target``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from ..errors import ScalesError
from ..format import DEFAULT_LAYER_TEMPLATE, Granularity, KVCacheDType, LayerScales, ScalesFile
from ..io import read_json
from ..validate import check_scale
from .model_config import read_config

logger = logging.getLogger("vllm.kvquant")

_QUANT_TYPES = {
    "per_head": Granularity.PER_HEAD,
    "fp8_per_head": Granularity.PER_HEAD,
    "per_tensor": Granularity.PER_TENSOR,
    "fp8_per_tensor": Granularity.PER_TENSOR,
}


def _rows(path: Path, data: dict[str, Any], num_layers: int, width: int) -> list[list[Any]]:
    scales = data.get("scales")
    if not isinstance(scales, list):
        raise ScalesError(f"{path}: scales = {scales!r:.60} must be a list")
    if scales and not isinstance(scales[0], list):  # flat list: reshape with scales_shape
        if len(scales) != num_layers * width:
            raise ScalesError(f"{path}: flat scales has {len(scales)} values, expected {num_layers} x {width}")
        return [scales[i * width : (i + 1) * width] for i in range(num_layers)]
    if len(scales) != num_layers:
        raise ScalesError(f"{path}: scales has {len(scales)} rows but num_layers = {num_layers}")
    for i, row in enumerate(scales):
        if not isinstance(row, list) or len(row) != width:
            raise ScalesError(f"{path}: scales[{i}] = {row!r:.60} must hold {width} values (K then V)")
    return scales


def from_lightllm(path: str | Path, *, model_dir: str | Path, kv_dtype: KVCacheDType | str | None = None,
                  layer_name_template: str = DEFAULT_LAYER_TEMPLATE) -> ScalesFile:  # fmt: skip
    """Convert a LightLLM ``kv_cache_calib.json``; ``model_dir`` supplies config.json (head size)."""
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, dict) or "scales" not in data or "quant_type" not in data:
        raise ScalesError(f"{path}: not a LightLLM kv cache calibration file (needs quant_type and scales)")
    granularity = _QUANT_TYPES.get(data["quant_type"])
    if granularity is None:
        raise ScalesError(f"{path}: quant_type = {data['quant_type']!r} is not supported (use {sorted(_QUANT_TYPES)})")
    config = read_config(model_dir)
    num_layers, num_head = data.get("num_layers"), data.get("num_head")
    if num_layers != config.num_layers:
        raise ScalesError(f"{path}: num_layers = {num_layers!r} but {config.path} has {config.num_layers} layers")
    if num_head != config.num_kv_heads:
        raise ScalesError(f"{path}: num_head = {num_head!r} but {config.path} has {config.num_kv_heads} KV heads")
    if data.get("architectures") and config.architecture and data["architectures"] != config.architecture:
        logger.warning("vllm-kvquant: %s was made for %s but %s is %s", path, data["architectures"], config.path, config.architecture)
    width = 2 if granularity is Granularity.PER_TENSOR else 2 * num_head
    shape = data.get("scales_shape")
    if shape is not None and list(shape) != [num_layers, width]:
        raise ScalesError(f"{path}: scales_shape = {shape!r}, expected {[num_layers, width]} for {data['quant_type']}")
    file_qmax = data.get("qmax", 448.0)
    if not isinstance(file_qmax, (int, float)) or isinstance(file_qmax, bool) or not math.isfinite(file_qmax) or file_qmax <= 0:
        raise ScalesError(f"{path}: qmax = {file_qmax!r} must be a positive number")
    target = KVCacheDType(kv_dtype) if kv_dtype is not None else KVCacheDType.FP8_E4M3
    factor = float(file_qmax) / target.qmax
    names = [layer_name_template.format(i=i) for i in range(num_layers)]
    layers = {}
    for i, (name, row) in enumerate(zip(names, _rows(path, data, num_layers, width))):
        values = [check_scale(str(path), name, f"scales[{i}][{j}]", v) * factor for j, v in enumerate(row)]
        half = width // 2
        layers[name] = LayerScales(name, tuple(values[:half]), tuple(values[half:]))
    return config.converted(target, granularity, layers, "lightllm", path)
