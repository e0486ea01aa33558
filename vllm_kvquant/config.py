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
    prefill_workspace_mib: GPU memory (MiB, allocated once at start-up) for the prefill's FA3
        path (Hopper): in mode ``bf16`` each prefill with cached context is copied into it as
        16-bit K/V (context dequantized, new tokens as computed), in mode ``quantized`` every
        prefill (all of it dequantized from the cache), and FA3 attends over it once. Steps whose
        prefill sequences do not fit, and full-CUDA-graph replays, use our Triton kernels
        instead (mode ``bf16``: FA3 on the new tokens plus a Triton pass over the 8-bit context;
        ``quantized``: one Triton pass), which are slower on long contexts; in mode
        ``quantized`` their bits differ from FA3's, so a request served once by each path can
        differ by rounding: 0 (Triton only) keeps greedy answers identical in every case.
        Default 256 (65536 tokens of Llama-3-8B's 8 KV heads x 128 in bf16: e.g. 16 prefix-cache
        hits of 4k tokens in one step); 0 turns the workspace off.
    """

    scales: str | None = None
    dtype: str | None = None
    fallback: str = "online"
    calibration: bool = False
    kernel: str = "auto"
    prefill: str = "bf16"
    prefill_workspace_mib: int = 256

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
        mib = self.prefill_workspace_mib
        if isinstance(mib, bool) or not isinstance(mib, int) or mib < 0:
            raise KVQuantConfigError(
                f"additional_config['{CONFIG_KEY}']['prefill_workspace_mib'] must be an integer >= 0 (MiB), got {mib!r}"
            )
        if self.fallback not in _FALLBACKS:
            raise KVQuantConfigError(
                f"additional_config['{CONFIG_KEY}']['fallback'] = {self.fallback!r} is not supported; "
                f"use one of {list(_FALLBACKS)}"
            )
