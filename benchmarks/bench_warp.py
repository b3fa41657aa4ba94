"""Fused warp + occlusion blend (Triton) against the PyTorch composition it replaces, on a CUDA GPU.

Every decoder resolution of the 256 model (8…256 with its channel counts), batch 1/8/32, fp32/fp16/bf16, the
source features shared by the batch (batch 1, as the renderer uses them). Timing: triton.testing.do_bench, median
and 20/80 % quantiles. Bytes model (the minimum traffic of one call): read the source features once, the logits
and h once, write f̃ and h' once:

    bytes = (C·H·W + B·3·H·W + B·C·H·W + 2·B·C·H·W) · element size

so each row reads as GB/s and as a fraction of this device's copy bandwidth, measured in the same run.
`--check` first compares the compiled kernels with the fp32 reference on this GPU.

    python benchmarks/bench_warp.py [--check] [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys

import torch

RESOLUTIONS_256 = [(8, 512), (16, 512), (32, 512), (64, 256), (128, 128), (256, 64)]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOLS = {torch.float32: (2e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1e-2)}


def inputs(b, c, r, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    feat = torch.randn(1, c, r, r, device="cuda", generator=g).to(dtype)
    logits = (torch.randn(b, 3, r, r, device="cuda", generator=g) * 2).to(dtype)
    h = torch.randn(b, c, r, r, device="cuda", generator=g).to(dtype)
    return feat, logits, h


def check() -> bool:
    from leo_rt.kernels import warp_blend_reference
    from leo_rt.kernels.grid_sample import grid_sample_triton
    from leo_rt.kernels.warp_blend import warp_blend_triton

    ok = True
    for name, dtype in DTYPES.items():
        atol, rtol = TOLS[dtype]
        for b, c, r in [(1, 3, 9), (8, 64, 64), (3, 17, 33), (8, 512, 16)]:
            for layout in (torch.contiguous_format, torch.channels_last):
                feat, logits, h = (t.contiguous(memory_format=layout) for t in inputs(b, c, r, dtype))
                got = warp_blend_triton(feat, logits, h)
                want = warp_blend_reference(feat.float(), logits.float(), h.float())
                err = max(float(((a.float() - w).abs() - rtol * w.abs()).max()) for a, w in zip(got, want, strict=True))
                good = err <= atol
                ok &= good
                lay = "NCHW" if layout == torch.contiguous_format else "CL"
                print(
                    f"check warp_blend {name} B={b} C={c} {r}x{r} {lay}: {'PASS' if good else 'FAIL'} "
                    f"(excess {err:.2e})"
                )
    g = torch.Generator(device="cuda").manual_seed(1)
    inp = torch.randn(2, 5, 17, 19, device="cuda", generator=g)
    grid = torch.rand(2, 13, 11, 2, device="cuda", generator=g) * 2.6 - 1.3
    for mode in ("bilinear", "nearest"):
        for pad in ("zeros", "border"):
            for ac in (False, True):
                got = grid_sample_triton(inp, grid, mode, pad, ac)
                want = torch.nn.functional.grid_sample(inp, grid, mode=mode, padding_mode=pad, align_corners=ac)
                good = torch.allclose(got, want, atol=1e-5, rtol=1e-5)
                ok &= good
                print(f"check grid_sample {mode}/{pad}/align_corners={ac}: {'PASS' if good else 'FAIL'}")
    return ok


def copy_bandwidth(do_bench) -> float:
    x = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), quantiles=[0.5])
    ms = ms[0] if isinstance(ms, (list, tuple)) else ms
    return 2 * x.numel() / (ms * 1e-3) / 1e9


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="correctness on this GPU first")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--dtypes", default="fp32,fp16,bf16")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_warp needs a CUDA GPU (the Triton kernels are timed compiled, not interpreted)", file=sys.stderr)
        return 2
    import triton
    from triton.testing import do_bench

    from leo_rt.kernels import base_grid, warp_blend_reference
    from leo_rt.kernels.warp_blend import warp_blend_triton

    if args.check and not check():
        print("correctness check FAILED", file=sys.stderr)
        return 1
    bw = copy_bandwidth(do_bench)
    dev = torch.cuda.get_device_name()
    print(
        f"# {dev}, torch {torch.__version__}, triton {triton.__version__}, {datetime.date.today()}; "
        f"copy bandwidth {bw:.0f} GB/s"
    )
    print(
        f"{'dtype':>5} {'B':>3} {'res':>4} {'C':>4} | {'fused ms':>9} {'(20%':>7} {'80%)':>7} {'torch ms':>9} "
        f"{'speedup':>7} | {'GB/s':>6} {'of copy':>7}"
    )
    rows = []
    for dname in args.dtypes.split(","):
        dtype = DTYPES[dname]
        es = torch.finfo(dtype).bits // 8
        for b in map(int, args.batches.split(",")):
            for r, c in RESOLUTIONS_256:
                feat, logits, h = inputs(b, c, r, dtype)
                grid = base_grid(r, device="cuda")
                fused = do_bench(lambda: warp_blend_triton(feat, logits, h), quantiles=[0.5, 0.2, 0.8])  # noqa: B023
                ref = do_bench(lambda: warp_blend_reference(feat, logits, h, grid), quantiles=[0.5, 0.2, 0.8])  # noqa: B023
                nbytes = (c * r * r + b * 3 * r * r + 3 * b * c * r * r) * es
                gbs = nbytes / (fused[0] * 1e-3) / 1e9
                row = {
                    "dtype": dname,
                    "batch": b,
                    "res": r,
                    "channels": c,
                    "fused_ms": fused,
                    "torch_ms": ref,
                    "speedup": ref[0] / fused[0],
                    "bytes": nbytes,
                    "gbs": gbs,
                    "fraction_of_copy": gbs / bw,
                }
                rows.append(row)
                print(
                    f"{dname:>5} {b:>3} {r:>4} {c:>4} | {fused[0]:>9.4f} {fused[1]:>7.4f} {fused[2]:>7.4f} "
                    f"{ref[0]:>9.4f} {row['speedup']:>6.2f}× | {gbs:>6.0f} {100 * gbs / bw:>6.0f}%",
                    flush=True,
                )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "device": dev,
                    "torch": torch.__version__,
                    "triton": triton.__version__,
                    "date": str(datetime.date.today()),
                    "copy_gbs": bw,
                    "rows": rows,
                },
                f,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
