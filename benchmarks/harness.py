"""Helpers shared by the benchmarks (results files) and by the vLLM-level ones (accuracy, serving, tp).

- :func:`device_slug`, :func:`write_result`: result file naming and writing (plus a copy into
  ``$OUT`` when that variable is set, as on the GPU machine).
- :class:`OutputTee`: while a vLLM engine lives, copy everything the process and its children
  print (vLLM's engine and worker processes inherit fds 1/2) to the console and keep it, so
  :func:`root_cause` can name the real error instead of "Engine core initialization failed".
- :class:`BenchWorkerExtension`: ``worker_extension_cls`` that also reports the K/V scales each
  attention layer really uses (``_k_scale`` etc.), for vLLM's own backends too.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from vllm_kvquant.worker_extension import KVQuantWorkerExtension

#: The repository root: ``benchmarks`` is imported from there (``python -m benchmarks....``).
REPO = Path(__file__).resolve().parents[1]
#: Import path of :class:`BenchWorkerExtension` (:func:`expose_benchmarks` puts it on PYTHONPATH).
BENCH_EXTENSION_PATH = "benchmarks.harness.BenchWorkerExtension"


def benchmarks_path() -> Path:
    """A folder holding only ``benchmarks`` (a link to this package), for child processes' PYTHONPATH.

    The repository root itself would put its ``kernels/``, ``scales/`` and ``tests/`` before the
    installed packages of those names in every child (transformers imports the Hugging Face
    ``kernels`` package wherever that is installed).
    """
    folder = Path(tempfile.gettempdir()) / f"kvquant-benchmarks-{hashlib.sha1(str(REPO).encode()).hexdigest()[:12]}"
    link = folder / "benchmarks"
    if not link.is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        try:
            link.symlink_to(REPO / "benchmarks", target_is_directory=True)
        except FileExistsError:  # another process made it meanwhile
            pass
    return folder


def expose_benchmarks() -> None:
    """Make ``import benchmarks.harness`` work in child processes and vLLM's engine/worker processes."""
    here = str(benchmarks_path())
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if here not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([here, *parts])


def command(module: str, argv: list[str] | None) -> str:
    """The ``command`` field of a results file: how to run ``module`` again from the repository root."""
    return " ".join(["python", "-m", module, *(sys.argv[1:] if argv is None else argv)])


def device_slug() -> str:
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")


def write_result(path: Path, result: dict, log=print) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=1)
    path.write_text(text)
    if os.environ.get("OUT"):
        try:
            Path(os.environ["OUT"], path.name).write_text(text)
        except OSError as e:
            log(f"could not copy results to $OUT: {e}")


class OutputTee:
    """Route fds 1 and 2 through a pipe; echo to the real stdout and keep the last ``keep`` bytes."""

    def __init__(self, keep: int = 2_000_000) -> None:
        self.keep = keep
        self.chunks: list[bytes] = []
        self.size = 0

    def __enter__(self) -> "OutputTee":
        sys.stdout.flush()
        sys.stderr.flush()
        self.r, w = os.pipe()
        self.saved = (os.dup(1), os.dup(2))
        os.dup2(w, 1)
        os.dup2(w, 2)
        os.close(w)
        self.thread = threading.Thread(target=self._pump, daemon=True)
        self.thread.start()
        return self

    def _pump(self) -> None:
        while True:
            try:
                data = os.read(self.r, 65536)
            except OSError:
                break
            if not data:
                break
            try:
                os.write(self.saved[0], data)
            except OSError:
                pass
            self.chunks.append(data)
            self.size += len(data)
            while self.size > self.keep and len(self.chunks) > 1:
                self.size -= len(self.chunks.pop(0))

    def __exit__(self, *exc: Any) -> None:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except Exception:  # noqa: BLE001
            pass
        os.dup2(self.saved[0], 1)
        os.dup2(self.saved[1], 2)
        # The pipe's last writers are gone once the engine processes have exited.
        self.thread.join(timeout=10)
        if not self.thread.is_alive():
            os.close(self.r)
            os.close(self.saved[0])
            os.close(self.saved[1])

    def text(self) -> str:
        return b"".join(self.chunks).decode("utf-8", "replace")


_GENERIC = (
    "Engine core initialization failed",
    "Worker failed with error",
    "WorkerProc hit an exception",
    "See root cause above",
)


def root_cause(text: str) -> str | None:
    """The first traceback-final ``SomeError: message`` line that is not one of vLLM's generic
    wrappers (log prefixes such as ``(Worker pid=1) ERROR ... [file.py:12]`` are skipped)."""
    prefix = re.compile(r"^(?:\([^)]*\)\s+)?(?:ERROR\s+\S+\s+\S+\s+\[[^\]]*\]\s*)?")
    exc = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit)): (.+)$")
    for line in text.splitlines():
        m = exc.match(prefix.sub("", line, count=1).strip())
        if m and not any(g in line for g in _GENERIC):
            return f"{m.group(1)}: {m.group(2).strip()}"[:1500]
    return None


class BenchWorkerExtension(KVQuantWorkerExtension):
    def bench_attention_scales(self) -> dict[str, dict]:
        """Per attention layer: backend, cache dtype and the scales it really uses."""
        import torch

        out = {}
        for name, layer in self.vllm_config.compilation_config.static_forward_context.items():
            get_backend = getattr(layer, "get_attn_backend", None)
            if get_backend is None:
                continue
            d: dict[str, Any] = {"backend": get_backend().get_name(), "kv_cache_dtype": getattr(layer, "kv_cache_dtype", None)}
            for attr in ("_q_scale_float", "_k_scale_float", "_v_scale_float"):
                v = getattr(layer, attr, None)
                if isinstance(v, (int, float)):
                    d[attr.strip("_")] = float(v)
            for attr in ("_k_scale", "_v_scale"):
                t = getattr(layer, attr, None)
                if isinstance(t, torch.Tensor):
                    d[attr.strip("_")] = t.detach().float().flatten().cpu().tolist()[:64]
            out[name] = d
        return out
