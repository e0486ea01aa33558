"""Make a tiny Llama checkpoint (random, or briefly trained) with a locally trained tokenizer.

Nothing can be downloaded in CI or on an offline machine, yet the examples, tests and the
README's first command need a real model directory that vLLM loads like any other.
``vllm-kvquant make-tiny-model DIR`` writes one in a few seconds.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from importlib import resources
from pathlib import Path


@dataclass(frozen=True)
class TinyLlamaConfig:
    """The sizes and init range: each field goes to the ``LlamaConfig`` field of the same name."""

    hidden_size: int = 256
    intermediate_size: int = 512
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 64
    max_position_embeddings: int = 1024
    # Larger than Llama's 0.02 so that the random model's next-token distribution is peaked
    # and greedy decoding is meaningful to compare between KV-cache formats.
    initializer_range: float = 0.2


@dataclass(frozen=True)
class TinyLlamaSpec(TinyLlamaConfig):
    """A tiny model: its ``LlamaConfig`` fields, then tokenizer, init, training and dtype."""

    # The tokenizer's target; the config takes the trained tokenizer's actual size.
    vocab_size: int = 512
    # q/k projections are shrunk after init so attention logits have a std of ~2.5, like a
    # trained model; at the full init their std is ~10, a near one-hot softmax that turns
    # any rounding (bf16 included) into a different token.
    qk_weight_scale: float = 0.5
    # Optional few seconds of training on the shipped corpus (CPU, seeded): the model then
    # predicts corpus text with confidence, so greedy continuations compare between KV
    # formats without the near-ties of random weights. 0 keeps the random model.
    train_steps: int = 0
    seed: int = 0
    dtype: str = "bfloat16"


#: The fields of :class:`TinyLlamaSpec` that are ``LlamaConfig`` fields of the same name.
LLAMA_CONFIG_FIELDS = tuple(f.name for f in fields(TinyLlamaConfig))


# Llama's own init, trained ~25 s on 2 CPU cores: corpus loss ~1.8 nats, median top-1/top-2
# logprob gap ~3 on corpus text (vs ~0.7 for the random model).
TRAINED_TINY_LLAMA = TinyLlamaSpec(initializer_range=0.02, qk_weight_scale=1.0, train_steps=300)


def corpus_text() -> str:
    """The small English text shipped with the package (tokenizer training, calibration)."""
    return resources.files("vllm_kvquant").joinpath("data/tiny_corpus.txt").read_text(encoding="utf-8")


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on ``texts`` (deterministic for the same input), as a
    transformers ``PreTrainedTokenizerFast`` with ``<s>``/``</s>``/``<unk>``: made locally, nothing downloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _train_on_corpus(
    model, tokenizer, spec: TinyLlamaSpec, seq_len: int = 64, batch: int = 16, device: str = "cpu"
) -> None:
    """Next-token training on random windows of the corpus (fp32, deterministic seed; the windows
    are drawn on the CPU, so every device trains on the same data)."""
    import torch

    model.to(device)
    ids = torch.tensor(tokenizer(corpus_text())["input_ids"], dtype=torch.long)
    generator = torch.Generator().manual_seed(spec.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for _ in range(spec.train_steps):
        starts = torch.randint(0, len(ids) - seq_len - 1, (batch,), generator=generator)
        windows = torch.stack([ids[s : s + seq_len] for s in starts.tolist()]).to(device)
        loss = model(input_ids=windows, labels=windows).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    model.eval()
    model.to("cpu")


def make_tiny_llama(path: str | Path, spec: TinyLlamaSpec = TinyLlamaSpec(), train_device: str = "cpu") -> Path:
    """Write config, seeded weights (trained if ``spec.train_steps``) and a tokenizer to ``path``.

    ``train_device="cuda"`` trains in seconds where a test shares a GPU machine's cores with
    Triton compiling in other processes (on the CPU, oversubscribed torch threads took minutes);
    the weights then differ from a CPU-trained model's by rounding, so comparisons stay within one run.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = train_bpe_tokenizer(corpus_text().splitlines(), spec.vocab_size)
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    tokenizer.save_pretrained(path)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        **{name: getattr(spec, name) for name in LLAMA_CONFIG_FIELDS},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        torch_dtype=spec.dtype,
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(spec.qk_weight_scale)
            layer.self_attn.k_proj.weight.mul_(spec.qk_weight_scale)
    if spec.train_steps:
        _train_on_corpus(model, tokenizer, spec, device=train_device)
    model = model.to(getattr(torch, spec.dtype))
    model.save_pretrained(path, safe_serialization=True)
    (path / "tiny_model_spec.json").write_text(json.dumps(asdict(spec), indent=2))
    return path
