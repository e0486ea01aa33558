"""Choose the static scale granularity and calibration margin by measurement (no vLLM, no GPU).

A PyTorch fake-quant simulation in transformers: every layer's K (after RoPE) and V are quantized
as kvquant's cache write does (``q = saturate(x / scale)``, int8 round-half-even or fp8 e4m3
round-to-nearest), and attention follows kvquant's default ``prefill: bf16`` with chunked prefill:
a query attends to its own chunk unquantized and to every earlier chunk dequantized. Scales come
from absmax statistics over calibration windows, exactly like ``vllm-kvquant calibrate``
(``scale = amax * margin / qmax``), recorded once per channel and reduced per scheme:

- ``tensor`` / ``head``: one scale per layer / per KV head;
- ``channel``: one per KV head and channel;
- ``pair`` (K only): one per RoPE pair (channels ``i`` and ``i + d/2`` share the larger amax);
- ``pairnorm`` (K only): one per RoPE pair from the amax of the pair's norm ``sqrt(k_i^2 + k_{i+d/2}^2)``,
  which RoPE leaves unchanged: a bound on either channel at any position.

Perplexity is measured on held-out windows of the calibration length and on windows 4x longer
(positions beyond any calibration sample: RoPE rotates a channel pair's energy between its two
channels as positions grow, so a per-channel K range learnt on short samples can clip).

    python -m benchmarks.accuracy.granularity_sim --model ~/.cache/vllm-kvquant/models/smollm2 \\
        --calib .benchdata/calib.jsonl --heldout .benchdata/heldout.jsonl --out sim.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.accuracy.data import document_windows

QMAX = {"int8": 127.0, "fp8_e4m3": 448.0}


@dataclass(frozen=True)
class Scheme:
    kv_dtype: str  # int8 | fp8_e4m3 | none (the unquantized reference)
    k_gran: str  # tensor | head | channel | pair
    v_gran: str  # tensor | head | channel
    margin: float = 1.0

    @property
    def name(self) -> str:
        if self.kv_dtype == "none":
            return "reference"
        return f"{self.kv_dtype} K {self.k_gran} / V {self.v_gran} margin {self.margin:g}"


def reduce_amax(amax: torch.Tensor, gran: str, pair_norm: torch.Tensor | None = None) -> torch.Tensor:
    """Per-channel amax ``[heads, d]`` (and K's pair-norm amax) -> the amax each channel is scaled by."""
    if gran == "pairnorm":
        return pair_norm
    if gran == "tensor":
        return amax.amax().expand_as(amax)
    if gran == "head":
        return amax.amax(dim=1, keepdim=True).expand_as(amax)
    if gran == "channel":
        return amax
    if gran == "pair":
        half = amax.shape[1] // 2
        pair = torch.maximum(amax[:, :half], amax[:, half:])
        return torch.cat([pair, pair], dim=1)
    raise ValueError(f"unknown granularity {gran!r}")


def fake_quant(x: torch.Tensor, scale: torch.Tensor, kv_dtype: str) -> torch.Tensor:
    """``x [b, heads, s, d]`` through the 8-bit cache and back; ``scale [heads, d]``."""
    s = scale[None, :, None, :]
    y = (x / s).clamp(-QMAX[kv_dtype], QMAX[kv_dtype])
    y = torch.round(y) if kv_dtype == "int8" else y.to(torch.float8_e4m3fn).to(x.dtype)
    return y * s


class Sim:
    """Holds the mode the registered attention function runs in (record / reference / a scheme)."""

    def __init__(self, num_layers: int, chunk: int) -> None:
        self.chunk = chunk
        self.mode = "reference"
        self.amax: list[list[torch.Tensor] | None] = [None] * num_layers  # per layer: [k, v, k pair norm] of [heads, d]
        self.scales: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.kv_dtype = "none"

    def use(self, scheme: Scheme) -> None:
        self.kv_dtype = scheme.kv_dtype
        self.mode = "reference" if scheme.kv_dtype == "none" else "quant"
        if self.mode == "quant":
            q = QMAX[scheme.kv_dtype]
            self.scales = [
                (reduce_amax(k, scheme.k_gran, kn).clamp(min=1e-8) * scheme.margin / q,
                 reduce_amax(v, scheme.v_gran).clamp(min=1e-8) * scheme.margin / q)
                for k, v, kn in self.amax
            ]  # fmt: skip

    def attention(self, module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        layer = module.layer_idx
        if self.mode == "record":
            half = key.shape[-1] // 2
            norm = torch.sqrt(key[..., :half].float() ** 2 + key[..., half:].float() ** 2)  # RoPE-invariant
            norm = torch.cat([norm, norm], dim=-1)
            stats = [key.abs().amax(dim=(0, 2)).float(), value.abs().amax(dim=(0, 2)).float(), norm.amax(dim=(0, 2))]
            old = self.amax[layer]
            self.amax[layer] = stats if old is None else [torch.maximum(o, n) for o, n in zip(old, stats)]
        sdpa = torch.nn.functional.scaled_dot_product_attention
        if self.mode != "quant":
            out = sdpa(query, key, value, is_causal=True, scale=scaling, enable_gqa=True)
            return out.transpose(1, 2).contiguous(), None
        ks, vs = self.scales[layer]
        pos = torch.arange(query.shape[2])
        c = pos // self.chunk
        ctx = c[None, :] < c[:, None]  # earlier chunks: read back from the 8-bit cache
        own = (pos[None, :] <= pos[:, None]) & ~ctx  # the query's own chunk: unquantized (prefill "bf16")
        keys = torch.cat([fake_quant(key, ks, self.kv_dtype), key], dim=2)
        values = torch.cat([fake_quant(value, vs, self.kv_dtype), value], dim=2)
        mask = torch.cat([ctx, own], dim=1)
        out = sdpa(query, keys, values, attn_mask=mask, scale=scaling, enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None


@torch.no_grad()
def nll(model, windows: list[list[int]]) -> tuple[float, int]:
    total, n = 0.0, 0
    for w in windows:
        ids = torch.tensor([w])
        logits = model(ids).logits[0, :-1].float()
        total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        n += len(w) - 1
    return total, n


def default_schemes() -> list[Scheme]:
    """The grid behind the README's table: int8 per-channel vs per-RoPE-pair K over margins, the
    per-head / per-tensor baselines, fp8's candidates."""
    out = []
    for margin in (1.0, 1.1, 1.25, 1.5):
        out += [Scheme("int8", "channel", "channel", margin), Scheme("int8", "pair", "channel", margin),
                Scheme("int8", "pairnorm", "channel", margin)]
    out += [Scheme("int8", "head", "head"), Scheme("int8", "channel", "head")]
    out += [Scheme("fp8_e4m3", "head", "head"), Scheme("fp8_e4m3", "tensor", "tensor"),
            Scheme("fp8_e4m3", "channel", "channel"), Scheme("fp8_e4m3", "pair", "channel"),
            Scheme("fp8_e4m3", "head", "head", 1.25)]  # fmt: skip
    return out


def parse_scheme(text: str) -> Scheme:
    """``int8:channel:channel:1.25`` (dtype:K:V[:margin])."""
    parts = text.split(":")
    return Scheme(parts[0], parts[1], parts[2], float(parts[3]) if len(parts) > 3 else 1.0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True, help="calibration text (as vllm-kvquant calibrate --data)")
    ap.add_argument("--heldout", required=True, help="held-out text")
    ap.add_argument("--seq-len", type=int, default=512, help="calibration sample length (calibrate's default)")
    ap.add_argument("--num-samples", type=int, default=32)
    ap.add_argument("--short-windows", type=int, default=8, help="held-out windows of --seq-len tokens")
    ap.add_argument("--long-windows", type=int, default=2, help="held-out windows of 4 x --seq-len tokens")
    ap.add_argument("--chunk", type=int, default=64, help="prefill chunk (tokens)")
    ap.add_argument("--scheme", action="append", type=parse_scheme, help="dtype:K:V[:margin]; default: a grid")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--stats", default=None, help="calibration statistics file: reused when it exists, else written")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer

    from vllm_kvquant.calibrate import special_prefix

    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    sim = Sim(model.config.num_hidden_layers, args.chunk)
    AttentionInterface.register("kvquant_sim", sim.attention)
    model.config._attn_implementation = "kvquant_sim"
    prefix = special_prefix(tok)
    if args.stats and Path(args.stats).exists():
        sim.amax = torch.load(args.stats)
    else:
        sim.mode = "record"
        nll(model, document_windows(tok, args.calib, args.seq_len, args.num_samples, prefix))
        if args.stats:
            torch.save(sim.amax, args.stats)
    evals = {
        "short": document_windows(tok, args.heldout, args.seq_len, args.short_windows, prefix),
        "long": document_windows(tok, args.heldout, 4 * args.seq_len, args.long_windows, prefix),
    }
    sim.use(Scheme("none", "-", "-"))
    ref = {key: math.exp(total / n) for key, (total, n) in ((k, nll(model, w)) for k, w in evals.items())}
    rows = [{"scheme": "reference", **{f"ppl_{k}": v for k, v in ref.items()}}]
    for scheme in args.scheme or default_schemes():
        if scheme.kv_dtype == "none":
            continue  # the reference, measured above
        t0 = time.time()
        sim.use(scheme)
        row = {"scheme": scheme.name, **vars(scheme)}
        for key, windows in evals.items():
            total, n = nll(model, windows)
            row[f"ppl_{key}"] = math.exp(total / n)
            row[f"delta_{key}_pct"] = 100 * (row[f"ppl_{key}"] / ref[key] - 1)
        rows.append(row)
        print(f"{scheme.name:48s} short {row['delta_short_pct']:+.3f}%  long {row['delta_long_pct']:+.3f}%  "
              f"({time.time() - t0:.0f}s)", flush=True)  # fmt: skip
    if args.out:
        meta = {k: str(v) for k, v in vars(args).items() if k != "scheme"}
        Path(args.out).write_text(json.dumps({"command": "python -m benchmarks.accuracy.granularity_sim", "args": meta,
                                              "rows": rows}, indent=1) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
