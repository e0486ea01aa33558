"""Where a vLLM engine step's GPU time goes, from a ``torch.profiler`` chrome trace (pure Python).

``profile_step.py`` profiles an engine with vLLM's own profiler (``profiler_config``: the worker
wraps every ``execute_model`` in a ``record_function`` named
``execute_context_<requests>(<tokens>)_generation_<requests>(<tokens>)``, vLLM 0.26
``gpu_worker.annotate_profile``); this module reads the trace it writes:

- **steps**: each ``execute_*`` annotation starts a step, which owns every kernel *launched*
  (``cuda_runtime`` / ``cuda_driver`` event, e.g. ``cudaLaunchKernel``, ``cuLaunchKernelEx``,
  ``cudaGraphLaunch``) from its start to the next step's start, matched to the kernel by the
  CUPTI correlation id, so sampling and kernels replayed from a CUDA graph count too; a kernel
  whose launch was not recorded goes to the step of the kernel that ran just before it. Kind:
  ``decode`` (only generating requests), ``prefill`` (only requests without output yet; chunked
  prefills included) or ``mixed``.
- **kernel categories** by name (:data:`KERNEL_TABLE`, first match wins; memcpy/memset are
  ``other``). FA3 and vLLM's Triton attention serve decodes and prefills in one launch, so their
  time goes by step: ``decode_attention`` in decode steps, ``prefill_attention`` in prefill steps
  and in mixed steps whose decodes ran our Triton decode kernel (FA3 then did only the prefill
  part), else ``attention_mixed``.
- **per step**: ``span_us``, from the step's first kernel start to the next step's first kernel
  start (the last step: to its last kernel end); ``busy_us``, the union of its kernels'
  intervals; ``idle_us = span_us - busy_us``, the GPU waiting for the host (scheduling, input
  preparation, launches; the profiler's own host overhead included); and the kernel time per
  category (a sum: kernels on concurrent streams count fully).
- **where the idle time goes** (per step kind): ``idle_gaps``, the GPU's gaps inside each step and
  from its last kernel to the next step's first, summed by the kernel before, the kernel after
  and the host ops that launched the one after (innermost first, e.g. ``aten::copy_ <
  vllm::unified_attention_with_output``); and ``host_syncs``, the runtime calls that block the
  host on the GPU (``cudaStreamSynchronize``, ``cudaDeviceSynchronize``, ``cudaEventSynchronize``,
  synchronous ``cudaMemcpy``) with the host ops they ran under: with vLLM's async scheduling
  a sync in a step's forward exposes every launch after it as idle GPU time.
"""

from __future__ import annotations

import bisect
import functools
import gzip
import json
import re
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

#: Step kinds with at most this many steps list each step (``per_kind[kind]["each"]``).
MAX_LISTED_STEPS = 24
CATEGORIES = ("decode_attention", "prefill_attention", "attention_mixed", "cache_write", "gemm", "other")
#: (category, pattern searched in the kernel name, what it matches); "attention" is split by step.
KERNEL_TABLE: tuple[tuple[str, str, str], ...] = (
    ("decode_attention", r"^_decode_(split|reduce)_kernel\b", "kvquant Triton decode (kernels/decode_triton.py)"),
    ("prefill_attention", r"^(prefill_attention_kernel|_fill_context_kernel)\b",
     "kvquant Triton prefill / context merge (kernels/prefill_kernel.py), workspace fill (kernels/context_fill.py)"),
    ("cache_write", r"^_quantize_to_cache_kernel\b|reshape_and_cache",
     "kvquant quantize-on-write (kernels/quantize_cache.py); vLLM reshape_and_cache(_flash)"),
    ("attention", r"flash_fwd|FlashAttnFwd|flash::|prepare_varlen|kernel_unified_attention|reduce_segments",
     "FA3 (vLLM FLASH_ATTN, kvquant's FA3 prefill / kernel 'fa3'), vLLM TRITON_ATTN: split by step"),
    ("gemm", r"nvjet|sm90_xmma|sm80_xmma|cutlass|gemm|gemv|cublas", "cuBLAS / CUTLASS matrix multiplies"),
)  # fmt: skip
_COMPILED = [(cat, re.compile(pat)) for cat, pat, _ in KERNEL_TABLE]
_KERNEL_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
_LAUNCH_CATS = ("cuda_runtime", "cuda_driver")
_SYNC = re.compile(r"Synchronize|^cudaMemcpy$|^cuMemcpyDtoH(_v2)?$|^cudaMemcpy2D$")
_HOST_CATS = ("cpu_op", "user_annotation", "python_function")
_STEP = re.compile(r"^execute_(?:\d+_)?context_(\d+)\((?:sq)?(\d+).*?\)_generation_(\d+)\((?:sq)?(\d+)")


