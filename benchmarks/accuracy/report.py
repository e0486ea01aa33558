"""Result rows of the accuracy benchmark: metrics per (model, scheme) from the captures, and the table.

Row schema (``benchmarks/results/accuracy-<device>.json``, key ``rows``): every row has
:data:`ROW_KEYS` (``None`` where a failed row has no value, plus ``error``), then extras: ``tokens``,
``decode`` (the same metrics over the teacher-forced decode steps only), what the engine ran
(``backend``, ``kv_cache_dtype``, ``layer0_scales``), timings, and the cross-check of this
benchmark's logprobs of the prompt tokens against vLLM's own (``ppl_prompt`` vs ``ppl_prompt_vllm``,
``logprob_vs_vllm_max_abs``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks.accuracy.metrics import LMHead, logprob_check, predicted_rows, token_metrics, window_rows
from benchmarks.accuracy.schemes import MODELS, Scheme

ROW_KEYS = ("name", "model", "kv_dtype", "granularity", "ppl", "ppl_delta_pct", "kl_mean", "kl_p99", "top1")


def _sig(x: float | None, digits: int = 4) -> float | None:
    if x is None or not math.isfinite(x):
        return x
    return float(f"{x:.{digits}g}")


def empty_row(scheme: Scheme, model: str) -> dict:
    row = {k: None for k in ROW_KEYS}
    row.update(name=scheme.name, model=model, kv_dtype=scheme.kv_dtype, granularity=scheme.granularity)
    return row


def check_row(row: dict) -> None:
    """The schema every row keeps (tests and plots rely on it)."""
    missing = [k for k in ROW_KEYS if k not in row]
    if missing:
        raise ValueError(f"row {row.get('name')!r} ({row.get('model')}) lacks {missing}")
    if row["model"] not in MODELS:
        raise ValueError(f"row {row['name']!r}: model {row['model']!r} is not one of {list(MODELS)}")
    if row.get("error") is None:
        for k in ("ppl", "kl_mean", "kl_p99", "top1"):
            if not isinstance(row[k], (int, float)) or not math.isfinite(row[k]):
                raise ValueError(f"row {row['name']!r} ({row['model']}): {k} = {row[k]!r} is not a finite number")
        if not 0.0 <= row["top1"] <= 1.0 or row["kl_mean"] < -1e-9:
            raise ValueError(f"row {row['name']!r} ({row['model']}): top1 {row['top1']} / kl_mean {row['kl_mean']} out of range")


class ModelEvaluation:
    """Loads one model's reference capture once; :meth:`metrics` compares a scheme's capture with it.

    Each evaluation sequence is ``prompt + forced``: the prompt is prefilled in chunks, the forced
    tokens are decoded one per step. Its capture holds the prompt's rows and one row per decode
    step (the last forced token is sampled, never fed back).
    """

    def __init__(self, model_dir: Path, prompts: Sequence[Sequence[int]], forced: Sequence[Sequence[int]],
                 ref_capture: Path, device: str) -> None:  # fmt: skip
        self.head = LMHead.from_checkpoint(model_dir, device)
        self.seqs = [list(p) + list(f) for p, f in zip(prompts, forced)]
        self.captured = [list(p) + list(f)[:-1] for p, f in zip(prompts, forced)]
        pos = torch.cat([torch.arange(len(s) - 1) for s in self.seqs])
        plen = torch.cat([torch.full((len(s) - 1,), len(p)) for s, p in zip(self.seqs, prompts)])
        self.is_decode = pos >= plen  # computed in a single-token step, reading only the 8-bit cache
        self.in_vllm_prompt_logprobs = pos < plen - 1  # what vLLM's prompt_logprobs cover
        self.ref_hidden, self.targets = self._aligned(torch.load(ref_capture), "bf16 reference")
        self.ref_ppl: float | None = None

    def _aligned(self, capture: dict, what: str) -> tuple[torch.Tensor, torch.Tensor]:
        rows = window_rows(capture["input_ids"], capture["positions"], self.captured, what)
        idx, targets = predicted_rows(rows, self.seqs)
        return capture["hidden"][idx], targets

    def metrics(self, capture_path: Path, what: str, vllm_prompt_logprobs: list[list[float]] | None) -> dict:
        hidden, _ = self._aligned(torch.load(capture_path), what)
        tm = token_metrics(self.head, self.ref_hidden, hidden, self.targets)
        out = tm.summary(self.ref_ppl)
        if self.is_decode.any():
            d = type(tm)(tm.kl[self.is_decode], tm.top1_agree[self.is_decode], tm.nll[self.is_decode]).summary()
            out["decode"] = {k: _sig(d[k]) for k in ("kl_mean", "kl_p99", "top1")} | {"tokens": d["tokens"]}
        if vllm_prompt_logprobs is not None:
            flat = [x for lp in vllm_prompt_logprobs for x in lp]
            out.update(logprob_check(tm.nll[self.in_vllm_prompt_logprobs], flat))
        return out


def metrics_row(row: dict, m: dict) -> dict:
    row.update(
        ppl=round(m["ppl"], 4),
        ppl_delta_pct=None if m.get("ppl_delta_pct") is None else round(m["ppl_delta_pct"], 4),
        kl_mean=_sig(m["kl_mean"]),
        kl_p99=_sig(m["kl_p99"]),
        top1=round(m["top1"], 5),
        tokens=m["tokens"],
    )
    for k in ("decode", "ppl_prompt", "ppl_prompt_vllm", "logprob_vs_vllm_max_abs", "logprob_vs_vllm_mean_abs",
              "logprob_check"):
        if k in m:
            row[k] = _sig(m[k]) if isinstance(m[k], float) else m[k]
    return row


def transform_check(plain: Path, outlier: Path) -> dict:
    """Do the BF16 plain and outlier models give the same hidden states (same windows, same engine)?"""
    a, b = torch.load(plain), torch.load(outlier)
    if a["hidden"].shape != b["hidden"].shape or not torch.equal(a["input_ids"], b["input_ids"]):
        return {"comparable": False, "note": "the two BF16 captures hold different token streams"}
    diff = (a["hidden"].float() - b["hidden"].float()).abs()
    return {
        "comparable": True,
        "rows_bit_identical": float((diff.amax(dim=-1) == 0).double().mean()),
        "hidden_max_abs_diff": float(diff.max()),
    }


def print_table(rows: list[dict]) -> None:
    def f(x, fmt):
        return format(x, fmt) if isinstance(x, (int, float)) else "-"

    print(f"\n{'model':<8} {'scheme':<32} {'ppl':>9} {'dppl%':>8} {'KL mean':>10} {'KL p99':>10} {'top1':>7}"
          f" {'dec KL':>10} {'dec top1':>8}  backend")  # fmt: skip
    for r in rows:
        if r.get("error"):
            print(f"{r['model']:<8} {r['name']:<32} ERROR {str(r['error'])[:150]}")
            continue
        d = r.get("decode") or {}
        print(f"{r['model']:<8} {r['name']:<32} {f(r['ppl'], '9.4f')} {f(r['ppl_delta_pct'], '+8.3f')} "
              f"{f(r['kl_mean'], '10.3e')} {f(r['kl_p99'], '10.3e')} {f(r['top1'], '7.4f')} "
              f"{f(d.get('kl_mean'), '10.3e')} {f(d.get('top1'), '8.4f')}  {r.get('backend')}")  # fmt: skip


def load_json(path: Path) -> dict:
    return json.loads(path.read_text())


def _task_error(done_result, result: dict, log_path: Path) -> str:
    """The most telling message: the engine's own exception, else the runner's, plus the log's root cause."""
    from benchmarks.harness import root_cause

    err = result.get("error") or (done_result.error if done_result else None) or "failed"
    if log_path.exists():
        cause = root_cause(log_path.read_text(errors="replace")[-200_000:])
        if cause and cause not in err:
            err = f"{cause} [{err}]"
    return err[:4000]


