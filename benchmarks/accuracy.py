"""Accuracy of the 8-bit KV cache on a small Llama trained here on real English text (issue 7).

Steps, all in one run (``--smoke`` shrinks everything for a CPU check):

1. Data: ``.benchdata/{train,calib,heldout}.jsonl`` from ``benchmarks/prepare_text.py``
   (Shakespeare's plays + Jane Austen's novels, public domain, split per document 90/5/5).
2. Tokenizer: byte-level BPE (``tokenizers``) trained on the train split.
3. Model: ``transformers.LlamaForCausalLM`` (8 layers, hidden 512, 8 query / 2 KV heads of 64,
   RoPE, context 1024) trained from scratch with plain PyTorch (AdamW, bf16 autocast, seeded
   data order and init), then saved with ``save_pretrained`` + tokenizer in ``--workdir``.
   The train split is ~2 M tokens, so the default step count is ~10 epochs (more mostly
   memorizes); ``--steps`` / ``--train-minutes`` change it.
4. Calibration: ``python -m vllm_kvquant.cli calibrate`` on the calibration split for
   fp8_e4m3/int8 x per_tensor/per_head (4 sidecars). ``--calibrate-once`` runs the CLI once
   (fp8 per_head) and derives the other three exactly (absmax: per_tensor = max over heads;
   int8 = fp8 scale * 448 / 127), saving three engine starts.
5. vLLM evaluation, one engine per config, in turn:
   - perplexity on held-out windows, with chunked prefill (``max_num_batched_tokens`` =
     ``--chunk``, prefix caching off, ``prompt_logprobs=0``, ``max_tokens=1``): every chunk
     after a window's first attends to the earlier tokens *through the KV cache*, so their
     quantization is measured (a single prefill would attend to unquantized K/V);
   - greedy agreement: ``--gen-prompts`` held-out prompts of ``--gen-prompt-len`` tokens, then
     ``--gen-len`` greedy tokens (decode reads only the cache), compared with the bf16 run.
6. Synthetic study (CPU): attention-output error of each scheme on Gaussian K/V with a few
   large K channels, in fp32, with ``kernels/reference.py``'s quantize/dequantize.

Writes ``benchmarks/results/accuracy-<device>.json`` (and a copy into ``$OUT`` when set) after
every step, so a run cut short still leaves its rows. Every config runs inside try/except and
records ``error`` instead of stopping the run.

GPU (H100, vLLM 0.26): ``python benchmarks/accuracy.py`` (~7-8 min with defaults).
CPU smoke: ``python benchmarks/accuracy.py --smoke``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

#: name -> how to run it. ``engine`` is merged into the LLM(...) kwargs; ``model`` picks the
#: checkpoint ("base" or one of the vLLM-fp8 copies with k/v scales in the safetensors).
CONFIGS: dict[str, dict] = {
    "bf16": {"kv_dtype": "bf16", "granularity": None, "model": "base", "engine": {}},
    "kvquant-fp8-per_tensor": {"kv_dtype": "fp8_e4m3", "granularity": "per_tensor", "model": "base", "kvquant": True},
    "kvquant-fp8-per_head": {"kv_dtype": "fp8_e4m3", "granularity": "per_head", "model": "base", "kvquant": True},
    "kvquant-int8-per_tensor": {"kv_dtype": "int8", "granularity": "per_tensor", "model": "base", "kvquant": True},
    "kvquant-int8-per_head": {"kv_dtype": "int8", "granularity": "per_head", "model": "base", "kvquant": True},
    "vllm-fp8-scale1": {
        "kv_dtype": "fp8_e4m3", "granularity": "per_tensor (scale 1.0)", "model": "base",
        "engine": {"kv_cache_dtype": "fp8"},
    },
    "vllm-fp8-calibrated": {
        "kv_dtype": "fp8_e4m3", "granularity": "per_tensor (checkpoint k/v_scale)", "model": "vllm-fp8-per_tensor",
        "engine": {"kv_cache_dtype": "fp8"},
    },
    "vllm-int8_per_token_head": {
        "kv_dtype": "int8", "granularity": "per_token_head (dynamic)", "model": "base",
        "engine": {"kv_cache_dtype": "int8_per_token_head", "attention_backend": "TRITON_ATTN"},
    },
    # Extras, run last (skipped first when the time budget runs short):
    "vllm-fp8-calibrated-per_head": {
        "kv_dtype": "fp8_e4m3", "granularity": "per_head (checkpoint k/v_scale, attn_head)", "model": "vllm-fp8-per_head",
        "engine": {"kv_cache_dtype": "fp8"},
    },
    "bf16-triton": {  # noise floor: same bf16 cache, another attention kernel
        "kv_dtype": "bf16", "granularity": None, "model": "base", "engine": {"attention_backend": "TRITON_ATTN"},
    },
}  # fmt: skip
SMOKE_CONFIGS = "bf16,kvquant-fp8-per_tensor,kvquant-int8-per_head,vllm-fp8-calibrated-per_head"


class EngineError(RuntimeError):
    """A vLLM failure, worded root cause first."""


def log(*a) -> None:
    print("[accuracy]", *a, flush=True)


# ----------------------------------------------------------------------------- data
def read_jsonl(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def encode_stream(tokenizer, texts: list[str]) -> list[int]:
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    return ids


def windows(ids: list[int], length: int, count: int, offset: int = 0) -> list[list[int]]:
    """``count`` non-overlapping windows of ``length`` tokens, evenly spread (deterministic)."""
    n_avail = (len(ids) - offset) // length
    if n_avail < 1:
        raise ValueError(f"held-out text has {len(ids)} tokens, fewer than one window of {length}")
    count = min(count, n_avail)
    picks = [round(i * (n_avail - 1) / max(count - 1, 1)) for i in range(count)] if count > 1 else [0]
    return [ids[offset + p * length : offset + (p + 1) * length] for p in picks]


# ----------------------------------------------------------------------------- training
def train_model(args, tokenizer, train_ids: list[int], eval_windows: list[list[int]], model_dir: Path) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
        max_position_embeddings=args.max_model_len,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        initializer_range=0.02,
        attention_dropout=0.0,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config).to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8, **({"fused": True} if dev == "cuda" else {}),
    )  # fmt: skip
    warmup = max(1, args.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        p = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))

    data = torch.tensor(train_ids, dtype=torch.long)
    L, B = args.train_seq_len, args.batch_size
    gen = torch.Generator().manual_seed(args.seed)
    ar = torch.arange(L + 1)
    eval_batch = torch.tensor(eval_windows[: args.train_eval_windows], dtype=torch.long, device=dev)
    amp = torch.autocast(dev, dtype=torch.bfloat16, enabled=(dev == "cuda"))

    def heldout_loss() -> float:
        model.eval()
        with torch.no_grad(), amp:
            losses = []
            for i in range(0, eval_batch.shape[0], 8):
                x = eval_batch[i : i + 8]
                logits = model(input_ids=x).logits.float()
                losses.append(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"))
            total = torch.stack(losses).sum() / (eval_batch.shape[0] * (eval_batch.shape[1] - 1))
        model.train()
        return float(total)

    log(f"training {n_params / 1e6:.1f} M params on {len(train_ids) / 1e6:.2f} M tokens: "
        f"{args.steps} steps x {B} x {L} tokens on {dev}")  # fmt: skip
    history = []
    t0 = time.time()
    model.train()
    steps_done = 0
    loss_val = float("nan")
    for step in range(args.steps):
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
        if steps_done % args.log_every == 0 or steps_done == args.steps:
            loss_val = float(loss)
            entry = {"step": steps_done, "train_loss": round(loss_val, 4), "seconds": round(time.time() - t0, 1)}
            if steps_done % (args.log_every * 4) == 0 or steps_done == args.steps:
                entry["heldout_loss"] = round(heldout_loss(), 4)
            history.append(entry)
            log(json.dumps(entry))
        if args.train_minutes and time.time() - t0 > args.train_minutes * 60:
            log(f"--train-minutes {args.train_minutes} reached after {steps_done} steps")
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
        "config": {k: v for k, v in config.to_dict().items() if k in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "max_position_embeddings", "rope_theta", "rope_parameters")},
        "train_tokens_available": len(train_ids),
        "steps": steps_done,
        "steps_requested": args.steps,
        "batch_size": B,
        "seq_len": L,
        "tokens_seen": steps_done * B * L,
        "epochs": round(steps_done * B * L / len(train_ids), 2),
        "lr": args.lr,
        "seconds": round(seconds, 1),
        "tokens_per_s": round(steps_done * B * L / seconds),
        "final_train_loss": round(loss_val, 4),
        "final_heldout_loss_fp32_train_model": round(final_heldout, 4),
        "history": history,
        "seed": args.seed,
    }  # fmt: skip
    model = opt = data = None  # free GPU memory before vLLM starts
    gc.collect()
    if dev == "cuda":
        torch.cuda.empty_cache()
    return info


def hf_reference_ppl(model_dir: Path, ppl_windows: list[list[int]]) -> float:
    """Perplexity of the saved bf16 checkpoint with transformers (no KV cache): a sanity anchor."""
    import torch
    import torch.nn.functional as F
    from transformers import LlamaForCausalLM

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(dev).eval()
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


# ----------------------------------------------------------------------------- calibration
def sidecar_path(workdir: Path, dtype: str, granularity: str) -> Path:
    return workdir / f"scales-{dtype}-{granularity}.json"


def run_cli_calibration(args, model_dir: Path, calib_path: Path, dtype: str, granularity: str) -> dict:
    out = sidecar_path(args.workdir, dtype, granularity)
    cmd = [
        sys.executable, "-m", "vllm_kvquant.cli", "calibrate", str(model_dir), "--data", str(calib_path),
        "--granularity", granularity, "--dtype", dtype, "--out", str(out),
        "--num-samples", str(args.calib_samples), "--seq-len", str(args.calib_seq_len),
        "--model-dtype", "bfloat16", "--gpu-memory-utilization", str(args.gpu_memory_utilization),
        "--seed", str(args.seed),
    ]  # fmt: skip
    log("calibrating:", " ".join(cmd))
    t0 = time.time()
    entry = {"dtype": dtype, "granularity": granularity, "path": str(out), "command": " ".join(cmd[1:])}
    log_path = args.workdir / f"calibrate-{dtype}-{granularity}.log"
    with open(log_path, "w") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=args.calib_timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the CLI and the engine process it started
            proc.wait()
            rc = None
    entry["seconds"] = round(time.time() - t0, 1)
    tail = log_path.read_text(errors="replace")[-2000:]
    if rc is None:
        entry["error"] = f"timed out after {args.calib_timeout} s: {tail}"
    elif rc != 0 or not out.exists():
        entry["error"] = f"exit {rc}: {tail}"
    else:
        entry["how"] = "cli"
    if "error" in entry:
        log("calibration failed:", entry["error"][-800:])
    return entry


def derive_sidecar(src: Path, dtype: str, granularity: str, dest: Path) -> dict:
    """Exact absmax derivation from a per_head sidecar: amax = scale * qmax(src)."""
    import torch

    from vllm_kvquant.scales import ModelFacts, build_scales_file, load_scales, save_scales

    s = load_scales(src)
    qmax = s.kv_dtype.qmax
    stats = {n: (torch.tensor(l.k_scale) * qmax, torch.tensor(l.v_scale) * qmax) for n, l in s.layers.items()}
    m = s.model
    facts = ModelFacts(m.num_layers, m.num_kv_heads, m.head_size, tuple(m.layer_names))
    out = build_scales_file(stats, dtype, granularity, facts, s.calibration)
    save_scales(out, dest)
    return {"dtype": dtype, "granularity": granularity, "path": str(dest), "how": f"derived from {src.name}"}


# ----------------------------------------------------------------------------- vLLM fp8 checkpoints
def make_vllm_fp8_checkpoint(model_dir: Path, sidecar: Path, dest: Path, per_head: bool) -> Path:
    """Copy of the model whose safetensors carry ``model.layers.N.self_attn.{k,v}_scale`` and whose
    config has a compressed-tensors ``quantization_config`` with only a ``kv_cache_scheme``.

    vLLM 0.26: ``CompressedTensorsConfig`` leaves every Linear unquantized (no config groups) and
    gives each Attention a ``CompressedTensorsKVCacheMethod`` whose ``k_scale``/``v_scale``
    parameters (shape [1], or [num_kv_heads] for strategy ``attn_head``) are filled from the
    checkpoint; the base ``get_cache_scale_mapper`` renames ``.self_attn.k_scale`` ->
    ``.self_attn.attn.k_scale``. ``q_scale`` stays 1.0 (FA3 quantizes the query with it).
    """
    from safetensors.torch import load_file, save_file
    import torch

    from vllm_kvquant.scales import load_scales

    scales = load_scales(sidecar)
    if getattr(scales.kv_dtype, "value", scales.kv_dtype) != "fp8_e4m3":
        raise ValueError(f"{sidecar} is not fp8_e4m3; vLLM's fp8 cache needs fp8_e4m3 scales")
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for f in model_dir.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "config.json" and not f.name.startswith("kvquant_scales"):
            shutil.copy2(f, dest / f.name)
    tensors = {}
    for st in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(st))
    for name, layer in scales.layers.items():
        m = re.fullmatch(r"model\.layers\.(\d+)\.self_attn\.attn", name)
        if not m:
            raise ValueError(f"unexpected layer name {name!r} in {sidecar}")
        prefix = f"model.layers.{m.group(1)}.self_attn"
        k, v = torch.tensor(layer.k_scale, dtype=torch.float32), torch.tensor(layer.v_scale, dtype=torch.float32)
        if per_head and getattr(scales.granularity, "value", scales.granularity) != "per_head":
            raise ValueError(f"{sidecar} is not per_head; the attn_head checkpoint needs per-head scales")
        if not per_head:
            k, v = k.amax().reshape(1), v.amax().reshape(1)
        tensors[f"{prefix}.k_scale"] = k
        tensors[f"{prefix}.v_scale"] = v
    save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((model_dir / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": "dense",
        "quantization_status": "compressed",
        "config_groups": {},
        "ignore": [],
        "kv_cache_scheme": {
            "num_bits": 8, "type": "float", "symmetric": True, "dynamic": False,
            "strategy": "attn_head" if per_head else "tensor",
        },
        "total_num_heads": config["num_attention_heads"],
        "total_num_kv_heads": config["num_key_value_heads"],
    }  # fmt: skip
    (dest / "config.json").write_text(json.dumps(config, indent=1))
    return dest


# ----------------------------------------------------------------------------- vLLM evaluation
def engine_kwargs(args, model: Path, spec: dict, sidecar: Path | None) -> dict:
    from harness import BENCH_EXTENSION_PATH

    kw = dict(
        model=str(model),
        dtype="bfloat16",
        seed=args.seed,
        max_model_len=args.max_model_len,
        enable_chunked_prefill=True,
        max_num_batched_tokens=args.chunk,
        max_num_seqs=min(args.chunk, args.max_num_seqs),
        enable_prefix_caching=False,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enforce_eager=args.eager,
        worker_extension_cls=BENCH_EXTENSION_PATH,
    )
    if spec.get("kvquant"):
        kw["attention_backend"] = "kvquant"
        kw["additional_config"] = {"kvquant": {"scales": str(sidecar), "dtype": spec["kv_dtype"], "fallback": "error"}}
    kw.update(spec.get("engine", {}))
    return kw


def shutdown(llm) -> None:
    import torch

    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # noqa: BLE001
        pass
    del llm
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def run_vllm(args, kw: dict, ppl_windows: list[list[int]], gen_prompts: list[list[int]]) -> dict:
    from vllm import LLM, SamplingParams

    from vllm_kvquant.demo import kv_capacity_tokens

    t0 = time.time()
    llm = LLM(**kw)
    t_start = time.time() - t0
    try:
        res: dict = {"engine_start_s": round(t_start, 1), "kv_capacity_tokens": kv_capacity_tokens(llm)}
        try:
            res["layer_scales"] = llm.collective_rpc("bench_attention_scales")[0]
            if kw.get("attention_backend") == "kvquant":
                report = llm.collective_rpc("kvquant_backend_report")[0]
                for name, r in report.items():
                    res["layer_scales"].setdefault(name, {}).update(
                        {"k_scale": r.get("k_scale"), "v_scale": r.get("v_scale"), "kv_dtype": r.get("kv_dtype"),
                         "scales_source": r.get("scales_source")})  # fmt: skip
            first = res["layer_scales"][sorted(res["layer_scales"], key=_layer_key)[0]] if res["layer_scales"] else {}
            res["backend"] = first.get("backend")
            res["kv_cache_dtype"] = first.get("kv_cache_dtype")
        except Exception as e:  # noqa: BLE001
            res["backend_report_error"] = f"{type(e).__name__}: {e}"
        ppl_params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        gen_params = SamplingParams(max_tokens=args.gen_len, temperature=0.0, ignore_eos=True, detokenize=False)
        prompts = [{"prompt_token_ids": w} for w in ppl_windows] + [{"prompt_token_ids": p} for p in gen_prompts]
        params = [ppl_params] * len(ppl_windows) + [gen_params] * len(gen_prompts)
        t1 = time.time()
        outs = llm.generate(prompts, params, use_tqdm=False)
        res["run_s"] = round(time.time() - t1, 1)
        nll, n = 0.0, 0
        for w, o in zip(ppl_windows, outs[: len(ppl_windows)]):
            for pos, entry in enumerate(o.prompt_logprobs or []):
                if entry is None:
                    continue
                nll -= entry[w[pos]].logprob
                n += 1
        if n != sum(len(w) - 1 for w in ppl_windows):
            raise RuntimeError(f"got prompt logprobs for {n} tokens, expected {sum(len(w) - 1 for w in ppl_windows)}")
        res["perplexity"] = math.exp(nll / n)
        res["ppl_tokens"] = n
        res["generations"] = [list(o.outputs[0].token_ids) for o in outs[len(ppl_windows) :]]
        return res
    finally:
        shutdown(llm)


def _layer_key(name: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in name.split("."))


def compare_scales(layer_scales: dict, sidecar: Path) -> dict:
    """Do the scales the engine uses equal the sidecar's (per-tensor: max over heads)?"""
    from vllm_kvquant.scales import load_scales

    expected = load_scales(sidecar).layers
    worst = 0.0
    for name, got in layer_scales.items():
        if name not in expected:
            return {"scales_match_sidecar": False, "scales_mismatch": f"layer {name} not in {sidecar.name}"}
        for key, want in (("k_scale", expected[name].k_scale), ("v_scale", expected[name].v_scale)):
            g = got.get(key)
            if not g:
                return {"scales_match_sidecar": False, "scales_mismatch": f"{name}: no {key} reported"}
            w = list(want) if len(g) == len(want) else [max(want)] * len(g)
            worst = max(worst, max(abs(a - b) / max(abs(b), 1e-30) for a, b in zip(g, w)))
    return {"scales_match_sidecar": worst < 1e-3, "scales_max_rel_diff": worst}


