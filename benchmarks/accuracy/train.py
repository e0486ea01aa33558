"""Train the small Llama the accuracy benchmark evaluates (seeded, in the same run: no checkpoint in git).

``transformers.LlamaForCausalLM`` trained from scratch with plain PyTorch (AdamW, cosine schedule,
bf16 autocast on CUDA, seeded init and data order, deterministic algorithms where PyTorch has
them), saved in bf16 with ``save_pretrained`` plus the tokenizer, as vLLM loads any model.
"""

from __future__ import annotations

import gc
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelShape:
    vocab_size: int = 8192
    hidden: int = 512
    intermediate: int = 1536
    layers: int = 8
    heads: int = 8
    kv_heads: int = 2
    head_dim: int = 64
    max_model_len: int = 1088


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 800
    seq_len: int = 1024
    batch_size: int = 16
    lr: float = 1.5e-3
    weight_decay: float = 0.1
    log_every: int = 50
    eval_windows: int = 16
    train_minutes: float | None = None
    seed: int = 0


def _log(*a) -> None:
    print("[accuracy]", *a, flush=True)


def llama_config(shape: ModelShape, tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=shape.max_model_len,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        initializer_range=0.02,
        attention_dropout=0.0,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def _window_loss(model, batch, amp) -> "tuple[float, int]":
    import torch.nn.functional as F

    with amp:
        logits = model(input_ids=batch).logits.float()
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
    return float(loss), batch.shape[0] * (batch.shape[1] - 1)


def train_model(shape: ModelShape, cfg: TrainSettings, tokenizer, train_ids: list[int],
                eval_windows: list[list[int]], model_dir: Path) -> dict:  # fmt: skip
    """Train, save to ``model_dir`` (bf16 safetensors + tokenizer); returns what the results JSON records."""
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        return _train(shape, cfg, tokenizer, train_ids, eval_windows, model_dir)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)


def _train(shape: ModelShape, cfg: TrainSettings, tokenizer, train_ids: list[int],
           eval_windows: list[list[int]], model_dir: Path) -> dict:  # fmt: skip
    import torch
    import torch.nn.functional as F
    from transformers import LlamaForCausalLM

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(cfg.seed)
    config = llama_config(shape, tokenizer)
    model = LlamaForCausalLM(config).to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, **({"fused": True} if dev == "cuda" else {}),
    )  # fmt: skip
    warmup = max(1, cfg.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return cfg.lr * (step + 1) / warmup
        p = (step - warmup) / max(1, cfg.steps - warmup)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))

    data = torch.tensor(train_ids, dtype=torch.long)
    L, B = cfg.seq_len, cfg.batch_size
    if len(data) < L + 2:
        raise ValueError(f"train split has {len(data)} tokens, fewer than one training window of {L + 1}")
    gen = torch.Generator().manual_seed(cfg.seed)
    ar = torch.arange(L + 1)
    eval_batch = torch.tensor(eval_windows[: cfg.eval_windows], dtype=torch.long, device=dev)
    amp = torch.autocast(dev, dtype=torch.bfloat16, enabled=(dev == "cuda"))

    def heldout_loss() -> float:
        model.eval()
        total, n = 0.0, 0
        with torch.no_grad():
            for i in range(0, eval_batch.shape[0], 8):
                s, c = _window_loss(model, eval_batch[i : i + 8], amp)
                total, n = total + s, n + c
        model.train()
        return total / max(n, 1)

    _log(f"training {n_params / 1e6:.1f} M params on {len(train_ids) / 1e6:.2f} M tokens: "
         f"{cfg.steps} steps x {B} x {L} tokens on {dev}")  # fmt: skip
    history = []
    t0 = time.time()
    model.train()
    steps_done, loss_val = 0, float("nan")
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        starts = torch.randint(0, len(data) - L - 1, (B,), generator=gen)
        batch = data[starts[:, None] + ar].to(dev, non_blocking=True)
        with amp:
            logits = model(input_ids=batch[:, :-1]).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        steps_done = step + 1
        if steps_done % cfg.log_every == 0 or steps_done == cfg.steps:
            loss_val = loss.item()
            entry = {"step": steps_done, "train_loss": round(loss_val, 4), "seconds": round(time.time() - t0, 1)}
            if steps_done % (cfg.log_every * 4) == 0 or steps_done == cfg.steps:
                entry["heldout_loss"] = round(heldout_loss(), 4)
            history.append(entry)
            _log(json.dumps(entry))
        if cfg.train_minutes and time.time() - t0 > cfg.train_minutes * 60:
            _log(f"train_minutes {cfg.train_minutes} reached after {steps_done} steps")
            break
    if dev == "cuda":
        torch.cuda.synchronize()
    seconds = time.time() - t0
    final_heldout = heldout_loss()
    model_dir.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    info = {
        "params_m": round(n_params / 1e6, 2),
        "shape": asdict(shape),
        "settings": asdict(cfg),
        "train_tokens_available": len(train_ids),
        "steps": steps_done,
        "tokens_seen": steps_done * B * L,
        "epochs": round(steps_done * B * L / len(train_ids), 2),
        "seconds": round(seconds, 1),
        "tokens_per_s": round(steps_done * B * L / max(seconds, 1e-9)),
        "final_train_loss": round(loss_val, 4),
        "final_heldout_loss_fp32_master": round(final_heldout, 4),
        "history": history,
    }
    del model, opt, data
    gc.collect()
    if dev == "cuda":
        torch.cuda.empty_cache()
    return info


def hf_perplexity(model_dir: Path, ppl_windows: list[list[int]], dtype: str = "bfloat16") -> float:
    """Perplexity of a saved checkpoint with transformers (whole windows, no KV cache): a sanity anchor."""
    import torch
    import torch.nn.functional as F
    from transformers import LlamaForCausalLM

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(dev).eval()
    nll, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(ppl_windows), 8):
            x = torch.tensor(ppl_windows[i : i + 8], dtype=torch.long, device=dev)
            logits = model(input_ids=x).logits.float()
            nll += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"))
            n += x.shape[0] * (x.shape[1] - 1)
    del model
    gc.collect()
    if dev == "cuda":
        torch.cuda.empty_cache()
    return math.exp(nll / n)
