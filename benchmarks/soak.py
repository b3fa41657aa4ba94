"""Soak: memory and threads over one long stream, and over many sessions opened, started, streamed and closed.

    python benchmarks/soak.py                                   # 10,000 frames at 128 on CPU, then 100 sessions
    python benchmarks/soak.py --frames 2000 --sessions 20 --preset lia-128-tiny --json soak.json

Phase 1 streams N frames from one Session (random-weight animator, random motion codes produced lazily, frames
consumed and dropped as a writer would), sampling the resident set size (RSS) and the thread count every
`--sample-every` frames. Phase 2 opens N Sessions one after the other, each started on a source, streamed for a
few frames and closed, sampling after each. Each phase prints its RSS at the start, after warm-up (the first
`--warmup` fraction), at the end and at its maximum, the growth after warm-up, and the threads left behind
(Python threads alive afterwards that were not alive before; the OS thread count of the process is reported
too, for torch's own pools).

"Flat" (what tests/test_soak.py asserts on a short run): RSS at the end within `--bound-mib` of RSS after
warm-up, no thread left, and (sessions phase) the live torch tensors after each closed session the same as
before the first.

Allocator: glibc's heap is kept (leo_rt.timing.keep_heap_memory, as the CLI does) so that freed memory is not
returned and re-faulted on every call. glibc also gives each new thread its own malloc arena (up to 8 per core)
and keeps what each arena grew to; a standalone Session starts a device-worker thread and ends it at close, so
a loop of sessions would step RSS up arena by arena until that cap: bounded, not a leak (the live tensors say
so), but it hides a real leak. The soak therefore re-executes itself with MALLOC_ARENA_MAX=2 unless the variable
is set already (`--any-arenas` to measure with glibc's default).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MIB = 1 << 20


def rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; the peak from getrusage elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def os_threads() -> int:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("Threads:"))
    except (OSError, StopIteration, ValueError):
        return threading.active_count()


def live_tensors() -> tuple[int, int]:
    """(count, bytes) of the torch tensors alive in this process (after a garbage collection)."""
    import gc
    import warnings

    gc.collect()
    n = size = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance on deprecated torch aliases warns
        for obj in gc.get_objects():
            try:
                if isinstance(obj, torch.Tensor) and not obj.is_meta:
                    n += 1
                    size += obj.numel() * obj.element_size()
            except Exception:  # noqa: BLE001,S112 - objects that misbehave under isinstance (lazy modules)
                continue
    return n, size


def random_codes(motion_dim: int, rows: int, seed: int = 0, scale: float = 0.5):
    """An endless, lazily produced iterable of (rows, D) motion codes (a live source, like a camera)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randn(rows, motion_dim, generator=g) * scale


def _summary(samples: list[dict], warmup: float, before: set[threading.Thread]) -> dict:
    rss = [s["rss"] for s in samples]
    warm = samples[min(len(samples) - 1, max(1, int(len(samples) * warmup)))]["rss"]
    left = [t.name for t in threading.enumerate() if t not in before and t.is_alive()]
    return {
        "start_rss_mib": rss[0] / MIB,
        "warm_rss_mib": warm / MIB,
        "end_rss_mib": rss[-1] / MIB,
        "max_rss_mib": max(rss) / MIB,
        "growth_after_warmup_mib": (rss[-1] - warm) / MIB,
        "leftover_threads": left,
        "os_threads_end": os_threads(),
        "samples": samples,
    }


def _wait_threads(before: set[threading.Thread], wait_s: float = 10.0) -> None:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and any(t.is_alive() for t in set(threading.enumerate()) - before):
        time.sleep(0.02)


def stream_soak(
    animator,
    image: torch.Tensor,
    *,
    frames: int = 10_000,
    batch: int = 8,
    sample_every: int = 200,
    warmup: float = 0.2,
    output: str = "tensor",
) -> dict:
    """One Session streaming `frames` frames; RSS and threads sampled every `sample_every` frames."""
    from leo_rt import Session

    before = set(threading.enumerate())
    samples = [{"frames": 0, "rss": rss_bytes(), "threads": threading.active_count()}]
    t0 = time.perf_counter()
    done = next_sample = 0
    with Session(animator, backend="torch", device=animator.device) as s:
        s.start(image)
        codes = random_codes(animator.config.motion_dim, batch)
        for out in s.stream(codes, n_frames=frames, batch=batch, output=output):
            done += out.shape[0]
            del out
            if done >= next_sample:
                samples.append({"frames": done, "rss": rss_bytes(), "threads": threading.active_count()})
                next_sample = done + sample_every
    seconds = time.perf_counter() - t0
    _wait_threads(before)
    samples.append({"frames": done, "rss": rss_bytes(), "threads": threading.active_count()})
    return {"phase": "stream", "frames": done, "seconds": seconds, **_summary(samples, warmup, before)}


