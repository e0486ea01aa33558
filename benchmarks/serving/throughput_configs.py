"""The engines and the workload of the serving benchmarks (``throughput.py``, ``profile_step.py``).

A config names an attention backend and KV format (``CONFIGS``); :func:`engine_kwargs` turns it
plus the run's options into ``LLM(...)`` arguments, the same for every tool, so a profile and a
throughput row of one name ran the same engine. The model is Llama-3-8B's shape with dummy
weights (``throughput.write_model_dir``), the prompts random token ids (:func:`make_prompts`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: kv_dtype: what the cache stores; kvquant: our backend with that format (sidecar of plausible
#: scales); engine: vLLM's own keyword arguments; cudagraph_mode: replaces the run's mode (not
#: with --eager); kvquant_options: more of additional_config["kvquant"].
CONFIGS: dict[str, dict] = {
    "vllm-bf16": {"kv_dtype": "bf16", "engine": {"attention_backend": "FLASH_ATTN"}},
    "vllm-fp8-flash": {"kv_dtype": "fp8_e4m3", "engine": {"attention_backend": "FLASH_ATTN", "kv_cache_dtype": "fp8"}},
    "vllm-fp8-flash-full": {"kv_dtype": "fp8_e4m3", "cudagraph_mode": "FULL",
                            "engine": {"attention_backend": "FLASH_ATTN", "kv_cache_dtype": "fp8"}},  # fmt: skip
    "kvquant-fp8": {"kv_dtype": "fp8_e4m3", "kvquant": "fp8_e4m3"},
    "kvquant-fp8-full": {"kv_dtype": "fp8_e4m3", "kvquant": "fp8_e4m3", "cudagraph_mode": "FULL"},
    # vLLM's FA3 decode kernel on our fp8 cache (fp8 queries; pure-decode full graphs only).
    "kvquant-fp8-fa3": {"kv_dtype": "fp8_e4m3", "kvquant": "fp8_e4m3", "kvquant_options": {"kernel": "fa3"}},
    "kvquant-int8": {"kv_dtype": "int8", "kvquant": "int8"},
    "kvquant-int8-full": {"kv_dtype": "int8", "kvquant": "int8", "cudagraph_mode": "FULL"},
    "vllm-fp8-triton": {"kv_dtype": "fp8_e4m3", "engine": {"attention_backend": "TRITON_ATTN", "kv_cache_dtype": "fp8"}},
    # vLLM's only int8 KV option (dynamic per-token-head scales stored beside the cache, TRITON_ATTN).
    "vllm-int8-per-token-head": {"kv_dtype": "int8",
                                 "engine": {"attention_backend": "TRITON_ATTN", "kv_cache_dtype": "int8_per_token_head"}},
    # Not in the default list: vLLM's own choice of backend (the CPU smoke's working reference).
    "vllm-bf16-auto": {"kv_dtype": "bf16", "engine": {}},
}  # fmt: skip
DEFAULT_CONFIGS = ["vllm-bf16", "vllm-fp8-flash", "kvquant-fp8", "kvquant-int8", "vllm-fp8-triton",
                   "vllm-int8-per-token-head"]  # fmt: skip
#: --smoke on a CPU: vLLM ignores FLASH_ATTN/TRITON_ATTN there (it runs CPU_ATTN; the row's
#: ``backend`` says so) and has no fp8 cache without AVX-512 (the row records the error).
SMOKE_CONFIGS = ["vllm-bf16-auto", "vllm-fp8-flash", "kvquant-fp8", "kvquant-int8"]

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "bos_token_id": 1,
    "eos_token_id": 2,
}
SMOKE_MODEL = {**LLAMA3_8B, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 4096}  # fmt: skip


def plan_rows(names: list[str]) -> list[tuple[str, str]]:
    """``(row name, config)`` in run order; a config listed again is another engine start of it,
    its rows named ``NAME#2``, ``NAME#3`` (the spread between engine starts vs within one)."""
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise ValueError(f"unknown config(s) {unknown}; known: {list(CONFIGS)}")
    seen: dict[str, int] = {}
    rows = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        rows.append((name if seen[name] == 1 else f"{name}#{seen[name]}", name))
    return rows


def engine_kwargs(config: str, model_dir: Path, args: Any, **extra: Any) -> dict:
    """``LLM(...)`` keyword arguments of ``config`` for the run's options (``args``: max_model_len
    from input/output lengths, gpu_memory_utilization, max_num_seqs, max_num_batched_tokens, tensor_parallel_size,
    fast_start, eager, seed). ``extra`` (e.g. ``worker_extension_cls``) is added as is."""
    spec = CONFIGS[config]
    kw: dict[str, Any] = dict(
        model=str(model_dir), load_format="dummy", dtype="bfloat16", seed=args.seed,
        max_model_len=args.input_len + args.output_len + 16, gpu_memory_utilization=args.gpu_memory_utilization,
        enable_prefix_caching=False, disable_log_stats=False, **extra,
    )  # fmt: skip
    if args.max_num_seqs:
        kw["max_num_seqs"] = args.max_num_seqs
    if args.max_num_batched_tokens:
        kw["max_num_batched_tokens"] = args.max_num_batched_tokens
    if args.tensor_parallel_size > 1:
        kw["tensor_parallel_size"] = args.tensor_parallel_size
    if args.eager:
        kw["enforce_eager"] = True
    else:
        compilation = {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"} if args.fast_start else {}
        if spec.get("cudagraph_mode"):
            compilation["cudagraph_mode"] = spec["cudagraph_mode"]
        if compilation:
            kw["compilation_config"] = compilation
    if spec.get("kvquant"):
        kw["attention_backend"] = "kvquant"
        kvq = {"dtype": spec["kvquant"], "scales": str(model_dir / f"scales-{spec['kvquant']}.json"), "fallback": "error"}
        kw["additional_config"] = {"kvquant": {**kvq, **spec.get("kvquant_options", {})}}
    kw.update(spec.get("engine", {}))
    return kw


def requested_cudagraph_mode(kw: dict) -> str:
    """The CUDA-graph mode asked for (vLLM's default for its compilation mode when not given)."""
    if kw.get("enforce_eager"):
        return "NONE"
    return str(kw.get("compilation_config", {}).get("cudagraph_mode", "FULL_AND_PIECEWISE (vLLM default)"))


def make_prompts(model_dir: Path, num_requests: int, input_len: int, seed: int) -> list[dict]:
    """``num_requests`` prompts of ``input_len`` random token ids (the same for every config)."""
    import random

    rng = random.Random(seed)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    return [{"prompt_token_ids": [rng.randrange(1000, vocab - 1) for _ in range(input_len)]} for _ in range(num_requests)]
