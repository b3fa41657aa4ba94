"""`leo-rt bench`: per-stage latency of every backend against the published call pattern, measured in one run.

For each size, a random-weight animator in the official format; for each backend a Session (its set-up —
export, compilation — and first call are the warm-up, reported apart); for each batch size, `frames` timed render
calls (p50/p95/min ms per frame, frames/s), the motion encoder at the same batch, and the source encoder once.
The published call pattern (grouped-conv decoder; both images encoded per reenactment call) is a baseline row in
the same run. FLOPs per frame come from torch.utils.flop_counter; the device's matmul rate and copy bandwidth are
measured once, so each row also reads as a fraction of the measured peak.
"""

from __future__ import annotations

import datetime
import os
import platform
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .timing import synchronize, time_calls

SCHEMA_VERSION = 1
BENCH_SCHEMA = {
    "type": "object",
    "required": ["schema_version", "machine", "rows"],
    "properties": {
        "schema_version": {"const": SCHEMA_VERSION},
        "machine": {
            "type": "object",
            "required": [
                "date",
                "cpu",
                "cores",
                "torch_threads",
                "gpu",
                "versions",
                "device",
                "peak_gflops",
                "copy_gbs",
            ],
            "properties": {
                "cores": {"type": "integer", "minimum": 1},
                "peak_gflops": {"type": "number", "exclusiveMinimum": 0},
                "copy_gbs": {"type": "number", "exclusiveMinimum": 0},
                "versions": {"type": "object", "required": ["torch"]},
            },
        },
        "rows": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": [
                    "backend",
                    "size",
                    "batch",
                    "precision",
                    "warmup_s",
                    "render_ms_p50",
                    "render_ms_p95",
                    "render_ms_min",
                    "fps",
                    "motion_ms_p50",
                    "source_ms",
                    "gflop_per_frame",
                    "fraction_of_peak",
                    "peak_host_mb",
                    "peak_device_mb",
                    "speedup_vs_published",
                ],
                "properties": {
                    "backend": {"type": "string"},
                    "size": {"type": "integer"},
                    "batch": {"type": "integer", "minimum": 1},
                    "render_ms_p50": {"type": "number", "exclusiveMinimum": 0},
                    "fps": {"type": "number", "exclusiveMinimum": 0},
                    "gflop_per_frame": {"type": "number", "exclusiveMinimum": 0},
                    "speedup_vs_published": {"type": ["number", "null"]},
                },
            },
        },
    },
}


