"""``vllm-kvquant make-tiny-model``: the local stand-in for a downloaded model (random or briefly
trained), loadable by transformers, and refusing a negative step count."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def _make(path: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "vllm_kvquant.cli", "make-tiny-model", str(path), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def _corpus_loss(path: Path) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_kvquant.tiny_model import corpus_text

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = torch.tensor([tokenizer(corpus_text())["input_ids"][:256]])
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def test_random_and_trained(tmp_path: Path) -> None:
    random_dir, trained_dir = tmp_path / "random", tmp_path / "trained"
    assert _make(random_dir).returncode == 0
    done = _make(trained_dir, "--train-steps", "40")
    assert done.returncode == 0, done.stderr[-2000:]
    for path in (random_dir, trained_dir):
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in path.iterdir()}
    spec = json.loads((trained_dir / "tiny_model_spec.json").read_text())
    assert spec["train_steps"] == 40 and spec["initializer_range"] == 0.02
    # Even 40 steps learn much of the shipped text: the corpus loss falls well below the random model's.
    assert _corpus_loss(trained_dir) < _corpus_loss(random_dir) - 2.0


def test_negative_train_steps_is_refused(tmp_path: Path) -> None:
    done = _make(tmp_path / "m", "--train-steps", "-1")
    assert done.returncode != 0
    assert "--train-steps must be >= 0, got -1" in done.stderr
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("steps", [0, 3])
def test_seeded(tmp_path: Path, steps: int) -> None:
    """Same seed, same weights: tests and the demo rebuild the same model everywhere."""
    from safetensors.torch import load_file

    a, b = tmp_path / "a", tmp_path / "b"
    assert _make(a, "--train-steps", str(steps)).returncode == 0
    assert _make(b, "--train-steps", str(steps)).returncode == 0
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)
