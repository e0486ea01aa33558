"""In-memory form of the ``kvquant_scales.json`` sidecar (format v1) and its JSON mapping.

A scale means ``real_value ~= quantized_value * scale``, i.e. ``scale = amax / qmax``.
Per-tensor layers hold 1-tuples; per-head layers hold one value per KV head of the model;
per-channel layers hold one value per KV head and channel, head-major (``[h0c0, h0c1, ...]``,
``LayerScales.channels`` = head size), written to JSON as one list per KV head.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

FORMAT_NAME = "vllm-kvquant-scales"
FORMAT_VERSION = 1
DEFAULT_LAYER_TEMPLATE = "model.layers.{i}.self_attn.attn"
#: Smallest scale accepted: the floor of the calibration formula ``max(amax * margin / qmax, 1e-8)``
#: (``calibration.DEFAULT_FLOOR``). Below it a scale saturates every nonzero value, and 1/scale
#: (what the cache write multiplies by) leaves fp32's range below ~3e-39.
SCALE_FLOOR = 1e-8


class KVCacheDType(str, Enum):
    """8-bit storage format the scales were made for."""

    FP8_E4M3 = "fp8_e4m3"
    INT8 = "int8"

    @property
    def qmax(self) -> float:
        """Largest stored magnitude: 448 for fp8 e4m3, 127 for symmetric int8."""
        return 448.0 if self is KVCacheDType.FP8_E4M3 else 127.0

    def __str__(self) -> str:
        return self.value


class Granularity(str, Enum):
    """One scale per layer (per_tensor), per KV head (per_head) or per KV head and channel (per_channel).

    per_channel costs nothing at decode: K's scales fold into the query (``(q * s_k) . k_stored``)
    and V's into the output (``(sum p v_stored) * s_v``), so kernels read the same bytes.
    """

    PER_TENSOR = "per_tensor"
    PER_HEAD = "per_head"
    PER_CHANNEL = "per_channel"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class ModelFacts:
    """The model the scales were made for; checked against the running model at load."""

    num_layers: int
    num_kv_heads: int
    head_size: int
    layer_names: tuple[str, ...]

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "head_size": self.head_size,
            "layer_names": list(self.layer_names),
        }

    @classmethod
    def from_json_dict(cls, data: dict[str, Any]) -> "ModelFacts":
        return cls(
            int(data["num_layers"]),
            int(data["num_kv_heads"]),
            int(data["head_size"]),
            tuple(data["layer_names"]),
        )


_CALIBRATION_KEYS = ("tool", "tool_version", "data", "num_tokens", "method", "margin", "percentile", "created")


@dataclass(frozen=True)
class CalibrationInfo:
    """Provenance: how the scales were made. Only ``method`` is required (converted files)."""

    method: str
    tool: str | None = None
    tool_version: str | None = None
    data: str | None = None
    num_tokens: int | None = None
    margin: float | None = None
    percentile: float | None = None
    created: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: getattr(self, k) for k in _CALIBRATION_KEYS}
        out.update(self.extra)
        return out

    @classmethod
    def from_json_dict(cls, data: dict[str, Any]) -> "CalibrationInfo":
        known = {k: data.get(k) for k in _CALIBRATION_KEYS}
        extra = {k: v for k, v in data.items() if k not in _CALIBRATION_KEYS}
        return cls(**known, extra=extra)


@dataclass(frozen=True)
class LayerScales:
    """K and V scales of one attention layer: a 1-tuple (per tensor), one per KV head, or, with
    ``channels`` > 1 (per channel: the head size), ``channels`` per KV head, head-major."""

    name: str
    k_scale: tuple[float, ...]
    v_scale: tuple[float, ...]
    channels: int = 1

    @property
    def is_per_tensor(self) -> bool:
        return len(self.k_scale) == 1 and self.channels == 1

    @property
    def num_heads(self) -> int:
        """KV heads covered (1 for per-tensor scales)."""
        return len(self.k_scale) // self.channels

    def heads(self, indices: "list[int] | tuple[int, ...]") -> "LayerScales":
        """The scales of the KV heads ``indices`` (in that order), with their channel vectors."""
        c = self.channels

        def pick(values: tuple[float, ...]) -> tuple[float, ...]:
            return tuple(v for h in indices for v in values[h * c : (h + 1) * c])

        return replace(self, k_scale=pick(self.k_scale), v_scale=pick(self.v_scale))

    def scaled(self, factor: float, floor: float = 0.0) -> "LayerScales":
        def scale(values: tuple[float, ...]) -> tuple[float, ...]:
            return tuple(max(s * factor, floor) for s in values)

        return replace(self, k_scale=scale(self.k_scale), v_scale=scale(self.v_scale))


@dataclass(frozen=True)
class ScalesFile:
    """A whole sidecar. Build with ``validate.parse_scales`` (checked JSON) or the calibration/convert helpers;
    ``validate.validate_scales`` checks one built in memory, ``sharding.shard_scales`` cuts it per rank."""

    kv_dtype: KVCacheDType
    granularity: Granularity
    model: ModelFacts
    calibration: CalibrationInfo
    layers: dict[str, LayerScales]
    source_path: str | None = None

    def to_json_dict(self) -> dict[str, Any]:
        """JSON form: per-tensor scales are written as plain numbers, per-head as lists, per-channel
        as one list of channel scales per KV head."""

        def dump(values: tuple[float, ...]) -> float | list[float] | list[list[float]]:
            if self.granularity is Granularity.PER_TENSOR and len(values) == 1:
                return float(values[0])
            if self.granularity is Granularity.PER_CHANNEL:
                c = self.model.head_size
                return [[float(v) for v in values[i : i + c]] for i in range(0, len(values), c)]
            return [float(v) for v in values]

        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "kv_dtype": self.kv_dtype.value,
            "granularity": self.granularity.value,
            "model": self.model.to_json_dict(),
            "calibration": self.calibration.to_json_dict(),
            "layers": {
                name: {"k_scale": dump(ls.k_scale), "v_scale": dump(ls.v_scale)}
                for name, ls in self.layers.items()
            },
        }

    @classmethod
    def from_checked_json_dict(cls, data: dict[str, Any], source_path: str | None = None) -> "ScalesFile":
        """Build from a parsed sidecar that ``validate.validate_json_dict`` has passed (no checks here:
        load with ``validate.parse_scales``, which checks first)."""

        def tup(value: float | list) -> tuple[float, ...]:
            if not isinstance(value, list):
                return (float(value),)
            return tuple(float(c) for v in value for c in (v if isinstance(v, list) else [v]))

        model = ModelFacts.from_json_dict(data["model"])
        granularity = Granularity(data["granularity"])
        channels = model.head_size if granularity is Granularity.PER_CHANNEL else 1
        layers = {
            name: LayerScales(name, tup(data["layers"][name]["k_scale"]), tup(data["layers"][name]["v_scale"]), channels)
            for name in model.layer_names
        }
        return cls(
            KVCacheDType(data["kv_dtype"]),
            granularity,
            model,
            CalibrationInfo.from_json_dict(data["calibration"]),
            layers,
            source_path,
        )

    def retarget(self, kv_dtype: KVCacheDType | str) -> "ScalesFile":
        """Same amax, other storage format: ``scale * qmax_old / qmax_new`` (fp8 -> int8: x 448/127).

        Scales stay at or above the 1e-8 floor (int8 -> fp8 shrinks them by 127/448): a floored
        scale stands for amax ~0, which the floor represents in either format.
        """
        target = KVCacheDType(kv_dtype)
        if target is self.kv_dtype:
            return self
        factor = self.kv_dtype.qmax / target.qmax
        layers = {n: ls.scaled(factor, floor=SCALE_FLOOR) for n, ls in self.layers.items()}
        return replace(self, kv_dtype=target, layers=layers)


def tool_version() -> str:
    """Version of the installed vllm-kvquant distribution (``unknown`` when run from a tree)."""
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("vllm-kvquant")
    except PackageNotFoundError:  # pragma: no cover
        return "unknown"
