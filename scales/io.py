"""Find, read and write ``kvquant_scales.json`` (pure Python + json: no torch, no vLLM)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from .errors import ScalesError, ScalesValidationError, SidecarNotFoundError
from .format import ScalesFile
from .validate import parse_scales, validate_scales

#: The sidecar lives next to the model's config.json under this name.
SIDECAR_FILENAME = "kvquant_scales.json"

PathLike = str | os.PathLike


def find_sidecar(model_dir: PathLike | None) -> Path | None:
    """``<model_dir>/kvquant_scales.json`` if the model is a local dir holding one, else None (e.g. a hub id)."""
    if model_dir is None:
        return None
    directory = Path(model_dir)
    if not directory.is_dir():
        return None
    candidate = directory / SIDECAR_FILENAME
    return candidate if candidate.is_file() else None


def read_json(path: PathLike) -> object:
    """Parse a JSON file; syntax errors name the file, line and column."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ScalesError(f"{path}: no such file") from None
    except UnicodeDecodeError as exc:
        raise ScalesValidationError(path, reason=f"is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ScalesValidationError(
            path, reason=f"is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"
        ) from None


def load_scales(path_or_dir: PathLike) -> ScalesFile:
    """Load and validate a sidecar, given the file itself or the model directory holding it."""
    path = Path(path_or_dir)
    if path.is_dir():
        sidecar = find_sidecar(path)
        if sidecar is None:
            raise SidecarNotFoundError(path)
        path = sidecar
    return parse_scales(read_json(path), source_path=str(path))


def save_scales(scales: ScalesFile, path: PathLike) -> Path:
    """Validate, then write pretty JSON atomically (temp file + rename): never a half-written sidecar."""
    path = Path(path)
    if path.is_dir():
        path = path / SIDECAR_FILENAME
    validate_scales(  # under the destination's name so errors point at it
        ScalesFile(scales.kv_dtype, scales.granularity, scales.model, scales.calibration, scales.layers, str(path))
    )
    text = json.dumps(scales.to_json_dict(), indent=2, allow_nan=False) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a sidecar is ordinary model data
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


#: JSON Schema (draft 2020-12) of the sidecar, shipped as package data.
SCHEMA_PATH = Path(__file__).with_name("schema.json")


def load_schema() -> dict:
    """The sidecar's JSON Schema (for external validators; our own checks are in validate.py)."""
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
