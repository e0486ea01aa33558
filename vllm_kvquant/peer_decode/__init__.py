"""The peer decode kernels: vLLM's FA3 (``fa3.py``) and FlashInfer (``flashinfer.py``) reading
kvquant's 8-bit cache with kvquant's scales, and the choice between them and ours (``choice.py``).

Ours is in ``kernels/`` (the Triton kernels) and ``vllm_kvquant/decode_runner.py`` (its runner);
that module also holds the per-batch planner / per-layer runner interface all of them implement.
"""

from .choice import DecodeEnv, create_planner, create_runner, resolve_kernel
from .fa3 import FA3DecodePlanner, FA3DecodeRunner
from .flashinfer import FlashInferDecodePlanner, FlashInferDecodeRunner, flashinfer_page_table

__all__ = [
    "DecodeEnv",
    "FA3DecodePlanner",
    "FA3DecodeRunner",
    "FlashInferDecodePlanner",
    "FlashInferDecodeRunner",
    "create_planner",
    "create_runner",
    "flashinfer_page_table",
    "resolve_kernel",
]
