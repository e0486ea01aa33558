"""Teacher-forced perplexity of each scale scheme through the real plugin (vLLM, CPU or GPU).

One calibration run records |K| and |V| per KV head and channel exactly as ``vllm-kvquant
calibrate`` does (same windows, same engine mode); each scheme's sidecar is built from those
statistics with calibrate's own code and its defaults (granularity and margin per storage format,
unless the scheme names them). Then every scheme, and vLLM's default attention with a BF16 cache as
the reference, prefills held-out windows one at a time in chunks of ``--chunk`` tokens (chunked
prefill: each chunk after the first reads its context back from the 8-bit cache) and vLLM's own
``prompt_logprobs`` give the log-likelihood of every actual token. Windows are the calibration
length (``--seq-len``) and 4x longer (positions no calibration sample reached).

    python -m benchmarks.accuracy.granularity_ppl --model ~/.cache/vllm-kvquant/models/smollm2 \\
        --calib tests/data/austen_calib.txt --heldout tests/data/austen_heldout.txt --out ppl.json

Each engine runs in its own process (``--engine SPEC.json``: vLLM holds memory until exit).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from argparse import Namespace
from pathlib import Path

#: ``dtype[:granularity[:margin]]``; granularity/margin left out: calibrate's defaults.
DEFAULT_SCHEMES = ("int8", "fp8_e4m3", "fp8_e4m3:per_head", "int8:per_head")


def parse_scheme(text: str) -> dict:
    parts = text.split(":")
    return {
        "dtype": parts[0],
        "granularity": parts[1] if len(parts) > 1 and parts[1] else None,
        "margin": float(parts[2]) if len(parts) > 2 else None,
    }


def calibration_args(args: argparse.Namespace, scheme: dict) -> Namespace:
    """What ``vllm-kvquant calibrate MODEL --data CALIB`` would run with (scheme's fields, else defaults)."""
    from vllm_kvquant.calibrate import scale_defaults

    raw = Namespace(
        model=args.model, data=args.calib, num_samples=args.num_samples, seq_len=args.seq_len,
        granularity=scheme["granularity"], dtype=scheme["dtype"], method="absmax", percentile=99.99,
        margin=1.0 if scheme["margin"] is None else scheme["margin"], tensor_parallel_size=1, seed=0, out=None, model_dtype=args.model_dtype,
        gpu_memory_utilization=None, kv_cache_memory_bytes=args.kv_cache_bytes, max_model_len=args.seq_len + 1,
    )  # fmt: skip
    return scale_defaults(raw)


def calibrate_all(args: argparse.Namespace, schemes: list[dict], workdir: Path) -> list[dict]:
    """One recording, one sidecar per scheme; returns the schemes with ``sidecar``, granularity and margin."""
    from vllm_kvquant.calibrate import (
        calibration_info,
        load_calibration_data,
        record_statistics,
        scales_from_rank_stats,
    )
    from vllm_kvquant.scales import save_scales

    base = calibration_args(args, schemes[0])
    data = load_calibration_data(args.model, args.calib, base.num_samples, base.seq_len, base.seed)
    per_rank, facts = record_statistics(base, data)
    out = []
    for i, scheme in enumerate(schemes):
        cargs = calibration_args(args, scheme)
        scales = scales_from_rank_stats(
            per_rank, num_kv_heads=facts["num_kv_heads"], head_size=facts["head_size"], tp_size=1,
            kv_dtype=cargs.dtype, granularity=cargs.granularity, info=calibration_info(cargs, data),
            rope=facts.get("rope"),
        )  # fmt: skip
        path = save_scales(scales, workdir / f"scales-{i}.json")
        out.append({**scheme, "granularity": cargs.granularity, "margin": cargs.margin, "sidecar": str(path),
                    "calibration_tokens": data.num_tokens})  # fmt: skip
    return out


def heldout_windows(model: str, path: str, length: int, count: int) -> list[list[int]]:
    """``count`` windows of ``length`` tokens (BOS first) spread evenly over the held-out documents."""
    from benchmarks.accuracy.data import document_windows
    from vllm_kvquant.calibrate import load_tokenizer, special_prefix

    tok = load_tokenizer(model)
    return document_windows(tok, path, length, count, special_prefix(tok))


def engine_kwargs(args: argparse.Namespace, scheme: dict | None, chunk: int | None = None) -> dict:
    kw = dict(
        model=args.model, dtype=args.model_dtype, seed=0, max_model_len=4 * args.seq_len + 1, enforce_eager=True,
        enable_chunked_prefill=True, max_num_batched_tokens=chunk or args.chunk, max_num_seqs=1,
        enable_prefix_caching=False,
        block_size=32,  # vLLM's CPU attention (the BF16 reference) needs a multiple of 32
        kv_cache_memory_bytes=args.kv_cache_bytes,
    )  # fmt: skip
    if scheme is not None:
        kw.update(attention_backend="kvquant", additional_config={"kvquant": {"scales": scheme["sidecar"]}})
    return kw


def run_engine(spec: dict) -> dict:
    """In the engine's own process: per window, the sum of -log p(actual token) and the token count."""
    from vllm import LLM, SamplingParams

    t0 = time.time()
    llm = LLM(**spec["engine"])
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
    result = {}
    for key, windows in spec["windows"].items():
        per_window = []
        for w in windows:  # one at a time: every chunk is --chunk tokens
            out = llm.generate([{"prompt_token_ids": w}], params, use_tqdm=False)[0]
            entries = out.prompt_logprobs
            if entries is None or len(entries) != len(w):
                raise RuntimeError(f"vLLM returned {len(entries or [])} prompt logprobs for {len(w)} tokens")
            per_window.append(-sum(entries[j][w[j]].logprob for j in range(1, len(w))))
        n = sum(len(w) - 1 for w in windows)
        result[key] = {"nll": sum(per_window), "tokens": n, "ppl": math.exp(sum(per_window) / n),
                       "window_nll": per_window}  # fmt: skip
    result["seconds"] = round(time.time() - t0, 1)
    return result


def _spawn(spec: dict, workdir: Path, label: str) -> dict:
    spec_path, out_path = workdir / f"{label}.spec.json", workdir / f"{label}.out.json"
    spec_path.write_text(json.dumps(spec))
    from benchmarks.harness import benchmarks_path

    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0",
               PYTHONPATH=os.pathsep.join([str(benchmarks_path()), os.environ.get("PYTHONPATH", "")]))  # fmt: skip
    env.pop("TRITON_INTERPRET", None)  # the backend's PyTorch path on CPU (what a CPU user gets)
    proc = subprocess.run([sys.executable, "-P", "-m", "benchmarks.accuracy.granularity_ppl", "--engine",
                           str(spec_path), "--engine-out", str(out_path)], env=env, cwd=workdir, capture_output=True,
                          text=True)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"engine {label} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(out_path.read_text())


