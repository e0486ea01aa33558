"""The accuracy run's task graph: per model its calibrations, derived sidecars and vLLM-fp8 checkpoints
(quick local steps) and one engine per scheme, for :class:`benchmarks.accuracy.runner.Runner`.

Why calibrations are tasks too: ``vllm-kvquant calibrate`` is an engine start of its own, and on a
GPU it runs beside the other model's engines. A model needs at most two (see
:func:`benchmarks.accuracy.schemes.calibrations_needed`): fp8 per_head, from which every per_head /
per_tensor sidecar and the vLLM fp8 checkpoints derive, and int8 per_channel, from which the fp8
per_channel sidecar derives. A model that could not be made or fetched gets one failing task per
row, carrying the reason, so its rows say why and the other models still run.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from benchmarks.accuracy.runner import Task
from benchmarks.accuracy.schemes import EngineSettings, Scheme, calibration_of, calibrations_needed, engine_kwargs

#: Sidecars each calibration run yields besides its own (kv_dtype, granularity).
DERIVED = {
    ("fp8_e4m3", "per_head"): (("fp8_e4m3", "per_tensor"), ("int8", "per_head"), ("int8", "per_tensor")),
    ("int8", "per_channel"): (("fp8_e4m3", "per_channel"),),
}


@dataclass(frozen=True)
class ModelInput:
    """One model as the engines see it: its checkpoint and its evaluation windows file, or why it has none."""

    model_dir: Path | None
    windows: Path | None
    error: str | None = None


def _calibrate_supports_kv_bytes() -> bool:
    from vllm_kvquant.cli import build_parser

    try:
        build_parser().parse_args(["calibrate", "m", "--data", "d", "--kv-cache-memory-bytes", "1"])
        return True
    except SystemExit:
        return False


def _raise(message: str):
    def fn():
        raise RuntimeError(message)

    return fn


def sidecar_path(paths: dict, model: str, dtype: str, granularity: str) -> Path:
    return paths["sidecars"] / f"{model}-{dtype}-{granularity}.json"


def _tag(calibration: tuple[str, str]) -> str:
    """Task-key suffix of a calibration: '' for the per_head one (the keys earlier results carry)."""
    return "" if calibration == ("fp8_e4m3", "per_head") else f"-{calibration[1]}"


def calibration_tasks(args: argparse.Namespace, model: str, mdir: Path, schemes: list[Scheme], paths: dict,
                      settings: EngineSettings, python: str, priority: float) -> tuple[list[Task], dict]:  # fmt: skip
    """``{model}/calibrate[-per_channel]`` (a process) and ``{model}/sidecars[-per_channel]`` (local) per
    calibration the schemes need, and the vLLM fp8 checkpoints; the calibrate commands for the results."""
    from benchmarks.accuracy.checkpoints import derive_sidecar, make_vllm_fp8_checkpoint

    kv_bytes = _calibrate_supports_kv_bytes()
    tasks: list[Task] = []
    info: dict = {}
    for cal in calibrations_needed(schemes):
        dtype, gran = cal
        out = sidecar_path(paths, model, dtype, gran)
        cmd = [python, "-P", "-m", "vllm_kvquant.cli", "calibrate", str(mdir), "--data", str(paths["calib"]),
               "--granularity", gran, "--dtype", dtype, "--out", str(out),
               "--num-samples", str(args.calib_samples), "--seq-len", str(args.calib_seq_len),
               "--model-dtype", "bfloat16", "--gpu-memory-utilization", str(args.gpu_memory_utilization),
               "--seed", str(args.seed)]  # fmt: skip
        if kv_bytes:
            cmd += ["--kv-cache-memory-bytes", str(settings.kv_cache_memory_bytes)]
        info[f"{dtype}-{gran}"] = {"command": " ".join(cmd[2:]), "kv_cache_memory_bytes": kv_bytes}
        key = f"{model}/calibrate{_tag(cal)}"
        tasks.append(Task(key, priority, argv=cmd, timeout=args.task_timeout,
                          log=paths["logs"] / f"{model}-calibrate{_tag(cal)}.log"))  # fmt: skip

        def derive(src=out, targets=DERIVED[cal]) -> list[str]:
            return [str(derive_sidecar(src, d, g, sidecar_path(paths, model, d, g))) for d, g in targets]

        tasks.append(Task(f"{model}/sidecars{_tag(cal)}", -5, local=derive, deps=(key,)))
    for ckpt, per_head in (("vllm-fp8-per_tensor", False), ("vllm-fp8-per_head", True)):
        if any(s.checkpoint == ckpt for s in schemes):
            src = sidecar_path(paths, model, "fp8_e4m3", "per_head" if per_head else "per_tensor")
            dest = paths["models"] / f"{model}-{ckpt}"
            tasks.append(Task(f"{model}/{ckpt}", -4, deps=(f"{model}/sidecars",),
                              local=lambda src=src, dest=dest, ph=per_head:
                              str(make_vllm_fp8_checkpoint(mdir, src, dest, ph))))  # fmt: skip
    return tasks, info


def build_tasks(args: argparse.Namespace, schemes: list[Scheme], models: list[str], inputs: dict[str, ModelInput],
                paths: dict, settings: EngineSettings, python: str) -> tuple[list[Task], dict]:  # fmt: skip
    """Calibrations (per model), derived sidecars and vLLM-fp8 checkpoints (local), one engine per scheme."""
    tasks: list[Task] = []
    info: dict = {}
    for mi, model in enumerate(models):
        inp = inputs[model]
        if inp.error or inp.model_dir is None or inp.windows is None:
            why = inp.error or "no model directory or evaluation windows"
            tasks += [Task(f"{model}/{s.name}", 0, local=_raise(f"{model} model unavailable: {why}")) for s in schemes]
            info[model] = {"error": why}
            continue
        mdir = inp.model_dir
        cal_tasks, info[model] = calibration_tasks(args, model, mdir, schemes, paths, settings, python, -10 + mi)
        tasks += cal_tasks
        for si, scheme in enumerate(schemes):
            key = f"{model}/{scheme.name}"
            deps: tuple[str, ...] = ()
            sc = None
            target_dir = mdir
            if scheme.sidecar:
                sc = sidecar_path(paths, model, *scheme.sidecar)
                deps = (f"{model}/sidecars{_tag(calibration_of(scheme.sidecar))}",)
            if scheme.checkpoint:
                target_dir, deps = paths["models"] / f"{model}-{scheme.checkpoint}", (f"{model}/{scheme.checkpoint}",)
            stem = paths["runs"] / key.replace("/", "--")
            task_json = {
                "label": key,
                "engine": engine_kwargs(scheme, target_dir, settings, sc),
                "windows": str(inp.windows),
                "capture": str(stem) + ".capture.pt",
                "result": str(stem) + ".result.json",
            }
            Path(str(stem) + ".task.json").write_text(json.dumps(task_json, indent=1))
            if scheme.cuda_only and not settings.cuda:
                tasks.append(Task(key, 0, local=_raise(f"skipped: {scheme.cuda_only}")))
                continue
            tasks.append(Task(key, mi * 100 + si, argv=[python, "-P", "-m", "benchmarks.accuracy.engine",
                                                        str(stem) + ".task.json"],
                              deps=deps, timeout=args.task_timeout, log=Path(str(stem) + ".log")))  # fmt: skip
    return tasks, info
