"""One ``vllm serve MODEL --tensor-parallel-size N --attention-backend kvquant`` checked with the
OpenAI client (tests/serve_client.py: the helpers tests/test_serve.py uses): completions and chat,
plain and streamed, then ``--concurrent`` requests at once; the result is written as JSON.

    python -m benchmarks.tp.serve MODEL --tp 2 --scales S.json --out R.json [--server-arg=--x ...]
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--scales", required=True, help="sidecar passed through --additional-config")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--log", type=Path, required=True, help="server log")
    ap.add_argument("--concurrent", type=int, default=64)
    ap.add_argument("--server-arg", action="append", default=[], help="extra vllm serve argument (repeat)")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the server (finally) when stopped

    from serve_client import completions_and_chat, concurrent_vs_sequential, running_server, server_env

    server_args = ["--attention-backend", "kvquant", "--dtype", "bfloat16", "--max-model-len", "1024",
                   "--enable-prefix-caching", "--enable-chunked-prefill",
                   "--additional-config", json.dumps({"kvquant": {"scales": args.scales, "fallback": "error"}}),
                   *args.server_arg]  # fmt: skip
    if args.tp > 1:
        server_args += ["--tensor-parallel-size", str(args.tp)]
    result: dict = {"tp": args.tp, "server_args": server_args}
    t0 = time.time()
    try:
        with running_server(args.model, args.log, server_args, env=server_env()) as url:
            result["startup_s"] = round(time.time() - t0, 1)
            result["chat"] = completions_and_chat(url)
            result["concurrent"] = concurrent_vs_sequential(url, args.concurrent)
    finally:
        result["seconds"] = round(time.time() - t0, 1)
        lines = [l for l in args.log.read_text(errors="replace").splitlines() if "kvquant:" in l and "K/V with" in l]
        result["log_kvquant_lines"] = list(dict.fromkeys(lines))[:16]
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
