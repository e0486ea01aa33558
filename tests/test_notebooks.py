"""The example notebooks (examples/*.ipynb) run top to bottom, and are stored without outputs.

Each notebook runs in a fresh ``python3`` kernel of this interpreter (the kernelspec that ipykernel
installs into the venv launches ``python``, which jupyter_client replaces by ``sys.executable``),
with a temporary directory as its working directory, so nothing is written into the repository.
On a CPU each one makes a tiny model and starts vLLM in-process (server: a subprocess): ~1-2 min each.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))
NAMES = [p.name for p in NOTEBOOKS]


def test_the_three_examples_exist() -> None:
    assert NAMES == [
        "01_offline_batch_generation.ipynb",
        "02_serving_openai_client.ipynb",
        "03_calibration.ipynb",
    ]


def _tracked_notebooks() -> list[Path]:
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--", "*.ipynb"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (e.g. an sdist)
        return NOTEBOOKS
    tracked = [ROOT / p for p in out.split("\0") if p]
    return sorted(set(tracked) | set(NOTEBOOKS))


@pytest.mark.parametrize("path", _tracked_notebooks(), ids=lambda p: p.name)
def test_notebook_is_stored_without_outputs(path: Path) -> None:
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [
        i
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count") is not None)
    ]
    assert not dirty, f"{path.name}: cells {dirty} have outputs or execution counts; clear them before committing"
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"


def _python3_kernel_is_this_interpreter() -> None:
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec("python3")
    except NoSuchKernel:
        pytest.fail(f"no 'python3' kernelspec: run `{sys.executable} -m ipykernel install --sys-prefix`")
    # jupyter_client runs a kernelspec's bare "python"/"python3" as sys.executable.
    launcher = spec.argv[0]
    if launcher not in ("python", "python3", f"python{sys.version_info[0]}.{sys.version_info[1]}"):
        if Path(launcher).resolve() != Path(sys.executable).resolve():
            pytest.fail(
                f"the 'python3' kernelspec in {spec.resource_dir} starts {launcher}, not this interpreter "
                f"({sys.executable}); run `{sys.executable} -m ipykernel install --sys-prefix` or remove it"
            )


@pytest.mark.vllm
@pytest.mark.parametrize("path", NOTEBOOKS, ids=NAMES)
def test_notebook_runs(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # As a user runs them: on CPU the kvquant kernels take their PyTorch path, not the Triton
    # interpreter that scripts/test.sh turns on for the kernel tests (minutes slower here).
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    _python3_kernel_is_this_interpreter()
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(tmp_path)}}
    )
    try:
        client.execute()
    finally:
        nbformat.write(nb, tmp_path / path.name)  # the executed copy, to read when a cell failed
    assert not list(EXAMPLES.glob("kvquant-example*")), "a notebook wrote into examples/"
    assert (tmp_path / "kvquant-example" / "tiny-llama" / "kvquant_scales.json").is_file()