def kernel_family(name: str) -> str:
    """The table's category of a kernel name (``attention`` is resolved per step), else ``other``."""
    for cat, pattern in _COMPILED:
        if pattern.search(name):
            return cat
    return "other"


def short_name(name: str, limit: int = 120) -> str:
    """A kernel name without template arguments and parameter lists (``void`` dropped)."""
    name = re.sub(r"^void\s+", "", name)
    for sep in ("<", "("):
        if sep in name and not name.startswith(sep):
            name = name.split(sep, 1)[0]
    return name[:limit]


def step_kind(num_context: int, num_generation: int) -> str:
    if num_context and num_generation:
        return "mixed"
    return "prefill" if num_context else "decode"


@dataclass
class Kernel:
    name: str
    start: float  # us
    dur: float  # us
    family: str
    launch: tuple[float, object] | None = None  # (host time, thread) of its launch, when recorded


@dataclass
class HostCall:
    """A runtime call that blocks the host (see ``_SYNC``)."""

    name: str
    start: float  # us
    dur: float  # us
    tid: object


@dataclass
class Step:
    """One engine step: its annotation and the kernels it launched."""

    annotation: str
    start: float  # host time of the annotation start (us)
    kind: str
    context_tokens: int
    generation_requests: int
    kernels: list[Kernel] = field(default_factory=list)
    syncs: list[HostCall] = field(default_factory=list)

    def category(self, kernel: Kernel) -> str:
        """The kernel's category in this step (call once every kernel is attributed)."""
        if kernel.family != "attention":
            return kernel.family
        if self.kind == "mixed":
            return "prefill_attention" if self._ours_decode else "attention_mixed"
        return "decode_attention" if self.kind == "decode" else "prefill_attention"

    @functools.cached_property
    def _ours_decode(self) -> bool:
        """Our Triton decode kernel ran this step's decodes (FA3 then did only the prefill part)."""
        return any(k.family == "decode_attention" for k in self.kernels)

    def busy_us(self) -> float:
        """Union of the kernels' intervals."""
        total, end = 0.0, float("-inf")
        for k in sorted(self.kernels, key=lambda k: k.start):
            s, e = max(k.start, end), k.start + k.dur
            if e > s:
                total += e - s
            end = max(end, e)
        return total


