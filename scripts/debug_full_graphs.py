"""Diagnose full CUDA graphs on the GPU: engines side by side on the tiny model, each FULL
variant against its eager twin (greedy tokens and logprobs of tests/test_backend_gpu.py's prompts).

    python3 scripts/debug_full_graphs.py MODEL_DIR OUT_DIR [NAME ...]   # default: every engine

MODEL_DIR: a tiny model with its kvquant sidecar (tests/conftest.py's calibrated_tiny_model, or
``make_tiny_llama`` + ``vllm-kvquant calibrate``). Prints ``PAIR a vs b: identical i/n ...``.
The variants split a mismatch by cause: prefill path (bf16 / quantized / no workspace), capture
batch shape (max_num_seqs 8), graph mode (FULL_DECODE_ONLY), async scheduling, vLLM's own
FLASH_ATTN as the control. Found the one-token capture bug of 2026-12-06
(benchmarks/results/gpu-check/check-2026-12-06-nvidia-h200-summary.txt).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_backend_gpu import _agreement, _engine, run_engines  # noqa: E402

FULL = {"mode": 0, "cudagraph_mode": "FULL"}


def specs(model: Path) -> dict[str, dict]:
    kvq = dict(attention_backend="kvquant", enable_prefix_caching=False)

    def k(**opts):
        return {**kvq, "additional_config": {"kvquant": {"dtype": "fp8_e4m3", **opts}}}

    return {
        "kvq-full": _engine(model, compilation_config=FULL, **k()),
        "kvq-eager": _engine(model, enforce_eager=True, **k()),
        "fa-full": _engine(model, compilation_config=FULL, attention_backend="FLASH_ATTN", enable_prefix_caching=False),
        "fa-eager": _engine(model, enforce_eager=True, attention_backend="FLASH_ATTN", enable_prefix_caching=False),
        "kvq-full-q": _engine(model, compilation_config=FULL, **k(prefill="quantized")),
        "kvq-eager-q": _engine(model, enforce_eager=True, **k(prefill="quantized")),
        "kvq-full-seqs8": _engine(model, compilation_config=FULL, max_num_seqs=8, **k()),
        "kvq-decode-only": _engine(model, compilation_config={"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"}, **k()),
        "kvq-full-sync": _engine(model, compilation_config=FULL, async_scheduling=False, **k()),
        "kvq-eager-nows": _engine(model, enforce_eager=True, **k(prefill_workspace_mib=0)),
    }


PAIRS = [("kvq-full", "kvq-eager"), ("fa-full", "fa-eager"), ("kvq-full-q", "kvq-eager-q"),
         ("kvq-full-seqs8", "kvq-eager"), ("kvq-decode-only", "kvq-eager"), ("kvq-full-sync", "kvq-eager"),
         ("kvq-eager", "fa-eager"), ("kvq-eager-nows", "kvq-eager"), ("kvq-full", "kvq-eager-nows")]  # fmt: skip


def main() -> None:
    model, out = Path(sys.argv[1]), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    all_specs = specs(model)
    names = sys.argv[3:] or list(all_specs)
    runs = run_engines({n: all_specs[n] for n in names}, out)
    for n, r in runs.items():
        if "error" in r:
            print("ERROR", n, r["error"], r["log"][-3000:])
        else:
            print("RAN", n, json.dumps(r["step_report"]))
    for a, b in PAIRS:
        if a in runs and b in runs and "error" not in runs[a] and "error" not in runs[b]:
            ra, rb = runs[a], runs[b]
            identical, mean = _agreement(ra, rb)
            firsts = [round(abs(x["logprobs"][0] - y["logprobs"][0]), 4) for x, y in zip(ra["results"], rb["results"])]
            same = [x["token_ids"] == y["token_ids"] for x, y in zip(ra["results"], rb["results"])]
            print(f"PAIR {a} vs {b}: identical {identical}/{len(same)} mean {mean:.4f} firsts {firsts} same {same}")


if __name__ == "__main__":
    main()