#: The 16-bit references: ``kvquant-unchunked`` is a kvquant engine prefilling each window in one step
#: (it attends to the window's own unquantized K/V and never reads the 8-bit cache: the BF16-cache
#: perplexity with kvquant's own attention arithmetic, so a scheme's difference from it is its
#: quantization alone); ``vllm`` is vLLM's default attention with a BF16 cache, chunked like the
#: schemes (it also differs from kvquant by the attention implementation's own rounding).
REFERENCES = ("kvquant-unchunked", "vllm")


def _reference_engine(args: argparse.Namespace, name: str, schemes: list[dict]) -> dict:
    if name == "vllm":
        return engine_kwargs(args, None)
    return engine_kwargs(args, schemes[0], chunk=4 * args.seq_len + 1)


def measure(args: argparse.Namespace) -> dict:
    schemes = [parse_scheme(s) for s in (args.scheme or DEFAULT_SCHEMES)]
    references = args.reference or list(REFERENCES)
    with tempfile.TemporaryDirectory(prefix="kvquant-ppl-") as tmp:
        workdir = Path(tmp)
        schemes = calibrate_all(args, schemes, workdir)
        windows = {
            "short": heldout_windows(args.model, args.heldout, args.seq_len, args.short_windows),
            "long": heldout_windows(args.model, args.heldout, 4 * args.seq_len, args.long_windows),
        }
        refs, rows = {}, []
        for name in references:
            refs[name] = _spawn({"engine": _reference_engine(args, name, schemes), "windows": windows}, workdir, name)
            rows.append({"scheme": f"{args.model_dtype} ({name})", **_ppl_fields(refs[name], windows)})
        for i, scheme in enumerate(schemes):
            got = _spawn({"engine": engine_kwargs(args, scheme), "windows": windows}, workdir, f"scheme-{i}")
            row = {"scheme": f"kvquant {scheme['dtype']} {scheme['granularity']} margin {scheme['margin']:g}",
                   **{k: scheme[k] for k in ("dtype", "granularity", "margin")}, **_ppl_fields(got, windows)}  # fmt: skip
            for r, ref in enumerate(refs.values()):
                suffix = "" if r == 0 else f"_vs_{references[r].replace('-', '_')}"
                for k in windows:
                    row[f"delta_{k}{suffix}_pct"] = 100.0 * (got[k]["ppl"] / ref[k]["ppl"] - 1.0)
                    row[f"window_delta_{k}{suffix}_pct"] = [
                        100.0 * (math.exp((a - b) / (len(w) - 1)) - 1.0)
                        for a, b, w in zip(got[k]["window_nll"], ref[k]["window_nll"], windows[k])
                    ]  # fmt: skip
            rows.append(row)
            print(f"{row['scheme']:44s} vs {references[0]}: short {row['delta_short_pct']:+.3f}%  "
                  f"long {row['delta_long_pct']:+.3f}%", flush=True)  # fmt: skip
    tokens = {k: sum(len(w) - 1 for w in ws) for k, ws in windows.items()}
    return {"command": " ".join(["python -m benchmarks.accuracy.granularity_ppl", *sys.argv[1:]]),
            "references": references, "calibration_tokens": schemes[0]["calibration_tokens"],
            "predicted_tokens": tokens, "rows": rows}  # fmt: skip


