"""The server's sessions: created (source encoded once), looked up, closed for every reason, reaped when idle."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time

import numpy as np

from ..errors import LeoError
from .config import ServeConfig
from .engine import Engine
from .live import LiveSession, SessionOptions
from .metrics import ServeMetrics


class ApiError(Exception):
    """An error answered as JSON: {"error": {"status": ..., "reason": ...}}."""

    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None):
        super().__init__(reason)
        self.status, self.reason, self.headers = status, reason, headers or {}


class SessionManager:
    """All sessions of one server. Touched only on the event loop (blocking work goes to threads). The routes
    (leo_rt.serve.app) use the async methods, which a manager whose sessions live elsewhere overrides
    (leo_rt.serve.remote.ClusterSessions)."""

    labels: dict[str, str] = {}  # added to the answers about sessions: which server gave them

    def __init__(self, engine: Engine, config: ServeConfig, metrics: ServeMetrics):
        self.engine, self.config, self.metrics = engine, config, metrics
        self._sessions: dict[str, LiveSession] = {}
        self._reserved = 0  # sessions being created (their source is being encoded)
        self._closing: set[asyncio.Task] = set()

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, sid: str) -> bool:
        return sid in self._sessions

    def get(self, sid: str) -> LiveSession:
        live = self._sessions.get(sid)
        if live is None:
            raise ApiError(404, f"no session {sid!r} (closed, timed out or never made); create one: POST /v1/sessions")
        return live

    async def lookup(self, sid: str) -> LiveSession:
        """The session, or a 404."""
        return self.get(sid)

    async def session_info(self, live: LiveSession) -> dict:
        """What GET /v1/sessions/{id} answers."""
        return live.info()

    async def health(self) -> dict:
        """What /healthz answers."""
        e, cfg = self.engine, self.config
        return {
            "status": "ok",
            "sessions": len(self),
            "max_sessions": cfg.max_sessions,
            "size": e.size,
            "backend": e.backend_name,
            "device": str(e.device),
            "weights": e.weights,
            "auth": cfg.token is not None,
            "time": time.time(),
        }

    async def metrics_text(self) -> str:
        """What /metrics answers. Never waits on the device: housekeeping brings the core's timings in within a
        second or so."""
        return self.metrics.render()

    async def create(self, image: np.ndarray, options: SessionOptions) -> LiveSession:
        cfg = self.config
        if len(self._sessions) + self._reserved >= cfg.max_sessions:
            self.metrics.sessions_refused.labels("429").inc()
            raise ApiError(
                429,
                f"the server is full ({cfg.max_sessions} sessions); retry in {cfg.retry_after_s} s or close one",
                {"Retry-After": str(cfg.retry_after_s)},
            )
        self._reserved += 1
        try:
            try:
                sampler = self.engine.sampler(options.sampler, options.steps) if options.motion == "lmdm" else None
                session = await asyncio.to_thread(self.engine.open_session, image)
            except LeoError as e:
                raise ApiError(422, str(e)) from None
        finally:
            self._reserved -= 1
        sid = secrets.token_urlsafe(12)
        live = LiveSession(
            sid,
            session,
            options,
            sampler=sampler,
            batch=cfg.batch,
            queue_size=cfg.queue_size,
            max_pixels=cfg.max_pixels,
            on_frame=lambda f, live_id=sid: self._frame_sent(live_id),
        )
        self._sessions[sid] = live
        self.metrics.sessions_opened.labels(options.motion).inc()
        self.metrics.sessions.set(len(self._sessions))
        return live

    def _frame_sent(self, sid: str) -> None:
        live = self._sessions.get(sid)
        if live is not None and live.client is not None:
            self.metrics.frames_sent.labels(live.client).inc()
            if live.delays:
                self.metrics.frame_delay.labels(live.client).observe(live.delays[-1])

    def claim(self, live: LiveSession, transport: str) -> None:
        if not live.claim(transport):
            raise ApiError(409, f"session {live.id} already has a client ({live.client}); create another session")
        self.metrics.clients.labels(transport).inc()

    async def close(self, sid: str, reason: str) -> bool:
        """Close a session (its stream, threads, peer connection and source). False if it was not open."""
        live = self._sessions.pop(sid, None)
        if live is None:
            return False
        self.metrics.sessions.set(len(self._sessions))
        self.metrics.sessions_closed.labels(reason).inc()
        if live.client is not None:
            self.metrics.clients.labels(live.client).dec()
        live.stop()
        if live.peer is not None:
            with contextlib.suppress(Exception):  # a peer connection already torn down by its own failure
                await live.peer.close()
        await asyncio.to_thread(live.close)
        return True

    def close_soon(self, sid: str, reason: str) -> asyncio.Task:
        """Close in a task of its own, which a cancelled caller cannot interrupt (the manager keeps it until done,
        and shutdown waits for it)."""
        task = asyncio.ensure_future(self.close(sid, reason))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
        return task

    async def close_all(self, reason: str = "shutdown") -> None:
        await asyncio.gather(*(self.close(sid, reason) for sid in list(self._sessions)))
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    async def shutdown(self) -> None:
        """The server is stopping: close every session."""
        await self.close_all("shutdown")

    async def housekeeping(self, period_s: float = 1.0) -> None:
        """Forever: close sessions idle past the timeout; move the core's timings into the metrics (one drain in
        flight at a time: it waits its turn on the device worker, and nothing else waits for it)."""
        drain: asyncio.Future | None = None
        try:
            while True:
                await asyncio.sleep(period_s)
                await self.sweep()
                if drain is None or drain.done():
                    drain = asyncio.ensure_future(self.drain_core())
        finally:
            if drain is not None:
                drain.cancel()

    async def sweep(self) -> None:
        now = time.monotonic()
        for sid, live in list(self._sessions.items()):
            # no client, or a client that never got its stream going (a WebRTC peer that never connected)
            if (live.client is None or not live.started) and now - live.last_active > self.config.idle_timeout_s:
                await self.close(sid, "idle")

    async def drain_core(self) -> None:
        """Move the stage timings and batch sizes recorded by the core into the metrics."""
        stages, batches = await asyncio.wrap_future(self.engine.drain_stats())
        self.metrics.record_core(stages, batches)
