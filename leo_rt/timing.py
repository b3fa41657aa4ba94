"""Per-stage wall-clock timers and process set-up for steady CPU timings."""

from __future__ import annotations

import ctypes
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


@dataclass
class StageTimer:
    """Collects durations per named stage. On CUDA each stage is timed with a pair of CUDA events recorded on the
    current stream (no host sync inside the stage); the events are read when the summary is asked for."""

    device: torch.device | str = "cpu"
    records: dict[str, list[tuple[float, int]]] = field(default_factory=dict)
    pending: list[tuple[str, object, object, int]] = field(default_factory=list)

    @contextmanager
    def stage(self, name: str, frames: int = 1):
        if torch.device(self.device).type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.pending.append((name, start, end, frames))
            return
        t0 = time.perf_counter()
        yield
        self.records.setdefault(name, []).append((time.perf_counter() - t0, frames))

    def _resolve(self) -> None:
        for name, start, end, frames in self.pending:
            end.synchronize()
            self.records.setdefault(name, []).append((start.elapsed_time(end) / 1e3, frames))
        self.pending.clear()

    def summary(self) -> dict[str, dict[str, float]]:
        """Per stage: calls, frames, total seconds, ms per frame, p50/p95 of the per-call ms per frame and
        frames per second."""
        self._resolve()
        out = {}
        for name, recs in self.records.items():
            per_frame = sorted(1e3 * t / max(n, 1) for t, n in recs)
            total = sum(t for t, _ in recs)
            frames = sum(n for _, n in recs)
            out[name] = {
                "calls": len(recs),
                "frames": frames,
                "total_s": total,
                "ms_per_frame": 1e3 * total / max(frames, 1),
                "p50_ms": _quantile(per_frame, 0.5),
                "p95_ms": _quantile(per_frame, 0.95),
                "fps": frames / total if total > 0 else float("nan"),
            }
        return out

    def table(self) -> str:
        rows = [f"{'stage':<10} {'calls':>5} {'frames':>6} {'total s':>8} {'ms/frame':>9} {'p50 ms':>8} {'p95 ms':>8}"]
        for name, s in self.summary().items():
            rows.append(
                f"{name:<10} {s['calls']:>5} {s['frames']:>6} {s['total_s']:>8.2f} {s['ms_per_frame']:>9.1f} "
                f"{s['p50_ms']:>8.1f} {s['p95_ms']:>8.1f}"
            )
        return "\n".join(rows)


def _quantile(sorted_vals: list[float], q: float) -> float:
    """Linear-interpolated quantile of an already sorted list."""
    if not sorted_vals:
        return float("nan")
    pos = q * (len(sorted_vals) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def keep_heap_memory() -> bool:
    """Stop glibc from returning large blocks to the OS after each op (mmap + trim), which makes eager CPU
    timings swing by up to 2× through page faults. Process-wide: for CLIs and benchmarks, not libraries.
    Returns False where glibc's mallopt is unavailable."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**30))
