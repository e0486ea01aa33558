"""``vllm-kvquant calibrate``: run the model through vLLM with the kvquant backend and record
the absolute maxima of K and V exactly as the backend writes them (after RoPE and any K norm).

Why through vLLM and not transformers hooks: the recorded tensors are, by construction, the
ones the cache write quantizes (same attention layer names, same RoPE/K-norm code, same
tensor-parallel head split), so the scales cannot drift from what is served. Each worker
gets a recorder through vLLM's ``worker_extension_cls``; the driver collects per-rank
statistics with ``collective_rpc`` and combines them, so the file does not depend on tp.
Calibration runs eagerly (no CUDA graphs) with prefix caching off, so every token is written.
"""

from __future__ import annotations

import gc
import json
import logging
import random
from argparse import Namespace
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

logger = logging.getLogger("vllm_kvquant")


@dataclass(frozen=True)
class CalibrationData:
    samples: list[list[int]]
    num_tokens: int
    description: str


def read_texts(path: str | Path) -> list[str]:
    """Documents from a plain text file, a JSONL file with a ``text`` field, or a directory of .txt files."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise FileNotFoundError(f"calibration data directory {path} has no .txt files")
        return [p.read_text(encoding="utf-8", errors="replace") for p in files]
    if not path.is_file():
        raise FileNotFoundError(f"calibration data {path} does not exist")
    if path.suffix in (".jsonl", ".json"):
        texts = []
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
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
    return [path.read_text(encoding="utf-8", errors="replace")]


def select_samples(token_ids: list[int], num_samples: int, seq_len: int, seed: int) -> list[list[int]]:
    """Deterministic windows of ``seq_len`` tokens (all of them if there are fewer than asked)."""
    if seq_len < 1 or num_samples < 1:
        raise ValueError("--seq-len and --num-samples must be positive")
    windows = [token_ids[i : i + seq_len] for i in range(0, max(len(token_ids) - seq_len, 0) + 1, seq_len)]
    windows = [w for w in windows if w]
    if not windows:
        raise ValueError("the calibration data produced no tokens")
    if len(windows) > num_samples:
        picked = sorted(random.Random(seed).sample(range(len(windows)), num_samples))
        windows = [windows[i] for i in picked]
    return windows


def load_calibration_data(model: str, data: str, num_samples: int, seq_len: int, seed: int) -> CalibrationData:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for text in read_texts(data):
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"] + separator)
    samples = select_samples(ids, num_samples, seq_len, seed)
    return CalibrationData(samples, sum(len(s) for s in samples), str(data))


class CalibrationWorkerExtension:
    """Mixed into vLLM's worker class (``worker_extension_cls``); methods run on every rank."""

    def kvquant_start_recording(self, method: str, percentile: float, seed: int) -> int:
        from . import calibration_hooks
        from .scales import AmaxRecorder

        calibration_hooks.set_recorder(AmaxRecorder(method=method, percentile=percentile, seed=seed))
        return 0

    def kvquant_collect(self) -> dict[str, tuple[list[float], list[float]]]:
        from . import calibration_hooks

        recorder = calibration_hooks.active_recorder()
        calibration_hooks.set_recorder(None)
        if recorder is None:
            return {}
        return {name: (k.tolist(), v.tolist()) for name, (k, v) in recorder.stats().items()}


def record_statistics(args: Namespace, data: CalibrationData) -> tuple[dict, dict]:
    """Run the model over the samples; returns (whole-model stats, engine facts)."""
    import torch
    from vllm import LLM, SamplingParams

    from .scales import combine_rank_stats

    engine_args = dict(
        model=args.model,
        attention_backend="kvquant",
        tensor_parallel_size=args.tensor_parallel_size,
        enforce_eager=True,  # calibration never runs under CUDA graphs
        enable_prefix_caching=False,  # every token's K/V must be written (and seen)
        worker_extension_cls=f"{__name__}.CalibrationWorkerExtension",
        additional_config={"kvquant": {"calibration": True}},
        dtype=args.model_dtype,
        seed=args.seed,
    )
    if args.gpu_memory_utilization is not None:
        engine_args["gpu_memory_utilization"] = args.gpu_memory_utilization
    max_len = max(len(s) for s in data.samples) + 1
    engine_args["max_model_len"] = args.max_model_len or max_len
    llm = LLM(**engine_args)
    try:
        llm.collective_rpc("kvquant_start_recording", args=(args.method, args.percentile, args.seed))
        prompts = [{"prompt_token_ids": s} for s in data.samples]
        llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=True)
        per_rank_raw = llm.collective_rpc("kvquant_collect")
        model_config = llm.llm_engine.vllm_config.model_config
        total_kv_heads = model_config.get_total_num_kv_heads()
        facts = {"num_kv_heads": total_kv_heads, "head_size": model_config.get_head_size()}
    finally:
        del llm
        gc.collect()
    per_rank = [{n: (torch.tensor(k), torch.tensor(v)) for n, (k, v) in raw.items()} for raw in per_rank_raw]
    if not per_rank or not per_rank[0]:
        raise RuntimeError("calibration recorded no K/V: was the kvquant backend selected for the model's layers?")
    return combine_rank_stats(per_rank, total_kv_heads, args.tensor_parallel_size), facts


def layer_order(name: str) -> tuple:
    """Sort 'model.layers.10.self_attn.attn' after 'model.layers.9...'."""
    return tuple(int(p) if p.isdigit() else p for p in name.split("."))


def run_calibration(args: Namespace):
    """Calibrate and write the sidecar; returns the written :class:`ScalesFile`."""
    from . import __version__
    from .scales import SIDECAR_FILENAME, CalibrationInfo, ModelFacts, build_scales_file, save_scales

    if args.margin <= 0:
        raise ValueError(f"--margin must be > 0, got {args.margin}")
    data = load_calibration_data(args.model, args.data, args.num_samples, args.seq_len, args.seed)
    stats, facts = record_statistics(args, data)
    names = sorted(stats, key=layer_order)
    model = ModelFacts(
        num_layers=len(names), num_kv_heads=facts["num_kv_heads"], head_size=facts["head_size"], layer_names=names
    )
    info = CalibrationInfo(
        method=args.method,
        tool="vllm-kvquant",
        tool_version=__version__,
        data=data.description,
        num_tokens=data.num_tokens,
        margin=args.margin,
        percentile=args.percentile if args.method == "percentile" else None,
        created=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
    scales = build_scales_file(stats, args.dtype, args.granularity, model, info)
    out = Path(args.out) if args.out else Path(args.model) / SIDECAR_FILENAME
    save_scales(scales, out)
    print(f"wrote {out}: {len(names)} layers, {args.dtype}, {args.granularity}, {data.num_tokens} tokens")
    return scales
