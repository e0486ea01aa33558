"""Accuracy of 8-bit KV caches: teacher-forced KL to BF16 on a small Llama (plain and with outlier channels)
and on SmolLM2-135M-Instruct (real weights).

One run, every stage timed (``--time-budget`` bounds it; ``--smoke`` shrinks everything for a CPU);
``--models`` picks among ``outlier``, ``plain`` (the small Llama) and ``smollm2`` (default all three):

1. data: ``.benchdata/{train,calib,heldout}.jsonl[.gz]`` from ``python -m benchmarks.prepare_text``
   (Shakespeare + Austen, public domain, split per document 90/5/5); byte-level BPE trained here.
   Every model is evaluated on windows of the same held-out text in its own tokenizer (the small
   models share one; SmolLM2's windows file is its own) and calibrated on the same calibration text.
   The train split is read only for the small models.
2. train: an 8-layer Llama (hidden 512, 8 query / 2 KV heads of 64), seeded (``train``).
3. outlier: a copy computing the same function with a few K channels x8..32 (both channels of a
   RoPE pair, queries /alpha) and some V channels x4..8 (o_proj /beta) (``outliers``);
   checked with transformers (perplexity) and in vLLM (BF16 hidden states of both models).
   SmolLM2 (30 layers, 9 query / 3 KV heads of 64, tied embeddings; ``vllm_kvquant.fetch_model``,
   ``--smollm2-dir``) is neither trained nor transformed (stage smollm2: fetch, windows, transformers perplexity).
4. engines, side by side (``runner``, task graph in ``tasks``): per model ``vllm-kvquant calibrate``
   fp8 per_head (the other per_head / per_tensor sidecars derive exactly) and int8 per_channel (the
   fp8 per_channel sidecar derives exactly), each only where a chosen scheme needs it, and one engine
   per scheme (``schemes``), each running the same held-out windows once: a prompt prefilled in
   ``--chunk``-token chunks (prefix caching off: later chunks read their context from the 8-bit
   cache), then ``--decode-len`` teacher-forced single-token decode steps. Every token's final
   hidden state is recorded (``worker``).
5. metrics (``metrics``): the LM head applied to those hidden states gives each scheme's
   full next-token distributions; KL to the same model's BF16 (FLASH_ATTN) run (mean, p99),
   top-1 agreement, perplexity; BF16 on TRITON_ATTN is the noise floor.

Writes ``benchmarks/results/accuracy-<device>.json`` (+ a copy in ``$OUT``) and, where matplotlib is
installed, ``accuracy-<device>.png``. GPU: ``python -m benchmarks.accuracy.run`` (bounded by ``--time-budget``, 390 s);
CPU: ``python -m benchmarks.accuracy.run --smoke`` (small models) or
``python -m benchmarks.accuracy.run --smoke --models smollm2 --schemes bf16,kvquant-int8-per_channel,kvquant-fp8-per_channel``
(only the calib and heldout splits needed; tests/test_accuracy_smollm2_smoke.py). The modules named above are this folder's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from benchmarks.accuracy.data import encode_stream, eval_windows, read_jsonl, split_path, train_tokenizer, write_plain_jsonl
from benchmarks.accuracy.outliers import OutlierSettings
from benchmarks.accuracy.runner import Runner
from benchmarks.accuracy.schemes import DEFAULT_MODELS, TINY_MODELS, EngineSettings, select, select_models
from benchmarks.accuracy.tasks import ModelInput, build_tasks
from benchmarks.accuracy.train import ModelShape, TrainSettings

REPO = Path(__file__).resolve().parents[2]

SMOKE_SCHEMES = "bf16,kvquant-int8-per_head,kvquant-int8-online"
#: ``--smoke``: a 2-layer model trained for 30 steps, 2 windows of 128 + 8 tokens, no time budget; only the
#: small models unless ``--models`` names smollm2 (a real 135M model: minutes per engine on a small CPU).
SMOKE_DEFAULTS = dict(
    vocab_size=512, hidden=128, intermediate=256, layers=2, heads=2, kv_heads=1, head_dim=64, max_model_len=320,
    steps=30, train_seq_len=128, batch_size=8, calib_samples=4, calib_seq_len=128,
    windows=2, prompt_len=128, decode_len=8, chunk=64, time_budget=1e9, models="outlier,plain", schemes=SMOKE_SCHEMES,
)  # fmt: skip
LOGITS_PROCESSOR = "benchmarks.accuracy.worker:ForcedTokens"


def log(*a) -> None:
    print("[accuracy]", *a, flush=True)


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a = ap.add_argument
    a("--data", type=Path, default=REPO / ".benchdata", help="folder from benchmarks.prepare_text")
    a("--workdir", type=Path, default=Path("/tmp/kvquant-accuracy"), help="models, sidecars, captures (not the repo)")
    a("--out", type=Path, default=None, help="results JSON (default benchmarks/results/accuracy-<device>.json)")
    a("--smoke", action="store_true", help=f"tiny model and data for a CPU run (defaults --models outlier,plain --schemes {SMOKE_SCHEMES}, "
      "2 windows of 128+8 tokens; explicit flags override)")
    a("--schemes", default=None, help="comma list (default: every default scheme), see benchmarks/accuracy/schemes.py")
    a("--models", default=DEFAULT_MODELS, help="which models, in priority order: outlier, plain (the small Llama "
      "trained here), smollm2 (SmolLM2-135M-Instruct)")
    a("--smollm2-dir", type=Path, default=None, help="SmolLM2 checkpoint made by vllm-kvquant fetch-model "
      "(default: its cache folder; fetched there if absent)")
    a("--seed", type=int, default=0)
    a("--reuse-model", action="store_true", help="reuse --workdir's trained model and tokenizer")
    g = ap.add_argument_group("model and training")
    for f in ModelShape.__dataclass_fields__.values():
        g.add_argument(f"--{f.name.replace('_', '-')}", type=int, default=f.default)
    g.add_argument("--steps", type=int, default=TrainSettings.steps)
    g.add_argument("--train-seq-len", type=int, default=TrainSettings.seq_len)
    g.add_argument("--batch-size", type=int, default=TrainSettings.batch_size)
    g.add_argument("--lr", type=float, default=TrainSettings.lr)
    g.add_argument("--train-minutes", type=float, default=None, help="also stop training after this long")
    g = ap.add_argument_group("outlier model")
    d = OutlierSettings()
    g.add_argument("--k-alphas", default=",".join(map(str, d.k_alphas)), help="K outlier factors (one drawn per KV head)")
    g.add_argument("--k-pairs", default=",".join(map(str, d.k_pairs)), help="RoPE pairs per KV head (one drawn per head)")
    g.add_argument("--v-betas", default=",".join(map(str, d.v_betas)), help="V outlier factors")
    g.add_argument("--v-head-fraction", type=float, default=d.v_head_fraction)
    g = ap.add_argument_group("calibration and evaluation")
    g.add_argument("--calib-samples", type=int, default=64)
    g.add_argument("--calib-seq-len", type=int, default=1024)
    g.add_argument("--windows", type=int, default=20, help="held-out sequences per scheme")
    g.add_argument("--prompt-len", type=int, default=768, help="tokens prefilled per sequence (in --chunk chunks)")
    g.add_argument("--decode-len", type=int, default=64, help="teacher-forced decode tokens per sequence (0: "
                   "prefill only, no custom logits processor)")
    g.add_argument("--chunk", type=int, default=64, help="max_num_batched_tokens: the prefill chunk")
    g = ap.add_argument_group("engines")
    g.add_argument("--parallel", type=int, default=None, help="engines at once (default on CUDA: min(8, CPU cores / 2); on CPU: 1)")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.05)
    g.add_argument("--kv-cache-mib", type=int, default=256, help="kv_cache_memory_bytes of every engine, MiB")
    g.add_argument("--task-timeout", type=float, default=240.0, help="seconds before an engine process is killed")
    g.add_argument("--engine-multiprocessing", action="store_true", help="vLLM's engine core in its own process "
                   "(default: in-process, VLLM_ENABLE_V1_MULTIPROCESSING=0: one process per engine, faster start)")
    g.add_argument("--time-budget", type=float, default=390.0, help="seconds for the whole run; engines that "
                   "would end past it are not started")  # fmt: skip
    g.add_argument("--skip-synthetic", action="store_true")
    g.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    if args.smoke:  # smaller defaults; flags given explicitly still win
        ap.set_defaults(**SMOKE_DEFAULTS)
        args = ap.parse_args(argv)
        args.workdir = args.workdir.with_name(args.workdir.name + "-smoke")
    args.workdir = args.workdir.resolve()
    try:
        select(args.schemes), select_models(args.models)
    except ValueError as e:
        ap.error(str(e))
    if args.prompt_len + args.decode_len > args.max_model_len:
        ap.error(f"--prompt-len + --decode-len ({args.prompt_len + args.decode_len}) exceed --max-model-len {args.max_model_len}")
    return args


class Stages:
    """Wall time per stage, printed as it goes and recorded in the results."""

    def __init__(self) -> None:
        self.t0 = time.time()
        self.seconds: dict[str, float] = {}
        self._name, self._start = None, None

    def start(self, name: str) -> None:
        self.end()
        self._name, self._start = name, time.time()
        log(f"--- stage {name} (at {time.time() - self.t0:.0f} s)")

    def end(self) -> None:
        if self._name:
            self.seconds[self._name] = round(time.time() - self._start, 1)
            log(f"--- stage {self._name}: {self.seconds[self._name]} s")
        self._name = None


def child_env(args, cuda: bool) -> dict[str, str]:
    from benchmarks.harness import expose_benchmarks

    expose_benchmarks()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if not args.engine_multiprocessing:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if cuda:
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 8) // max(1, args.parallel))))
    return env


def main(argv=None) -> int:
    args = parse_args(argv)
    stages = Stages()
    import torch

    from benchmarks.common import device_info, versions
    from benchmarks.harness import command, device_slug, write_result

    cuda = torch.cuda.is_available()
    args.parallel = args.parallel or (max(1, min(8, (os.cpu_count() or 2) // 2)) if cuda else 1)
    schemes = select(args.schemes)
    models = select_models(args.models)
    slug = device_slug()
    out_path = args.out or REPO / "benchmarks" / "results" / f"accuracy-{slug}{'-smoke' if args.smoke else ''}.json"
    w = args.workdir
    paths = {k: w / k for k in ("models", "sidecars", "runs", "logs")}
    for p in paths.values():
        p.mkdir(parents=True, exist_ok=True)
    paths.update(windows=w / "eval_windows.json", calib=w / "calib.jsonl")
    result: dict = {
        "device": device_info(),
        "versions": versions(),
        "command": command("benchmarks.accuracy.run", argv),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "method": {
            "sequences": f"{args.windows} held-out sequences: {args.prompt_len} prompt tokens prefilled in chunks of "
                         f"{args.chunk} (prefix caching off, one request at a time: every chunk after the first reads "
                         f"its context from the KV cache), then {args.decode_len} teacher-forced decode steps "
                         "(a logits processor forces the held-out token; each step reads only the cache)",
            "metrics": "every token's final hidden state is recorded in the worker; the LM head (F.linear, bf16) gives "
                       "the logits, log_softmax in float64 the distribution. kl = KL(P_bf16 || P_scheme) per predicted "
                       "token against the same model's bf16 row (mean, p99); top1 = argmax agreement; ppl = "
                       "exp(mean NLL of the actual next token). 'decode' = the same over decode-step tokens only. "
                       "ppl_prompt vs ppl_prompt_vllm, logprob_vs_vllm_*: this benchmark's logprobs of the prompt tokens "
                       "against vLLM's own prompt_logprobs (a check of the hidden-state route)",
            "noise_floor": "bf16-triton: the same BF16 cache read by TRITON_ATTN instead of FLASH_ATTN",
            "models": "plain: the small Llama trained here; outlier: its copy with outlier K/V channels (same "
                      "function); smollm2: SmolLM2-135M-Instruct (real weights). Each model's windows are the same "
                      "held-out text in its own tokenizer (plain and outlier share theirs)",
        },
        "rows": [],
    }  # fmt: skip
    data_dir = args.data.resolve()
    if (data_dir / "manifest.json").exists():
        result["data"] = json.loads((data_dir / "manifest.json").read_text())

    stages.start("data")
    tiny = [m for m in models if m in TINY_MODELS]
    heldout_texts = read_jsonl(split_path(data_dir, "heldout"))
    calib_texts = read_jsonl(split_path(data_dir, "calib"))
    if args.smoke:  # a slice keeps calibration quick
        calib_texts = [t[:4000] for t in calib_texts]
    write_plain_jsonl(calib_texts, paths["calib"])
    inputs: dict[str, ModelInput] = {}
    evals: dict[str, tuple[list[list[int]], list[list[int]]]] = {}
    if tiny:
        model_dirs, prompts, forced = tiny_models(args, result, stages, heldout_texts, paths, out_path)
        for m in tiny:
            inputs[m], evals[m] = ModelInput(model_dirs[m], paths["windows"]), (prompts, forced)
    if "smollm2" in models:
        stages.start("smollm2")
        inputs["smollm2"], evals["smollm2"], result["smollm2"] = prepare_smollm2(args, heldout_texts, w)
        write_result(out_path, result)

    stages.start("engines")
    engine_settings = EngineSettings(max_model_len=args.max_model_len, chunk=args.chunk, seed=args.seed,
                                     gpu_memory_utilization=args.gpu_memory_utilization,
                                     kv_cache_memory_bytes=args.kv_cache_mib * 2**20, cuda=cuda,
                                     logits_processor=LOGITS_PROCESSOR if args.decode_len else None)  # fmt: skip
    tasks, calib_info = build_tasks(args, schemes, models, inputs, paths, engine_settings, sys.executable)
    result["calibration"] = calib_info
    runner = Runner(parallel=args.parallel, time_budget=args.time_budget, t0=stages.t0, env=child_env(args, cuda))
    done = runner.run(tasks)
    result["tasks"] = {k: {"ok": r.ok, "seconds": round(r.seconds, 1), "started_at": round(r.started_at or 0, 1),
                           **({"error": r.error} if r.error else {})} for k, r in done.items()}  # fmt: skip
    write_result(out_path, result)

    stages.start("metrics")
    from benchmarks.accuracy.report import build_rows

    model_dirs = {m: inputs[m].model_dir for m in models}
    result["rows"], result["bf16_transform_check"] = build_rows(schemes, models, model_dirs, paths, done, evals,
                                                                "cuda" if cuda else "cpu")  # fmt: skip
    write_result(out_path, result)
    if not args.skip_synthetic:
        stages.start("synthetic")
        from benchmarks.accuracy.synthetic import synthetic_study

        try:
            result["synthetic"] = synthetic_study(seed=args.seed, tokens=512 if args.smoke else 2048,
                                                  trials=2 if args.smoke else 6, device="cuda" if cuda else "cpu")  # fmt: skip
            result["synthetic_method"] = " ".join(synthetic_study.__doc__.split())
        except Exception as e:  # noqa: BLE001
            result["synthetic_error"] = f"{type(e).__name__}: {e}"
    stages.end()
    result["stage_seconds"] = stages.seconds
    result["total_seconds"] = round(time.time() - stages.t0, 1)
    write_result(out_path, result)
    if not args.no_plot:
        result["plots"] = _plot(out_path)
        write_result(out_path, result)
    from benchmarks.accuracy.report import print_table

    print_table(result["rows"])
    print("\nstage seconds:", json.dumps(stages.seconds), f"total {result['total_seconds']} s")
    print(f"wrote {out_path}")
    return 0


def tiny_models(args, result: dict, stages: Stages, heldout_texts: list[str], paths: dict,
                out_path: Path) -> tuple[dict[str, Path], list[list[int]], list[list[int]]]:  # fmt: skip
    """Tokenizer, windows (``paths["windows"]``), training and the outlier copy of the small Llama:
    ``(model dirs, prompts, forced decode tokens)``."""
    from benchmarks.accuracy.outliers import channel_stats, make_outlier_checkpoint
    from benchmarks.accuracy.train import hf_perplexity, train_model
    from benchmarks.harness import write_result

    shape = ModelShape(**{f: getattr(args, f) for f in ModelShape.__dataclass_fields__})
    plain_dir = paths["models"] / "plain"
    reuse = args.reuse_model and (plain_dir / "config.json").exists()
    train_texts = read_jsonl(split_path(args.data.resolve(), "train"))
    if args.smoke:  # a slice keeps tokenizer training and tokenizing quick
        train_texts = [t[:20000] for t in train_texts]
    if reuse:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(plain_dir)
    else:
        tokenizer = train_tokenizer(train_texts, shape.vocab_size)
    seqs, prompts, forced = eval_windows(tokenizer, heldout_texts, args.prompt_len, args.decode_len, args.windows,
                                         paths["windows"])  # fmt: skip
    log(f"small models: {len(seqs)} sequences of {args.prompt_len}+{args.decode_len}")

    stages.start("train")
    if reuse:
        result["training"] = {"reused": str(plain_dir)}
    else:
        train_ids = encode_stream(tokenizer, train_texts)
        tcfg = TrainSettings(steps=args.steps, seq_len=args.train_seq_len, batch_size=args.batch_size, lr=args.lr,
                             log_every=max(1, min(50, args.steps // 4)), train_minutes=args.train_minutes,
                             seed=args.seed)  # fmt: skip
        result["training"] = train_model(shape, tcfg, tokenizer, train_ids, seqs, plain_dir)
        del train_ids
    write_result(out_path, result)

    stages.start("outlier")
    osettings = OutlierSettings(k_alphas=_floats(args.k_alphas), k_pairs=tuple(int(x) for x in _floats(args.k_pairs)),
                                v_betas=_floats(args.v_betas), v_head_fraction=args.v_head_fraction, seed=args.seed)  # fmt: skip
    outlier_dir = paths["models"] / "outlier"
    result["outlier"] = make_outlier_checkpoint(plain_dir, outlier_dir, osettings)
    model_dirs = {"plain": plain_dir, "outlier": outlier_dir}
    check = seqs[: min(8, len(seqs))]
    result["outlier"]["hf_bf16_ppl"] = {m: round(hf_perplexity(model_dirs[m], check), 4) for m in TINY_MODELS}
    result["outlier"]["channel_absmax_max_over_median"] = {m: channel_stats(model_dirs[m], check[:4]) for m in TINY_MODELS}
    write_result(out_path, result)
    return model_dirs, prompts, forced


def prepare_smollm2(args, heldout_texts: list[str], workdir: Path) -> tuple[ModelInput, tuple[list, list], dict]:
    """SmolLM2's checkpoint (fetched once into its cache folder) and its windows of the held-out text in
    its own tokenizer. A model that cannot be had fails its rows with the reason, not the whole run."""
    from transformers import AutoTokenizer

    from benchmarks.accuracy.train import hf_perplexity
    from vllm_kvquant.fetch_model import MARKER, default_model_dir, fetch_model

    try:
        mdir = fetch_model("smollm2", args.smollm2_dir or default_model_dir("smollm2"))
    except Exception as e:  # noqa: BLE001 - offline machines: the other models still run
        err = f"{type(e).__name__}: {e}"
        log(f"smollm2 unavailable: {err}")
        return ModelInput(None, None, err), ([], []), {"error": err}
    tokenizer = AutoTokenizer.from_pretrained(mdir)
    path = workdir / "eval_windows-smollm2.json"
    seqs, prompts, forced = eval_windows(tokenizer, heldout_texts, args.prompt_len, args.decode_len, args.windows, path)
    log(f"smollm2: {len(seqs)} sequences of {args.prompt_len}+{args.decode_len} ({mdir})")
    info = {"model_dir": str(mdir), "windows": len(seqs),
            "hf_bf16_ppl": round(hf_perplexity(mdir, seqs[: min(8, len(seqs))]), 4)}  # fmt: skip
    if (mdir / MARKER).exists():
        info["source"] = json.loads((mdir / MARKER).read_text())
    return ModelInput(mdir, path), (prompts, forced), info


def _plot(out_path: Path) -> list[str] | str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from benchmarks import plots

        written = [str(p) for p in plots.plot_accuracy(out_path, out_path.parent, plt)]
        for p in written:
            if os.environ.get("OUT"):
                Path(os.environ["OUT"], Path(p).name).write_bytes(Path(p).read_bytes())
        return written
    except Exception as e:  # noqa: BLE001 - the JSON is the result; the plot can be made later
        return f"no plot ({type(e).__name__}: {e}); run python -m benchmarks.plots where matplotlib is installed"


if __name__ == "__main__":
    sys.exit(main())
