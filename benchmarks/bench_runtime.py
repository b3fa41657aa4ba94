"""Runtime benchmark: (1) overlap of LMDM sampling with rendering in a session stream, measured against the same
work done sequentially; (2) backends side by side with the published call pattern.

(1) A tiny animator and an LMDM sized so that sampling a chunk costs about as much as rendering it. Sequential:
    Session.stream(threaded=False) (sample chunk, render it, sample the next …, in the caller's thread).
    Overlapped: Session.stream (threaded: chunk k+1 is sampled while chunk k renders). Steady-state time per frame
    excludes the first chunk.
(2) For each backend: render and reenactment per frame at batch 1, with the published decoder / reenactment call
    timed in the same run for the ratio, and the FLOP limit from the measured matmul peak.

    python benchmarks/bench_runtime.py [--backends torch,onnxruntime] [--preset lia-256] [--skip-overlap]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from leo_rt import Animator
from leo_rt.bench import count_flops, matmul_gflops
from leo_rt.lmdm import LMDM, LMDMConfig
from leo_rt.motion import MotionSampler
from leo_rt.session import Session
from leo_rt.timing import keep_heap_memory, time_calls


def overlap(preset: str, lmdm_preset: str, steps: int, frames: int, batch: int, threads: int) -> None:
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)  # one core each for the sampling and the rendering thread
    anim = Animator.random(preset, seed=0)
    sampler = MotionSampler(LMDM(LMDMConfig.from_name(lmdm_preset)), "ddim", steps)
    source = torch.rand(1, 3, anim.size, anim.size) * 2 - 1
    state = anim.encode_source(source)
    chunk = sampler.chunk
    # stand-alone costs of one chunk (each warmed up once)
    known = state.alpha_src[:1, None].float()
    codes = sampler.sample_chunk(known, torch.Generator().manual_seed(0))[0]
    (sample_s,) = time_calls(lambda: sampler.sample_chunk(known, torch.Generator().manual_seed(0)), 1)

    def render_chunk():
        for i in range(0, chunk, batch):
            anim.render(state, codes[i : i + batch])

    (render_s,) = time_calls(render_chunk, 1)

    def steady(stream) -> float:
        times, n = [], 0
        t = time.perf_counter()
        for f in stream:
            n += f.shape[0]
            now = time.perf_counter()
            times.append((n, now - t))
        first = next(x for x in times if x[0] >= chunk)  # drop the first chunk (nothing to overlap with yet)
        return (times[-1][1] - first[1]) / (times[-1][0] - first[0])

    with Session(anim, backend="torch") as session:
        session.start(source)
        seq = steady(session.stream(sampler, n_frames=frames, batch=batch, seed=0, threaded=False))
        ovl = steady(session.stream(sampler, n_frames=frames, batch=batch, seed=0))
    per_frame_sum = (sample_s + render_s) / chunk
    print(
        f"# overlap: {preset} + {lmdm_preset} (chunk {chunk}, ddim {steps} steps), {frames} frames, batch {batch}, "
        f"{torch.get_num_threads()} torch threads"
    )
    print(
        f"  one chunk: sample {1e3 * sample_s:.1f} ms, render {1e3 * render_s:.1f} ms "
        f"(per frame: sum {1e3 * per_frame_sum:.2f} ms, max {1e3 * max(sample_s, render_s) / chunk:.2f} ms)"
    )
    print(
        f"  steady state per frame: sequential {1e3 * seq:.2f} ms, overlapped {1e3 * ovl:.2f} ms "
        f"({100 * (1 - ovl / seq):.0f}% below sequential)"
    )
    torch.set_num_threads(saved_threads)


def backends(names: list[str], preset: str, repeats: int) -> None:
    keep_heap_memory()
    anim = Animator.random(preset, seed=0)
    lia = anim.reference
    s = anim.size
    peak = matmul_gflops(seconds=1.5)
    src = torch.rand(1, 3, s, s, generator=torch.Generator().manual_seed(0)) * 2 - 1
    drv = torch.rand(1, 3, s, s, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "random.pt"
        torch.save({"gen": lia.state_dict()}, ckpt)
        with torch.no_grad():
            w_a, feats = lia.encode_app(src)
            alpha = lia.encode_motion(drv)
            start = alpha.clone()
        src_state = anim.encode_source(src)
        flops = count_flops(lambda: anim.render(src_state, alpha))
        limit = flops / 1e9 / peak

        def med(f):
            return statistics.median(time_calls(f, repeats, "cpu", warmup=1))

        with torch.no_grad():
            pub_render = med(lambda: lia.decode(w_a, alpha, feats))
            pub_reenact = med(lambda: lia(src, drv, start))
        print(
            f"# backends at {preset}, fp32, batch 1; matmul peak {peak:.0f} GFLOP/s, "
            f"render {flops / 1e9:.1f} GFLOP "
            f"→ limit {1e3 * limit:.0f} ms; published: render {1e3 * pub_render:.0f} ms, reenact "
            f"{1e3 * pub_reenact:.0f} ms"
        )
        cols = f"{'render ms':>10} {'×pub':>6} {'×limit':>7} | {'reenact ms':>10} {'×pub':>6}"
        print(f"{'backend':>12} | {'setup s':>8} {cols}")
        for name in names:
            t = time.perf_counter()
            with Session(ckpt, backend=name) as session:  # its calls run on the session's device worker
                state = session.start(src)
                session.render(alpha)
                setup = time.perf_counter() - t
                r = med(lambda: session.render(alpha))  # noqa: B023

                def reenact(session=session, state=state):
                    return session.render(session.relative_alpha(state, session.encode_motion(drv), start))

                re = med(reenact)
            print(
                f"{name:>12} | {setup:>8.1f} {1e3 * r:>10.0f} {pub_render / r:>5.2f}× {r / limit:>6.2f}× | "
                f"{1e3 * re:>10.0f} {pub_reenact / re:>5.2f}×",
                flush=True,
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default="torch,onnxruntime")
    ap.add_argument("--preset", default="lia-256")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-overlap", action="store_true")
    ap.add_argument("--overlap-preset", default="lia-64-tiny")
    ap.add_argument("--overlap-lmdm", default="lmdm-tiny")
    ap.add_argument("--overlap-steps", type=int, default=25)
    ap.add_argument("--overlap-threads", type=int, default=1, help="torch threads during the overlap run")
    ap.add_argument("--overlap-frames", type=int, default=150)
    args = ap.parse_args()
    if not args.skip_overlap:
        overlap(
            args.overlap_preset, args.overlap_lmdm, args.overlap_steps, args.overlap_frames, 8, args.overlap_threads
        )
    if args.backends:
        backends(args.backends.split(","), args.preset, args.repeats)


if __name__ == "__main__":
    main()
