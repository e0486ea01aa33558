"""Checks of a sidecar, on load and on save, and against the model that is about to run.

Every error names the file, the layer (where there is one) and the offending value, so a
broken sidecar can be fixed without reading the loader.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .errors import ScalesMismatchError, ScalesValidationError
from .format import FORMAT_NAME, FORMAT_VERSION, Granularity, KVCacheDType

if TYPE_CHECKING:  # pragma: no cover
    from .format import ScalesFile

_SCALE_RULE = "(scales must be finite and > 0)"
_TOP_REQUIRED = ("format", "format_version", "kv_dtype", "granularity", "model", "calibration", "layers")
_MODEL_INTS = ("num_layers", "num_kv_heads", "head_size")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_scale(file: str | None, layer: str, field: str, value: Any) -> float:
    """One scale: a real number, finite and strictly positive."""
    if not _is_number(value):
        kind = "a bool" if isinstance(value, bool) else f"a {type(value).__name__}"
        raise ScalesValidationError(file, layer, field, value, f"is {kind}, not a number {_SCALE_RULE}")
    number = float(value)
    if not math.isfinite(number):
        raise ScalesValidationError(file, layer, field, number, f"is not finite {_SCALE_RULE}")
    if number <= 0.0:
        raise ScalesValidationError(file, layer, field, number, f"is not positive {_SCALE_RULE}")
    return number


def _check_layer_values(file: str | None, layer: str, field: str, value: Any, granularity: Granularity, num_kv_heads: int) -> None:
    if isinstance(value, list):
        if granularity is Granularity.PER_TENSOR and len(value) != 1:
            raise ScalesValidationError(
                file, layer, field, value,
                f"has {len(value)} values; granularity per_tensor needs one number (or a 1-element list)",
            )
        if granularity is Granularity.PER_HEAD and len(value) != num_kv_heads:
            raise ScalesValidationError(
                file, layer, field, value,
                f"has {len(value)} values; granularity per_head needs one per KV head "
                f"(model.num_kv_heads = {num_kv_heads})",
            )
        for i, item in enumerate(value):
            check_scale(file, layer, f"{field}[{i}]", item)
        return
    if granularity is Granularity.PER_HEAD:
        raise ScalesValidationError(
            file, layer, field, value,
            f"is not a list; granularity per_head needs a list of {num_kv_heads} scales (one per KV head)",
        )
    check_scale(file, layer, field, value)


def _check_header(data: Any, file: str | None) -> None:
    if not isinstance(data, dict):
        raise ScalesValidationError(
            file, reason=f"the top level must be a JSON object, got a {type(data).__name__} ({_json_kind(data)})"
        )
    if "format" in data and data["format"] != FORMAT_NAME:
        raise ScalesValidationError(
            file, None, "format", data["format"], f"is not a kvquant sidecar (expected {FORMAT_NAME!r}); "
            "other formats can be converted with 'vllm-kvquant convert'",
        )
    for key in _TOP_REQUIRED:
        if key not in data:
            raise ScalesValidationError(file, None, key, reason="is missing (required top-level field)")
    version = data["format_version"]
    if not _is_int(version) or version != FORMAT_VERSION:
        hint = "; upgrade vllm-kvquant" if _is_int(version) and version > FORMAT_VERSION else ""
        raise ScalesValidationError(
            file, None, "format_version", version,
            f"is not supported (this vllm-kvquant reads format_version {FORMAT_VERSION}{hint})",
        )
    if data["kv_dtype"] not in [d.value for d in KVCacheDType]:
        raise ScalesValidationError(
            file, None, "kv_dtype", data["kv_dtype"],
            f"is not supported (use one of {[d.value for d in KVCacheDType]})",
        )
    if data["granularity"] not in [g.value for g in Granularity]:
        raise ScalesValidationError(
            file, None, "granularity", data["granularity"],
            f"is unknown (use one of {[g.value for g in Granularity]})",
        )


def _json_kind(data: Any) -> str:
    return {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}.get(
        type(data), type(data).__name__
    )


def _check_model(model: Any, file: str | None) -> None:
    if not isinstance(model, dict):
        raise ScalesValidationError(file, None, "model", model, "must be an object")
    for key in (*_MODEL_INTS, "layer_names"):
        if key not in model:
            raise ScalesValidationError(file, None, f"model.{key}", reason="is missing (required)")
    for key in _MODEL_INTS:
        if not _is_int(model[key]) or model[key] <= 0:
            raise ScalesValidationError(file, None, f"model.{key}", model[key], "must be a positive integer")
    names = model["layer_names"]
    if not isinstance(names, list):
        raise ScalesValidationError(file, None, "model.layer_names", names, "must be a list of layer names")
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name:
            raise ScalesValidationError(file, None, f"model.layer_names[{i}]", name, "must be a non-empty string")
        if name in seen:
            raise ScalesValidationError(
                file, name, f"model.layer_names[{i}]", name,
                f"duplicates model.layer_names[{seen[name]}] (layer names must be unique)",
            )
        seen[name] = i
    if len(names) != model["num_layers"]:
        raise ScalesValidationError(
            file, None, "model.layer_names", names,
            f"has {len(names)} names but model.num_layers = {model['num_layers']}",
        )


def _check_calibration(calib: Any, file: str | None) -> None:
    if not isinstance(calib, dict):
        raise ScalesValidationError(file, None, "calibration", calib, "must be an object")
    if not isinstance(calib.get("method"), str) or not calib["method"]:
        raise ScalesValidationError(
            file, None, "calibration.method", calib.get("method"), "must be a non-empty string (e.g. 'absmax')"
        )
    for key in ("tool", "tool_version", "data", "created"):
        if calib.get(key) is not None and not isinstance(calib[key], str):
            raise ScalesValidationError(file, None, f"calibration.{key}", calib[key], "must be a string or null")
    tokens = calib.get("num_tokens")
    if tokens is not None and (not _is_int(tokens) or tokens < 0):
        raise ScalesValidationError(file, None, "calibration.num_tokens", tokens, "must be a non-negative integer or null")
    margin = calib.get("margin")
    if margin is not None and (not _is_number(margin) or not math.isfinite(margin) or margin <= 0):
        raise ScalesValidationError(file, None, "calibration.margin", margin, "must be a positive number or null")
    pct = calib.get("percentile")
    if pct is not None and (not _is_number(pct) or not 0 < pct <= 100):
        raise ScalesValidationError(file, None, "calibration.percentile", pct, "must be in (0, 100] or null")


def _check_layers(data: dict[str, Any], file: str | None) -> None:
    layers = data["layers"]
    if not isinstance(layers, dict):
        raise ScalesValidationError(file, None, "layers", layers, "must be an object keyed by layer name")
    names = data["model"]["layer_names"]
    known = set(names)
    granularity = Granularity(data["granularity"])
    num_kv_heads = data["model"]["num_kv_heads"]
    for name, entry in layers.items():
        if name not in known:
            raise ScalesValidationError(
                file, name, reason=f"is not listed in model.layer_names (unknown layer; known: {_preview(names)})"
            )
        if not isinstance(entry, dict):
            raise ScalesValidationError(file, name, "entry", entry, "must be an object with k_scale and v_scale")
        extra = sorted(set(entry) - {"k_scale", "v_scale"})
        if extra:
            raise ScalesValidationError(file, name, "keys", extra, "are not allowed (only k_scale and v_scale)")
        for field in ("k_scale", "v_scale"):
            if field not in entry:
                raise ScalesValidationError(file, name, field, reason="is missing (required)")
            _check_layer_values(file, name, field, entry[field], granularity, num_kv_heads)
    for name in names:
        if name not in layers:
            raise ScalesValidationError(
                file, name, reason="is listed in model.layer_names but has no entry in 'layers' (missing scales)"
            )


def _preview(names: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(repr(n) for n in list(names)[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def validate_json_dict(data: Any, file: str | None = None) -> None:
    """Raise :class:`ScalesValidationError` at the first problem of a parsed sidecar."""
    _check_header(data, file)
    _check_model(data["model"], file)
    _check_calibration(data["calibration"], file)
    _check_layers(data, file)


def validate_for_model(
    scales: "ScalesFile",
    *,
    num_layers: int,
    num_kv_heads: int,
    head_size: int,
    layer_names: Sequence[str],
    kv_dtype: KVCacheDType | str | None = None,
) -> None:
    """Check a loaded sidecar against the running model; one error lists every mismatch."""
    facts = scales.model
    problems: list[str] = []
    if facts.num_kv_heads != num_kv_heads:
        problems.append(
            f"model.num_kv_heads = {facts.num_kv_heads}: the sidecar was made for {facts.num_kv_heads} KV heads, "
            f"the model has {num_kv_heads}"
        )
    if facts.head_size != head_size:
        problems.append(
            f"model.head_size = {facts.head_size}: the sidecar was made for head size {facts.head_size}, "
            f"the model has {head_size}"
        )
    if facts.num_layers != num_layers:
        problems.append(
            f"model.num_layers = {facts.num_layers}: the sidecar was made for {facts.num_layers} attention layers, "
            f"the model has {num_layers}"
        )
    missing = [n for n in layer_names if n not in scales.layers]
    for name in missing[:5]:
        problems.append(f"layer '{name}' of the model has no scales in file {scales.source_path or '<in-memory scales>'}")
    if len(missing) > 5:
        problems.append(f"... and {len(missing) - 5} more layers of the model have no scales")
    extra = [n for n in scales.layers if n not in set(layer_names)]
    if extra:
        problems.append(f"layers {_preview(extra)} of the sidecar are not attention layers of the model")
    if kv_dtype is not None and KVCacheDType(kv_dtype) is not scales.kv_dtype:
        problems.append(
            f"kv_dtype = {scales.kv_dtype.value!r}: the sidecar was made for {scales.kv_dtype.value}, the cache is "
            f"{KVCacheDType(kv_dtype).value} (re-run 'vllm-kvquant convert --kv-dtype {KVCacheDType(kv_dtype).value}')"
        )
    if problems:
        raise ScalesMismatchError(scales.source_path, problems)
