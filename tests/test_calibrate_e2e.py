"""``vllm-kvquant calibrate`` end to end on the tiny random Llama, through the real vLLM CPU engine.

1. The console script (default multiprocess engine, worker extension in the worker process)
   writes an INT8 per-head sidecar next to the model; it validates (our checks and the JSON
   schema) and carries its provenance.
2. Its per-layer, per-head amax matches an independent recording: a transformers forward of
   the same samples with a hook on ``apply_rotary_pos_emb`` (K after RoPE) and on ``v_proj``.
3. One more engine run (this file as a script, in-process engine to save time) records the same
   samples again: a subset of the samples never gives a larger amax, percentile 100 equals
   absmax (with the raw percentile recorder too), percentile 99 is below it.
4. Generation with the sidecar (found in the model directory) vs. the BF16 cache: prefill
   attends to unquantized K/V, so the first token's logprob is within 0.1 of an fp32
   transformers forward, as the BF16 run's is (BF16 noise alone moves it up to ~0.07 on this
   model, so the two runs are compared within 0.2); later tokens read the 8-bit cache and the
   random model has near-ties, so we require identical greedy 8-token completions for 3 of 4.
5. Bad options exit with code 2 and a message, before any engine starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")

HERE = Path(__file__).resolve()
NUM_SAMPLES, SEQ_LEN = 8, 128
MAX_TOKENS = 8
FIRST_TOKEN_LOGPROB_ATOL = 0.1
INDEPENDENT_RTOL = 0.03  # bf16 numerics of two implementations; K before RoPE is off by ~5%
PROMPTS = [
    "The river runs past the old mill",
    "A language model reads a sequence of tokens",
    "Calibration runs the model over ordinary text",
    "The library keeps old maps of the region",
]


def _env(**extra: str) -> dict[str, str]:
    """Subprocess environment without TRITON_INTERPRET: on CPU the backend then uses its PyTorch
    reference kernels, as a CPU user gets. Interpreted Triton would make these engine runs take
    minutes; the kernels are tested against the references elsewhere (and inside the engine by
    test_backend_cpu.py)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(extra)
    return env


def _cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vllm_kvquant.cli", *args], capture_output=True, text=True, timeout=timeout, env=_env()
    )


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    from vllm_kvquant.tiny_model import corpus_text, make_tiny_llama

    root = tmp_path_factory.mktemp("calibrate_e2e")
    model_dir = make_tiny_llama(root / "tiny-llama")
    data = root / "corpus.txt"
    data.write_text(corpus_text())
    return model_dir, data


