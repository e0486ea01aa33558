"""Convert KV-cache scales from other tools into a ``kvquant_scales.json`` sidecar.

Formats: ``compressed-tensors`` (llm-compressor safetensors), ``vllm-json`` (vLLM's former
kv_cache_scales.json), ``lightllm`` (LightLLM kv_cache_calib.json) and ``kvquant`` (our own
file, e.g. to switch it to another kv_dtype). safetensors/torch load only when needed.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ScalesError
from ..format import ScalesFile
from ..io import SIDECAR_FILENAME, load_scales, read_json, save_scales
from ..validate import validate_scales
from .compressed_tensors import from_compressed_tensors
from .lightllm import from_lightllm
from .vllm_json import from_vllm_json

FORMATS = ("compressed-tensors", "vllm-json", "lightllm", "kvquant")

__all__ = [
    "FORMATS",
    "convert_to_sidecar",
    "convert_scales",
    "detect_format",
    "from_compressed_tensors",
    "from_lightllm",
    "from_vllm_json",
]


def detect_format(path: str | Path) -> str:
    """Name of ``path``'s format (one of :data:`FORMATS`), from its name and, for JSON, its keys."""
    path = Path(path)
    if path.is_dir():
        if (path / "model.safetensors.index.json").is_file() or any(path.glob("*.safetensors")):
            return "compressed-tensors"
        if (path / SIDECAR_FILENAME).is_file():
            return "kvquant"
        raise ScalesError(f"{path}: directory holds no *.safetensors checkpoint or {SIDECAR_FILENAME} to convert")
    if not path.exists():
        raise ScalesError(f"{path}: no such file or directory")
    if path.suffix == ".safetensors" or path.name.endswith(".safetensors.index.json"):
        return "compressed-tensors"
    data = read_json(path)
    if isinstance(data, dict):
        if data.get("format") == "vllm-kvquant-scales":
            return "kvquant"
        if isinstance(data.get("kv_cache"), dict) and "scaling_factor" in data["kv_cache"]:
            return "vllm-json"
        if "scales" in data and ("quant_type" in data or "scales_shape" in data):
            return "lightllm"
    keys = sorted(data)[:8] if isinstance(data, dict) else type(data).__name__
    raise ScalesError(
        f"{path}: unrecognised scales format (top-level keys: {keys}); supported: {list(FORMATS)}"
    )


def _model_dir_for(src: Path, out: Path, model_dir: Path | None) -> Path:
    if model_dir is not None:
        return Path(model_dir)
    for candidate in (out.parent, src if src.is_dir() else src.parent):
        if (candidate / "config.json").is_file():
            return candidate
    raise ScalesError(
        f"{src}: converting needs the model's config.json (layers, KV heads, head size); none found next to "
        f"{out} or {src} - pass the model directory (--model-dir <MODEL>)"
    )


def convert_scales(
    src: Path, *, source_format: str | None = None, kv_dtype: str | None = None, model_dir: Path | None = None, out: Path | None = None
) -> ScalesFile:
    """Read ``src`` in any supported format into a validated :class:`ScalesFile` (nothing written)."""
    src = Path(src)
    fmt = source_format or detect_format(src)
    if fmt not in FORMATS:
        raise ScalesError(f"source format {fmt!r} is not supported (use one of {list(FORMATS)})")
    if fmt == "kvquant":
        scales = load_scales(src)
        scales = scales.retarget(kv_dtype) if kv_dtype is not None else scales
    elif fmt == "compressed-tensors":
        scales = from_compressed_tensors(src, kv_dtype=kv_dtype, model_dir=model_dir)
    else:
        where = _model_dir_for(src, Path(out) if out is not None else src, model_dir)
        convert = from_vllm_json if fmt == "vllm-json" else from_lightllm
        scales = convert(src, model_dir=where, kv_dtype=kv_dtype)
    validate_scales(scales)
    return scales


def convert_to_sidecar(
    src: Path, out: Path, *, source_format: str | None, kv_dtype: str | None, model_dir: Path | None
) -> ScalesFile:
    """Convert ``src`` (format detected when ``source_format`` is None) and write the sidecar ``out``."""
    out = Path(out)
    scales = convert_scales(src, source_format=source_format, kv_dtype=kv_dtype, model_dir=model_dir, out=out)
    written = save_scales(scales, out)
    return ScalesFile(scales.kv_dtype, scales.granularity, scales.model, scales.calibration, scales.layers, str(written))
