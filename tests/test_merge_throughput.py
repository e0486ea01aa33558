"""benchmarks/serving/merge_throughput.py: the parts of one workload become one results file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.serving.merge_throughput import default_labels, main, merge


def _row(name: str, rate: float, **extra) -> dict:
    return {"name": name, "config": name.split("#")[0], "median_output_tokens_per_s": rate, "output_tokens_per_s": rate,
            "runs": [{"output_tokens_per_s": rate}], **extra}  # fmt: skip


def _part(rows: list[dict], command: str, workload: dict | None = None, card: str = "NVIDIA H200", **top) -> dict:
    return {
        "device": {"name": card}, "versions": {"vllm": "0.26.0"}, "command": command, "compile": True, "repeats": 3,
        "copy_gbps": 4000.0, "workload": workload or {"num_requests": 256, "input_len": 1024, "output_len": 512},
        "rows": rows, **top,
    }  # fmt: skip


def test_merge_keeps_every_row_with_its_part_and_computes_the_ratios(tmp_path: Path) -> None:
    a = _part([_row("vllm-fp8-flash", 7200.0), _row("kvquant-fp8", 7560.0), _row("kvquant-int8", 7000.0)], "cmd a")
    b = _part([_row("vllm-fp8-flash-full", 7400.0), _row("kvquant-fp8-full", 7400.0)], "cmd b")
    c = _part([_row("vllm-bf16", 5000.0), _row("kvquant-fp8-fa3", 6800.0), _row("kvquant-int8-full", 1.0, error="boom")], "cmd c")
    d = _part([_row("kvquant-fp8", 7500.0), _row("kvquant-fp8#2", 7480.0), _row("vllm-fp8-flash", 7300.0)], "cmd d")
    merged = merge([a, b, c, d], ["a", "b", "c", "d"])
    names = [(r["name"], r["part"]) for r in merged["rows"]]
    assert names[:3] == [("vllm-fp8-flash", "a"), ("kvquant-fp8", "a"), ("kvquant-int8", "a")]
    # d's engine starts of configs already in the file get the next free number; their part's names are kept.
    assert names[-3:] == [("kvquant-fp8#2", "d"), ("kvquant-fp8#3", "d"), ("vllm-fp8-flash#2", "d")]
    assert [r.get("name_in_part") for r in merged["rows"][-3:]] == ["kvquant-fp8", "kvquant-fp8#2", "vllm-fp8-flash"]
    assert all(r["config"] in ("kvquant-fp8", "vllm-fp8-flash") for r in merged["rows"][-3:])
    assert merged["command"] == "cmd a && cmd b && cmd c && cmd d" and set(merged["parts"]) == {"a", "b", "c", "d"}
    assert merged["copy_gbps"] == 4000.0 and merged["compile"] is True and merged["repeats"] == 3
    ratios = {r["row"]: r for r in merged["ratios"]}
    assert ratios["kvquant-fp8"]["vs_vllm_fp8"] == {"ratio": 1.05, "reference": "vllm-fp8-flash", "same_part": True}
    assert ratios["kvquant-fp8-full"]["vs_vllm_fp8"]["reference"] == "vllm-fp8-flash-full"
    assert ratios["kvquant-fp8"]["vs_vllm_bf16"] == {"ratio": 1.512, "reference": "vllm-bf16", "same_part": False}
    assert ratios["kvquant-fp8#3"]["vs_vllm_fp8"]["reference"] == "vllm-fp8-flash#2"  # d's own fp8 row
    assert "vs_vllm_fp8" not in ratios["kvquant-fp8-fa3"]  # no vLLM fp8 row in part c: never across calls
    assert "kvquant-int8-full" not in ratios  # failed rows have no ratio

    paths = []
    for label, part in zip("abcd", (a, b, c, d)):
        paths.append(tmp_path / f"throughput-part-{label}-1024x512.json")
        paths[-1].write_text(json.dumps(part))
    out = tmp_path / "merged.json"
    assert main([*map(str, paths), "--out", str(out)]) == 0
    assert [r["part"] for r in json.loads(out.read_text())["rows"]][::3] == ["a", "b", "c", "d"]


def test_labels_come_from_the_part_file_names() -> None:
    assert default_labels([Path("throughput-part-a-1024x512.json"), Path("throughput-part-b2-x.json")]) == ["a", "b2"]
    assert default_labels([Path("x.json"), Path("y.json")]) == ["part1", "part2"]
    assert default_labels([Path("part-a.json"), Path("dir/part-a.json")]) == ["part1", "part2"]


def test_merge_refuses_parts_of_other_workloads_or_cards() -> None:
    a = _part([_row("vllm-bf16", 1.0)], "a")
    with pytest.raises(ValueError, match="different workloads"):
        merge([a, _part([_row("kvquant-fp8", 1.0)], "b", {"num_requests": 48, "input_len": 7424, "output_len": 512})], ["0", "1"])
    with pytest.raises(ValueError, match="different cards"):
        merge([a, _part([_row("kvquant-fp8", 1.0)], "b", card="NVIDIA H100 80GB HBM3")], ["0", "1"])
