"""The accuracy benchmark's task runner (benchmarks/accuracy/runner.py): engines side by side, in budget.

Small Python subprocesses stand in for engines: dependencies and priorities order the starts, a
failed dependency fails its dependents with the reason, a task past its timeout is killed with the
processes it started, and tasks that would end past the time budget are recorded as skipped.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest


from benchmarks.accuracy.runner import Runner, Task  # noqa: E402

PY = sys.executable


def _append(path: Path, text: str) -> list[str]:
    return [PY, "-c", f"open({str(path)!r}, 'a').write({text!r} + '\\n')"]


def test_order_dependencies_and_local_tasks(tmp_path):
    order = tmp_path / "order.txt"
    tasks = [
        Task("late", 5, argv=_append(order, "late")),
        Task("first", 0, argv=_append(order, "first")),
        Task("after-first", 1, argv=_append(order, "after-first"), deps=("derive",)),
        Task("derive", -1, local=lambda: "made", deps=("first",)),
        Task("broken", 2, argv=[PY, "-c", "import sys; sys.exit(3)"]),
        Task("needs-broken", 3, argv=_append(order, "never"), deps=("broken",)),
        Task("local-error", 4, local=lambda: 1 / 0),
    ]
    done = Runner(parallel=1, time_budget=120).run(tasks)
    assert order.read_text().split() == ["first", "after-first", "late"]
    assert done["derive"].ok and done["derive"].value == "made"
    assert not done["broken"].ok and done["broken"].rc == 3 and done["broken"].error == "exit code 3"
    assert done["needs-broken"].error.startswith("needs broken, which failed: exit code 3")
    assert done["local-error"].error == "ZeroDivisionError: division by zero"
    assert all(r.ok for k, r in done.items() if k in ("late", "first", "after-first"))


def test_timeout_kills_the_task_and_its_children(tmp_path):
    pid_file = tmp_path / "child.pid"
    script = (f"import subprocess, time; p = subprocess.Popen(['sleep', '60']); "
              f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)")  # fmt: skip
    start = time.time()
    done = Runner(parallel=2, time_budget=120).run([Task("slow", 0, argv=[PY, "-c", script], timeout=2.0)])
    assert time.time() - start < 20
    assert not done["slow"].ok and "killed after its timeout of 2 s" in done["slow"].error
    child = int(pid_file.read_text())
    for _ in range(50):  # the grandchild got SIGKILL with the group; wait until it is gone
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the task's child process survived its timeout")


def test_time_budget_skips_what_would_not_fit():
    tasks = [Task(f"t{i}", i, argv=[PY, "-c", "import time; time.sleep(1.5)"]) for i in range(4)]
    done = Runner(parallel=1, time_budget=2.5, default_estimate=1.0).run(tasks)
    assert done["t0"].ok
    skipped = [k for k, r in done.items() if not r.ok]
    assert skipped and all("skipped: time budget" in done[k].error for k in skipped)


def test_bad_task_lists_are_refused():
    with pytest.raises(ValueError, match=r"duplicate task keys: \['a'\]"):
        Runner(parallel=1, time_budget=10).run([Task("a", 0, local=lambda: 1), Task("a", 1, local=lambda: 2)])
    with pytest.raises(ValueError, match=r"unknown tasks \['zzz'\]"):
        Runner(parallel=1, time_budget=10).run([Task("a", 0, local=lambda: 1, deps=("zzz",))])
