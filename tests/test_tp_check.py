"""The CPU-side logic of benchmarks/tp/check.py: its comparisons (tp/compare.py) and its job runner
(tp/jobs.py), so that the one GPU call cannot fail on them. No vLLM engine is started here."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from benchmarks.tp.compare import agreement, rank_scale_problems, sidecar_diff  # noqa: E402
from benchmarks.tp.jobs import Job, Runner  # noqa: E402

from vllm_kvquant.scales import CalibrationInfo, ModelFacts, build_scales_file  # noqa: E402

NAMES = ("model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn")


def _scales(heads: int = 2, bump: float = 0.0):
    import torch

    stats = {n: (torch.arange(1.0, heads + 1) * (i + 1), torch.full((heads,), 0.5)) for i, n in enumerate(NAMES)}
    if bump:
        stats[NAMES[1]][1][-1] *= 1 + bump
    return build_scales_file(stats, "int8", "per_head", ModelFacts(2, heads, 64, NAMES), CalibrationInfo(method="absmax"))


def test_sidecar_diff() -> None:
    same = sidecar_diff(_scales(), _scales())
    assert same["max_rel"] == 0.0 and same["structure_problems"] == []
    d = sidecar_diff(_scales(bump=1e-3), _scales())
    assert d["max_rel"] == pytest.approx(1e-3 / 1.001, rel=1e-3) and d["worst_layer"] == NAMES[1]
    assert d["per_layer_max_rel"][NAMES[0]] == 0.0
    assert any("num_kv_heads" in p for p in sidecar_diff(_scales(heads=4), _scales())["structure_problems"])


def _run(tokens: list[list[int]], logprobs: list[list[float]], prompts: list[str]) -> dict:
    return {"results": [{"prompt": p, "token_ids": t, "logprobs": lp} for p, t, lp in zip(prompts, tokens, logprobs)]}


PROMPTS = ["short one", "a long prompt " * 10, "another long prompt " * 5]


def test_agreement_tolerances() -> None:
    tokens = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    lps = [[-0.1, -0.2, -0.3]] * 3
    ref = _run(tokens, lps, PROMPTS)
    same = agreement(ref, ref)
    assert same["identical"] == 3 and not same["token_problems"] and not same["logprob_problems"]
    one_off = agreement(_run([[1, 2, 3], [4, 5, 0], [7, 8, 9]], lps, PROMPTS), ref)
    assert one_off["identical"] == 2 and not one_off["token_problems"]  # n - 1 allowed
    two_off = agreement(_run([[1, 2, 3], [4, 5, 0], [7, 0, 9]], lps, PROMPTS), ref)
    assert two_off["token_problems"] == ["only 1/3 greedy continuations identical (need >= 2)"]
    first = agreement(_run([[0, 2, 3], *tokens[1:]], lps, PROMPTS), ref)
    assert any("single-chunk prompt 'short one'" in p for p in first["token_problems"])
    shifted = agreement(_run(tokens, [[-0.17, -0.2, -0.3]] + lps[1:], PROMPTS), ref)
    assert any("first-token logprob differs by 0.0700 > 0.05" in p for p in shifted["logprob_problems"])
    drift = agreement(_run(tokens, [[x - 0.06 for x in lp] for lp in lps], PROMPTS), ref)
    assert any("mean |logprob difference| 0.0600 > 0.05" in p for p in drift["logprob_problems"])
    assert agreement(_run(tokens, lps, PROMPTS[::-1]), ref)["token_problems"] == ["the runs used different prompts"]


def _report(scales, tp: int, swap: bool = False) -> list[dict]:
    from vllm_kvquant.scales import shard_scales

    ranks = []
    for rank in range(tp):
        shard = shard_scales(scales, tp, rank)
        layers = {}
        for name, ls in shard.layers.items():
            k = list(ls.k_scale)
            if swap:
                k = list(shard_scales(scales, tp, tp - 1 - rank).layers[name].k_scale)
            layers[name] = {"backend": "KVQUANT", "kv_dtype": "int8", "k_scale": k, "v_scale": list(ls.v_scale)}
        ranks.append(layers)
    return ranks


@pytest.mark.parametrize("heads,tp", [(2, 2), (2, 4), (4, 2), (2, 1)])
def test_rank_scales(heads: int, tp: int) -> None:
    scales = _scales(heads)
    assert rank_scale_problems(_report(scales, tp), scales, tp, "int8") == ([], 2 * tp)
    if tp > 1:
        problems, _ = rank_scale_problems(_report(scales, tp, swap=True), scales, tp, "int8")
        assert problems and problems[0].startswith(f"rank 0 {NAMES[0]}: k_scale")
    assert rank_scale_problems(_report(scales, tp), scales, tp, "fp8_e4m3")[0][0].endswith("kv_dtype int8")
    assert rank_scale_problems(_report(scales, tp)[:1], scales, tp + 1, "int8") == ([f"1 ranks reported, expected {tp + 1}"], 0)


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_runner_dependencies_timeouts_and_exclusive(tmp_path: Path) -> None:
    order, skipped = [], {}
    marker = tmp_path / "grandchild.pid"
    # A job that starts a grandchild in its own session, then hangs: the time cap must end both.
    hang = (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'],"
            f" start_new_session=True); open({str(marker)!r}, 'w').write(str(p.pid)); time.sleep(60)")  # fmt: skip
    jobs = [
        Job("ok", argv=_py("print('hi')")),
        Job("fails", argv=_py("raise ValueError('bad input 42')")),
        Job("after-fail", action=lambda: order.append("after-fail"), deps=("fails",),
            on_skip=lambda r: skipped.__setitem__("after-fail", r)),
        Job("hangs", argv=_py(hang), timeout_s=3),
        Job("after-ok", action=lambda: order.append("after-ok"), deps=("ok",)),
        Job("too-long", argv=_py("pass"), min_time_s=1e6, on_skip=lambda r: skipped.__setitem__("too-long", r)),
        Job("exclusive", argv=_py("import time; time.sleep(0.5)"), exclusive=True),
        Job("after-exclusive", action=lambda: order.append("after-exclusive")),
    ]  # fmt: skip
    t0 = time.time()
    state = Runner(jobs, devices=[], max_parallel=4, deadline=t0 + 60, log_dir=tmp_path / "logs", echo=lambda *a: None).run()
    assert time.time() - t0 < 30
    assert {n: s.status for n, s in state.items()} == {
        "ok": "ok", "fails": "failed", "after-fail": "skipped", "hangs": "timeout", "after-ok": "ok",
        "too-long": "skipped", "exclusive": "ok", "after-exclusive": "ok",
    }  # fmt: skip
    assert state["fails"].reason == "exit 1: ValueError: bad input 42"
    assert skipped["after-fail"].startswith("fails failed: exit 1: ValueError: bad input 42")
    assert skipped["too-long"].startswith("time budget")
    assert order == ["after-ok", "after-exclusive"]  # the exclusive job is a barrier
    ended = {n: state[n].started + state[n].seconds - 0.1 for n in state if state[n].started}  # seconds: rounded to 0.1
    assert state["exclusive"].started >= max(ended[n] for n in ("ok", "fails", "hangs"))
    assert state["after-exclusive"].started >= ended["exclusive"]
    grandchild = int(marker.read_text())
    time.sleep(0.5)
    assert not Path(f"/proc/{grandchild}").exists() or "Z" in Path(f"/proc/{grandchild}/stat").read_text().rsplit(")", 1)[1][:3]


def test_runner_places_jobs_on_least_loaded_gpus(tmp_path: Path) -> None:
    code = "import os; print('GPUS', os.environ.get('CUDA_VISIBLE_DEVICES'))"
    jobs = [Job("a", argv=_py(code + "; import time; time.sleep(1)"), gpus=1), Job("b", argv=_py(code), gpus=1),
            Job("c", argv=_py(code), gpus=2)]  # fmt: skip
    state = Runner(jobs, devices=["4", "6"], max_parallel=3, deadline=time.time() + 60, log_dir=tmp_path,
                   echo=lambda *a: None).run()  # fmt: skip
    assert [state[n].devices for n in "abc"] == [["4"], ["6"], ["4", "6"]]
    assert "GPUS 4,6" in Path(state["c"].log).read_text()


def test_gpu_plan_on_two_gpus(tmp_path: Path, monkeypatch) -> None:
    """The plan the lead's 2-GPU call runs: priorities, placements, and tp=4 recorded as not run."""
    from benchmarks.tp import check as tp_check

    monkeypatch.delenv("OUT", raising=False)
    s = tp_check.Settings(smoke=False, gpu=True, devices=["0", "1"], workdir=tmp_path, out=tmp_path / "tp.json",
                          deadline=time.time() + 500, compile=False, kv_cache_bytes=512 * 2**20,
                          steps={"calibration", "generation", "serve", "throughput"}, tp_sizes=[2, 4])  # fmt: skip
    report = tp_check.Report(s, {"started": time.time()})
    jobs = tp_check.build_jobs(s, report)
    names = [j.name for j in jobs]
    assert names.index("check-generate-kv8-tp2-fp8_e4m3") < names.index("serve-kv8-tp2") < names.index("throughput-tp2")
    throughput = jobs[names.index("throughput-tp2")]
    assert throughput.exclusive and names.index("generate-kv2-tp2-int8") > names.index("check-throughput-tp2")
    assert {j.name: j.gpus for j in jobs if j.name.startswith("calibrate-kv8")} == {"calibrate-kv8-tp1": 1, "calibrate-kv8-tp2": 2}
    assert not any("tp4" in n for n in names)
    not_run = [r for r in report.result["rows"] if r["passed"] is None]
    assert {r["tp"] for r in not_run} == {4} and all(r["reason"] == "not run: needs 4 GPUs, 2 visible" for r in not_run)
    assert len(not_run) == 2 * 2 + 2 * 4  # calibration (2 models x 2 bounds), generation kv2 (2 dtypes x 4 checks)
    gen = next(j for j in jobs if j.name == "generate-kv8-tp2-int8")
    assert gen.env["NCCL_NVLS_ENABLE"] == "0" and gen.env["VLLM_WORKER_MULTIPROC_METHOD"] == "spawn"
    engine = tp_check.json.loads(gen.argv[-2])["engine"]
    assert engine["tensor_parallel_size"] == 2 and engine["kv_cache_memory_bytes"] == 512 * 2**20
    assert engine["compilation_config"]["cudagraph_mode"] == "FULL_DECODE_ONLY" and "enforce_eager" not in engine
    argv = throughput.argv_fn(300.0)
    assert argv[argv.index("--tensor-parallel-size") + 1] == "2" and argv[argv.index("--time-budget") + 1] == "280"
    assert argv[argv.index("--configs") + 1] == "vllm-bf16,vllm-fp8-flash,kvquant-fp8,kvquant-int8"


