"""Give every kvquant attention layer its K/V scales and storage format.

Run once per kv-cache group when vLLM builds the metadata builders, i.e. after the model is
loaded and before any CUDA graph is captured. The sidecar is read and validated once per
process; each layer receives fp32 device tensors for its tensor-parallel shard.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from . import compat, online_scales
from .config import KVQuantConfig
from .errors import KVQuantConfigError
from .kernels.dtypes import KVQuantDType
from .scales.online import ONLINE_METHOD

logger = logging.getLogger("vllm.kvquant")

#: Attribute under which a vLLM attention layer carries its :class:`LayerQuantState`.
LAYER_ATTR = "_kvquant_state"


@dataclass
class LayerQuantState:
    kv_dtype: KVQuantDType
    k_scale: torch.Tensor  # fp32, [1], [num_kv_heads on this rank] or [num_kv_heads on this rank, head_size]
    v_scale: torch.Tensor
    source: str
    # Without a sidecar: measures the scales (in place) from the first real batch, then None.
    online: Any = None

    @property
    def per_channel(self) -> bool:
        """Scales per KV head and channel (a ``per_channel`` sidecar)."""
        return self.k_scale.dim() == 2


_cache: dict[tuple, Any] = {}


def _tp_rank_and_size() -> tuple[int, int]:
    try:
        from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

        return get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
    except (AssertionError, ImportError, RuntimeError):
        return 0, 1


def load_model_scales(vllm_config: Any, all_layer_names: list[str]):
    """Resolve, validate and (if asked) convert the sidecar for this model; cached per process."""
    from .scales import resolve_scales, unit_scales, validate_for_model

    options = KVQuantConfig.from_additional_config(compat.additional_config(vllm_config))
    model_config = vllm_config.model_config
    model_dir = model_config.model
    if options.calibration:
        _refuse_cuda_graphs(vllm_config)
    key = (model_dir, options, tuple(all_layer_names))
    if key in _cache:
        return _cache[key]
    num_kv_heads = model_config.get_total_num_kv_heads()
    head_size = model_config.get_head_size()
    kv_dtype = options.dtype or KVQuantDType.FP8_E4M3.value
    if options.calibration:
        scales = unit_scales(
            kv_dtype=kv_dtype, num_layers=len(all_layer_names), num_kv_heads=num_kv_heads,
            head_size=head_size, layer_names=list(all_layer_names),
        )
        _cache[key] = (scales, options)
        return scales, options
    scales = resolve_scales(
        model_dir if os.path.isdir(str(model_dir)) else None,
        explicit_path=options.scales,
        kv_dtype=kv_dtype,
        num_layers=len(all_layer_names),
        num_kv_heads=num_kv_heads,
        head_size=head_size,
        layer_names=list(all_layer_names),
        fallback=options.fallback,
    )
    validate_for_model(
        scales,
        num_layers=len(all_layer_names),
        num_kv_heads=num_kv_heads,
        head_size=head_size,
        layer_names=list(all_layer_names),
        model_dtype=getattr(model_config, "dtype", None),
    )
    _cache[key] = (scales, options)
    return scales, options


def _refuse_cuda_graphs(vllm_config: Any) -> None:
    mode = getattr(vllm_config.compilation_config, "cudagraph_mode", None)
    if mode is not None and getattr(mode, "name", str(mode)) != "NONE":
        raise KVQuantConfigError(
            f"kvquant calibration records K/V in eager mode only, but CUDA graphs are on "
            f"(cudagraph_mode={getattr(mode, 'name', mode)}); run with enforce_eager=True / --enforce-eager"
        )


def _kvquant_layer_names(vllm_config: Any) -> list[str]:
    """Names of every attention layer of the model that runs on kvquant, in model order."""
    names = []
    for name, layer in vllm_config.compilation_config.static_forward_context.items():
        get_backend = getattr(layer, "get_attn_backend", None)
        if get_backend is None:
            continue
        backend = get_backend()
        # A layer reading another layer's cache (KV sharing) uses that layer's scales.
        shares = getattr(layer, "kv_sharing_target_layer_name", None)
        # By name: this module must not import the backend (which imports the layers' code).
        if getattr(backend, "get_name", lambda: None)() == compat.BACKEND_NAME and not shares:
            names.append(name)
    return names


def attach_layer_scales(vllm_config: Any, layer_names: list[str], device: torch.device) -> None:
    """Set :data:`LAYER_ATTR` on each of ``layer_names`` (idempotent)."""
    from .scales import scales_as_tensors, shard_scales

    layers = compat.attention_layers(vllm_config, layer_names)
    todo = {n: m for n, m in layers.items() if getattr(m, LAYER_ATTR, None) is None}
    if not todo:
        return
    scales, options = load_model_scales(vllm_config, _kvquant_layer_names(vllm_config))
    if options.dtype and options.dtype != scales.kv_dtype.value:
        logger.warning(
            "kvquant: the scales in %s were made for %s; converting them for %s storage.",
            scales.source_path, scales.kv_dtype.value, options.dtype,
        )
        scales = scales.retarget(options.dtype)
    target = KVQuantDType(scales.kv_dtype.value)
    rank, tp_size = _tp_rank_and_size()
    shard = shard_scales(scales, tp_size, rank)
    sharing = {n: m for n, m in todo.items() if getattr(m, "kv_sharing_target_layer_name", None)}
    for name, layer in todo.items():
        if name in sharing:
            continue
        if name not in shard.layers:
            raise KVQuantConfigError(
                f"{scales.source_path or 'kvquant scales'}: layer '{name}' of the model has no scales"
            )
        k, v = scales_as_tensors(shard.layers[name], device)
        setattr(layer, LAYER_ATTR, LayerQuantState(target, k, v, str(scales.source_path)))
    context = vllm_config.compilation_config.static_forward_context
    for name, layer in sharing.items():
        owner = layer.kv_sharing_target_layer_name
        if owner not in shard.layers:
            raise KVQuantConfigError(
                f"{scales.source_path or 'kvquant scales'}: layer '{name}' reads the KV cache of "
                f"'{owner}', which has no scales"
            )
        state = getattr(context.get(owner), LAYER_ATTR, None)
        if state is None:  # the owner gets the same state: online scales update one set of tensors
            k, v = scales_as_tensors(shard.layers[owner], device)
            state = LayerQuantState(target, k, v, str(scales.source_path))
            if owner in context:
                setattr(context[owner], LAYER_ATTR, state)
        setattr(layer, LAYER_ATTR, state)
    if scales.calibration.method == ONLINE_METHOD:
        online_scales.check_online_supported(vllm_config)
        states = ((n, getattr(m, LAYER_ATTR)) for n, m in todo.items())
        online_scales.attach_online(states, (rank, tp_size), engine=vllm_config.compilation_config)
    logger.info(
        "kvquant: %d attention layer(s) store %s K/V with %s scales from %s (tp rank %d of %d).",
        len(todo), target.value, scales.granularity.value, scales.source_path or scales.calibration.method, rank, tp_size,
    )


def layer_state(layer: Any) -> LayerQuantState:
    state = getattr(layer, LAYER_ATTR, None)
    if state is None:
        raise KVQuantConfigError(
            f"kvquant: attention layer '{getattr(layer, 'layer_name', '?')}' has no scales attached; "
            "the kvquant metadata builder was not initialised for it"
        )
    return state


def check_scales_split(vllm_config: Any) -> None:
    """Refuse, while vLLM builds its config, a per-head sidecar that the tensor-parallel size cannot split.

    Without this, the first sign would come later from a worker building the model (a bare
    "3 is not divisible by 2" assertion of vLLM's QKV layer) and never name the sidecar.
    Only the split is checked here; everything else is validated where the layers get their scales.
    """
    from .scales import find_sidecar, load_scales, shard_scales

    options = KVQuantConfig.from_additional_config(compat.additional_config(vllm_config))
    parallel_config = getattr(vllm_config, "parallel_config", None)
    tp_size = int(getattr(parallel_config, "tensor_parallel_size", 1) or 1)
    if options.calibration or tp_size == 1:
        return
    model_dir = getattr(getattr(vllm_config, "model_config", None), "model", None)
    path = options.scales or find_sidecar(model_dir if model_dir and os.path.isdir(str(model_dir)) else None)
    if path is None:
        return  # no sidecar (online or unit fallback): no file to name; vLLM refuses a model it cannot split
    scales = load_scales(path)
    for rank in range(tp_size):
        shard_scales(scales, tp_size, rank)
