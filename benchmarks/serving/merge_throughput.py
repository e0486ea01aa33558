"""Merge the two halves of a throughput workload that ran side by side on two GPUs of one host.

``scripts/gpu-run.sh throughput`` runs one workload's configs in two lanes at the same time (one GPU
each) to fit a device call; this writes the issue's single file
``benchmarks/results/throughput-<device>-<workload>.json`` with every row, each row keeping the GPU
it ran on (``gpu``), and the parts' own commands.

    python -m benchmarks.serving.merge_throughput PART_A.json PART_B.json [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def merge(parts: list[dict], labels: list[str]) -> dict:
    """One result with every part's rows; refuses parts of different workloads or devices."""
    first = parts[0]
    for p in parts[1:]:
        if p["workload"] != first["workload"]:
            raise ValueError(f"parts ran different workloads: {p['workload']} vs {first['workload']}")
        if p["device"].get("name") != first["device"].get("name"):
            raise ValueError(f"parts ran on different cards: {p['device'].get('name')} vs {first['device'].get('name')}")
    rows = []
    for label, p in zip(labels, parts):
        for r in p["rows"]:
            rows.append({**r, "gpu": label})
    merged = {k: v for k, v in first.items() if k not in ("rows", "command", "total_seconds")}
    merged["command"] = " && ".join(p["command"] for p in parts)
    merged["lanes"] = {label: p["command"] for label, p in zip(labels, parts)}
    merged["note"] = (
        "rows of this workload ran in two lanes at the same time on two GPUs of one host (field 'gpu'); "
        "kvquant and vLLM fp8 FLASH_ATTN shared one GPU"
    )
    # copy_gbps / compile are per part; keep both when they differ.
    for key in ("copy_gbps", "compile"):
        vals = [p.get(key) for p in parts]
        merged[key] = vals[0] if all(v == vals[0] for v in vals) else dict(zip(labels, vals))
    merged["rows"] = rows
    return merged


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("parts", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    parts = [json.loads(p.read_text()) for p in args.parts]
    merged = merge(parts, [f"cuda:{i}" for i in range(len(parts))])
    wl = merged["workload"]
    slug = re.sub(r"[^a-z0-9]+", "-", parts[0]["device"].get("name", "gpu").lower()).strip("-")  # harness.device_slug
    out = args.out or REPO / "benchmarks" / "results" / f"throughput-{slug}-{wl['input_len']}x{wl['output_len']}.json"
    out.write_text(json.dumps(merged, indent=1) + "\n")
    print(f"wrote {out} ({len(merged['rows'])} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
