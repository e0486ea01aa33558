"""A small job runner for benchmarks/tp/check.py: subprocesses with dependencies, GPU placement,
per-job time caps and one overall deadline.

Why not one engine after another: each vLLM engine start costs ~30-60 s of process start-up
(imports, worker spawn, NCCL, graph capture) while a tiny model leaves the GPUs idle, so engines
that do not measure time run side by side (tp=1 engines on different GPUs, tp=2 engines on the
same pair), each with a fixed KV-cache size so that vLLM's memory profiling cannot be disturbed
by its neighbours. Jobs marked ``exclusive`` (timings) run alone, after every job listed before them
and before any job listed after them.

Jobs are listed in priority order; a job whose dependencies failed is skipped with the reason,
so that every check that did not run still gets its row.
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
class Job:
    name: str
    argv: list[str] | None = None  # a subprocess; None (and no argv_fn): ``action`` runs in this process
    argv_fn: Callable[[float], list[str]] | None = None  # argv made at launch from the seconds left
    action: Callable[[], None] | None = None
    deps: tuple[str, ...] = ()
    gpus: int = 0  # GPUs the job's engine spans (0: CPU only)
    exclusive: bool = False  # runs alone, once every job before it has finished
    timeout_s: float = 300.0
    min_time_s: float = 0.0  # not started when less than this is left before the deadline
    env: dict[str, str] | None = None
    cwd: Path | None = None
    on_skip: Callable[[str], None] | None = None  # called with the reason when the job cannot run (or its action raised)
    after_any: bool = False  # run once the dependencies have finished, whatever their outcome


@dataclass
class JobState:
    status: str = "pending"  # pending | running | ok | failed | timeout | skipped
    reason: str = ""
    rc: int | None = None
    started: float | None = None
    seconds: float | None = None
    devices: list[str] = field(default_factory=list)
    log: str | None = None
    tail: str | None = None


def tail(path: Path, chars: int = 2500) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children first found through /proc), including those in their
    own sessions (``vllm serve`` and throughput.py's children start new sessions)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def terminate_tree(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM a job's process and everything it started, then SIGKILL what is left after ``grace_s``."""
    tree = [proc.pid, *descendants(proc.pid)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in tree:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.time() + (grace_s if sig == signal.SIGTERM else 5.0)
        while time.time() < deadline and any(_alive(p) for p in tree[1:]):
            time.sleep(0.2)
        if not any(_alive(p) for p in tree):
            break


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Runner:
    """Runs ``jobs`` (priority order) until all are done or ``deadline`` (time.time()) passes."""

    def __init__(self, jobs: list[Job], *, devices: list[str], max_parallel: int, deadline: float,
                 log_dir: Path, on_change: Callable[[], None] = lambda: None, echo=print) -> None:  # fmt: skip
        names = [j.name for j in jobs]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate job names in {names}")
        self.jobs = jobs
        self.state = {j.name: JobState() for j in jobs}
        self.devices = devices
        self.max_parallel = max_parallel
        self.deadline = deadline
        self.log_dir = log_dir
        self.on_change = on_change
        self.echo = echo
        self.procs: dict[str, tuple[subprocess.Popen, float]] = {}
        self.load = {d: 0 for d in devices}

    # ------------------------------------------------------------------ public
    def run(self) -> dict[str, JobState]:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            while any(s.status in ("pending", "running") for s in self.state.values()):
                progressed = self._poll() | self._start_ready()
                if not progressed:
                    time.sleep(0.5)
        finally:
            for name in list(self.procs):
                self._stop(name, "timeout", "interrupted")
        return self.state

    # ------------------------------------------------------------------ internals
    def _finish(self, job: Job, status: str, reason: str = "") -> None:
        st = self.state[job.name]
        st.status, st.reason = status, reason
        if st.started is not None:
            st.seconds = round(time.time() - st.started, 1)
        if status != "ok" and st.log:
            st.tail = tail(Path(st.log))
        self.echo(f"[tp] {job.name}: {status}{' (' + reason + ')' if reason else ''}"
                  f"{f' in {st.seconds} s' if st.seconds is not None else ''}")  # fmt: skip
        if job.on_skip and (status == "skipped" or (status == "failed" and not self._is_process(job))):
            job.on_skip(reason)  # its checks get rows all the same (a failed check action: failed rows)
        self.on_change()

    def _blocked_reason(self, job: Job) -> str | None:
        """Why a pending job can never run (a dependency did not succeed), else None."""
        if job.after_any:
            return None
        for dep in job.deps:
            st = self.state[dep]
            if st.status in ("failed", "timeout", "skipped"):
                why = st.reason or st.status
                return f"{dep} {st.status}: {why}"[:600]
        return None

    def _ready(self, job: Job) -> bool:
        waiting = ("pending", "running") if job.after_any else ("pending", "running", "failed", "timeout", "skipped")
        if any(self.state[d].status in waiting for d in job.deps):
            return False
        before = self.jobs[: self.jobs.index(job)]
        if job.exclusive:
            return not self.procs and all(self.state[j.name].status not in ("pending", "running") for j in before)
        # An exclusive job is a barrier: nothing listed after it starts before it has finished.
        if any(j.exclusive and self.state[j.name].status in ("pending", "running") for j in before):
            return False
        if not self._is_process(job):
            return True
        return len(self.procs) < self.max_parallel

    @staticmethod
    def _is_process(job: Job) -> bool:
        return job.argv is not None or job.argv_fn is not None

    def _job(self, name: str) -> Job:
        return next(j for j in self.jobs if j.name == name)

    def _start_ready(self) -> bool:
        progressed = False
        for job in self.jobs:
            st = self.state[job.name]
            if st.status != "pending":
                continue
            reason = self._blocked_reason(job)
            if reason:
                self._finish(job, "skipped", reason)
                progressed = True
                continue
            if not self._ready(job):
                continue
            left = self.deadline - time.time()
            if left < job.min_time_s:
                self._finish(job, "skipped", f"time budget: {left:.0f} s left, the step needs ~{job.min_time_s:.0f} s")
                progressed = True
                continue
            if not self._is_process(job):
                self._run_action(job)
            else:
                self._launch(job, min(job.timeout_s, left))
            progressed = True
        return progressed

    def _run_action(self, job: Job) -> None:
        st = self.state[job.name]
        st.started = time.time()
        st.status = "running"
        try:
            if job.action:
                job.action()
        except Exception as e:  # noqa: BLE001 - recorded as the job's failure
            import traceback

            traceback.print_exc()
            self._finish(job, "failed", f"{type(e).__name__}: {e}"[:600])
            return
        self._finish(job, "ok")

    def _pick_devices(self, n: int) -> list[str]:
        if n <= 0 or not self.devices:
            return []
        return sorted(self.devices, key=lambda d: (self.load[d], self.devices.index(d)))[:n]

    def _launch(self, job: Job, timeout: float) -> None:
        st = self.state[job.name]
        if job.argv_fn is not None:
            job.argv = job.argv_fn(timeout)
        env = dict(job.env if job.env is not None else os.environ)
        st.devices = self._pick_devices(job.gpus)
        if st.devices:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(st.devices)
        for d in st.devices:
            self.load[d] += 1
        log = self.log_dir / f"{job.name}.log"
        st.log = str(log)
        st.started = time.time()
        st.status = "running"
        with open(log, "w") as fh:
            fh.write(f"$ {' '.join(job.argv)}\n# CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', '')}\n")
            fh.flush()
            proc = subprocess.Popen(job.argv, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=job.cwd,
                                    start_new_session=True)  # fmt: skip
        self.procs[job.name] = (proc, st.started + timeout)
        self.echo(f"[tp] {job.name}: started{' on GPU ' + ','.join(st.devices) if st.devices else ''} (cap {timeout:.0f} s)")

    def _stop(self, name: str, status: str, reason: str) -> None:
        proc, _ = self.procs.pop(name)
        terminate_tree(proc)
        self._release(name)
        self.state[name].rc = proc.returncode
        self._finish(self._job(name), status, reason)

    def _release(self, name: str) -> None:
        for d in self.state[name].devices:
            self.load[d] -= 1

    def _poll(self) -> bool:
        progressed = False
        now = time.time()
        for name, (proc, kill_at) in list(self.procs.items()):
            rc = proc.poll()
            if rc is None:
                if now > kill_at:
                    cap = kill_at - self.state[name].started
                    self._stop(name, "timeout", f"stopped after {cap:.0f} s (step cap or overall deadline)")
                    progressed = True
                continue
            self.procs.pop(name)
            self._release(name)
            self.state[name].rc = rc
            if rc == 0:
                self._finish(self._job(name), "ok")
            else:
                from benchmarks.harness import root_cause

                cause = root_cause(tail(Path(self.state[name].log), 200_000)) or ""
                self._finish(self._job(name), "failed", f"exit {rc}{': ' + cause if cause else ''}")
            progressed = True
        return progressed
