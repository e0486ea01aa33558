"""``vllm-kvquant calibrate``: run the model through vLLM with the kvquant backend and record
the absolute maxima of K and V exactly as the backend writes them (after RoPE and any K norm).

Why through vLLM and not transformers hooks: the recorded tensors are, by construction, the
ones the cache write quantizes (same attention layer names, same RoPE/K-norm code, same
tensor-parallel head split), so the scales cannot drift from what is served. Each worker
gets a recorder through vLLM's ``worker_extension_cls``; the driver collects per-rank
statistics with ``collective_rpc`` and combines them, so the file does not depend on tp.
Calibration runs eagerly (no CUDA graphs) with prefix caching off, so every token is written,
and with chunked prefill off, so every sample is prefilled in one step from unquantized K/V.

Defaults that fit any model and build: :func:`resolve_defaults` clamps the sample length to the
context vLLM derives for the model and, on vLLM's CPU build, sizes the KV cache to what calibration
needs instead of reserving a fraction of the machine's memory.

Pipeline: :func:`load_calibration_data` (texts -> token windows) -> :func:`record_statistics`
(engine, per-rank stats) -> :func:`scales_from_rank_stats` (stats -> :class:`ScalesFile`, no
engine needed) -> ``save_scales``.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import random
from argparse import Namespace
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .worker_extension import EXTENSION_PATH

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .scales import CalibrationInfo, ScalesFile

logger = logging.getLogger("vllm.kvquant")

METHODS = ("absmax", "percentile")

#: Tokens per sample when --seq-len is not given; clamped to the model's context - 1.
DEFAULT_SEQ_LEN = 512
#: On vLLM's CPU build the KV cache is sized for this many samples at once (more only queue).
KV_CACHE_SAMPLES = 16
#: ... and never below this (small models): vLLM's CPU worker allocates exactly what it is given.
MIN_KV_CACHE_BYTES = 64 * 2**20

RankStats = dict[str, tuple["torch.Tensor", "torch.Tensor"]]


@dataclass(frozen=True)
class ModelShape:
    """What the calibration defaults need from vLLM's view of the model."""

    context: int  # max_model_len as vLLM derives it (or the explicit --max-model-len)
    context_source: str  # "the model's context" or "--max-model-len"
    num_layers: int
    num_kv_heads: int
    head_size: int
    dtype_bytes: int  # of the model dtype: an upper bound on a cache element (kvquant stores 1 byte)


@dataclass(frozen=True)
class CalibrationData:
    samples: list[list[int]]  # token ids fed to the model, one prompt per sample
    num_tokens: int  # sum of the sample lengths: every one of them is written to the cache
    description: str  # the --data argument, for provenance


# ----------------------------------------------------------------------------- arguments


def scale_defaults(args: Namespace) -> Namespace:
    """``args`` with the granularity filled in where it was left out (None): the most accurate
    measured for the storage format (``scales.calibration.DEFAULT_GRANULARITY``)."""
    from .scales import default_granularity

    resolved = Namespace(**vars(args))
    if getattr(args, "granularity", None) is None:
        resolved.granularity = default_granularity(args.dtype).value
    return resolved


def check_args(args: Namespace) -> None:
    """Reject bad options before anything is loaded (``ValueError`` -> exit code 2 in the CLI)."""
    if not args.margin > 0:  # also catches NaN
        raise ValueError(f"--margin must be > 0, got {args.margin}")
    if args.num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.seq_len is not None and args.seq_len < 1:
        raise ValueError(f"--seq-len must be >= 1, got {args.seq_len}")
    if args.method not in METHODS:
        raise ValueError(f"--method {args.method!r} is not supported; use one of {list(METHODS)}")
    if args.method == "percentile" and not 0 < args.percentile <= 100:
        raise ValueError(f"--percentile must be in (0, 100], got {args.percentile}")
    if args.method == "percentile" and args.granularity == "per_channel":
        raise ValueError(
            "--method percentile keeps one sample of |x| per KV head, not per channel: use --granularity per_head "
            "(or per_tensor) with it, or --method absmax (the default) with per_channel"
        )
    if args.tensor_parallel_size < 1:
        raise ValueError(f"--tensor-parallel-size must be >= 1, got {args.tensor_parallel_size}")
    gmu = getattr(args, "gpu_memory_utilization", None)
    if gmu is not None and not 0 < gmu <= 1:
        raise ValueError(f"--gpu-memory-utilization must be in (0, 1], got {gmu}")
    kv_bytes = getattr(args, "kv_cache_memory_bytes", None)
    if kv_bytes is not None and kv_bytes < 1:
        raise ValueError(f"--kv-cache-memory-bytes must be >= 1, got {kv_bytes}")
    max_len = getattr(args, "max_model_len", None)
    if max_len is not None and args.seq_len is not None and max_len <= args.seq_len:
        raise ValueError(
            f"--max-model-len ({max_len}) must exceed --seq-len ({args.seq_len}): each sample is a prompt "
            "of up to --seq-len tokens followed by one generated token"
        )
    if not getattr(args, "out", None) and not Path(args.model).is_dir():
        raise ValueError(f"model {args.model!r} is not a local directory: pass --out to say where the sidecar goes")


