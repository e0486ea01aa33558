"""Bad input against a loaded ``vllm serve --attention-backend kvquant``: each gets a clear 4xx (or
the stream just ends) and the server keeps serving, with nothing lost.

The session's kvquant server (tests/conftest.py, shared with tests/test_serve.py: one start) and
the checks of the load harness ``benchmarks/serving/serve_load_checks.py`` (its ``bad_input`` record
on the GPU), so the GPU run and CI check the same things:

- a prompt longer than ``max_model_len``: 400 and a message naming the limit;
- malformed JSON: 4xx; an unknown model name: 404 naming it;
- all three while background requests keep the server busy: none of those fails, and each
  answers as the idle server did;
- a client that disconnects mid-stream: the server aborts the request (no running request, KV
  cache usage back to 0 on ``/metrics``: no leaked blocks), then answers as before.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("vllm")
from serve_client import MODEL_NAME, concurrency_prompts  # noqa: E402 - tests/ is on sys.path under pytest

from benchmarks.serving import serve_load_checks as checks  # noqa: E402
from benchmarks.serving.serve_load_server import served_model  # noqa: E402


@pytest.fixture(scope="module")
def server(kvquant_server):
    url, _, max_model_len = kvquant_server
    assert served_model(url) == {"id": MODEL_NAME, "max_model_len": max_model_len}
    return url, max_model_len


def test_overlong_prompt_is_a_400_naming_the_limit(server) -> None:
    url, max_model_len = server
    got = checks.check_overlong_prompt(url, MODEL_NAME, max_model_len)
    assert got["ok"], got
    assert got["status"] == 400 and str(max_model_len) in got["message"], got


def test_malformed_json_is_a_4xx(server) -> None:
    url, _ = server
    got = checks.check_malformed_json(url, MODEL_NAME)
    assert got["ok"] and 400 <= got["status"] < 500, got


def test_unknown_model_is_a_404(server) -> None:
    url, _ = server
    got = checks.check_unknown_model(url)
    assert got["ok"] and got["status"] == 404, got


def test_disconnect_mid_stream_is_aborted_and_nothing_leaks(server) -> None:
    url, max_model_len = server
    prompt = concurrency_prompts(1)[0]
    before = checks.complete(url, MODEL_NAME, prompt, 8)
    # max_tokens: about a second of decoding even on a GPU, so the abort lands mid-stream
    got = checks.check_disconnect_mid_stream(url, MODEL_NAME, prompt, max_tokens=max_model_len - 128)
    assert got["status"] == 200 and got["events_read"] == 3, got
    assert got["drained"]["ok"], got  # no running request and vllm:kv_cache_usage_perc back to 0
    assert got["drained"]["metric"] == "vllm:kv_cache_usage_perc", got
    assert got["tokens_generated"] < got["max_tokens"], got  # aborted, not run to the end unseen
    assert checks.complete(url, MODEL_NAME, prompt, 8)["tokens"] == before["tokens"]


def test_bad_input_while_loaded_loses_nothing(server) -> None:
    """The harness's whole ``bad_input`` record, as on the GPU: the checks above with
    background requests running, every background answer equal to the idle server's."""
    url, max_model_len = server
    record = checks.bad_input_checks(url, MODEL_NAME, max_model_len, concurrency_prompts(4), max_tokens=8,
                                         stream_tokens=max_model_len - 128, workers=4)  # fmt: skip
    print("BAD-INPUT", json.dumps(record))
    assert [c["ok"] for c in record["checks"]] == [True] * 4, record["checks"]
    assert record["background"]["requests"] > 0 and record["background"]["failed"] == 0, record["background"]
    assert record["background"]["differ_from_idle_answer"] == 0, record["background"]
    assert record["after"]["same_answer_as_before"], record
    assert record["ok"]
