"""Shared test setup: `gpu` tests skip cleanly where no CUDA device is present; a skip fails
the session where KVQUANT_FAIL_ON_SKIP=1."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

#: The benchmarks are a package of the checkout (``benchmarks.accuracy.runner`` etc.), not installed:
#: the repository root goes last on sys.path, so the installed vllm_kvquant stays the one imported.
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))

KVQUANT_LOGGER = "vllm.kvquant"
#: Set to 1 where every selected test must run (CI's older-vLLM part): a skip fails the session,
#: so a vLLM that does not import (``importorskip``) cannot pass unnoticed.
FAIL_ON_SKIP_ENV = "KVQUANT_FAIL_ON_SKIP"
_skipped: list[str] = []


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if os.environ.get(FAIL_ON_SKIP_ENV) != "1" or not _skipped or exitstatus != 0:
        return
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"{FAIL_ON_SKIP_ENV}=1 and {len(_skipped)} skipped: {', '.join(_skipped)}", red=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def kvquant_caplog(caplog: pytest.LogCaptureFixture):
    """``caplog`` for the package's logger. ``vllm.kvquant`` sits under vLLM's ``vllm`` logger (so
    vLLM prints our lines in its format), which stops propagation once vLLM configures logging."""
    logger = logging.getLogger(KVQUANT_LOGGER)
    propagate = logger.propagate
    logger.addHandler(caplog.handler)
    logger.propagate = False  # not twice where vLLM has not configured logging yet
    try:
        yield caplog
    finally:
        logger.removeHandler(caplog.handler)
        logger.propagate = propagate


@pytest.fixture(scope="session")
def calibrated_tiny_model(tmp_path_factory) -> tuple[Path, Path, Path]:
    """The trained tiny Llama calibrated once per session, shared by the engine and server tests
    (tests/test_backend_gpu.py, tests/test_serve.py, tests/test_serve_bad_input.py):
    ``(model_dir, int8 sidecar, fp8 sidecar)``. The int8 per-head sidecar is the model's default
    (``model_dir/kvquant_scales.json``); the fp8_e4m3 one is the same scales retargeted by qmax ratio."""
    from serve_client import server_env

    from vllm_kvquant.scales import load_scales, save_scales
    from vllm_kvquant.tiny_model import TRAINED_TINY_LLAMA, corpus_text, make_tiny_llama

    root = tmp_path_factory.mktemp("calibrated")
    model_dir = make_tiny_llama(root / "tiny", TRAINED_TINY_LLAMA, train_device="cuda" if torch.cuda.is_available() else "cpu")
    data = root / "calib.txt"
    data.write_text(corpus_text())
    cmd = [sys.executable, "-m", "vllm_kvquant.cli", "calibrate", str(model_dir), "--data", str(data),
           "--num-samples", "16", "--seq-len", "128", "--dtype", "int8", "--granularity", "per_head",
           "--model-dtype", "bfloat16", "--gpu-memory-utilization", "0.2"]  # fmt: skip
    if torch.cuda.is_available():
        # A fixed KV size: vLLM then skips its memory profiling, which fails ("Error in memory
        # profiling", "No available memory for the cache blocks") while engines of other test
        # lanes start or stop on the same GPU (scripts/gpu-run.sh check runs them side by side).
        cmd += ["--kv-cache-memory-bytes", str(1 << 28)]
    log_path = root / "calibrate.log"  # scripts/gpu-run.sh brings it back, also from a lane out of time
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=900, cwd=root, env=server_env())
    assert proc.returncode == 0, log_path.read_text(errors="replace")[-4000:]
    int8_path = model_dir / "kvquant_scales.json"
    fp8_path = root / "scales-fp8_e4m3.json"
    save_scales(load_scales(int8_path).retarget("fp8_e4m3"), fp8_path)
    return model_dir, int8_path, fp8_path


@pytest.fixture(scope="session")
def kvquant_server(calibrated_tiny_model, tmp_path_factory):
    """``vllm serve`` on the calibrated tiny model with ``--attention-backend kvquant`` (fp8_e4m3
    scales, prefill ``quantized``), shared by tests/test_serve.py and tests/test_serve_bad_input.py
    so that one server start serves both: ``(url, log path, max_model_len)``. Listens on 127.0.0.1
    only and is always stopped. On a GPU its KV cache is a fixed 2 GiB (``--kv-cache-memory-bytes``)
    rather than a profiled share, so other processes on the same GPU cannot change it."""
    import json

    from serve_client import on_gpu, running_server

    model_dir, _, fp8_sidecar = calibrated_tiny_model
    root = tmp_path_factory.mktemp("serve")
    max_model_len = 1024
    # prefill "quantized": a repeated greedy request (the streamed one in test_serve.py, which hits
    # the prefix cache) attends to the same 8-bit values as the first, so it must give the same text.
    args = ["--attention-backend", "kvquant", "--dtype", "bfloat16", "--gpu-memory-utilization", "0.2",
            "--max-model-len", str(max_model_len), "--enable-prefix-caching", "--enable-chunked-prefill",
            "--additional-config", json.dumps({"kvquant": {"prefill": "quantized", "scales": str(fp8_sidecar)}})]  # fmt: skip
    if on_gpu():
        args += ["--kv-cache-memory-bytes", str(2 << 30)]
    with running_server(model_dir, root / "server.log", args) as url:
        yield url, root / "server.log", max_model_len
