"""Prometheus metrics of one server (its own registry, so several apps in one process do not collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# per-frame stage times and hand-off delays span 0.1 ms (a GPU frame) to seconds (a CPU under load)
_SECONDS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128)


class ServeMetrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.sessions = Gauge("leo_rt_sessions", "Open sessions", registry=r)
        self.clients = Gauge("leo_rt_clients", "Sessions with a client attached", ["transport"], registry=r)
        self.sessions_opened = Counter("leo_rt_sessions_opened", "Sessions created", ["motion"], registry=r)
        self.sessions_closed = Counter("leo_rt_sessions_closed", "Sessions closed, by reason", ["reason"], registry=r)
        self.sessions_refused = Counter(
            "leo_rt_sessions_refused", "Session requests refused (429 full, 413/422 bad image)", ["status"], registry=r
        )
        self.frames_rendered = Counter("leo_rt_frames_rendered", "Frames rendered by the frame core", registry=r)
        self.frames_sent = Counter("leo_rt_frames_sent", "Frames handed to a client", ["transport"], registry=r)
        self.frames_dropped = Counter(
            "leo_rt_frames_dropped", "Frames dropped because their client lagged", ["transport"], registry=r
        )
        self.driving_frames = Counter("leo_rt_driving_frames", "Driving frames received", ["transport"], registry=r)
        self.stage_seconds = Histogram(
            "leo_rt_stage_seconds",
            "Device time per frame of each core stage (source, motion, sample, render), per call",
            ["stage"],
            buckets=_SECONDS,
            registry=r,
        )
        self.frame_delay = Histogram(
            "leo_rt_frame_delay_seconds",
            "Render to hand-off to the transport (queueing and pacing), per frame",
            ["transport"],
            buckets=_SECONDS,
            registry=r,
        )
        self.batch_frames = Histogram(
            "leo_rt_render_batch_frames", "Frames per batched render call (all sessions)", buckets=_BATCH, registry=r
        )

    def record_core(self, stages: list[tuple[str, float, int]], batches: list[int]) -> None:
        """Stage timings and batch sizes drained from the frame core."""
        for name, seconds, frames in stages:
            self.stage_seconds.labels(name).observe(seconds / max(frames, 1))
        for n in batches:
            self.batch_frames.observe(n)
            self.frames_rendered.inc(n)

    def render(self) -> bytes:
        return generate_latest(self.registry)
