"""benchmarks.kernels.decode_sass compiles the decode split kernel for sm_90 on a CPU machine and
reads back what the compiler made of it: a register cap is honoured, a smaller tile needs fewer
instructions per loop iteration, and the occupancy estimate follows registers and shared memory.
It runs as a subprocess: the tests' Triton interpreter (TRITON_INTERPRET=1) cannot compile."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton.backends.nvidia")


def run_tool(*args: str) -> subprocess.CompletedProcess:
    from benchmarks.harness import benchmarks_path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(benchmarks_path()), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "benchmarks.kernels.decode_sass", *args], capture_output=True,
                          text=True, timeout=600, env=env)  # fmt: skip


def test_report_of_two_configs(tmp_path) -> None:
    out = tmp_path / "sass.json"
    proc = run_tool("--configs", "", "block_n=64,maxnreg=128", "--kv-dtypes", "fp8_e4m3", "int8", "--out", str(out))
    if proc.returncode and "bundled" in proc.stderr:  # a Triton without its CUDA toolchain
        pytest.skip(proc.stderr.strip().splitlines()[-1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["arch"] == "sm_90a" and result["triton"] and result["dims"]["head_size"] == 128
    rows = {(r["config"], r["kv_dtype"]): r for r in result["rows"]}
    assert len(rows) == 4
    for r in rows.values():
        assert 32 <= r["regs"] <= 255 and r["shared_bytes"] > 0 and r["loop_instructions"] > 50, r
        assert r["programs_per_sm"] == min(65536 // (r["regs"] * 128), 227 * 1024 // r["shared_bytes"], 32)
        assert r["loop_opcodes"].get("HMMA", 0) > 0 and "16" in r["cp_async_bytes"], r  # tensor cores, 16-byte copies
    small = rows[("block_n=64,maxnreg=128", "fp8_e4m3")]
    assert small["regs"] <= 128 and small["tile_tokens"] == 64 and small["options"]["maxnreg"] == 128
    assert small["loop_instructions"] < rows[("default", "fp8_e4m3")]["loop_instructions"]


def test_variant_specs() -> None:
    from benchmarks.kernels import decode_sass

    v = decode_sass.parse_variant("nosplit+window+per_channel")
    assert (v.split, v.window, v.softcap, v.granularity) == (False, True, False, 2) and v.name == "nosplit+window+per_channel"
    assert decode_sass.parse_variant("split").name == "split+per_head"
    with pytest.raises(SystemExit, match="--variants 'split\\+fast': unknown part 'fast'"):
        decode_sass.parse_variant("split+fast")


def test_bad_config_and_the_interpreter_are_refused() -> None:
    proc = run_tool("--configs", "maxnreg=8")
    assert proc.returncode != 0 and "maxnreg must be in" in proc.stderr
    from benchmarks.kernels import decode_sass

    if os.environ.get("TRITON_INTERPRET") == "1":
        with pytest.raises(SystemExit, match="without TRITON_INTERPRET"):
            decode_sass.main([])
