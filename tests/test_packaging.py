"""The wheel installs everything under vllm_kvquant/ and nothing at the top level."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_file_list(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("vllm_kvquant-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/")[0] for n in names}
    assert {t for t in top_level if not t.endswith(".dist-info")} == {"vllm_kvquant"}, top_level
    for required in (
        "vllm_kvquant/plugin.py",
        "vllm_kvquant/backend.py",
        "vllm_kvquant/kernels/__init__.py",
        "vllm_kvquant/kernels/reference.py",
        "vllm_kvquant/scales/__init__.py",
        "vllm_kvquant/scales/schema.json",
        "vllm_kvquant/data/tiny_corpus.txt",
    ):
        assert required in names, required
    assert not any(n.startswith(("kernels/", "scales/")) for n in names)
    # every module of the source tree, subpackages included (pyproject lists packages one by one)
    for folder, installed in (("vllm_kvquant", "vllm_kvquant"), ("kernels", "vllm_kvquant/kernels"),
                              ("scales", "vllm_kvquant/scales")):  # fmt: skip
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).as_posix()
            if folder == "vllm_kvquant" and rel.startswith(("kernels/", "scales/")):
                continue
            assert f"{installed}/{rel}" in names, f"{folder}/{rel} is not in the wheel"
    metadata = next(n for n in names if n.endswith("entry_points.txt"))
    entry_points = zipfile.ZipFile(wheel).read(metadata).decode()
    assert "[vllm.general_plugins]" in entry_points
    assert "kvquant = vllm_kvquant.plugin:register" in entry_points
    assert "vllm-kvquant = vllm_kvquant.cli:main" in entry_points
