"""Kernel-only decode sweep: our Triton kernel under several launch configs, no vLLM needed.

For tuning on the GPU machine without the vLLM bundle (a call costs seconds): the cache is
allocated in the backend's own layout (``[num_blocks, num_kv_heads, block_size, 2 * head_size]``,
K then V per token, as ``KVQuantAttentionBackend.get_kv_cache_shape`` says) and viewed as the
backend views it, or in a candidate layout (``--layouts``, :data:`LAYOUTS`); every config is checked against the PyTorch reference and timed as a CUDA graph
over rotating caches (median), beside a device-to-device copy measured in the same run.

    python -m benchmarks.kernels.decode_lab --configs "dot_in_fp16=0,asm_dequant_int8=0" "asm_num_stages=4"
    python -m benchmarks.kernels.decode_lab --ncu-config "" --shapes 64x16384   # one launch, for ncu
    python -m benchmarks.kernels.decode_lab --layouts backend v-channel-major     # V pages transposed
    python -m benchmarks.kernels.decode_lab --scales per_head per_channel         # scale granularities
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from benchmarks.common import buffer_sets, measure_copy_gbps, programs_per_sm, time_rotating
from benchmarks.harness import command
from vllm_kvquant.kernels.decode_attention import DecodeKernelConfig, DecodeLayer, DecodePlan
from vllm_kvquant.kernels.paged_cache import PagedKVCache
from vllm_kvquant.kernels.reference import paged_decode_attention_ref

STORE = {"fp8_e4m3": torch.float8_e4m3fn, "int8": torch.int8}
SCALE = {"fp8_e4m3": (0.02, 0.015), "int8": (0.035, 0.03)}


def parse_config(spec: str) -> DecodeKernelConfig:
    try:
        return DecodeKernelConfig.from_spec(spec)
    except ValueError as e:
        raise SystemExit(str(e)) from None


#: Cache layouts the lab can time: ``backend`` is the backend's own (per block and KV head, each
#: token's K then V, ``[block_size, 2 * head_size]``); ``v-channel-major`` keeps K token-major but
#: stores each page's V transposed (``[head_size, block_size]``: a channel's tokens contiguous), so
#: that P @ V reads its reduction dimension (tokens) contiguously, as Q @ K^T reads K's channels.
#: The kernel takes any strides; a layout that wins here is a candidate for the backend's.
LAYOUTS = ("backend", "v-channel-major")


def make_case(batch: int, context: int, kv_dtype: str, hq: int, hkv: int, d: int, bs: int, copies: int, seed: int = 0,
              layout: str = "backend", device: str = "cuda"):  # fmt: skip
    """Caches (``layout``, ``copies`` disjoint regions), shuffled block tables, queries. The
    logical K/V values depend only on the seed, not on the layout."""
    if layout not in LAYOUTS:
        raise SystemExit(f"unknown cache layout {layout!r}; choose from {list(LAYOUTS)}")
    g = torch.Generator(device=device).manual_seed(seed)
    pages = -(-context // bs)
    nb = batch * pages * copies + 1
    raw = torch.randn(nb, hkv, bs, 2 * d, device=device, generator=g) * 60
    store = STORE[kv_dtype]
    raw = raw.clamp(-127, 127).round() if store == torch.int8 else raw.clamp(-448, 448)
    if layout == "backend":
        kv = raw.to(store).view(torch.uint8)
        key = kv[..., :d].permute(0, 2, 1, 3)  # [num_blocks, block_size, num_kv_heads, d], the backend's views
        value = kv[..., d:].permute(0, 2, 1, 3)
    else:
        kv = torch.empty(nb, hkv, 2, bs * d, dtype=store, device=device).view(torch.uint8)
        kv[:, :, 0].view(store).copy_(raw[..., :d].reshape(nb, hkv, bs * d))
        kv[:, :, 1].view(store).copy_(raw[..., d:].transpose(-1, -2).reshape(nb, hkv, d * bs))
        key = kv[:, :, 0].view(nb, hkv, bs, d).permute(0, 2, 1, 3)
        value = kv[:, :, 1].view(nb, hkv, d, bs).permute(0, 3, 1, 2)  # strides: token 1, channel bs
    del raw
    tables = [
        (torch.randperm(batch * pages, device=device, generator=g) + 1 + c * batch * pages).view(batch, pages).int()
        for c in range(copies)
    ]
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    queries = [torch.randn(batch, hq, d, device=device, dtype=torch.bfloat16, generator=g) for _ in range(copies)]
    return key, value, tables, seq_lens, queries


#: K/V scale granularities the lab can time (``--scales``): ``per_tensor`` (one scalar, the lab's
#: default before the option existed), ``per_head`` (the calibrated default) and ``per_channel``.
SCALE_GRANULARITIES = ("per_tensor", "per_head", "per_channel")


def make_scales(kv_dtype: str, granularity: str, hkv: int, d: int, device: str = "cuda") -> tuple[torch.Tensor, torch.Tensor]:
    """K and V scales of ``granularity`` around :data:`SCALE` (varied per head and channel by up to
    +-25%, so a kernel that reads the wrong scale fails the reference check)."""
    if granularity not in SCALE_GRANULARITIES:
        raise SystemExit(f"unknown scale granularity {granularity!r}; choose from {list(SCALE_GRANULARITIES)}")
    shape = {"per_tensor": (1,), "per_head": (hkv,), "per_channel": (hkv, d)}[granularity]
    n = math.prod(shape)
    vary = 1.0 + 0.25 * torch.sin(torch.arange(n, dtype=torch.float32) * 0.7).view(shape)
    return tuple((base * vary).to(device) for base in SCALE[kv_dtype])  # type: ignore[return-value]


def split_kernel_resources(layer: DecodeLayer) -> dict:
    """Registers, spills and shared memory of the split kernel the layer compiled, and the
    programs per SM they allow (4 warps: 65536 registers and 227 KB of shared memory per SM)."""
    compiled = list(layer._split.compiled.values())
    if not compiled:  # launched through the JIT only (a launch hook, KVQUANT_DIRECT_LAUNCH=0)
        return {}
    k = compiled[-1]
    regs, shared = int(getattr(k, "n_regs", 0) or 0), int(k.metadata.shared)
    return dict(regs=regs, spills=int(getattr(k, "n_spills", 0) or 0), shared_bytes=shared,
                programs_per_sm=programs_per_sm(regs, int(k.metadata.num_warps), shared))  # fmt: skip


def run(a: argparse.Namespace) -> dict:
    copy_gbps = measure_copy_gbps()
    print(f"copy {copy_gbps:.0f} GB/s", flush=True)
    configs = [(spec, parse_config(spec)) for spec in a.configs]
    rows = []
    for kv_dtype, layout, scales in ((k, lay, g) for k in a.kv_dtypes for lay in a.layouts for g in a.scales):
        ks, vs = make_scales(kv_dtype, scales, a.num_kv_heads, a.head_size)
        for batch, context in a.shapes:
            kv_bytes = batch * context * a.num_kv_heads * a.head_size * 2
            copies = 1 if a.ncu_config else buffer_sets(kv_bytes, min_total=1 << 30, max_sets=8)
            key, value, tables, seq_lens, queries = make_case(
                batch, context, kv_dtype, a.num_q_heads, a.num_kv_heads, a.head_size, a.block_size, copies,
                layout=layout,
            )
            ref = None
            for spec, cfg in configs:
                layer = DecodeLayer(PagedKVCache(key, value, ks, vs, kv_dtype), num_q_heads=a.num_q_heads,
                                    act_dtype=torch.bfloat16, config=cfg)  # fmt: skip
                plans = [DecodePlan.build(batch, t, seq_lens, None, num_q_heads=a.num_q_heads,
                                          num_kv_heads=a.num_kv_heads, head_size=a.head_size, config=cfg)
                         for t in tables]  # fmt: skip
                outs = [torch.empty_like(q) for q in queries]
                layer.run(queries[0], outs[0], plans[0])
                torch.cuda.synchronize()
                if ref is None:
                    n = min(batch, 4)
                    ref = paged_decode_attention_ref(queries[0][:n], layer.key_cache, layer.value_cache,
                                                     tables[0][:n], seq_lens[:n], ks, vs, kv_dtype).float()  # fmt: skip
                err = (outs[0][: ref.shape[0]].float() - ref).abs().max().item()
                row = dict(config=spec or "default", layout=layout, scales=scales, kv_dtype=kv_dtype, batch=batch, context=context,
                           splits=plans[0].num_splits, max_abs_err=err, **split_kernel_resources(layer))  # fmt: skip
                if not a.ncu_config:
                    us, mode = time_rotating(lambda c: layer.run(queries[c], outs[c], plans[c]), copies, True, 25, 200)
                    gbps = kv_bytes / (us * 1e-6) / 1e9
                    row.update(us=round(us, 2), gbps=round(gbps, 1), pct_copy=round(100 * gbps / copy_gbps, 1))
                rows.append(row)
                print(json.dumps(row), flush=True)
            del key, value, tables, queries
            torch.cuda.empty_cache()
    return dict(copy_gbps=copy_gbps, device=torch.cuda.get_device_name(), triton=__import__("triton").__version__,
                command=command("benchmarks.kernels.decode_lab", sys.argv[1:]), rows=rows)  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=[""], help="DecodeKernelConfig overrides, k=v,k=v ('' = default)")
    p.add_argument("--ncu-config", default=None, help="one config, one untimed launch per shape (profile with ncu)")
    p.add_argument("--shapes", nargs="+", default=["1x32768", "8x32768", "64x1024", "64x4096", "64x16384", "128x8192", "256x1024"])
    p.add_argument("--kv-dtypes", nargs="+", default=["fp8_e4m3", "int8"])
    p.add_argument("--layouts", nargs="+", default=["backend"], choices=LAYOUTS, help="cache layouts to time")
    p.add_argument("--scales", nargs="+", default=["per_tensor"], choices=SCALE_GRANULARITIES,
                   help="K/V scale granularities to time (default per_tensor, as before the option)")
    p.add_argument("--num-q-heads", type=int, default=32)
    p.add_argument("--num-kv-heads", type=int, default=8)
    p.add_argument("--head-size", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    a.shapes = [tuple(int(x) for x in s.lower().split("x")) for s in a.shapes]
    if a.ncu_config is not None:
        a.configs = [a.ncu_config]
    result = run(a)
    if a.out:
        a.out.write_text(json.dumps(result, indent=1))
    if not a.ncu_config:
        print(f"{'config':46s} {'layout':15s} {'scales':11s} {'kv':8s} {'shape':>10s} {'us':>8s} {'%copy':>6s} {'err':>8s}")
        for r in result["rows"]:
            print(f"{r['config'][:46]:46s} {r['layout']:15s} {r['scales']:11s} {r['kv_dtype'][:8]:8s} {r['batch']:>4d}x{r['context']:<6d}"
                  f"{r['us']:8.1f} {r['pct_copy']:6.1f} {r['max_abs_err']:8.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
