"""Full-CUDA-graph launches of the backend give what eager launches give, for any decode/prefill mix.

Under ``cudagraph_mode=FULL`` vLLM captures a step once (metadata from
``build_for_cudagraph_capture``, a dummy batch of ``num_tokens`` spread over
``min(num_tokens, max_num_seqs)`` requests) and replays it with new contents in the same
buffers (query_start_loc, seq_lens, block_table, slot_mapping) without re-running ``forward``.
Here the "replay" is ``forward`` with the capture-time metadata after the buffers were
rewritten with a real, padded batch: every launch parameter is the capture's, every length
comes from the buffers. Outputs must match the eager build of the same batch and the PyTorch
reference per request (decodes read the 8-bit cache, prefills attend to context + own K/V).

On CPU the kernels run in Triton's interpreter (``interpreter``) or as the PyTorch reference
path (``reference``); the GPU twin captures and replays a real CUDA graph.
Tolerance: atol = rtol = 3e-2 on bf16 outputs (the kernel tests' 2e-2 plus one more bf16
rounding of a different split count / tile size between the two plans).
"""

from __future__ import annotations

from types import SimpleNamespace

import _triton_env  # noqa: F401  (sets TRITON_INTERPRET=1 before triton is imported)
import pytest
import torch

pytest.importorskip("vllm")

from backend_batches import Buffers, make_setup, reference_output, step_inputs, write_context  # noqa: E402

TOL = dict(atol=3e-2, rtol=3e-2)
MAX_REQS, MAX_TOKENS = 8, 32

# (query_lens, context_lens): decodes first, as vLLM orders a batch.
BATCHES = {
    "mixed": ([1, 1, 1, 5, 3], [20, 0, 37, 0, 18]),
    "decodes": ([1, 1, 1], [5, 40, 17]),
    "prefills": ([4, 7], [0, 23]),
}


@pytest.fixture(params=["interpreter", "reference"])
def path(request, monkeypatch):
    if request.param == "reference":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    elif not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    return request.param


