"""Fused warp + occlusion blend (Triton) against the PyTorch composition it replaces, on a CUDA GPU.

Every decoder resolution of the 256 model (8…256 with its channel counts), batch 1/8/32, fp32/fp16/bf16, the
source features shared by the batch (batch 1, as the renderer uses them). Timing: leo_rt.timing.time_calls (the
device synchronised around each sample of back-to-back calls; warm cache, as in a renderer's steady state), median
and 20/80 % quantiles. Bytes model (the minimum traffic of one call): read the source features once, the logits
and h once, write f̃ and h' once:

    bytes = (C·H·W + B·3·H·W + B·C·H·W + 2·B·C·H·W) · element size

so each row reads as GB/s and as a fraction of this device's copy bandwidth, measured in the same run.

`--check` first compares the kernels with a float64 reference of the same computation: fp32 passes when its
relative error is at most twice the PyTorch reference's own fp32 error (measured in the same run) or 1e-5,
whichever is larger; fp16/bf16 have the stated bounds BOUNDS_16 below. `--check-only --device cpu` runs the check
in Triton's interpreter (TRITON_INTERPRET=1), as CI does.

    python benchmarks/bench_warp.py [--check] [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys

import torch

from leo_rt.precision import Precision
from leo_rt.timing import time_calls

RESOLUTIONS_256 = [(8, 512), (16, 512), (32, 512), (64, 256), (128, 128), (256, 64)]
FP32_FLOOR = 1e-5
# Stated relative-L2 bounds against float64 (of the same 16-bit inputs) for 16-bit storage: one unit roundoff of
# the format. The kernel computes in fp32 and rounds once at the store, which alone gives up to half a unit per
# element. Measured on CHECK_CASES in Triton's interpreter (CPU, triton 3.7.1): fp16 ≤ 2.1e-4 (0.43 u), bf16
# ≤ 3.4e-3 (0.86 u).
BOUNDS_16 = {Precision.FP16: 2.0**-11, Precision.BF16: 2.0**-8}
# (batch, channels, size): odd sizes, channel counts that are not a block multiple, and real decoder maps
CHECK_CASES = [(1, 3, 9), (8, 64, 64), (3, 17, 33), (8, 512, 16)]


def inputs(b, c, r, dtype, device="cuda", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    feat = torch.randn(1, c, r, r, device=device, generator=g).to(dtype)
    logits = (torch.randn(b, 3, r, r, device=device, generator=g) * 2).to(dtype)
    h = torch.randn(b, c, r, r, device=device, generator=g).to(dtype)
    return feat, logits, h


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double(), ref.double()
    return float(torch.linalg.vector_norm(a - ref) / torch.linalg.vector_norm(ref))


def check(device: str = "cuda", cases=CHECK_CASES, precisions=(Precision.FP32, Precision.FP16, Precision.BF16)):
    """Every case in both layouts and each precision: (label, passed, error, bound) rows, printed as they come."""
    from leo_rt.kernels import warp_blend_reference
    from leo_rt.kernels.sample_triton import grid_sample_triton
    from leo_rt.kernels.warp_triton import warp_blend_triton

    rows = []

    def report(label, err, bound):
        rows.append((label, err <= bound, err, bound))
        print(f"check {label}: {'PASS' if err <= bound else 'FAIL'} (relative error {err:.2e}, bound {bound:.2e})")

    for prec in precisions:
        dtype = prec.dtype
        for b, c, r in cases:
            for layout in (torch.contiguous_format, torch.channels_last):
                feat, logits, h = (t.contiguous(memory_format=layout) for t in inputs(b, c, r, dtype, device))
                got = warp_blend_triton(feat, logits, h)
                want = warp_blend_reference(feat.double(), logits.double(), h.double())
                # fp32: twice the PyTorch reference's own error, or the floor; 16-bit: the stated bound
                published = warp_blend_reference(feat, logits, h) if prec is Precision.FP32 else (None, None)
                lay = "NCHW" if layout == torch.contiguous_format else "CL"
                for name, g, w, p in zip(("f~", "h'"), got, want, published, strict=True):
                    bound = BOUNDS_16[prec] if p is None else max(2 * _rel(p, w), FP32_FLOOR)
                    report(f"warp_blend {name} {prec} B={b} C={c} {r}x{r} {lay}", _rel(g, w), bound)
    g = torch.Generator(device=device).manual_seed(1)
    inp = torch.randn(2, 5, 17, 19, device=device, generator=g)
    grid = torch.rand(2, 13, 11, 2, device=device, generator=g) * 2.6 - 1.3
    for mode in ("bilinear", "nearest"):
        for pad in ("zeros", "border"):
            for ac in (False, True):
                kw = dict(mode=mode, padding_mode=pad, align_corners=ac)
                got = grid_sample_triton(inp, grid, mode, pad, ac)
                want = torch.nn.functional.grid_sample(inp.double(), grid.double(), **kw)
                published = torch.nn.functional.grid_sample(inp, grid, **kw)
                bound = max(2 * _rel(published, want), FP32_FLOOR)
                report(f"grid_sample {mode}/{pad}/align_corners={ac}", _rel(got, want), bound)
    return rows


def _cases_str(cases) -> str:
    return ",".join("x".join(map(str, c)) for c in cases)


def copy_bandwidth(device) -> float:
    x = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    s = statistics.median(time_calls(lambda: y.copy_(x), 10, device, warmup=2))
    return 2 * x.numel() / s / 1e9


def per_call_ms(fn, device) -> list[float]:
    """[median, 20 %, 80 %] ms per call: 20 samples of 25 back-to-back calls after 5 warm-up calls."""
    times = sorted(1e3 * t for t in time_calls(fn, 20, device, warmup=5, inner=25))
    q = statistics.quantiles(times, n=10, method="inclusive")
    return [statistics.median(times), q[1], q[7]]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="correctness on this device first")
    ap.add_argument("--check-only", action="store_true", help="only the correctness check")
    ap.add_argument("--device", default="cuda", help="cuda (default); cpu runs --check-only in the interpreter")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--dtypes", default="fp32,fp16,bf16", help="precisions (leo_rt.precision names)")
    ap.add_argument("--cases", default=None, help="check cases BxCxR,… (default: " + _cases_str(CHECK_CASES) + ")")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    precisions = [Precision.parse(p) for p in args.dtypes.split(",")]
    device = torch.device(args.device)
    if device.type != "cuda" and not args.check_only:
        print("bench_warp times the compiled kernels on a CUDA GPU; on CPU only --check-only runs", file=sys.stderr)
        return 2
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_warp needs a CUDA GPU (the Triton kernels are timed compiled, not interpreted)", file=sys.stderr)
        return 2
    if args.check or args.check_only:
        cases = CHECK_CASES if args.cases is None else [tuple(map(int, c.split("x"))) for c in args.cases.split(",")]
        if not all(ok for _, ok, _, _ in check(str(device), cases, precisions)):
            print("correctness check FAILED", file=sys.stderr)
            return 1
        if args.check_only:
            return 0
    import triton

    from leo_rt.kernels import base_grid, warp_blend_reference
    from leo_rt.kernels.warp_triton import warp_blend_triton

    bw = copy_bandwidth(device)
    dev = torch.cuda.get_device_name(device)
    print(
        f"# {dev}, torch {torch.__version__}, triton {triton.__version__}, {datetime.date.today()}; "
        f"copy bandwidth {bw:.0f} GB/s"
    )
    print(
        f"{'dtype':>5} {'B':>3} {'res':>4} {'C':>4} | {'fused ms':>9} {'(20%':>7} {'80%)':>7} {'torch ms':>9} "
        f"{'speedup':>7} | {'GB/s':>6} {'of copy':>7}"
    )
    rows = []
    for prec in precisions:
        dtype = prec.dtype
        es = torch.finfo(dtype).bits // 8
        for b in map(int, args.batches.split(",")):
            for r, c in RESOLUTIONS_256:
                feat, logits, h = inputs(b, c, r, dtype, device)
                grid = base_grid(r, device=device)
                fused = per_call_ms(lambda: warp_blend_triton(feat, logits, h), device)  # noqa: B023
                ref = per_call_ms(lambda: warp_blend_reference(feat, logits, h, grid), device)  # noqa: B023
                nbytes = (c * r * r + b * 3 * r * r + 3 * b * c * r * r) * es
                gbs = nbytes / (fused[0] * 1e-3) / 1e9
                row = {
                    "dtype": str(prec),
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
                    f"{str(prec):>5} {b:>3} {r:>4} {c:>4} | {fused[0]:>9.4f} {fused[1]:>7.4f} {fused[2]:>7.4f} "
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
