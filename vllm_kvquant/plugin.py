"""vLLM general-plugin entry point (group ``vllm.general_plugins``).

vLLM calls :func:`register` in every process it starts, before configs are built: it must be
idempotent and cheap (no CUDA initialisation, no kernel imports).
"""

from __future__ import annotations

_registered = False


def register() -> None:
    """Register the ``KVQUANT`` attention backend and the platform hooks it needs."""
    global _registered
    if _registered:
        return
    from . import compat

    compat.check_vllm_version()
    compat.register_attention_backend()
    compat.install_platform_hooks(check_config=_check_scales_split)
    _registered = True


def _check_scales_split(vllm_config) -> None:  # type: ignore[no-untyped-def]
    """At config time: a per-head sidecar the tp size cannot split is refused now, not in a worker."""
    from .layer_scales import check_scales_split

    check_scales_split(vllm_config)