def _capture_batch(num_tokens: int) -> tuple[list[int], list[int]]:
    """vLLM's capture dummy batch (gpu_model_runner._dummy_run, mixed mode; 0.26's
    vllm/v1/worker/gpu InputBatch.make_dummy spreads the tokens the same way)."""
    num_reqs = min(num_tokens, MAX_REQS)
    lens = [num_tokens // num_reqs] * num_reqs
    lens[-1] += num_tokens % num_reqs
    return lens, [0] * num_reqs


def _eager(setup, query_lens, context_lens, device="cpu"):
    bufs = Buffers.alloc(setup, MAX_REQS, MAX_TOKENS)
    m = bufs.fill(setup, query_lens, context_lens)
    write_context(setup, m, query_lens, context_lens)
    q, k, v = step_inputs(setup, m.num_actual_tokens)
    setup.impl.do_kv_cache_update(setup.layer, k, v, setup.kv_cache, m.slot_mapping)
    md = setup.builder.build(0, m)
    out = torch.full_like(q, float("nan"))
    setup.impl.forward(setup.layer, q, k, v, setup.kv_cache, md, out)
    return out, reference_output(setup, m, q, k, v, query_lens, context_lens), md


def _replay(setup, bufs, md_capture, capture_tokens, query_lens, context_lens, run=None):
    """Rewrite the buffers with a real batch padded like the capture; run the captured step."""
    m = bufs.fill(setup, query_lens, context_lens, num_reqs_padded=md_capture.seq_lens.shape[0],
                  num_tokens_padded=capture_tokens)  # fmt: skip
    write_context(setup, m, query_lens, context_lens)
    q, k, v = step_inputs(setup, capture_tokens)
    out = torch.full_like(q, float("nan"))
    if run is None:  # CPU: forward with the capture-time metadata is what a replay executes
        setup.impl.do_kv_cache_update(setup.layer, k, v, setup.kv_cache, md_capture.slot_mapping)
        setup.impl.forward(setup.layer, q, k, v, setup.kv_cache, md_capture, out)
    else:
        run(q, k, v, out)
    n = sum(query_lens)
    return out, reference_output(setup, m, q[:n], k[:n], v[:n], query_lens, context_lens)


@pytest.mark.parametrize("kv_dtype", ["int8", "fp8_e4m3"])
@pytest.mark.parametrize("batch", list(BATCHES))
def test_eager_build_matches_reference(path, batch, kv_dtype):
    setup = make_setup(kv_dtype=kv_dtype, max_num_seqs=MAX_REQS)
    query_lens, context_lens = BATCHES[batch]
    out, ref, md = _eager(setup, query_lens, context_lens)
    assert (1 in query_lens) == bool(md.decode) and (max(query_lens) > 1) == (md.prefill is not None)
    assert not md.graph_safe
    torch.testing.assert_close(out.float(), ref.float(), **TOL)


@pytest.mark.parametrize("capture_tokens", [8, 24])
def test_graph_replay_of_any_mix_matches_eager(path, capture_tokens):
    """One capture (all-decode dummy batch at 8 tokens, multi-token requests at 24) replays
    decode-only, prefill-only and mixed batches, including one out of decode-first order."""
    setup = make_setup(kv_dtype="int8", max_num_seqs=MAX_REQS, num_blocks=160)
    bufs = Buffers.alloc(setup, MAX_REQS, MAX_TOKENS)
    lens, ctx = _capture_batch(capture_tokens)
    m = bufs.fill(setup, lens, ctx, max_query_len=capture_tokens)
    md = setup.builder.build_for_cudagraph_capture(m)
    assert md.graph_safe and md.prefill is not None and md.prefill.all_rows
    assert md.decode[setup.num_heads].num_seqs == len(lens)  # grid over every padded request
    assert torch.equal(md.seq_lens.cpu(), torch.tensor(lens, dtype=torch.int32))  # capture: no context
    out, ref = _replay(setup, bufs, md, capture_tokens, *_capture_batch(capture_tokens))  # the warm-up run
    torch.testing.assert_close(out[:capture_tokens].float(), ref.float(), **TOL)

    batches = [b for b in BATCHES.values() if sum(b[0]) <= capture_tokens and len(b[0]) <= len(lens)]
    batches.append(([3, 1, 2, 1], [9, 30, 0, 0]))  # not decode-first: the graph path does not care
    for query_lens, context_lens in batches:
        out, ref = _replay(setup, bufs, md, capture_tokens, query_lens, context_lens)
        n = sum(query_lens)
        torch.testing.assert_close(out[:n].float(), ref.float(), **TOL)
        assert torch.isnan(out[n:]).all(), "padding rows were written"
        if query_lens == sorted(query_lens, key=lambda q: q > 1):  # decode-first: eager must agree
            eager, _, _ = _eager(make_setup(kv_dtype="int8", max_num_seqs=MAX_REQS, num_blocks=160),
                                 query_lens, context_lens)  # fmt: skip
            torch.testing.assert_close(out[:n].float(), eager.float(), **TOL)


def test_step_counts_tell_full_graph_replays_of_mixed_steps(monkeypatch):
    """``metadata.step_counts``: a mixed step built by ``build`` whose metadata never reaches
    ``forward`` was replayed from a full CUDA graph; one that ran ``forward`` was not. Decode-only
    steps and capture builds are not mixed steps. (tests/test_backend_gpu.py reads these counts
    from a real engine with ``cudagraph_mode=FULL``.)"""
    from vllm_kvquant.metadata import step_counts

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the reference path: only the bookkeeping matters here
    setup = make_setup(kv_dtype="int8", max_num_seqs=MAX_REQS, num_blocks=160)
    before = step_counts()
    _eager(setup, *BATCHES["mixed"])  # 1: mixed, forward ran (eager or piecewise)
    bufs = Buffers.alloc(setup, MAX_REQS, MAX_TOKENS)
    md = setup.builder.build(0, bufs.fill(setup, *BATCHES["mixed"]))  # 2: mixed, no forward: replayed
    assert md.num_decodes and md.num_prefills and not md.ran_forward
    _eager(setup, *BATCHES["decodes"])  # not mixed
    _eager(setup, *BATCHES["prefills"])  # not mixed
    setup.builder.build_for_cudagraph_capture(bufs.fill(setup, *_capture_batch(24), max_query_len=24))
    _eager(setup, *BATCHES["mixed"])  # 3: mixed, forward ran; still pending until counted below
    after = step_counts()
    assert {k: after[k] - before[k] for k in after} == {"mixed_steps": 3, "mixed_steps_full_graph": 1}
    assert step_counts() == after  # counting twice changes nothing


@pytest.mark.parametrize("capture_tokens", [2, 8])
def test_one_token_capture_under_full_mode_replays_mixed_batches(path, capture_tokens):
    """0.26's model runner (vllm/v1/worker/gpu) captures a FULL-mode graph of N <= max_num_seqs
    tokens on N one-token requests and reports that batch's own max_query_len, 1: the graph
    still serves mixed batches, so its metadata must plan the prefill kernel too (without it,
    prefill rows of replayed mixed steps got no attention: 0 of 7 greedy outputs matched eager
    on an H100)."""
    setup = make_setup(kv_dtype="int8", max_num_seqs=MAX_REQS, num_blocks=160, cudagraph_mode="FULL")
    bufs = Buffers.alloc(setup, MAX_REQS, MAX_TOKENS)
    lens, ctx = [1] * capture_tokens, [0] * capture_tokens
    md = setup.builder.build_for_cudagraph_capture(bufs.fill(setup, lens, ctx, max_query_len=1))
    assert md.prefill is not None and md.prefill.all_rows and md.prefill.max_query_len == capture_tokens
    # (query_lens, context_lens) that fit the graph: a prefill over context, mixed, out of order.
    batches = {2: [([2], [5]), ([1, 1], [9, 3])],
               8: [([1, 1, 1, 5], [20, 0, 37, 0]), ([3, 1, 2, 1], [9, 30, 0, 0]), ([8], [23])]}  # fmt: skip
    for query_lens, context_lens in batches[capture_tokens]:
        out, ref = _replay(setup, bufs, md, capture_tokens, query_lens, context_lens)
        n = sum(query_lens)
        torch.testing.assert_close(out[:n].float(), ref.float(), **TOL)


def test_full_graphs_replay_mixed_batches_by_mode():
    from vllm.config import CUDAGraphMode

    from vllm_kvquant.compat import full_graphs_replay_mixed_batches

    def config(mode):
        return SimpleNamespace(compilation_config=SimpleNamespace(cudagraph_mode=mode))

    expected = {"FULL": True, "FULL_AND_PIECEWISE": False, "FULL_DECODE_ONLY": False, "PIECEWISE": False, "NONE": False}
    assert {name: full_graphs_replay_mixed_batches(config(CUDAGraphMode[name])) for name in expected} == expected
    assert full_graphs_replay_mixed_batches(config(None)) and full_graphs_replay_mixed_batches(SimpleNamespace())


def test_one_token_graph_under_full_mode_plans_no_prefill():
    """Under FULL a graph of one token serves one request of one token: decode kernel only."""
    setup = make_setup(max_num_seqs=MAX_REQS, cudagraph_mode="FULL")
    bufs = Buffers.alloc(setup, MAX_REQS, MAX_TOKENS)
    md = setup.builder.build_for_cudagraph_capture(bufs.fill(setup, [1], [0], max_query_len=1))
    assert md.prefill is None and md.decode[setup.num_heads].varlen


@pytest.mark.parametrize("cudagraph_mode", ["FULL_AND_PIECEWISE", "FULL_DECODE_ONLY"])
def test_uniform_decode_capture_plans_no_prefill(path, cudagraph_mode):
    """Decode graphs (max_query_len 1) of FULL_AND_PIECEWISE / FULL_DECODE_ONLY replay
    one-token batches only: no prefill plan."""
    setup = make_setup(max_num_seqs=MAX_REQS, cudagraph_mode=cudagraph_mode)
    bufs = Buffers.alloc(setup, MAX_REQS, MAX_TOKENS)
    m = bufs.fill(setup, [1] * 4, [0] * 4, max_query_len=1)
    md = setup.builder.build_for_cudagraph_capture(m)
    assert md.prefill is None and md.decode[setup.num_heads].varlen
    out, ref = _replay(setup, bufs, md, 4, [1, 1, 1], [12, 0, 33])
    torch.testing.assert_close(out[:3].float(), ref.float(), **TOL)


def test_sliding_window_and_soft_cap_in_graph_mode(path):
    setup = make_setup(kv_dtype="fp8_e4m3", per_head=False, sliding_window=8, logits_soft_cap=5.0,
                       max_num_seqs=MAX_REQS, num_blocks=160)  # fmt: skip
    bufs = Buffers.alloc(setup, MAX_REQS, MAX_TOKENS)
    md = setup.builder.build_for_cudagraph_capture(bufs.fill(setup, *_capture_batch(16), max_query_len=16))
    out, ref = _replay(setup, bufs, md, 16, [1, 6, 1], [30, 11, 3])
    torch.testing.assert_close(out[:8].float(), ref.float(), **TOL)


def test_declared_cuda_graph_support_follows_the_decode_kernel():
    """ALWAYS with our kernels (auto = triton); fa3 / flashinfer plan only the leading decodes."""

    from vllm.v1.attention.backend import AttentionCGSupport

    from vllm_kvquant.backend import KVQuantAttentionBackend

    builder = KVQuantAttentionBackend.get_builder_cls()
    support = {
        kernel: builder.get_cudagraph_support(SimpleNamespace(additional_config={"kvquant": {"kernel": kernel}}), None)
        for kernel in ("auto", "triton", "fa3", "flashinfer")
    }
    assert support == {"auto": AttentionCGSupport.ALWAYS, "triton": AttentionCGSupport.ALWAYS,
                       "fa3": AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE,
                       "flashinfer": AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE}  # fmt: skip


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where FA3 cannot run")
def test_fa3_decode_kernel_is_refused_at_startup_on_cpu():
    from vllm_kvquant.errors import KVQuantConfigError

    with pytest.raises(KVQuantConfigError, match=r"\['kernel'\] = 'fa3' cannot run: .*needs a CUDA GPU"):
        make_setup(options={"kernel": "fa3"})


@pytest.mark.gpu
@pytest.mark.parametrize("capture", ["24-tokens", "8-one-token-requests"])
@pytest.mark.parametrize("kv_dtype", ["int8", "fp8_e4m3"])
def test_gpu_cuda_graph_capture_and_replay(kv_dtype, capture):
    """A real CUDA graph of write + attention, captured on a dummy batch, replayed on mixes.
    ``8-one-token-requests``: 0.26's FULL-mode capture of N <= max_num_seqs tokens (N requests
    of one token, max_query_len 1)."""
    setup = make_setup(kv_dtype=kv_dtype, max_num_seqs=MAX_REQS, num_blocks=160, device="cuda", cudagraph_mode="FULL")
    bufs = Buffers.alloc(setup, MAX_REQS, MAX_TOKENS)
    tokens = 24 if capture == "24-tokens" else 8
    lens, ctx = _capture_batch(tokens)
    md = setup.builder.build_for_cudagraph_capture(bufs.fill(setup, lens, ctx, max_query_len=max(lens)))
    q_buf, k_buf, v_buf = step_inputs(setup, tokens)
    out_buf = torch.empty_like(q_buf)

    def step():
        setup.impl.do_kv_cache_update(setup.layer, k_buf, v_buf, setup.kv_cache, md.slot_mapping)
        setup.impl.forward(setup.layer, q_buf, k_buf, v_buf, setup.kv_cache, md, out_buf)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile and warm up outside the capture, as vLLM does
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    def replay(q, k, v, out):
        q_buf.copy_(q), k_buf.copy_(k), v_buf.copy_(v)
        out_buf.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        out.copy_(out_buf)

    for query_lens, context_lens in [*BATCHES.values(), ([3, 1, 2, 1], [9, 30, 0, 0])]:
        if sum(query_lens) > tokens:
            continue
        out, ref = _replay(setup, bufs, md, tokens, query_lens, context_lens, run=replay)
        n = sum(query_lens)
        torch.testing.assert_close(out[:n].float(), ref.float(), **TOL)


def test_debug_script_engines_and_pairs(tmp_path):
    """scripts/debug_full_graphs.py (GPU diagnosis): every pair names engines it defines."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "debug_full_graphs.py"
    spec = importlib.util.spec_from_file_location("debug_full_graphs", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    specs = module.specs(tmp_path)
    assert {name for pair in module.PAIRS for name in pair} <= set(specs)
    assert specs["kvq-full"]["compilation_config"]["cudagraph_mode"] == "FULL"
    assert specs["kvq-eager"]["enforce_eager"] and specs["fa-full"]["attention_backend"] == "FLASH_ATTN"
