"""One timed run of a workload on a live vLLM engine: wall time, tokens/s, and the gauges that say
whether the KV cache capped the batch (peak running / waiting requests, peak KV usage,
preemptions), sampled from ``llm.get_metrics()`` every 0.2 s; and the summary of repeated runs."""

from __future__ import annotations

import statistics
import threading
import time


class MetricSampler(threading.Thread):
    """Polls ``llm.get_metrics()`` and keeps the peaks of the gauges that matter."""

    def __init__(self, llm, period: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.llm, self.period = llm, period
        self.stop_event = threading.Event()
        self.peak_running = 0.0
        self.peak_waiting = 0.0
        self.peak_kv_usage = 0.0
        self.samples = 0
        self.error: str | None = None

    def read(self) -> dict[str, float]:
        vals: dict[str, float] = {}
        for m in self.llm.get_metrics():
            v = getattr(m, "value", None)
            if isinstance(v, (int, float)):
                vals[m.name] = vals.get(m.name, 0.0) + float(v)
        return vals

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                vals = self.read()
                self.peak_running = max(self.peak_running, vals.get("vllm:num_requests_running", 0.0))
                self.peak_waiting = max(self.peak_waiting, vals.get("vllm:num_requests_waiting", 0.0))
                self.peak_kv_usage = max(self.peak_kv_usage, vals.get("vllm:kv_cache_usage_perc", 0.0))
                self.samples += 1
            except Exception as e:  # noqa: BLE001
                self.error = f"{type(e).__name__}: {e}"
            self.stop_event.wait(self.period)


def counter(vals: dict[str, float], stem: str) -> float | None:
    for k, v in vals.items():
        if k == stem or k == stem + "_total":
            return v
    return None


def timed_run(llm, prompts: list[dict], params, input_len: int) -> dict:
    """The whole workload in one ``llm.generate``: wall time, tokens/s and the sampled gauges."""
    sampler = MetricSampler(llm)
    try:
        before = sampler.read()
    except Exception as e:  # noqa: BLE001
        before, sampler.error = {}, f"{type(e).__name__}: {e}"
    sampler.start()
    t0 = time.time()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.time() - t0
    sampler.stop_event.set()
    sampler.join(timeout=5)
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    run = {
        "wall_s": round(wall, 2),
        "output_tokens": out_tokens,
        "output_tokens_per_s": round(out_tokens / wall, 1),
        "total_tokens_per_s": round((out_tokens + len(prompts) * input_len) / wall, 1),
        "peak_running_requests": int(sampler.peak_running) if sampler.samples else None,
        "peak_waiting_requests": int(sampler.peak_waiting) if sampler.samples else None,
        "peak_kv_cache_usage": round(sampler.peak_kv_usage, 4) if sampler.samples else None,
        "metric_samples": sampler.samples,
    }  # fmt: skip
    try:
        after = sampler.read()
        p0, p1 = counter(before, "vllm:num_preemptions"), counter(after, "vllm:num_preemptions")
        if p1 is not None:
            run["preemptions"] = int(p1 - (p0 or 0))
    except Exception as e:  # noqa: BLE001
        sampler.error = sampler.error or f"{type(e).__name__}: {e}"
    if sampler.error:
        run["metrics_error"] = sampler.error
    return run


def summarize_runs(runs: list[dict]) -> dict:
    """Median, min and max output tokens/s over the runs, and the spread (max - min) / median."""
    rates = sorted(r["output_tokens_per_s"] for r in runs)
    median = statistics.median(rates)
    return {
        "median_output_tokens_per_s": round(median, 1),
        "min_output_tokens_per_s": rates[0],
        "max_output_tokens_per_s": rates[-1],
        "spread_pct": round(100 * (rates[-1] - rates[0]) / median, 2) if median else None,
    }
