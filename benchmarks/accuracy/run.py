"""Accuracy of 8-bit KV caches: teacher-forced KL to BF16 on a small Llama, plain and with outlier channels.

One run, every stage timed (``--time-budget`` bounds it; ``--smoke`` shrinks everything for a CPU):

1. data: ``.benchdata/{train,calib,heldout}.jsonl[.gz]`` from ``python -m benchmarks.prepare_text``
   (Shakespeare + Austen, public domain, split per document 90/5/5); byte-level BPE trained here.
2. train: an 8-layer Llama (hidden 512, 8 query / 2 KV heads of 64), seeded (``train``).
3. outlier: a copy computing the same function with a few K channels x8..32 (both channels of a
   RoPE pair, queries /alpha) and some V channels x4..8 (o_proj /beta) (``outliers``);
   checked with transformers (perplexity) and in vLLM (BF16 hidden states of both models).
4. engines, side by side (``runner``): per model one ``vllm-kvquant calibrate`` (fp8
   per_head, on the calibration split; the other sidecars derive exactly) and one engine per scheme
   (``schemes``), each running the same held-out windows once: a prompt prefilled in
   ``--chunk``-token chunks (prefix caching off: later chunks read their context from the 8-bit
   cache), then ``--decode-len`` teacher-forced single-token decode steps. Every token's final
   hidden state is recorded (``worker``).
5. metrics (``metrics``): the LM head applied to those hidden states gives each scheme's
   full next-token distributions; KL to the same model's BF16 (FLASH_ATTN) run (mean, p99),
   top-1 agreement, perplexity; BF16 on TRITON_ATTN is the noise floor.

Writes ``benchmarks/results/accuracy-<device>.json`` (+ a copy in ``$OUT``) and, where matplotlib is
installed, ``accuracy-<device>.png``. GPU: ``python -m benchmarks.accuracy.run`` (bounded by ``--time-budget``, 390 s);
CPU: ``python -m benchmarks.accuracy.run --smoke``. The modules named above are this folder's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

from benchmarks.accuracy.data import encode_stream, read_jsonl, split_path, train_tokenizer, windows, write_plain_jsonl
from benchmarks.accuracy.outliers import OutlierSettings
from benchmarks.accuracy.runner import Runner, Task
from benchmarks.accuracy.schemes import MODELS, REFERENCE, EngineSettings, engine_kwargs, select, select_models
from benchmarks.accuracy.train import ModelShape, TrainSettings

REPO = Path(__file__).resolve().parents[2]

SMOKE_SCHEMES = "bf16,kvquant-int8-per_head,kvquant-int8-online"
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
    a("--smoke", action="store_true", help=f"tiny model and data for a CPU run (default --schemes {SMOKE_SCHEMES})")
    a("--schemes", default=None, help="comma list (default: every default scheme), see benchmarks/accuracy/schemes.py")
    a("--models", default="outlier,plain", help="which models, in priority order")
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
    if args.smoke:
        args.vocab_size, args.hidden, args.intermediate, args.layers = 512, 128, 256, 2
        args.heads, args.kv_heads, args.head_dim, args.max_model_len = 2, 1, 64, 320
        args.steps, args.train_seq_len, args.batch_size = 30, 128, 8
        args.calib_samples, args.calib_seq_len = 4, 128
        args.windows, args.prompt_len, args.decode_len, args.chunk = 2, 128, 8, 64
        args.workdir = args.workdir.with_name(args.workdir.name + "-smoke")
        if args.time_budget == 390.0:
            args.time_budget = 1e9
        args.schemes = args.schemes or SMOKE_SCHEMES
    args.workdir = args.workdir.resolve()
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


def _calibrate_supports_kv_bytes() -> bool:
    from vllm_kvquant.cli import build_parser

    try:
        build_parser().parse_args(["calibrate", "m", "--data", "d", "--kv-cache-memory-bytes", "1"])
        return True
    except SystemExit:
        return False


def build_tasks(args, schemes, models, model_dirs, paths, engine_settings, python) -> tuple[list[Task], dict]:
    """Calibration (per model), derived sidecars and vLLM-fp8 checkpoints (local), one engine per scheme."""
    from benchmarks.accuracy.checkpoints import derive_sidecar, make_vllm_fp8_checkpoint

    tasks: list[Task] = []
    info: dict = {}
    kv_bytes = _calibrate_supports_kv_bytes()
    needs_calib = any(s.sidecar or s.checkpoint for s in schemes)
    for mi, model in enumerate(models):
        mdir = model_dirs[model]

        def sidecar(d: str, g: str, model=model) -> Path:
            return paths["sidecars"] / f"{model}-{d}-{g}.json"

        if needs_calib:
            cmd = [python, "-P", "-m", "vllm_kvquant.cli", "calibrate", str(mdir), "--data", str(paths["calib"]),
                   "--granularity", "per_head", "--dtype", "fp8_e4m3", "--out", str(sidecar("fp8_e4m3", "per_head")),
                   "--num-samples", str(args.calib_samples), "--seq-len", str(args.calib_seq_len),
                   "--model-dtype", "bfloat16", "--gpu-memory-utilization", str(args.gpu_memory_utilization),
                   "--seed", str(args.seed)]  # fmt: skip
            if kv_bytes:
                cmd += ["--kv-cache-memory-bytes", str(engine_settings.kv_cache_memory_bytes)]
            info[model] = {"command": " ".join(cmd[2:]), "kv_cache_memory_bytes": kv_bytes}
            tasks.append(Task(f"{model}/calibrate", -10 + mi, argv=cmd, timeout=args.task_timeout,
                              log=paths["logs"] / f"{model}-calibrate.log"))  # fmt: skip

            def derive(sidecar=sidecar) -> list[str]:
                src = sidecar("fp8_e4m3", "per_head")
                made = [derive_sidecar(src, d, g, sidecar(d, g)) for d, g in
                        (("fp8_e4m3", "per_tensor"), ("int8", "per_head"), ("int8", "per_tensor"))]  # fmt: skip
                return [str(p) for p in made]

            tasks.append(Task(f"{model}/sidecars", -5, local=derive, deps=(f"{model}/calibrate",)))
            for key, per_head in (("vllm-fp8-per_tensor", False), ("vllm-fp8-per_head", True)):
                if any(s.checkpoint == key for s in schemes):
                    src = sidecar("fp8_e4m3", "per_head" if per_head else "per_tensor")
                    dest = paths["models"] / f"{model}-{key}"
                    tasks.append(Task(f"{model}/{key}", -4, deps=(f"{model}/sidecars",),
                                      local=lambda mdir=mdir, src=src, dest=dest, ph=per_head:
                                      str(make_vllm_fp8_checkpoint(mdir, src, dest, ph))))  # fmt: skip
        for si, scheme in enumerate(schemes):
            key = f"{model}/{scheme.name}"
            deps: tuple[str, ...] = ()
            sc = None
            target_dir = mdir
            if scheme.sidecar:
                sc, deps = sidecar(*scheme.sidecar), (f"{model}/sidecars",)
            if scheme.checkpoint:
                target_dir, deps = paths["models"] / f"{model}-{scheme.checkpoint}", (f"{model}/{scheme.checkpoint}",)
            stem = paths["runs"] / key.replace("/", "--")
            task_json = {
                "label": key,
                "engine": engine_kwargs(scheme, target_dir, engine_settings, sc),
                "windows": str(paths["windows"]),
                "capture": str(stem) + ".capture.pt",
                "result": str(stem) + ".result.json",
            }
            Path(str(stem) + ".task.json").write_text(json.dumps(task_json, indent=1))
            if scheme.cuda_only and not engine_settings.cuda:
                tasks.append(Task(key, 0, local=_raise(f"skipped: {scheme.cuda_only}")))
                continue
            tasks.append(Task(key, mi * 100 + si, argv=[python, "-P", "-m", "benchmarks.accuracy.engine",
                                                        str(stem) + ".task.json"],
                              deps=deps, timeout=args.task_timeout, log=Path(str(stem) + ".log")))  # fmt: skip
    return tasks, info


def _raise(message: str):
    def fn():
        raise RuntimeError(message)

    return fn


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

    from benchmarks.accuracy.outliers import channel_stats, make_outlier_checkpoint
    from benchmarks.accuracy.train import hf_perplexity, train_model
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
        },
        "rows": [],
    }  # fmt: skip
    data_dir = args.data.resolve()
    if (data_dir / "manifest.json").exists():
        result["data"] = json.loads((data_dir / "manifest.json").read_text())

    stages.start("data")
    shape = ModelShape(**{f: getattr(args, f) for f in ModelShape.__dataclass_fields__})
    plain_dir = paths["models"] / "plain"
    reuse = args.reuse_model and (plain_dir / "config.json").exists()
    train_texts = read_jsonl(split_path(data_dir, "train"))
    heldout_texts = read_jsonl(split_path(data_dir, "heldout"))
    calib_texts = read_jsonl(split_path(data_dir, "calib"))
    if args.smoke:  # a slice keeps tokenizer training, tokenizing and calibration quick
        train_texts, calib_texts = [t[:20000] for t in train_texts], [t[:4000] for t in calib_texts]
    write_plain_jsonl(calib_texts, paths["calib"])
    if reuse:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(plain_dir)
    else:
        tokenizer = train_tokenizer(train_texts, shape.vocab_size)
    heldout_ids = encode_stream(tokenizer, heldout_texts)
    seqs = windows(heldout_ids, args.prompt_len + args.decode_len, args.windows)
    prompts, forced = [s[: args.prompt_len] for s in seqs], [s[args.prompt_len :] for s in seqs]
    paths["windows"].write_text(json.dumps({"prompts": prompts, "forced": forced}))
    log(f"{len(heldout_ids)} held-out tokens, {len(seqs)} sequences of {args.prompt_len}+{args.decode_len}")

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
    result["outlier"]["hf_bf16_ppl"] = {m: round(hf_perplexity(model_dirs[m], check), 4) for m in MODELS}
    result["outlier"]["channel_absmax_max_over_median"] = {m: channel_stats(model_dirs[m], check[:4]) for m in MODELS}
    write_result(out_path, result)

    stages.start("engines")
    engine_settings = EngineSettings(max_model_len=args.max_model_len, chunk=args.chunk, seed=args.seed,
                                     gpu_memory_utilization=args.gpu_memory_utilization,
                                     kv_cache_memory_bytes=args.kv_cache_mib * 2**20, cuda=cuda,
                                     logits_processor=LOGITS_PROCESSOR if args.decode_len else None)  # fmt: skip
    tasks, calib_info = build_tasks(args, schemes, models, model_dirs, paths, engine_settings, sys.executable)
    result["calibration"] = calib_info
    runner = Runner(parallel=args.parallel, time_budget=args.time_budget, t0=stages.t0, env=child_env(args, cuda))
    done = runner.run(tasks)
    result["tasks"] = {k: {"ok": r.ok, "seconds": round(r.seconds, 1), "started_at": round(r.started_at or 0, 1),
                           **({"error": r.error} if r.error else {})} for k, r in done.items()}  # fmt: skip
    write_result(out_path, result)

    stages.start("metrics")
    from benchmarks.accuracy.report import build_rows

    result["rows"], result["bf16_transform_check"] = build_rows(schemes, models, model_dirs, paths, done, prompts,
                                                                forced, "cuda" if cuda else "cpu")  # fmt: skip
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
