"""Compile every Triton kernel configuration of leo_rt for a GPU target without a GPU, and read the resources of
the binaries: registers a thread, stack frame (where spills go) and local memory.

Triton compiles for any target it is given (`GPUTarget("cuda", 90, 32)` is an H100) and ships ptxas and
cuobjdump, so this runs on a CPU machine: the arguments are specialised exactly as a launch would specialise
them (unit strides become constants, sizes divisible by 16 are marked so), then `cuobjdump -res-usage` reads the
cubin Triton built. Needs the compiled Triton: run it with TRITON_INTERPRET unset.

    python -m leo_rt.kernels.compile_report [--arch 90] [--json]

Variants: the fused warp for every configuration of its autotune set × layout × fp32/fp16/bf16 × shared or
indexed sources, on sizes of the renderer (C = 64, 16×16 maps); grid_sample (tests and benchmarks only) in its
one configuration, fp32, each mode and padding, both layouts.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
REG_LIMIT = 128  # registers a thread the configurations stay within: 4 blocks of 128 threads fit an SM's 64 K


def _layout(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def warp_variants():
    """(name, kernel, args, constexprs) for every fused-warp configuration, as warp_blend_triton launches them."""
    from .warp_triton import CONFIGS, _warp_blend_kernel

    n, c, hh, ww, k = 2, 64, 16, 16, 3
    for channels_last, configs in CONFIGS.items():
        lay = _layout(channels_last)
        for dname, dtype in DTYPES.items():
            feat = torch.empty(k, c, hh, ww, dtype=dtype, memory_format=lay)
            h = torch.empty(n, c, hh, ww, dtype=dtype, memory_format=lay)
            logits = torch.empty(n, 3, hh, ww, dtype=dtype)
            index = torch.zeros(n, dtype=torch.int64)
            for indexed in (False, True):
                sf = list(feat.stride()) if indexed else [0, *feat.stride()[1:]]
                args = (feat, logits, h, h, h, index if indexed else logits, c, hh, ww, hh * ww, *sf)
                args += (logits.stride(0), logits.stride(1), logits.stride(3), *[h.stride(i) for i in (0, 1, 3)] * 2)
                for block_p, block_c, num_warps in configs:
                    meta = dict(CHANNELS_LAST=channels_last, HAS_INDEX=indexed, ACCURATE_TANH=True)
                    meta.update(BLOCK_P=block_p, BLOCK_C=block_c, num_warps=num_warps)
                    name = (
                        f"warp_blend {'channels_last' if channels_last else 'nchw'} {dname} "
                        f"{'indexed' if indexed else 'shared'} P{block_p} C{block_c} w{num_warps}"
                    )
                    yield name, _warp_blend_kernel, args, meta


def grid_sample_variants():
    from .sample_triton import MODES, PADDINGS, SAMPLE_CONFIG, _grid_sample_kernel

    block_p, block_c, num_warps = SAMPLE_CONFIG
    n, c, hh, ww = 2, 64, 16, 16
    for channels_last in (False, True):
        inp = torch.empty(n, c, hh, ww, memory_format=_layout(channels_last))
        grid = torch.empty(n, hh, ww, 2)
        args = (inp, grid, inp, c, hh, ww, ww, hh * ww, *inp.stride(), *grid.stride(), *inp.stride())
        for mode, m in MODES.items():
            for padding, pad in PADDINGS.items():
                meta = dict(MODE=m, PADDING=pad, ALIGN_CORNERS=False, BLOCK_P=block_p, BLOCK_C=block_c)
                meta["num_warps"] = num_warps
                name = f"grid_sample {'channels_last' if channels_last else 'nchw'} fp32 {mode}/{padding}"
                yield name, _grid_sample_kernel, args, meta


def compile_variant(kernel, args, meta, target):
    """Compile one launch's specialisation for `target`; returns the CompiledKernel (PTX and cubin inside)."""
    import triton
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **meta)
    options, signature, constexprs, attrs = kernel._pack_args(backend, meta, bound, specialization, options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)


def resource_usage(cubin: bytes) -> dict:
    """REG, STACK, LOCAL (bytes) of the one function in a cubin, read by the cuobjdump Triton ships."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        text = subprocess.run(
            [knobs.nvidia.cuobjdump.path, "-res-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    finally:
        os.unlink(f.name)
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    if found is None:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{text}")
    regs, stack, shared, local = map(int, found.groups())
    return {"regs": regs, "stack": stack, "shared": shared, "local": local}


def report(arch: int = 90) -> list[dict]:
    """Every variant compiled for sm_<arch>: name, regs, stack, shared, local, libdevice tanh linked, seconds."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime.jit import JITFunction

    from .warp_triton import _warp_blend_kernel

    if not isinstance(_warp_blend_kernel, JITFunction):
        raise RuntimeError("the kernels were made by Triton's interpreter: run with TRITON_INTERPRET unset")
    target = GPUTarget("cuda", arch, 32)
    rows = []
    for name, kernel, args, meta in [*warp_variants(), *grid_sample_variants()]:
        start = time.perf_counter()
        compiled = compile_variant(kernel, args, meta, target)
        row = {"name": name, **resource_usage(compiled.asm["cubin"])}
        row["libdevice_tanh"] = "__nv_tanhf" in compiled.asm["ptx"]
        row["seconds"] = round(time.perf_counter() - start, 2)
        rows.append(row)
    for row in rows:
        row["triton"], row["arch"] = triton.__version__, f"sm_{arch}"
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability ×10 (90: Hopper)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)
    rows = report(args.arch)
    if args.json:
        print(json.dumps(rows))
    else:
        for r in rows:
            print(f"{r['name']:<58} regs {r['regs']:>3}  stack {r['stack']:>4}  local {r['local']:>4}  {r['seconds']}s")
    bad = [r["name"] for r in rows if r["stack"] or r["local"] or r["regs"] > REG_LIMIT]
    if bad:
        print(f"spills or more than {REG_LIMIT} registers: {bad}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