def _ppl_fields(result: dict, windows: dict) -> dict:
    return {**{f"ppl_{k}": result[k]["ppl"] for k in windows}, "seconds": result["seconds"]}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model")
    ap.add_argument("--calib", help="calibration text (as vllm-kvquant calibrate --data)")
    ap.add_argument("--heldout", help="held-out text")
    ap.add_argument("--scheme", action="append", help=f"dtype[:granularity[:margin]] (default: {list(DEFAULT_SCHEMES)})")
    ap.add_argument("--num-samples", type=int, default=16, help="calibration windows")
    ap.add_argument("--seq-len", type=int, default=512, help="calibration window length (calibrate's default)")
    ap.add_argument("--short-windows", type=int, default=4, help="held-out windows of --seq-len tokens")
    ap.add_argument("--long-windows", type=int, default=1, help="held-out windows of 4 x --seq-len tokens")
    ap.add_argument("--chunk", type=int, default=64, help="prefill chunk (max_num_batched_tokens)")
    ap.add_argument("--reference", action="append", choices=REFERENCES,
                    help=f"16-bit reference(s), the first one the deltas' base (default: {list(REFERENCES)})")
    ap.add_argument("--model-dtype", default="bfloat16", choices=("bfloat16", "float16"),
                    help="activation dtype of the model (and of the 16-bit references)")
    ap.add_argument("--kv-cache-bytes", type=int, default=256 * 2**20)
    ap.add_argument("--out", help="JSON results")
    ap.add_argument("--engine", help=argparse.SUPPRESS)
    ap.add_argument("--engine-out", help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.engine:
        Path(args.engine_out).write_text(json.dumps(run_engine(json.loads(Path(args.engine).read_text()))))
        return 0
    if not (args.model and args.calib and args.heldout):
        raise SystemExit("--model, --calib and --heldout are required")
    result = measure(args)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
