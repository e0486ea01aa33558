"""Batches for driving the kvquant backend (builder + impl) without an engine.

A fake vLLM config holds fake attention layers that already carry their scales; batches are
real :class:`CommonAttentionMetadata` over persistent buffers, as vLLM's model runner keeps
them, so a CUDA-graph capture build can be followed by a "replay" that only rewrites the
buffers' contents. Used by test_full_graphs.py (CPU: interpreter or reference; and its
GPU twin), and by benchmarks/kernels/host_overhead.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch

from vllm_kvquant.kernels.dtypes import KVQuantDType
from vllm_kvquant.kernels.reference import paged_decode_attention_ref, paged_prefill_attention_ref
from vllm_kvquant.layer_scales import LAYER_ATTR, LayerQuantState

LAYER = "model.layers.0.self_attn.attn"


class FakeAttention:
    """What the builder reads from vLLM's static forward context (scales already attached)."""

    def __init__(self, num_heads: int, state: LayerQuantState) -> None:
        self.layer_name = LAYER
        self.num_heads = num_heads
        self.kv_sharing_target_layer_name = None
        setattr(self, LAYER_ATTR, state)


@dataclass
class Setup:
    builder: object
    impl: object
    layer: FakeAttention
    kv_cache: torch.Tensor
    num_heads: int
    num_kv_heads: int
    head_size: int
    block_size: int
    max_blocks: int
    device: torch.device


def make_setup(
    *, num_heads=4, num_kv_heads=2, head_size=64, block_size=16, num_blocks=64, max_blocks=8, max_num_seqs=8,
    kv_dtype="int8", per_head=True, device="cpu", sliding_window=None, logits_soft_cap=None, options=None,
    cudagraph_mode=None,
) -> Setup:  # fmt: skip
    """``options``: the ``kvquant`` entry of vLLM's ``additional_config``; ``cudagraph_mode``: the
    engine's (a ``CUDAGraphMode`` name; None: unknown, which the builder treats as FULL)."""
    from vllm_kvquant.backend import KVQuantAttentionBackend

    device = torch.device(device)
    mode = None
    if cudagraph_mode is not None:
        from vllm.config import CUDAGraphMode

        mode = CUDAGraphMode[cudagraph_mode]
    n = num_kv_heads if per_head else 1
    qmax = 127.0 if kv_dtype == "int8" else 448.0
    k_scale = torch.linspace(3.0, 4.0, n, dtype=torch.float32, device=device) / qmax
    v_scale = torch.linspace(3.5, 4.5, n, dtype=torch.float32, device=device) / qmax
    layer = FakeAttention(num_heads, LayerQuantState(KVQuantDType(kv_dtype), k_scale, v_scale, "test"))
    vllm_config = SimpleNamespace(
        compilation_config=SimpleNamespace(static_forward_context={LAYER: layer}, cudagraph_mode=mode),
        scheduler_config=SimpleNamespace(max_num_seqs=max_num_seqs),
        model_config=SimpleNamespace(dtype=torch.bfloat16, max_model_len=max_blocks * block_size),
        parallel_config=None, additional_config={"kvquant": options} if options else {},
    )  # fmt: skip
    layer.impl = impl = KVQuantAttentionBackend.get_impl_cls()(
        num_heads=num_heads, head_size=head_size, scale=head_size**-0.5, num_kv_heads=num_kv_heads,
        kv_cache_dtype="fp8", sliding_window=sliding_window, logits_soft_cap=logits_soft_cap,
    )  # fmt: skip
    spec = SimpleNamespace(num_kv_heads=num_kv_heads, head_size=head_size, block_size=block_size)
    builder = KVQuantAttentionBackend.get_builder_cls()(spec, [LAYER], vllm_config, device)
    shape = KVQuantAttentionBackend.get_kv_cache_shape(num_blocks, block_size, num_kv_heads, head_size, "fp8")
    kv_cache = torch.zeros(shape, dtype=torch.uint8, device=device)
    return Setup(builder, impl, layer, kv_cache, num_heads, num_kv_heads, head_size, block_size, max_blocks, device)


