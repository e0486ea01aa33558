"""Online scales: per-head K/V scales measured from the first batch a layer writes.

Used when a model has no sidecar (``fallback: online``). Pure torch (imported lazily), no vLLM:
the backend (``vllm_kvquant.online_scales``) decides *when* to measure; this module says *how*.

Every function here is CUDA-graph safe: no host synchronisation, no data-dependent shapes, and
the scale tensors are updated in place (``copy_``), because CUDA graphs captured before the
measurement hold their addresses.

Margin (``scale = max(amax_first_batch * margin / qmax, floor)``): the first batch is a small
sample (a prompt of a few hundred tokens), later tokens reach further into the tails (the max of
n Gaussian samples grows like sqrt(2 ln n): about 1.4x from 10^3 to 10^6 elements per head), and
whatever lies beyond ``margin x`` the first batch's amax saturates for good, since the scales
never change once a token has been written with them.

- fp8 e4m3 (``2.0``): its relative precision is the same (3 mantissa bits) anywhere in its
  normal range of 2^-6 .. 448, so a margin only moves the smallest values a factor 2 closer to
  the subnormals: a 2x headroom costs almost nothing.
- int8 (``2.0``): a uniform grid, so the margin costs resolution everywhere: step =
  2 x amax / 127, i.e. 6 effective bits for the first batch's range. The rounding error
  (step / sqrt(12) = 0.5% of the first batch's amax) stays well under bf16's own rounding of
  the attention logits once summed over a head, whereas a too-small margin clips the large
  channels (RoPE'd K outliers, attention-sink V) that matter most. Measured on the trained
  tiny model (``TRAINED_TINY_LLAMA``, vLLM-CPU, first batch = 32 tokens of short prompts):
  the per-head amax over 1024 calibration tokens was 1.05-1.72x the first batch's, so 1.5
  would have clipped; with 2x, int8 stayed as close to BF16 as fp8 (tests/test_online_scales.py).
  Offline calibration (``vllm-kvquant calibrate``, margin 1 over many tokens) keeps the full
  7 bits and stays the recommended path.

Granularity: online scales are per KV head, never per channel. A channel's range needs many
tokens at many positions to be known: measured on SmolLM2 (README, "Choosing the granularity"),
per-channel K scales calibrated on 16k tokens of 512-token samples still clipped 4x longer
held-out contexts (+2.3% perplexity at margin 1), because RoPE moves a channel pair's energy
from one channel to the other as positions grow. The first batch of a server is one prompt or a
few, at the lowest positions: per-channel scales from it would clip far more, and a margin large
enough to cover that gives back what per-channel resolution gains. Per-channel scales come from
``vllm-kvquant calibrate`` only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .calibration import DEFAULT_FLOOR, scales_from_amax
from .errors import ScalesError
from .format import Granularity, KVCacheDType

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: ``calibration.method`` of the placeholder scales the online fallback starts from.
ONLINE_METHOD = "fallback-online"

#: Headroom over the first batch's per-head amax, per storage format (reasoning above).
ONLINE_MARGINS: dict[KVCacheDType, float] = {KVCacheDType.FP8_E4M3: 2.0, KVCacheDType.INT8: 2.0}


def online_margin(kv_dtype: KVCacheDType | str) -> float:
    return ONLINE_MARGINS[KVCacheDType(kv_dtype)]


def masked_head_amax(x: "torch.Tensor", valid: "torch.Tensor") -> "torch.Tensor":
    """Per-KV-head max |x| over the rows where ``valid`` (fp32, ``[heads]``; 0 where none).

    ``x`` is ``[tokens, heads, head_size]`` (what the cache write quantizes); ``valid`` is
    ``[tokens]`` bool (``slot_mapping >= 0``). Padding rows, which may hold anything (even NaN),
    are masked out by ``where``, never multiplied. Non-finite values of real rows count as 0:
    one broken token must not turn a whole head's scale into NaN or infinity.
    """
    import torch

    if x.dim() != 3:
        raise ScalesError(f"expected K/V of shape [tokens, kv_heads, head_size], got {tuple(x.shape)}")
    if valid.shape != x.shape[:1]:
        raise ScalesError(f"valid has shape {tuple(valid.shape)}; expected [{x.shape[0]}] (one flag per token)")
    if x.shape[0] == 0:
        return torch.zeros(x.shape[1], dtype=torch.float32, device=x.device)
    per_token = torch.linalg.vector_norm(x, ord=float("inf"), dim=2, dtype=torch.float32)  # [tokens, heads]
    per_token = torch.where(valid[:, None] & torch.isfinite(per_token), per_token, 0.0)
    return per_token.amax(dim=0)


def measure_scales(
    key: "torch.Tensor",
    value: "torch.Tensor",
    valid: "torch.Tensor",
    kv_dtype: KVCacheDType | str,
    margin: float | None = None,
    floor: float = DEFAULT_FLOOR,
) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Per-head ``(k_scale, v_scale)`` for this batch: ``max(amax * margin / qmax, floor)``."""
    margin = online_margin(kv_dtype) if margin is None else margin
    if key.shape[:2] != value.shape[:2]:
        raise ScalesError(f"key {tuple(key.shape)} and value {tuple(value.shape)} differ in tokens or KV heads")
    k = scales_from_amax(masked_head_amax(key, valid), kv_dtype, margin, floor, Granularity.PER_HEAD)
    v = scales_from_amax(masked_head_amax(value, valid), kv_dtype, margin, floor, Granularity.PER_HEAD)
    return k, v


def freeze_from_first_batch_(
    k_scale: "torch.Tensor", v_scale: "torch.Tensor", frozen: "torch.Tensor",  # the layer's state, set in place
    key: "torch.Tensor", value: "torch.Tensor", valid: "torch.Tensor",  # this batch, as in measure_scales
    kv_dtype: KVCacheDType | str, margin: float | None = None, floor: float = DEFAULT_FLOOR,
) -> None:  # fmt: skip
    """Write measured scales into ``k_scale``/``v_scale`` unless ``frozen``; freeze on real tokens.

    A batch without any valid token (dummy runs, CUDA-graph capture: every slot is -1) changes
    nothing. The first batch with one measures and sets ``frozen`` (a bool device tensor, one
    element): later batches leave the scales alone, so tokens already in the cache are never
    read back with another scale than the one that wrote them. Decided on the device, so the
    same call works eagerly and recorded in a CUDA graph.
    """
    import torch

    for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
        if s.dtype != torch.float32 or s.numel() != key.shape[1]:
            raise ScalesError(
                f"{name} must be fp32 with one value per KV head ({key.shape[1]}), got {s.dtype} {tuple(s.shape)}"
            )
    k_new, v_new = measure_scales(key, value, valid, kv_dtype, margin, floor)
    seen = valid.any()
    take = seen & ~frozen
    k_scale.copy_(torch.where(take, k_new.reshape(k_scale.shape), k_scale))
    v_scale.copy_(torch.where(take, v_new.reshape(v_scale.shape), v_scale))
    frozen.logical_or_(seen)
