"""Which KV heads (and so which per-head or per-channel scales) each tensor-parallel rank holds.

Per-channel scales shard with their heads: a rank gets the whole channel vector of each KV head it holds.

Mirrors vLLM's ``QKVParallelLinear``: with fewer KV heads than ranks, heads are replicated
(rank r holds head ``r * heads // tp``); otherwise each rank holds ``heads / tp`` consecutive heads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import ScalesValidationError, ShardingError
from .format import Granularity, KVCacheDType, LayerScales, ModelFacts, ScalesFile

if TYPE_CHECKING:  # pragma: no cover
    import torch


def kv_heads_for_rank(total_num_kv_heads: int, tp_size: int, rank: int, *, file: str | None = None) -> list[int]:
    """Global indices of the KV heads that tensor-parallel ``rank`` of ``tp_size`` holds."""
    where = f"{file}: " if file else ""
    if total_num_kv_heads < 1 or tp_size < 1:
        raise ShardingError(
            f"{where}num_kv_heads = {total_num_kv_heads} and tp_size = {tp_size} must both be positive"
        )
    if not 0 <= rank < tp_size:
        raise ShardingError(f"{where}rank = {rank} is outside tensor-parallel size {tp_size} (0..{tp_size - 1})")
    if tp_size >= total_num_kv_heads:
        if tp_size % total_num_kv_heads != 0:
            raise ShardingError(
                f"{where}cannot split {total_num_kv_heads} KV heads over tensor-parallel size {tp_size}: "
                f"with more ranks than KV heads, tp_size must be a multiple of the KV head count"
            )
        return [rank * total_num_kv_heads // tp_size]
    if total_num_kv_heads % tp_size != 0:
        raise ShardingError(
            f"{where}cannot split {total_num_kv_heads} KV heads over tensor-parallel size {tp_size}: "
            f"the KV head count must be divisible by tp_size"
        )
    per_rank = total_num_kv_heads // tp_size
    return list(range(rank * per_rank, (rank + 1) * per_rank))


def layer_scales_for_rank(
    layer: LayerScales, tp_size: int, rank: int, total_num_kv_heads: int, *, file: str | None = None
) -> LayerScales:
    """The scales of the KV heads tensor-parallel ``rank`` holds (per-tensor: ``layer`` unchanged;
    per-channel: each held head's whole channel vector)."""
    heads = kv_heads_for_rank(total_num_kv_heads, tp_size, rank, file=file)
    if layer.is_per_tensor:
        return layer
    want = total_num_kv_heads * layer.channels
    for field, values in (("k_scale", layer.k_scale), ("v_scale", layer.v_scale)):
        if len(values) != want:
            per = f" x {layer.channels} channels" if layer.channels > 1 else ""
            raise ScalesValidationError(
                file, layer.name, field, list(values),
                f"has {len(values)} values but the model has {total_num_kv_heads} KV heads{per} = {want}",
            )  # fmt: skip
    return layer.heads(heads)


@dataclass(frozen=True)
class ShardedScales:
    """The part of a sidecar one rank uses: per-head lists cut down to the rank's KV heads."""

    kv_dtype: KVCacheDType
    granularity: Granularity
    model: ModelFacts  # facts of the whole model (all heads)
    tp_size: int
    rank: int
    kv_heads: tuple[int, ...]
    layers: dict[str, LayerScales]
    source_path: str | None = None


def shard_scales(scales: ScalesFile, tp_size: int, rank: int) -> ShardedScales:
    """Cut every layer's scales down to ``rank``'s KV heads (per-tensor layers are shared as is)."""
    total = scales.model.num_kv_heads
    heads = kv_heads_for_rank(total, tp_size, rank, file=scales.source_path)
    layers = {
        name: layer_scales_for_rank(ls, tp_size, rank, total, file=scales.source_path)
        for name, ls in scales.layers.items()
    }
    return ShardedScales(
        scales.kv_dtype, scales.granularity, scales.model, tp_size, rank, tuple(heads), layers, scales.source_path
    )


def scales_as_tensors(layer_scales: LayerScales, device: "torch.device | str" = "cpu") -> tuple["torch.Tensor", "torch.Tensor"]:
    """fp32 tensors ``(k, v)`` of shape [1] (per-tensor), [KV heads on this rank] (per-head) or
    [KV heads on this rank, head size] (per-channel)."""
    import torch

    k = torch.tensor(layer_scales.k_scale, dtype=torch.float32, device=device)
    v = torch.tensor(layer_scales.v_scale, dtype=torch.float32, device=device)
    if layer_scales.channels > 1:
        k, v = k.view(-1, layer_scales.channels), v.view(-1, layer_scales.channels)
    return k, v
