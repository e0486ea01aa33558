"""Calibration math: K/V statistics -> scales. Pure torch (imported lazily), no vLLM.

The recorder sees each layer's K and V as ``[tokens, kv_heads, head_size]`` (what the
backend is about to quantize) and keeps, per KV head, the running max of |x| or, in
percentile mode, a bounded uniform sample of |x| to take a percentile of.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from .errors import ScalesError
from .format import CalibrationInfo, Granularity, KVCacheDType, LayerScales, ModelFacts, ScalesFile
from .sharding import kv_heads_for_rank
from .validate import validate_scales

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: Smallest scale written. A head whose K or V was all zeros (amax 0) would otherwise get
#: scale 0, which the format forbids and which would divide by zero when quantizing; 1e-8
#: keeps it positive while still representing the (zero) values exactly.
DEFAULT_FLOOR = 1e-8

Stats = dict[str, tuple["torch.Tensor", "torch.Tensor"]]


class _Reservoir:
    """Bounded, approximately uniform sample of |x| per head over the whole stream."""

    def __init__(self, capacity: int, generator: "torch.Generator") -> None:
        self.capacity = capacity
        self.generator = generator
        self.samples: torch.Tensor | None = None  # [heads, <= capacity]
        self.seen = 0

    def add(self, values: "torch.Tensor") -> None:  # values: [heads, n]
        import torch

        n_new = values.shape[1]
        if self.samples is None:
            self.samples, self.seen = values[:, :0], 0
        total = self.seen + n_new
        if self.samples.shape[1] + n_new <= self.capacity:
            self.samples = torch.cat([self.samples, values], dim=1)
        else:  # keep old and new in proportion to how many items each stands for
            keep_new = min(n_new, max(1, round(self.capacity * n_new / total)))
            keep_old = min(self.samples.shape[1], self.capacity - keep_new)
            old_idx = torch.randperm(self.samples.shape[1], generator=self.generator)[:keep_old]
            new_idx = torch.randperm(n_new, generator=self.generator)[:keep_new]
            self.samples = torch.cat([self.samples[:, old_idx], values[:, new_idx]], dim=1)
        self.seen = total

    def percentile(self, q: float) -> "torch.Tensor":
        import torch

        return torch.quantile(self.samples, q / 100.0, dim=1)


class AmaxRecorder:
    """Per-layer, per-KV-head statistics of |K| and |V| (``method`` = absmax or percentile)."""

    def __init__(self, method: str = "absmax", percentile: float = 99.99, max_samples: int = 65536, seed: int = 0) -> None:
        import torch

        if method not in ("absmax", "percentile"):
            raise ScalesError(f"calibration method {method!r} is not supported (use 'absmax' or 'percentile')")
        if method == "percentile" and not 0 < percentile <= 100:
            raise ScalesError(f"percentile = {percentile!r} must be in (0, 100]")
        self.method = method
        self.percentile = percentile
        self.max_samples = max_samples
        self._generator = torch.Generator().manual_seed(seed)
        self._amax: dict[str, list[torch.Tensor]] = {}
        self._samples: dict[str, list[_Reservoir]] = {}
        self.num_tokens: dict[str, int] = {}
        self.nonfinite: dict[str, int] = {}

    @property
    def layer_names(self) -> list[str]:
        return list(self._amax)

    def update(self, layer: str, key: "torch.Tensor", value: "torch.Tensor") -> None:
        """Fold one batch in; ``key``/``value`` are ``[tokens, kv_heads, head_size]``."""
        import torch

        per_head = []
        for name, x in (("key", key), ("value", value)):
            if x.dim() != 3:
                raise ScalesError(
                    f"layer '{layer}': {name} has shape {tuple(x.shape)}; expected [tokens, kv_heads, head_size]"
                )
            a = x.detach().float().abs()
            bad = int((~torch.isfinite(a)).sum())
            if bad:
                self.nonfinite[layer] = self.nonfinite.get(layer, 0) + bad
                a = torch.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
            per_head.append(a.transpose(0, 1).reshape(a.shape[1], -1).cpu())  # [heads, tokens*head_size]
        if key.shape[1] != value.shape[1]:
            raise ScalesError(f"layer '{layer}': key has {key.shape[1]} KV heads but value has {value.shape[1]}")
        amax = [p.amax(dim=1) if p.shape[1] else torch.zeros(p.shape[0]) for p in per_head]
        if layer not in self._amax:
            self._amax[layer] = amax
            self._samples[layer] = [_Reservoir(self.max_samples, self._generator) for _ in range(2)]
        else:
            old = self._amax[layer]
            if old[0].shape != amax[0].shape:
                raise ScalesError(
                    f"layer '{layer}': got {amax[0].shape[0]} KV heads, earlier batches had {old[0].shape[0]}"
                )
            self._amax[layer] = [torch.maximum(o, n) for o, n in zip(old, amax)]
        if self.method == "percentile":
            for reservoir, p in zip(self._samples[layer], per_head):
                reservoir.add(p)
        self.num_tokens[layer] = self.num_tokens.get(layer, 0) + int(key.shape[0])

    record = update  # the backend's KVRecorder protocol calls ``record(layer_name, key, value)``

    def stats(self) -> Stats:
        """``{layer: (k_stat[heads], v_stat[heads])}`` as fp32 CPU tensors (amax or percentile)."""
        if self.method == "absmax":
            return {n: (k.clone(), v.clone()) for n, (k, v) in self._amax.items()}
        return {n: (rk.percentile(self.percentile), rv.percentile(self.percentile)) for n, (rk, rv) in self._samples.items()}


def combine_rank_stats(per_rank: Sequence[Mapping[str, tuple["torch.Tensor", "torch.Tensor"]]], total_num_kv_heads: int, tp_size: int) -> Stats:
    """Per-rank stats (rank order) -> whole-model stats: sharded heads are placed, replicated heads maxed."""
    import torch

    if len(per_rank) != tp_size:
        raise ScalesError(f"got statistics from {len(per_rank)} ranks, expected tp_size = {tp_size}")
    names = list(per_rank[0])
    for rank, stats in enumerate(per_rank):
        if set(stats) != set(names):
            diff = sorted(set(stats) ^ set(names))
            raise ScalesError(f"rank {rank} recorded other layers than rank 0 (differing: {diff[:5]})")
    out: Stats = {}
    for name in names:
        k_all = torch.zeros(total_num_kv_heads)
        v_all = torch.zeros(total_num_kv_heads)
        for rank, stats in enumerate(per_rank):
            heads = torch.tensor(kv_heads_for_rank(total_num_kv_heads, tp_size, rank))
            k, v = (t.detach().float().cpu().reshape(-1) for t in stats[name])
            if k.numel() != len(heads) or v.numel() != len(heads):
                raise ScalesError(
                    f"layer '{name}': rank {rank} has {k.numel()} K / {v.numel()} V head statistics, "
                    f"expected {len(heads)} (KV heads {heads.tolist()})"
                )
            k_all[heads] = torch.maximum(k_all[heads], k)
            v_all[heads] = torch.maximum(v_all[heads], v)
        out[name] = (k_all, v_all)
    return out


def scales_from_amax(
    amax: "torch.Tensor",
    kv_dtype: KVCacheDType | str,
    margin: float = 1.0,
    floor: float = DEFAULT_FLOOR,
    granularity: Granularity | str = Granularity.PER_HEAD,
) -> "torch.Tensor":
    """``scale = max(amax * margin / qmax, floor)``; per_tensor first reduces heads with max (shape [1])."""
    import torch

    if not margin > 0:
        raise ScalesError(f"margin = {margin!r} must be > 0")
    a = amax.detach().float().reshape(-1)
    if Granularity(granularity) is Granularity.PER_TENSOR:
        a = a.amax().reshape(1)
    return torch.clamp(a * margin / KVCacheDType(kv_dtype).qmax, min=floor)


def build_scales_file(
    stats: Mapping[str, tuple["torch.Tensor", "torch.Tensor"]],
    kv_dtype: KVCacheDType | str,
    granularity: Granularity | str,
    model: ModelFacts,
    calibration: CalibrationInfo,
    floor: float = DEFAULT_FLOOR,
) -> ScalesFile:
    """Whole-model stats -> a validated :class:`ScalesFile` (margin from ``calibration.margin``, default 1)."""
    margin = calibration.margin if calibration.margin is not None else 1.0
    layers: dict[str, LayerScales] = {}
    for name in model.layer_names:
        if name not in stats:
            raise ScalesError(
                f"layer '{name}' was never seen during calibration (no K/V recorded); "
                f"recorded layers: {list(stats)[:5]}"
            )
        k, v = stats[name]
        if k.numel() != model.num_kv_heads or v.numel() != model.num_kv_heads:
            raise ScalesError(
                f"layer '{name}': statistics cover {k.numel()} K / {v.numel()} V heads, "
                f"the model has {model.num_kv_heads} KV heads"
            )
        ks = scales_from_amax(k, kv_dtype, margin, floor, granularity)
        vs = scales_from_amax(v, kv_dtype, margin, floor, granularity)
        layers[name] = LayerScales(name, tuple(ks.tolist()), tuple(vs.tolist()))
    scales = ScalesFile(KVCacheDType(kv_dtype), Granularity(granularity), model, calibration, layers, None)
    validate_scales(scales)
    return scales
