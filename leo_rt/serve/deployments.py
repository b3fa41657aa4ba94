"""The Ray Serve deployments of leo_rt on a cluster (leo_rt.serve.cluster has the overview and the entry points):
SessionStore, Renderer (one FrameCore per replica; sessions as multiplexed models) and Ingress (the API)."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import ray
import torch
from ray import serve

from ..errors import LeoError
from .cluster import ClusterConfig

log = logging.getLogger("ray.serve")


class SessionGone(LeoError):
    """The session is not in the store (deleted, timed out, or never created)."""


# ----------------------------------------------------------------------------------------------- session store


class SessionStore:
    """Every session's source image (uint8, model size), options and last motion state, in one small replica.
    Methods are coroutines without awaits inside: each runs whole on the replica's event loop (no races)."""

    def __init__(self):
        self._records: dict[str, dict] = {}

    async def reserve(self, key: str, record: dict, limit: int) -> int | None:
        """Add a session unless `limit` are open; the number open after, or None when full."""
        if len(self._records) >= limit:
            return None
        self._records[key] = {**record, "motion": None, "last_active": time.time()}
        return len(self._records)

    async def get(self, key: str) -> dict | None:
        return self._records.get(key)

    async def touch(self, key: str) -> float | None:
        """Mark the session active now; its creation time, or None when it is not here."""
        rec = self._records.get(key)
        if rec is None:
            return None
        rec["last_active"] = time.time()
        return rec["created"]

    async def last_active(self, key: str) -> float | None:
        rec = self._records.get(key)
        return None if rec is None else rec["last_active"]

    async def update(self, key: str, fields: dict) -> bool:
        rec = self._records.get(key)
        if rec is None:
            return False
        rec.update(fields)
        return True

    async def save_motion(self, key: str, state: dict, stats: dict | None = None) -> bool:
        """The motion state after the frames a client has been sent (and where they came from)."""
        rec = self._records.get(key)
        if rec is None:
            return False
        rec["motion"], rec["stats"], rec["last_active"] = state, stats, time.time()
        return True

    async def stats(self, key: str) -> dict | None:
        rec = self._records.get(key)
        return None if rec is None else rec.get("stats")

    async def delete(self, key: str) -> bool:
        return self._records.pop(key, None) is not None

    async def count(self) -> int:
        return len(self._records)


# --------------------------------------------------------------------------------------------------- renderer


class _Held:
    """A session held by a renderer replica: a Session on the replica's core with its source encoded. Evicted by
    the replica's LRU (Ray calls __del__); a stream still running keeps it until it ends."""

    def __init__(self, session):
        self.session = session
        self.streams = 0
        self.evicted = False

    def __del__(self):
        self.evicted = True
        if self.streams == 0:
            self.session.close()

    def stream_ended(self) -> None:
        self.streams -= 1
        if self.evicted and self.streams == 0:
            self.session.close()


def _host(frames) -> np.ndarray:
    if isinstance(frames, torch.Tensor):
        return frames.detach().float().cpu().numpy()
    return np.asarray(frames)


