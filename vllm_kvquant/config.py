"""Options of the kvquant backend, read from vLLM's ``--additional-config``.

Example: ``--additional-config '{"kvquant": {"scales": "/models/x/kvquant_scales.json", "dtype": "int8"}}'``
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from .errors import KVQuantConfigError

CONFIG_KEY = "kvquant"
_DTYPES = ("fp8_e4m3", "int8")
_FALLBACKS = ("online", "unit", "error")
#: Decode-attention kernels (vllm_kvquant/peer_decode/choice.py says what each needs).
KERNEL_CHOICES = ("auto", "triton", "fa3", "flashinfer")
#: Prefill modes (vllm_kvquant/prefill.py says what each does).
PREFILL_CHOICES = ("bf16", "quantized")


@dataclass(frozen=True)
class KVQuantConfig:
    """User options; everything else comes from the scales sidecar.

    scales: path of a sidecar to use instead of ``<model>/kvquant_scales.json``.
    dtype: storage format override (``fp8_e4m3`` or ``int8``); scales made for the other
        format are converted (``scale * qmax_sidecar / qmax_target``).
    fallback: what to do without any sidecar (each with a warning naming the calibration
        command): ``online`` (default; per-head scales measured from the first batch each
        layer writes, then frozen), ``unit`` (scale 1.0 everywhere; int8 rounds |x| < 0.5 to 0)
        or ``error``.
    calibration: set by ``vllm-kvquant calibrate``: ignore any sidecar (unit scales; the
        recorded K/V do not depend on them) and refuse CUDA graphs.
    kernel: decode-attention kernel: ``auto`` (default; today always ``triton``),
        ``triton``, ``fa3`` (vLLM's FlashAttention-3, fp8 queries, Hopper) or ``flashinfer``.
    prefill: what prefill attends to: ``bf16`` (default; the step's own K/V unquantized, the
        cached context from the 8-bit cache) or ``quantized`` (everything from the 8-bit cache,
        so a greedy request gives the same answer whether its prompt start came from the
        prefix cache or not, whatever the chunking).
    """

    scales: str | None = None
    dtype: str | None = None
    fallback: str = "online"
    calibration: bool = False
    kernel: str = "auto"
    prefill: str = "bf16"

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
        if self.kernel not in KERNEL_CHOICES:
            raise KVQuantConfigError(
                f"additional_config['{CONFIG_KEY}']['kernel'] = {self.kernel!r} is not supported; "
                f"use one of {list(KERNEL_CHOICES)}"
            )
        if self.prefill not in PREFILL_CHOICES:
            raise KVQuantConfigError(
                f"additional_config['{CONFIG_KEY}']['prefill'] = {self.prefill!r} is not supported; "
                f"use one of {list(PREFILL_CHOICES)}"
            )
        if self.fallback not in _FALLBACKS:
            raise KVQuantConfigError(
                f"additional_config['{CONFIG_KEY}']['fallback'] = {self.fallback!r} is not supported; "
                f"use one of {list(_FALLBACKS)}"
            )
