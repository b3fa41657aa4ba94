"""Timing: the one loop that times calls (`time_calls`, every device synchronised), per-stage timers for streams
(`StageTimer`), and process set-up for steady CPU timings (`keep_heap_memory`)."""

from __future__ import annotations

import ctypes
import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


def synchronize(device: torch.device | str) -> None:
    """Wait until all work queued on `device` (every stream of it) has finished; nothing to wait for on CPU."""
    device = torch.device(device)
    if device.type in ("cpu", "meta"):
        return
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return
    backend = getattr(torch, device.type, None)  # torch.xpu, torch.mps …
    sync = getattr(backend, "synchronize", None)
    if sync is not None:
        sync()
    else:
        torch.accelerator.synchronize(device)


def time_calls(fn: Callable[[], object], n: int, device: torch.device | str = "cpu", *, warmup: int = 1,
               inner: int = 1) -> list[float]:  # fmt: skip
    """Seconds per call of `fn`, `n` samples. `warmup` untimed calls come first (compilation, allocator and
    oneDNN primitive caches; pass 0 when the caller has warmed up). Each sample times `inner` calls back to back
    and divides by `inner` (raise it for calls of a few microseconds, where synchronising would dominate). The
    device is synchronised before and after each sample, so work a call queues asynchronously (on any stream)
    is counted in the sample that queued it."""
    if n < 1 or inner < 1 or warmup < 0:
        raise ValueError(f"time_calls needs n >= 1, inner >= 1 and warmup >= 0, got {n}, {inner}, {warmup}")
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        synchronize(device)
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        synchronize(device)
        out.append((time.perf_counter() - t) / inner)
    return out


_RESOLVE_EVERY = 64  # pending CUDA event pairs that trigger a non-blocking resolve
WINDOW = 4096  # calls per stage kept for the quantiles: an endless stream keeps no growing history


@dataclass
class StageTimer:
    """Collects durations per named stage. On CUDA each stage is timed with a pair of CUDA events recorded on the
    current stream (no host sync inside the stage); finished events are read every _RESOLVE_EVERY stages without
    waiting, and all of them when the summary is asked for. Totals count every call; the quantiles come from the
    last WINDOW calls of each stage, so memory stays bounded however long the stream runs."""

    device: torch.device | str = "cpu"
    records: dict[str, deque[tuple[float, int]]] = field(default_factory=dict)
    totals: dict[str, list[float]] = field(default_factory=dict)  # stage → [calls, frames, seconds]
    pending: list[tuple[str, object, object, int]] = field(default_factory=list)
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)  # writers time too

    @contextmanager
    def stage(self, name: str, frames: int = 1, host: bool = False):
        """Time the block as stage `name` of `frames` frames; `host=True` for host work (writing files), timed by
        the clock even on CUDA, where device stages are timed by events on the current stream."""
        if not host and torch.device(self.device).type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            with self._lock:
                self.pending.append((name, start, end, frames))
                if len(self.pending) >= _RESOLVE_EVERY:
                    self._resolve(block=False)  # an endless stream must not keep every event
            return
        t0 = time.perf_counter()
        yield
        self._add(name, time.perf_counter() - t0, frames)

    def _add(self, name: str, seconds: float, frames: int) -> None:
        with self._lock:
            self.records.setdefault(name, deque(maxlen=WINDOW)).append((seconds, frames))
            total = self.totals.setdefault(name, [0, 0, 0.0])
            total[0] += 1
            total[1] += frames
            total[2] += seconds

    def _resolve(self, block: bool = True) -> None:
        """Move finished event pairs (all of them when `block`, waiting for each) into the records, in order."""
        with self._lock:
            done = 0
            for name, start, end, frames in self.pending:
                if block:
                    end.synchronize()
                elif not end.query():
                    break
                self._add(name, start.elapsed_time(end) / 1e3, frames)
                done += 1
            del self.pending[:done]

    def reset(self) -> None:
        """Forget every timing so far (pending CUDA timings are waited for and dropped)."""
        self._resolve()
        with self._lock:
            self.records.clear()
            self.totals.clear()

    def resolve(self) -> None:
        """Wait for the pending CUDA timings and move them into the records (summary() does this itself)."""
        self._resolve()

    def drain(self) -> list[tuple[str, float, int]]:
        """The calls timed since the last drain, [(stage, seconds, frames)], taken out of the quantile window (the
        totals keep them). For a consumer that aggregates on its own, e.g. the server's metrics."""
        self._resolve()
        with self._lock:
            out = [(name, t, f) for name, recs in self.records.items() for t, f in recs]
            for recs in self.records.values():
                recs.clear()
        return out

    def summary(self) -> dict[str, dict[str, float]]:
        """Per stage: calls, frames, total seconds, ms per frame (over every call), p50/p95 of the per-call ms per
        frame (over the last WINDOW calls) and frames per second."""
        self._resolve()
        with self._lock:
            totals = {name: tuple(t) for name, t in self.totals.items()}
            windows = {name: list(recs) for name, recs in self.records.items()}
        out = {}
        for name, (calls, frames, total) in totals.items():
            per_frame = sorted(1e3 * t / max(n, 1) for t, n in windows.get(name, ()))
            out[name] = {
                "calls": calls,
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