def test_calibrate_wrapper_fixes_the_kv_cache_size(monkeypatch) -> None:
    """tp_calibrate passes the CLI's --kv-cache-memory-bytes, or adds the engine key where the CLI has no flag."""
    from argparse import Namespace

    from benchmarks.tp import calibrate as tp_calibrate

    from vllm_kvquant import calibrate, cli

    assert {"--tensor-parallel-size", "--out"} <= tp_calibrate.calibrate_options()  # the real CLI's parser
    seen = {}
    monkeypatch.setattr(cli, "main", lambda argv: seen.setdefault("argv", argv) and 0)
    monkeypatch.setenv("TP_CHECK_KV_CACHE_BYTES", "1024")
    monkeypatch.setattr(tp_calibrate, "calibrate_options", lambda: {"--kv-cache-memory-bytes"})
    tp_calibrate.main(["calibrate", "m"])
    assert seen.pop("argv") == ["calibrate", "m", "--kv-cache-memory-bytes", "1024"]
    monkeypatch.setattr(tp_calibrate, "calibrate_options", lambda: set())
    monkeypatch.setattr(calibrate, "calibration_engine_args", lambda args, max_model_len: {"model": args.model})
    tp_calibrate.main(["calibrate", "m"])
    assert seen.pop("argv") == ["calibrate", "m"]
    assert calibrate.calibration_engine_args(Namespace(model="m"), 8) == {"model": "m", "kv_cache_memory_bytes": 1024}