@pytest.fixture(scope="session")
def calibrated(tiny) -> tuple[Path, subprocess.CompletedProcess]:
    model_dir, data = tiny
    proc = _cli(
        "calibrate", str(model_dir), "--data", str(data), "--num-samples", str(NUM_SAMPLES), "--seq-len", str(SEQ_LEN),
        "--dtype", "int8", "--granularity", "per_head", "--model-dtype", "bfloat16", "--gpu-memory-utilization", "0.3",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return model_dir / "kvquant_scales.json", proc


@pytest.fixture(scope="session")
def samples(tiny) -> list[list[int]]:
    from vllm_kvquant.calibrate import load_calibration_data

    model_dir, data = tiny
    return load_calibration_data(str(model_dir), str(data), NUM_SAMPLES, SEQ_LEN, seed=0).samples


@pytest.fixture(scope="session")
def engine_runs(tiny, calibrated, samples, tmp_path_factory) -> dict:
    model_dir, _ = tiny
    sidecar, _ = calibrated
    out = tmp_path_factory.mktemp("engine_runs") / "out.json"
    spec = {"model": str(model_dir), "samples": samples, "prompts": PROMPTS, "max_tokens": MAX_TOKENS}
    env = _env(VLLM_ENABLE_V1_MULTIPROCESSING="0")  # engine in the script's process: starts in seconds
    proc = subprocess.run(
        [sys.executable, str(HERE), json.dumps(spec), str(out)], capture_output=True, text=True, timeout=900, env=env
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text())


def _file_amax(sidecar: Path) -> dict[str, tuple[list[float], list[float]]]:
    """Recover amax from an int8 margin-1 file: scale = amax / 127."""
    raw = json.loads(sidecar.read_text())
    return {n: ([s * 127.0 for s in l["k_scale"]], [s * 127.0 for s in l["v_scale"]]) for n, l in raw["layers"].items()}


# ---------------------------------------------------------------- 1. the CLI's file


def test_cli_writes_a_valid_sidecar(tiny, calibrated) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    from vllm_kvquant import __version__
    from vllm_kvquant.scales import load_schema

    model_dir, data = tiny
    sidecar, proc = calibrated
    assert f"wrote {sidecar}: 2 layers, int8, per_head, margin 1, {NUM_SAMPLES} samples, {NUM_SAMPLES * SEQ_LEN} tokens" in proc.stdout
    assert "Processed prompts" in proc.stderr  # vLLM's progress bar

    check = _cli("validate", str(sidecar), "--model-dir", str(model_dir), timeout=300)
    assert check.returncode == 0, check.stderr
    assert "OK (2 layers, int8, per_head)" in check.stdout

    raw = json.loads(sidecar.read_text())
    jsonschema.validate(raw, load_schema())
    assert raw["kv_dtype"] == "int8" and raw["granularity"] == "per_head"
    assert raw["model"] == {
        "num_layers": 2, "num_kv_heads": 2, "head_size": 64,
        "layer_names": ["model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"],
    }
    cal = raw["calibration"]
    assert cal["method"] == "absmax" and cal["percentile"] is None and cal["margin"] == 1.0
    assert cal["tool"] == "vllm-kvquant" and cal["tool_version"] == __version__
    assert cal["data"] == str(data)
    assert cal["num_tokens"] == NUM_SAMPLES * SEQ_LEN  # the corpus has ~1.8k tokens: 8 full windows
    assert cal["num_samples"] == NUM_SAMPLES and cal["seq_len"] == SEQ_LEN and cal["seed"] == 0
    assert cal["model_dtype"] == "bfloat16" and cal["created"].endswith("Z")
    for layer in raw["layers"].values():
        assert len(layer["k_scale"]) == len(layer["v_scale"]) == 2
        assert all(0.01 < s < 1.0 for s in layer["k_scale"] + layer["v_scale"])  # amax of a few units


# ---------------------------------------------------------------- 2. independent recording


def _transformers_amax(model_dir: Path, samples: list[list[int]]) -> dict[int, tuple[list[float], list[float]]]:
    """Per-layer, per-KV-head amax of K after RoPE and of V, from a plain transformers bf16 forward."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.models.llama import modeling_llama

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    head_size = model.config.head_dim
    current = {}
    k_amax: dict[int, torch.Tensor] = {}
    v_amax: dict[int, torch.Tensor] = {}

    def fold(store, i, m):
        store[i] = torch.maximum(store[i], m) if i in store else m

    original = modeling_llama.apply_rotary_pos_emb

    def rope_and_record(q, k, cos, sin, *args, **kwargs):
        q_embed, k_embed = original(q, k, cos, sin, *args, **kwargs)
        fold(k_amax, current["layer"], k_embed.float().abs().amax(dim=(0, 2, 3)))  # [B, heads, T, D]
        return q_embed, k_embed

    handles = []
    for i, layer in enumerate(model.model.layers):
        handles.append(layer.self_attn.register_forward_pre_hook(lambda mod, args, i=i: current.update(layer=i)))
        handles.append(
            layer.self_attn.v_proj.register_forward_hook(
                lambda mod, args, out, i=i: fold(v_amax, i, out.float().unflatten(-1, (-1, head_size)).abs().amax(dim=(0, 1, 3)))
            )
        )
    modeling_llama.apply_rotary_pos_emb = rope_and_record
    try:
        with torch.no_grad():
            for s in samples:
                model(torch.tensor([s]))
    finally:
        modeling_llama.apply_rotary_pos_emb = original
        for h in handles:
            h.remove()
    return {i: (k_amax[i].tolist(), v_amax[i].tolist()) for i in k_amax}


def test_calibrated_amax_matches_transformers_recording(tiny, calibrated, samples) -> None:
    model_dir, _ = tiny
    sidecar, _ = calibrated
    reference = _transformers_amax(model_dir, samples)
    ours = _file_amax(sidecar)
    assert len(ours) == len(reference) == 2
    for i, (k_ref, v_ref) in reference.items():
        k, v = ours[f"model.layers.{i}.self_attn.attn"]
        assert k == pytest.approx(k_ref, rel=INDEPENDENT_RTOL), f"layer {i} K"
        assert v == pytest.approx(v_ref, rel=INDEPENDENT_RTOL), f"layer {i} V"


# ---------------------------------------------------------------- 3. engine-level consistency


def test_engine_recordings_are_consistent(engine_runs, calibrated) -> None:
    sidecar, _ = calibrated
    rec = engine_runs["calibration"]
    full, half = rec["absmax"], rec["absmax_half"]
    assert set(full) == {"model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"}
    for name in full:
        for which in (0, 1):  # K, V
            assert all(h <= f for h, f in zip(half[name][which], full[name][which])), name  # more data, never smaller
            assert rec["percentile100"][name][which] == full[name][which]
            assert rec["percentile100_raw"][name][which] == full[name][which]  # reservoir held every value
            assert all(p < f for p, f in zip(rec["percentile99"][name][which], full[name][which]))
    assert rec["absmax_half"] != full  # the other half of the samples did raise something

    # Same samples, same model: the CLI's file is these amaxes / 127 (bf16 thread-count noise allowed).
    for name, (k, v) in _file_amax(sidecar).items():
        assert k == pytest.approx(full[name][0], rel=0.02)
        assert v == pytest.approx(full[name][1], rel=0.02)


# ---------------------------------------------------------------- 4. generation with the sidecar


def _transformers_first_logprobs(model_dir: Path, results: list[dict]) -> list[float]:
    """fp32 transformers logprob of each run's first generated token: the noise-free reference."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    out = []
    with torch.no_grad():
        for r in results:
            logits = model(torch.tensor([r["prompt_token_ids"]])).logits[0, -1]
            out.append(float(logits.log_softmax(-1)[r["token_ids"][0]]))
    return out


def test_generation_with_sidecar_matches_bf16(tiny, engine_runs, calibrated) -> None:
    model_dir, _ = tiny
    sidecar, _ = calibrated
    raw = json.loads(sidecar.read_text())
    (report,) = engine_runs["kvquant"]["backend_report"]
    assert len(report) == 2
    for name, layer in report.items():
        assert layer["backend"] == "KVQUANT" and layer["kv_dtype"] == "int8"
        assert layer["scales_source"] == str(sidecar)  # found in the model directory
        assert layer["k_scale"] == pytest.approx(raw["layers"][name]["k_scale"], rel=1e-6)
        assert layer["v_scale"] == pytest.approx(raw["layers"][name]["v_scale"], rel=1e-6)

    ours_all, ref_all = engine_runs["kvquant"]["results"], engine_runs["bf16"]["results"]
    fp32 = _transformers_first_logprobs(model_dir, ref_all)
    identical = 0
    for ours, ref, exact in zip(ours_all, ref_all, fp32, strict=True):
        assert ours["prompt_token_ids"] == ref["prompt_token_ids"]
        assert ours["token_ids"][0] == ref["token_ids"][0], ours["prompt"]
        # Both runs' first token against fp32: each is only bf16 noise away from it.
        assert abs(ref["logprobs"][0] - exact) <= FIRST_TOKEN_LOGPROB_ATOL, ("bf16", ref["prompt"])
        assert abs(ours["logprobs"][0] - exact) <= FIRST_TOKEN_LOGPROB_ATOL, ("kvquant", ours["prompt"])
        # ... so they are within twice that of each other (observed: up to 0.11).
        assert abs(ours["logprobs"][0] - ref["logprobs"][0]) <= 2 * FIRST_TOKEN_LOGPROB_ATOL, ours["prompt"]
        identical += ours["token_ids"] == ref["token_ids"]
    assert identical >= 3, f"only {identical}/{len(PROMPTS)} greedy completions identical to BF16"


# ---------------------------------------------------------------- 5. errors


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--margin", "0"], "--margin must be > 0, got 0.0"),
        (["--data", "MISSING"], "does not exist"),
        (["--data", "BADJSONL"], "bad.jsonl:2: not a JSON line"),
    ],
    ids=["margin0", "missing-data", "bad-jsonl"],
)
def test_cli_errors_exit_2(tiny, tmp_path: Path, extra: list[str], message: str) -> None:
    model_dir, data = tiny
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n')
    subs = {"MISSING": str(tmp_path / "missing.txt"), "BADJSONL": str(bad)}
    extra = [subs.get(a, a) for a in extra]
    args = ["calibrate", str(model_dir), "--data", str(data), "--out", str(tmp_path / "s.json"), *extra]
    proc = _cli(*args, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "vllm-kvquant calibrate: error:" in proc.stderr and message in proc.stderr
    assert not (tmp_path / "s.json").exists()


# ---------------------------------------------------------------- the engine script


def _generate(llm, prompts: list[str], max_tokens: int) -> list[dict]:
    from vllm import SamplingParams

    outputs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=1), use_tqdm=False)
    results = []
    for prompt, out in zip(prompts, outputs):
        c = out.outputs[0]
        results.append(
            {
                "prompt": prompt,
                "prompt_token_ids": list(out.prompt_token_ids),
                "token_ids": list(c.token_ids),
                "logprobs": [step[t].logprob for step, t in zip(c.logprobs, c.token_ids)],
            }
        )
    return results