_ENGINE_FACTS = ("backend", "kv_cache_dtype", "kv_capacity_tokens", "layer0_scales", "engine_start_s", "run_s",
                 "report_error")  # fmt: skip


def build_rows(schemes: list[Scheme], models: list[str], model_dirs: dict, paths: dict, done: dict,
               evals: dict[str, tuple[list[list[int]], list[list[int]]]], device: str) -> tuple[list[dict], dict]:  # fmt: skip
    """One checked row per (model, scheme), and the BF16 plain-vs-outlier check. ``evals``: per model its
    ``(prompts, forced decode tokens)`` in its own tokenizer (what its engines ran)."""
    rows: list[dict] = []
    for model in models:
        ev, ref_error = None, None
        prompts, forced = evals.get(model, ([], []))
        for scheme in schemes:
            key = f"{model}/{scheme.name}"
            stem = paths["runs"] / key.replace("/", "--")
            row = empty_row(scheme, model)
            task = json.loads(Path(f"{stem}.task.json").read_text()) if Path(f"{stem}.task.json").exists() else {}
            row["engine_kwargs"] = {k: v for k, v in task.get("engine", {}).items()
                                    if k in ("attention_backend", "kv_cache_dtype", "additional_config")}  # fmt: skip
            res_path = Path(f"{stem}.result.json")
            res = json.loads(res_path.read_text()) if res_path.exists() else {}
            row.update({k: res[k] for k in _ENGINE_FACTS if k in res})
            d = done.get(key)
            row["seconds"] = round(d.seconds, 1) if d else None
            try:
                if d is None or not d.ok:
                    raise RuntimeError(_task_error(d, res, Path(f"{stem}.log")))
                if scheme.name == "bf16":
                    ev = ModelEvaluation(model_dirs[model], prompts, forced, Path(f"{stem}.capture.pt"), device)
                    ev.ref_ppl = ev.metrics(Path(f"{stem}.capture.pt"), key, None)["ppl"]
                if ev is None:
                    raise RuntimeError(f"no bf16 reference for the {model} model: {ref_error}")
                metrics_row(row, ev.metrics(Path(f"{stem}.capture.pt"), key, res.get("vllm_prompt_logprobs")))
            except Exception as e:  # noqa: BLE001 - the row records it; the run goes on
                row["error"] = str(e) if isinstance(e, RuntimeError) else f"{type(e).__name__}: {e}"
                if scheme.name == "bf16":
                    ref_error = row["error"][:300]
            check_row(row)
            rows.append(row)
    check: dict = {}
    caps = {m: paths["runs"] / f"{m}--bf16.capture.pt" for m in ("plain", "outlier")}
    if all(done.get(f"{m}/bf16") and done[f"{m}/bf16"].ok for m in caps):
        check = transform_check(caps["plain"], caps["outlier"])
        ref = {r["model"]: r for r in rows if r["name"] == "bf16"}
        if "plain" in ref and "outlier" in ref and ref["plain"]["ppl"] and ref["outlier"]["ppl"]:
            check["ppl_plain"], check["ppl_outlier"] = ref["plain"]["ppl"], ref["outlier"]["ppl"]
    return rows, check
