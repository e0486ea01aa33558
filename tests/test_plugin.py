"""Registration through vLLM's own plugin loading, in the real vLLM (CPU build in CI)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("vllm")


def _run(code: str) -> str:
    result = subprocess.run(
        # -P: not the checkout's root first on sys.path (its kernels/ would shadow an installed `kernels`)
        [sys.executable, "-P", "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def test_entry_point_is_installed() -> None:
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert eps.get("kvquant") == "vllm_kvquant.plugin:register"


def test_load_general_plugins_resolves_kvquant() -> None:
    out = _run(
        """
        from vllm.plugins import load_general_plugins
        load_general_plugins()
        load_general_plugins()  # idempotent
        from vllm.v1.attention.backends.registry import AttentionBackendEnum
        from vllm.config import AttentionConfig
        member = AttentionConfig(backend="kvquant").backend
        cls = member.get_class()
        from vllm_kvquant.backend import KVQuantAttentionBackend
        assert cls is KVQuantAttentionBackend, cls
        assert AttentionBackendEnum["KVQUANT"] is member
        print("OK", member.name, cls.get_name())
        """
    )
    assert "OK KVQUANT KVQUANT" in out


def test_cpu_platform_selects_kvquant_when_asked() -> None:
    out = _run(
        """
        from vllm.plugins import load_general_plugins
        load_general_plugins()
        from vllm.platforms import current_platform
        from vllm.v1.attention.backends.registry import AttentionBackendEnum
        from vllm.v1.attention.selector import AttentionSelectorConfig
        import torch
        cfg = AttentionSelectorConfig(head_size=64, dtype=torch.bfloat16, kv_cache_dtype="fp8", block_size=16)
        print(current_platform.get_attn_backend_cls(AttentionBackendEnum["KVQUANT"], cfg))
        print(current_platform.get_attn_backend_cls(None, cfg))
        """
    )
    lines = out.strip().splitlines()
    assert lines[-2] == "vllm_kvquant.backend.KVQuantAttentionBackend"
    assert "kvquant" not in lines[-1]


def test_register_is_cheap() -> None:
    out = _run(
        """
        import sys
        from vllm_kvquant.plugin import register
        register()
        import torch
        heavy = [m for m in ("vllm_kvquant.backend", "vllm_kvquant.impl", "vllm_kvquant.kernels") if m in sys.modules]
        print("HEAVY", heavy, "CUDA_INIT", torch.cuda.is_initialized())
        """
    )
    assert "HEAVY [] CUDA_INIT False" in out