# ----------------------------------------------------------------------------- defaults


def model_shape(args: Namespace) -> ModelShape:
    """The context length and KV-cache shape exactly as vLLM derives them (config.json keys such as
    max_position_embeddings, RoPE scaling, the tokenizer's model_max_length), from vLLM's own
    ``ModelConfig``; no weights are loaded."""
    from vllm.engine.arg_utils import EngineArgs

    explicit = getattr(args, "max_model_len", None)
    model_config = EngineArgs(
        model=args.model, dtype=args.model_dtype, seed=args.seed, max_model_len=explicit
    ).create_model_config()
    text_config = model_config.hf_text_config
    return ModelShape(
        context=int(model_config.max_model_len),
        context_source="--max-model-len" if explicit else "the model's context",
        num_layers=int(getattr(text_config, "num_hidden_layers", 0) or 0),
        num_kv_heads=int(model_config.get_total_num_kv_heads()),
        head_size=int(model_config.get_head_size()),
        dtype_bytes=int(model_config.dtype.itemsize),
    )


def on_cpu_platform() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def kv_cache_bytes_for(shape: ModelShape, max_model_len: int, num_samples: int) -> int:
    """KV-cache bytes for ``min(num_samples, KV_CACHE_SAMPLES)`` sequences of ``max_model_len`` tokens.

    Counts every layer at the model dtype's width (twice what kvquant's 1-byte cache uses) and
    rounds each sequence up to 256 tokens (whole blocks), so vLLM always fits one sequence.
    """
    per_token = 2 * shape.num_layers * shape.num_kv_heads * shape.head_size * shape.dtype_bytes
    tokens = min(num_samples, KV_CACHE_SAMPLES) * -(-max_model_len // 256) * 256
    mib = 2**20
    return -(-max(per_token * tokens, MIN_KV_CACHE_BYTES) // mib) * mib


def resolve_defaults(
    args: Namespace, shape: ModelShape, on_cpu: bool, environ: Mapping[str, str] = os.environ
) -> tuple[Namespace, list[str]]:
    """Fill in what the user left out so that calibration runs on any model and build; never
    overrides an explicit value (an explicit --seq-len that does not fit is an error).

    - ``seq_len``: 512, clamped to the context - 1 (each sample is followed by one generated token);
    - on vLLM's CPU build, without --gpu-memory-utilization / --kv-cache-memory-bytes /
      VLLM_CPU_KVCACHE_SPACE: ``kv_cache_memory_bytes`` sized by :func:`kv_cache_bytes_for`. vLLM's
      CPU worker otherwise reserves its default fraction (0.92) of the NUMA node's memory and
      refuses to start when less is free.

    Returns the completed copy of ``args`` and the lines to print about what was chosen.
    """
    resolved = Namespace(**vars(args))
    notes: list[str] = []
    limit = shape.context - 1
    if limit < 1:
        raise ValueError(f"{shape.context_source} is {shape.context} token(s): no room for a sample and a generated token")
    if args.seq_len is None:
        resolved.seq_len = min(DEFAULT_SEQ_LEN, limit)
        if resolved.seq_len < DEFAULT_SEQ_LEN:
            notes.append(
                f"kvquant calibrate: --seq-len {DEFAULT_SEQ_LEN} clamped to {resolved.seq_len} "
                f"({shape.context_source} is {shape.context})"
            )
    elif args.seq_len > limit:
        raise ValueError(
            f"--seq-len {args.seq_len} does not fit: {shape.context_source} is {shape.context} tokens and each "
            f"sample is followed by one generated token; pass --seq-len {limit} or less (or leave it out)"
        )
    explicit_memory = (
        getattr(args, "gpu_memory_utilization", None) is not None
        or getattr(args, "kv_cache_memory_bytes", None) is not None
        or environ.get("VLLM_CPU_KVCACHE_SPACE", "") != ""
    )
    if on_cpu and not explicit_memory:
        resolved.kv_cache_memory_bytes = kv_cache_bytes_for(shape, resolved.seq_len + 1, args.num_samples)
        notes.append(
            f"kvquant calibrate: CPU build: KV cache sized to {resolved.kv_cache_memory_bytes // 2**20} MiB "
            f"(up to {min(args.num_samples, KV_CACHE_SAMPLES)} samples of {resolved.seq_len + 1} tokens at once) "
            "instead of vLLM's default memory fraction; --kv-cache-memory-bytes or --gpu-memory-utilization "
            "override it"
        )
    return resolved, notes


# ----------------------------------------------------------------------------- data


def read_jsonl_texts(path: Path) -> list[str]:
    """The string ``text`` field of every line of a JSON Lines file (gzip-compressed when it ends
    in ``.gz``); blank lines skipped; ``ValueError`` naming the file and line at fault."""
    import gzip

    opener = gzip.open if path.suffix.lower() == ".gz" else open
    texts = []
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not a JSON line ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f"{path}:{lineno}: a JSONL record needs a string 'text' field")
            texts.append(record["text"])
    return texts


def read_texts(path: str | Path) -> list[str]:
    """Documents from a plain text file, a JSONL file with a ``text`` field, or a directory of .txt files.

    A directory is read recursively, files in sorted path order; ``.jsonl``/``.json`` files
    (and ``.jsonl.gz``) are JSON Lines (one object with a string ``text`` per line, blank lines skipped); any
    other file is one document. Raises ``FileNotFoundError`` / ``ValueError`` naming the file
    (and line) at fault.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise FileNotFoundError(f"calibration data directory {path} has no .txt files")
        texts = [p.read_text(encoding="utf-8", errors="replace") for p in files]
    elif not path.exists():
        raise FileNotFoundError(f"calibration data {path} does not exist")
    elif not path.is_file():
        raise ValueError(f"calibration data {path} is neither a file nor a directory")
    elif path.suffix.lower() in (".jsonl", ".json") or path.name.lower().endswith(".jsonl.gz"):
        texts = read_jsonl_texts(path)
    else:
        texts = [path.read_text(encoding="utf-8", errors="replace")]
    if not any(t.strip() for t in texts):
        raise ValueError(f"calibration data {path} contains no text")
    return texts


def select_samples(token_ids: Sequence[int], num_samples: int, seq_len: int, seed: int) -> list[list[int]]:
    """Deterministic, non-overlapping windows of ``seq_len`` tokens, in stream order.

    The stream is cut into consecutive windows (a trailing partial window is dropped unless
    the stream is shorter than ``seq_len``, which then gives one short window); ``seed``
    shuffles their indices and the first ``num_samples`` are kept, so for the same data and
    seed a larger ``num_samples`` only adds windows. All windows when there are fewer.
    """
    if seq_len < 1 or num_samples < 1:
        raise ValueError("--seq-len and --num-samples must be positive")
    token_ids = list(token_ids)
    windows = [token_ids[i : i + seq_len] for i in range(0, max(len(token_ids) - seq_len, 0) + 1, seq_len)]
    windows = [w for w in windows if w]
    if not windows:
        raise ValueError("the calibration data produced no tokens")
    if len(windows) > num_samples:
        order = list(range(len(windows)))
        random.Random(seed).shuffle(order)
        windows = [windows[i] for i in sorted(order[:num_samples])]
    return windows


def special_prefix(tokenizer: Any) -> list[int]:
    """Tokens the tokenizer puts before every prompt (e.g. Llama's BOS), as served prompts have them."""
    probe = "calibration text"
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    for start in range(len(full) - len(plain) + 1):
        if plain and full[start : start + len(plain)] == plain:
            return full[:start]
    return []


def load_tokenizer(model: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot load the tokenizer of {model}: {exc}") from None


def load_calibration_data(
    model: str, data: str, num_samples: int, seq_len: int, seed: int, texts: list[str] | None = None
) -> CalibrationData:
    """Tokenize the data (documents joined by EOS) and pick the sample windows.

    Each sample starts with the tokenizer's special prefix (BOS for Llama-style tokenizers), so
    position 0 holds what it holds when serving; windows are ``seq_len`` tokens long in all.
    ``texts``: the documents of ``data`` when already read.
    """
    from tqdm.auto import tqdm

    texts = read_texts(data) if texts is None else texts
    tokenizer = load_tokenizer(model)
    prefix = special_prefix(tokenizer)
    body_len = seq_len - len(prefix)
    if body_len < 1:
        raise ValueError(f"--seq-len {seq_len} leaves no room for text after the {len(prefix)} special token(s)")
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for text in tqdm(texts, desc="Tokenizing calibration data", unit="doc", disable=len(texts) < 16):
        ids.extend(list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]) + separator)
    windows = select_samples(ids, num_samples, body_len, seed)
    if len(windows) < num_samples:
        logger.warning(
            "kvquant calibrate: %s has %d tokens, enough for %d sample(s) of %d tokens, not %d; using all of it",
            data, len(ids), len(windows), seq_len, num_samples,
        )
    samples = [prefix + w for w in windows]
    return CalibrationData(samples, sum(len(s) for s in samples), str(data))


# ----------------------------------------------------------------------------- recording


def calibration_engine_args(args: Namespace, max_model_len: int) -> dict[str, Any]:
    engine_args: dict[str, Any] = dict(
        model=args.model,
        attention_backend="kvquant",
        tensor_parallel_size=args.tensor_parallel_size,
        enforce_eager=True,  # calibration never runs under CUDA graphs (the backend refuses them too)
        enable_prefix_caching=False,  # every token's K/V must be written (and seen)
        # Each sample is prefilled in one step and attends only to its own unquantized K/V.
        # With chunked prefill a split sample's later chunk would read its context back from the
        # cache, quantized with the placeholder unit scales, and skew the deeper layers' K/V.
        enable_chunked_prefill=False,
        worker_extension_cls=EXTENSION_PATH,
        additional_config={"kvquant": {"calibration": True}},
        dtype=args.model_dtype,
        seed=args.seed,
        max_model_len=getattr(args, "max_model_len", None) or max_model_len,
    )
    if getattr(args, "gpu_memory_utilization", None) is not None:
        engine_args["gpu_memory_utilization"] = args.gpu_memory_utilization
    if getattr(args, "kv_cache_memory_bytes", None) is not None:
        engine_args["kv_cache_memory_bytes"] = args.kv_cache_memory_bytes
    return engine_args


def record_with_engine(
    llm: Any, samples: Sequence[Sequence[int]], method: str = "absmax", percentile: float = 99.99, seed: int = 0
) -> list[RankStats]:
    """Feed ``samples`` (one prefill each) to a calibration-mode engine; per-rank stats in rank order.

    Checks that every layer of every rank saw every token once; several calls on one engine
    are independent recordings.
    """
    import torch
    from vllm import SamplingParams

    if method == "percentile" and percentile >= 100:
        # The 100th percentile is the absolute max; the percentile reservoir only holds a
        # bounded sample of |x| and would miss the max once it overflows.
        method = "absmax"
    llm.collective_rpc("kvquant_start_recording", args=(method, percentile, seed))
    try:
        prompts = [{"prompt_token_ids": list(s)} for s in samples]
        llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=True)
    finally:
        per_rank_raw = llm.collective_rpc("kvquant_collect")
    expected = sum(len(s) for s in samples)
    per_rank: list[RankStats] = []
    for rank, raw in enumerate(per_rank_raw):
        if not raw["stats"]:
            raise RuntimeError(
                f"calibration recorded no K/V on rank {rank}: was the kvquant backend selected for the model's layers?"
            )
        for name, seen in raw["num_tokens"].items():
            if seen < expected:
                raise RuntimeError(
                    f"calibration: layer '{name}' on rank {rank} recorded {seen} tokens, but {expected} were fed; "
                    "some K/V were not written through the kvquant backend (prefix caching or KV sharing?)"
                )
            if seen > expected:
                logger.warning("kvquant calibrate: layer '%s' recorded %d tokens for %d fed", name, seen, expected)
        for name, count in raw["nonfinite"].items():
            logger.warning("kvquant calibrate: layer '%s' on rank %d produced %d NaN/Inf K/V values (ignored)", name, rank, count)
        per_rank.append({n: tuple(torch.tensor(t) for t in ts) for n, ts in raw["stats"].items()})
    return per_rank


