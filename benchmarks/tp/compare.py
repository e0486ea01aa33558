"""What the tensor-parallel check compares, as pure functions (no vLLM, no GPU): tested on CPU.

- :func:`sidecar_diff`: two calibrated sidecars (tp=N vs tp=1) - same layers, heads, format, and
  the largest relative difference of any K/V scale;
- :func:`agreement`: greedy tokens and logprobs of a tp=N run vs the tp=1 run (the single-GPU
  tests' tolerances, see :data:`TOLERANCES`);
- :func:`rank_scale_problems`: every rank's attention layers hold the sidecar's scales of exactly
  the KV heads that rank holds (split, or replicated when tp > KV heads).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

#: The issue's bound for "the same sidecar", and one bf16 ulp (relative, 2**-7): K/V computed with
#: another tp sum their partial products in another order, which moves an absmax by about that.
STRICT_REL = 1e-6
BF16_ULP_REL = 2.0**-7


@dataclass(frozen=True)
class Tolerances:
    """From tests/test_backend_cpu.py (first tokens) and tests/test_backend_gpu.py (graph vs eager:
    the same 8-bit scheme computed in another bf16 order, as tp=N vs tp=1 is)."""

    single_chunk_first_logprob: float = 0.05  # prompt prefilled in one chunk: same first token, this close
    chunked_first_logprob: float = 0.1  # later chunks read the 8-bit cache
    mean_logprob: float = 0.05  # mean |difference| of the chosen tokens while outputs agree
    max_differing_sequences: int = 1  # identical >= n - 1
    single_chunk_chars: int = 60  # prompts shorter than this are prefilled in one chunk (CPU test's rule)


TOLERANCES = Tolerances()


def rel_diff(a: float, b: float) -> float:
    scale = max(abs(a), abs(b))
    return 0.0 if scale == 0 else abs(a - b) / scale


def sidecar_diff(run: Any, ref: Any) -> dict:
    """``run`` vs ``ref`` (:class:`ScalesFile`): structure problems and the largest relative scale difference."""
    problems = []
    for attr in ("kv_dtype", "granularity"):
        if getattr(run, attr) != getattr(ref, attr):
            problems.append(f"{attr}: {getattr(run, attr)} vs {getattr(ref, attr)}")
    for attr in ("num_layers", "num_kv_heads", "head_size", "layer_names"):
        if getattr(run.model, attr) != getattr(ref.model, attr):
            problems.append(f"model.{attr}: {getattr(run.model, attr)} vs {getattr(ref.model, attr)}")
    if set(run.layers) != set(ref.layers):
        problems.append(f"layers differ: {sorted(set(run.layers) ^ set(ref.layers))}")
    per_layer: dict[str, float] = {}
    for name in sorted(set(run.layers) & set(ref.layers), key=_layer_key):
        a, b = run.layers[name], ref.layers[name]
        if len(a.k_scale) != len(b.k_scale) or len(a.v_scale) != len(b.v_scale):
            problems.append(f"{name}: {len(a.k_scale)} K scales vs {len(b.k_scale)}")
            continue
        per_layer[name] = max(rel_diff(x, y) for x, y in zip(a.k_scale + a.v_scale, b.k_scale + b.v_scale))
    worst = max(per_layer, key=per_layer.get) if per_layer else None
    return {
        "structure_problems": problems,
        "max_rel": per_layer[worst] if worst else math.inf,
        "worst_layer": worst,
        "per_layer_max_rel": {k: float(f"{v:.3g}") for k, v in per_layer.items()},
    }


def _layer_key(name: str) -> tuple:
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split("."))


def agreement(run: dict, ref: dict, tol: Tolerances = TOLERANCES) -> dict:
    """Compare two engine_runner results (same prompts, same order).

    ``token_problems`` / ``logprob_problems`` empty = within tolerance.
    """
    if [r["prompt"] for r in run["results"]] != [r["prompt"] for r in ref["results"]]:
        bad = ["the runs used different prompts"]
        return {"token_problems": bad, "logprob_problems": bad, "identical": 0, "n": len(ref["results"])}
    token_problems: list[str] = []
    logprob_problems: list[str] = []
    identical, diffs, first_diffs = 0, [], []
    for ours, theirs in zip(run["results"], ref["results"]):
        prompt = ours["prompt"]
        single = len(prompt) < tol.single_chunk_chars
        if ours["token_ids"][:1] == theirs["token_ids"][:1] and ours["logprobs"]:
            first = abs(ours["logprobs"][0] - theirs["logprobs"][0])
            first_diffs.append(first)
            bound = tol.single_chunk_first_logprob if single else tol.chunked_first_logprob
            if first > bound:
                logprob_problems.append(f"first-token logprob differs by {first:.4f} > {bound} for {prompt[:40]!r}")
        elif single:
            token_problems.append(f"first token differs for the single-chunk prompt {prompt[:40]!r}")
        for a, b, ta, tb in zip(ours["logprobs"], theirs["logprobs"], ours["token_ids"], theirs["token_ids"]):
            if ta != tb:
                break
            diffs.append(abs(a - b))
        identical += ours["token_ids"] == theirs["token_ids"]
    n = len(ref["results"])
    mean = sum(diffs) / len(diffs) if diffs else math.inf
    if mean > tol.mean_logprob:
        logprob_problems.append(f"mean |logprob difference| {mean:.4f} > {tol.mean_logprob}")
    if identical < n - tol.max_differing_sequences:
        token_problems.append(f"only {identical}/{n} greedy continuations identical (need >= {n - tol.max_differing_sequences})")
    return {
        "token_problems": token_problems,
        "logprob_problems": logprob_problems,
        "identical": identical,
        "n": n,
        "mean_logprob_diff": round(mean, 5),
        "max_first_logprob_diff": round(max(first_diffs), 5) if first_diffs else None,
        "steps_compared": len(diffs),
        "tolerances": asdict(tol),
    }


def rank_scale_problems(report: list[dict], scales: Any, tp: int, kv_dtype: str, rel: float = 1e-6) -> tuple[list[str], int]:
    """``report``: ``collective_rpc("kvquant_backend_report")`` (one dict per rank, rank order).

    Returns (problems, number of (rank, layer) pairs checked). Every attention layer of every
    rank must run KVQUANT with ``kv_dtype`` and hold ``shard_scales(scales, tp, rank)``'s scales.
    """
    from vllm_kvquant.scales import shard_scales

    problems: list[str] = []
    checked = 0
    if len(report) != tp:
        return [f"{len(report)} ranks reported, expected {tp}"], 0
    for rank, layers in enumerate(report):
        shard = shard_scales(scales, tp, rank)
        if set(layers) != set(shard.layers):
            problems.append(f"rank {rank}: layers {sorted(layers)} vs sidecar {sorted(shard.layers)}")
        for name, got in layers.items():
            want = shard.layers.get(name)
            if want is None:
                continue
            checked += 1
            where = f"rank {rank} {name}"
            if got.get("backend") != "KVQUANT" or got.get("kv_dtype") != kv_dtype:
                problems.append(f"{where}: backend {got.get('backend')}, kv_dtype {got.get('kv_dtype')}")
                continue
            for kind, expected in (("k_scale", want.k_scale), ("v_scale", want.v_scale)):
                actual = got.get(kind) or []
                if len(actual) != len(expected) or any(rel_diff(a, e) > rel for a, e in zip(actual, expected)):
                    problems.append(f"{where}: {kind} {actual} != heads {list(shard.kv_heads)} of the sidecar {list(expected)}")
    return problems, checked