def agreement(ref: list[list[int]], got: list[list[int]]) -> dict:
    equal = total = 0
    prefix_fracs, exact, first_div = [], 0, []
    for a, b in zip(ref, got):
        n = min(len(a), len(b))
        equal += sum(x == y for x, y in zip(a[:n], b[:n]))
        total += max(len(a), len(b))
        d = next((i for i in range(n) if a[i] != b[i]), n)
        first_div.append(d)
        prefix_fracs.append(d / max(len(a), 1))
        exact += int(a == b)
    return {
        "token_match_rate": round(equal / max(total, 1), 4),
        "prefix_match_rate": round(sum(prefix_fracs) / max(len(prefix_fracs), 1), 4),
        "seq_exact_match": round(exact / max(len(ref), 1), 4),
        "mean_first_divergence": round(sum(first_div) / max(len(first_div), 1), 1),
    }


# ----------------------------------------------------------------------------- synthetic study
def synthetic_study(seed: int = 0, tokens: int = 2048, kv_heads: int = 8, q_per_kv: int = 4, head_dim: int = 128,
                    n_queries: int = 16, n_outlier: int = 4, trials: int = 6, device: str = "cpu") -> list[dict]:  # fmt: skip
    """Relative L2 error of decode-style attention output (fp32) for each KV storage scheme.

    K, V, Q ~ N(0, 1); scenarios add 4 of 128 K channels x20 in every head (different channels
    per head), a spread of K/V magnitude across heads (x0.1 .. x10, query divided by the same
    factor so logits keep their distribution), or everything x50 (query /50: same logits, but
    |K| reaches ~4500, beyond fp8's 448 at scale 1.0). Static scales are calibrated (absmax) on
    an independent draw 4x larger from the same distribution (same outlier channels), as
    offline calibration would be; per-token-head schemes compute scales from the stored values
    (dynamic). ``+fp8-query`` rows also round the query to fp8 with q_scale 1.0, as vLLM's FA3
    fp8 path does without a checkpoint q_scale. Error = mean over query heads of
    ||out - ref|| / ||ref||, averaged over trials.
    """
    import torch

    try:
        from vllm_kvquant.kernels.reference import dequantize_ref, quantize_ref
    except ImportError:
        from kernels.reference import dequantize_ref, quantize_ref

    fp8 = torch.float8_e4m3fn
    spread = torch.logspace(-1, 1, kv_heads, device=device)  # x0.1 .. x10 per KV head
    scenarios = {
        "gaussian": dict(k_factor=1.0, head_spread=False, scale_all=1.0),
        "k-outlier-channels-x20": dict(k_factor=20.0, head_spread=False, scale_all=1.0),
        "k-outlier-x20+head-spread": dict(k_factor=20.0, head_spread=True, scale_all=1.0),
        "k-outlier-x20,all-x50": dict(k_factor=20.0, head_spread=False, scale_all=50.0),
    }

    def draw(g, n, channels, k_factor, head_spread, scale_all):
        k = torch.randn(n, kv_heads, head_dim, generator=g).to(device)
        mult = torch.ones(kv_heads, head_dim, device=device)
        mult[torch.arange(kv_heads)[:, None], channels] = k_factor
        k = k * mult * scale_all
        v = torch.randn(n, kv_heads, head_dim, generator=g).to(device) * scale_all
        if head_spread:
            k = k * spread[None, :, None]
            v = v * spread[None, :, None]
        return k, v

    def attend(q, k, v):  # q [nq, Hq, D], k/v [T, Hkv, D]
        k = k.repeat_interleave(q_per_kv, dim=1)
        v = v.repeat_interleave(q_per_kv, dim=1)
        p = torch.softmax(torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(head_dim), dim=-1)
        return torch.einsum("hqk,khd->qhd", p, v)

    def static(x, calib, dtype, per_head):
        amax = calib.abs().amax(dim=(0, 2)) if per_head else calib.abs().amax().reshape(1)
        scale = amax / (448.0 if dtype == "fp8_e4m3" else 127.0)
        return dequantize_ref(quantize_ref(x, scale, dtype), scale)

    def unit(x):
        one = torch.ones(1, device=device)
        return dequantize_ref(quantize_ref(x, one, "fp8_e4m3"), one)

    def per_token_head(x, dtype):
        qmax = 448.0 if dtype == "fp8" else 127.0
        s = (x.abs().amax(dim=-1, keepdim=True) / qmax).clamp(min=1e-12)
        y = (x / s).clamp(-qmax, qmax)
        y = y.to(fp8).float() if dtype == "fp8" else torch.round(y)
        return y * s

    schemes = {
        "kvquant-fp8-per_tensor": lambda k, v, ck, cv: (static(k, ck, "fp8_e4m3", False), static(v, cv, "fp8_e4m3", False), False),
        "kvquant-fp8-per_head": lambda k, v, ck, cv: (static(k, ck, "fp8_e4m3", True), static(v, cv, "fp8_e4m3", True), False),
        "kvquant-int8-per_tensor": lambda k, v, ck, cv: (static(k, ck, "int8", False), static(v, cv, "int8", False), False),
        "kvquant-int8-per_head": lambda k, v, ck, cv: (static(k, ck, "int8", True), static(v, cv, "int8", True), False),
        "vllm-fp8-scale1": lambda k, v, ck, cv: (unit(k), unit(v), False),
        "vllm-fp8-scale1+fp8-query": lambda k, v, ck, cv: (unit(k), unit(v), True),
        "vllm-fp8-calibrated+fp8-query": lambda k, v, ck, cv: (static(k, ck, "fp8_e4m3", False), static(v, cv, "fp8_e4m3", False), True),
        "vllm-int8_per_token_head": lambda k, v, ck, cv: (per_token_head(k, "int8"), per_token_head(v, "int8"), False),
        "vllm-fp8_per_token_head": lambda k, v, ck, cv: (per_token_head(k, "fp8"), per_token_head(v, "fp8"), False),
    }  # fmt: skip
    rows = []
    for scen, cfg in scenarios.items():
        errs: dict[str, list[float]] = {n: [] for n in schemes}
        kerr: dict[str, list[float]] = {n: [] for n in schemes}
        for t in range(trials):
            g = torch.Generator().manual_seed(seed * 1000 + t)
            channels = torch.stack([torch.randperm(head_dim, generator=g)[:n_outlier] for _ in range(kv_heads)]).to(device)
            k, v = draw(g, tokens, channels, **cfg)
            ck, cv = draw(g, 4 * tokens, channels, **cfg)  # calibration draw
            q = torch.randn(n_queries, kv_heads * q_per_kv, head_dim, generator=g).to(device) / cfg["scale_all"]
            if cfg["head_spread"]:
                q = q / spread.repeat_interleave(q_per_kv)[None, :, None]
            ref = attend(q, k, v)
            for name, fn in schemes.items():
                kq, vq, quant_q = fn(k, v, ck, cv)
                qq = q.to(fp8).float() if quant_q else q
                out = attend(qq, kq, vq)
                per_head = (out - ref).norm(dim=(0, 2)) / ref.norm(dim=(0, 2))
                errs[name].append(float(per_head.mean()))
                kerr[name].append(float(((kq - k).norm(dim=(0, 2)) / k.norm(dim=(0, 2))).mean()))
        for name in schemes:
            rows.append({
                "scenario": scen, "scheme": name,
                "attn_out_rel_l2": sum(errs[name]) / trials,
                "k_rel_l2": sum(kerr[name]) / trials,
            })  # fmt: skip
    return rows


