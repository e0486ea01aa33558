"""``python -m benchmarks.serving.serve_load --smoke`` end to end on CPU (~2-3 min): a tiny dummy-weight
model served with kvquant, vLLM's own ``vllm bench serve`` client over a small grid, then the
consistency, no-leak and bad-input checks, then the trained tiny model (the session's, see
tests/conftest.py) loaded and checked for consistency; the results JSON has what the GPU run
must show."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("vllm")


@pytest.mark.vllm
def test_serve_load_smoke(calibrated_tiny_model, tmp_path) -> None:
    from benchmarks.harness import benchmarks_path

    out = tmp_path / "serve-load.json"
    trained = calibrated_tiny_model[0]  # the session's trained tiny model: not trained again
    # The benchmarks package (not the checkout's root) on the path, as in tests/test_profile_step.py.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(benchmarks_path()), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.serving.serve_load", "--smoke", "--workdir", str(tmp_path / "work"),
         "--out", str(out), "--trained-model", str(trained)],
        capture_output=True, text=True, timeout=900, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert {"device", "versions", "command", "copy_gbps", "rows", "consistency", "consistency_dummy", "no_leak",
            "bad_input"} <= set(result)  # fmt: skip
    assert [(r["max_concurrency"], r["request_rate"]) for r in result["rows"]] == [(4, "inf"), (8, 4.0)]
    for row in result["rows"]:
        assert row["completed"] == 12 and row["failed"] == 0, row
        assert row["output_throughput"] > 0 and row["p99_tpot_ms"] >= row["p50_tpot_ms"] > 0, row
    trained = result["consistency"]["kvquant-fp8"]  # the trained tiny model after its own load
    assert trained["ok"] and trained["equal"] == 8 and trained["no_leak"]["ok"], trained
    assert trained["load"]["completed"] == 16 and trained["load"]["failed"] == 0, trained["load"]
    assert trained["flat_fraction"] < 0.5, trained  # its greedy choices are real choices
    assert result["consistency_dummy"]["kvquant-fp8"]["errors"] == 0, result["consistency_dummy"]
    assert result["no_leak"]["kvquant-fp8"]["ok"], result["no_leak"]
    assert result["bad_input"]["kvquant-fp8"]["ok"], result["bad_input"]
    assert any("store fp8_e4m3 K/V" in line for line in result["servers"]["kvquant-fp8"]["log_lines"])
    assert result["summary"]["all_failed_zero"]
    # Both servers' logs were scanned; nothing compiled while serving (the bad-input checks make the
    # dummy-weight server log errors, counted but expected).
    for scan in (result["servers"]["kvquant-fp8"]["log_scan"], trained["log_scan"]):
        assert scan["jit_during_inference"] == 0 and isinstance(scan["errors"], int) and scan["lines"] is not None, scan
