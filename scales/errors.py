"""Errors of the scales sidecar, worded so a user sees which file, layer and value to fix."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

#: Command that produces a sidecar; quoted in every "no scales" message.
CALIBRATE_COMMAND = "vllm-kvquant calibrate <MODEL> --data <TEXT_FILE>"
CONVERT_COMMAND = "vllm-kvquant convert <SRC> <MODEL>/kvquant_scales.json"

_NO_VALUE = object()


def format_value(value: Any, limit: int = 80) -> str:
    """Render an offending value the way it appears in JSON (floats keep nan/inf spelled out)."""
    if isinstance(value, float):
        text = repr(value) if math.isfinite(value) else str(value)
    else:
        try:
            text = json.dumps(value, allow_nan=True)
        except (TypeError, ValueError):
            text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class ScalesError(ValueError):
    """Base class: anything wrong with KV-cache scales (their file, their content, their use)."""


class ScalesValidationError(ScalesError):
    """One invalid entry, e.g. ``f.json: layer 'L': k_scale[1] = -0.5 is not positive (...)``."""

    def __init__(
        self,
        file: str | Path | None,
        layer: str | None = None,
        field: str | None = None,
        value: Any = _NO_VALUE,
        reason: str = "",
    ) -> None:
        self.file = str(file) if file is not None else "<in-memory scales>"
        self.layer = layer
        self.field = field
        self.value = None if value is _NO_VALUE else value
        self.reason = reason
        where = self.file + (f": layer '{layer}'" if layer is not None else "")
        if field is not None:
            what = field if value is _NO_VALUE else f"{field} = {format_value(value)}"
            message = f"{where}: {what} {reason}".rstrip()
        else:
            message = f"{where} {reason}".rstrip() if layer is not None else f"{where}: {reason}"
        super().__init__(message)


class ScalesMismatchError(ScalesError):
    """A valid sidecar that was made for another model (heads, head size, layers or dtype)."""

    def __init__(self, file: str | Path | None, problems: list[str]) -> None:
        self.file = str(file) if file is not None else "<in-memory scales>"
        self.problems = list(problems)
        super().__init__(
            f"{self.file} does not match the running model:\n  - " + "\n  - ".join(self.problems)
        )


class ShardingError(ScalesError):
    """The KV heads cannot be split over the requested tensor-parallel size."""


class SidecarNotFoundError(ScalesError):
    """No ``kvquant_scales.json`` where one was required; says how to make one."""

    def __init__(self, model_dir: str | Path | None) -> None:
        self.model_dir = None if model_dir is None else str(model_dir)
        where = f"in {self.model_dir}" if self.model_dir else "(the model is not a local directory)"
        super().__init__(
            f"no kvquant_scales.json was found {where}. Make one with\n"
            f"    {CALIBRATE_COMMAND}\n"
            f"or, for a checkpoint that already has KV scales (llm-compressor / compressed-tensors, "
            f"vLLM kv_cache_scales.json, LightLLM kv_cache_calib.json),\n"
            f"    {CONVERT_COMMAND}\n"
            "or pass the file explicitly with --additional-config "
            "'{\"kvquant\": {\"scales\": \"/path/kvquant_scales.json\"}}'. "
            "Without '\"fallback\": \"error\"' kvquant falls back to '\"fallback\": \"online\"' (the default: "
            "per-head scales measured from the first batch each layer writes, then frozen, with a warning)."
        )
