"""Shared test setup: `gpu` tests skip cleanly where no CUDA device is present; a skip fails
the session where KVQUANT_FAIL_ON_SKIP=1."""

from __future__ import annotations

import logging
import os
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
