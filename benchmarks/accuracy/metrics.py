"""Teacher-forced metrics from captured hidden states: KL to the BF16 reference, top-1 agreement, perplexity.

Each scheme runs the same held-out windows once (chunked prefill, so later chunks read the 8-bit
cache); :mod:`benchmarks.accuracy.worker` records the model's final hidden state for every token. Here the
LM head turns them into logits exactly as vLLM's logits processor does for an unquantized head
(``F.linear`` in the model dtype), the distribution is ``log_softmax`` of those logits (in float64,
so that tiny KLs are not rounding noise), and per token:

- ``KL(P_ref || P_scheme) = sum_x p_ref(x) (log p_ref(x) - log p_scheme(x))``, reported as mean and
  99th percentile over all predicted tokens;
- top-1 agreement: ``argmax P_scheme == argmax P_ref``;
- perplexity: ``exp(mean NLL)`` of the actual next token.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class TokenMetrics:
    """Per predicted token, concatenated over windows (same order for every scheme)."""

    kl: torch.Tensor  # float64 [N]
    top1_agree: torch.Tensor  # bool [N]
    nll: torch.Tensor  # float64 [N]: -log p_scheme(actual next token)

    def summary(self, ref_ppl: float | None = None) -> dict:
        n = int(self.kl.numel())
        if n == 0:
            raise ValueError("no predicted tokens to summarize")
        ppl = math.exp(float(self.nll.mean()))
        out = {
            "ppl": ppl,
            "kl_mean": float(self.kl.mean()),
            "kl_p99": float(torch.quantile(self.kl, 0.99)),
            "top1": float(self.top1_agree.double().mean()),
            "tokens": n,
        }
        if ref_ppl:
            out["ppl_delta_pct"] = 100.0 * (ppl / ref_ppl - 1.0)
        return out


def kl_divergence(ref_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """Row-wise ``KL(P_ref || P)`` from log-probabilities (last dim = vocabulary)."""
    if ref_logp.shape != logp.shape:
        raise ValueError(f"KL of distributions with different shapes {tuple(ref_logp.shape)} and {tuple(logp.shape)}")
    p = ref_logp.exp()
    # 0 * log 0 := 0 (a token the reference never predicts contributes nothing)
    terms = torch.where(p > 0, p * (ref_logp - logp), torch.zeros_like(p))
    return terms.sum(dim=-1)


def window_rows(input_ids: torch.Tensor, positions: torch.Tensor, windows: Sequence[Sequence[int]], what: str) -> list[torch.Tensor]:
    """Row indices of each evaluation window in a captured token stream (any window order).

    The stream holds the windows' prefill chunks (one request at a time, positions restarting at 0
    for each window). Every window must appear exactly once, complete and in position order;
    anything else (a window missing or repeated, padding rows, a recomputed chunk) is an error
    naming ``what``, the segment and the position, so that no metric is computed from misaligned rows.
    """
    ids, pos = input_ids.tolist(), positions.tolist()
    if len(ids) != len(pos):
        raise ValueError(f"{what}: {len(ids)} captured input ids but {len(pos)} positions")
    starts = [i for i, p in enumerate(pos) if p == 0]
    if not starts or starts[0] != 0:
        raise ValueError(f"{what}: the captured stream does not begin at position 0 (first position {pos[:1]})")
    index: dict[tuple[int, ...], list[int]] = {}
    for w, tokens in enumerate(windows):
        index.setdefault(tuple(tokens), []).append(w)
    found: list[torch.Tensor | None] = [None] * len(windows)
    for s, (a, b) in enumerate(zip(starts, [*starts[1:], len(pos)])):
        if pos[a:b] != list(range(b - a)):
            bad = next(i for i in range(b - a) if pos[a + i] != i)
            raise ValueError(f"{what}: captured segment {s} (rows {a}..{b - 1}) has position {pos[a + bad]} "
                             f"where {bad} belongs: chunks out of order, recomputed or padded")  # fmt: skip
        candidates = index.get(tuple(ids[a:b]), [])
        free = [w for w in candidates if found[w] is None]
        if not free:
            lengths = sorted({len(t) for t in windows})
            raise ValueError(f"{what}: captured segment {s} (rows {a}..{b - 1}, {b - a} tokens) matches no "
                             f"evaluation window still unmatched (window lengths {lengths})")  # fmt: skip
        found[free[0]] = torch.arange(a, b)
    missing = [w for w, rows in enumerate(found) if rows is None]
    if missing:
        raise ValueError(f"{what}: windows {missing[:8]} were not captured ({len(missing)} of {len(windows)} missing)")
    return [rows for rows in found if rows is not None]


@dataclass(frozen=True)
class LMHead:
    """The LM head as vLLM applies it for an unquantized model: ``F.linear`` in the weight's dtype."""

    weight: torch.Tensor  # [vocab, hidden]

    @classmethod
    def from_checkpoint(cls, model_dir: Path, device: str | torch.device = "cpu") -> "LMHead":
        import json

        from safetensors import safe_open

        config = json.loads((model_dir / "config.json").read_text())
        name = "model.embed_tokens.weight" if config.get("tie_word_embeddings") else "lm_head.weight"
        for f in sorted(model_dir.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as st:
                if name in st.keys():
                    return cls(st.get_tensor(name).to(device))
        raise KeyError(f"{model_dir}: no {name} in its safetensors")

    def logprobs(self, hidden: torch.Tensor) -> torch.Tensor:
        h = hidden.to(self.weight.device, self.weight.dtype)
        logits = torch.nn.functional.linear(h, self.weight)
        return torch.log_softmax(logits.double(), dim=-1)


def _blocks(n: int, size: int) -> Iterator[slice]:
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


def predicted_rows(rows_per_seq: list[torch.Tensor], seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(row indices of every position that predicts a next token, the actual next tokens), sequence by sequence.

    A sequence of n tokens has n - 1 predictions, made by the rows of positions 0 .. n-2 (its capture
    may hold n rows, or n - 1 when its last token was sampled and never fed back).
    """
    rows, targets = [], []
    for r, tokens in zip(rows_per_seq, seqs):
        n = len(tokens) - 1
        if r.numel() < n:
            raise ValueError(f"a sequence of {len(tokens)} tokens has only {r.numel()} captured rows")
        rows.append(r[:n])
        targets.append(torch.tensor(list(tokens[1:]), dtype=torch.long))
    return torch.cat(rows), torch.cat(targets)


def token_metrics(head: LMHead, ref_hidden: torch.Tensor, hidden: torch.Tensor, targets: torch.Tensor,
                  block: int = 1024) -> TokenMetrics:  # fmt: skip
    """Per-token KL / top-1 / NLL of ``hidden`` against ``ref_hidden`` (rows aligned, one per predicted token)."""
    if ref_hidden.shape != hidden.shape or hidden.shape[0] != targets.shape[0]:
        raise ValueError(f"misaligned rows: reference {tuple(ref_hidden.shape)}, scheme {tuple(hidden.shape)}, "
                         f"targets {tuple(targets.shape)}")  # fmt: skip
    kls, agree, nlls = [], [], []
    for sl in _blocks(hidden.shape[0], block):
        ref_lp = head.logprobs(ref_hidden[sl])
        lp = head.logprobs(hidden[sl])
        kls.append(kl_divergence(ref_lp, lp).cpu())
        agree.append((lp.argmax(-1) == ref_lp.argmax(-1)).cpu())
        t = targets[sl].to(lp.device)
        nlls.append((-lp.gather(1, t[:, None]).squeeze(1)).cpu())
    return TokenMetrics(torch.cat(kls), torch.cat(agree), torch.cat(nlls))


def logprob_check(nll: torch.Tensor, vllm_logprobs: Sequence[float] | None) -> dict:
    """How far this module's logprobs of the prompt tokens are from those vLLM returned for them
    (``prompt_logprobs=0``), and the perplexity of those tokens by each: a check that the LM head
    applied to the recorded hidden states is what vLLM computes."""
    if vllm_logprobs is None:
        return {"logprob_check": "vLLM returned no prompt logprobs"}
    v = torch.tensor(list(vllm_logprobs), dtype=torch.float64)
    if v.shape != nll.shape:
        return {"logprob_check": f"vLLM returned {v.numel()} prompt logprobs, expected {nll.numel()}"}
    diff = (v + nll).abs()
    return {
        "ppl_prompt": math.exp(float(nll.mean())),
        "ppl_prompt_vllm": math.exp(float(-v.mean())),
        "logprob_vs_vllm_max_abs": float(diff.max()),
        "logprob_vs_vllm_mean_abs": float(diff.mean()),
    }
