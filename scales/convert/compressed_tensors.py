"""llm-compressor / compressed-tensors checkpoints: ``<prefix>.self_attn.{k,v}_scale`` tensors.

Scales are read with ``safetensors.safe_open`` (no full checkpoint load). Also accepted, as vLLM
remaps them: ``<prefix>.k_proj.k_scale`` / ``.k_proj.output_scale`` (ModelOpt, AutoFP8) and names
that already end in ``.attn.k_scale``. Shape [] or [1] is per-tensor; [heads] or [heads, 1] is
per-head; [heads, head_size] or [heads * head_size] is per-channel (channel-wise KV scales, head-major).
Layers of a coarser granularity than the file's finest are repeated to it (a per-tensor value for
every head, a per-head value for every channel of its head).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import ScalesError
from ..format import Granularity, KVCacheDType, LayerScales, ScalesFile
from .model_config import compressed_tensors_kv_dtype, read_config

_PATTERNS = (
    re.compile(r"^(?P<prefix>.+)\.(?P<kv>[kv])_proj\.(?:(?P=kv)_scale|output_scale)$"),
    re.compile(r"^(?P<prefix>.+)\.attn\.(?P<kv>[kv])_scale$"),
    re.compile(r"^(?P<prefix>.+)\.(?P<kv>[kv])_scale$"),
)


def layer_for_tensor(name: str) -> tuple[str, str] | None:
    """``model.layers.0.self_attn.k_scale`` -> (``model.layers.0.self_attn.attn``, "k"); None if not a KV scale."""
    for pattern in _PATTERNS:
        match = pattern.match(name)
        if match:
            return f"{match['prefix']}.attn", match["kv"]
    return None


def _safetensors_files(src: Path) -> list[Path]:
    if src.is_file():
        if src.name.endswith(".index.json"):
            return _from_index(src)
        return [src]
    index = src / "model.safetensors.index.json"
    if index.is_file():
        return _from_index(index)
    single = src / "model.safetensors"
    if single.is_file():
        return [single]
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise ScalesError(f"{src}: no model.safetensors, model.safetensors.index.json or *.safetensors found")
    return files


def _from_index(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ScalesError(f"{index}: not a safetensors index with a 'weight_map' ({exc!r})") from None
    wanted = sorted({f for name, f in weight_map.items() if layer_for_tensor(name)})
    if not wanted:
        raise ScalesError(f"{index}: the checkpoint has no k_scale/v_scale tensors (no KV-cache scales to convert)")
    return [index.parent / f for f in wanted]


def _layer_index(name: str) -> tuple[int, str]:
    match = re.search(r"\.(\d+)\.", name)
    return (int(match.group(1)) if match else -1, name)


def from_compressed_tensors(
    src: str | Path, *, kv_dtype: KVCacheDType | str | None = None, model_dir: str | Path | None = None
) -> ScalesFile:
    """Read KV scales of a compressed-tensors checkpoint (dir, .safetensors file or index)."""
    from safetensors import safe_open

    src = Path(src)
    model_dir = Path(model_dir) if model_dir is not None else (src if src.is_dir() else src.parent)
    config = read_config(model_dir)
    heads = config.num_kv_heads
    found: dict[str, dict[str, tuple[float, ...]]] = {}
    origin: dict[str, str] = {}
    for file in _safetensors_files(src):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                target = layer_for_tensor(name)
                if target is None:
                    continue
                layer, kv = target
                values = tuple(handle.get_tensor(name).float().reshape(-1).tolist())
                if len(values) not in (1, heads, heads * config.head_size):
                    raise ScalesError(
                        f"{file}: tensor '{name}' has {len(values)} values (shape "
                        f"{list(handle.get_slice(name).get_shape())}); expected 1 (per-tensor), {heads} (per-head, "
                        f"num_key_value_heads in {config.path}) or {heads} x {config.head_size} = "
                        f"{heads * config.head_size} (per-channel)"
                    )
                found.setdefault(layer, {})[kv] = values
                origin[layer] = str(file)
    if not found:
        raise ScalesError(f"{src}: the checkpoint has no k_scale/v_scale tensors (no KV-cache scales to convert)")
    for layer, kv in found.items():
        for which in ("k", "v"):
            if which not in kv:
                raise ScalesError(f"{origin[layer]}: layer '{layer}' has a {'v' if which == 'k' else 'k'}_scale but no {which}_scale")
    names = sorted(found, key=_layer_index)
    if len(names) != config.num_layers:
        raise ScalesError(
            f"{src}: KV scales found for {len(names)} layers but {config.path} has num_hidden_layers = "
            f"{config.num_layers} (first layers with scales: {names[:3]})"
        )
    width = max(len(v) for kv in found.values() for v in kv.values())  # values per layer of the finest
    channels = config.head_size if width > heads else 1
    granularity = Granularity.PER_CHANNEL if channels > 1 else Granularity.PER_HEAD if width > 1 else Granularity.PER_TENSOR

    def expand(v: tuple[float, ...]) -> tuple[float, ...]:
        per_value = width // len(v)  # consecutive copies: heads for a shared value, channels for a head's
        return tuple(x for x in v for _ in range(per_value))

    layers = {n: LayerScales(n, expand(found[n]["k"]), expand(found[n]["v"]), channels) for n in names}
    native = compressed_tensors_kv_dtype(config)
    return config.converted(native, granularity, layers, "compressed-tensors", src, kv_dtype)