def session_soak(
    animator,
    image: torch.Tensor,
    *,
    sessions: int = 100,
    frames_per_session: int = 16,
    batch: int = 8,
    warmup: float = 0.2,
) -> dict:
    """`sessions` Sessions in turn, each opened on the animator, started, streamed and closed."""
    from leo_rt import Session

    before = set(threading.enumerate())
    n, size = live_tensors()
    samples = [
        {"sessions": 0, "rss": rss_bytes(), "threads": threading.active_count(), "tensors": n, "tensor_bytes": size}
    ]
    t0 = time.perf_counter()
    for i in range(sessions):
        with Session(animator, backend="torch", device=animator.device) as s:
            s.start(image)
            codes = random_codes(animator.config.motion_dim, batch, seed=i)
            for out in s.stream(codes, n_frames=frames_per_session, batch=batch):
                del out
        n, size = live_tensors()
        samples.append(
            {
                "sessions": i + 1,
                "rss": rss_bytes(),
                "threads": threading.active_count(),
                "tensors": n,
                "tensor_bytes": size,
            }
        )
    seconds = time.perf_counter() - t0
    _wait_threads(before)
    n, size = live_tensors()
    samples.append(
        {
            "sessions": sessions,
            "rss": rss_bytes(),
            "threads": threading.active_count(),
            "tensors": n,
            "tensor_bytes": size,
        }
    )
    out = {"phase": "sessions", "sessions": sessions, "seconds": seconds, **_summary(samples, warmup, before)}
    # after the first session (which may fill lazy caches), every closed session leaves the same tensors alive
    out["tensors_left"] = samples[-1]["tensors"] - samples[min(1, sessions)]["tensors"]
    return out


def print_report(result: dict, bound_mib: float) -> bool:
    flat = result["growth_after_warmup_mib"] <= bound_mib
    clean = not result["leftover_threads"] and not result.get("tensors_left")
    what = f"{result['frames']} frames" if result["phase"] == "stream" else f"{result['sessions']} sessions"
    print(
        f"{result['phase']:<9} {what:>14} in {result['seconds']:7.1f} s | RSS MiB start {result['start_rss_mib']:7.1f}"
        f"  warm {result['warm_rss_mib']:7.1f}  end {result['end_rss_mib']:7.1f}  max {result['max_rss_mib']:7.1f}"
        f"  growth {result['growth_after_warmup_mib']:+6.1f} ({'flat' if flat else 'GROWING'}, bound {bound_mib:g})"
        f" | leftover threads {len(result['leftover_threads'])} {result['leftover_threads'] or ''}"
        f" | OS threads {result['os_threads_end']}"
        + (f" | tensors left {result['tensors_left']}" if "tensors_left" in result else "")
    )
    return flat and clean


def main(argv: list[str] | None = None) -> int:
    from leo_rt import Animator
    from leo_rt.timing import keep_heap_memory

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="lia-128", help="animator preset, random weights (default: lia-128)")
    p.add_argument("--frames", type=int, default=10_000, help="frames of the long stream (default: 10000)")
    p.add_argument("--sessions", type=int, default=100, help="sessions opened and closed (default: 100)")
    p.add_argument("--session-frames", type=int, default=16, help="frames streamed per session (default: 16)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--sample-every", type=int, default=200, help="frames between RSS samples (default: 200)")
    p.add_argument("--warmup", type=float, default=0.2, help="fraction of each phase counted as warm-up")
    p.add_argument("--bound-mib", type=float, default=32.0, help="allowed RSS growth after warm-up (MiB)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="write the samples and summaries here")
    p.add_argument("--any-arenas", action="store_true", help="keep glibc's default malloc arena count")
    args = p.parse_args(argv)
    if argv is None and not args.any_arenas and "MALLOC_ARENA_MAX" not in os.environ and sys.platform == "linux":
        os.environ["MALLOC_ARENA_MAX"] = "2"  # read by glibc at start: run again with it
        os.execv(sys.executable, [sys.executable, *sys.argv])

    keep_heap_memory()
    torch.manual_seed(0)
    animator = Animator.random(args.preset, seed=0, device=args.device)
    image = torch.rand(1, 3, animator.size, animator.size) * 2 - 1
    arenas = os.environ.get("MALLOC_ARENA_MAX", "glibc default")
    print(
        f"soak: {args.preset} on {args.device}, batch {args.batch}, {torch.get_num_threads()} torch threads, "
        f"MALLOC_ARENA_MAX={arenas}"
    )
    results = []
    ok = True
    if args.frames > 0:
        r = stream_soak(
            animator, image, frames=args.frames, batch=args.batch, sample_every=args.sample_every, warmup=args.warmup
        )
        ok &= print_report(r, args.bound_mib)
        results.append(r)
    if args.sessions > 0:
        r = session_soak(
            animator,
            image,
            sessions=args.sessions,
            frames_per_session=args.session_frames,
            batch=args.batch,
            warmup=args.warmup,
        )
        ok &= print_report(r, args.bound_mib)
        results.append(r)
    if args.json:
        from leo_rt.files import write_json

        write_json(
            args.json, {"preset": args.preset, "device": args.device, "bound_mib": args.bound_mib, "results": results}
        )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
