"""``vllm-kvquant demo``: the CPU quick start, end to end, with nothing downloaded.

Makes a tiny Llama (trained for a few seconds on the shipped text, so that its greedy output
is not a coin toss between near-ties), calibrates its K/V scales on that text, then generates
with BF16 KV and with the kvquant 8-bit cache and prints both, with the KV capacity each got.
"""

from __future__ import annotations

import gc
from argparse import Namespace
from pathlib import Path

PROMPTS = [
    "The river runs past the old mill",
    "A language model reads a sequence of tokens",
    "Calibration runs the model over ordinary text",
    "The library keeps old maps of the region",
]


def engine_kwargs() -> dict:
    """Settings that keep a tiny model small and quick on a CPU machine."""
    return dict(dtype="bfloat16", max_model_len=512, gpu_memory_utilization=0.3, enforce_eager=True, seed=0)


def kv_capacity_tokens(llm) -> int:
    """KV-cache capacity vLLM allocated, in tokens."""
    cache_config = llm.llm_engine.vllm_config.cache_config
    return int(cache_config.num_gpu_blocks or 0) * int(cache_config.block_size)


def generate(model_dir: Path, attention_backend: str | None, max_tokens: int = 24) -> tuple[list[str], int]:
    from vllm import LLM, SamplingParams

    kwargs = engine_kwargs()
    if attention_backend:
        kwargs["attention_backend"] = attention_backend
    llm = LLM(model=str(model_dir), **kwargs)
    outputs = llm.generate(PROMPTS, SamplingParams(max_tokens=max_tokens, temperature=0.0))
    texts = [o.outputs[0].text for o in outputs]
    capacity = kv_capacity_tokens(llm)
    del llm
    gc.collect()
    return texts, capacity


def run_demo(workdir: Path, kv_dtype: str = "int8") -> None:
    from .calibrate import run_calibration
    from .tiny_model import TRAINED_TINY_LLAMA, corpus_text, make_tiny_llama

    model_dir = workdir / "tiny-llama"
    if not (model_dir / "config.json").exists():
        print("training a tiny Llama on the shipped text (about half a minute on a CPU) ...")
        make_tiny_llama(model_dir, TRAINED_TINY_LLAMA)
    corpus = workdir / "calibration.txt"

    corpus.write_text(corpus_text())
    run_calibration(
        Namespace(
            model=str(model_dir), data=str(corpus), num_samples=8, seq_len=128, granularity="per_head",
            dtype=kv_dtype, method="absmax", percentile=99.99, margin=1.0, tensor_parallel_size=1, seed=0,
            out=None, model_dtype="bfloat16", gpu_memory_utilization=0.3, max_model_len=512,
        )
    )
    reference, ref_capacity = generate(model_dir, None)
    quantized, q_capacity = generate(model_dir, "kvquant")
    same = sum(a == b for a, b in zip(reference, quantized))
    print(f"\nKV cache capacity: bf16 {ref_capacity} tokens, kvquant ({kv_dtype}) {q_capacity} tokens")
    for prompt, a, b in zip(PROMPTS, reference, quantized):
        print(f"\nprompt : {prompt!r}\nbf16   : {a!r}\nkvquant: {b!r}")
    print(f"\n{same}/{len(PROMPTS)} greedy completions identical to the BF16 KV cache")
