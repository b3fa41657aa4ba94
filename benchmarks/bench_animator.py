"""Animator benchmark: the published call pattern against leo_rt, measured side by side in one run.

(a) reenactment per frame: published = source and driving frame both encoded on every call, grouped conv,
    QR and grids rebuilt per call (relative mode, as the published demo); leo_rt = source encoded once,
    driving frame → alpha → render.
(b) rendering from motion codes (what generation does per frame): the published decoder call against
    leo_rt's render, and leo_rt's distance from this CPU's fp32 FLOP limit (FLOPs counted by
    torch.utils.flop_counter, peak measured here with a large matmul).

Each repeat times the two contenders back to back, so machine noise hits both; medians are reported.
glibc is told to keep freed memory (leo_rt.timing.keep_heap_memory), which removes page-fault noise.

    python benchmarks/bench_animator.py [--sizes 128,256] [--batches 1,8] [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics

import torch

from leo_rt import Animator, LIAConfig
from leo_rt.bench import count_flops, cpu_model, matmul_gflops
from leo_rt.timing import keep_heap_memory, time_calls


def timed_pair(fa, fb, repeats: int, device="cpu") -> tuple[list[float], list[float]]:
    """Seconds per call of fa and fb, timed alternately (one call each per repeat) after one warm-up of each
    (oneDNN primitive creation), so machine noise hits both."""
    fa(), fb()
    ta, tb = [], []
    for _ in range(repeats):
        ta += time_calls(fa, 1, device, warmup=0)
        tb += time_calls(fb, 1, device, warmup=0)
    return ta, tb


def bench_case(size: int, batch: int, dtype: torch.dtype, repeats: int, peak: float, suffix: str = "") -> dict:
    anim = Animator.random(LIAConfig.from_name(f"lia-{size}{suffix}"), seed=0, dtype=dtype)
    lia = anim.reference
    gen = torch.Generator().manual_seed(0)
    src = (torch.rand(1, 3, size, size, generator=gen) * 2 - 1).to(dtype)
    drv = (torch.rand(batch, 3, size, size, generator=gen) * 2 - 1).to(dtype)
    with torch.no_grad():
        alpha_start = lia.encode_motion(drv[:1])
        w_a, feats = lia.encode_app(src)
    state = anim.encode_source(src)
    alpha = anim.encode_motion(drv)
    src_b = src.expand(batch, -1, -1, -1)
    w_b, feats_b = w_a.expand(batch, -1), [f.expand(batch, -1, -1, -1) for f in feats]

    @torch.no_grad()
    def published_reenact():
        return lia(src_b, drv, alpha_start)

    def leo_reenact():
        return anim.render(state, anim.relative_alpha(state, anim.encode_motion(drv), alpha_start))

    @torch.no_grad()
    def published_render():
        return lia.decode(w_b, alpha, feats_b)

    def leo_render():
        return anim.render(state, alpha)

    pa, la = timed_pair(published_reenact, leo_reenact, repeats)
    pr, lr = timed_pair(published_render, leo_render, repeats)
    flops = count_flops(leo_render) / batch
    flops_published = count_flops(published_render) / batch
    med = statistics.median
    row = {
        "size": size,
        "batch": batch,
        "dtype": str(dtype).replace("torch.", ""),
        "repeats": repeats,
        "reenact_published_s": med(pa) / batch,
        "reenact_leo_s": med(la) / batch,
        "render_published_s": med(pr) / batch,
        "render_leo_s": med(lr) / batch,
        "render_gflop_per_frame": flops / 1e9,
        "render_gflop_per_frame_published": flops_published / 1e9,
    }
    row["reenact_speedup"] = row["reenact_published_s"] / row["reenact_leo_s"]
    row["render_speedup"] = row["render_published_s"] / row["render_leo_s"]
    row["render_flop_limit_s"] = flops / 1e9 / peak
    row["render_vs_limit"] = row["render_leo_s"] / row["render_flop_limit_s"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="128,256")
    ap.add_argument("--tiny", action="store_true", help="reduced-width presets (a smoke run, not a measurement)")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--bf16", choices=["auto", "yes", "no"], default="auto", help="also run bf16 (auto: if supported)")
    ap.add_argument("--json", default=None, help="write rows and machine info here")
    args = ap.parse_args()
    heap = keep_heap_memory()
    torch.manual_seed(0)
    bf16 = args.bf16 == "yes" or (
        args.bf16 == "auto" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )
    peak = matmul_gflops(seconds=1.5)
    peak_bf16 = matmul_gflops(dtype=torch.bfloat16, seconds=1.5) if bf16 else None
    info = {
        "date": datetime.date.today().isoformat(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_model": cpu_model(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "peak_fp32_gflops": peak,
        "peak_bf16_gflops": peak_bf16,
        "heap_kept": heap,
    }
    print(f"# {info['cpu_model']}, {info['threads']} threads, torch {torch.__version__}, {info['date']}")
    print(f"# measured matmul peak: fp32 {peak:.0f} GFLOP/s" + (f", bf16 {peak_bf16:.0f} GFLOP/s" if bf16 else ""))
    rows = []
    dtypes = [torch.float32] + ([torch.bfloat16] if bf16 else [])
    hdr = (
        f"{'size':>4} {'B':>2} {'dtype':>8} | {'reenact pub':>11} {'leo':>7} {'ratio':>6} | {'render pub':>10} "
        f"{'leo':>7} {'ratio':>6} | {'GFLOP':>6} {'limit s':>7} {'x limit':>7}"
    )
    print(hdr)
    for dtype in dtypes:
        for size in map(int, args.sizes.split(",")):
            for batch in map(int, args.batches.split(",")):
                r = bench_case(
                    size,
                    batch,
                    dtype,
                    args.repeats,
                    peak if dtype == torch.float32 else peak_bf16,
                    "-tiny" if args.tiny else "",
                )
                rows.append(r)
                print(
                    f"{size:>4} {batch:>2} {r['dtype']:>8} | {r['reenact_published_s']:>10.3f}s "
                    f"{r['reenact_leo_s']:>6.3f}s {r['reenact_speedup']:>5.2f}× | {r['render_published_s']:>9.3f}s "
                    f"{r['render_leo_s']:>6.3f}s {r['render_speedup']:>5.2f}× | {r['render_gflop_per_frame']:>6.1f} "
                    f"{r['render_flop_limit_s']:>7.3f} {r['render_vs_limit']:>6.2f}×",
                    flush=True,
                )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