def load_trace(path: Path) -> list[dict]:
    """The ``traceEvents`` of a chrome trace (``.json`` or ``.json.gz``)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def find_steps(events: list[dict]) -> tuple[list[Step], dict]:
    """The trace's steps with their kernels, and counts: kernels placed by GPU order (no launch
    recorded), and kernels left out (before the first step; no launch and nothing ran before)."""
    steps = []
    for e in events:
        if e.get("ph") == "X" and e.get("cat") == "user_annotation":
            m = _STEP.match(str(e.get("name", "")))
            if m:
                ctx_reqs, ctx_tok, gen_reqs = int(m.group(1)), int(m.group(2)), int(m.group(3))
                steps.append(Step(e["name"], float(e["ts"]), step_kind(ctx_reqs, gen_reqs), ctx_tok, gen_reqs))
    steps.sort(key=lambda s: s.start)
    starts = [s.start for s in steps]
    launches: dict[int, tuple[float, object]] = {}
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in _LAUNCH_CATS:
            ts = float(e["ts"])
            corr = (e.get("args") or {}).get("correlation")
            if corr is not None:
                launches[corr] = (ts, e.get("tid"))
            if _SYNC.search(str(e.get("name", ""))):
                i = bisect.bisect_right(starts, ts) - 1
                if i >= 0:
                    steps[i].syncs.append(HostCall(str(e["name"]), ts, float(e.get("dur", 0.0)), e.get("tid")))
    counts = {"by_gpu_order": 0, "no_launch": 0, "before_first_step": 0}
    placed: list[tuple[float, int]] = []  # (GPU start, step) of the kernels placed by their launch
    orphans: list[Kernel] = []
    for e in events:
        if e.get("ph") != "X" or e.get("cat") not in _KERNEL_CATS:
            continue
        name = str(e.get("name", ""))
        launch = launches.get((e.get("args") or {}).get("correlation"))
        family = kernel_family(name) if e["cat"] == "kernel" else "other"
        kernel = Kernel(name, float(e["ts"]), float(e.get("dur", 0.0)), family, launch)
        if launch is None:
            orphans.append(kernel)
            continue
        i = bisect.bisect_right(starts, launch[0]) - 1
        if i < 0:
            counts["before_first_step"] += 1
            continue
        steps[i].kernels.append(kernel)
        placed.append((kernel.start, i))
    # A kernel whose launch was not recorded belongs to the step of the placed kernel that ran just
    # before it (one stream runs kernels in launch order).
    placed.sort()
    for kernel in orphans:
        j = bisect.bisect_right(placed, (kernel.start, len(steps))) - 1
        if j < 0:
            counts["no_launch"] += 1
            continue
        steps[placed[j][1]].kernels.append(kernel)
        counts["by_gpu_order"] += 1
    return steps, counts


def _ran(steps: list[Step]) -> list[tuple[Step, float, float | None]]:
    """The steps that ran kernels, each with its first kernel's start and the next such step's
    (None for the last): the bounds of its span."""
    ran = [(s, min(k.start for k in s.kernels)) for s in steps if s.kernels]
    return [(s, first, ran[i + 1][1] if i + 1 < len(ran) else None) for i, (s, first) in enumerate(ran)]


def step_table(steps: list[Step]) -> list[dict]:
    """Per step: kind, span, busy and idle time, kernel time per category (us)."""
    rows = []
    for step, first, nxt in _ran(steps):
        end = nxt if nxt is not None else max(k.start + k.dur for k in step.kernels)
        busy = step.busy_us()
        cats = dict.fromkeys(CATEGORIES, 0.0)
        for k in step.kernels:
            cats[step.category(k)] += k.dur
        rows.append({"kind": step.kind, "span_us": end - first, "busy_us": busy,
                     "idle_us": max(0.0, end - first - busy), "kernels": len(step.kernels),
                     "context_tokens": step.context_tokens, "generation_requests": step.generation_requests,
                     **{f"{c}_us": v for c, v in cats.items()}})  # fmt: skip
    return rows


class HostIndex:
    """The host ops (aten ops, ``record_function`` annotations, Python frames) of each thread, to
    name what a launch or a sync ran under."""

    def __init__(self, events: list[dict]) -> None:
        by_tid: dict[object, list[tuple[float, float, str]]] = defaultdict(list)
        for e in events:
            if e.get("ph") == "X" and e.get("cat") in _HOST_CATS and not _STEP.match(str(e.get("name", ""))):
                start = float(e["ts"])
                by_tid[e.get("tid")].append((start, start + float(e.get("dur", 0.0)), str(e.get("name", ""))))
        self._ops = {tid: sorted(ops) for tid, ops in by_tid.items()}
        self._starts = {tid: [op[0] for op in ops] for tid, ops in self._ops.items()}

    def under(self, ts: float, tid: object, depth: int = 3, lookback: int = 400) -> str:
        """The ``depth`` innermost host ops of thread ``tid`` running at ``ts``, innermost first."""
        ops, starts = self._ops.get(tid), self._starts.get(tid)
        if not ops:
            return ""
        names: list[str] = []
        i = bisect.bisect_right(starts, ts) - 1
        stop = max(-1, i - lookback)
        while i > stop and len(names) < depth:
            start, end, name = ops[i]
            if end >= ts:
                names.append(name)
            i -= 1
        return " < ".join(names)


def _gaps(step: Step, next_first: float | None) -> list[tuple[float, Kernel, Kernel | None]]:
    """The step's idle GPU intervals: (length, kernel before, kernel after; None: the next step's)."""
    kernels = sorted(step.kernels, key=lambda k: k.start)
    out = []
    end, last = kernels[0].start + kernels[0].dur, kernels[0]
    for k in kernels[1:]:
        if k.start > end:
            out.append((k.start - end, last, k))
        if k.start + k.dur >= end:
            end, last = k.start + k.dur, k
    if next_first is not None and next_first > end:
        out.append((next_first - end, last, None))
    return out


def idle_breakdown(steps: list[Step], host: HostIndex | None = None, top: int = 8, min_us: float = 2.0) -> dict:
    """Per step kind: the ``top`` (kernel before, kernel after, launched under) gap groups by total
    idle time, each with its count and mean per step, and the host syncs by call and host op."""
    groups: dict[str, dict[tuple[str, str, str], list[float]]] = defaultdict(dict)
    syncs: dict[str, dict[tuple[str, str], list[float]]] = defaultdict(dict)
    nsteps: dict[str, int] = defaultdict(int)
    for step, _first, nxt in _ran(steps):
        nsteps[step.kind] += 1
        for gap, before, after in _gaps(step, nxt):
            if gap < min_us:
                continue
            launched = ""
            if after is not None and after.launch is not None and host is not None:
                launched = host.under(*after.launch)
            key = (short_name(before.name, 60), "(next step)" if after is None else short_name(after.name, 60), launched)
            entry = groups[step.kind].setdefault(key, [0.0, 0])
            entry[0] += gap
            entry[1] += 1
        for call in step.syncs:
            key = (call.name, host.under(call.start, call.tid) if host is not None else "")
            entry = syncs[step.kind].setdefault(key, [0.0, 0])
            entry[0] += call.dur
            entry[1] += 1
    out = {}
    for kind, n in nsteps.items():
        ranked = sorted(groups[kind].items(), key=lambda kv: -kv[1][0])[:top]
        sync_ranked = sorted(syncs[kind].items(), key=lambda kv: -kv[1][1])[:top]
        out[kind] = {
            "idle_gaps": [{"before": b, "after": a, "launched_under": u, "count": c, "total_us": round(t, 1),
                           "mean_us_per_step": round(t / n, 1)} for (b, a, u), (t, c) in ranked],
            "host_syncs_per_step": round(sum(v[1] for v in syncs[kind].values()) / n, 2),
            "host_syncs": [{"call": name, "under": u, "count": c, "total_us": round(t, 1)}
                           for (name, u), (t, c) in sync_ranked],
        }  # fmt: skip
    return out


def summarize(steps: list[Step], top: int = 10, host: HostIndex | None = None) -> dict:
    """Mean per step of each kind (span, busy, idle, categories), the ``top`` kernels by time and
    where the idle time goes (:func:`idle_breakdown`); ``steps`` counts the steps that ran
    kernels, ``annotated_steps`` all (CPU engines run none)."""
    table = step_table(steps)
    by_kind: dict[str, list[dict]] = defaultdict(list)
    for row in table:
        by_kind[row["kind"]].append(row)
    keys = ["span_us", "busy_us", "idle_us", *(f"{c}_us" for c in CATEGORIES), "kernels", "context_tokens",
            "generation_requests"]  # fmt: skip
    per_kind = {}
    for kind in ("decode", "mixed", "prefill"):
        rows = by_kind.get(kind, [])
        if rows:
            idle = sorted(r["idle_us"] for r in rows)
            per_kind[kind] = {"steps": len(rows), **{f"mean_{k}": round(sum(r[k] for r in rows) / len(rows), 2) for k in keys},
                              "median_idle_us": round(statistics.median(idle), 2), "max_idle_us": round(idle[-1], 2)}  # fmt: skip
            if len(rows) <= MAX_LISTED_STEPS:  # the few mixed / prefill steps: one outlier can make the mean
                per_kind[kind]["each"] = [{k: round(v, 1) if isinstance(v, float) else v for k, v in r.items() if k != "kind"}
                                          for r in rows]  # fmt: skip
    totals: dict[tuple[str, str], list[float]] = {}
    for step in steps:
        for k in step.kernels:
            entry = totals.setdefault((short_name(k.name), step.category(k)), [0.0, 0])
            entry[0] += k.dur
            entry[1] += 1
    grand = sum(v[0] for v in totals.values())
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]
    top_kernels = [{"name": n, "category": c, "total_us": round(t, 1), "count": cnt, "share": round(t / grand, 4)}
                   for (n, c), (t, cnt) in ranked]  # fmt: skip
    return {"annotated_steps": len(steps), "steps": len(table), "per_kind": per_kind, "top_kernels": top_kernels,
            "kernel_time_us": round(grand, 1), "idle": idle_breakdown(steps, host)}  # fmt: skip


def analyze(path: Path, top: int = 10) -> dict:
    """:func:`summarize` of one trace file, with what could not be attributed to a step."""
    events = load_trace(path)
    steps, attribution = find_steps(events)
    return {**summarize(steps, top, HostIndex(events)), "kernel_attribution": attribution, "trace": path.name}
