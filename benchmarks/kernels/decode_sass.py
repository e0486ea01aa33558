"""What the decode split kernel compiles to for Hopper, without a GPU: per config and format, its
registers and stack (spills), shared memory, the programs per SM these allow, the SASS instructions of
one loop iteration (one K/V tile) with the most frequent opcodes, and the widths of its
``cp.async`` copies.

Why: on the H200 the kernel reads ~73% of copy bandwidth (decode-nvidia-h200.json). What a
``DecodeKernelConfig`` changes in the compiled loop shows here in seconds on a CPU, so that a
device call (``decode_lab``) only times candidates worth timing. The counts are a compiler's
view, not a measurement: occupancy and latency decide too (the fp8 asm path has 40% fewer
instructions per tile and measured slower at 2 programs per SM). Triton versions compile
differently: the GPU machine runs 3.6; the report names the version it used.

Needs a Triton with its CUDA backend (its wheel ships ``ptxas`` and ``cuobjdump``); the kernel
is compiled for the backend's own cache layout (``[num_blocks, num_kv_heads, block_size,
2 * head_size]``, K then V per token), a bf16 query, per-head scales and the varlen split plan.

    python -m benchmarks.kernels.decode_sass --configs "" "asm_dequant_fp8=1,maxnreg=168" --out sass.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.common import programs_per_sm
from benchmarks.harness import command
from vllm_kvquant.kernels.decode_attention import DecodeKernelConfig
from vllm_kvquant.kernels.decode_plan import split_kernel_constants
from vllm_kvquant.kernels.decode_triton import decode_split_kernel
from vllm_kvquant.kernels.scales_layout import PER_HEAD

#: Arguments Triton leaves unspecialized (``launch.unspecialized`` on the kernel).
UNSPECIALIZED = ("num_splits", "fill_splits", "stride_bts", "stride_pls", "stride_plh")
#: Scale granularities by their kernel code (scales_layout: PER_TENSOR, PER_HEAD, PER_CHANNEL).
GRANULARITIES = ("per_tensor", "per_head", "per_channel")


def toolchain_binary(name: str) -> Path:
    """A CUDA binary shipped with Triton's NVIDIA backend (``cuobjdump``)."""
    import triton.backends.nvidia as nv

    path = Path(os.environ.get(f"TRITON_{name.upper()}_PATH") or Path(nv.__file__).parent / "bin" / name)
    if not path.exists():
        raise FileNotFoundError(f"{path}: this Triton has no bundled {name} (a CUDA build of Triton is needed)")
    return path


def arg_types(kv_dtype: str, dims: dict[str, int]) -> tuple[dict[str, str], dict[str, int]]:
    """Triton signature types of the runtime arguments, and the integers Triton would
    specialize to constants (== 1) in the backend's launch; the rest are multiples of 16."""
    kv = "*fp8e4nv" if kv_dtype == "fp8_e4m3" else "*i8"
    types = {"q_ptr": "*bf16", "out_ptr": "*bf16", "k_ptr": kv, "v_ptr": kv, "k_scale_ptr": "*fp32",
             "v_scale_ptr": "*fp32", "bt_ptr": "*i32", "seq_lens_ptr": "*i32", "qsl_ptr": "*i32",
             "part_o_ptr": "*fp32", "part_lse_ptr": "*fp32", "sm_scale": "fp32", "soft_cap": "fp32"}  # fmt: skip
    d, bs, hkv, hq = dims["head_size"], dims["block_size"], dims["num_kv_heads"], dims["num_q_heads"]
    ones = {"stride_qd": 1, "stride_od": 1, "stride_kd": 1, "stride_vd": 1, "stride_btb": 1}
    assert hq * d % 16 == 0 and 2 * d * bs % 16 == 0, "the other strides are multiples of 16 at these sizes"
    return types, ones


@dataclass(frozen=True)
class Variant:
    """The plan and layer options that select a compiled variant besides the config."""

    split: bool = True  # the plan splits sequences (False: batches that fill the GPU alone)
    window: bool = False
    softcap: bool = False
    granularity: int = PER_HEAD  # of both K and V scales

    @property
    def name(self) -> str:
        parts = ["split" if self.split else "nosplit", *(["window"] if self.window else []),
                 *(["softcap"] if self.softcap else []), GRANULARITIES[self.granularity]]  # fmt: skip
        return "+".join(parts)


