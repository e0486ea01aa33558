"""The KV-cache schemes the accuracy benchmark compares, and the vLLM engine arguments of each.

A :class:`Scheme` says what it stores (``kv_dtype``, ``granularity``) and how vLLM is asked for it:
the kvquant backend with a calibrated sidecar or an engine option (``kvquant_options``, passed
verbatim in ``additional_config["kvquant"]``: an option the installed plugin does not know yet
fails that row with the plugin's own message, not the run), or one of vLLM's own cache formats
(``engine``), possibly on a model copy whose checkpoint carries k/v scales (``checkpoint``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: ``plain`` / ``outlier``: the small Llama trained here and its outlier copy (one tokenizer, one set of
#: windows); ``smollm2``: SmolLM2-135M-Instruct, a real pretrained model (``vllm_kvquant.fetch_model``)
#: evaluated on the same held-out text through its own tokenizer.
MODELS = ("plain", "outlier", "smollm2")
TINY_MODELS = ("plain", "outlier")
DEFAULT_MODELS = "outlier,plain,smollm2"


@dataclass(frozen=True)
class Scheme:
    name: str
    kv_dtype: str  # "bf16" | "fp8_e4m3" | "int8"
    granularity: str | None
    kvquant: bool = False
    sidecar: tuple[str, str] | None = None  # (kv_dtype, granularity) of the calibrated sidecar it reads
    kvquant_options: dict[str, Any] = field(default_factory=dict)
    engine: dict[str, Any] = field(default_factory=dict)  # extra LLM(...) arguments
    checkpoint: str | None = None  # "vllm-fp8-per_tensor" | "vllm-fp8-per_head": model copy with k/v scales
    cuda_only: str | None = None  # why the row cannot run on vLLM's CPU build
    default: bool = True  # in the default run
    note: str = ""


def _kvq(dtype: str, gran: str, **kw) -> Scheme:
    short = "fp8" if dtype == "fp8_e4m3" else dtype
    return Scheme(f"kvquant-{short}-{gran}", dtype, gran, kvquant=True, sidecar=(dtype, gran), **kw)


SCHEMES: tuple[Scheme, ...] = (
    Scheme("bf16", "bf16", None, engine={"attention_backend": "FLASH_ATTN"},
           note="reference: every metric is measured against this row of the same model"),
    Scheme("bf16-triton", "bf16", None, engine={"attention_backend": "TRITON_ATTN"},
           cuda_only="vLLM's CPU build has one BF16 attention backend: no noise floor to measure",
           note="noise floor: the same BF16 cache read by another attention kernel"),
    _kvq("fp8_e4m3", "per_tensor"),
    _kvq("fp8_e4m3", "per_head"),
    _kvq("int8", "per_tensor"),
    _kvq("int8", "per_head"),
    _kvq("int8", "per_channel", note="V per channel, K per RoPE pair (calibrate --granularity per_channel)"),
    _kvq("fp8_e4m3", "per_channel", note="the int8 per_channel calibration's amax over 448"),
    Scheme("kvquant-int8-online", "int8", "per_head (online, no sidecar)", kvquant=True,
           kvquant_options={"fallback": "online", "dtype": "int8"},
           note="no sidecar: scales measured from the first batch each layer writes, then frozen"),
    Scheme("kvquant-fp8-online", "fp8_e4m3", "per_head (online, no sidecar)", kvquant=True,
           kvquant_options={"fallback": "online", "dtype": "fp8_e4m3"}, default=False),
    Scheme("kvquant-int8-per_head-qprefill", "int8", "per_head", kvquant=True, sidecar=("int8", "per_head"),
           kvquant_options={"prefill": "quantized"},
           note="prefill attends to its own K/V through the 8-bit cache too"),
    Scheme("kvquant-fp8-per_head-qprefill", "fp8_e4m3", "per_head", kvquant=True, sidecar=("fp8_e4m3", "per_head"),
           kvquant_options={"prefill": "quantized"}, default=False),
    Scheme("kvquant-fp8-per_head-fa3", "fp8_e4m3", "per_head", kvquant=True, sidecar=("fp8_e4m3", "per_head"),
           kvquant_options={"kernel": "fa3"}, cuda_only="FA3 decode kernel (Hopper)",
           note="decode through vLLM's FA3 fp8 kernel: queries rounded to fp8"),
    Scheme("kvquant-fp8-per_head-flashinfer", "fp8_e4m3", "per_head", kvquant=True,
           sidecar=("fp8_e4m3", "per_head"), kvquant_options={"kernel": "flashinfer"},
           cuda_only="FlashInfer decode kernel (CUDA)", default=False),
    Scheme("vllm-fp8-scale1", "fp8_e4m3", "per_tensor (scale 1.0)", engine={"kv_cache_dtype": "fp8"}),
    Scheme("vllm-fp8-calibrated", "fp8_e4m3", "per_tensor (checkpoint k/v_scale)", checkpoint="vllm-fp8-per_tensor",
           engine={"kv_cache_dtype": "fp8"}, note="compressed-tensors kv_cache_scheme from our fp8 per-tensor sidecar"),
    Scheme("vllm-fp8-calibrated-per_head", "fp8_e4m3", "per_head (checkpoint k/v_scale, attn_head)",
           checkpoint="vllm-fp8-per_head", engine={"kv_cache_dtype": "fp8"}, default=False),
    Scheme("vllm-int8_per_token_head", "int8", "per_token_head (dynamic)",
           engine={"kv_cache_dtype": "int8_per_token_head", "attention_backend": "TRITON_ATTN"}),
)  # fmt: skip
BY_NAME = {s.name: s for s in SCHEMES}
REFERENCE = "bf16"


def select(names: str | None) -> list[Scheme]:
    """Schemes named in a comma list (default: those with ``default``), the reference always first."""
    if names:
        wanted = [n.strip() for n in names.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in BY_NAME]
        if unknown:
            raise ValueError(f"unknown scheme(s) {unknown}; known: {list(BY_NAME)}")
    else:
        wanted = [s.name for s in SCHEMES if s.default]
    chosen = [BY_NAME[REFERENCE]] + [BY_NAME[n] for n in dict.fromkeys(wanted) if n != REFERENCE]
    return chosen


def select_models(names: str) -> list[str]:
    models = [m.strip() for m in names.split(",") if m.strip()]
    bad = [m for m in models if m not in MODELS]
    if bad or not models:
        raise ValueError(f"--models {names!r}: choose from {list(MODELS)}")
    return list(dict.fromkeys(models))


#: The ``vllm-kvquant calibrate`` runs a model needs, as (kv_dtype, granularity) of the file each
#: writes. Every per_head / per_tensor sidecar derives exactly from the fp8 per_head absmax; per_channel
#: needs its own run (K's scales come from RoPE pair norms, which no per-head statistic holds), and
#: its fp8 sidecar is the int8 one's amax retargeted (:func:`benchmarks.accuracy.checkpoints.derive_sidecar`).
PER_HEAD_CALIBRATION = ("fp8_e4m3", "per_head")
PER_CHANNEL_CALIBRATION = ("int8", "per_channel")


def calibration_of(sidecar: tuple[str, str]) -> tuple[str, str]:
    """The calibration run a (kv_dtype, granularity) sidecar derives from."""
    dtype, granularity = sidecar
    if granularity not in ("per_tensor", "per_head", "per_channel") or dtype not in ("int8", "fp8_e4m3"):
        raise ValueError(f"no calibration gives a {dtype} {granularity} sidecar")
    return PER_CHANNEL_CALIBRATION if granularity == "per_channel" else PER_HEAD_CALIBRATION


def calibrations_needed(schemes: list[Scheme]) -> list[tuple[str, str]]:
    """Which calibration runs ``schemes`` need (vLLM fp8 checkpoints are made from the per_head one)."""
    need = {calibration_of(s.sidecar) for s in schemes if s.sidecar}
    if any(s.checkpoint for s in schemes):
        need.add(PER_HEAD_CALIBRATION)
    return [c for c in (PER_HEAD_CALIBRATION, PER_CHANNEL_CALIBRATION) if c in need]


@dataclass(frozen=True)
class EngineSettings:
    """What every evaluation engine shares (the scheme adds its own arguments)."""

    max_model_len: int
    chunk: int  # max_num_batched_tokens: prefill chunk size
    seed: int = 0
    gpu_memory_utilization: float = 0.05
    kv_cache_memory_bytes: int = 256 * 2**20
    enforce_eager: bool = True
    cuda: bool = True
    extension: str = "benchmarks.accuracy.worker.AccuracyWorkerExtension"
    # forces the teacher-forced decode tokens; None (``--decode-len 0``): prefill-only, no custom logits
    # processor (vLLM 0.26 runs its V2 model runner only without one)
    logits_processor: str | None = "benchmarks.accuracy.worker:ForcedTokens"


def engine_kwargs(scheme: Scheme, model_dir: Path, settings: EngineSettings, sidecar: Path | None = None) -> dict:
    """``LLM(**kwargs)`` for one scheme on one model directory.

    One request at a time (``max_num_seqs=1``), chunked prefill of ``chunk`` tokens, prefix caching
    off: every chunk after a window's first reads its context from the cache, and the captured
    token stream is one window after another (see :func:`benchmarks.accuracy.metrics.window_rows`).
    """
    kw: dict[str, Any] = dict(
        model=str(model_dir),
        dtype="bfloat16",
        seed=settings.seed,
        max_model_len=settings.max_model_len,
        enable_chunked_prefill=True,
        max_num_batched_tokens=settings.chunk,
        max_num_seqs=1,
        enable_prefix_caching=False,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        kv_cache_memory_bytes=settings.kv_cache_memory_bytes,
        enforce_eager=settings.enforce_eager,
        worker_extension_cls=settings.extension,
    )
    if settings.logits_processor:
        kw["logits_processors"] = [settings.logits_processor]
    if scheme.kvquant:
        kw["attention_backend"] = "kvquant"
        options: dict[str, Any] = {}
        if scheme.sidecar:
            if sidecar is None:
                raise ValueError(f"scheme {scheme.name} needs a {scheme.sidecar} sidecar")
            options.update(scales=str(sidecar), dtype=scheme.kv_dtype, fallback="error")
        options.update(scheme.kvquant_options)
        kw["additional_config"] = {"kvquant": options}
    for key, value in scheme.engine.items():
        if key == "attention_backend" and not settings.cuda:
            continue  # vLLM's CPU build ignores it (one backend); kvquant is selected by the plugin hook
        kw[key] = value
    return kw
