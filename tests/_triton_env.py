"""Import first in kernel tests: without CUDA, run Triton kernels in its CPU interpreter."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
