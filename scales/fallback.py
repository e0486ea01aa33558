"""Pick the scales a model runs with: explicit path, else the sidecar, else a loud fallback.

Never silent: without a sidecar either :class:`SidecarNotFoundError` is raised (``error``) or a
WARNING says which fallback runs and how to calibrate: ``online`` (the default) measures per-head
scales from the first batch each layer writes (:mod:`.online`), ``unit`` uses scale 1.0.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from .errors import CALIBRATE_COMMAND, SidecarNotFoundError, ScalesError
from .format import CalibrationInfo, Granularity, KVCacheDType, LayerScales, ModelFacts, ScalesFile, tool_version
from .io import SIDECAR_FILENAME, find_sidecar, load_scales
from .online import ONLINE_METHOD, online_margin
from .validate import validate_scales

logger = logging.getLogger("vllm.kvquant")

FALLBACK_METHOD = "fallback-unit"
FALLBACKS = ("online", "unit", "error")


def unit_scales(
    *, kv_dtype: KVCacheDType | str, num_layers: int, num_kv_heads: int, head_size: int, layer_names: Sequence[str]
) -> ScalesFile:
    """A valid per-tensor file with every K and V scale 1.0 (``calibration.method = fallback-unit``)."""
    facts = ModelFacts(num_layers, num_kv_heads, head_size, tuple(layer_names))
    calibration = CalibrationInfo(method=FALLBACK_METHOD, tool="vllm-kvquant", tool_version=tool_version())
    layers = {name: LayerScales(name, (1.0,), (1.0,)) for name in layer_names}
    scales = ScalesFile(KVCacheDType(kv_dtype), Granularity.PER_TENSOR, facts, calibration, layers, None)
    validate_scales(scales)
    return scales


def online_placeholder_scales(
    *, kv_dtype: KVCacheDType | str, num_layers: int, num_kv_heads: int, head_size: int, layer_names: Sequence[str]
) -> ScalesFile:
    """Per-head scales of 1.0 (``calibration.method = fallback-online``), replaced in place by the
    values measured from the first real batch before anything is written with them."""
    facts = ModelFacts(num_layers, num_kv_heads, head_size, tuple(layer_names))
    calibration = CalibrationInfo(
        method=ONLINE_METHOD, tool="vllm-kvquant", tool_version=tool_version(), margin=online_margin(kv_dtype)
    )
    layers = {name: LayerScales(name, (1.0,) * num_kv_heads, (1.0,) * num_kv_heads) for name in layer_names}
    scales = ScalesFile(KVCacheDType(kv_dtype), Granularity.PER_HEAD, facts, calibration, layers, None)
    validate_scales(scales)
    return scales


def resolve_scales(
    model_dir: str | os.PathLike | None,
    *,
    explicit_path: str | os.PathLike | None = None,
    kv_dtype: KVCacheDType | str,
    num_layers: int,
    num_kv_heads: int,
    head_size: int,
    layer_names: Sequence[str],
    fallback: str = "online",
) -> ScalesFile:
    """Explicit path wins; else ``<model_dir>/kvquant_scales.json``; else ``fallback`` (online, unit or error)."""
    if fallback not in FALLBACKS:
        raise ScalesError(f"fallback = {fallback!r} is not supported (use one of {list(FALLBACKS)})")
    if explicit_path is not None:
        return load_scales(explicit_path)
    sidecar = find_sidecar(model_dir)
    if sidecar is not None:
        return load_scales(sidecar)
    if fallback == "error":
        raise SidecarNotFoundError(model_dir)
    dtype = KVCacheDType(kv_dtype)
    where = f"in {model_dir}" if model_dir is not None else "(the model is not a local directory)"
    command = CALIBRATE_COMMAND.replace("<MODEL>", str(model_dir) if model_dir is not None else "<MODEL>")
    facts = dict(num_layers=num_layers, num_kv_heads=num_kv_heads, head_size=head_size, layer_names=layer_names)
    if fallback == "online":
        logger.warning(
            "vllm-kvquant: no %s found %s and no explicit scales path given; measuring per-head %s scales "
            "online from the first batch each layer writes (%gx its largest |K|/|V|), then freezing them: "
            "later values beyond that saturate. Calibrated scales are more accurate; make them with: %s",
            SIDECAR_FILENAME, where, dtype.value, online_margin(dtype), command,
        )
        return online_placeholder_scales(kv_dtype=dtype, **facts)
    int8_note = (
        " With int8 this is almost certainly wrong: every |value| < 0.5 rounds to 0 and values beyond 127 clip."
        if dtype is KVCacheDType.INT8
        else " Values beyond +/-448 clip."
    )
    logger.warning(
        "vllm-kvquant: no %s found %s and no explicit scales path given; using scale 1.0 for every layer "
        "(per_tensor, %s). This is only correct when K/V values stay within +/-%g - it risks clipping and "
        "accuracy loss.%s Make real scales with: %s",
        SIDECAR_FILENAME, where, dtype.value, dtype.qmax, int8_note, command,
    )
    return unit_scales(kv_dtype=dtype, **facts)
