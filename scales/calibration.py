"""Calibration math: K/V statistics -> scales. Pure torch (imported lazily), no vLLM.

The recorder sees each layer's K and V as ``[tokens, kv_heads, head_size]`` (what the
backend is about to quantize) and keeps, per KV head and channel, the running max of |x|
(any granularity is derived from it) or, in percentile mode, a bounded uniform sample of |x|
per KV head to take a percentile of.
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

#: ``{layer: (K stat, V stat[, K RoPE pair-norm amax])}``
Stats = dict[str, tuple["torch.Tensor", ...]]

#: ``vllm-kvquant calibrate``'s granularity when none is given, per storage format: the most
#: accurate one measured (README, "Choosing the granularity"). int8's uniform grid gains from a
#: scale per channel (small channels keep their resolution); fp8's error is relative to each value,
#: so per-channel ranges buy nothing and clip more where held-out values exceed the calibration's.
DEFAULT_GRANULARITY: dict[KVCacheDType, Granularity] = {
    KVCacheDType.INT8: Granularity.PER_CHANNEL,
    KVCacheDType.FP8_E4M3: Granularity.PER_HEAD,
}


def rope_partners(head_size: int, rope: Mapping | None) -> list[int]:
    """Each K channel's RoPE partner, the channel it rotates with (itself where RoPE leaves it alone).

    ``rope``: ``{"rotary_dim", "neox"}`` (vLLM's rotary embedding); neox style pairs channel ``i``
    with ``i + rotary_dim / 2``, GPT-J style ``2i`` with ``2i + 1``; channels from ``rotary_dim`` on
    are not rotated; None (no RoPE): every channel is its own partner.
    """
    partners = list(range(head_size))
    if not rope:
        return partners
    rot = min(int(rope["rotary_dim"]), head_size)
    half = rot // 2
    for i in range(half):
        a, b = (i, i + half) if rope.get("neox", True) else (2 * i, 2 * i + 1)
        partners[a], partners[b] = b, a
    return partners


def default_granularity(kv_dtype: KVCacheDType | str) -> Granularity:
    return DEFAULT_GRANULARITY[KVCacheDType(kv_dtype)]


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
    """Per-layer, per-KV-head statistics of |K| and |V| (``method`` = absmax or percentile).

    ``k_partners`` (:func:`rope_partners`): also keep, per KV head and channel, the max of K's RoPE
    pair norm ``sqrt(k_i^2 + k_partner(i)^2)``. RoPE rotates a pair without changing its norm, so
    that bounds either channel of the pair at any position, also beyond the calibration samples'
    (per-channel K scales take it; a channel's own amax clipped 4x longer held-out contexts).
    """

    def __init__(
        self, method: str = "absmax", percentile: float = 99.99, max_samples: int = 65536, seed: int = 0,
        k_partners: Sequence[int] | None = None,
    ) -> None:  # fmt: skip
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
        self.k_partners = list(k_partners) if k_partners is not None else None

    @property
    def layer_names(self) -> list[str]:
        return list(self._amax)

    def update(self, layer: str, key: "torch.Tensor", value: "torch.Tensor") -> None:
        """Fold one batch in; ``key``/``value`` are ``[tokens, kv_heads, head_size]``."""
        import torch

        per_head, per_channel = [], []
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
            per_channel.append(a.amax(dim=0).cpu() if a.shape[0] else torch.zeros(a.shape[1:]))  # [heads, head_size]
            if self.method == "percentile":
                per_head.append(a.transpose(0, 1).reshape(a.shape[1], -1).cpu())  # [heads, tokens*head_size]
            if name == "key" and self.k_partners is not None:
                per_channel.append(self._pair_norm_amax(layer, a))
        if key.shape[1] != value.shape[1]:
            raise ScalesError(f"layer '{layer}': key has {key.shape[1]} KV heads but value has {value.shape[1]}")
        amax = [per_channel[0], per_channel[-1], *per_channel[1:-1]]  # (K, V[, K pair norm])
        if layer not in self._amax:
            self._amax[layer] = amax
            self._samples[layer] = [_Reservoir(self.max_samples, self._generator) for _ in range(2)]
        else:
            old = self._amax[layer]
            if old[0].shape != amax[0].shape:
                raise ScalesError(
                    f"layer '{layer}': got {amax[0].shape[0]} KV heads of size {amax[0].shape[1]}, earlier batches "
                    f"had {old[0].shape[0]} of size {old[0].shape[1]}"
                )
            self._amax[layer] = [torch.maximum(o, n) for o, n in zip(old, amax)]
        if self.method == "percentile":
            for reservoir, p in zip(self._samples[layer], per_head):
                reservoir.add(p)
        self.num_tokens[layer] = self.num_tokens.get(layer, 0) + int(key.shape[0])

    record = update  # the backend's KVRecorder protocol calls ``record(layer_name, key, value)``

    def _pair_norm_amax(self, layer: str, abs_k: "torch.Tensor") -> "torch.Tensor":
        """``[heads, head_size]``: max over tokens of ``sqrt(k_i^2 + k_partner(i)^2)`` (|k_i| unpaired)."""
        import torch

        partners = self.k_partners
        if len(partners) != abs_k.shape[-1]:
            raise ScalesError(
                f"layer '{layer}': K has head size {abs_k.shape[-1]} but the RoPE pairing covers {len(partners)} channels"
            )
        if not abs_k.shape[0]:
            return torch.zeros(abs_k.shape[1:])
        # On K's device: the backend records CUDA tensors while it calibrates.
        paired = torch.tensor(partners, device=abs_k.device) != torch.arange(len(partners), device=abs_k.device)
        other = abs_k[..., partners]
        norm = torch.where(paired, torch.sqrt(abs_k * abs_k + other * other), abs_k)
        return norm.amax(dim=0).cpu()

    def stats(self) -> Stats:
        """``{layer: (k_stat, v_stat[, k_pair_norm])}`` as fp32 CPU tensors: absmax ``[heads, head_size]``
        (per channel; per-head scales take the max over channels), with ``k_partners`` also K's RoPE
        pair-norm amax; percentile ``[heads]``."""
        if self.method == "absmax":
            return {n: tuple(t.clone() for t in stats) for n, stats in self._amax.items()}
        return {n: (rk.percentile(self.percentile), rv.percentile(self.percentile)) for n, (rk, rv) in self._samples.items()}


def combine_rank_stats(per_rank: Sequence[Mapping[str, tuple["torch.Tensor", "torch.Tensor"]]], total_num_kv_heads: int, tp_size: int) -> Stats:
    """Per-rank stats (rank order) -> whole-model stats: sharded heads are placed, replicated heads maxed.

    Stats are ``[heads]`` or ``[heads, head_size]`` (per channel); channel vectors travel with their heads.
    """
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
        first = [torch.as_tensor(t) for t in per_rank[0][name]]
        combined = [torch.zeros(total_num_kv_heads, *t.shape[1:]) for t in first]
        for rank, stats in enumerate(per_rank):
            heads = torch.tensor(kv_heads_for_rank(total_num_kv_heads, tp_size, rank))
            tensors = [t.detach().float().cpu() for t in stats[name]]
            want = [(len(heads), *t.shape[1:]) for t in first]
            if [tuple(t.shape) for t in tensors] != want:
                raise ScalesError(
                    f"layer '{name}': rank {rank} has statistics of shapes {[tuple(t.shape) for t in tensors]} "
                    f"(K, V[, K pair norm]), expected {want} (KV heads {heads.tolist()})"
                )
            for all_heads, t in zip(combined, tensors):
                all_heads[heads] = torch.maximum(all_heads[heads], t)
        out[name] = tuple(combined)
    return out


def scales_from_amax(
    amax: "torch.Tensor",
    kv_dtype: KVCacheDType | str,
    margin: float = 1.0,
    floor: float = DEFAULT_FLOOR,
    granularity: Granularity | str = Granularity.PER_HEAD,
) -> "torch.Tensor":
    """``scale = max(amax * margin / qmax, floor)`` from ``amax`` ``[heads]`` or ``[heads, head_size]``:
    per_tensor reduces everything with max (shape [1]), per_head the channels (``[heads]``),
    per_channel keeps ``[heads, head_size]`` (and needs per-channel statistics)."""
    import torch

    if not margin > 0:
        raise ScalesError(f"margin = {margin!r} must be > 0")
    a = amax.detach().float()
    granularity = Granularity(granularity)
    if granularity is Granularity.PER_TENSOR:
        a = a.amax().reshape(1)
    elif granularity is Granularity.PER_HEAD:
        a = a.reshape(a.shape[0], -1).amax(dim=1) if a.dim() > 1 else a.reshape(-1)
    elif a.dim() != 2:
        raise ScalesError(
            f"granularity per_channel needs statistics per KV head and channel ([heads, head_size]), got shape "
            f"{tuple(a.shape)} (the percentile method keeps one sample per KV head: use --method absmax)"
        )
    return torch.clamp(a * margin / KVCacheDType(kv_dtype).qmax, min=floor)


def build_scales_file(
    stats: Mapping[str, tuple["torch.Tensor", "torch.Tensor"]],
    kv_dtype: KVCacheDType | str,
    granularity: Granularity | str,
    model: ModelFacts,
    calibration: CalibrationInfo,
    floor: float = DEFAULT_FLOOR,
) -> ScalesFile:
    """Whole-model stats -> a validated :class:`ScalesFile` (margin from ``calibration.margin``, default 1).

    per_channel: V per channel; K per RoPE pair where the stats hold K's pair norms (a third tensor,
    :class:`AmaxRecorder` with ``k_partners``), capped at the head's K amax: stored per channel, a
    pair's two channels equal.
    """
    import torch

    margin = calibration.margin if calibration.margin is not None else 1.0
    granularity = Granularity(granularity)
    channels = model.head_size if granularity is Granularity.PER_CHANNEL else 1
    layers: dict[str, LayerScales] = {}
    for name in model.layer_names:
        if name not in stats:
            raise ScalesError(
                f"layer '{name}' was never seen during calibration (no K/V recorded); "
                f"recorded layers: {list(stats)[:5]}"
            )
        k, v = stats[name][:2]
        if k.shape[:1] != (model.num_kv_heads,) or v.shape[:1] != (model.num_kv_heads,):
            raise ScalesError(
                f"layer '{name}': statistics cover {k.shape[0] if k.dim() else 1} K / {v.shape[0] if v.dim() else 1} "
                f"V heads, the model has {model.num_kv_heads} KV heads"
            )
        if granularity is Granularity.PER_CHANNEL and (k.dim() != 2 or k.shape[1] != model.head_size):
            raise ScalesError(
                f"layer '{name}': per_channel needs K/V statistics of shape [{model.num_kv_heads}, {model.head_size}] "
                f"(KV heads x head size), got {tuple(k.shape)} (the percentile method keeps one sample per KV head: "
                "use --method absmax)"
            )
        if granularity is Granularity.PER_CHANNEL and len(stats[name]) > 2:
            # K's RoPE pair norms bound a pair's channels at any position (AmaxRecorder), but a
            # pair norm can reach 1.41x the head's largest |K|: capped at that per-head amax, no
            # channel gets a coarser int8 step than per_head gives it, and none clips more often.
            k = torch.minimum(torch.as_tensor(stats[name][2]), torch.as_tensor(k).amax(dim=-1, keepdim=True))
        ks = scales_from_amax(k, kv_dtype, margin, floor, granularity)
        vs = scales_from_amax(v, kv_dtype, margin, floor, granularity)
        layers[name] = LayerScales(name, tuple(ks.reshape(-1).tolist()), tuple(vs.reshape(-1).tolist()), channels)
    scales = ScalesFile(KVCacheDType(kv_dtype), granularity, model, calibration, layers, None)
    validate_scales(scales)
    return scales