def compile_split_kernel(
    cfg: DecodeKernelConfig, kv_dtype: str, dims: dict[str, int], arch: int, workdir: Path, variant: Variant = Variant()
) -> dict:  # fmt: skip
    """Compile one variant ahead of time; its resources and loop from cuobjdump."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = decode_split_kernel
    names = list(fn.arg_names)
    constexpr_names = [p.name for p in fn.params if p.is_constexpr]
    layer = split_kernel_constants(
        cfg, head_size=dims["head_size"], num_q_heads=dims["num_q_heads"], num_kv_heads=dims["num_kv_heads"],
        block_size=dims["block_size"], kv_dtype=kv_dtype, act_dtype=torch.bfloat16, k_gran=variant.granularity,
        v_gran=variant.granularity, use_window=variant.window, use_softcap=variant.softcap, device_type="cuda",
    )  # fmt: skip
    constants = dict(zip(constexpr_names, (*layer, variant.split, True)))  # plan constexprs: SPLIT, VARLEN
    types, ones = arg_types(kv_dtype, dims)
    constants.update(ones)
    signature, attrs = {}, {}
    for i, name in enumerate(names):
        if name in constants:
            signature[name] = "constexpr"
            continue
        signature[name] = types.get(name, "i32")
        if name not in UNSPECIALIZED and name not in ("sm_scale", "soft_cap", "window"):
            attrs[(i,)] = [["tt.divisibility", 16]]  # pointers are 16-byte aligned, strides multiples of 16
    src = ASTSource(fn=fn, signature=signature, constexprs={(names.index(n),): v for n, v in constants.items()},
                    attrs=attrs)  # fmt: skip
    options = cfg.split_launch_options(kv_dtype, dims["head_size"])
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 64), options=options)
    ptx = kernel.asm["ptx"]
    cubin = workdir / "k.cubin"
    cubin.write_bytes(kernel.asm["cubin"])  # assembled by Triton with the ptxas it picks for the target
    cuobjdump = str(toolchain_binary("cuobjdump"))
    usage = subprocess.run([cuobjdump, "-res-usage", str(cubin)], capture_output=True, text=True, check=True).stdout
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    stack = int(re.search(r"STACK:(\d+)", usage).group(1))  # local memory per thread (spills)
    sass = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    shared = int(kernel.metadata.shared)
    widths = collections.Counter(int(w, 16) for w in re.findall(r"cp\.async\.c[ag]\.shared\.global[^;]*?, (0x[0-9a-f]+)", ptx))
    return dict(regs=regs, stack_bytes=stack, shared_bytes=shared,
                programs_per_sm=programs_per_sm(regs, options["num_warps"], shared),
                tile_tokens=cfg.tile_tokens(dims["head_size"]), options=options,
                cp_async_bytes={str(k): v for k, v in sorted(widths.items())}, **loop_body(sass))  # fmt: skip


def loop_body(sass: str) -> dict:
    """The largest backward branch's body: instructions per iteration and the top opcodes."""
    ins = [(int(a, 16), t.strip()) for a, t in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    loops = []
    for addr, text in ins:
        m = re.search(r"BRA\s.*?0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            loops.append((int(m.group(1), 16), addr))
    if not loops:
        return dict(loop_instructions=None, loop_opcodes={})
    lo, hi = max(loops, key=lambda r: r[1] - r[0])
    ops = collections.Counter(
        re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for a, t in ins if lo <= a <= hi
    )
    return dict(loop_instructions=sum(ops.values()), loop_opcodes=dict(ops.most_common(8)))


def parse_variant(spec: str) -> Variant:
    kw: dict = {}
    for part in filter(None, spec.split("+")):
        if part in ("split", "nosplit"):
            kw["split"] = part == "split"
        elif part in ("window", "softcap"):
            kw[part] = True
        elif part in GRANULARITIES:
            kw["granularity"] = GRANULARITIES.index(part)
        else:
            raise SystemExit(f"--variants {spec!r}: unknown part {part!r}")
    return Variant(**kw)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=[""], help="DecodeKernelConfig overrides, k=v,k=v ('' = default)")
    p.add_argument("--kv-dtypes", nargs="+", default=["fp8_e4m3", "int8"])
    p.add_argument("--head-size", type=int, default=128)
    p.add_argument("--num-q-heads", type=int, default=32)
    p.add_argument("--num-kv-heads", type=int, default=8)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--variants", nargs="+", default=["split"],
                   help="plan/layer variants, each '+'-joined from: split|nosplit, window, softcap, "
                        "per_tensor|per_head|per_channel (default: split, per_head)")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("decode_sass compiles the kernel: run it without TRITON_INTERPRET=1")
    import triton

    variants = [parse_variant(v) for v in a.variants]
    dims = dict(head_size=a.head_size, num_q_heads=a.num_q_heads, num_kv_heads=a.num_kv_heads, block_size=a.block_size)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in a.configs:
            try:
                cfg = DecodeKernelConfig.from_spec(spec)
            except ValueError as e:
                raise SystemExit(f"--configs {spec!r}: {e}") from None
            for kv_dtype in a.kv_dtypes:
                for variant in variants:
                    row = dict(config=spec or "default", kv_dtype=kv_dtype, variant=variant.name,
                               **compile_split_kernel(cfg, kv_dtype, dims, a.arch, Path(tmp), variant))  # fmt: skip
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    result = dict(triton=triton.__version__, arch=f"sm_{a.arch}a", dims=dims,
                  command=command("benchmarks.kernels.decode_sass", sys.argv[1:] if argv is None else argv), rows=rows)  # fmt: skip
    if a.out:
        a.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