def model_facts_of(llm: Any) -> dict[str, Any]:
    """KV heads, head size and RoPE layout (``rope``: which K channels rotate together, or None)."""
    model_config = llm.llm_engine.vllm_config.model_config
    return {"num_kv_heads": model_config.get_total_num_kv_heads(), "head_size": model_config.get_head_size(),
            "rope": llm.collective_rpc("kvquant_rope_layout")[0]}  # fmt: skip


def record_statistics(args: Namespace, data: CalibrationData) -> tuple[list[RankStats], dict[str, int]]:
    """Run the model over the samples; returns (per-rank stats in rank order, model facts)."""
    from vllm import LLM

    llm = LLM(**calibration_engine_args(args, max(len(s) for s in data.samples) + 1))
    try:
        per_rank = record_with_engine(llm, data.samples, args.method, args.percentile, args.seed)
        facts = model_facts_of(llm)
    finally:
        del llm
        gc.collect()
    return per_rank, facts


# ----------------------------------------------------------------------------- stats -> file


def layer_order(name: str) -> tuple:
    """Sort 'model.layers.10.self_attn.attn' after 'model.layers.9...'."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split("."))


def calibration_info(args: Namespace, data: CalibrationData, created: str | None = None) -> "CalibrationInfo":
    """Provenance written into the sidecar's ``calibration`` object."""
    from . import __version__
    from .scales import CalibrationInfo

    return CalibrationInfo(
        method=args.method,
        tool="vllm-kvquant",
        tool_version=__version__,
        data=data.description,
        num_tokens=data.num_tokens,
        margin=args.margin,
        percentile=args.percentile if args.method == "percentile" else None,
        created=created or datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        extra={
            "num_samples": len(data.samples),
            "seq_len": args.seq_len,
            "seed": args.seed,
            "model_dtype": args.model_dtype,
        },
    )