def matmul_gflops(
    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, seconds: float = 1.0
) -> float:
    """The matmul rate this device reaches now (2048² products for `seconds`), in GFLOP/s."""
    device = torch.device(device)
    n = 2048
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    synchronize(device)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    synchronize(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def count_flops(fn: Callable) -> int:
    """FLOPs of one call of `fn`, counted by torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def measure_peak(device: torch.device, seconds: float = 1.0) -> tuple[float, float]:
    """(matmul GFLOP/s in fp32, copy GB/s) measured on this device now."""
    gflops = matmul_gflops(device, seconds=seconds)
    x = torch.empty(64 * 2**20, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    t = min(time_calls(lambda: y.copy_(x), 5, device, warmup=1))
    return gflops, 2 * x.numel() / t / 1e9


def render_flops(animator, batch: int = 1) -> int:
    """FLOPs of rendering `batch` frames (the decoder), counted by torch.utils.flop_counter."""
    state = animator.encode_source(torch.zeros(1, 3, animator.size, animator.size))
    return count_flops(lambda: animator.render(state, torch.zeros(batch, animator.config.motion_dim)))


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine() or "unknown"


def _machine(device: torch.device, peak: float, copy: float) -> dict:
    from .export.manifest import versions

    return {
        "date": datetime.date.today().isoformat(),
        "cpu": cpu_model(),
        "cores": os.cpu_count() or 1,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "versions": versions(),
        "device": str(device),
        "peak_gflops": peak,
        "copy_gbs": copy,
    }


def run_bench(
    backends: list[str],
    sizes: list[int],
    batches: list[int],
    *,
    precision: str = "fp32",
    frames: int = 5,
    device: str = "cpu",
    tiny: bool = False,
    log: Callable[[str], None] = lambda s: None,
) -> dict:
    """Run the benchmark and return the JSON-able result (validated by BENCH_SCHEMA)."""
    from .animator import Animator
    from .backends import resolve_device
    from .session import Session

    dev = resolve_device(device)
    peak, copy = measure_peak(dev)
    rows = []
    for size in sizes:
        preset = f"lia-{size}" + ("-tiny" if tiny else "")
        ref = Animator.random(preset, seed=0, device=dev)
        lia = ref.reference
        gflop = render_flops(ref) / 1e9
        g = torch.Generator().manual_seed(size)
        src = (torch.rand(1, 3, size, size, generator=g) * 2 - 1).to(dev)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = Path(tmp) / f"{preset}.pt"
            torch.save({"gen": {k: v.cpu() for k, v in lia.state_dict().items()}}, ckpt)
            published = {}
            for batch in batches:  # the published call pattern, as a baseline row
                drv = (torch.rand(batch, 3, size, size, generator=g) * 2 - 1).to(dev)
                alpha = torch.randn(batch, ref.config.motion_dim, generator=g).to(dev) * 0.5
                with torch.no_grad():
                    w_a, feats = lia.encode_app(src)
                    w_b, f_b = w_a.expand(batch, -1), [f.expand(batch, -1, -1, -1) for f in feats]
                    warm = time_calls(lambda: lia.decode(w_b, alpha, f_b), 1, dev, warmup=0)[0]  # noqa: B023
                    r = time_calls(lambda: lia.decode(w_b, alpha, f_b), frames, dev, warmup=0)  # noqa: B023
                    m = time_calls(lambda: lia.encode_motion(drv), max(1, frames // 2), dev)  # noqa: B023
                published[batch] = statistics.median(r) / batch
                rows.append(_row("published", size, batch, "fp32", warm, r, m, 0.0, gflop, peak, None))
                log(_fmt(rows[-1]))
            for name in backends:
                _reset_peak(dev)
                t0 = time.perf_counter()
                # the session's calls run on its device worker, as every compiled or captured call must
                with Session(ckpt, backend=name, device=dev, precision=precision) as session:
                    source_s = time_calls(lambda: session.start(src), 1, dev, warmup=0)[0]  # noqa: B023
                    for batch in batches:
                        drv = (torch.rand(batch, 3, size, size, generator=g) * 2 - 1).to(dev)
                        alpha = torch.randn(batch, ref.config.motion_dim, generator=g).to(dev) * 0.5
                        session.render(alpha)
                        session.encode_motion(drv)
                        synchronize(dev)
                        warm = time.perf_counter() - t0  # set-up (export, compile) and first calls
                        r = time_calls(lambda: session.render(alpha), frames, dev, warmup=0)  # noqa: B023
                        m = time_calls(lambda: session.encode_motion(drv), max(1, frames // 2), dev, warmup=0)  # noqa: B023
                        speed = published[batch] / (statistics.median(r) / batch)
                        rows.append(
                            _row(
                                name,
                                size,
                                batch,
                                precision,
                                warm,
                                r,
                                m,
                                source_s,
                                gflop,
                                peak,
                                speed,
                                _peak_device_mb(dev),
                            )
                        )
                        log(_fmt(rows[-1]))
                        t0 = time.perf_counter()
    return {"schema_version": SCHEMA_VERSION, "machine": _machine(dev, peak, copy), "rows": rows}


def _reset_peak(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


def _peak_device_mb(dev: torch.device) -> float:
    return torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else 0.0


def _row(backend, size, batch, precision, warm, render_s, motion_s, source_s, gflop, peak, speedup, dev_mb=0.0):
    per_frame = sorted(1e3 * t / batch for t in render_s)
    p50 = statistics.median(per_frame)
    return {
        "backend": backend,
        "size": size,
        "batch": batch,
        "precision": precision,
        "warmup_s": warm,
        "render_ms_p50": p50,
        "render_ms_p95": per_frame[min(len(per_frame) - 1, round(0.95 * (len(per_frame) - 1)))],
        "render_ms_min": per_frame[0],
        "fps": 1e3 / p50,
        "motion_ms_p50": statistics.median(1e3 * t / batch for t in motion_s),
        "source_ms": 1e3 * source_s,
        "gflop_per_frame": gflop,
        "fraction_of_peak": gflop / (p50 / 1e3) / peak,
        "peak_host_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_device_mb": dev_mb,
        "speedup_vs_published": speedup,
    }


def _fmt(r: dict) -> str:
    sp = "" if r["speedup_vs_published"] is None else f"{r['speedup_vs_published']:.2f}×"
    return (
        f"{r['backend']:>12} {r['size']:>4} {r['batch']:>3} {r['precision']:>5} | warm-up {r['warmup_s']:>6.1f} s | "
        f"render p50 {r['render_ms_p50']:>8.1f} p95 {r['render_ms_p95']:>8.1f} min {r['render_ms_min']:>8.1f} ms "
        f"| {r['fps']:>7.1f} fps | {100 * r['fraction_of_peak']:>4.0f}% peak | {sp:>6}"
    )


def print_table(result: dict) -> None:
    """A rich table on the terminal (plain text when rich is not installed)."""
    m = result["machine"]
    title = (
        f"{m['cpu']} · {m['cores']} cores · {m['gpu'] or 'no GPU'} · torch {m['versions']['torch']} · peak "
        f"{m['peak_gflops']:.0f} GFLOP/s, copy {m['copy_gbs']:.0f} GB/s"
    )
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        for r in result["rows"]:
            print(_fmt(r))
        return
    t = Table(title=title)
    for col in (
        "backend",
        "size",
        "batch",
        "prec",
        "warm-up s",
        "render p50 ms",
        "p95",
        "min",
        "frames/s",
        "motion ms",
        "GFLOP",
        "% peak",
        "host MB",
        "vs published",
    ):
        t.add_column(col, justify="right")
    for r in result["rows"]:
        sp = "—" if r["speedup_vs_published"] is None else f"{r['speedup_vs_published']:.2f}×"
        t.add_row(
            r["backend"],
            str(r["size"]),
            str(r["batch"]),
            r["precision"],
            f"{r['warmup_s']:.1f}",
            f"{r['render_ms_p50']:.1f}",
            f"{r['render_ms_p95']:.1f}",
            f"{r['render_ms_min']:.1f}",
            f"{r['fps']:.1f}",
            f"{r['motion_ms_p50']:.1f}",
            f"{r['gflop_per_frame']:.1f}",
            f"{100 * r['fraction_of_peak']:.0f}",
            f"{r['peak_host_mb']:.0f}",
            sp,
        )
    import sys

    Console(width=None if sys.stdout.isatty() else 180).print(t)


def plot(result: dict, path: str | os.PathLike) -> Path:
    """PNG: latency (ms per frame) and throughput (frames/s) against batch, one line per backend and size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .files import atomic_path

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    keys = sorted({(r["backend"], r["size"]) for r in result["rows"]})
    for backend, size in keys:
        rs = sorted(
            (r for r in result["rows"] if r["backend"] == backend and r["size"] == size), key=lambda r: r["batch"]
        )
        xs = [r["batch"] for r in rs]
        ax1.plot(xs, [r["render_ms_p50"] for r in rs], marker="o", label=f"{backend} {size}")
        ax2.plot(xs, [r["fps"] for r in rs], marker="o", label=f"{backend} {size}")
    for ax, label in ((ax1, "render ms / frame (p50)"), (ax2, "frames / s")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    ax2.legend(fontsize=8)
    m = result["machine"]
    fig.suptitle(f"leo-rt bench · {m['gpu'] or m['cpu']} · {m['date']}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path
