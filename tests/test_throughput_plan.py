"""benchmarks/serving/throughput.py without an engine: row names of repeated configs, each config's
engine arguments, the repeats' summary, the time budget and the child command lines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.serving import throughput as thr
from benchmarks.serving.run_timing import summarize_runs
from benchmarks.serving.throughput_configs import CONFIGS, engine_kwargs, plan_rows, requested_cudagraph_mode


def test_a_config_listed_again_starts_again_under_a_numbered_name() -> None:
    assert plan_rows(["kvquant-fp8", "vllm-fp8-flash", "kvquant-fp8", "kvquant-fp8"]) == [
        ("kvquant-fp8", "kvquant-fp8"), ("vllm-fp8-flash", "vllm-fp8-flash"),
        ("kvquant-fp8#2", "kvquant-fp8"), ("kvquant-fp8#3", "kvquant-fp8")]  # fmt: skip
    with pytest.raises(ValueError, match="unknown config"):
        plan_rows(["kvquant-fp9"])


def _args(*argv: str):
    return thr.parse_args(["--gpu-memory-utilization", "0.2", *argv])


@pytest.mark.parametrize("compile_", [True, False])
def test_engine_arguments_of_the_issue_configs(compile_) -> None:
    args = _args(*(["--compile"] if compile_ else []))
    model = Path("/m")
    for name in ("kvquant-fp8-full", "kvquant-int8-full", "vllm-fp8-flash-full", "vllm-fp8-flash", "vllm-bf16",
                 "vllm-int8-per-token-head", "kvquant-fp8-fa3", "kvquant-fp8"):  # fmt: skip
        assert name in CONFIGS
    full = engine_kwargs("vllm-fp8-flash-full", model, args)
    assert full["attention_backend"] == "FLASH_ATTN" and full["kv_cache_dtype"] == "fp8"
    assert full["compilation_config"] == ({"cudagraph_mode": "FULL"} if compile_ else {"mode": 0, "cudagraph_mode": "FULL"})
    assert requested_cudagraph_mode(full) == "FULL"
    kvq_full = engine_kwargs("kvquant-int8-full", model, args)
    assert kvq_full["compilation_config"]["cudagraph_mode"] == "FULL"
    assert kvq_full["additional_config"]["kvquant"] == {"dtype": "int8", "scales": "/m/scales-int8.json", "fallback": "error"}
    fa3 = engine_kwargs("kvquant-fp8-fa3", model, args)
    assert fa3["attention_backend"] == "kvquant" and fa3["additional_config"]["kvquant"]["kernel"] == "fa3"
    default = engine_kwargs("kvquant-fp8", model, args)
    assert ("compilation_config" not in default) if compile_ else default["compilation_config"]["cudagraph_mode"] == "FULL_DECODE_ONLY"
    assert requested_cudagraph_mode(default) == ("FULL_AND_PIECEWISE (vLLM default)" if compile_ else "FULL_DECODE_ONLY")
    eager = engine_kwargs("kvquant-fp8-full", model, _args("--eager"))
    assert eager["enforce_eager"] and "compilation_config" not in eager and requested_cudagraph_mode(eager) == "NONE"
    per_token = engine_kwargs("vllm-int8-per-token-head", model, args)
    assert per_token["kv_cache_dtype"] == "int8_per_token_head" and per_token["max_model_len"] == 1024 + 512 + 16


def test_repeats_summary() -> None:
    runs = [{"output_tokens_per_s": v} for v in (7000.0, 7210.0, 7100.0)]
    assert summarize_runs(runs) == {"median_output_tokens_per_s": 7100.0, "min_output_tokens_per_s": 7000.0,
                                        "max_output_tokens_per_s": 7210.0, "spread_pct": 2.96}  # fmt: skip
    assert summarize_runs([{"output_tokens_per_s": 5.0}])["spread_pct"] == 0.0
    assert _args().repeats == 3 and _args("--smoke").repeats == 2
    with pytest.raises(SystemExit):
        _args("--repeats", "0")


def test_rows_run_in_order_until_the_time_budget(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("OUT", raising=False)
    args = _args("--compile", "--repeats", "3", "--workdir", str(tmp_path), "--time-budget", "540")
    plan = plan_rows(["kvquant-fp8", "kvquant-fp8", "vllm-fp8-flash", "vllm-bf16"])
    clock = {"now": 1000.0}
    monkeypatch.setattr(thr.time, "time", lambda: clock["now"])
    calls = []

    def child(argv: list[str], timeout: float) -> int:
        config, row_name = argv[argv.index("--one") + 1], argv[argv.index("--row-name") + 1]
        assert argv[argv.index("--repeats") + 1] == "3" and "--compile" in argv
        calls.append((row_name, config, timeout))
        clock["now"] += 200.0  # each engine: start, warm-up, three runs
        Path(argv[argv.index("--json") + 1]).write_text(json.dumps({"name": row_name, "config": config, "ok": 1}))
        return 0

    result = {"rows": []}
    out = tmp_path / "out.json"
    thr.run_rows(args, plan, result, out, t_start=1000.0, run=child)
    assert [c[:2] for c in calls] == [("kvquant-fp8", "kvquant-fp8"), ("kvquant-fp8#2", "kvquant-fp8")]
    assert calls[0][2] == 300.0  # --child-timeout
    rows = json.loads(out.read_text())["rows"]
    assert [r["name"] for r in rows] == ["kvquant-fp8", "kvquant-fp8#2", "vllm-fp8-flash", "vllm-bf16"]
    assert rows[2]["error"].startswith("skipped: time budget") and rows[2]["config"] == "vllm-fp8-flash"
    assert rows[0]["subprocess_s"] == 200.0


def test_a_child_without_a_result_is_an_error_row(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("OUT", raising=False)
    args = _args("--workdir", str(tmp_path))
    result = {"rows": []}
    thr.run_rows(args, plan_rows(["kvquant-int8", "vllm-bf16"]), result, tmp_path / "o.json", t_start=thr.time.time(),
                 run=lambda argv, timeout: None if "kvquant-int8" in argv else 3)  # fmt: skip
    assert [r["error"] for r in result["rows"]] == ["timed out after 300 s", "child exited 3 without a result"]


def test_scheduler_limits_reach_the_engine_and_the_child() -> None:
    """The serving steady state (64 running, `vllm serve`'s token budget) reproduced offline."""
    args = _args("--max-num-seqs", "64", "--max-num-batched-tokens", "8192")
    kw = engine_kwargs("kvquant-fp8", Path("/m"), args)
    assert kw["max_num_seqs"] == 64 and kw["max_num_batched_tokens"] == 8192
    argv = thr.child_argv(args, "kvquant-fp8", "kvquant-fp8", Path("/tmp/r.json"))
    assert argv[argv.index("--max-num-batched-tokens") + 1] == "8192" and argv[argv.index("--max-num-seqs") + 1] == "64"
    assert "max_num_batched_tokens" not in engine_kwargs("kvquant-fp8", Path("/m"), _args())
