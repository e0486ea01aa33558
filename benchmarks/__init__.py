"""Measuring tools, run from the repository root as modules (``python -m benchmarks.kernels.decode``).

By concern: ``kernels/`` (attention and cache-write kernels, host overhead, tuning), ``serving/``
(end-to-end throughput), ``accuracy/`` (perplexity and agreement on real text), ``tp/`` (tensor
parallelism). At the top, shared by them: ``common`` (timing, environment facts), ``harness``
(result files, the benchmark worker extension), ``plots`` and ``prepare_text`` (the accuracy text).
Results land in ``results/``; the README's table (under Results) says which command writes which file.
"""

import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]


def _root_last() -> None:
    """``python -m`` run from the repository root puts the root first on ``sys.path``; move it last.

    Its ``kernels/``, ``scales/`` and ``tests/`` folders must not shadow installed packages of those
    names (transformers imports the Hugging Face ``kernels`` package wherever that is installed),
    and the installed ``vllm_kvquant`` comes first. This package is imported by now: its modules
    are found through it, not through ``sys.path``.
    """
    here = [p for p in sys.path if Path(p or ".").resolve() == _ROOT]
    if here:
        sys.path[:] = [p for p in sys.path if p not in here] + [str(_ROOT)]


_root_last()
