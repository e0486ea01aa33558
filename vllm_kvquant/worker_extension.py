"""Methods vLLM mixes into its workers when ``worker_extension_cls`` names this class.

``LLM(..., worker_extension_cls="vllm_kvquant.worker_extension.KVQuantWorkerExtension")`` then
``llm.collective_rpc("kvquant_backend_report")`` shows, per rank, which attention backend each
layer runs and the scales it holds: how tests (and users) prove kvquant is really in use.
Calibration records through the same class. One class only: vLLM adds the extension to its
worker class once per process and refuses a second class defining the same methods.
"""

from __future__ import annotations

from typing import Any

EXTENSION_PATH = f"{__name__}.KVQuantWorkerExtension"


class KVQuantWorkerExtension:
    vllm_config: Any  # provided by the vLLM worker this class is mixed into

    def kvquant_backend_report(self) -> dict[str, dict]:
        from .layer_scales import LAYER_ATTR

        report = {}
        for name, layer in self.vllm_config.compilation_config.static_forward_context.items():
            get_backend = getattr(layer, "get_attn_backend", None)
            if get_backend is None:
                continue
            state = getattr(layer, LAYER_ATTR, None)
            report[name] = {
                "backend": get_backend().get_name(),
                "kv_cache_dtype": getattr(layer, "kv_cache_dtype", None),
                "kv_dtype": state.kv_dtype.value if state else None,
                "k_scale": state.k_scale.tolist() if state else None,
                "v_scale": state.v_scale.tolist() if state else None,
                "scales_source": state.source if state else None,
            }
        return report

    def kvquant_step_report(self) -> dict:
        """This rank's resolved CUDA-graph mode and capture sizes (after vLLM checked the backends'
        support) and the kvquant steps so far: mixed decode+prefill steps and how many of them
        were replayed from full CUDA graphs (``metadata.step_counts``)."""
        from .metadata import step_counts

        comp = self.vllm_config.compilation_config
        mode = getattr(comp, "cudagraph_mode", None)
        return {
            "cudagraph_mode": getattr(mode, "name", None if mode is None else str(mode)),
            "capture_sizes": sorted(int(s) for s in (getattr(comp, "cudagraph_capture_sizes", None) or [])),
            **step_counts(),
        }

    def kvquant_rope_layout(self) -> dict | None:
        """The model's RoPE layout (which K channels rotate into each other): per-channel K scales
        are calibrated per RoPE pair (``scales.calibration.rope_partners``)."""
        from . import compat

        return rope_layout(compat.worker_model(self))

    def kvquant_start_recording(self, method: str, percentile: float, seed: int) -> int:
        from . import calibration_hooks
        from .scales import AmaxRecorder
        from .scales.calibration import rope_partners

        rope = self.kvquant_rope_layout()  # K's RoPE pair norms too, for per-channel K scales
        partners = rope_partners(rope["head_size"], rope) if rope else None
        calibration_hooks.set_recorder(AmaxRecorder(method=method, percentile=percentile, seed=seed, k_partners=partners))
        return 0

    def kvquant_collect(self) -> dict[str, dict]:
        """This rank's statistics (plain lists, cheap to send) and token counts; stops recording."""
        from . import calibration_hooks

        recorder = calibration_hooks.active_recorder()
        calibration_hooks.set_recorder(None)
        if recorder is None:
            return {"stats": {}, "num_tokens": {}, "nonfinite": {}}
        return {
            "stats": {name: tuple(t.tolist() for t in stats) for name, stats in recorder.stats().items()},
            "num_tokens": dict(recorder.num_tokens),
            "nonfinite": dict(recorder.nonfinite),
        }


def rope_layout(model: Any) -> dict | None:
    """``{"head_size", "rotary_dim", "neox"}`` of the model's first rotary embedding (vLLM's
    ``RotaryEmbeddingBase`` attributes, the same in every supported release); None without one."""
    for module in model.modules() if model is not None else ():
        if all(hasattr(module, a) for a in ("rotary_dim", "is_neox_style", "head_size")):
            return {"head_size": int(module.head_size), "rotary_dim": int(module.rotary_dim),
                    "neox": bool(module.is_neox_style)}  # fmt: skip
    return None
