"""Sidecars and model copies the accuracy schemes need, made from one calibration per model.

- :func:`derive_sidecar`: the absmax statistic is what every granularity and dtype is built from,
  so one ``vllm-kvquant calibrate`` run (fp8_e4m3, per_head) gives the other three per_head /
  per_tensor sidecars exactly: ``amax = scale * qmax``; per_tensor = max over heads; int8 divides by
  127 instead of 448. per_channel is its own run (int8): its K scales bound RoPE pair norms, which
  no per-head statistic holds and which no per-head scale may be derived from; its fp8 sidecar is
  the same amax over 448 (``ScalesFile.retarget``), what ``calibrate --dtype fp8_e4m3`` writes.
- :func:`make_vllm_fp8_checkpoint`: a copy of the model whose checkpoint carries
  ``self_attn.{k,v}_scale`` for vLLM's own fp8 cache (compressed-tensors ``kv_cache_scheme``).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path


def derive_sidecar(src: Path, dtype: str, granularity: str, dest: Path) -> Path:
    """Exact absmax derivation of a sidecar: per_head / per_tensor from a per_head one, per_channel
    (another dtype) from a per_channel one."""
    import torch

    from vllm_kvquant.scales import ModelFacts, build_scales_file, load_scales, save_scales

    s = load_scales(src)
    have = getattr(s.granularity, "value", s.granularity)
    if have == "per_channel" or granularity == "per_channel":
        if have != granularity:
            raise ValueError(f"{src}: a {granularity} sidecar cannot be derived from a {have} one (per_channel K "
                             "scales bound RoPE pair norms, not per-head absmax): calibrate with --granularity "
                             f"{granularity}")  # fmt: skip
        save_scales(s.retarget(dtype), dest)
        return dest
    if have != "per_head":
        raise ValueError(f"{src}: derive from a per_head sidecar (this one is {s.granularity})")
    qmax = s.kv_dtype.qmax
    stats = {n: (torch.tensor(l.k_scale) * qmax, torch.tensor(l.v_scale) * qmax) for n, l in s.layers.items()}
    m = s.model
    facts = ModelFacts(m.num_layers, m.num_kv_heads, m.head_size, tuple(m.layer_names))
    save_scales(build_scales_file(stats, dtype, granularity, facts, s.calibration), dest)
    return dest


def make_vllm_fp8_checkpoint(model_dir: Path, sidecar: Path, dest: Path, per_head: bool) -> Path:
    """Copy of the model whose safetensors carry ``model.layers.N.self_attn.{k,v}_scale`` and whose
    config has a compressed-tensors ``quantization_config`` with only a ``kv_cache_scheme``.

    vLLM 0.26: ``CompressedTensorsConfig`` leaves every Linear unquantized (no config groups) and
    gives each Attention a ``CompressedTensorsKVCacheMethod`` whose ``k_scale``/``v_scale``
    parameters (shape [1], or [num_kv_heads] for strategy ``attn_head``) are filled from the
    checkpoint; the base ``get_cache_scale_mapper`` renames ``.self_attn.k_scale`` ->
    ``.self_attn.attn.k_scale``. ``q_scale`` stays 1.0 (FA3 quantizes the query with it).
    """
    import torch
    from safetensors.torch import load_file, save_file

    from vllm_kvquant.scales import load_scales

    scales = load_scales(sidecar)
    if getattr(scales.kv_dtype, "value", scales.kv_dtype) != "fp8_e4m3":
        raise ValueError(f"{sidecar} is not fp8_e4m3; vLLM's fp8 cache needs fp8_e4m3 scales")
    if per_head and getattr(scales.granularity, "value", scales.granularity) != "per_head":
        raise ValueError(f"{sidecar} is not per_head; the attn_head checkpoint needs per-head scales")
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for f in model_dir.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "config.json" and not f.name.startswith("kvquant_scales"):
            shutil.copy2(f, dest / f.name)
    tensors = {}
    for st in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(st))
    for name, layer in scales.layers.items():
        m = re.fullmatch(r"model\.layers\.(\d+)\.self_attn\.attn", name)
        if not m:
            raise ValueError(f"unexpected layer name {name!r} in {sidecar}")
        prefix = f"model.layers.{m.group(1)}.self_attn"
        k, v = torch.tensor(layer.k_scale, dtype=torch.float32), torch.tensor(layer.v_scale, dtype=torch.float32)
        if not per_head:
            k, v = k.amax().reshape(1), v.amax().reshape(1)
        tensors[f"{prefix}.k_scale"] = k
        tensors[f"{prefix}.v_scale"] = v
    save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((model_dir / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": "dense",
        "quantization_status": "compressed",
        "config_groups": {},
        "ignore": [],
        "kv_cache_scheme": {
            "num_bits": 8, "type": "float", "symmetric": True, "dynamic": False,
            "strategy": "attn_head" if per_head else "tensor",
        },
        "total_num_heads": config["num_attention_heads"],
        "total_num_kv_heads": config["num_key_value_heads"],
    }  # fmt: skip
    (dest / "config.json").write_text(json.dumps(config, indent=1))
    return dest
