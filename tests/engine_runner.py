"""Run one vLLM engine configuration and dump what the tests compare, as JSON.

A separate process per engine (vLLM spawns workers and holds memory until exit):
``python tests/engine_runner.py '<json spec>' OUT.json``. Used by the CPU tests in CI and by
the GPU end-to-end script.
"""

from __future__ import annotations

import json
import sys
import time


def run(spec: dict) -> dict:
    from vllm import LLM, SamplingParams

    from vllm_kvquant.worker_extension import EXTENSION_PATH

    engine = dict(spec["engine"])
    engine.setdefault("worker_extension_cls", EXTENSION_PATH)
    t0 = time.time()
    llm = LLM(**engine)
    startup_s = time.time() - t0
    steps_at_start = llm.collective_rpc("kvquant_step_report")  # start-up's dummy and capture runs
    # max_tokens: one for every prompt, or a list cycled over each round's prompts (requests then
    # finish one after another, so the decode batch takes every size); "sampling": more options.
    max_tokens = spec.get("max_tokens", 16)
    lengths = max_tokens if isinstance(max_tokens, list) else [max_tokens]
    extra = spec.get("sampling", {})
    results = []
    # Each round runs after the previous one finished, so later rounds can hit the prefix cache.
    for round_prompts in spec["rounds"]:
        params = [SamplingParams(max_tokens=lengths[i % len(lengths)], temperature=0.0, logprobs=1, **extra)
                  for i in range(len(round_prompts))]  # fmt: skip
        outputs = llm.generate(round_prompts, params, use_tqdm=False)
        for prompt, out in zip(round_prompts, outputs):
            completion = out.outputs[0]
            logprobs = [step[tok].logprob for step, tok in zip(completion.logprobs, completion.token_ids)]
            results.append(
                {
                    "prompt": prompt,
                    "token_ids": list(completion.token_ids),
                    "logprobs": logprobs,
                    "num_cached_tokens": getattr(out, "num_cached_tokens", None),
                }
            )
    cache_config = llm.llm_engine.vllm_config.cache_config
    report = llm.collective_rpc("kvquant_backend_report")
    # Per rank: the CUDA-graph mode vLLM settled on, its capture sizes, and the backend's mixed
    # decode+prefill steps while serving the rounds, of which how many were replayed from full CUDA graphs.
    step_report = [
        {**end, **{k: end[k] - start[k] for k in ("mixed_steps", "mixed_steps_full_graph")}}
        for start, end in zip(steps_at_start, llm.collective_rpc("kvquant_step_report"))
    ]
    return {
        "results": results,
        "kv_capacity_tokens": int(cache_config.num_gpu_blocks or 0) * int(cache_config.block_size),
        "block_size": int(cache_config.block_size),
        "cache_dtype": str(cache_config.cache_dtype),
        "backend_report": report,
        "step_report": step_report,
        "startup_s": startup_s,
    }


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    result = run(spec)
    with open(sys.argv[2], "w") as f:
        json.dump(result, f)