class Renderer:
    """One renderer replica: one Engine (one FrameCore on its device, the LMDM); sessions as multiplexed models."""

    def __init__(self, store, config: dict):
        from .engine import Engine

        cfg = self.cfg = ClusterConfig.from_dict(config)
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
        torch.set_num_threads(cfg.torch_threads or max(1, int(cpus)))
        self.engine = Engine.load(
            cfg.checkpoint,
            lmdm=cfg.lmdm,
            preset=cfg.preset,
            backend=cfg.backend,
            device=cfg.device,
            precision=cfg.precision,
            engines=cfg.engines,
            max_batch=cfg.max_batch,
            max_wait_ms=cfg.max_wait_ms,
            log=log.warning,
        )
        self.store = store
        self.name = ray.get_runtime_context().get_actor_name() or "local"
        # threads that wait on frame loops (one per stream) and on encodes, beside the core's one device worker
        self._pool = ThreadPoolExecutor(2 * cfg.sessions_per_replica + 4, thread_name_prefix="leo_rt-replica")
        self._samplers: dict[tuple[str, int], object] = {}

        async def held(key: str) -> _Held:  # a plain function: Ray keeps its LRU on the function object
            return await self._load(key)

        self._held = serve.multiplexed(max_num_models_per_replica=cfg.sessions_per_replica)(held)

    async def _load(self, key: str) -> _Held:
        record = await self.store.get.remote(key)
        if record is None:
            raise SessionGone(f"no session {key!r} in the store (deleted or timed out); create a new one")
        session = await asyncio.get_running_loop().run_in_executor(
            self._pool, self.engine.open_session, record["image"]
        )
        log.info("%s: session %s (re)built", self.name, key[:8])
        return _Held(session)

    def _sampler(self, name: str, steps: int):
        key = (name, int(steps))
        if key not in self._samplers:
            self._samplers[key] = self.engine.sampler(name, int(steps))
        return self._samplers[key]

    async def info(self) -> dict:
        e = self.engine
        return {
            "size": e.size,
            "backend": e.backend_name,
            "device": str(e.device),
            "weights": e.weights,
            "replica": self.name,
            "motion_dim": e.core.motion_dim,
        }

    async def open(self) -> dict:
        """Build the session of the request's multiplexed id (encode its source) on this replica."""
        held = await self._held(serve.get_multiplexed_model_id())
        return {"alpha_src": held.session.state.alpha_src[:1].float().cpu().numpy(), "replica": self.name}

    async def segment(self, request: dict):
        """Stream `frames` LMDM frames of the session from `state`: items {frames, state, replica, t_render},
        `state` being where the stream stands after that item's frames. Frames come from Session.stream, the
        one frame loop, batched with every other stream of this replica's core."""
        from .resume import MotionState, ResumableMotion

        held = await self._held(serve.get_multiplexed_model_id())
        held.streams += 1
        loop = asyncio.get_running_loop()
        pending = None
        frames = None
        try:
            motion = ResumableMotion(
                self.engine.core,
                self._sampler(request["sampler"], request["steps"]),
                MotionState.from_dict(request["state"]),
                held.session.state.alpha_src,
            )
            frames = held.session.stream(
                motion, n_frames=request["frames"], batch=request["batch"], queue_size=2, output=request["output"]
            )
            while True:
                pending = loop.run_in_executor(self._pool, next, frames, None)
                batch = await pending
                pending = None
                if batch is None:
                    return
                state = motion.advance(batch.shape[0])
                yield {"frames": _host(batch), "state": state.to_dict(), "replica": self.name, "t_render": time.time()}
        finally:
            if pending is not None:  # cancelled while the frame loop was busy: let that step finish first
                await asyncio.wait([pending])
            if frames is not None:
                await loop.run_in_executor(self._pool, frames.close)
            held.stream_ended()

    async def render(self, alpha: np.ndarray, output: str = "uint8") -> dict:
        """Frames of the session for codes (n, D) (drive mode: one driving frame's code at a time)."""
        from ..core import ready

        held = await self._held(serve.get_multiplexed_model_id())
        s = held.session
        out = await asyncio.wrap_future(s.core.render(s.handle, torch.from_numpy(np.asarray(alpha)), output))
        out = await asyncio.get_running_loop().run_in_executor(self._pool, ready, out)
        return {"frames": _host(out), "replica": self.name, "t_render": time.time()}

    async def encode_motion(self, images: np.ndarray) -> np.ndarray:
        """Motion codes (B, D) of driving images, uint8 (B, S, S, 3)."""
        from ..io import to_model

        core = self.engine.core
        alpha = await asyncio.get_running_loop().run_in_executor(self._pool, core.encode_motion, to_model(images))
        return alpha.float().cpu().numpy()

    async def release(self, key: str) -> bool:
        """Free a deleted session now, and stop reporting it to Serve's router (which places new sessions on
        the replicas holding the fewest); False if it is not held here. Serve has no public call to unload one
        multiplexed model: this reaches into its LRU (`_ModelMultiplexWrapper`, Ray 2.60), and without it the
        session waits for the LRU to evict it."""
        wrapper = getattr(self._held, "__serve_multiplex_wrapper", None)
        models = getattr(wrapper, "models", None)
        held = models.pop(key, None) if isinstance(models, dict) else None
        if held is None:
            return False
        if hasattr(wrapper, "_push_multiplexed_replica_info"):
            wrapper._push_multiplexed_replica_info = True
        held.evicted = True
        if held.streams == 0:
            await asyncio.get_running_loop().run_in_executor(self._pool, held.session.close)
        return True

    async def drain_stats(self):
        """The core's stage timings and batch sizes since the last call (for the ingress's /metrics)."""
        return await asyncio.wrap_future(self.engine.drain_stats())

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False)


# ---------------------------------------------------------------------------------------------------- ingress


class Ingress:
    """An ingress replica: the HTTP/WebSocket API of `leo-rt serve`, its sessions' frames fetched from renderer
    replicas (leo_rt.serve.remote). Any number of them can run: sessions live in the store."""

    async def __init__(self, renderer, store, config: dict):
        from .remote import build_ingress_app

        cfg = ClusterConfig.from_dict(config)
        info = await renderer.info.remote()
        self.name = ray.get_runtime_context().get_actor_name() or "local"
        self._app = build_ingress_app(renderer, store, info, cfg, name=self.name)

    def __serve_build_asgi_app__(self):
        return self._app


RendererDeployment = serve.deployment(name="Renderer")(Renderer)
StoreDeployment = serve.deployment(name="SessionStore", ray_actor_options={"num_cpus": 0})(SessionStore)
IngressDeployment = serve.deployment(name="Ingress")(serve.ingress()(Ingress))


def build_app(config: ClusterConfig):
    """The Serve application: Ingress → Renderer × N, both → SessionStore."""
    c = config
    scaling = {"num_replicas": c.replicas}
    if c.max_replicas is not None:
        lo = c.min_replicas if c.min_replicas is not None else 1
        scaling = {
            "autoscaling_config": {
                "min_replicas": lo,
                "initial_replicas": min(max(c.replicas, lo), c.max_replicas),
                "max_replicas": c.max_replicas,
                "target_ongoing_requests": c.target_ongoing_requests,
            }
        }
    renderer = RendererDeployment.options(
        **scaling,
        max_ongoing_requests=2 * c.sessions_per_replica + 4,
        ray_actor_options={"num_cpus": c.cpus_per_replica, "num_gpus": c.gpus_per_replica},
        graceful_shutdown_timeout_s=5,
    )
    ingress = IngressDeployment.options(
        num_replicas=c.ingress_replicas,
        max_ongoing_requests=16 + 8 * c.serve.max_sessions,
        ray_actor_options={"num_cpus": c.cpus_per_ingress},
    )
    store = StoreDeployment.options(max_ongoing_requests=10_000).bind()
    cfg = c.to_dict()
    return ingress.bind(renderer.bind(store, cfg), store, cfg)
