"""Pick the scales a model runs with: explicit path, else the sidecar, else a loud fallback.

Never silent: without a sidecar either :class:`SidecarNotFoundError` is raised or a WARNING
says that unit scales are in use and how to calibrate.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from .errors import CALIBRATE_COMMAND, SidecarNotFoundError, ScalesError
from .format import CalibrationInfo, Granularity, KVCacheDType, LayerScales, ModelFacts, ScalesFile, tool_version
from .io import SIDECAR_FILENAME, find_sidecar, load_scales

logger = logging.getLogger("vllm.kvquant")

FALLBACK_METHOD = "fallback-unit"


def unit_scales(
    *, kv_dtype: KVCacheDType | str, num_layers: int, num_kv_heads: int, head_size: int, layer_names: Sequence[str]
) -> ScalesFile:
    """A valid per-tensor file with every K and V scale 1.0 (``calibration.method = fallback-unit``)."""
    facts = ModelFacts(num_layers, num_kv_heads, head_size, tuple(layer_names))
    calibration = CalibrationInfo(method=FALLBACK_METHOD, tool="vllm-kvquant", tool_version=tool_version())
    layers = {name: LayerScales(name, (1.0,), (1.0,)) for name in layer_names}
    scales = ScalesFile(KVCacheDType(kv_dtype), Granularity.PER_TENSOR, facts, calibration, layers, None)
    scales.validate()
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
    fallback: str = "unit",
) -> ScalesFile:
    """Explicit path wins; else ``<model_dir>/kvquant_scales.json``; else ``fallback`` ("unit" or "error")."""
    if fallback not in ("unit", "error"):
        raise ScalesError(f"fallback = {fallback!r} is not supported (use 'unit' or 'error')")
    if explicit_path is not None:
        return load_scales(explicit_path)
    sidecar = find_sidecar(model_dir)
    if sidecar is not None:
        return load_scales(sidecar)
    if fallback == "error":
        raise SidecarNotFoundError(model_dir)
    dtype = KVCacheDType(kv_dtype)
    where = f"in {model_dir}" if model_dir is not None else "(the model is not a local directory)"
    int8_note = (
        " With int8 this is almost certainly wrong: every |value| < 0.5 rounds to 0 and values beyond 127 clip."
        if dtype is KVCacheDType.INT8
        else " Values beyond +/-448 clip."
    )
    logger.warning(
        "vllm-kvquant: no %s found %s and no explicit scales path given; using scale 1.0 for every layer "
        "(per_tensor, %s). This is only correct when K/V values stay within +/-%g - it risks clipping and "
        "accuracy loss.%s Make real scales with: %s",
        SIDECAR_FILENAME, where, dtype.value, dtype.qmax, int8_note,
        CALIBRATE_COMMAND.replace("<MODEL>", str(model_dir) if model_dir is not None else "<MODEL>"),
    )
    return unit_scales(
        kv_dtype=dtype, num_layers=num_layers, num_kv_heads=num_kv_heads, head_size=head_size, layer_names=layer_names
    )
