"""CI's older-vLLM part sets KVQUANT_FAIL_ON_SKIP=1 (tests/conftest.py): a skipped test, or a module
skipped at collection (``importorskip`` of a vLLM that does not import), must fail the session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

SKIPPING = """
import pytest

def test_runs():
    pass

def test_skips():
    pytest.skip("not here")
"""
COLLECT_SKIP = 'import pytest\npytest.importorskip("no_such_module_kvquant")\n\ndef test_x():\n    pass\n'
PASSING = "def test_runs():\n    pass\n"  # beside a module skipped whole: pytest would exit 0, not 5


def _pytest(tmp_path: Path, source: str, fail_on_skip: bool) -> subprocess.CompletedProcess:
    (tmp_path / "test_case.py").write_text(source)
    (tmp_path / "test_other.py").write_text(PASSING)
    env = {k: v for k, v in os.environ.items() if k != "KVQUANT_FAIL_ON_SKIP"}
    if fail_on_skip:
        env["KVQUANT_FAIL_ON_SKIP"] = "1"
    env["PYTHONPATH"] = str(HERE)
    return subprocess.run(
        [sys.executable, "-P", "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider",
         "--rootdir", str(tmp_path), str(tmp_path)],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )  # fmt: skip


@pytest.mark.parametrize("source", [SKIPPING, COLLECT_SKIP], ids=["test-skip", "collect-skip"])
def test_skip_fails_only_when_asked(tmp_path: Path, source: str) -> None:
    allowed = _pytest(tmp_path, source, fail_on_skip=False)
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    refused = _pytest(tmp_path, source, fail_on_skip=True)
    assert refused.returncode == pytest.ExitCode.TESTS_FAILED, refused.stdout + refused.stderr
    assert "KVQUANT_FAIL_ON_SKIP=1 and 1 skipped: test_case.py" in refused.stdout
