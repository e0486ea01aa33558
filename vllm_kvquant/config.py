"""Options of the kvquant backend, read from vLLM's ``--additional-config``.

Example: ``--additional-config '{"kvquant": {"scales": "/models/x/kvquant_scales.json", "dtype": "int8"}}'``
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from .errors import KVQuantConfigError

CONFIG_KEY = "kvquant"
_DTYPES = ("fp8_e4m3", "int8")
_FALLBACKS = ("unit", "error")


@dataclass(frozen=True)
class KVQuantConfig:
    """User options; everything else comes from the scales sidecar.

    scales: path of a sidecar to use instead of ``<model>/kvquant_scales.json``.
    dtype: storage format override (``fp8_e4m3`` or ``int8``); scales made for the other
        format are converted (``scale * qmax_sidecar / qmax_target``).
    fallback: what to do without any sidecar: ``unit`` (scale 1.0 everywhere, with a
        warning) or ``error``.
    calibration: set by ``vllm-kvquant calibrate``: ignore any sidecar (unit scales; the
        recorded K/V do not depend on them) and refuse CUDA graphs.
    """

    scales: str | None = None
    dtype: str | None = None
    fallback: str = "unit"
    calibration: bool = False

    @classmethod
    def from_additional_config(cls, additional_config: dict | None) -> "KVQuantConfig":
        raw: Any = (additional_config or {}).get(CONFIG_KEY, {})
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise KVQuantConfigError(
                f"additional_config['{CONFIG_KEY}'] must be an object, got {type(raw).__name__}: {raw!r}"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise KVQuantConfigError(
                f"additional_config['{CONFIG_KEY}'] has unknown option(s) {unknown}; "
                f"known options are {sorted(known)}"
            )
        config = cls(**raw)
        config.validate()
        return config

    def validate(self) -> None:
        if self.scales is not None and not isinstance(self.scales, str):
            raise KVQuantConfigError(
                f"additional_config['{CONFIG_KEY}']['scales'] must be a path string, got {self.scales!r}"
            )
        if self.dtype is not None and self.dtype not in _DTYPES:
            raise KVQuantConfigError(
                f"additional_config['{CONFIG_KEY}']['dtype'] = {self.dtype!r} is not supported; "
                f"use one of {list(_DTYPES)}"
            )
        if not isinstance(self.calibration, bool):
            raise KVQuantConfigError(
                f"additional_config['{CONFIG_KEY}']['calibration'] must be true or false, got {self.calibration!r}"
            )
        if self.fallback not in _FALLBACKS:
            raise KVQuantConfigError(
                f"additional_config['{CONFIG_KEY}']['fallback'] = {self.fallback!r} is not supported; "
                f"use one of {list(_FALLBACKS)}"
            )
