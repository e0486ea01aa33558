"""Every benchmark the README, scripts/gpu-run.sh and the results files name still exists where they say.

The benchmarks are a package run from the repository root (``python -m benchmarks.kernels.decode``);
a module or file moved without its references fails here, not on the GPU machine.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE = re.compile(r"python3? (?:-P )?-m (benchmarks(?:\.\w+)+)")
PATH = re.compile(r"\bbenchmarks/[\w/]+\.py\b")


def _texts() -> dict[str, str]:
    texts = {name: (ROOT / name).read_text() for name in ("README.md", "scripts/gpu-run.sh")}
    for path in sorted((ROOT / "benchmarks" / "results").glob("*.json")):
        texts[str(path.relative_to(ROOT))] = json.dumps(json.loads(path.read_text()))
    return texts


def test_every_named_module_and_file_exists() -> None:
    missing, modules = [], 0
    for name, text in _texts().items():
        for module in MODULE.findall(text):
            modules += 1
            if importlib.util.find_spec(module) is None:
                missing.append(f"{name}: python -m {module}")
        missing += [f"{name}: {p}" for p in PATH.findall(text) if not (ROOT / p).is_file()]
    assert not missing, "\n".join(missing)
    assert modules >= 10  # the README's table alone names more


@pytest.mark.parametrize("text", ["python -m benchmarks.kernels.nothing", "run benchmarks/nothing.py"])
def test_a_missing_one_is_found(text: str) -> None:
    found = [m for m in MODULE.findall(text) if importlib.util.find_spec(m) is None]
    found += [p for p in PATH.findall(text) if not (ROOT / p).is_file()]
    assert found
