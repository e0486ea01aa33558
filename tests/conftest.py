"""Shared test setup: `gpu` tests skip cleanly where no CUDA device is present."""

from __future__ import annotations

import logging

import pytest
import torch

KVQUANT_LOGGER = "vllm.kvquant"


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
