"""PNG charts from the benchmark result JSONs in ``benchmarks/results/``.

- ``throughput-<dev>.json`` -> ``throughput-<dev>.png``: output tokens/s and KV capacity
  (tokens, with peak running requests) per config.
- ``accuracy-<dev>.json`` -> ``accuracy-<dev>.png``: per scheme, the models (plain, outlier, smollm2) side by
  side: mean KL to BF16 (p99 as a dot, the BF16 noise floor as a line), perplexity change and
  top-1 disagreement (older files: perplexity change and greedy agreement);
  ``accuracy-synthetic-<dev>.png``: attention-output error per scheme and scenario (log scale).
- ``decode-<dev>.json`` (rows with name, kv_dtype, batch, context, us, gbps, pct_copy_bw or
  pct_of_copy; ``kind`` "decode" or "write") -> ``decode-<dev>.png``: decode kernel
  microseconds vs context, one panel per batch, plus cache-write microseconds vs tokens.

    python -m benchmarks.plots [--results benchmarks/results] [--include-smoke]

Needs matplotlib (not a dependency of the package).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _load(path: Path) -> dict:
    data = json.loads(path.read_text())
    if isinstance(data, list):  # bare list of rows
        data = {"rows": data}
    return data


def _title(data: dict, what: str, path: Path) -> str:
    dev = data.get("device", {})
    name = dev.get("name") if isinstance(dev, dict) else dev
    vllm = (data.get("versions") or {}).get("vllm")
    return f"{what} - {name or path.stem}" + (f" (vLLM {vllm})" if vllm else "")


def _ok(rows: list[dict]) -> list[dict]:
    return [r for r in rows if not r.get("error")]


def _bar_labels(ax, bars, fmt: str) -> None:
    for b in bars:
        h = b.get_height()
        ax.annotate(format(h, fmt), (b.get_x() + b.get_width() / 2, h), ha="center", va="bottom", fontsize=7)


def _color(name: str) -> str:
    if name.startswith("kvquant"):
        return "tab:green" if "fp8" in name else "tab:olive"
    if "bf16" in name:
        return "tab:gray"
    return "tab:blue" if "fp8" in name else "tab:purple"


def plot_throughput(path: Path, out: Path, plt) -> Path | None:
    data = _load(path)
    rows = _ok(data.get("rows", []))
    if not rows:
        return None
    names = [r["name"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    bars = axes[0].bar(names, [r["output_tokens_per_s"] for r in rows], color=[_color(n) for n in names])
    _bar_labels(axes[0], bars, ".0f")
    axes[0].set_ylabel("output tokens/s (wall)")
    w = data.get("workload", {})
    axes[0].set_title(f"{w.get('num_requests')} req x {w.get('input_len')} in / {w.get('output_len')} out", fontsize=9)
    bars = axes[1].bar(names, [r["kv_capacity_tokens"] for r in rows], color=[_color(n) for n in names])
    for b, r in zip(bars, rows):
        axes[1].annotate(
            f"{r['kv_capacity_tokens']}\npeak run {r.get('peak_running_requests', '-')}",
            (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=7,
        )  # fmt: skip
    axes[1].set_ylabel("KV cache capacity (tokens)")
    axes[1].set_title(f"gpu_memory_utilization {w.get('gpu_memory_utilization')}", fontsize=9)
    for ax in axes:
        ax.tick_params(axis="x", rotation=30, labelsize=8)
        ax.margins(y=0.15)
    fig.suptitle(_title(data, "Throughput, Llama-3-8B shapes (dummy weights)", path), fontsize=10)
    fig.tight_layout()
    dest = out / f"{path.stem}.png"
    fig.savefig(dest, dpi=120)
    plt.close(fig)
    return dest


MODEL_COLORS = {"plain": "tab:blue", "outlier": "tab:red", "smollm2": "tab:green"}
MODEL_ORDER = ("plain", "outlier", "smollm2")  # the accuracy harness' models (benchmarks/accuracy/schemes.py)


_MODEL_TITLES = {"plain": "small Llama", "outlier": "small Llama with outlier channels", "smollm2": "SmolLM2-135M"}


def plot_accuracy_kl(data: dict, path: Path, out: Path, plt) -> Path | None:
    """Teacher-forced metrics (rows with ``model`` and ``kl_mean``): one group of bars per scheme."""
    rows = [r for r in _ok(data.get("rows", [])) if r.get("kl_mean") is not None]
    names = [n for n in dict.fromkeys(r["name"] for r in rows) if n != "bf16"]
    if not names:
        return None
    present = list(dict.fromkeys(r["model"] for r in rows))
    models = [m for m in MODEL_ORDER if m in present] + [m for m in present if m not in MODEL_ORDER]
    by = {(r["model"], r["name"]): r for r in rows}
    fig, axes = plt.subplots(3, 1, figsize=(max(9, 0.9 * len(names) + 3), 11), sharex=True)
    width = 0.8 / len(models)
    x = list(range(len(names)))
    floor = 1e-9
    for j, model in enumerate(models):
        xs = [i + (j - (len(models) - 1) / 2) * width for i in x]
        rs = [by.get((model, n)) for n in names]
        kl = [max(r["kl_mean"], floor) if r else float("nan") for r in rs]
        p99 = [max(r["kl_p99"], floor) if r else float("nan") for r in rs]
        c = MODEL_COLORS.get(model, f"C{3 + j}")
        axes[0].bar(xs, kl, width, color=c, alpha=0.8, label=f"{model} model: mean")
        axes[0].scatter(xs, p99, color=c, marker="_", s=120, zorder=3, label=f"{model} model: p99")
        noise = by.get((model, "bf16-triton"))
        if noise and noise["kl_mean"] > 0:
            axes[0].axhline(noise["kl_mean"], color=c, ls="--", lw=0.8, label=f"{model}: BF16 noise floor (mean)")
        axes[1].bar(xs, [r["ppl_delta_pct"] if r else float("nan") for r in rs], width, color=c, alpha=0.8, label=model)
        # no disagreement at all is drawn at half of one token's share (1 / 2N), the log axis' floor
        axes[2].bar(xs, [max(1.0 - r["top1"], 0.5 / max(r.get("tokens") or 1, 1)) if r else float("nan") for r in rs],
                    width, color=c, alpha=0.8, label=model)  # fmt: skip
    axes[0].set_yscale("log")
    axes[0].set_ylabel("KL(BF16 || scheme) per token (nats)")
    axes[0].legend(fontsize=7, ncol=3)
    axes[1].axhline(0, color="black", lw=0.6)
    axes[1].set_ylabel("perplexity change vs BF16 (%)")
    axes[1].legend(fontsize=7)
    axes[2].set_yscale("log")
    axes[2].set_ylabel("top-1 disagreement with BF16\n(none: drawn at 1/(2 tokens))")
    axes[2].set_xticks(x, names, rotation=35, ha="right", fontsize=8)
    for ax in axes:
        ax.grid(True, axis="y", which="both", lw=0.3)
    method = (data.get("settings") or {})
    sub = (f"{method.get('windows')} held-out sequences x ({method.get('prompt_len')} prefilled in chunks of "
           f"{method.get('chunk')} + {method.get('decode_len')} teacher-forced decode steps)")  # fmt: skip
    what = " / ".join(_MODEL_TITLES.get(m, m) for m in models)
    fig.suptitle(_title(data, f"KV-cache accuracy, teacher-forced: {what}", path)
                 + "\n" + sub, fontsize=10)  # fmt: skip
    fig.tight_layout()
    dest = out / f"{path.stem}.png"
    fig.savefig(dest, dpi=120)
    plt.close(fig)
    return dest


def plot_accuracy(path: Path, out: Path, plt) -> list[Path]:
    data = _load(path)
    written = []
    rows = _ok(data.get("rows", []))
    if any("kl_mean" in r for r in rows):
        written += [p for p in [plot_accuracy_kl(data, path, out, plt)] if p]
        rows = []  # the legacy panels below are for files without teacher-forced metrics
    quant = [r for r in rows if r["name"] != "bf16"]
    if quant:
        names = [r["name"] for r in quant]
        fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
        bars = axes[0].bar(names, [r.get("ppl_delta_pct") or 0.0 for r in quant], color=[_color(n) for n in names])
        _bar_labels(axes[0], bars, "+.2f")
        axes[0].axhline(0, color="black", lw=0.6)
        ref = next((r for r in rows if r["name"] == "bf16"), None)
        axes[0].set_ylabel("perplexity change vs bf16 KV (%)")
        if ref:
            axes[0].set_title(f"held-out perplexity, bf16 KV = {ref['perplexity']:.3f}", fontsize=9)
        x = range(len(quant))
        width = 0.4
        b1 = axes[1].bar([i - width / 2 for i in x], [r.get("token_match_rate", 0) for r in quant], width, label="token match rate")
        b2 = axes[1].bar([i + width / 2 for i in x], [r.get("seq_exact_match", 0) for r in quant], width, label="sequence exact match")
        _bar_labels(axes[1], b1, ".2f")
        _bar_labels(axes[1], b2, ".2f")
        axes[1].set_xticks(list(x), names)
        axes[1].set_ylim(0, 1.12)
        axes[1].set_ylabel("agreement with bf16 KV (greedy)")
        axes[1].legend(fontsize=8, loc="lower right")
        for ax in axes:
            ax.tick_params(axis="x", rotation=30, labelsize=8)
        fig.suptitle(_title(data, "KV-cache accuracy, small Llama trained on Shakespeare + Austen", path), fontsize=10)
        fig.tight_layout()
        dest = out / f"{path.stem}.png"
        fig.savefig(dest, dpi=120)
        plt.close(fig)
        written.append(dest)
    syn = data.get("synthetic") or []
    if syn:
        scenarios = list(dict.fromkeys(r["scenario"] for r in syn))
        schemes = list(dict.fromkeys(r["scheme"] for r in syn))
        fig, ax = plt.subplots(figsize=(13, 5))
        width = 0.8 / len(schemes)
        for j, scheme in enumerate(schemes):
            vals = {r["scenario"]: r["attn_out_rel_l2"] for r in syn if r["scheme"] == scheme}
            ax.bar([i + (j - len(schemes) / 2 + 0.5) * width for i in range(len(scenarios))],
                   [max(vals.get(s, 0.0), 1e-9) for s in scenarios], width, label=scheme, color=plt.cm.tab10(j % 10))  # fmt: skip
        ax.set_yscale("log")
        ax.set_xticks(range(len(scenarios)), scenarios, fontsize=8)
        ax.set_ylabel("attention output relative L2 error vs fp32")
        ax.legend(fontsize=7, ncol=3)
        ax.set_title(_title(data, "Synthetic K/V: attention error per KV storage scheme", path), fontsize=10)
        fig.tight_layout()
        dest = out / f"{path.stem.replace('accuracy', 'accuracy-synthetic', 1)}.png"
        fig.savefig(dest, dpi=120)
        plt.close(fig)
        written.append(dest)
    return written


#: Line colours: greens for our rows, the rest for everyone else's; they repeat when a file has
#: more rows than colours (our rows stay solid lines, the others dashed), never run out.
OUR_COLOURS = ("tab:green", "tab:olive", "darkgreen", "yellowgreen", "seagreen", "limegreen", "darkolivegreen", "mediumseagreen")
OTHER_COLOURS = ("tab:blue", "tab:orange", "tab:purple", "tab:red", "tab:brown", "tab:gray", "tab:pink", "tab:cyan", "navy", "gold")


def _palettes() -> tuple[itertools.cycle, itertools.cycle]:
    return itertools.cycle(OUR_COLOURS), itertools.cycle(OTHER_COLOURS)


def plot_decode(path: Path, out: Path, plt) -> Path | None:
    data = _load(path)
    ok = [r for r in _ok(data.get("rows", [])) if r.get("us") and "config" not in r]
    rows = [r for r in ok if r.get("kind", "decode") == "decode"]
    writes = [r for r in ok if r.get("kind") == "write"]
    if not rows and not writes:
        return None
    batches = sorted({r["batch"] for r in rows})
    n = len(batches) + (1 if writes else 0)
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 4), squeeze=False)
    if writes:
        ax = axes[0][-1]
        ours, others = _palettes()
        for name in dict.fromkeys(r["name"] for r in writes):
            pts = sorted((r.get("num_tokens", r["batch"]), r["us"]) for r in writes if r["name"] == name)
            mine = name.startswith("kvquant")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=name,
                    color=next(ours if mine else others), ls="-" if mine else "--")  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens written")
        ax.set_ylabel("KV cache write (us)")
        ax.set_title("cache write", fontsize=9)
        ax.grid(True, which="both", lw=0.3)
        ax.legend(fontsize=7)
    for ax, b in zip(axes[0], batches):
        ours, others = _palettes()
        for name in dict.fromkeys(r["name"] for r in rows):
            pts = sorted((r["context"], r["us"]) for r in rows if r["name"] == name and r["batch"] == b)
            if pts:
                mine = name.startswith("kvquant")
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=name,
                        color=next(ours if mine else others), ls="-" if mine else "--")  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("decode attention (us)")
        ax.set_title(f"batch {b}", fontsize=9)
        ax.grid(True, which="both", lw=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(_title(data, "Paged decode attention", path), fontsize=10)
    fig.tight_layout()
    dest = out / f"{path.stem}.png"
    fig.savefig(dest, dpi=120)
    plt.close(fig)
    return dest


#: Columns of the README's decode table, in order: (row name, header).
DECODE_COLUMNS = (
    ("kvquant-triton-fp8", "kvquant triton fp8"), ("kvquant-triton-int8", "kvquant triton int8"),
    ("kvquant-triton-fp8-per-channel", "kvquant triton fp8 per-channel"),
    ("kvquant-triton-int8-per-channel", "kvquant triton int8 per-channel"), ("kvquant-fa3-fp8", "kvquant fa3 fp8"), ("kvquant-flashinfer-fp8", "kvquant flashinfer fp8"),
    ("vllm-fa3-bf16", "vLLM FA3 bf16"), ("vllm-fa3-fp8", "vLLM FA3 fp8"), ("vllm-triton-fp8", "vLLM Triton fp8"),
    ("flashinfer-fp8", "FlashInfer fp8"), ("flashinfer-bf16", "FlashInfer bf16"),
)  # fmt: skip


def decode_markdown(path: Path) -> str:
    """The README's decode table from a decode JSON: us per shape, our % of copy bandwidth, and
    vLLM FA3 fp8's time over ours (> 1: ours faster)."""
    rows = [r for r in _ok(_load(path).get("rows", [])) if r.get("kind", "decode") == "decode" and r.get("us")]
    by = {(r["name"], r["batch"], r["context"]): r for r in rows}
    shapes = sorted({(r["batch"], r["context"]) for r in rows})
    cols = [(n, h) for n, h in DECODE_COLUMNS if any(k[0] == n for k in by)]
    head = ["batch x context", *(h for _, h in cols), "% copy (ours fp8 / int8)", "FA3 fp8 / ours (fp8 / int8)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for b, c in shapes:
        cells = [f"{b} x {c // 1024}k" if c % 1024 == 0 else f"{b} x {c}"]
        cells += [f"{by[(n, b, c)]['us']:.1f}" if (n, b, c) in by else "-" for n, _ in cols]
        ours = [by.get((f"kvquant-triton-{k}", b, c)) for k in ("fp8", "int8")]
        fa3 = by.get(("vllm-fa3-fp8", b, c))
        cells.append(" / ".join(f"{r['pct_copy']:.0f}" if r and r.get("pct_copy") else "-" for r in ours))
        cells.append(" / ".join(f"{fa3['us'] / r['us']:.2f}x" if r and fa3 else "-" for r in ours))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--out-dir", type=Path, default=None, help="default: --results")
    ap.add_argument("--include-smoke", action="store_true", help="also plot *-smoke.json")
    ap.add_argument("--decode-markdown", type=Path, default=None, help="print the README decode table of this JSON")
    args = ap.parse_args(argv)
    if args.decode_markdown:
        print(decode_markdown(args.decode_markdown))
        return 0
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = args.out_dir or args.results
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for path in sorted(args.results.glob("*.json")):
        if "-smoke" in path.stem and not args.include_smoke:
            continue
        try:
            if path.stem.startswith("throughput"):
                written += [p for p in [plot_throughput(path, out, plt)] if p]
            elif path.stem.startswith("accuracy"):
                written += plot_accuracy(path, out, plt)
            elif path.stem.startswith("decode"):
                written += [p for p in [plot_decode(path, out, plt)] if p]
        except Exception as e:  # noqa: BLE001
            print(f"{path}: could not plot ({type(e).__name__}: {e})", file=sys.stderr)
    for p in written:
        print(f"wrote {p}")
    if not written:
        print(f"nothing to plot in {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
