"""The accuracy harness on SmolLM2-135M-Instruct (real weights, real text) on vLLM's CPU build, end to end:
``python -m benchmarks.accuracy.run --smoke --models smollm2`` with the per_channel schemes.

What it proves: the third model runs without the small model being trained (only the calib and
heldout splits exist here); its windows are the held-out text in SmolLM2's own tokenizer; one
``calibrate --granularity per_channel --dtype int8`` run gives both per_channel sidecars (fp8 is the
same amax over 448); the engines really store per-channel scales (K per RoPE pair); the LM head with
tied embeddings reproduces vLLM's own logprobs; and the metrics are those of a real model on English
(BF16 perplexity in a sane range and close to transformers', 8-bit KL small but not zero).

Size: 2 windows of 64 prompt tokens (prefilled in 32-token chunks, so the second chunk reads the 8-bit
cache) + 8 teacher-forced decode steps; 4 calibration samples of 64 tokens: ~3.5 min on a busy 2-core CPU.
Text: Austen (``tests/data``, see its README); the held-out novel is never calibrated on.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")

DATA = Path(__file__).resolve().parent / "data"
SCHEMES = ("bf16", "kvquant-int8-per_channel", "kvquant-fp8-per_channel")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict:
    from benchmarks.harness import benchmarks_path
    from vllm_kvquant.fetch_model import default_model_dir, fetch_model

    model = fetch_model("smollm2", default_model_dir("smollm2"))
    root = tmp_path_factory.mktemp("acc-smollm2")
    data = root / "data"  # no train split: the run must not need one for smollm2 alone
    data.mkdir()
    for split, name in (("calib", "austen_calib"), ("heldout", "austen_heldout")):
        text = (DATA / f"{name}.txt").read_text(encoding="utf-8")
        (data / f"{split}.jsonl").write_text(json.dumps({"text": text}) + "\n", encoding="utf-8")
    out = root / "accuracy.json"
    argv = ["--smoke", "--models", "smollm2", "--smollm2-dir", str(model), "--schemes", ",".join(SCHEMES),
            "--data", str(data), "--workdir", str(root / "work"), "--out", str(out), "--prompt-len", "64",
            "--chunk", "32", "--decode-len", "8", "--calib-seq-len", "64", "--max-model-len", "128",
            "--skip-synthetic", "--no-plot"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OUT")}  # the CPU user's path
    env["PYTHONPATH"] = os.pathsep.join([str(benchmarks_path()), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-P", "-m", "benchmarks.accuracy.run", *argv], env=env, cwd=root,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0 and out.exists(), proc.stdout[-4000:] + proc.stderr[-4000:]
    print(proc.stdout[-2500:])  # the table and stage seconds (pytest -s)
    result = json.loads(out.read_text())
    return {"result": result, "work": root / "work-smoke", "rows": {r["name"]: r for r in result["rows"]}}


def test_only_smollm2_ran_and_nothing_was_trained(smoke: dict) -> None:
    result = smoke["result"]
    assert [(r["model"], r["name"]) for r in result["rows"]] == [("smollm2", s) for s in SCHEMES]
    assert "train" not in result["stage_seconds"] and "outlier" not in result["stage_seconds"]
    assert "training" not in result and not (smoke["work"] / "models" / "plain").exists()
    # the per_channel schemes need the int8 per_channel calibration only, not the fp8 per_head one
    assert set(result["tasks"]) == {"smollm2/calibrate-per_channel", "smollm2/sidecars-per_channel",
                                    *(f"smollm2/{s}" for s in SCHEMES)}  # fmt: skip
    assert "--granularity per_channel --dtype int8" in result["calibration"]["smollm2"]["int8-per_channel"]["command"]
    assert result["bf16_transform_check"] == {}  # plain vs outlier: neither ran


def test_windows_are_the_heldout_text_in_smollm2s_tokenizer(smoke: dict) -> None:
    from transformers import AutoTokenizer

    info = smoke["result"]["smollm2"]
    windows = json.loads((smoke["work"] / "eval_windows-smollm2.json").read_text())
    assert info["windows"] == len(windows["prompts"]) == 2
    assert [len(p) for p in windows["prompts"]] == [64, 64] and [len(f) for f in windows["forced"]] == [8, 8]
    tokenizer = AutoTokenizer.from_pretrained(info["model_dir"])
    heldout = (DATA / "austen_heldout.txt").read_text(encoding="utf-8")
    for p, f in zip(windows["prompts"], windows["forced"]):
        assert tokenizer.decode(p + f) in heldout
    assert not (smoke["work"] / "eval_windows.json").exists()  # the small models' windows: not made


def test_bf16_reference_is_a_real_model_on_english(smoke: dict) -> None:
    ref = smoke["rows"]["bf16"]
    assert ref.get("error") is None, ref.get("error")
    assert ref["kl_mean"] == 0 and ref["top1"] == 1 and ref["ppl_delta_pct"] == 0
    assert 3 < ref["ppl"] < 200, ref["ppl"]
    # transformers on the same windows (whole, no cache) agrees with vLLM's BF16 engine
    assert smoke["result"]["smollm2"]["hf_bf16_ppl"] == pytest.approx(ref["ppl"], rel=0.05)
    assert ref["tokens"] == 2 * (64 + 8 - 1) and ref["decode"]["tokens"] == 2 * 7


def test_lm_head_with_tied_embeddings_reproduces_vllms_logprobs(smoke: dict) -> None:
    for name, row in smoke["rows"].items():
        assert row.get("error") is None, (name, row.get("error"))
        assert row["logprob_vs_vllm_max_abs"] < 1e-3, (name, row["logprob_vs_vllm_max_abs"])
        # Both perplexities are reported to 4 significant digits (report._sig), each rounded on
        # its own: allow one unit of the last digit besides the relative 1e-4.
        unit = 10 ** (math.floor(math.log10(abs(row["ppl_prompt_vllm"]))) - 3)
        assert row["ppl_prompt"] == pytest.approx(row["ppl_prompt_vllm"], rel=1e-4, abs=1.001 * unit)


@pytest.mark.parametrize("name,kv_dtype", [("kvquant-int8-per_channel", "int8"), ("kvquant-fp8-per_channel", "fp8_e4m3")])
def test_per_channel_rows(smoke: dict, name: str, kv_dtype: str) -> None:
    from benchmarks.accuracy.report import check_row

    row = smoke["rows"][name]
    assert row.get("error") is None, row.get("error")
    check_row(row)
    assert row["granularity"] == "per_channel" and row["kv_dtype"] == kv_dtype and row["backend"] == "KVQUANT"
    assert all(math.isfinite(row[k]) for k in ("ppl", "kl_mean", "kl_p99", "top1"))
    # 8-bit storage changes the distributions a little, never much (measured: KL ~2-3e-3, top-1 ~0.95)
    assert 0 < row["kl_mean"] < 0.02 and row["kl_p99"] >= row["kl_mean"], row
    assert row["top1"] > 0.85 and abs(row["ppl_delta_pct"]) < 5, row
    # what the engine held: a scale per KV head (3) and channel (64), K's equal within each RoPE pair
    scales = row["layer0_scales"]
    assert scales["kv_dtype"] == kv_dtype
    k, v = scales["k_scale"], scales["v_scale"]
    assert [len(h) for h in k] == [64] * 3 and [len(h) for h in v] == [64] * 3
    assert all(h[:32] == h[32:] for h in k) and any(len(set(h)) > 1 for h in v)
    sidecar = json.loads((smoke["work"] / "sidecars" / f"smollm2-{kv_dtype}-per_channel.json").read_text())
    assert sidecar["granularity"] == "per_channel"
    for held, filed in zip(k, sidecar["layers"]["model.layers.0.self_attn.attn"]["k_scale"]):
        assert held == pytest.approx(filed, rel=1e-6)  # the engine holds them in float32


def test_fp8_per_channel_is_the_int8_calibration_over_448(smoke: dict) -> None:
    side = smoke["work"] / "sidecars"
    i8 = json.loads((side / "smollm2-int8-per_channel.json").read_text())
    f8 = json.loads((side / "smollm2-fp8_e4m3-per_channel.json").read_text())
    assert f8["kv_dtype"] == "fp8_e4m3" and list(f8["layers"]) == list(i8["layers"]) and len(i8["layers"]) == 30
    for name, layer in i8["layers"].items():
        for kv in ("k_scale", "v_scale"):
            for a, b in zip(layer[kv], f8["layers"][name][kv]):
                assert b == pytest.approx([x * 127 / 448 for x in a], rel=1e-12)
