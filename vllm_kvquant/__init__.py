"""vllm-kvquant: an 8-bit (FP8 e4m3 / INT8) KV cache for vLLM with calibrated static scales.

Select it with ``--attention-backend kvquant`` (or ``LLM(..., attention_backend="kvquant")``);
the plugin registers itself through vLLM's ``vllm.general_plugins`` entry point.
"""

__version__ = "0.1.0"
