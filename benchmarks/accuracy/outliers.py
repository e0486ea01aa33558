"""An "outlier" variant of a Llama checkpoint that computes the same function, with a few large K/V channels.

Real LLMs' keys have a few channels an order of magnitude larger than the rest, fixed per head
(KIVI, Liu et al. 2024; KVQuant, Hooper et al. 2024), concentrated in the low-frequency RoPE
dimensions of Q and K from the first layers on (Jin et al. 2025, "Massive values in self-attention
modules ..."); values show no such fixed channels. A small model trained here has none, so static
per-tensor and per-head scales look alike on it. This module plants them without changing the
model's function:

- K: both channels ``i`` and ``i + head_dim/2`` of a RoPE pair (HF's ``rotate_half`` and vLLM's
  neox-style rotary pair them so) of ``k_proj``'s output are multiplied by ``alpha``; RoPE rotates
  the pair as a 2-vector, so it commutes with the common scale. The same channels of every query
  head that reads this KV head (GQA group) are multiplied by ``1/alpha`` in ``q_proj``:
  ``q.k`` is unchanged.
- V: chosen ``v_proj`` output channels are multiplied by ``beta`` and the matching input columns
  of ``o_proj`` (for every query head of the group) by ``1/beta``.

With powers of two for alpha and beta every product is scaled exactly in floating point too, so
the BF16 model computes bit-identical attention scores and outputs; only the 8-bit cache sees the
outliers. Plans are seeded and recorded in the results JSON.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class OutlierSettings:
    """How many outlier channels, where and how large (per layer and KV head, seeded)."""

    k_alphas: tuple[float, ...] = (8.0, 16.0, 32.0)  # K outlier factor, one drawn per KV head
    k_pairs: tuple[int, ...] = (1, 2)  # RoPE pairs (2 channels each) per KV head, one count drawn per head
    k_band: float = 0.25  # pairs drawn from this lowest-frequency fraction of the head's RoPE pairs
    v_betas: tuple[float, ...] = (4.0, 8.0)  # V outlier factor
    v_head_fraction: float = 0.5  # share of KV heads that get a V outlier channel
    v_channels: int = 1  # V outlier channels per such head
    seed: int = 0

    def validate(self) -> None:
        for name in ("k_alphas", "v_betas"):
            values = getattr(self, name)
            if not values:
                raise ValueError(f"outlier settings: {name} is empty")
            for v in values:
                if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                    raise ValueError(f"outlier settings: {name} has {v!r}; factors must be finite and > 0")
        if not self.k_pairs or any(not isinstance(n, int) or n < 0 for n in self.k_pairs):
            raise ValueError(f"outlier settings: k_pairs {self.k_pairs!r} must be non-negative integers")
        if not 0 < self.k_band <= 1:
            raise ValueError(f"outlier settings: k_band {self.k_band!r} must be in (0, 1]")
        if not 0 <= self.v_head_fraction <= 1:
            raise ValueError(f"outlier settings: v_head_fraction {self.v_head_fraction!r} must be in [0, 1]")
        if self.v_channels < 0:
            raise ValueError(f"outlier settings: v_channels {self.v_channels!r} must be >= 0")

    @property
    def exact_in_floating_point(self) -> bool:
        return all(math.log2(v).is_integer() for v in (*self.k_alphas, *self.v_betas))


@dataclass(frozen=True)
class HeadOutliers:
    """The outliers planted in one KV head of one layer."""

    layer: int
    kv_head: int
    k_channels: tuple[int, ...] = field(default_factory=tuple)
    alpha: float = 1.0
    v_channels: tuple[int, ...] = field(default_factory=tuple)
    beta: float = 1.0


def rope_pair(pair_index: int, head_dim: int) -> tuple[int, int]:
    """The two channels neox-style RoPE (HF ``rotate_half``, vLLM Llama) rotates together."""
    if head_dim % 2 or not 0 <= pair_index < head_dim // 2:
        raise ValueError(f"RoPE pair {pair_index} does not exist for head_dim {head_dim}")
    return pair_index, pair_index + head_dim // 2


def plan_outliers(num_layers: int, num_kv_heads: int, head_dim: int, settings: OutlierSettings) -> list[HeadOutliers]:
    """One :class:`HeadOutliers` per (layer, KV head), drawn from ``settings`` with its seed."""
    settings.validate()
    half = head_dim // 2
    band = list(range(half - max(1, math.ceil(half * settings.k_band)), half))
    rng = random.Random(settings.seed)
    plan = []
    for layer in range(num_layers):
        for head in range(num_kv_heads):
            n_pairs = min(rng.choice(settings.k_pairs), len(band))
            pairs = sorted(rng.sample(band, n_pairs))
            k_channels = tuple(sorted(c for p in pairs for c in rope_pair(p, head_dim)))
            alpha = float(rng.choice(settings.k_alphas)) if k_channels else 1.0
            v_channels: tuple[int, ...] = ()
            beta = 1.0
            if rng.random() < settings.v_head_fraction and settings.v_channels:
                v_channels = tuple(sorted(rng.sample(range(head_dim), min(settings.v_channels, head_dim))))
                beta = float(rng.choice(settings.v_betas))
            plan.append(HeadOutliers(layer, head, k_channels, alpha, v_channels, beta))
    return plan


@dataclass(frozen=True)
class AttentionShape:
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_hf_config(cls, config: dict, where: str = "config.json") -> "AttentionShape":
        """Read and check a Llama config: full neox-style rotary, GQA groups that divide evenly."""
        if config.get("model_type") != "llama":
            raise ValueError(f"{where}: model_type {config.get('model_type')!r} is not 'llama'; the outlier "
                             "transform knows Llama's q/k/v/o projections and rotary pairing only")  # fmt: skip
        heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        partial = config.get("partial_rotary_factor", 1.0)
        if partial not in (None, 1, 1.0):
            raise ValueError(f"{where}: partial_rotary_factor {partial} (only fully rotated heads keep pairs i, i+d/2)")
        if heads % kv_heads:
            raise ValueError(f"{where}: {heads} query heads do not split into {kv_heads} KV-head groups")
        if head_dim % 2:
            raise ValueError(f"{where}: head_dim {head_dim} is odd; RoPE needs channel pairs")
        return cls(config["num_hidden_layers"], heads, kv_heads, head_dim)


def _check_shape(tensors: dict, name: str, dim: int, expected: int) -> None:
    if name not in tensors:
        raise KeyError(f"checkpoint has no tensor {name!r}")
    got = tensors[name].shape[dim]
    if got != expected:
        raise ValueError(f"{name}: dimension {dim} is {got}, expected {expected} from config.json")


def apply_outliers(tensors: dict, shape: AttentionShape, plan: list[HeadOutliers]) -> dict:
    """New state dict (HF names) with the plan applied; the input tensors are not modified."""
    out = dict(tensors)
    group = shape.num_heads // shape.num_kv_heads
    d = shape.head_dim
    for h in plan:
        if not (0 <= h.layer < shape.num_layers and 0 <= h.kv_head < shape.num_kv_heads):
            raise ValueError(f"outlier plan names layer {h.layer} KV head {h.kv_head}, outside the model")
        bad = [c for c in (*h.k_channels, *h.v_channels) if not 0 <= c < d]
        if bad:
            raise ValueError(f"outlier plan, layer {h.layer} KV head {h.kv_head}: channels {bad} outside head_dim {d}")
        for c in h.k_channels:
            if (c + d // 2) % d not in h.k_channels:
                raise ValueError(f"outlier plan, layer {h.layer} KV head {h.kv_head}: K channel {c} without its "
                                 f"RoPE partner {(c + d // 2) % d}")  # fmt: skip
        p = f"model.layers.{h.layer}.self_attn"
        q_rows = [qh * d + c for qh in range(h.kv_head * group, (h.kv_head + 1) * group) for c in h.k_channels]
        k_rows = [h.kv_head * d + c for c in h.k_channels]
        v_rows = [h.kv_head * d + c for c in h.v_channels]
        o_cols = [qh * d + c for qh in range(h.kv_head * group, (h.kv_head + 1) * group) for c in h.v_channels]
        for name, rows, factor, dim, size in (
            (f"{p}.k_proj", k_rows, h.alpha, 0, shape.num_kv_heads * d),
            (f"{p}.q_proj", q_rows, 1.0 / h.alpha, 0, shape.num_heads * d),
            (f"{p}.v_proj", v_rows, h.beta, 0, shape.num_kv_heads * d),
            (f"{p}.o_proj", o_cols, 1.0 / h.beta, 1, shape.num_heads * d),
        ):
            if not rows or factor == 1.0:
                continue
            for suffix in ("weight", "bias") if dim == 0 else ("weight",):
                key = f"{name}.{suffix}"
                if suffix == "bias" and key not in out:
                    continue
                _check_shape(out, key, dim, size)
                t = out[key].clone()
                idx = list(rows)
                if dim == 0:
                    t[idx] = t[idx] * factor
                else:
                    t[:, idx] = t[:, idx] * factor
                out[key] = t
    return out


def make_outlier_checkpoint(src: Path, dest: Path, settings: OutlierSettings) -> dict:
    """Copy ``src`` (HF Llama dir, safetensors) to ``dest`` with outliers planted; returns the plan as JSON."""
    from safetensors.torch import load_file, save_file

    config = json.loads((src / "config.json").read_text())
    shape = AttentionShape.from_hf_config(config, str(src / "config.json"))
    plan = plan_outliers(shape.num_layers, shape.num_kv_heads, shape.head_dim, settings)
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{src} has no *.safetensors")
    tensors = {}
    for f in files:
        tensors.update(load_file(f))
    new = apply_outliers(tensors, shape, plan)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and not f.name.startswith("kvquant_scales"):
            shutil.copy2(f, dest / f.name)
    save_file({k: v.contiguous() for k, v in new.items()}, dest / "model.safetensors", metadata={"format": "pt"})
    info = json.loads(json.dumps({  # plain JSON types (lists, not tuples), as the results file holds them
        "settings": asdict(settings),
        "exact_in_floating_point": settings.exact_in_floating_point,
        "plan": [asdict(h) for h in plan],
    }))
    (dest / "outlier_plan.json").write_text(json.dumps(info, indent=1))
    return info


def channel_stats(model_dir: Path, token_windows: list[list[int]]) -> dict:
    """Per layer and KV head: max over channels / median over channels of each channel's absmax of
    ``k_proj`` (pre-RoPE) and ``v_proj`` outputs on ``token_windows`` (transformers, bf16).

    Says how large the planted outliers are relative to the model's own channels.
    """
    import torch
    from transformers import LlamaForCausalLM

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(dev).eval()
    cfg = model.config
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    amax: dict[tuple[int, str], torch.Tensor] = {}

    def hook(layer: int, kind: str):
        def fn(_module, _inp, out):
            a = out.detach().abs().float().reshape(-1, cfg.num_key_value_heads, d).amax(dim=0)
            key = (layer, kind)
            amax[key] = torch.maximum(amax[key], a) if key in amax else a
        return fn

    handles = []
    for i, layer in enumerate(model.model.layers):
        handles.append(layer.self_attn.k_proj.register_forward_hook(hook(i, "k")))
        handles.append(layer.self_attn.v_proj.register_forward_hook(hook(i, "v")))
    with torch.no_grad():
        for i in range(0, len(token_windows), 4):
            model(input_ids=torch.tensor(token_windows[i : i + 4], device=dev))
    for h in handles:
        h.remove()
    out: dict[str, list] = {"k_max_over_median": [], "v_max_over_median": []}
    for (layer, kind), a in sorted(amax.items()):
        ratios = (a.amax(dim=1) / a.median(dim=1).values.clamp(min=1e-12)).tolist()
        out[f"{kind}_max_over_median"].append([round(r, 2) for r in ratios])
    del model
    if dev == "cuda":
        torch.cuda.empty_cache()
    return out
