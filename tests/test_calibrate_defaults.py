"""``vllm-kvquant calibrate MODEL --data FILE`` with its defaults works on any model and build.

- The sample length (default 512) is clamped to the context vLLM derives for the model, and the
  output says so; an explicit --seq-len that does not fit is an error naming the context.
- On vLLM's CPU build the KV cache is sized to what calibration needs (``kv_cache_memory_bytes``)
  instead of vLLM's default memory fraction, which fails to start when the machine's memory is
  partly in use; explicit --gpu-memory-utilization / --kv-cache-memory-bytes /
  VLLM_CPU_KVCACHE_SPACE are left alone.
- End to end: all defaults on a tiny Llama whose max_position_embeddings is 256.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest

from vllm_kvquant.calibrate import (
    DEFAULT_SEQ_LEN,
    KV_CACHE_SAMPLES,
    MIN_KV_CACHE_BYTES,
    ModelShape,
    calibration_engine_args,
    check_args,
    kv_cache_bytes_for,
    resolve_defaults,
)
from vllm_kvquant.cli import build_parser

MIB = 2**20


def parsed(*extra: str) -> Namespace:
    return build_parser().parse_args(["calibrate", "/models/m", "--data", "d.txt", *extra])


def shape(context: int = 256, source: str = "the model's context", layers: int = 32, heads: int = 8) -> ModelShape:
    return ModelShape(context, source, num_layers=layers, num_kv_heads=heads, head_size=128, dtype_bytes=2)


# ---------------------------------------------------------------- sample length


def test_parser_leaves_seq_len_and_memory_unset() -> None:
    args = parsed("--out", "s.json")
    assert args.seq_len is None and args.gpu_memory_utilization is None and args.kv_cache_memory_bytes is None
    check_args(args)  # defaults pass the early checks


def test_default_seq_len_is_clamped_and_said() -> None:
    args = parsed()
    resolved, notes = resolve_defaults(args, shape(256), on_cpu=False, environ={})
    assert resolved.seq_len == 255
    assert notes == ["kvquant calibrate: --seq-len 512 clamped to 255 (the model's context is 256)"]
    assert args.seq_len is None  # the caller's namespace is not modified


def test_default_seq_len_fits_a_long_context_untouched() -> None:
    resolved, notes = resolve_defaults(parsed(), shape(131072), on_cpu=False, environ={})
    assert resolved.seq_len == DEFAULT_SEQ_LEN == 512 and notes == []
    resolved, notes = resolve_defaults(parsed(), shape(513), on_cpu=False, environ={})
    assert resolved.seq_len == 512 and notes == []  # 512 + the generated token = 513


def test_explicit_max_model_len_is_the_context() -> None:
    _, notes = resolve_defaults(parsed("--max-model-len", "200"), shape(200, "--max-model-len"), on_cpu=False, environ={})
    assert notes == ["kvquant calibrate: --seq-len 512 clamped to 199 (--max-model-len is 200)"]


def test_explicit_seq_len_is_never_overridden() -> None:
    resolved, notes = resolve_defaults(parsed("--seq-len", "100"), shape(256), on_cpu=False, environ={})
    assert resolved.seq_len == 100 and notes == []
    with pytest.raises(ValueError) as info:
        resolve_defaults(parsed("--seq-len", "512"), shape(256), on_cpu=False, environ={})
    assert str(info.value) == (
        "--seq-len 512 does not fit: the model's context is 256 tokens and each sample is followed by one "
        "generated token; pass --seq-len 255 or less (or leave it out)"
    )


def test_context_without_room() -> None:
    with pytest.raises(ValueError, match=r"the model's context is 1 token\(s\): no room for a sample"):
        resolve_defaults(parsed(), shape(1), on_cpu=False, environ={})


# ---------------------------------------------------------------- memory


def test_kv_cache_bytes_for() -> None:
    big = shape(4096, layers=32, heads=8)  # 32 layers x 2 x 8 heads x 128 x 2 bytes = 128 KiB per token
    per_token = 2 * 32 * 8 * 128 * 2
    assert kv_cache_bytes_for(big, 513, 128) == KV_CACHE_SAMPLES * 768 * per_token  # 513 -> 3 x 256 tokens
    assert kv_cache_bytes_for(big, 513, 2) == 2 * 768 * per_token  # never more sequences than samples
    tiny = shape(256, layers=2, heads=2)
    assert kv_cache_bytes_for(tiny, 256, 128) == MIN_KV_CACHE_BYTES
    odd = ModelShape(4096, "", num_layers=3, num_kv_heads=5, head_size=96, dtype_bytes=2)
    assert kv_cache_bytes_for(odd, 4000, 16) % MIB == 0  # whole MiB
    assert kv_cache_bytes_for(odd, 4000, 16) >= 16 * 4000 * 2 * 3 * 5 * 96 * 2


def test_cpu_build_sizes_the_kv_cache() -> None:
    resolved, notes = resolve_defaults(parsed(), shape(256), on_cpu=True, environ={})
    expected = kv_cache_bytes_for(shape(256), 256, 128)
    assert resolved.kv_cache_memory_bytes == expected
    assert notes[1] == (
        f"kvquant calibrate: CPU build: KV cache sized to {expected // MIB} MiB (up to 16 samples of 256 tokens at "
        "once) instead of vLLM's default memory fraction; --kv-cache-memory-bytes or --gpu-memory-utilization "
        "override it"
    )
    engine = calibration_engine_args(resolved, max_model_len=256)
    assert engine["kv_cache_memory_bytes"] == expected and "gpu_memory_utilization" not in engine


@pytest.mark.parametrize(
    "extra,environ",
    [
        (["--gpu-memory-utilization", "0.3"], {}),
        (["--kv-cache-memory-bytes", str(300 * MIB)], {}),
        ([], {"VLLM_CPU_KVCACHE_SPACE": "2"}),
    ],
    ids=["gpu-memory-utilization", "kv-cache-memory-bytes", "VLLM_CPU_KVCACHE_SPACE"],
)
def test_cpu_build_keeps_explicit_memory_settings(extra: list[str], environ: dict) -> None:
    args = parsed(*extra)
    resolved, notes = resolve_defaults(args, shape(8192), on_cpu=True, environ=environ)
    assert notes == []
    assert resolved.kv_cache_memory_bytes == args.kv_cache_memory_bytes  # None, or the user's value
    engine = calibration_engine_args(resolved, max_model_len=513)
    assert engine.get("gpu_memory_utilization") == args.gpu_memory_utilization
    assert engine.get("kv_cache_memory_bytes") == args.kv_cache_memory_bytes


def test_gpu_build_keeps_vllm_memory_defaults() -> None:
    resolved, notes = resolve_defaults(parsed(), shape(8192), on_cpu=False, environ={})
    assert resolved.kv_cache_memory_bytes is None and notes == []
    engine = calibration_engine_args(resolved, max_model_len=513)
    assert "kv_cache_memory_bytes" not in engine and "gpu_memory_utilization" not in engine


def test_bad_kv_cache_memory_bytes() -> None:
    with pytest.raises(ValueError, match="--kv-cache-memory-bytes must be >= 1, got 0"):
        check_args(parsed("--kv-cache-memory-bytes", "0", "--out", "s.json"))


# ---------------------------------------------------------------- vLLM's view of a real model directory


@pytest.fixture(scope="module")
def tiny256(tmp_path_factory) -> tuple[Path, Path]:
    from vllm_kvquant.tiny_model import TinyLlamaSpec, corpus_text, make_tiny_llama

    root = tmp_path_factory.mktemp("defaults")
    model_dir = make_tiny_llama(root / "tiny-256", TinyLlamaSpec(max_position_embeddings=256))
    data = root / "corpus.txt"
    data.write_text(corpus_text())
    return model_dir, data


def test_model_shape_as_vllm_derives_it(tiny256, tmp_path: Path) -> None:
    pytest.importorskip("vllm")
    import shutil

    from vllm_kvquant.calibrate import model_shape

    model_dir, _ = tiny256
    args = parsed()
    args.model = str(model_dir)
    assert model_shape(args) == ModelShape(256, "the model's context", 2, 2, 64, 2)  # max_position_embeddings
    args.max_model_len = 128
    assert model_shape(args).context == 128 and model_shape(args).context_source == "--max-model-len"

    # vLLM's rules, not just max_position_embeddings: the smallest length key, RoPE scaling
    for name, change, context in (
        ("other-key", {"max_sequence_length": 200}, 200),
        ("linear-rope", {"rope_parameters": {"rope_theta": 10000.0, "rope_type": "linear", "factor": 2.0}}, 512),
    ):
        copy = Path(shutil.copytree(model_dir, tmp_path / name))
        config = json.loads((copy / "config.json").read_text())
        (copy / "config.json").write_text(json.dumps({**config, **change}))
        args = parsed()
        args.model = str(copy)
        assert model_shape(args).context == context, name


# ---------------------------------------------------------------- end to end


def _cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """The console script as a user runs it (default multiprocess engine, PyTorch reference kernels)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "VLLM_CPU_KVCACHE_SPACE")}
    return subprocess.run(
        [sys.executable, "-m", "vllm_kvquant.cli", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_calibrate_with_all_defaults_on_a_256_token_model(tiny256) -> None:
    pytest.importorskip("vllm")
    model_dir, data = tiny256
    proc = _cli("calibrate", str(model_dir), "--data", str(data))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "kvquant calibrate: --seq-len 512 clamped to 255 (the model's context is 256)" in proc.stdout
    assert "kvquant calibrate: CPU build: KV cache sized to 64 MiB" in proc.stdout
    sidecar = model_dir / "kvquant_scales.json"
    assert f"wrote {sidecar}: 2 layers, fp8_e4m3, per_head" in proc.stdout

    cal = json.loads(sidecar.read_text())["calibration"]
    assert cal["seq_len"] == 255
    assert 1 <= cal["num_samples"] < 128  # the shipped text holds a few 255-token windows, not 128
    assert cal["num_tokens"] == cal["num_samples"] * 255

    check = _cli("validate", str(sidecar), "--model-dir", str(model_dir), timeout=300)
    assert check.returncode == 0, check.stderr
    assert "OK (2 layers, fp8_e4m3, per_head); qmax * scale fits bfloat16 (from config.json)" in check.stdout
    assert "warning" not in check.stderr


def test_explicit_seq_len_beyond_the_context_exits_2(tiny256, tmp_path: Path) -> None:
    pytest.importorskip("vllm")
    model_dir, data = tiny256
    proc = _cli("calibrate", str(model_dir), "--data", str(data), "--seq-len", "512", "--out", str(tmp_path / "s.json"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "vllm-kvquant calibrate: error: --seq-len 512 does not fit: the model's context is 256 tokens" in proc.stderr
    assert not (tmp_path / "s.json").exists()
