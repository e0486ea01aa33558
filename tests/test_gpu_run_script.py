"""scripts/gpu-run.sh planned without a GPU (``KVQ_DRY_RUN=1``, ``KVQ_NGPU``): every stage fits one
GPU, the check stage runs every test file with GPU tests, and nothing assumes two GPUs."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def plan(stage: str, ngpu: int, tmp_path: Path, **env: str) -> tuple[int, list[dict]]:
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu-run.sh"), stage], capture_output=True, text=True, timeout=60,
        env={**os.environ, "KVQ_DRY_RUN": "1", "KVQ_NGPU": str(ngpu), "OUT": str(tmp_path),
             "KVQ_DEVICE_SLUG": "nvidia-h200", **env},
    )  # fmt: skip
    (tmp_path / "last-stderr.txt").write_text(proc.stderr)
    lanes = []
    for line in proc.stdout.splitlines():
        m = re.match(r"lane (\S+) gpu=(\d+) limit=(\d+): (.*)", line)
        if m:
            lanes.append({"name": m[1], "gpu": int(m[2]), "limit": int(m[3]), "cmd": m[4]})
    return proc.returncode, lanes


def last_stderr(tmp_path: Path) -> str:
    """What the last :func:`plan` call printed to stderr."""
    return (tmp_path / "last-stderr.txt").read_text()


def test_check_runs_every_gpu_test_file_on_one_gpu(tmp_path) -> None:
    rc, lanes = plan("check", 1, tmp_path)
    names = [lane["name"] for lane in lanes]
    assert rc == 0 and names == ["engines", "serve", "jit", "kernels-a", "kernels-b", "kernels-c"], names
    assert all(lane["gpu"] == 0 and lane["limit"] <= 570 for lane in lanes)
    files = [f for lane in lanes for f in re.findall(r"tests/\S+\.py", lane["cmd"])]
    listed = set(files)
    assert len(files) == len(listed), "a test file runs in two lanes"
    assert all((REPO / f).is_file() for f in listed), listed
    with_gpu_tests = {
        f"tests/{p.name}" for p in (REPO / "tests").glob("test_*.py")
        if re.search(r"pytest\.mark\.gpu|pytestmark = pytest\.mark\.gpu", p.read_text())
    }  # fmt: skip
    assert with_gpu_tests <= listed, with_gpu_tests - listed
    by_name = {lane["name"]: lane["cmd"] for lane in lanes}
    assert all("-m gpu" in by_name[n] for n in ("kernels-a", "kernels-b", "kernels-c"))
    assert "tests/test_backend_gpu.py" in by_name["engines"]
    for f in ("tests/test_serve.py", "tests/test_serve_bad_input.py"):
        assert f in by_name["serve"]  # test_serve*.py carry no gpu mark: not behind -m gpu
    assert "tests/test_jit_warmup_gpu.py" in by_name["jit"]
    for name in ("engines", "serve", "jit"):
        assert "-m gpu" not in by_name[name] and "KVQUANT_FAIL_ON_SKIP=1" in by_name[name]
    # each lane in its own temp dir (the logs come back from there) and its own JUnit XML
    assert len({re.search(r"--basetemp=(\S+)", c)[1] for c in by_name.values()}) == len(lanes)
    assert all(f"{n}.xml" in c for n, c in by_name.items())


@pytest.mark.parametrize("stage", ["bench", "accuracy", "serve-load", "throughput", "profile", "ncu", "decode-lab"])
def test_other_stages_use_one_lane_on_one_gpu(stage, tmp_path) -> None:
    rc, lanes = plan(stage, 1, tmp_path)
    assert rc == 0 and len(lanes) == 1 and lanes[0]["gpu"] == 0 and lanes[0]["limit"] <= 575, lanes


def test_serve_load_parts(tmp_path) -> None:
    _, (lane,) = plan("serve-load", 1, tmp_path, KVQ_SERVE_CONFIGS="vllm-fp8")
    assert "--configs vllm-fp8" in lane["cmd"] and "serve-load-nvidia-h200-vllm-fp8.json" in lane["cmd"]
    # The grid fills a call: the trained-model phase is a call of its own, for both configs.
    assert "--no-trained-check" in lane["cmd"] and "--trained-only" not in lane["cmd"]
    # The servers' logs land in the pytest temp root, whose *.log files come back.
    assert "--workdir /tmp/kvq-pytest/serve-load" in lane["cmd"]
    _, (lane,) = plan("serve-load", 1, tmp_path, KVQ_SERVE_CONFIGS="kvquant-fp8,vllm-fp8", KVQ_SERVE_PHASE="trained")
    assert lane["name"] == "serve-load-kvquant-fp8+vllm-fp8-trained"
    assert "--trained-only" in lane["cmd"] and "serve-load-nvidia-h200-kvquant-fp8+vllm-fp8-trained.json" in lane["cmd"]
    _, (lane,) = plan("serve-load", 1, tmp_path, KVQ_SERVE_PHASE="all")
    assert "--no-trained-check" not in lane["cmd"] and "--trained-only" not in lane["cmd"]
    rc, lanes = plan("serve-load", 1, tmp_path, KVQ_SERVE_PHASE="grid")
    assert rc == 2 and not lanes
    assert "KVQ_SERVE_PHASE must be load, trained or all, got 'grid'" in last_stderr(tmp_path)


def _configs(cmd: str) -> list[str]:
    return re.search(r"--configs (\S+)", cmd)[1].split(",")


#: The issue-20 configs each workload must cover, over its parts.
NEEDED = {
    "1024x512": {"kvquant-fp8", "kvquant-int8", "vllm-fp8-flash", "kvquant-fp8-full", "kvquant-int8-full",
                 "vllm-fp8-flash-full", "vllm-bf16", "vllm-int8-per-token-head", "kvquant-fp8-fa3"},
    "7424x512": {"kvquant-fp8", "kvquant-int8", "vllm-fp8-flash", "vllm-bf16"},
}  # fmt: skip


@pytest.mark.parametrize("workload, parts, requests, engines", [("1024x512", "abcd", 256, 3), ("7424x512", "abc", 48, 2)])
def test_throughput_parts_fit_one_call_each(workload, parts, requests, engines, tmp_path) -> None:
    from benchmarks.serving.throughput_configs import CONFIGS

    seen: set[str] = set()
    for part in parts:
        rc, (lane,) = plan("throughput", 1, tmp_path, KVQ_WORKLOAD=workload, KVQ_THR_PART=part)
        cmd = lane["cmd"]
        assert rc == 0 and lane["name"] == f"thr-{workload}-{part}" and lane["gpu"] == 0 and lane["limit"] <= 575
        assert f"throughput-part-{part}-{workload}.json" in cmd and f"--num-requests {requests}" in cmd
        assert "--compile" in cmd and "--repeats 3" in cmd and "--time-budget 540" in cmd
        configs = _configs(cmd)
        # ~2.5 min an engine at 1024x512 (start, warm-up, three runs), ~3.5 min at 7424x512
        assert len(configs) <= engines and all(c in CONFIGS for c in configs), configs
        # Every kvquant config shares its part with vLLM's fp8 of the same CUDA-graph mode ...
        for c in configs:
            if c.startswith("kvquant-") and c != "kvquant-fp8-fa3":
                assert ("vllm-fp8-flash-full" if c.endswith("-full") else "vllm-fp8-flash") in configs, (part, configs)
        seen |= set(configs)
    assert NEEDED[workload] <= seen
    # ... and one part starts one kvquant config twice (the spread between engine starts).
    if workload == "1024x512":
        _, (lane,) = plan("throughput", 1, tmp_path, KVQ_THR_PART="d")
        assert _configs(lane["cmd"]).count("kvquant-fp8") == 2


def test_throughput_parts_never_share_a_gpu(tmp_path) -> None:
    _, lanes = plan("throughput", 2, tmp_path)
    assert [(x["name"], x["gpu"]) for x in lanes] == [("thr-1024x512-a", 0), ("thr-1024x512-b", 1)]
    rc, lanes = plan("throughput", 1, tmp_path, KVQ_THR_PART="a,b")
    assert rc == 2 and not lanes
    rc, lanes = plan("throughput", 1, tmp_path, KVQ_WORKLOAD="7424x512", KVQ_THR_PART="d")
    assert rc == 2 and not lanes


def test_profile_serving_steady_state(tmp_path) -> None:
    """serve64: the engine as `vllm serve` runs it at 64 concurrent requests (serve-load's first point)."""
    _, (lane,) = plan("profile", 1, tmp_path, KVQ_PROFILE_WORKLOAD="serve64")
    for flag in ("--max-num-seqs 64", "--max-num-batched-tokens 8192", "--input-len 1024", "--output-len 256",
                 "--out benchmarks/results/profile-nvidia-h200-serve64.json"):
        assert flag in " ".join(lane["cmd"].split()), flag
    rc, lanes = plan("profile", 1, tmp_path, KVQ_PROFILE_WORKLOAD="nope")
    assert rc == 2 and not lanes
    assert "KVQ_PROFILE_WORKLOAD must be throughput or serve64, got 'nope'" in last_stderr(tmp_path)


def test_engine_memory_is_a_fixed_size_per_card(tmp_path) -> None:
    """28 GiB on any card (the H200's 0.2 does not hold Llama-3-8B on an H100); KVQ_GPU_MEM overrides."""
    for stage in ("profile", "throughput"):
        _, (lane,) = plan(stage, 1, tmp_path)
        assert "--gpu-memory-utilization 0.2 " in lane["cmd"]
        _, (lane,) = plan(stage, 1, tmp_path, KVQ_GPU_MEM="0.35")
        assert "--gpu-memory-utilization 0.35 " in lane["cmd"]
    _, (lane,) = plan("throughput", 1, tmp_path, KVQ_THR_ARGS="--max-num-seqs 64")
    assert "--max-num-seqs 64" in lane["cmd"]


def test_profile_stage(tmp_path) -> None:
    _, (lane,) = plan("profile", 1, tmp_path, KVQ_PROFILE_ARGS="--max-iterations 100")
    assert lane["cmd"].startswith("python3 -m benchmarks.serving.profile_step --compile")
    assert "--max-iterations 100" in lane["cmd"] and "--time-budget 540" in lane["cmd"]


def test_kernel_only_stages(tmp_path) -> None:
    """ncu profiles one launch of our split kernel per format; decode-lab times the configs asked for."""
    _, (lane,) = plan("ncu", 1, tmp_path, KVQ_LAB_SHAPES="8x32768")
    for dt in ("fp8_e4m3", "int8"):
        assert dt in lane["cmd"]
    assert "ncu --target-processes all -k regex:_decode_split_kernel -c 1 --set full" in lane["cmd"]
    assert "benchmarks.kernels.decode_lab --ncu-config" in lane["cmd"] and "--shapes 8x32768" in lane["cmd"]
    assert "--page details" in lane["cmd"] and "--page raw --csv" in lane["cmd"]
    assert "--layouts backend" in lane["cmd"]
    _, (lane,) = plan("decode-lab", 1, tmp_path, KVQ_LAB_CONFIGS="'' 'num_stages=3,num_warps=8'")
    assert "--configs '' 'num_stages=3,num_warps=8'" in lane["cmd"] and "--layouts backend " in lane["cmd"]
    _, (lane,) = plan("decode-lab", 1, tmp_path, KVQ_LAB_LAYOUTS="backend v-channel-major")
    assert "--layouts backend v-channel-major " in lane["cmd"]
    assert "--out benchmarks/results/decode-lab.json" in lane["cmd"]
    assert (REPO / "benchmarks" / "kernels" / "decode_lab.py").is_file()


def test_tp_refuses_one_gpu(tmp_path) -> None:
    rc, lanes = plan("tp", 1, tmp_path)
    assert rc == 2 and not lanes


def test_stage_model_splits_and_reassembles_a_model_directory(tmp_path) -> None:
    """scripts/stage-model.sh: parts small enough for one call's carry, reassembled and checksummed."""
    model = tmp_path / "src" / "m"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "w.bin").write_bytes(os.urandom(2_500_000))
    env = {**os.environ, "PART_MIB": "1", "KVQ_STAGE_ROOT": str(tmp_path / "stage")}
    script = str(REPO / "scripts" / "stage-model.sh")
    try:
        made = subprocess.run(["bash", script, str(model), "pytest-m"], capture_output=True, text=True, env=env, timeout=60)
        assert made.returncode == 0, made.stderr
        parts = re.findall(r"--receive pytest-m (p\d\d)", made.stdout)
        assert parts == ["p00", "p01", "p02"], made.stdout
        for p in parts:
            got = subprocess.run(["bash", script, "--receive", "pytest-m", p], capture_output=True, text=True, env=env,
                                 timeout=60)  # fmt: skip
            assert got.returncode == 0, got.stderr
        assert "ready" in got.stdout
        assert (tmp_path / "stage" / "models" / "pytest-m" / "w.bin").read_bytes() == (model / "w.bin").read_bytes()
        missing = subprocess.run(["bash", script, "--receive", "pytest-m", "p09"], capture_output=True, text=True,
                                 env=env, timeout=60)  # fmt: skip
        assert missing.returncode == 2 and "was not carried" in missing.stderr
    finally:
        subprocess.run(["rm", "-rf", str(REPO / ".gpu" / "model-pytest-m")], check=False)
