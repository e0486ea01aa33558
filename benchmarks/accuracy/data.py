"""Text, tokenizer and token windows for the accuracy benchmark.

The text comes from ``python -m benchmarks.prepare_text`` (``.benchdata/{train,calib,heldout}.jsonl``,
or the ``.jsonl.gz`` files its ``--compress`` writes, small enough to carry to an offline GPU
machine). The tokenizer is a byte-level BPE trained on the train split in the same run, so
nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

SPLITS = ("train", "calib", "heldout")


def split_path(data_dir: Path, split: str) -> Path:
    """``<split>.jsonl`` or ``<split>.jsonl.gz`` in ``data_dir``; a clear error naming both if neither exists."""
    for name in (f"{split}.jsonl", f"{split}.jsonl.gz"):
        if (data_dir / name).exists():
            return data_dir / name
    raise FileNotFoundError(
        f"{data_dir} has neither {split}.jsonl nor {split}.jsonl.gz: make it with "
        f"`python -m benchmarks.prepare_text --out {data_dir}` (see benchmarks/prepare_text.py for offline use)"
    )


def read_jsonl(path: Path) -> list[str]:
    """The ``text`` field of every line (plain or gzip-compressed JSONL), naming file and line on bad input."""
    from vllm_kvquant.calibrate import read_jsonl_texts

    texts = read_jsonl_texts(path)
    if not texts:
        raise ValueError(f"{path} holds no records")
    return texts


def write_plain_jsonl(texts: list[str], path: Path) -> Path:
    """The calibration CLI reads plain JSONL: write the split there (uncompressed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return path


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE on ``texts`` (deterministic for the same input): the tiny model's own recipe."""
    from vllm_kvquant.tiny_model import train_bpe_tokenizer

    return train_bpe_tokenizer(texts, vocab_size)


def encode_stream(tokenizer, texts: list[str]) -> list[int]:
    """Documents tokenized and joined by EOS (the training and evaluation stream)."""
    ids: list[int] = []
    for batch_start in range(0, len(texts), 64):
        batch = texts[batch_start : batch_start + 64]
        for enc in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            ids.extend(enc)
            ids.append(tokenizer.eos_token_id)
    return ids


def windows(ids: list[int], length: int, count: int, offset: int = 0) -> list[list[int]]:
    """``count`` non-overlapping windows of ``length`` tokens, evenly spread over the stream (deterministic)."""
    if length < 2:
        raise ValueError(f"window length must be >= 2 tokens, got {length}")
    n_avail = (len(ids) - offset) // length
    if n_avail < 1:
        raise ValueError(f"held-out text has {len(ids)} tokens, fewer than one window of {length}")
    count = min(count, n_avail)
    picks = [round(i * (n_avail - 1) / max(count - 1, 1)) for i in range(count)] if count > 1 else [0]
    return [ids[offset + p * length : offset + (p + 1) * length] for p in picks]


def eval_windows(tokenizer, heldout_texts: list[str], prompt_len: int, decode_len: int, count: int,
                 path: Path) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:  # fmt: skip
    """One model's evaluation windows of the held-out text in its own tokenizer, written to ``path``
    (what :mod:`benchmarks.accuracy.engine` reads): ``(sequences, prompts, forced decode tokens)``."""
    seqs = windows(encode_stream(tokenizer, heldout_texts), prompt_len + decode_len, count)
    prompts, forced = [s[:prompt_len] for s in seqs], [s[prompt_len:] for s in seqs]
    path.write_text(json.dumps({"prompts": prompts, "forced": forced}))
    return seqs, prompts, forced


def document_windows(tokenizer, path: str | Path, length: int, count: int, prefix: list[int]) -> list[list[int]]:
    """``count`` windows of ``length`` tokens (``prefix``, the tokenizer's special tokens, then text),
    cut from each document of ``path`` (:func:`vllm_kvquant.calibrate.read_texts`) and spread evenly
    over them; a ValueError naming the file when there are fewer."""
    from vllm_kvquant.calibrate import read_texts

    body = length - len(prefix)
    windows = []
    for text in read_texts(path):
        ids = list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        windows += [prefix + ids[i : i + body] for i in range(0, len(ids) - body + 1, body)]
    if len(windows) < count:
        raise ValueError(f"{path} holds {len(windows)} windows of {length} tokens; {count} are needed")
    step = len(windows) / count
    return [windows[int(i * step)] for i in range(count)]