def scales_from_rank_stats(
    per_rank: Sequence[Mapping[str, tuple["torch.Tensor", "torch.Tensor"]]],
    *,
    num_kv_heads: int,
    head_size: int,
    tp_size: int,
    kv_dtype: str,
    granularity: str,
    info: "CalibrationInfo",
    rope: Mapping[str, Any] | None = None,
) -> "ScalesFile":
    """Per-rank statistics (rank order) -> validated sidecar; independent of the tp it was recorded with.

    Ranks hold the KV heads :func:`kv_heads_for_rank` gives them (replicated heads are maxed),
    then ``scale = max(stat * margin / qmax, 1e-8)`` per head (per_tensor: max over heads first;
    per_channel: per channel, K's from its RoPE pair's norm when recorded; ``rope`` is provenance).
    """
    from dataclasses import replace

    from .scales import ModelFacts, build_scales_file, combine_rank_stats

    stats = combine_rank_stats(per_rank, num_kv_heads, tp_size)
    names = sorted(stats, key=layer_order)
    model = ModelFacts(num_layers=len(names), num_kv_heads=num_kv_heads, head_size=head_size, layer_names=names)
    if granularity == "per_channel":  # provenance: K's RoPE pairs sharing a scale (None: K per channel)
        paired = bool(rope) and all(len(t) > 2 for t in stats.values())
        info = replace(info, extra={**info.extra, "k_rope_pairs": dict(rope) if paired else None})
    return build_scales_file(stats, kv_dtype, granularity, model, info)