# ----------------------------------------------------------------------------- main
def print_table(result: dict) -> None:
    print("\nconfig                            backend        KV cap(tok)  ppl       dppl%   tok-match prefix  seq-exact")
    for r in result["rows"]:
        if r.get("error"):
            print(f"{r['name']:<33} ERROR {r['error'][:110]}")
            continue
        def f(x, fmt):  # noqa: E306
            return format(x, fmt) if isinstance(x, (int, float)) else "-"
        print(
            f"{r['name']:<33} {str(r.get('backend')):<14} {f(r.get('kv_capacity_tokens'), '>11')}  "
            f"{f(r.get('perplexity'), '<9.4f')} {f(r.get('ppl_delta_pct'), '>+6.2f')}  "
            f"{f(r.get('token_match_rate'), '<9.3f')} {f(r.get('prefix_match_rate'), '<7.3f')} {f(r.get('seq_exact_match'), '<.3f')}"
        )
    if result.get("synthetic"):
        print("\nsynthetic: attention-output relative L2 error (fp32 reference)")
        scen = list(dict.fromkeys(r["scenario"] for r in result["synthetic"]))
        print(f"{'scheme':<32}" + "".join(f"{s[:28]:>30}" for s in scen))
        for scheme in dict.fromkeys(r["scheme"] for r in result["synthetic"]):
            vals = {r["scenario"]: r["attn_out_rel_l2"] for r in result["synthetic"] if r["scheme"] == scheme}
            print(f"{scheme:<32}" + "".join(f"{vals[s]:>30.2e}" for s in scen))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO / ".benchdata", help="folder from prepare_text.py")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/kvquant-accuracy"), help="model, sidecars (not in the repo)")
    ap.add_argument("--out", type=Path, default=None, help="results JSON (default benchmarks/results/accuracy-<device>.json)")
    ap.add_argument("--smoke", action="store_true",
                    help=f"tiny everything, for a CPU check (default --configs {SMOKE_CONFIGS} --calibrate-once)")
    ap.add_argument("--configs", default=None, help="comma-separated subset of: " + ",".join(CONFIGS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reuse-model", action="store_true", help="skip training if --workdir has a model")
    # model / training
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1536)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--max-model-len", type=int, default=1088, help="context of the model and the engines")
    ap.add_argument("--train-seq-len", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=1200, help="~10 epochs of the ~2 M-token train split")
    ap.add_argument("--train-minutes", type=float, default=None, help="also stop training after this long")
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--train-eval-windows", type=int, default=16)
    # calibration
    ap.add_argument("--calibrate-once", action="store_true", help="one CLI run (fp8 per_head), derive the other 3 sidecars")
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--calib-seq-len", type=int, default=1024)
    ap.add_argument("--calib-timeout", type=int, default=240)
    # evaluation
    ap.add_argument("--ppl-windows", type=int, default=32)
    ap.add_argument("--ppl-len", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=64, help="max_num_batched_tokens: prefill chunk size")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--gen-prompts", type=int, default=64)
    ap.add_argument("--gen-prompt-len", type=int, default=256)
    ap.add_argument("--gen-len", type=int, default=128)
    ap.add_argument("--gpu-memory-utilization", type=float, default=None, help="default 0.25 (GPU) / 0.3 (CPU)")
    ap.add_argument("--no-eager", dest="eager", action="store_false", help="let vLLM compile / capture CUDA graphs")
    ap.add_argument("--time-budget", type=float, default=480.0, help="seconds; configs that would end past it are skipped")
    ap.add_argument("--skip-synthetic", action="store_true")
    args = ap.parse_args(argv)
    if args.smoke:
        args.vocab_size, args.hidden, args.intermediate, args.layers = 512, 128, 256, 2
        args.heads, args.kv_heads, args.head_dim = 2, 1, 64
        args.max_model_len, args.train_seq_len, args.batch_size, args.steps = 320, 128, 4, 20
        args.log_every, args.train_eval_windows = 5, 4
        args.calib_samples, args.calib_seq_len = 4, 128
        args.ppl_windows, args.ppl_len, args.chunk, args.max_num_seqs = 3, 256, 64, 16
        args.gen_prompts, args.gen_prompt_len, args.gen_len = 4, 64, 16
        args.workdir = args.workdir.with_name(args.workdir.name + "-smoke")
        args.time_budget = 1e9
        if args.configs is None:  # a few minutes on a CPU; pass --configs for more
            args.configs = SMOKE_CONFIGS
            args.calibrate_once = True
    args.workdir = args.workdir.resolve()
    return args


def main(argv=None) -> int:
    t_start = time.time()
    args = parse_args(argv)
    import torch

    from common import device_info, versions
    from harness import OutputTee, device_slug, expose_benchmarks_dir, root_cause, write_result

    expose_benchmarks_dir()

    if args.gpu_memory_utilization is None:
        args.gpu_memory_utilization = 0.25 if torch.cuda.is_available() else 0.3
    slug = device_slug()
    out_path = args.out or REPO / "benchmarks" / "results" / f"accuracy-{slug}{'-smoke' if args.smoke else ''}.json"
    names = [n.strip() for n in args.configs.split(",")] if args.configs else list(CONFIGS)
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown config(s) {unknown}; known: {list(CONFIGS)}")
    if "bf16" not in names:
        names.insert(0, "bf16")  # the reference for deltas and agreement
    result: dict = {
        "device": device_info(),
        "versions": versions(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "method": {
            "perplexity": (
                f"held-out windows of {args.ppl_len} tokens, prompt_logprobs=0 with chunked prefill "
                f"(max_num_batched_tokens={args.chunk}, prefix caching off): tokens after a window's first "
                f"chunk attend to earlier tokens through the (quantized) KV cache; the kvquant backend "
                f"attends to the current chunk's own K/V unquantized, vLLM's FA3 fp8 reads them from the "
                f"fp8 cache and also rounds the query to fp8"
            ),
            "agreement": (
                f"{args.gen_prompts} held-out prompts of {args.gen_prompt_len} tokens, {args.gen_len} greedy "
                f"tokens (ignore_eos); token_match_rate = fraction of positions equal to bf16, "
                f"prefix_match_rate = mean fraction before the first divergence, seq_exact_match = "
                f"fraction of identical sequences"
            ),
        },
        "rows": [],
    }
    data_dir = args.data.resolve()
    if (data_dir / "manifest.json").exists():
        result["data"] = json.loads((data_dir / "manifest.json").read_text())
    write_result(out_path, result)

    # ---- data + tokenizer
    args.workdir.mkdir(parents=True, exist_ok=True)
    model_dir = args.workdir / "model"
    train_texts = read_jsonl(data_dir / "train.jsonl")
    heldout_texts = read_jsonl(data_dir / "heldout.jsonl")
    calib_path = data_dir / "calib.jsonl"
    if args.smoke:  # a slice of the text keeps tokenizer training and tokenizing quick
        train_texts = [t[:20000] for t in train_texts]
    reuse = args.reuse_model and (model_dir / "config.json").exists()
    t0 = time.time()
    if reuse:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    else:
        tokenizer = train_tokenizer(train_texts, args.vocab_size)
    heldout_ids = encode_stream(tokenizer, heldout_texts)
    ppl_windows = windows(heldout_ids, args.ppl_len, args.ppl_windows)
    gen_prompts = windows(heldout_ids, args.gen_prompt_len, args.gen_prompts, offset=args.gen_prompt_len // 2)
    log(f"tokenizer + held-out: {len(heldout_ids)} held-out tokens, {time.time() - t0:.1f} s")

    # ---- train
    if reuse:
        log(f"reusing {model_dir}")
        result["training"] = {"reused": str(model_dir)}
    else:
        t0 = time.time()
        train_ids = encode_stream(tokenizer, train_texts)
        log(f"tokenized train split: {len(train_ids)} tokens in {time.time() - t0:.1f} s")
        result["training"] = train_model(args, tokenizer, train_ids, ppl_windows, model_dir)
        del train_ids
    try:
        result["training"]["hf_bf16_heldout_ppl"] = round(hf_reference_ppl(model_dir, ppl_windows), 4)
    except Exception as e:  # noqa: BLE001
        result["training"]["hf_bf16_heldout_ppl_error"] = f"{type(e).__name__}: {e}"
    write_result(out_path, result)

    # ---- calibrate
    needed = {(CONFIGS[n]["kv_dtype"], CONFIGS[n]["granularity"]) for n in names if CONFIGS[n].get("kvquant")}
    if any(CONFIGS[n]["model"].startswith("vllm-fp8") for n in names):
        needed.add(("fp8_e4m3", "per_tensor"))
        if "vllm-fp8-calibrated-per_head" in names:
            needed.add(("fp8_e4m3", "per_head"))
    calib: dict[tuple, dict] = {}
    t0 = time.time()
    if args.calibrate_once and needed:
        first = run_cli_calibration(args, model_dir, calib_path, "fp8_e4m3", "per_head")
        calib[("fp8_e4m3", "per_head")] = first
        for d, g in sorted(needed - {("fp8_e4m3", "per_head")}):
            if "error" in first:
                calib[(d, g)] = {"dtype": d, "granularity": g, "error": "fp8 per_head calibration failed"}
                continue
            try:
                calib[(d, g)] = derive_sidecar(Path(first["path"]), d, g, sidecar_path(args.workdir, d, g))
            except Exception as e:  # noqa: BLE001
                calib[(d, g)] = {"dtype": d, "granularity": g, "error": f"{type(e).__name__}: {e}"}
    else:
        for d, g in sorted(needed):
            calib[(d, g)] = run_cli_calibration(args, model_dir, calib_path, d, g)
    result["calibration"] = {"seconds": round(time.time() - t0, 1), "sidecars": list(calib.values())}
    write_result(out_path, result)

    # ---- vLLM fp8 checkpoints with k/v scales
    models: dict[str, Path | Exception] = {"base": model_dir}
    for key, per_head in (("vllm-fp8-per_tensor", False), ("vllm-fp8-per_head", True)):
        if not any(CONFIGS[n]["model"] == key for n in names):
            continue
        src = calib.get(("fp8_e4m3", "per_head" if per_head else "per_tensor"), {})
        try:
            if "error" in src or not src:
                raise RuntimeError(f"no fp8 sidecar: {src.get('error', 'not calibrated')[-300:]}")
            models[key] = make_vllm_fp8_checkpoint(model_dir, Path(src["path"]), args.workdir / f"model-{key}", per_head)
        except Exception as e:  # noqa: BLE001
            models[key] = e

    # ---- evaluate
    ref_gen: list[list[int]] | None = None
    ref_ppl: float | None = None
    per_config_s: list[float] = []
    for name in names:
        spec = CONFIGS[name]
        row: dict = {"name": name, "kv_dtype": spec["kv_dtype"], "granularity": spec["granularity"]}
        elapsed = time.time() - t_start
        estimate = max(per_config_s) if per_config_s else 30.0
        if elapsed + estimate > args.time_budget:
            row["error"] = f"skipped: time budget ({elapsed:.0f} s used of --time-budget {args.time_budget:.0f} s)"
            result["rows"].append(row)
            write_result(out_path, result)
            continue
        t0 = time.time()
        try:
            model = models[spec["model"]]
            if isinstance(model, Exception):
                raise model
            sidecar = None
            if spec.get("kvquant"):
                c = calib.get((spec["kv_dtype"], spec["granularity"]), {})
                if "error" in c or not c:
                    raise RuntimeError(f"calibration failed: {c.get('error', 'missing')[-300:]}")
                sidecar = Path(c["path"])
                row["scales"] = c.get("how")
            kw = engine_kwargs(args, model, spec, sidecar)
            row["engine_kwargs"] = {k: v for k, v in kw.items() if k in ("attention_backend", "kv_cache_dtype", "additional_config")}
            if spec["model"] != "base":
                row["engine_kwargs"]["model"] = str(model)
            log(f"=== {name}: LLM({', '.join(f'{k}={v!r}' for k, v in row['engine_kwargs'].items())})")
            tee = OutputTee()
            try:
                with tee:
                    res = run_vllm(args, kw, ppl_windows, gen_prompts)
            except Exception as e:
                cause = root_cause(tee.text())
                if cause and cause not in str(e):
                    raise EngineError(f"{cause} [{type(e).__name__}: {e}]") from e
                raise
            gens = res.pop("generations")
            layer_scales = res.pop("layer_scales", None) or {}
            row.update(res)
            if layer_scales:
                first = layer_scales[sorted(layer_scales, key=_layer_key)[0]]
                row["layer0_scales"] = {k: v for k, v in first.items() if k in ("q_scale_float", "k_scale", "v_scale", "scales_source")}
                check = sidecar or (calib.get(("fp8_e4m3", "per_head" if "per_head" in spec["model"] else "per_tensor"), {}).get("path")
                                    if spec["model"] != "base" else None)  # fmt: skip
                if check:
                    row.update(compare_scales(layer_scales, Path(check)))
            if name == "bf16":
                ref_gen, ref_ppl = gens, res["perplexity"]
            if ref_ppl:
                row["ppl_delta_pct"] = round(100.0 * (res["perplexity"] / ref_ppl - 1.0), 3)
            if ref_gen is not None:
                row.update(agreement(ref_gen, gens))
            row["perplexity"] = round(row["perplexity"], 4)
        except Exception as e:  # noqa: BLE001
            row["error"] = (str(e) if isinstance(e, EngineError) else f"{type(e).__name__}: {e}")[:4000]
            log(f"{name} failed:\n{traceback.format_exc()[-3000:]}")
        row["seconds"] = round(time.time() - t0, 1)
        per_config_s.append(row["seconds"])
        result["rows"].append(row)
        write_result(out_path, result)
        log(f"{name}: {json.dumps({k: v for k, v in row.items() if k != 'engine_kwargs'})[:600]}")

    # ---- synthetic
    if not args.skip_synthetic:
        t0 = time.time()
        try:
            dev = "cuda" if torch.cuda.is_available() else "cpu"
            result["synthetic"] = synthetic_study(seed=args.seed, tokens=512 if args.smoke else 2048,
                                                  trials=2 if args.smoke else 6, device=dev)  # fmt: skip
            result["synthetic_method"] = synthetic_study.__doc__.strip().replace("\n    ", " ")
        except Exception as e:  # noqa: BLE001
            result["synthetic_error"] = f"{type(e).__name__}: {e}"
        log(f"synthetic study: {time.time() - t0:.1f} s")
    result["total_seconds"] = round(time.time() - t_start, 1)
    write_result(out_path, result)
    print_table(result)
    print(f"\nwrote {out_path} ({result['total_seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
