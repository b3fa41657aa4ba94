"""LMDM benchmark: time to sample one chunk vs denoising steps per sampler, and end-to-end generation.

Weights are random (timing does not depend on their values). Medians over repeats; glibc keeps freed memory
(leo_rt.timing.keep_heap_memory).

    python benchmarks/bench_lmdm.py [--preset lmdm-default] [--steps 5,10,25,50] [--size 256] [--frames 64]
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics

import torch

from leo_rt import Animator
from leo_rt.lmdm import LMDM, LMDMConfig
from leo_rt.motion import MotionSampler
from leo_rt.session import Session
from leo_rt.timing import keep_heap_memory, time_calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="lmdm-default")
    ap.add_argument("--steps", default="5,10,25,50")
    ap.add_argument("--samplers", default="ddim,dpm++,ddpm")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size", type=int, default=256, help="animator size for the end-to-end run (0: skip it)")
    ap.add_argument("--tiny", action="store_true", help="reduced-width animator (a smoke run, not a measurement)")
    ap.add_argument("--frames", type=int, default=64)
    ap.add_argument("--e2e-steps", type=int, default=25)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    keep_heap_memory()
    torch.manual_seed(0)
    model = LMDM(LMDMConfig.from_name(args.preset)).eval()
    with torch.no_grad():
        model.out.weight.normal_(0, 0.02)  # not the all-zero output of a fresh model
    cfg = model.cfg
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"# {args.preset}: chunk {cfg.chunk}, {n_params / 1e6:.1f} M parameters; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {datetime.date.today()}"
    )
    rows = []
    print(f"{'sampler':>7} {'steps':>5} | {'chunk s':>8} {'ms/step':>8} {'codes/s':>8}")
    start = torch.zeros(1, cfg.motion_dim)
    for name in args.samplers.split(","):
        for steps in map(int, args.steps.split(",")):
            sampler = MotionSampler(model, name, steps)
            times = time_calls(
                lambda: sampler.sample_chunk(start[:, None], torch.Generator().manual_seed(0)),  # noqa: B023
                args.repeats,
                warmup=1,
            )
            t = statistics.median(times)
            rows.append({"sampler": name, "steps": steps, "chunk_s": t, "ms_per_step": 1e3 * t / steps})
            print(f"{name:>7} {steps:>5} | {t:>8.3f} {1e3 * t / steps:>8.1f} {cfg.chunk / t:>8.1f}", flush=True)
    e2e = None
    if args.size:
        anim = Animator.random(f"lia-{args.size}" + ("-tiny" if args.tiny else ""), seed=0)
        sampler = MotionSampler(model, "ddim", args.e2e_steps)
        source = torch.rand(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0)) * 2 - 1
        counted = []
        with Session(anim, backend="torch") as session:
            session.start(source)
            list(session.stream(sampler, n_frames=2, batch=args.batch))  # warm-up
            session.timer.reset()

            def run() -> None:  # source encode + sampling + rendering, as `leo-rt generate` does
                session.start(source)
                counted.append(sum(len(f) for f in session.stream(sampler, n_frames=args.frames, batch=args.batch)))

            (wall,) = time_calls(run, 1, warmup=0)
            s = session.stats()
        n = counted[0]
        e2e = {"size": args.size, "frames": n, "steps": args.e2e_steps, "wall_s": wall, "fps": n / wall}
        e2e.update({f"{stage}_s": s.get(stage, {}).get("total_s", 0.0) for stage in ("sample", "render", "source")})
        print(
            f"\nend to end at {args.size} (lia-{args.size}, {args.preset}, ddim {args.e2e_steps} steps, batch "
            f"{args.batch}): {n} frames in {wall:.1f} s = {n / wall:.2f} frames/s"
        )
        print(
            f"  split: sample {e2e['sample_s']:.2f} s ({100 * e2e['sample_s'] / wall:.0f}%), render "
            f"{e2e['render_s']:.2f} s ({100 * e2e['render_s'] / wall:.0f}%), source encode {e2e['source_s']:.2f} s"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"preset": args.preset, "rows": rows, "end_to_end": e2e, "torch": torch.__version__}, f, indent=2)


if __name__ == "__main__":
    main()
