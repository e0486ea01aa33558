"""Where calibration listens: the exact K/V the backend is about to quantize.

``vllm-kvquant calibrate`` installs a recorder in the worker process; the backend's cache
write hands it each layer's K and V (after RoPE and any K norm) before quantizing them.
"""

from __future__ import annotations

from typing import Protocol

import torch


class KVRecorder(Protocol):
    def record(self, layer_name: str, key: torch.Tensor, value: torch.Tensor) -> None: ...


_active: KVRecorder | None = None


def active_recorder() -> KVRecorder | None:
    return _active


def set_recorder(recorder: KVRecorder | None) -> None:
    global _active
    _active = recorder
