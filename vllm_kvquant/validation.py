"""What the kvquant backend can run, as user-facing reasons.

One function serves vLLM's ``validate_configuration`` (GPU selection) and the impl's own
check at layer construction (the CPU platform skips backend validation).
"""

from __future__ import annotations

from typing import Any

import torch

from . import compat
from .errors import KVQuantConfigError
from .kernels.dtypes import SUPPORTED_ACT_DTYPES, SUPPORTED_BLOCK_SIZES, SUPPORTED_HEAD_SIZES


def unsupported_reasons(
    head_size: int | None = None,
    dtype: torch.dtype | None = None,
    kv_cache_dtype: str | None = None,
    block_size: int | None = None,
    use_mla: bool = False,
    has_sink: bool = False,
    use_sparse: bool = False,
    use_mm_prefix: bool = False,
    attn_type: str | None = None,
    use_non_causal: bool = False,
    use_alibi: bool = False,
    use_pcp: bool = False,
    use_dcp: bool = False,
    **_ignored: Any,
) -> list[str]:
    reasons: list[str] = []
    if head_size is not None and head_size not in SUPPORTED_HEAD_SIZES:
        reasons.append(f"head size {head_size} is not supported by kvquant (supported: {list(SUPPORTED_HEAD_SIZES)})")
    if dtype is not None and dtype not in SUPPORTED_ACT_DTYPES:
        reasons.append(f"model dtype {dtype} is not supported by kvquant (use float16 or bfloat16)")
    if kv_cache_dtype is not None and kv_cache_dtype not in (*compat.ONE_BYTE_CACHE_DTYPES, "auto"):
        reasons.append(
            f"kv_cache_dtype {kv_cache_dtype!r} is not supported by kvquant: leave it 'auto' or set 'fp8' "
            "(kvquant allocates one byte per element and stores fp8_e4m3 or int8 as the scales sidecar says)"
        )
    if block_size is not None and block_size % min(SUPPORTED_BLOCK_SIZES) != 0:
        reasons.append(f"block size {block_size} is not supported by kvquant (use one of {list(SUPPORTED_BLOCK_SIZES)})")
    if use_mla:
        reasons.append("MLA (multi-head latent attention) is not supported by kvquant")
    if use_sparse:
        reasons.append("sparse attention is not supported by kvquant")
    if has_sink:
        reasons.append("attention sinks are not supported by kvquant")
    if use_mm_prefix:
        reasons.append("multimodal prefix (bidirectional) attention is not supported by kvquant")
    if attn_type is not None and attn_type != "decoder":
        reasons.append(f"attention type {attn_type!r} is not supported by kvquant (decoder self-attention only)")
    if use_non_causal:
        reasons.append("non-causal decoder attention is not supported by kvquant")
    if use_alibi:
        reasons.append("ALiBi position biases are not supported by kvquant")
    if use_pcp or use_dcp:
        reasons.append("prefill/decode context parallelism is not supported by kvquant")
    return reasons


def check_supported(layer_description: str, **kwargs: Any) -> None:
    reasons = unsupported_reasons(**kwargs)
    if reasons:
        raise KVQuantConfigError(f"kvquant cannot run {layer_description}: " + "; ".join(reasons))
