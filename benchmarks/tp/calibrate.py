"""``vllm-kvquant calibrate ARGS`` with a fixed KV-cache size (``TP_CHECK_KV_CACHE_BYTES``).

``benchmarks.tp.check`` starts several engines on the same GPUs at once. vLLM sizes the KV cache
by profiling the GPU's free memory, and aborts ("Error in memory profiling ... other processes
release GPU memory") when a neighbour frees memory meanwhile. With ``kv_cache_memory_bytes`` vLLM
skips that profiling. The CLI's own ``--kv-cache-memory-bytes`` is used where it has one; else the
engine options it builds get that one key added. Everything else is the CLI unchanged.
"""

from __future__ import annotations

import argparse
import os
import sys

FLAG = "--kv-cache-memory-bytes"


def calibrate_options() -> set[str]:
    from vllm_kvquant import cli

    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {o for a in sub.choices["calibrate"]._actions for o in a.option_strings}


def main(argv: list[str]) -> int:
    from vllm_kvquant import calibrate, cli

    kv_bytes = int(os.environ.get("TP_CHECK_KV_CACHE_BYTES", "0"))
    if kv_bytes > 0 and FLAG in calibrate_options():
        argv = [*argv, FLAG, str(kv_bytes)]
    elif kv_bytes > 0:
        engine_args = calibrate.calibration_engine_args

        def with_fixed_kv_cache(args, max_model_len):  # type: ignore[no-untyped-def]
            return {**engine_args(args, max_model_len), "kv_cache_memory_bytes": kv_bytes}

        calibrate.calibration_engine_args = with_fixed_kv_cache
    print("tp_calibrate: vllm-kvquant", " ".join(argv), flush=True)
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
