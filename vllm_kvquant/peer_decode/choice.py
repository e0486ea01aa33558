"""Which decode kernel runs: the ``kernel`` option resolved once at start-up, and the factories.

``--additional-config '{"kvquant": {"kernel": "auto|triton|fa3|flashinfer"}}'``

- ``triton``: ours (``decode_runner.TritonDecodeRunner`` over ``kernels/decode_attention.py``):
  fp8 and int8 caches, bf16/fp16 queries, any GPU Triton runs on; on CPU the PyTorch reference
  (or the interpreter). The only kernel with a *varlen* plan (query rows from
  ``query_start_loc``, requests with more than one new token skipped), which full CUDA graphs
  over mixed batches need.
- ``fa3`` (``fa3.py``) and ``flashinfer`` (``flashinfer.py``): the peers, fp8 caches on a CUDA
  GPU only; each file says what it needs.
- ``auto`` (default): ``triton`` everywhere until the side-by-side measurements
  (``python -m benchmarks.kernels.decode``) justify another rule per GPU and dtype. First H100 run
  (``benchmarks/results/decode-nvidia-h100-80gb-hbm3.json``, Llama-3-8B shapes): fa3 is
  0.75-0.93x triton's time (the fp8 query costs accuracy), flashinfer is triton's level.

Asking for a kernel that cannot run (not installed, int8 cache, head size, GPU, model dtype,
per-channel scales for ``fa3``) is a :class:`KVQuantConfigError` naming the option and every reason, raised by
:func:`create_runner` / :func:`create_planner` at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..config import KERNEL_CHOICES
from ..decode_runner import DecodePlanner, DecodeRunner, DecodeSpec, TritonDecodePlanner, TritonDecodeRunner, kernel_option
from ..errors import KVQuantConfigError
from ..kernels.dtypes import KVQuantDType
from . import fa3, flashinfer

PLANNERS: dict[str, type[DecodePlanner]] = {
    "triton": TritonDecodePlanner, "fa3": fa3.FA3DecodePlanner, "flashinfer": flashinfer.FlashInferDecodePlanner,
}  # fmt: skip


@dataclass(frozen=True)
class DecodeEnv:
    """What this process can run, probed once; tests build their own to check every refusal."""

    device_type: str
    capability: tuple[int, int] | None = None
    fa3_missing: str | None = "not probed"  # why vLLM's FA3 cannot run; None when it can
    flashinfer_missing: str | None = "not probed"

    @classmethod
    def probe(cls, device: torch.device | str) -> "DecodeEnv":
        device = torch.device(device)
        if device.type != "cuda":
            return cls(device.type, None, "no CUDA device", "no CUDA device")
        return cls("cuda", torch.cuda.get_device_capability(device), fa3.fa3_missing(), flashinfer.flashinfer_missing())


def resolve_kernel(
    kernel: str, *, kv_dtype: KVQuantDType | str, model_dtype: torch.dtype, head_size: int, env: DecodeEnv,
    per_channel: bool = False,
) -> str:
    """The kernel that will run (``auto`` resolved), or a start-up error saying why not.

    ``per_channel``: the scales are per KV head and channel (sidecar granularity ``per_channel``).
    """
    if kernel not in KERNEL_CHOICES:
        raise KVQuantConfigError(f"{kernel_option(kernel)} is not supported; use one of {list(KERNEL_CHOICES)}")
    kv_dtype = KVQuantDType(kv_dtype)
    if kernel in ("auto", "triton"):
        return "triton"  # auto: the only kernel for int8 and CPU, and no measured rule yet
    reasons = []
    peer, name, missing = (fa3, "FA3", env.fa3_missing) if kernel == "fa3" else (flashinfer, "FlashInfer", env.flashinfer_missing)
    if kv_dtype is not KVQuantDType.FP8_E4M3:
        reasons.append(f"{name} reads fp8_e4m3 caches only and this cache stores {kv_dtype.value} (int8 runs on 'triton')")
    if env.device_type != "cuda":
        reasons.append(f"{name} needs a CUDA GPU and this process runs on {env.device_type}")
    else:
        reasons += peer.gpu_reasons(env.capability, missing)
    reasons += peer.model_reasons(model_dtype, head_size)
    if per_channel:
        reasons += peer.scale_reasons(per_channel)
    if reasons:
        raise KVQuantConfigError(f"{kernel_option(kernel)} cannot run: " + "; ".join(reasons) + ". Use 'triton' or 'auto'.")
    return kernel


def _spec_and_kernel(kernel: str, env: DecodeEnv | None, layer: dict[str, Any]) -> tuple[DecodeSpec, str]:
    spec = DecodeSpec.of(**layer)
    env = env or DecodeEnv.probe(spec.device)
    name = resolve_kernel(
        kernel, kv_dtype=spec.kv_dtype, model_dtype=spec.model_dtype, head_size=spec.head_size, env=env,
        per_channel=spec.per_channel,
    )  # fmt: skip
    return spec, name


def create_planner(
    kernel: str,
    *,
    block_size: int,
    max_num_seqs: int,
    max_num_blocks_per_seq: int,
    workspace: torch.Tensor | None = None,
    env: DecodeEnv | None = None,
    **layer: Any,
) -> DecodePlanner:
    """The per-batch side of ``kernel`` for a KV-cache group. ``layer``: the other fields of
    :class:`DecodeSpec` (``num_heads``, ``num_kv_heads``, ``head_size``, ``scale``, ``sliding_window``,
    ``logits_soft_cap``, ``kv_dtype``, ``model_dtype``, ``device``, ``per_channel``), which every layer
    of the group shares. ``workspace``: triton's split-KV fp32 workspace (allocated when not given)."""
    spec, name = _spec_and_kernel(kernel, env, dict(layer, max_num_seqs=max_num_seqs))
    planner = PLANNERS[name](spec, block_size, max_num_blocks_per_seq)
    planner.allocate(workspace)
    return planner


def create_runner(
    kernel: str,
    *,
    per_head: bool,
    per_channel: bool = False,
    k_scale: torch.Tensor | float | None = None,
    v_scale: torch.Tensor | float | None = None,
    env: DecodeEnv | None = None,
    **layer: Any,
) -> DecodeRunner:
    """One layer's side of ``kernel``. ``layer``: the other fields of :class:`DecodeSpec` (as for
    :func:`create_planner`; ``max_num_seqs`` defaults to 256). ``k_scale``/``v_scale``: the layer's
    static per-tensor scales, read to the host once here (FlashInfer takes them as exact host
    scalars; without them it folds them into the query)."""
    spec, name = _spec_and_kernel(kernel, env, dict(layer, per_head=per_head or per_channel, per_channel=per_channel))
    if name == "flashinfer":
        return flashinfer.FlashInferDecodeRunner(spec, k_scale=k_scale, v_scale=v_scale)
    return {"triton": TritonDecodeRunner, "fa3": fa3.FA3DecodeRunner}[name](spec)
