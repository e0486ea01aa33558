"""benchmarks/serving/merge_throughput.py: two lanes of one workload become one results file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.serving.merge_throughput import main, merge


def _part(names: list[str], command: str, workload: dict | None = None, card: str = "NVIDIA H100 80GB HBM3") -> dict:
    return {
        "device": {"name": card}, "versions": {"vllm": "0.26.0"}, "command": command, "compile": True,
        "copy_gbps": 3000.0, "workload": workload or {"num_requests": 256, "input_len": 1024, "output_len": 512},
        "rows": [{"name": n, "output_tokens_per_s": 100.0 + i} for i, n in enumerate(names)],
    }  # fmt: skip


def test_merge_keeps_every_row_with_its_gpu(tmp_path: Path) -> None:
    a = _part(["vllm-fp8-flash", "kvquant-fp8"], "python throughput.py --configs a")
    b = _part(["vllm-bf16"], "python throughput.py --configs b")
    merged = merge([a, b], ["cuda:0", "cuda:1"])
    assert [(r["name"], r["gpu"]) for r in merged["rows"]] == [
        ("vllm-fp8-flash", "cuda:0"), ("kvquant-fp8", "cuda:0"), ("vllm-bf16", "cuda:1")]  # fmt: skip
    assert merged["command"] == "python throughput.py --configs a && python throughput.py --configs b"
    assert merged["copy_gbps"] == 3000.0 and merged["compile"] is True
    for key in ("device", "versions", "command", "copy_gbps", "rows"):
        assert key in merged
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text(json.dumps(a))
    pb.write_text(json.dumps(b))
    out = tmp_path / "merged.json"
    assert main([str(pa), str(pb), "--out", str(out)]) == 0
    assert len(json.loads(out.read_text())["rows"]) == 3


def test_merge_refuses_parts_of_other_workloads_or_cards() -> None:
    a = _part(["vllm-bf16"], "a")
    with pytest.raises(ValueError, match="different workloads"):
        merge([a, _part(["kvquant-fp8"], "b", {"num_requests": 48, "input_len": 7424, "output_len": 512})], ["0", "1"])
    with pytest.raises(ValueError, match="different cards"):
        merge([a, _part(["kvquant-fp8"], "b", card="NVIDIA H200")], ["0", "1"])
