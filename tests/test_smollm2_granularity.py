"""SmolLM2-135M-Instruct (the real model, fetched from PyPI and cached) through the real plugin on
vLLM's CPU build: perplexity of each storage format with ``vllm-kvquant calibrate``'s defaults
(granularity per format, margin 1) over the 16-bit-cache perplexity.

The 16-bit reference is the same kvquant engine prefilling each window in one step, so that it
attends to the window's unquantized K/V only and never reads the 8-bit cache: the schemes then
differ from it by quantization alone. The model runs in float16, not bfloat16: with bf16
activations two 16-bit-cache runs that differ only in the attention implementation already differ by
several tenths of a percent on one 512-token window (measured; see the README), more than the
targets; fp16's three extra mantissa bits leave the cache format as what is measured. Per-window deltas still
spread by ~0.35% (standard deviation), so the mean needs many windows: 16 of the calibration
length and 6 four times longer.

Calibration: 16 samples of 128 tokens of Austen (``tests/data/austen_calib.txt``) recorded as
``vllm-kvquant calibrate`` records them; held-out: *Pride and Prejudice* (never calibrated on),
teacher-forced through vLLM with 64-token chunked prefill (every chunk after the first reads its
context from the 8-bit cache). The sample length is 128 here, not calibrate's default 512, so that
the 4x context (512) stays within a CI budget; the README has the simulation at 512 / 2048
(``python -m benchmarks.accuracy.granularity_sim``).

Targets (issue 21): int8 with its default (per_channel) <= +0.1% over the 16-bit cache on held-out
windows of the calibration length and <= +0.2% on the 4x longer ones; fp8 with its default <= +0.3%,
and no worse than fp8 per_head (the same scheme while per_head is fp8's default).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")

DATA = Path(__file__).resolve().parent / "data"
INT8_MAX_PCT = 0.1
INT8_LONG_MAX_PCT = 0.2
FP8_MAX_PCT = 0.3


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    from benchmarks.harness import benchmarks_path
    from vllm_kvquant.fetch_model import default_model_dir, fetch_model
    from vllm_kvquant.scales import default_granularity

    model = fetch_model("smollm2", default_model_dir("smollm2"))
    schemes = ["int8", "fp8_e4m3"]
    if default_granularity("fp8_e4m3").value != "per_head":
        schemes.append("fp8_e4m3:per_head")
    out = tmp_path_factory.mktemp("ppl") / "ppl.json"
    argv = ["--model", str(model), "--calib", str(DATA / "austen_calib.txt"), "--heldout",
            str(DATA / "austen_heldout.txt"), "--num-samples", "16", "--seq-len", "128", "--short-windows", "16",
            "--long-windows", "6", "--model-dtype", "float16", "--chunk", "64", "--reference", "kvquant-unchunked",
            *(a for s in schemes for a in ("--scheme", s)), "--out", str(out)]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the CPU user's path: PyTorch
    env.update(VLLM_ENABLE_V1_MULTIPROCESSING="0",
               PYTHONPATH=os.pathsep.join([str(benchmarks_path()), os.environ.get("PYTHONPATH", "")]))  # fmt: skip
    proc = subprocess.run([sys.executable, "-P", "-m", "benchmarks.accuracy.granularity_ppl", *argv], env=env,
                          cwd=out.parent, capture_output=True, text=True, timeout=1800)  # fmt: skip
    assert proc.returncode == 0 and out.exists(), proc.stdout[-3000:] + proc.stderr[-5000:]
    print(proc.stdout)  # the per-scheme lines, for the README (pytest -s)
    result = json.loads(out.read_text())
    return {r["scheme"]: r for r in result["rows"]} | {"_result": result}


def _row(measured: dict, dtype: str, granularity: str | None = None) -> dict:
    from vllm_kvquant.scales import default_granularity

    granularity = granularity or default_granularity(dtype).value
    rows = [r for r in measured.values() if r.get("dtype") == dtype and r.get("granularity") == granularity]
    assert rows, (dtype, granularity, list(measured))
    return rows[0]


def test_int8_default_is_per_channel_within_a_tenth_of_a_percent(measured: dict) -> None:
    row = _row(measured, "int8")
    assert row["granularity"] == "per_channel" and row["margin"] == 1.0
    assert row["delta_short_pct"] <= INT8_MAX_PCT, row
    assert row["delta_long_pct"] <= INT8_LONG_MAX_PCT, row  # 4x the calibration length


def test_fp8_default_within_three_tenths_and_no_worse_than_per_head(measured: dict) -> None:
    row = _row(measured, "fp8_e4m3")
    per_head = _row(measured, "fp8_e4m3", "per_head")
    assert row["delta_short_pct"] <= FP8_MAX_PCT, row
    assert row["ppl_short"] <= per_head["ppl_short"] and row["ppl_long"] <= per_head["ppl_long"], (row, per_head)


def test_the_measurement_is_what_it_claims(measured: dict) -> None:
    """Teacher-forced tokens counted as asked, every scheme compared with the same BF16 run."""
    result = measured["_result"]
    assert result["predicted_tokens"] == {"short": 16 * 127, "long": 6 * 511}
    assert result["calibration_tokens"] == 16 * 128
    ref = measured["float16 (kvquant-unchunked)"]
    assert 5 < ref["ppl_short"] < 100 and 5 < ref["ppl_long"] < 100  # a real model on real English
