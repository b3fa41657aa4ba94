"""The ingress side of leo_rt on Ray Serve (leo_rt.serve.cluster): the `leo-rt serve` API, frames from replicas.

Each session of an ingress replica is the single-process server's `LiveSession` (pacing, pause/resume/seed, the
drive source, WebSocket and WebRTC hand-off, all reused) around a `RemoteSession` in place of a local `Session`:

- LMDM motion: a receiver thread asks renderer replicas for frames one segment at a time (a streaming response,
  routed by the session id as multiplexed model id) and keeps at most `queue_size` batches ahead of the pump.
  Every item carries the motion state after it; when a replica dies the receiver asks again from the last state
  received, the next replica rebuilds the session, and the stream goes on with the very codes it would have had.
- drive motion: each driving frame's code is encoded and rendered by the session's replica (the latest frame
  wins, as in the single-process server), again retried on another replica when one dies.

Sessions are kept in the SessionStore deployment, not in this process: another ingress replica looks a session
up there and takes it over (`ClusterSessions.lookup`), motion continuing from the last state saved.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import secrets
import threading
import time
from collections import Counter, deque
from dataclasses import asdict

import numpy as np
import torch

from ..errors import InputError, LeoError
from ..io import square_resize
from .app import create_app
from .config import ServeConfig
from .live import LiveSession, SessionOptions
from .metrics import ServeMetrics
from .resume import MotionState
from .sessions import ApiError, SessionManager

log = logging.getLogger("ray.serve")
_END = object()


class _Failed:
    def __init__(self, exc: BaseException):
        self.exc = exc


def _retryable() -> tuple[type[BaseException], ...]:
    """Errors that mean "this replica is gone or busy": the request is sent again (to another replica)."""
    from ray.exceptions import ActorUnavailableError, RayActorError
    from ray.serve.exceptions import BackPressureError, ReplicaUnavailableError

    return (RayActorError, ActorUnavailableError, BackPressureError, ReplicaUnavailableError)


class RemoteSampler:
    """An LMDM sampler chosen by a session; sampling happens on the replicas (each has the LMDM)."""

    def __init__(self, name: str, steps: int):
        from ..schedulers import SAMPLERS

        if name not in SAMPLERS:
            raise InputError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
        self.name, self.steps = name, int(steps)


class _SourceFacts:
    def __init__(self, alpha_src: torch.Tensor):
        self.alpha_src = alpha_src  # (1, D): what relative drive mode adds back (docs/ARCHITECTURE.md §2.5)


# ------------------------------------------------------------------------------------------- remote session


class RemoteSession:
    """What LiveSession and DriveSource need of a Session (stream, encode_motion, relative_alpha, state, size,
    close), with the frames made by renderer replicas and every replica failure retried."""

    def __init__(
        self,
        sid: str,
        renderer,
        store,
        *,
        size: int,
        alpha_src: np.ndarray,
        segment_frames: int,
        recovery_timeout_s: float,
        resume: dict | None = None,
    ):
        self.sid, self.size = sid, size
        self.state = _SourceFacts(torch.from_numpy(np.asarray(alpha_src)))
        self.segment_frames = segment_frames
        self.recovery_timeout_s = recovery_timeout_s
        self.dropped = 0
        self._handle = renderer.options(multiplexed_model_id=sid)
        self._streaming = renderer.options(multiplexed_model_id=sid, stream=True)
        self._store = store
        self._resume = MotionState.from_dict(resume) if resume else None
        self._lock = threading.Lock()
        self._inflight = None
        self._saving = None  # the last store write, kept until the next one
        self._last_touch = 0.0
        # what the cluster did for this session (session info, tests, the benchmark)
        self.replica: str | None = None
        self.frames_by_replica: Counter[str] = Counter()
        self.failures = 0
        self.recoveries: list[float] = []  # seconds from a replica failure to the next frame
        self.hops: deque[float] = deque(maxlen=256)  # seconds from a replica's render to this ingress

    # --------------------------------------------------------------------------------------------- Session API
    def stream(self, codes, *, n_frames=None, batch=8, queue_size=4, policy="block", output="tensor", seed=None, **_):
        """Frame batches in order, as Session.stream: from an LMDM sampler (segments of frames from replicas, with
        the motion state carried along) or from an iterable of (n, D) codes (drive)."""
        if output not in ("tensor", "uint8"):
            raise InputError(f"output must be 'tensor' or 'uint8', got {output!r}")
        if isinstance(codes, RemoteSampler):
            return self._lmdm(codes, n_frames, batch, queue_size, output, seed)
        return self._driven(codes, n_frames, output)

    def encode_motion(self, images) -> torch.Tensor:
        images = np.ascontiguousarray(images)
        return torch.from_numpy(self._call(self._handle.encode_motion, images))

    def relative_alpha(self, state, alpha_drv: torch.Tensor, alpha_start: torch.Tensor) -> torch.Tensor:
        return alpha_drv - alpha_start + state.alpha_src.to(alpha_drv)

    def close(self) -> None:
        """Local only: the session stays in the store and on replicas (the manager deletes it there)."""
        self._cancel()

    # ------------------------------------------------------------------------------------------------- LMDM
    def _lmdm(self, sampler: RemoteSampler, n_frames, batch, queue_size, output, seed):
        seed = int(seed) if seed is not None else secrets.randbelow(2**31)
        resume, self._resume = self._resume, None
        state = resume if resume is not None and resume.seed == seed else MotionState.initial(seed)
        inbox: queue.Queue = queue.Queue(maxsize=max(1, queue_size))
        stop = threading.Event()
        rx = threading.Thread(
            target=self._receive,
            args=(sampler, state, n_frames, batch, output, inbox, stop),
            name=f"leo_rt-ray-{self.sid[:8]}",
            daemon=True,
        )
        rx.start()
        try:
            while True:
                item = inbox.get()
                if item is _END:
                    return
                if isinstance(item, _Failed):
                    raise item.exc
                yield item
        finally:
            stop.set()
            self._cancel()
            with contextlib.suppress(queue.Empty):
                while True:
                    inbox.get_nowait()
            rx.join()

    def _receive(self, sampler, state: MotionState, n_frames, batch, output, inbox: queue.Queue, stop) -> None:
        """Segments one after the other, each asked from the state after the last item received; a replica
        failure asks again from there, until recovery_timeout_s has passed without a frame."""
        retryable, backoff = _retryable(), _Backoff(self, "took session {sid} over")
        start = state.frames
        try:
            while not stop.is_set() and (n_frames is None or state.frames - start < n_frames):
                n = (
                    self.segment_frames
                    if n_frames is None
                    else min(self.segment_frames, n_frames - state.frames + start)
                )
                request = {
                    "state": state.to_dict(),
                    "frames": n,
                    "batch": batch,
                    "sampler": sampler.name,
                    "steps": sampler.steps,
                    "output": output,
                }
                try:
                    with self._lock:  # a consumer gone meanwhile has cancelled what was in flight: send nothing
                        if stop.is_set():
                            return
                        response = self._inflight = self._streaming.segment.remote(request)
                    for item in response:
                        took = backoff.recovered()
                        if took is not None:
                            log.warning("session %s: back on %s after %.2f s", self.sid[:8], item["replica"], took)
                        self.hops.append(time.time() - item["t_render"])
                        state = MotionState.from_dict(item["state"])
                        frames = item["frames"]
                        self._note(item["replica"], frames.shape[0])
                        if not _put(inbox, torch.from_numpy(frames) if output == "tensor" else frames, stop):
                            return
                except retryable as e:
                    if stop.is_set():
                        return
                    if backoff.failed(e):
                        log.warning(
                            "session %s: replica %s failed (%s); asking another",
                            self.sid[:8],
                            self.replica,
                            type(e).__name__,
                        )
                    backoff.wait()
                    continue
                finally:
                    with self._lock:
                        self._inflight = None
                self._save(state)
            _put(inbox, _END, stop)
        except BaseException as e:  # handed to the consumer (a cancelled request after stop is no error)
            if not stop.is_set():
                _put(inbox, _Failed(e), stop)

    def _note(self, replica: str, n: int) -> None:
        self.replica = replica
        self.frames_by_replica[replica] += n
        now = time.monotonic()
        if now - self._last_touch > 5.0:  # other ingress replicas see the session as active
            self._last_touch = now
            self._saving = self._store.touch.remote(self.sid)

    def _save(self, state: MotionState) -> None:
        self._saving = self._store.save_motion.remote(self.sid, state.to_dict(), self.stats())

    def stats(self) -> dict:
        hops = sorted(self.hops)
        q = (lambda p: round(1e3 * hops[min(len(hops) - 1, int(p * len(hops)))], 2)) if hops else (lambda p: None)
        return {
            "replica": self.replica,
            "frames_by_replica": dict(self.frames_by_replica),
            "failures": self.failures,
            "recoveries_s": [round(r, 3) for r in self.recoveries],
            "hop_ms": {"p50": q(0.5), "p95": q(0.95)},  # replica render → this ingress
        }

    def _cancel(self) -> None:
        with self._lock:
            response, self._inflight = self._inflight, None
        if response is not None:
            response.cancel()

    # ------------------------------------------------------------------------------------------------ drive
    def _driven(self, codes, n_frames, output):
        emitted = 0
        for alpha in codes:
            if n_frames is not None:
                alpha = alpha[: n_frames - emitted]
            out = self._call(self._handle.render, alpha.detach().float().cpu().numpy(), output)
            self._note(out["replica"], out["frames"].shape[0])
            emitted += out["frames"].shape[0]
            yield torch.from_numpy(out["frames"]) if output == "tensor" else out["frames"]
            if n_frames is not None and emitted >= n_frames:
                return

    def _call(self, method, *args):
        """method.remote(*args).result(), sent again while replicas fail (up to recovery_timeout_s)."""
        retryable, backoff = _retryable(), _Backoff(self, "answered for session {sid}")
        while True:
            try:
                out = method.remote(*args).result()
                backoff.recovered()
                return out
            except retryable as e:
                backoff.failed(e)
                backoff.wait()


class _Backoff:
    """Retries of a session's requests while replicas fail: each failure counted in the session's stats, each
    recovery timed; waits from 0.05 s doubling to 1 s; gives up recovery_timeout_s after the first failure."""

    def __init__(self, remote, what: str):
        self.remote, self.what = remote, what
        self.failed_at: float | None = None
        self.delay = 0.05

    def failed(self, e: BaseException) -> bool:
        """Count a failure (True for the first of a run); raise LeoError once the time is up."""
        r = self.remote
        r.failures += 1
        first = self.failed_at is None
        if first:
            self.failed_at = time.monotonic()
        if time.monotonic() - self.failed_at > r.recovery_timeout_s:
            raise LeoError(
                f"no renderer replica {self.what.format(sid=r.sid)} within {r.recovery_timeout_s:g} s; "
                "is the cluster up?"
            ) from e
        return first

    def wait(self) -> None:
        time.sleep(self.delay)
        self.delay = min(2 * self.delay, 1.0)

    def recovered(self) -> float | None:
        """After a success: the seconds since the run of failures began (recorded), or None when there was none."""
        if self.failed_at is None:
            return None
        took = time.monotonic() - self.failed_at
        self.remote.recoveries.append(took)
        self.failed_at, self.delay = None, 0.05
        return took


def _put(inbox: queue.Queue, item, stop: threading.Event) -> bool:
    """Put, waiting for room while the consumer is there; False once it has gone."""
    while not stop.is_set():
        try:
            inbox.put(item, timeout=0.05)
            return True
        except queue.Full:
            continue
    return False


class ClusterLiveSession(LiveSession):
    """A LiveSession whose info also says where its frames came from."""

    def info(self) -> dict:
        return {**super().info(), "cluster": self.session.stats()}


# ------------------------------------------------------------------------------------------------- sessions


class RemoteEngine:
    """The facts of the renderer replicas (as the single-process server's Engine), and the handles to them."""

    def __init__(self, info: dict, renderer, store, cluster):
        self.renderer, self.store, self.cluster = renderer, store, cluster
        self.size, self.backend_name, self.device, self.weights = (
            info["size"],
            info["backend"],
            info["device"],
            info["weights"],
        )

    def sampler(self, name: str, steps: int) -> RemoteSampler:
        return RemoteSampler(name, steps)


class ClusterSessions(SessionManager):
    """The sessions of one ingress replica, backed by the SessionStore: created here or taken over from another
    ingress replica on first use; the session limit and idle time are cluster-wide."""

    engine: RemoteEngine

    def __init__(self, engine: RemoteEngine, config: ServeConfig, metrics: ServeMetrics, name: str):
        super().__init__(engine, config, metrics)
        self.labels = {"ingress": name}

    def get(self, sid: str) -> LiveSession:  # the routes use lookup
        raise RuntimeError("ClusterSessions.get is not used; await lookup(sid)")

    async def lookup(self, sid: str) -> LiveSession:
        """The session, from this ingress or taken over from the store; 404 when the store does not have it."""
        created = await self.engine.store.touch.remote(sid)
        live = self._sessions.get(sid)
        if created is None:
            if live is not None:
                await self._forget(sid)
            raise ApiError(
                404, f"no session {sid!r} (closed, timed out or never created); create one: POST /v1/sessions"
            )
        if live is None:
            record = await self.engine.store.get.remote(sid)
            if record is None or "opened" not in record:
                raise ApiError(404, f"no session {sid!r} (closed meanwhile, or still being created)")
            live = self._sessions.get(sid) or self._add(
                sid, SessionOptions(**record["options"]), record["opened"], record.get("motion")
            )
        return live

    async def session_info(self, live: LiveSession) -> dict:
        info = live.info()
        if info["client"] is None:  # streamed through another ingress replica: what it saved last
            info["cluster"] = await self.engine.store.stats.remote(live.id) or info["cluster"]
        return info

    async def health(self) -> dict:
        """The cluster's session count (the store's), and this ingress replica's own."""
        return {
            **await super().health(),
            "sessions": await self.engine.store.count.remote(),
            **self.labels,
            "local_sessions": len(self),
        }

    async def metrics_text(self) -> str:
        await self.drain_core()  # the replicas' timings up to now, not as of the last housekeeping round
        return await super().metrics_text()

    async def create(self, image: np.ndarray, options: SessionOptions) -> LiveSession:
        cfg, engine = self.config, self.engine
        sid = secrets.token_urlsafe(12)
        self._reserved += 1
        try:
            record = {"image": square_resize(image, engine.size), "options": asdict(options), "created": time.time()}
            if await engine.store.reserve.remote(sid, record, cfg.max_sessions) is None:
                self.metrics.sessions_refused.labels("429").inc()
                raise ApiError(
                    429,
                    f"the cluster is full ({cfg.max_sessions} sessions); retry in {cfg.retry_after_s} s or close one",
                    {"Retry-After": str(cfg.retry_after_s)},
                )
            try:
                engine.sampler(options.sampler, options.steps)
                opened = await engine.renderer.options(multiplexed_model_id=sid).open.remote()
                await engine.store.update.remote(sid, {"opened": opened})  # what another ingress needs to take over
            except LeoError as e:
                await engine.store.delete.remote(sid)
                raise ApiError(422, str(e)) from None
            except BaseException:
                await engine.store.delete.remote(sid)
                raise
        finally:
            self._reserved -= 1
        live = self._add(sid, options, opened, None)
        self.metrics.sessions_opened.labels(options.motion).inc()
        return live

    def _add(self, sid: str, options: SessionOptions, opened: dict, motion: dict | None) -> LiveSession:
        cfg, c = self.config, self.engine.cluster
        remote = RemoteSession(
            sid,
            self.engine.renderer,
            self.engine.store,
            size=self.engine.size,
            alpha_src=opened["alpha_src"],
            segment_frames=c.segment_frames,
            recovery_timeout_s=c.recovery_timeout_s,
            resume=motion,
        )
        remote.replica = opened["replica"]
        live = ClusterLiveSession(
            sid,
            remote,
            options,
            sampler=self.engine.sampler(options.sampler, options.steps) if options.motion == "lmdm" else None,
            batch=cfg.batch,
            queue_size=cfg.queue_size,
            max_pixels=cfg.max_pixels,
            on_frame=lambda f, live_id=sid: self._frame_sent(live_id),
        )
        self._sessions[sid] = live
        self.metrics.sessions.set(len(self._sessions))
        return live

    async def close(self, sid: str, reason: str) -> bool:
        """Close the session here and everywhere: the store forgets it and its replica frees its source."""
        here = await super().close(sid, reason)
        existed = await self.engine.store.delete.remote(sid)
        if existed:
            with contextlib.suppress(Exception):  # the replica's LRU frees it anyway
                await self.engine.renderer.options(multiplexed_model_id=sid).release.remote(sid)
        return here or existed

    async def shutdown(self) -> None:
        """Only this ingress replica stops: the cluster keeps the sessions, another ingress takes them over."""
        for sid in list(self._sessions):
            await self._forget(sid)

    async def _forget(self, sid: str) -> None:
        """Drop this ingress's copy of a session without closing it in the cluster."""
        live = self._sessions.pop(sid, None)
        if live is not None:
            self.metrics.sessions.set(len(self._sessions))
            live.stop()
            if live.peer is not None:
                with contextlib.suppress(Exception):
                    await live.peer.close()
            await asyncio.to_thread(live.close)

    async def sweep(self) -> None:
        """Sessions idle (no client) past the timeout: closed when idle in the whole cluster, else only
        forgotten here (another ingress replica serves them)."""
        now, timeout = time.monotonic(), self.config.idle_timeout_s
        for sid, live in list(self._sessions.items()):
            if live.client is not None or now - live.last_active <= timeout:
                continue
            last = await self.engine.store.last_active.remote(sid)
            if last is not None and time.time() - last > timeout:
                await self.close(sid, "idle")
            else:
                await self._forget(sid)
        await self.drain_core()

    async def drain_core(self) -> None:
        """The replicas' stage timings and batch sizes (each replica's, since any ingress last asked)."""
        renderer = self.engine.renderer
        if not hasattr(renderer, "broadcast"):  # Ray without broadcast: Serve's own metrics only
            return
        with contextlib.suppress(Exception):
            results = await renderer.broadcast("drain_stats").results_async(return_exceptions=True)
            for r in results:
                if not isinstance(r, BaseException):
                    self.metrics.record_core(*r)


# ------------------------------------------------------------------------------------------------------ app


def build_ingress_app(renderer, store, info: dict, cluster, *, name: str = "ingress"):
    """The FastAPI app of an ingress replica: the app of `leo-rt serve` (leo_rt.serve.app) over ClusterSessions."""
    engine = RemoteEngine(info, renderer, store, cluster)
    manager = ClusterSessions(engine, cluster.serve, ServeMetrics(), name)
    return create_app(manager, title="leo_rt serve (Ray)")