def _engine_main(spec: dict) -> dict:
    """Calibration-mode recordings of the samples, then BF16 and kvquant generation; one process."""
    import gc
    import time
    from argparse import Namespace

    from vllm import LLM, SamplingParams

    from vllm_kvquant.calibrate import EXTENSION_PATH, calibration_engine_args, record_with_engine

    t0 = time.perf_counter()
    timings = {}
    samples = spec["samples"]
    common = dict(dtype="bfloat16", gpu_memory_utilization=0.3, enforce_eager=True, max_model_len=512, seed=0)
    args = Namespace(
        model=spec["model"], tensor_parallel_size=1, model_dtype="bfloat16", seed=0, gpu_memory_utilization=0.3,
        max_model_len=None,
    )
    llm = LLM(**calibration_engine_args(args, max_model_len=max(map(len, samples)) + 1))
    timings["calibration_engine_start"] = time.perf_counter() - t0

    def per_head(t):  # absmax stats are per channel [heads, head_size]; percentile ones per head
        return (t.amax(dim=-1) if t.dim() == 2 else t).tolist()

    def as_lists(per_rank):  # (K, V) per head; drops K's RoPE pair-norm amax when recorded
        (stats,) = per_rank
        return {n: (per_head(ts[0]), per_head(ts[1])) for n, ts in stats.items()}

    def raw_percentile100():  # the recorder's own percentile path, bypassing the absmax shortcut
        llm.collective_rpc("kvquant_start_recording", args=("percentile", 100.0, 0))
        llm.generate([{"prompt_token_ids": s} for s in samples], SamplingParams(max_tokens=1), use_tqdm=False)
        (raw,) = llm.collective_rpc("kvquant_collect")
        return raw["stats"]

    calibration = {
        "absmax_half": as_lists(record_with_engine(llm, samples[: len(samples) // 2])),
        "absmax": as_lists(record_with_engine(llm, samples)),
        "percentile100": as_lists(record_with_engine(llm, samples, "percentile", 100.0)),
        "percentile99": as_lists(record_with_engine(llm, samples, "percentile", 99.0)),
        "percentile100_raw": {n: list(kv) for n, kv in raw_percentile100().items()},
    }
    timings["calibration_done"] = time.perf_counter() - t0
    del llm
    gc.collect()

    runs = {"calibration": calibration, "timings": timings}
    # In one process vLLM grafts the extension onto its worker class once: keep using the same
    # one (it has kvquant_backend_report too).
    for key, extra in (("bf16", {}), ("kvquant", {"attention_backend": "kvquant"})):
        llm = LLM(model=spec["model"], worker_extension_cls=EXTENSION_PATH, **common, **extra)
        timings[f"{key}_engine_start"] = time.perf_counter() - t0
        runs[key] = {
            "results": _generate(llm, spec["prompts"], spec["max_tokens"]),
            "backend_report": llm.collective_rpc("kvquant_backend_report"),
        }
        timings[f"{key}_done"] = time.perf_counter() - t0
        del llm
        gc.collect()
    return runs


if __name__ == "__main__":
    result = _engine_main(json.loads(sys.argv[1]))
    Path(sys.argv[2]).write_text(json.dumps(result))
