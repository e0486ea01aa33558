"""A per-head sidecar that the requested tensor-parallel size cannot split is refused at start-up,
naming the file, the KV head count and the tp (before any worker builds the model).

The engine-start test runs vLLM's CPU build: config creation (where the check runs) happens before
any worker exists, so tp=2 is requested on a CPU machine and the refusal is what must come back.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm")

from vllm_kvquant.layer_scales import check_scales_split  # noqa: E402
from vllm_kvquant.scales import (  # noqa: E402
    CalibrationInfo,
    ModelFacts,
    ScalesValidationError,
    ShardingError,
    build_scales_file,
    save_scales,
)

HERE = Path(__file__).resolve().parent


def _sidecar(path: Path, num_kv_heads: int, granularity: str = "per_head", num_layers: int = 1) -> Path:
    import torch

    names = [f"model.layers.{i}.self_attn.attn" for i in range(num_layers)]
    stats = {n: (torch.linspace(1.0, 2.0, num_kv_heads), torch.full((num_kv_heads,), 0.5)) for n in names}
    facts = ModelFacts(num_layers, num_kv_heads, 64, tuple(names))
    scales = build_scales_file(stats, "int8", granularity, facts, CalibrationInfo(method="absmax"))
    return save_scales(scales, path)


def _config(model_dir: Path, tp: int, **options) -> SimpleNamespace:
    return SimpleNamespace(
        model_config=SimpleNamespace(model=str(model_dir)),
        parallel_config=SimpleNamespace(tensor_parallel_size=tp),
        additional_config={"kvquant": options} if options else {},
    )


def test_unsplittable_sidecar_in_model_dir_is_refused(tmp_path: Path) -> None:
    path = _sidecar(tmp_path / "kvquant_scales.json", num_kv_heads=3)
    with pytest.raises(ShardingError, match=re.escape(str(path)) + r": cannot split 3 KV heads over tensor-parallel size 2"):
        check_scales_split(_config(tmp_path, tp=2))


def test_explicit_sidecar_is_checked(tmp_path: Path) -> None:
    path = _sidecar(tmp_path / "elsewhere.json", num_kv_heads=2)
    with pytest.raises(ShardingError, match=re.escape(str(path)) + r": cannot split 2 KV heads over tensor-parallel size 3"):
        check_scales_split(_config(tmp_path / "no-such-dir", tp=3, scales=str(path)))


@pytest.mark.parametrize("heads,tp", [(8, 2), (8, 4), (2, 4), (2, 8), (3, 1)])
def test_splittable_sidecar_passes(tmp_path: Path, heads: int, tp: int) -> None:
    _sidecar(tmp_path / "kvquant_scales.json", num_kv_heads=heads)
    check_scales_split(_config(tmp_path, tp=tp))


def test_per_tensor_missing_and_calibration(tmp_path: Path) -> None:
    _sidecar(tmp_path / "kvquant_scales.json", num_kv_heads=2, granularity="per_tensor")
    check_scales_split(_config(tmp_path, tp=4))  # one scale per layer, shared by the replicas
    # A per-tensor file for a model whose heads cannot be split is refused all the same.
    _sidecar(tmp_path / "kvquant_scales.json", num_kv_heads=3, granularity="per_tensor")
    with pytest.raises(ShardingError, match="cannot split 3 KV heads over tensor-parallel size 2"):
        check_scales_split(_config(tmp_path, tp=2))
    check_scales_split(_config(tmp_path / "empty", tp=2))  # no sidecar: the unit fallback
    _sidecar(tmp_path / "kvquant_scales.json", num_kv_heads=3)
    check_scales_split(_config(tmp_path, tp=2, calibration=True))  # calibration ignores any sidecar


def test_broken_sidecar_is_reported_at_the_check(tmp_path: Path) -> None:
    (tmp_path / "kvquant_scales.json").write_text("{not json")
    with pytest.raises(ScalesValidationError, match=re.escape(str(tmp_path / "kvquant_scales.json"))):
        check_scales_split(_config(tmp_path, tp=2))


def test_engine_start_with_unsplittable_sidecar_fails_naming_file_heads_and_tp(tmp_path: Path) -> None:
    """LLM(tensor_parallel_size=2, attention_backend="kvquant") on a 3-KV-head model and sidecar."""
    from vllm_kvquant.tiny_model import TinyLlamaSpec, make_tiny_llama

    spec = TinyLlamaSpec(hidden_size=384, num_attention_heads=6, num_key_value_heads=3, num_hidden_layers=1)
    model_dir = make_tiny_llama(tmp_path / "kv3", spec)
    sidecar = _sidecar(model_dir / "kvquant_scales.json", num_kv_heads=3)
    engine = dict(model=str(model_dir), dtype="bfloat16", max_model_len=256, enforce_eager=True,
                  tensor_parallel_size=2, attention_backend="kvquant")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    spec_json = json.dumps({"engine": engine, "rounds": [["hello"]], "max_tokens": 1})
    proc = subprocess.run(
        [sys.executable, str(HERE / "engine_runner.py"), spec_json, str(tmp_path / "out.json")],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert f"{sidecar}: cannot split 3 KV heads over tensor-parallel size 2" in out, out[-3000:]
    # Refused while the config was built: no worker was started to build the model.
    assert "Engine core initialization failed" not in out, out[-3000:]
