"""The online fallback inside vLLM: measure each layer's scales from its first real batch.

Without a sidecar (``fallback: online``, the default) every kvquant layer starts with per-head
placeholder scales and an :class:`OnlineScales` observer. The cache write calls
``observe(key, value, slot_mapping, state)`` *before* quantizing; the first batch holding real
tokens (``slot_mapping >= 0``) sets the scales in place (``copy_``: CUDA graphs captured at
start-up hold these tensors' addresses) and freezes them; the observer then detaches itself
(``state.online = None``), so a later write pays one attribute check.

What is measured, and where (vLLM runs a replayed CUDA graph without any Python):
- never: vLLM's profile run (no slot mapping: the cache write is not called), its warm-up
  and CUDA-graph-capture dummy runs (every slot is -1), the padding rows of real batches.
- eagerly (one host sync per layer and call, until frozen): every batch whose cache write
  runs as Python. In vLLM's default ``FULL_AND_PIECEWISE`` mode that is every batch holding
  a prefill: mixed batches run piecewise graphs and ``unified_kv_cache_update`` is one of
  their splitting ops, i.e. it runs eagerly between the graph pieces.
- not in full graphs of uniform decode batches (``FULL_AND_PIECEWISE``/``FULL_DECODE_ONLY``):
  a decode reads context an earlier prefill wrote, so the layer froze before. Recording the
  measurement there would cost every decode step about 25 small kernels per layer for ever
  (measured: 55 us per layer and step on an H200), so it is not done. The one exception: a
  process whose very first batch is made only of one-token prompts (vLLM batches those as
  decodes) writes them with the placeholder scale 1.0 and measures at its first prefill.
- recorded into the graph, everywhere else under capture: full graphs of mixed batches
  (``cudagraph_mode=FULL``, kvquant declares ``AttentionCGSupport.ALWAYS``) and piecewise
  graphs that hold the cache write (custom ``splitting_ops``, Inductor graph partition,
  breakable CUDA graphs) may replay the very first prefill. The measurement is device-side
  only and decides on the device whether it is still due, so the graph stays correct; it
  costs the per-step time above, and a warning says so once. Calibrated scales avoid it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch

from .errors import KVQuantConfigError
from .kernels.dtypes import KVQuantDType
from .scales.calibration import DEFAULT_FLOOR
from .scales.errors import CALIBRATE_COMMAND
from .scales.online import freeze_from_first_batch_, online_margin

logger = logging.getLogger("vllm.kvquant")


def _capturing(key: torch.Tensor) -> bool:
    return key.is_cuda and torch.cuda.is_current_stream_capturing()


def _capturing_decode_graph() -> bool:
    """Whether the CUDA graph being captured is a full graph of uniform decode batches only."""
    try:
        from vllm.forward_context import get_forward_context, is_forward_context_available

        if not is_forward_context_available():
            return False
        context = get_forward_context()
        mode = context.cudagraph_runtime_mode
        uniform = bool(getattr(context.batch_descriptor, "uniform", False))
    except (ImportError, AttributeError, AssertionError):
        return False
    return getattr(mode, "name", str(mode)) == "FULL" and uniform


class OnlineScalesRegistry:
    """The observers of one process: logs one summary when the last of them froze."""

    def __init__(self) -> None:
        self.reset(None)

    def reset(self, engine: Any) -> None:
        """Forget the observers of an earlier engine of this process (``LLM`` made twice)."""
        self.engine = engine
        self.observers: list[OnlineScales] = []
        self.num_frozen = 0
        self.tp = (0, 1)
        self._warned_in_graph = False

    def add(self, observer: "OnlineScales") -> None:
        self.observers.append(observer)

    def frozen(self, observer: "OnlineScales") -> None:
        self.num_frozen += 1
        if self.num_frozen == len(self.observers):
            self._log_summary()

    def recorded_in_graph(self, layer_name: str) -> None:
        if self._warned_in_graph:
            return
        self._warned_in_graph = True
        logger.warning(
            "kvquant: the KV-cache write of %s is captured inside a CUDA graph that may replay a prefill "
            "(cudagraph_mode=FULL, or a piecewise graph holding the cache write), so the online scale "
            "measurement is recorded into the graph and runs on every replay (about 25 small kernels per "
            "layer and step; measured 55 us per layer on an H200). Calibrated scales avoid that cost: %s",
            layer_name, CALIBRATE_COMMAND,
        )

    def _log_summary(self) -> None:
        k = torch.cat([o.k_scale.detach().reshape(-1).cpu() for o in self.observers])
        v = torch.cat([o.v_scale.detach().reshape(-1).cpu() for o in self.observers])
        tokens = sorted({o.num_tokens for o in self.observers if o.num_tokens is not None})
        first = self.observers[0]
        logger.info(
            "kvquant: online %s scales measured from the first batch (%s real tokens) and frozen for %d "
            "layer(s) (%d KV heads each on tp rank %d of %d, margin %gx): K scale %.4g .. %.4g, V scale %.4g .. %.4g",
            first.kv_dtype.value, "/".join(map(str, tokens)) or "?", len(self.observers), first.k_scale.numel(),
            self.tp[0], self.tp[1], first.margin, float(k.min()), float(k.max()), float(v.min()), float(v.max()),
        )
        floored = [o.layer_name for o in self.observers if bool((o.k_scale <= o.floor).any() | (o.v_scale <= o.floor).any())]
        if floored:
            logger.warning(
                "kvquant: in the first batch some KV heads of %s held only zeros (or non-finite values); their "
                "scale is the floor %g and later values there saturate. Calibrate: %s",
                floored[:4], first.floor, CALIBRATE_COMMAND,
            )


#: Observers of this process (one per kvquant layer owning a cache, not per KV-sharing layer).
REGISTRY = OnlineScalesRegistry()


class OnlineScales:
    """One layer: measures its per-head K/V scales from the first real batch, then freezes them."""

    def __init__(
        self,
        layer_name: str,
        k_scale: torch.Tensor,
        v_scale: torch.Tensor,
        kv_dtype: KVQuantDType | str,
        registry: OnlineScalesRegistry = REGISTRY,
        margin: float | None = None,
        floor: float = DEFAULT_FLOOR,
    ) -> None:
        self.layer_name = layer_name
        self.k_scale = k_scale  # the layer's own tensors, updated in place
        self.v_scale = v_scale
        self.kv_dtype = KVQuantDType(kv_dtype)
        self.margin = online_margin(self.kv_dtype.value) if margin is None else margin
        self.floor = floor
        self.frozen = torch.zeros(1, dtype=torch.bool, device=k_scale.device)
        self.num_tokens: int | None = None
        self.in_graph = False  # the measurement was recorded into a CUDA graph (may have run there)
        self.registry = registry
        registry.add(self)

    def observe(self, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor, state: Any) -> None:
        """Called by the cache write before it quantizes ``key``/``value`` ([tokens, heads, head_size])."""
        n = min(slot_mapping.shape[0], key.shape[0])  # rows past the slot mapping are never written
        valid = slot_mapping[:n] >= 0
        heads = self.k_scale.numel()
        key, value = key[:n].reshape(n, heads, -1), value[:n].reshape(n, heads, -1)
        update = (self.k_scale, self.v_scale, self.frozen, key, value, valid)
        if _capturing(key):
            if not _capturing_decode_graph():  # this graph may replay a first prefill: measure in it
                freeze_from_first_batch_(*update, self.kv_dtype.value, self.margin, self.floor)
                self.in_graph = True
                self.registry.recorded_in_graph(self.layer_name)
            return
        if n == 0:
            return
        freeze_from_first_batch_(*update, self.kv_dtype.value, self.margin, self.floor)
        if not bool(self.frozen):  # the one host sync per call, until the first real batch
            return
        if not self.in_graph:  # then this very batch was the one measured
            self.num_tokens = int(valid.sum())
        state.online = None
        state.source = f"online (measured from the first batch, {self.num_tokens or '?'} tokens, margin {self.margin:g}x)"
        self.registry.frozen(self)


def check_online_supported(vllm_config: Any) -> None:
    """Refuse setups where per-process online scales cannot be right."""
    if getattr(vllm_config, "kv_transfer_config", None) is not None:
        raise KVQuantConfigError(
            "kvquant: no scales sidecar was found, and online scales are measured by each process from its "
            "own first batch, so KV-cache blocks moved between instances or kept across restarts "
            "(kv_transfer_config is set) would be read with other scales than they were written with. "
            f"Calibrate the model first: {CALIBRATE_COMMAND}"
        )


def attach_online(
    states: Iterable[tuple[str, Any]], tp: tuple[int, int], registry: OnlineScalesRegistry = REGISTRY, engine: Any = None
) -> None:
    """Give each distinct layer state (KV-sharing layers share their owner's) an observer.

    ``engine`` identifies the engine the layers belong to (called once per KV-cache group of it).
    """
    if engine is not None and engine is not registry.engine:
        registry.reset(engine)
    registry.tp = tp
    seen: set[int] = set()
    for name, state in states:
        if id(state) in seen or getattr(state, "online", None) is not None:
            continue
        seen.add(id(state))
        state.online = OnlineScales(name, state.k_scale, state.v_scale, state.kv_dtype, registry)
        state.source = "online (not measured yet)"