def run_calibration(args: Namespace) -> "ScalesFile":
    """Calibrate and write the sidecar; returns the written :class:`ScalesFile`."""
    from .scales import SIDECAR_FILENAME, save_scales

    args = scale_defaults(args)
    check_args(args)
    texts = read_texts(args.data)  # bad data fails before vLLM is imported
    args, notes = resolve_defaults(args, model_shape(args), on_cpu_platform())
    for note in notes:
        print(note, flush=True)
    data = load_calibration_data(args.model, args.data, args.num_samples, args.seq_len, args.seed, texts)
    per_rank, facts = record_statistics(args, data)
    scales = scales_from_rank_stats(
        per_rank,
        num_kv_heads=facts["num_kv_heads"],
        head_size=facts["head_size"],
        tp_size=args.tensor_parallel_size,
        kv_dtype=args.dtype,
        granularity=args.granularity,
        info=calibration_info(args, data),
        rope=facts.get("rope"),
    )
    out = Path(args.out) if args.out else Path(args.model) / SIDECAR_FILENAME
    out = save_scales(scales, out)
    print(
        f"wrote {out}: {len(scales.layers)} layers, {args.dtype}, {args.granularity}, margin {args.margin:g}, "
        f"{len(data.samples)} samples, {data.num_tokens} tokens"
    )
    return scales
