"""vLLM's former ``kv_cache_scales.json`` (``--quantization-param-path``, ``QuantParamSchema``).

Schema: ``{"model_type": str|null, "kv_cache": {"dtype": "float8_e4m3fn",
"scaling_factor": {"<tp_rank>": {"<layer_index>": float}}}}`` - one per-tensor scale per layer,
used for both K and V, with the same meaning as ours (x ~= x_fp8 * scale). Ranks normally agree;
if they differ the max across ranks is taken (never clips) and a warning is logged.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..errors import ScalesError
from ..format import DEFAULT_LAYER_TEMPLATE, Granularity, KVCacheDType, LayerScales, ScalesFile
from ..io import read_json
from ..validate import check_scale
from .model_config import read_config

logger = logging.getLogger("vllm.kvquant")


def _int_key(path: Path, what: str, key: Any) -> int:
    try:
        return int(key)
    except (TypeError, ValueError):
        raise ScalesError(f"{path}: {what} key {key!r} is not an integer") from None


def from_vllm_json(path: str | Path, *, model_dir: str | Path, kv_dtype: KVCacheDType | str | None = None,
                   layer_name_template: str = DEFAULT_LAYER_TEMPLATE) -> ScalesFile:  # fmt: skip
    """Convert a vLLM ``kv_cache_scales.json``; ``model_dir`` supplies config.json (heads, head size)."""
    path = Path(path)
    data = read_json(path)
    kv_cache = data.get("kv_cache") if isinstance(data, dict) else None
    if not isinstance(kv_cache, dict) or not isinstance(kv_cache.get("scaling_factor"), dict):
        raise ScalesError(f"{path}: not a vLLM kv_cache_scales.json (needs kv_cache.scaling_factor)")
    if kv_cache.get("dtype") != "float8_e4m3fn":
        raise ScalesError(f"{path}: kv_cache.dtype = {kv_cache.get('dtype')!r} is not supported (expected 'float8_e4m3fn')")
    config = read_config(model_dir)
    if data.get("model_type") and config.model_type and data["model_type"] != config.model_type:
        raise ScalesError(
            f"{path}: model_type = {data['model_type']!r} but {config.path} says {config.model_type!r}"
        )
    ranks: dict[int, dict[int, float]] = {}
    for rank_key, layer_map in kv_cache["scaling_factor"].items():
        rank = _int_key(path, "TP rank", rank_key)
        if not isinstance(layer_map, dict):
            raise ScalesError(f"{path}: scaling_factor[{rank_key!r}] = {layer_map!r} must map layer index -> scale")
        ranks[rank] = {}
        for layer_key, value in layer_map.items():
            index = _int_key(path, f"scaling_factor[{rank_key!r}] layer", layer_key)
            name = layer_name_template.format(i=index)
            ranks[rank][index] = check_scale(str(path), name, f"scaling_factor[{rank_key!r}][{layer_key!r}]", value)
    if not ranks:
        raise ScalesError(f"{path}: scaling_factor is empty")
    expected = set(range(config.num_layers))
    for rank, layer_map in sorted(ranks.items()):
        if set(layer_map) != expected:
            missing = sorted(expected - set(layer_map))
            extra = sorted(set(layer_map) - expected)
            raise ScalesError(
                f"{path}: TP rank {rank} has scales for layers {sorted(layer_map)[:3]}...; {config.path} has "
                f"{config.num_layers} layers (missing: {missing[:5]}, unknown: {extra[:5]})"
            )
    first = ranks[min(ranks)]
    combined = {i: max(r[i] for r in ranks.values()) for i in sorted(expected)}
    if any(r != first for r in ranks.values()):
        logger.warning(
            "vllm-kvquant: %s holds different scales for different TP ranks %s; using the max across ranks "
            "per layer (a per-tensor scale must be the same on every rank).", path, sorted(ranks),
        )
    names = [layer_name_template.format(i=i) for i in sorted(expected)]
    layers = {n: LayerScales(n, (combined[i],), (combined[i],)) for i, n in zip(sorted(expected), names)}
    return config.converted(KVCacheDType.FP8_E4M3, Granularity.PER_TENSOR, layers, "vllm-kv-cache-scales", path, kv_dtype)
