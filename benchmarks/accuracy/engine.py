"""Run one accuracy evaluation in its own process: one vLLM engine, one pass over the windows.

    python -m benchmarks.accuracy.engine TASK.json

``TASK.json``: ``{"label", "engine": {LLM kwargs}, "windows": PATH, "capture": PATH, "result": PATH}``;
the windows file holds ``{"prompts": [[ids]], "forced": [[ids]]}``: each prompt is prefilled in chunks
(so later chunks read the cache), then its forced tokens are decoded one at a time (teacher-forced,
:class:`benchmarks.accuracy.worker.ForcedTokens`). The worker extension records every token's final hidden
state into ``capture``; ``result`` gets timings, what the engine really ran (attention backend,
cache dtype, scales of the first layer), vLLM's own logprobs of the prompt tokens (for the driver's
cross-check) and, on failure, ``error``. A process per engine: vLLM frees memory only at exit, and
engines run side by side (:mod:`benchmarks.accuracy.runner`).
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path


def _layer_key(name: str) -> tuple:
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split("."))


def engine_report(llm, kvquant: bool) -> dict:
    """Attention backend, cache dtype and the first layer's scales, as the workers hold them."""
    from vllm_kvquant.demo import kv_capacity_tokens

    out: dict = {"kv_capacity_tokens": kv_capacity_tokens(llm)}
    try:
        layers = llm.collective_rpc("bench_attention_scales")[0]
        if kvquant:
            for name, r in llm.collective_rpc("kvquant_backend_report")[0].items():
                layers.setdefault(name, {}).update(
                    {k: r.get(k) for k in ("k_scale", "v_scale", "kv_dtype", "scales_source")}
                )
        if layers:
            first = layers[sorted(layers, key=_layer_key)[0]]
            out["backend"] = first.get("backend")
            out["kv_cache_dtype"] = first.get("kv_cache_dtype")
            out["layer0_scales"] = {k: first[k] for k in ("kv_dtype", "q_scale_float", "k_scale", "v_scale",
                                                          "scales_source") if k in first}  # fmt: skip
    except Exception as e:  # noqa: BLE001 - a report is a nicety, the metrics are not
        out["report_error"] = f"{type(e).__name__}: {e}"
    return out


def run(task: dict) -> dict:
    from vllm import LLM, SamplingParams

    from benchmarks.accuracy.worker import FORCED_KEY

    windows = json.loads(Path(task["windows"]).read_text())
    prompts, forced = windows["prompts"], windows["forced"]
    engine = task["engine"]
    res: dict = {}
    t0 = time.time()
    llm = LLM(**engine)
    res["engine_start_s"] = round(time.time() - t0, 1)
    params = [
        SamplingParams(max_tokens=max(1, len(f)), temperature=0.0, prompt_logprobs=0, detokenize=False,
                       ignore_eos=True, extra_args={FORCED_KEY: f} if f else None)
        for f in forced
    ]  # fmt: skip
    if any(forced) and not engine.get("logits_processors"):
        raise ValueError("forced decode tokens need the ForcedTokens logits processor in the engine arguments")
    llm.collective_rpc("acc_capture_start")
    t1 = time.time()
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    finally:
        capture = llm.collective_rpc("acc_capture_stop", args=(task["capture"],))[0]
    res["run_s"] = round(time.time() - t1, 1)
    res["capture"] = capture
    # after the run: online scales are measured from the first batch each layer writes
    res.update(engine_report(llm, engine.get("attention_backend") == "kvquant"))
    prompt_lp, bad = [], []
    for i, (p, f, o) in enumerate(zip(prompts, forced, outs)):
        got = list(o.outputs[0].token_ids)
        if f and got != list(f):
            bad.append(i)
        entries = o.prompt_logprobs or []
        if len(entries) != len(p) or any(e is None for e in entries[1:]):
            raise RuntimeError(f"window {i}: vLLM returned {len(entries)} prompt logprob entries for {len(p)} tokens")
        prompt_lp.append([entries[j][p[j]].logprob for j in range(1, len(p))])
    if bad:
        raise RuntimeError(f"forced decoding did not follow the held-out tokens in windows {bad[:8]}: "
                           "the ForcedTokens logits processor was not applied")  # fmt: skip
    res["vllm_prompt_logprobs"] = prompt_lp
    del llm
    return res


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    task = json.loads(Path(argv[0]).read_text())
    result: dict = {"label": task.get("label")}
    rc = 0
    try:
        result.update(run(task))
    except BaseException as e:  # noqa: BLE001 - recorded, then the process exits non-zero
        result["error"] = f"{type(e).__name__}: {e}"[:4000]
        traceback.print_exc()
        rc = 1
    Path(task["result"]).write_text(json.dumps(result))
    sys.stdout.flush()
    sys.stderr.flush()
    return rc


if __name__ == "__main__":
    import os

    code = main(sys.argv[1:])
    os._exit(code)  # skip interpreter teardown: vLLM's engine threads can hang it