@dataclass
class Buffers:
    """The model runner's persistent per-step buffers (capacity ``max_reqs`` / ``max_tokens``)."""

    query_start_loc: torch.Tensor
    query_start_loc_cpu: torch.Tensor
    seq_lens: torch.Tensor
    seq_lens_cpu: torch.Tensor
    block_table: torch.Tensor
    slot_mapping: torch.Tensor

    @classmethod
    def alloc(cls, setup: Setup, max_reqs: int, max_tokens: int) -> "Buffers":
        dev = setup.device
        return cls(
            torch.zeros(max_reqs + 1, dtype=torch.int32, device=dev), torch.zeros(max_reqs + 1, dtype=torch.int32),
            torch.zeros(max_reqs, dtype=torch.int32, device=dev), torch.zeros(max_reqs, dtype=torch.int32),
            torch.zeros(max_reqs, setup.max_blocks, dtype=torch.int32, device=dev),
            torch.full((max_tokens,), -1, dtype=torch.int64, device=dev),
        )  # fmt: skip

    def fill(
        self, setup: Setup, query_lens, context_lens, num_reqs_padded=None, num_tokens_padded=None, seed=0,
        max_query_len=None,
    ):
        """Write a batch into the buffers as vLLM's runner does; returns its CommonAttentionMetadata.

        Requests get disjoint random pages; padded requests have no new tokens, length 0 and
        page 0; padded token slots are -1. ``max_query_len``: what vLLM reports (a capture of a
        mixed-batch graph reports its token count).
        """
        from vllm.v1.attention.backend import CommonAttentionMetadata

        g = torch.Generator().manual_seed(seed)
        num_reqs = len(query_lens)
        rp = num_reqs_padded or num_reqs
        qsl = torch.zeros(rp + 1, dtype=torch.int32)
        qsl[1 : num_reqs + 1] = torch.tensor(query_lens, dtype=torch.int32).cumsum(0)
        qsl[num_reqs + 1 :] = qsl[num_reqs]
        num_tokens = int(qsl[num_reqs])
        tp = num_tokens_padded or num_tokens
        seq = torch.zeros(rp, dtype=torch.int32)
        seq[:num_reqs] = torch.tensor(query_lens, dtype=torch.int32) + torch.tensor(context_lens, dtype=torch.int32)
        pages = torch.randperm(setup.kv_cache.shape[0] - 1, generator=g)[: rp * setup.max_blocks] + 1
        bt = pages.view(rp, setup.max_blocks).int()
        bt[num_reqs:] = 0
        slots = torch.full((tp,), -1, dtype=torch.int64)
        req = torch.repeat_interleave(torch.arange(num_reqs), torch.tensor(query_lens))
        pos = torch.arange(num_tokens) - qsl[req].long() + torch.tensor(context_lens, dtype=torch.int64)[req]
        slots[:num_tokens] = bt[req, pos // setup.block_size].long() * setup.block_size + pos % setup.block_size
        self.query_start_loc[: rp + 1].copy_(qsl)
        self.query_start_loc_cpu[: rp + 1].copy_(qsl)
        self.seq_lens[:rp].copy_(seq)
        self.seq_lens_cpu[:rp].copy_(seq)
        self.block_table[:rp].copy_(bt)
        self.slot_mapping[:tp].copy_(slots)
        return CommonAttentionMetadata(
            query_start_loc=self.query_start_loc[: rp + 1], query_start_loc_cpu=self.query_start_loc_cpu[: rp + 1],
            seq_lens=self.seq_lens[:rp], num_reqs=rp, num_actual_tokens=tp, max_query_len=max_query_len or max(query_lens),
            max_seq_len=int(seq.max()), block_table_tensor=self.block_table[:rp], slot_mapping=self.slot_mapping[:tp],
            seq_lens_cpu_upper_bound=self.seq_lens_cpu[:rp],
        )  # fmt: skip


def write_context(setup: Setup, m, query_lens, context_lens, seed=1, dtype=torch.bfloat16):
    """Write every request's cached context (positions < context_len) through the backend's writer."""
    g = torch.Generator().manual_seed(seed)
    hkv, d, bs = setup.num_kv_heads, setup.head_size, setup.block_size
    n = sum(context_lens)
    if not n:
        return
    bt = m.block_table_tensor.cpu()
    req = torch.repeat_interleave(torch.arange(len(context_lens)), torch.tensor(context_lens))
    starts = torch.tensor([0, *context_lens]).cumsum(0)[:-1]
    pos = torch.arange(n) - starts[req]
    sm = (bt[req, pos // bs].long() * bs + pos % bs).to(setup.device)
    k = (torch.randn(n, hkv, d, generator=g) * 2).to(dtype).to(setup.device)
    v = (torch.randn(n, hkv, d, generator=g) * 2).to(dtype).to(setup.device)
    setup.impl.do_kv_cache_update(setup.layer, k, v, setup.kv_cache, sm)


def step_inputs(setup: Setup, num_tokens: int, seed=2, dtype=torch.bfloat16, max_tokens=256):
    """The step's query/key/value (``num_tokens`` rows, padding included; row ``i`` does not
    depend on ``num_tokens``, so padded and unpadded runs see the same tokens)."""
    g = torch.Generator().manual_seed(seed)
    n = max(num_tokens, max_tokens)
    q = torch.randn(n, setup.num_heads, setup.head_size, generator=g) * 2
    k = torch.randn(n, setup.num_kv_heads, setup.head_size, generator=g) * 2
    v = torch.randn(n, setup.num_kv_heads, setup.head_size, generator=g) * 2
    return tuple(t[:num_tokens].to(dtype).to(setup.device) for t in (q, k, v))


def reference_output(setup: Setup, m, query, key, value, query_lens, context_lens) -> torch.Tensor:
    """Per request: decodes (one new token) read the cache; prefills attend to context + own K/V."""
    from vllm_kvquant import compat

    state = getattr(setup.layer, LAYER_ATTR)
    kc, vc = compat.split_kv_cache(setup.kv_cache, setup.head_size)
    torch_dtype = torch.int8 if state.kv_dtype is KVQuantDType.INT8 else torch.float8_e4m3fn
    kc, vc = kc.view(torch_dtype), vc.view(torch_dtype)
    impl = setup.impl
    out = torch.zeros_like(query)
    qsl = m.query_start_loc_cpu.tolist()
    for i, (ql, cl) in enumerate(zip(query_lens, context_lens)):
        s = qsl[i]
        bt = m.block_table_tensor[i : i + 1]
        if ql == 1:
            ref = paged_decode_attention_ref(
                query[s : s + 1], kc, vc, bt, m.seq_lens[i : i + 1], state.k_scale, state.v_scale, state.kv_dtype,
                impl.scale, sliding_window=impl.sliding_window, logits_soft_cap=impl.logits_soft_cap,
            )  # fmt: skip
        else:
            qsl_i = torch.tensor([0, ql], dtype=torch.int32, device=setup.device)
            ref = paged_prefill_attention_ref(
                query[s : s + ql], key[s : s + ql], value[s : s + ql], kc, vc, bt, qsl_i,
                torch.tensor([cl], dtype=torch.int32, device=setup.device), state.k_scale, state.v_scale,
                state.kv_dtype, impl.scale, impl.sliding_window, impl.logits_soft_cap,
            )  # fmt: skip
        out[s : s + ql] = ref
    return out
