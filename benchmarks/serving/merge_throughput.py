"""Merge the parts of one throughput workload into its results file, with the ratios that matter.

``scripts/gpu-run.sh throughput`` runs a workload's configs in parts that each fit one device call
(``KVQ_THR_PART``); kvquant and vLLM's fp8 FLASH_ATTN of one CUDA-graph mode share a part, so their
ratio is measured on one card in one call. This writes the single file
``benchmarks/results/throughput-<device>-<workload>.json``: every row with its ``part``, the
parts' own commands, and ``ratios``: each kvquant row's median output tok/s over the median of
vLLM's fp8 row of the same mode in the same part, and over ``vllm-bf16``'s (same part if there,
else any part). A row name met again (a config started in two parts) becomes ``NAME#k``;
``name_in_part`` keeps what its part called it.

    python -m benchmarks.serving.merge_throughput PART.json... [--labels a,b,c] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _config(row: dict) -> str:
    return row.get("config") or row["name"].split("#")[0]


def _median(row: dict) -> float | None:
    if row.get("error"):
        return None
    return row.get("median_output_tokens_per_s", row.get("output_tokens_per_s"))


def fp8_reference(config: str) -> str | None:
    """vLLM's fp8 config that a kvquant config is held against (same CUDA-graph mode)."""
    if not config.startswith("kvquant-"):
        return None
    return "vllm-fp8-flash-full" if config.endswith("-full") else "vllm-fp8-flash"


def ratios(rows: list[dict]) -> list[dict]:
    """Each kvquant row against vLLM's fp8 of its mode in its part, and against vllm-bf16."""
    out = []
    for row in rows:
        ref_name, value = fp8_reference(_config(row)), _median(row)
        if ref_name is None or value is None:
            continue
        entry: dict = {"row": row["name"], "part": row["part"]}
        for key, wanted in (("vs_vllm_fp8", ref_name), ("vs_vllm_bf16", "vllm-bf16")):
            same = [r for r in rows if _config(r) == wanted and r["part"] == row["part"] and _median(r)]
            anywhere = [r for r in rows if _config(r) == wanted and _median(r)]
            if wanted == ref_name:
                anywhere = []  # the fp8 ratio only on one card in one call
            ref = (same or anywhere or [None])[0]
            if ref is not None:
                entry[key] = {"ratio": round(value / _median(ref), 3), "reference": ref["name"], "same_part": ref in same}
        out.append(entry)
    return out


def merge(parts: list[dict], labels: list[str]) -> dict:
    """One result with every part's rows; refuses parts of different workloads or devices."""
    first = parts[0]
    for p in parts[1:]:
        if p["workload"] != first["workload"]:
            raise ValueError(f"parts ran different workloads: {p['workload']} vs {first['workload']}")
        if p["device"].get("name") != first["device"].get("name"):
            raise ValueError(f"parts ran on different cards: {p['device'].get('name')} vs {first['device'].get('name')}")
    rows, used = [], set()
    for label, p in zip(labels, parts):
        for r in p["rows"]:
            name, k = r["name"], 1
            while name in used:
                k += 1
                name = f"{_config(r)}#{k}"
            used.add(name)
            rows.append({**r, "name": name, "config": _config(r), "part": label,
                         **({"name_in_part": r["name"]} if name != r["name"] else {})})  # fmt: skip
    merged = {k: v for k, v in first.items() if k not in ("rows", "command", "total_seconds")}
    merged["command"] = " && ".join(p["command"] for p in parts)
    merged["parts"] = {label: {"command": p["command"], "total_seconds": p.get("total_seconds")} for label, p in zip(labels, parts)}
    merged["note"] = (
        "rows of this workload ran in parts, each in its own device call (field 'part'); kvquant and vLLM's fp8 "
        "FLASH_ATTN of one CUDA-graph mode shared a part, so 'ratios' compares them on one card in one call"
    )
    # copy_gbps / compile / repeats are per part; keep one value when all agree, else each part's.
    for key in ("copy_gbps", "compile", "repeats"):
        vals = [p.get(key) for p in parts]
        merged[key] = vals[0] if all(v == vals[0] for v in vals) else dict(zip(labels, vals))
    merged["rows"] = rows
    merged["ratios"] = ratios(rows)
    return merged


def default_labels(paths: list[Path]) -> list[str]:
    """``a`` for ``throughput-part-a-1024x512.json``, else ``part1``, ``part2``, ..."""
    labels = []
    for i, path in enumerate(paths, 1):
        m = re.search(r"part-([A-Za-z0-9]+)", path.name)
        labels.append(m.group(1) if m else f"part{i}")
    if len(set(labels)) != len(labels):
        labels = [f"part{i}" for i in range(1, len(paths) + 1)]
    return labels


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("parts", nargs="+", type=Path)
    ap.add_argument("--labels", default=None, help="comma-separated, one per part (default: from the file names)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    parts = [json.loads(p.read_text()) for p in args.parts]
    labels = args.labels.split(",") if args.labels else default_labels(args.parts)
    if len(labels) != len(parts) or len(set(labels)) != len(labels):
        raise SystemExit(f"--labels needs {len(parts)} distinct labels, got {labels}")
    merged = merge(parts, labels)
    wl = merged["workload"]
    slug = re.sub(r"[^a-z0-9]+", "-", parts[0]["device"].get("name", "gpu").lower()).strip("-")  # harness.device_slug
    out = args.out or REPO / "benchmarks" / "results" / f"throughput-{slug}-{wl['input_len']}x{wl['output_len']}.json"
    out.write_text(json.dumps(merged, indent=1) + "\n")
    print(f"wrote {out} ({len(merged['rows'])} rows)")
    for r in merged["ratios"]:
        fp8 = r.get("vs_vllm_fp8", {}).get("ratio", "-")
        bf16 = r.get("vs_vllm_bf16", {}).get("ratio", "-")
        print(f"  {r['row']:<22} part {r['part']:<6} vs vLLM fp8 {fp8}  vs bf16 {bf16}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
