"""The accuracy benchmark's metrics and result rows (benchmarks/accuracy/metrics.py, report.py).

KL / top-1 / perplexity against brute-force formulas, the alignment of a captured token stream with
the evaluation sequences (any order; a missing, repeated or disordered window is an error), the
cross-check against vLLM's own prompt logprobs, and the JSON row schema, including a failed scheme
whose row carries the engine's error message instead of stopping the run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch


from benchmarks.accuracy.metrics import LMHead, TokenMetrics, kl_divergence, logprob_check, predicted_rows, token_metrics, window_rows  # noqa: E402


def test_kl_matches_the_definition():
    g = torch.Generator().manual_seed(0)
    a = torch.log_softmax(torch.randn(5, 11, generator=g, dtype=torch.float64), -1)
    b = torch.log_softmax(torch.randn(5, 11, generator=g, dtype=torch.float64), -1)
    brute = torch.tensor([sum(math.exp(a[i, x]) * (a[i, x] - b[i, x]) for x in range(11)) for i in range(5)],
                         dtype=torch.float64)  # fmt: skip
    assert torch.allclose(kl_divergence(a, b), brute, rtol=1e-12, atol=1e-15)
    assert (kl_divergence(a, b) > 0).all()
    assert torch.equal(kl_divergence(a, a), torch.zeros(5, dtype=torch.float64))
    # a token the reference gives probability 0 contributes nothing
    z = torch.tensor([[0.0, -math.inf]], dtype=torch.float64)
    assert kl_divergence(z, torch.log(torch.tensor([[0.5, 0.5]], dtype=torch.float64))).item() == pytest.approx(math.log(2))
    with pytest.raises(ValueError, match="different shapes"):
        kl_divergence(a, b[:, :5])


def test_token_metrics_and_summary():
    g = torch.Generator().manual_seed(1)
    head = LMHead(torch.randn(13, 8, generator=g).to(torch.bfloat16))
    ref = torch.randn(40, 8, generator=g).to(torch.bfloat16)
    targets = torch.randint(0, 13, (40,), generator=g)
    same = token_metrics(head, ref, ref.clone(), targets, block=7)
    assert torch.equal(same.kl, torch.zeros(40, dtype=torch.float64)) and bool(same.top1_agree.all())
    logits = torch.nn.functional.linear(ref, head.weight).double()
    ce = torch.nn.functional.cross_entropy(logits, targets).item()
    s = same.summary()
    assert s["ppl"] == pytest.approx(math.exp(ce), rel=1e-12) and s["kl_mean"] == 0 and s["top1"] == 1 and s["tokens"] == 40
    noisy = token_metrics(head, ref, (ref.float() + 0.3 * torch.randn(40, 8, generator=g)).to(torch.bfloat16), targets, block=16)
    ns = noisy.summary(ref_ppl=s["ppl"])
    assert ns["kl_mean"] > 0 and ns["kl_p99"] >= ns["kl_mean"] and ns["top1"] < 1
    assert ns["kl_p99"] == pytest.approx(float(torch.quantile(noisy.kl, 0.99)))
    assert ns["ppl_delta_pct"] == pytest.approx(100 * (ns["ppl"] / s["ppl"] - 1))
    with pytest.raises(ValueError, match="misaligned rows"):
        token_metrics(head, ref, ref[:-1], targets)


def _stream(seqs_in_order):
    ids = torch.tensor([t for s in seqs_in_order for t in s])
    pos = torch.tensor([i for s in seqs_in_order for i in range(len(s))])
    return ids, pos


def test_window_rows_any_order_and_errors():
    seqs = [[5, 6, 7, 8], [1, 2, 3], [9, 9, 9, 9, 9]]
    ids, pos = _stream([seqs[2], seqs[0], seqs[1]])
    rows = window_rows(ids, pos, seqs, "x")
    assert [r.tolist() for r in rows] == [[5, 6, 7, 8], [9, 10, 11], [0, 1, 2, 3, 4]]
    ids, pos = _stream([seqs[0], seqs[1]])
    with pytest.raises(ValueError, match=r"scheme A: windows \[2\] were not captured"):
        window_rows(ids, pos, seqs, "scheme A")
    ids, pos = _stream([seqs[0], seqs[0], seqs[1], seqs[2]])
    with pytest.raises(ValueError, match="captured segment 1 .* matches no evaluation window still unmatched"):
        window_rows(ids, pos, seqs, "scheme B")
    ids, pos = _stream(seqs)
    pos[2], pos[3] = pos[3].item(), pos[2].item()  # a chunk out of order
    with pytest.raises(ValueError, match="scheme C: captured segment 0 .* has position 3 where 2 belongs"):
        window_rows(ids, pos, seqs, "scheme C")
    with pytest.raises(ValueError, match="does not begin at position 0"):
        window_rows(ids[1:], torch.tensor(list(range(1, 4)) + pos[4:].tolist()), seqs, "scheme D")


def test_predicted_rows_with_and_without_the_sampled_last_token():
    rows, targets = predicted_rows([torch.tensor([0, 1, 2, 3]), torch.tensor([4, 5, 6])], [[1, 2, 3, 4], [7, 8, 9, 10]])
    assert rows.tolist() == [0, 1, 2, 4, 5, 6] and targets.tolist() == [2, 3, 4, 8, 9, 10]
    with pytest.raises(ValueError, match="only 2 captured rows"):
        predicted_rows([torch.tensor([0, 1])], [[1, 2, 3, 4]])


def test_logprob_check():
    nll = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    ok = logprob_check(nll, [-0.5, -1.0, -2.01])
    assert ok["logprob_vs_vllm_max_abs"] == pytest.approx(0.01) and ok["ppl_prompt_vllm"] == pytest.approx(math.exp(3.51 / 3))
    assert ok["ppl_prompt"] == pytest.approx(math.exp(3.5 / 3))
    assert "expected 3" in logprob_check(nll, [-0.5])["logprob_check"]


# ----------------------------------------------------------------------------- rows and JSON


def _write_model(tmp_path: Path, vocab=13, hidden=8) -> tuple[Path, torch.Tensor]:
    from safetensors.torch import save_file

    d = tmp_path / "model"
    d.mkdir()
    w = torch.randn(vocab, hidden, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    save_file({"lm_head.weight": w}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"tie_word_embeddings": False}))
    return d, w


def _capture(path: Path, prompts, forced, hidden_of) -> None:
    seqs = [p + f[:-1] for p, f in zip(prompts, forced)]
    order = list(reversed(range(len(seqs))))  # captured in another order than given
    ids, pos = _stream([seqs[i] for i in order])
    hidden = torch.cat([hidden_of(i, len(seqs[i])) for i in order])
    torch.save({"input_ids": ids, "positions": pos, "hidden": hidden}, path)


def test_build_rows_schema_errors_and_decode_split(tmp_path):
    from benchmarks.accuracy.report import ROW_KEYS, build_rows, check_row
    from benchmarks.accuracy.runner import TaskResult
    from benchmarks.accuracy.schemes import BY_NAME, select

    model_dir, w = _write_model(tmp_path)
    prompts = [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]
    forced = [[11, 12, 1], [2, 3, 4]]
    g = torch.Generator().manual_seed(4)
    base = {i: torch.randn(7, 8, generator=g).to(torch.bfloat16) for i in range(2)}
    runs = tmp_path / "runs"
    runs.mkdir()
    paths = {"runs": runs}
    schemes = select("bf16,kvquant-int8-per_head,kvquant-int8-online")
    _capture(runs / "outlier--bf16.capture.pt", prompts, forced, lambda i, n: base[i][:n])
    _capture(runs / "outlier--kvquant-int8-per_head.capture.pt", prompts, forced,
             lambda i, n: (base[i][:n].float() + 0.2 * torch.randn(n, 8, generator=g)).to(torch.bfloat16))  # fmt: skip
    # vLLM's prompt logprobs for the bf16 run: exactly what the LM head gives
    lp = torch.log_softmax(torch.nn.functional.linear(torch.cat([base[i][:4] for i in range(2)]), w).double(), -1)
    targets = [t for p in prompts for t in p[1:]]
    vllm_lp = lp[torch.arange(8), torch.tensor(targets)].view(2, 4).tolist()
    (runs / "outlier--bf16.result.json").write_text(json.dumps({"backend": "FLASH_ATTN", "vllm_prompt_logprobs": vllm_lp}))
    msg = "KVQuantConfigError: additional_config['kvquant']['fallback'] = 'online' is not supported"
    (runs / "outlier--kvquant-int8-online.result.json").write_text(json.dumps({"error": msg}))
    (runs / "outlier--kvquant-int8-online.log").write_text(f"Traceback ...\n{msg}; use one of ['unit', 'error']\n")
    done = {f"outlier/{s.name}": TaskResult(f"outlier/{s.name}", True, 10.0) for s in schemes}
    done["outlier/kvquant-int8-online"] = TaskResult("outlier/kvquant-int8-online", False, 3.0, rc=1, error="exit code 1")
    rows, check = build_rows(schemes, ["outlier"], {"outlier": model_dir}, paths, done, {"outlier": (prompts, forced)},
                             "cpu")  # fmt: skip
    assert check == {}  # the plain model was not run
    by = {r["name"]: r for r in rows}
    json.dumps(rows)  # JSON-serializable
    for r in rows:
        check_row(r)
        assert all(k in r for k in ROW_KEYS) and r["model"] == "outlier"
    ref, q, bad = by["bf16"], by["kvquant-int8-per_head"], by["kvquant-int8-online"]
    assert ref["kl_mean"] == 0 and ref["top1"] == 1 and ref["ppl_delta_pct"] == 0 and ref["backend"] == "FLASH_ATTN"
    assert ref["logprob_vs_vllm_max_abs"] < 1e-12
    assert ref["tokens"] == 2 * (5 + 3 - 1) and ref["decode"]["tokens"] == 2 * 2
    assert q.get("error") is None and q["kl_mean"] > 0 and q["kl_p99"] >= q["kl_mean"] and q["ppl"] > 0
    assert bad["ppl"] is None and "fallback'] = 'online' is not supported" in bad["error"]
    assert bad["kv_dtype"] == BY_NAME["kvquant-int8-online"].kv_dtype
    with pytest.raises(ValueError, match=r"lacks \['top1'\]"):
        check_row({k: ref[k] for k in ROW_KEYS if k != "top1"})
    with pytest.raises(ValueError, match="kl_mean = nan is not a finite number"):
        check_row({**ref, "kl_mean": float("nan")})
    with pytest.raises(ValueError, match=r"model 'big' is not one of \['plain', 'outlier', 'smollm2'\]"):
        check_row({**ref, "model": "big"})
    check_row({**ref, "model": "smollm2"})


def test_summary_needs_tokens():
    empty = TokenMetrics(torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.float64))
    with pytest.raises(ValueError, match="no predicted tokens"):
        empty.summary()


def test_prefill_only_sequences(tmp_path):
    """--decode-len 0: every prompt row is captured and predicts the next prompt token; no decode split."""
    from benchmarks.accuracy.report import ModelEvaluation

    model_dir, _ = _write_model(tmp_path)
    prompts, forced = [[1, 2, 3, 4], [5, 6, 7]], [[], []]
    g = torch.Generator().manual_seed(5)
    _capture(tmp_path / "ref.pt", prompts, [[0], [0]], lambda i, n: torch.randn(n, 8, generator=g).to(torch.bfloat16))
    ev = ModelEvaluation(model_dir, prompts, forced, tmp_path / "ref.pt", "cpu")
    m = ev.metrics(tmp_path / "ref.pt", "x", None)
    assert m["tokens"] == 3 + 2 and "decode" not in m and m["kl_mean"] == 0
