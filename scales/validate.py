"""Checks of a sidecar, on load and on save, and against the model that is about to run.

Every error names the file, the layer (where there is one) and the offending value, so a
broken sidecar can be fixed without reading the loader.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

from .errors import ScalesError, ScalesMismatchError, ScalesValidationError
from .format import FORMAT_NAME, FORMAT_VERSION, SCALE_FLOOR, Granularity, KVCacheDType, ScalesFile

logger = logging.getLogger("vllm.kvquant")

_SCALE_RULE = "(scales must be finite and > 0)"

#: ``SCALE_FLOOR`` (format.py) is the smallest scale accepted.
_FLOOR_TEXT = "1e-8"
#: The floor as written from fp32 (``float(torch.float32(1e-8))`` is 9.99999994e-09) must pass.
_FLOOR_TOLERANCE = 1e-6

#: Largest finite value of each model dtype: ``qmax * scale`` (the largest dequantized K/V) must fit.
MODEL_DTYPE_MAX = {"float16": 65504.0, "bfloat16": 3.3895313892515355e38, "float32": 3.4028234663852886e38}
#: Checked against when the model dtype is not known: the widest dtype kvquant runs models in.
ASSUMED_MODEL_DTYPE = "bfloat16"
_DTYPE_ALIASES = {
    "float16": "float16", "half": "float16", "fp16": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float32": "float32", "float": "float32", "fp32": "float32",
}

#: Implied amax (``qmax * scale``, the largest |K| or |V| a scale represents) outside this range is
#: warned about: calibrating real LLMs gives per-head K/V amax of roughly 0.1 to a few thousand
#: (K outliers included); 1e4 and 1e-4 leave two orders of magnitude either side.
UNUSUAL_AMAX_HIGH = 1e4
UNUSUAL_AMAX_LOW = 1e-4
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


def _check_numbers(
    file: str | None, layer: str, field: str, values: list, kv_dtype: KVCacheDType, model_dtype: str | None
) -> None:
    for i, item in enumerate(values):
        number = check_scale(file, layer, f"{field}[{i}]", item)
        check_scale_range(file, layer, f"{field}[{i}]", number, kv_dtype, model_dtype)


def _check_layer_values(
    file: str | None, layer: str, field: str, value: Any, granularity: Granularity, num_kv_heads: int,
    head_size: int, kv_dtype: KVCacheDType, model_dtype: str | None,
) -> None:
    if granularity is Granularity.PER_CHANNEL:
        _check_channel_values(file, layer, field, value, num_kv_heads, head_size, kv_dtype, model_dtype)
        return
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
        _check_numbers(file, layer, field, value, kv_dtype, model_dtype)
        return
    if granularity is Granularity.PER_HEAD:
        raise ScalesValidationError(
            file, layer, field, value,
            f"is not a list; granularity per_head needs a list of {num_kv_heads} scales (one per KV head)",
        )
    check_scale_range(file, layer, field, check_scale(file, layer, field, value), kv_dtype, model_dtype)


def _check_channel_values(
    file: str | None, layer: str, field: str, value: Any, num_kv_heads: int, head_size: int,
    kv_dtype: KVCacheDType, model_dtype: str | None,
) -> None:
    """per_channel: a list of ``num_kv_heads`` lists of ``head_size`` scales."""
    shape = f"a list of {num_kv_heads} lists (one per KV head) of {head_size} scales (one per channel)"
    if not isinstance(value, list):
        raise ScalesValidationError(file, layer, field, value, f"is not a list; granularity per_channel needs {shape}")
    if len(value) != num_kv_heads:
        raise ScalesValidationError(
            file, layer, field, _short(value),
            f"has {len(value)} entries; granularity per_channel needs one list per KV head "
            f"(model.num_kv_heads = {num_kv_heads}): {shape}",
        )
    for h, row in enumerate(value):
        where = f"{field}[{h}]"
        if not isinstance(row, list):
            raise ScalesValidationError(
                file, layer, where, row,
                f"is not a list; granularity per_channel needs {head_size} scales per KV head (model.head_size)",
            )
        if len(row) != head_size:
            raise ScalesValidationError(
                file, layer, where, _short(row),
                f"has {len(row)} values; granularity per_channel needs one per channel (model.head_size = {head_size})",
            )
        _check_numbers(file, layer, where, row, kv_dtype, model_dtype)


def _short(values: list, limit: int = 6) -> Any:
    """A long list shortened for an error message."""
    return values if len(values) <= limit else [*values[:limit], f"... ({len(values)} in all)"]


# ----------------------------------------------------------------------------- scale sanity


def normalize_model_dtype(dtype: Any) -> str | None:
    """``float16`` / ``bfloat16`` / ``float32`` from a torch dtype or a name (``torch.bfloat16``, ``bf16``,
    ``half``); None for None or ``auto`` (unknown)."""
    if dtype is None:
        return None
    name = str(dtype).strip().lower().removeprefix("torch.")
    if name == "auto":
        return None
    if name not in _DTYPE_ALIASES:
        raise ScalesError(f"model dtype {dtype!r} is not supported (use float16 or bfloat16)")
    return _DTYPE_ALIASES[name]


def _which_scale(field: str) -> str:
    """``k_scale[3]`` -> ``the K scale of KV head 3``; ``k_scale[3][5]`` -> ``... KV head 3, channel 5``;
    ``v_scale`` -> the per-tensor V scale."""
    which = "K" if field.startswith("k") else "V"
    index = [part.rstrip("]") for part in field.split("[")[1:]]
    if len(index) == 2:
        return f"the {which} scale of KV head {index[0]}, channel {index[1]}"
    if index:
        return f"the {which} scale of KV head {index[0]}"
    return f"the per-tensor {which} scale of every KV head"


def check_scale_range(
    file: str | None, layer: str, field: str, value: float, kv_dtype: KVCacheDType, model_dtype: str | None = None
) -> None:
    """Refuse a scale below the 1e-8 floor, or one whose ``qmax * scale`` overflows the model dtype.

    ``model_dtype`` None (unknown) checks against bfloat16, the widest dtype kvquant runs models
    in, and says so: a float16 model is checked once its dtype is known (``validate_for_model``).
    """
    who = _which_scale(field)
    qmax = kv_dtype.qmax
    if value < SCALE_FLOOR * (1 - _FLOOR_TOLERANCE):
        raise ScalesValidationError(
            file, layer, field, value,
            f"is below the {_FLOOR_TEXT} floor ({who}): calibration never writes less "
            f"(scale = max(amax * margin / qmax, {_FLOOR_TEXT})), and with a scale this small every value "
            f"above {qmax * value:.3g} saturates at +/-{qmax:g}",
        )
    dtype = model_dtype or ASSUMED_MODEL_DTYPE
    limit = MODEL_DTYPE_MAX[dtype]
    largest = qmax * value
    if largest > limit:
        assumed = (
            "" if model_dtype else
            f"; the model dtype is not known here, so it was checked against {ASSUMED_MODEL_DTYPE}, "
            "the widest dtype kvquant runs models in"
        )
        raise ScalesValidationError(
            file, layer, field, value,
            f"is too large ({who}): qmax * scale = {qmax:g} ({kv_dtype.value}) * {value:g} = {largest:.3g} "
            f"overflows the model dtype {dtype} (max {limit:.4g}), so dequantized values would be inf{assumed}",
        )


def _scale_items(data: dict[str, Any]):
    """``(layer, field label, value)`` for every scale of a checked sidecar dict (labels as in errors)."""
    for name, entry in data["layers"].items():
        for field in ("k_scale", "v_scale"):
            value = entry[field]
            if data["granularity"] == Granularity.PER_CHANNEL.value:
                for h, row in enumerate(value):
                    for c, item in enumerate(row):
                        yield name, f"{field}[{h}][{c}]", float(item)
            elif isinstance(value, list) and data["granularity"] == Granularity.PER_HEAD.value:
                for i, item in enumerate(value):
                    yield name, f"{field}[{i}]", float(item)
            else:
                yield name, field, float(value[0] if isinstance(value, list) else value)


def check_scale_values(scales: "ScalesFile", model_dtype: Any = None) -> None:
    """Range checks (floor, overflow of ``model_dtype``) over a loaded :class:`ScalesFile`."""
    dtype = normalize_model_dtype(model_dtype)
    for name, field, value in _scale_items(scales.to_json_dict()):
        check_scale_range(scales.source_path, name, field, value, scales.kv_dtype, dtype)


def unusual_scales(scales: "ScalesFile | dict[str, Any]") -> list[str]:
    """Scales that pass the checks but lie far outside what calibrating any real model gives.

    The implied amax ``qmax * scale`` (the largest |K| or |V| a scale represents) is compared
    with [:data:`UNUSUAL_AMAX_LOW`, :data:`UNUSUAL_AMAX_HIGH`]; one line per scale, with the reason.
    """
    data = scales if isinstance(scales, dict) else scales.to_json_dict()
    qmax = KVCacheDType(data["kv_dtype"]).qmax
    found = []
    for name, field, value in _scale_items(data):
        amax = qmax * value
        if UNUSUAL_AMAX_LOW <= amax <= UNUSUAL_AMAX_HIGH:
            continue
        which = "K" if field.startswith("k") else "V"
        if amax > UNUSUAL_AMAX_HIGH:
            reason = (
                f"above {UNUSUAL_AMAX_HIGH:g}: calibrated K/V amax stay below a few thousand, and the 8-bit "
                f"grid is stretched over this range, so ordinary |{which}| keep few levels or round to 0 "
                "(a file written with another convention, 1/scale or amax instead of amax / qmax?)"
            )
        else:
            reason = (
                f"below {UNUSUAL_AMAX_LOW:g}: any |{which}| above {amax:.3g} saturates; expected only for a head "
                f"whose {which} was all zeros during calibration (its scale is floored at {_FLOOR_TEXT})"
            )
        found.append(
            f"layer '{name}': {field} = {value:.6g} ({_which_scale(field)}) implies |{which}| amax "
            f"{qmax:g} * scale = {amax:.3g}, {reason}"
        )
    return found


def log_unusual_scales(file: str | None, messages: Sequence[str], limit: int = 8) -> None:
    """One WARNING listing the unusual scales of a file (the first ``limit``)."""
    if not messages:
        return
    shown = list(messages[:limit]) + ([f"... and {len(messages) - limit} more"] if len(messages) > limit else [])
    logger.warning(
        "%s: %d scale(s) far outside what calibrating a real model gives (implied |K|/|V| amax = qmax * scale "
        "outside [%g, %g]); the file is used as it is, but check it:\n  - %s",
        file or "<in-memory scales>", len(messages), UNUSUAL_AMAX_LOW, UNUSUAL_AMAX_HIGH, "\n  - ".join(shown),
    )


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


def _check_layers(data: dict[str, Any], file: str | None, model_dtype: str | None) -> None:
    layers = data["layers"]
    if not isinstance(layers, dict):
        raise ScalesValidationError(file, None, "layers", layers, "must be an object keyed by layer name")
    names = data["model"]["layer_names"]
    known = set(names)
    granularity = Granularity(data["granularity"])
    num_kv_heads = data["model"]["num_kv_heads"]
    head_size = data["model"]["head_size"]
    kv_dtype = KVCacheDType(data["kv_dtype"])
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
            _check_layer_values(
                file, name, field, entry[field], granularity, num_kv_heads, head_size, kv_dtype, model_dtype
            )
    for name in names:
        if name not in layers:
            raise ScalesValidationError(
                file, name, reason="is listed in model.layer_names but has no entry in 'layers' (missing scales)"
            )


def _preview(names: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(repr(n) for n in list(names)[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def validate_json_dict(data: Any, file: str | None = None, *, model_dtype: Any = None, warn: bool = True) -> None:
    """Raise :class:`ScalesValidationError` at the first problem of a parsed sidecar.

    Scales below the 1e-8 floor or overflowing ``model_dtype`` (unknown: bfloat16) are errors;
    with ``warn``, scales far outside what calibration gives are logged as one WARNING.
    """
    _check_header(data, file)
    _check_model(data["model"], file)
    _check_calibration(data["calibration"], file)
    _check_layers(data, file, normalize_model_dtype(model_dtype))
    if warn:
        log_unusual_scales(file, unusual_scales(data))


def parse_scales(
    data: Any, source_path: str | None = None, *, model_dtype: Any = None, warn: bool = True
) -> ScalesFile:
    """Validate ``data`` (a parsed sidecar) and build the :class:`ScalesFile`; errors name ``source_path``.

    ``model_dtype`` (unknown: bfloat16) bounds ``qmax * scale``; ``warn`` logs scales far outside
    what calibration gives (see :func:`unusual_scales`).
    """
    validate_json_dict(data, source_path, model_dtype=model_dtype, warn=warn)
    return ScalesFile.from_checked_json_dict(data, source_path)


def validate_scales(scales: ScalesFile, *, warn: bool = True) -> None:
    """Run the same checks as loading on a file built in memory (used before saving)."""
    validate_json_dict(scales.to_json_dict(), scales.source_path, warn=warn)


def validate_for_model(
    scales: "ScalesFile",
    *,
    num_layers: int,
    num_kv_heads: int,
    head_size: int,
    layer_names: Sequence[str],
    kv_dtype: KVCacheDType | str | None = None,
    model_dtype: Any = None,
) -> None:
    """Check a loaded sidecar against the running model; one error lists every mismatch.

    With ``model_dtype`` (e.g. ``model_config.dtype``) every ``qmax * scale`` must fit it too
    (float16: 65504); loading already checked against bfloat16.
    """
    if model_dtype is not None:
        check_scale_values(scales, model_dtype)
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
