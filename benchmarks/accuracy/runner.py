"""Run the benchmark's tasks (engine processes and quick local steps) side by side, within a time budget.

Why side by side: an eager vLLM engine of the small model spends ~20-40 s starting (imports, model
load, profiling) and seconds evaluating, mostly on one CPU core; the GPU is nearly idle. Two dozen
engines in a row would take ~15 minutes; up to ``parallel`` at once (each with a fixed, small
``kv_cache_memory_bytes``, so no engine's memory profiling sees another's allocations) fit the
whole study in one short GPU call.

A :class:`Task` is a subprocess (``argv``, killed with its whole process group on timeout or when
the budget's hard deadline passes) or a ``local`` callable run inline (deriving sidecars, writing a
model copy). Tasks start when their dependencies succeeded, lowest ``priority`` first, and only if
the time used so far plus the longest successful process task so far fits ``time_budget``; a task whose
dependency failed or that does not fit is recorded as failed with the reason, never silently dropped.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Task:
    key: str
    priority: float
    argv: list[str] | None = None  # a process task...
    local: Callable[[], object] | None = None  # ... or an inline step
    deps: tuple[str, ...] = ()
    timeout: float = 300.0
    log: Path | None = None


@dataclass
class TaskResult:
    key: str
    ok: bool
    seconds: float = 0.0
    rc: int | None = None
    error: str | None = None
    started_at: float | None = None  # seconds after the runner's t0
    value: object = None  # what a local task returned


@dataclass
class _Running:
    task: Task
    proc: subprocess.Popen
    start: float
    log_file: object


@dataclass
class Runner:
    parallel: int
    time_budget: float
    t0: float = field(default_factory=time.time)
    env: dict[str, str] | None = None
    default_estimate: float = 60.0
    grace: float = 20.0  # past the budget, running tasks are killed after this long
    poll: float = 0.2
    log: Callable[[str], None] = lambda msg: print(f"[accuracy] {msg}", flush=True)

    def elapsed(self) -> float:
        return time.time() - self.t0

    def run(self, tasks: list[Task]) -> dict[str, TaskResult]:
        keys = [t.key for t in tasks]
        if len(set(keys)) != len(keys):
            raise ValueError(f"duplicate task keys: {sorted(k for k in set(keys) if keys.count(k) > 1)}")
        unknown = {d for t in tasks for d in t.deps if d not in set(keys)}
        if unknown:
            raise ValueError(f"tasks depend on unknown tasks {sorted(unknown)}")
        pending = sorted(tasks, key=lambda t: t.priority)
        running: list[_Running] = []
        done: dict[str, TaskResult] = {}
        durations: list[float] = []
        while pending or running:
            self._reap(running, done, durations)
            progressed = self._start_ready(pending, running, done, durations)
            if not progressed and running:
                time.sleep(self.poll)
            elif not progressed and pending:
                # nothing runs and nothing can start: only unmet dependencies remain (a cycle)
                for t in pending:
                    done[t.key] = TaskResult(t.key, False, error=f"dependency cycle among {t.deps}")
                pending.clear()
        return done

    def _start_ready(self, pending, running, done, durations) -> bool:
        progressed = False
        for task in list(pending):
            failed = [d for d in task.deps if d in done and not done[d].ok]
            if failed:
                pending.remove(task)
                reason = done[failed[0]].error or "failed"
                done[task.key] = TaskResult(task.key, False, error=f"needs {failed[0]}, which failed: {reason[:600]}")
                progressed = True
                continue
            if any(d not in done for d in task.deps):
                continue
            if task.local is not None:
                pending.remove(task)
                done[task.key] = self._run_local(task)
                progressed = True
                continue
            if len(running) >= self.parallel:
                continue
            estimate = max(durations) if durations else self.default_estimate
            if self.elapsed() + estimate > self.time_budget:
                pending.remove(task)
                done[task.key] = TaskResult(task.key, False, error=(
                    f"skipped: time budget ({self.elapsed():.0f} s used + ~{estimate:.0f} s per engine "
                    f"> --time-budget {self.time_budget:.0f} s)"))  # fmt: skip
                self.log(f"skip {task.key}: time budget")
                progressed = True
                continue
            pending.remove(task)
            running.append(self._spawn(task))
            progressed = True
        return progressed

    def _run_local(self, task: Task) -> TaskResult:
        start = time.time()
        try:
            value = task.local()
            return TaskResult(task.key, True, time.time() - start, value=value, started_at=start - self.t0)
        except Exception as e:  # noqa: BLE001 - recorded as the task's error
            self.log(f"{task.key} failed: {type(e).__name__}: {e}")
            return TaskResult(task.key, False, time.time() - start, error=f"{type(e).__name__}: {e}"[:2000],
                              started_at=start - self.t0)  # fmt: skip

    def _spawn(self, task: Task) -> _Running:
        assert task.argv is not None
        log_file = open(task.log, "wb") if task.log else subprocess.DEVNULL
        proc = subprocess.Popen(task.argv, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
                                env=self.env)  # fmt: skip
        self.log(f"start {task.key} at {self.elapsed():.0f} s")
        return _Running(task, proc, time.time(), log_file)

    def _reap(self, running, done, durations) -> None:
        hard_deadline = self.t0 + self.time_budget + self.grace
        now = time.time()
        for r in list(running):
            reason = None
            if not _exited(r.proc):
                if now - r.start > r.task.timeout:
                    reason = f"killed after its timeout of {r.task.timeout:.0f} s"
                elif now > hard_deadline:
                    reason = f"killed at the time budget's hard deadline ({self.time_budget + self.grace:.0f} s)"
                else:
                    continue
            # The leader is a zombie (not yet reaped) or alive, so its process group id cannot have
            # been reused: kill what is left of the group (engine processes the task started).
            _kill_group(r.proc)
            rc = r.proc.wait()
            if r.log_file is not subprocess.DEVNULL:
                r.log_file.close()
            running.remove(r)
            seconds = time.time() - r.start
            ok = rc == 0 and reason is None
            if ok:  # the estimate for the next start: the longest successful task so far
                durations.append(seconds)
            error = reason or (None if ok else f"exit code {rc}")
            done[r.task.key] = TaskResult(r.task.key, ok, seconds, rc, error, started_at=r.start - self.t0)
            self.log(f"{'done' if ok else 'FAILED'} {r.task.key} in {seconds:.0f} s" + ("" if ok else f": {error}"))


def _exited(proc: subprocess.Popen) -> bool:
    """Has the process exited? Does not reap it (``WNOWAIT``), so its pid stays reserved."""
    if proc.returncode is not None:
        return True
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
