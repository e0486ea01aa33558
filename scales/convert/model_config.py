"""Model facts a converter needs, read from the checkpoint's HF ``config.json``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ScalesError
from ..format import DEFAULT_LAYER_TEMPLATE, CalibrationInfo, Granularity, KVCacheDType, LayerScales, ModelFacts, ScalesFile


@dataclass(frozen=True)
class HFConfigFacts:
    """What config.json says about attention (text part of multimodal configs included)."""

    path: str
    num_layers: int
    num_kv_heads: int
    head_size: int
    architecture: str | None
    model_type: str | None
    raw: dict[str, Any]

    def model_facts(self, layer_names: list[str] | None = None, template: str = DEFAULT_LAYER_TEMPLATE) -> ModelFacts:
        names = layer_names if layer_names is not None else [template.format(i=i) for i in range(self.num_layers)]
        return ModelFacts(len(names), self.num_kv_heads, self.head_size, tuple(names))

    def converted(
        self, native: KVCacheDType, granularity: Granularity, layers: dict[str, LayerScales], tool: str, source: str | Path,
        kv_dtype: KVCacheDType | str | None = None,
    ) -> ScalesFile:  # fmt: skip
        """What a converter returns: ``layers`` (in model order) of this model, read by ``tool`` from
        ``source`` in the ``native`` format, retargeted to ``kv_dtype`` when one is given."""
        info = CalibrationInfo(method="converted", tool=f"convert:{tool}", data=str(source))
        scales = ScalesFile(native, granularity, self.model_facts(list(layers)), info, layers)
        return scales.retarget(kv_dtype) if kv_dtype is not None else scales


def _text_config(cfg: dict[str, Any]) -> dict[str, Any]:
    if "num_hidden_layers" not in cfg and isinstance(cfg.get("text_config"), dict):
        merged = dict(cfg["text_config"])
        merged.setdefault("architectures", cfg.get("architectures"))
        return merged
    return cfg


def read_config(model_dir: str | Path) -> HFConfigFacts:
    """Parse ``<model_dir>/config.json``; errors name the file and the missing key."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ScalesError(
            f"{path}: not found; the converter needs the model's config.json for its layer count, KV heads "
            "and head size (pass the model directory, e.g. --model-dir <MODEL>)"
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ScalesError(f"{path}: is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from None
    cfg = _text_config(raw)
    try:
        num_layers = int(cfg["num_hidden_layers"])
        num_heads = int(cfg["num_attention_heads"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ScalesError(f"{path}: needs integer 'num_hidden_layers' and 'num_attention_heads' ({exc!r})") from None
    num_kv_heads = int(cfg.get("num_key_value_heads") or num_heads)
    head_size = cfg.get("head_dim")
    if head_size is None:
        if "hidden_size" not in cfg:
            raise ScalesError(f"{path}: has neither 'head_dim' nor 'hidden_size' to derive the head size")
        head_size = int(cfg["hidden_size"]) // num_heads
    archs = cfg.get("architectures")
    arch = archs[0] if isinstance(archs, list) and archs else archs
    return HFConfigFacts(str(path), num_layers, num_kv_heads, int(head_size), arch, raw.get("model_type"), raw)


def compressed_tensors_kv_dtype(config: HFConfigFacts) -> KVCacheDType:
    """``quantization_config.kv_cache_scheme.type``: "int" -> int8 scales, otherwise fp8 (the default)."""
    quant = config.raw.get("quantization_config") or config.raw.get("compression_config") or {}
    scheme = quant.get("kv_cache_scheme") if isinstance(quant, dict) else None
    if isinstance(scheme, dict) and scheme.get("type") == "int":
        return KVCacheDType.INT8
    return KVCacheDType.FP8_E4M3
