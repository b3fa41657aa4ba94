"""Sessions: one source, one backend, per-stage timers, and streaming with bounded memory.

    session = leo_rt.Session("vox.pt", backend="auto", device="cpu")
    session.start(image)                       # encodes the source once
    frames = session.render(alpha)             # (N, 3, S, S)
    for frames in session.stream(sampler, n_frames=500, batch=8, queue_size=4, policy="block"):
        ...                                    # sampling of chunk k+1 overlaps rendering of chunk k

Streaming runs two worker threads: one produces motion codes (an LMDM sampler chunk after chunk, or any iterable of
(n, D) code tensors), one renders them in batches; each hands over through a bounded queue. The frames queue has a
stated policy when the consumer is slower: "block" (the renderer waits; no frame is lost) or "drop_oldest" (the
oldest waiting batch is discarded and counted in `session.dropped`). Frames always come out in order.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from .animator import Animator, load_animator
from .backends import choose_backend, make_backend
from .errors import InputError
from .fast import SourceState
from .io import load_image, to_model, to_uint8
from .timing import StageTimer

POLICIES = ("block", "drop_oldest")
_DONE = object()


class _Failed:
    def __init__(self, exc: BaseException):
        self.exc = exc


class Session:
    """An animator behind a backend, holding one source at a time."""

    def __init__(
        self,
        checkpoint_or_engines,
        *,
        backend: str = "auto",
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        size: int | None = None,
        log=lambda s: None,
    ):
        from .pipelines import resolve_device

        dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
        if precision not in dtypes:
            raise InputError(f"precision must be one of {sorted(dtypes)}, got {precision!r}")
        self.device = resolve_device(device)
        engines_dir, checkpoint = None, checkpoint_or_engines
        if isinstance(checkpoint_or_engines, Animator):
            animator, checkpoint = checkpoint_or_engines, None
        else:
            path = Path(checkpoint_or_engines) if isinstance(checkpoint_or_engines, (str, os.PathLike)) else None
            if path is not None and (path / "manifest.json").is_file():
                engines_dir, checkpoint = path, _engines_checkpoint(path)
            animator = None
        self.backend_name = choose_backend(backend, self.device)
        if backend == "auto":
            log(f"backend: {self.backend_name} (auto, fastest available on {self.device})")
        # torch / compile run in the session's precision; exported backends take theirs from the artifacts
        eager_dtype = dtypes[precision] if self.backend_name in ("torch", "compile") else torch.float32
        if animator is None:
            if checkpoint is None:
                raise InputError(f"{engines_dir} holds no record of its checkpoint; pass the checkpoint itself")
            animator = load_animator(checkpoint, size=size, device=self.device, dtype=eager_dtype)
        self.animator = animator
        self.backend = make_backend(self.backend_name, animator, checkpoint, engines_dir, log, precision=precision)
        self.precision = precision
        self.timer = StageTimer(self.device)
        self.state: SourceState | None = None
        self.dropped = 0

    @property
    def size(self) -> int:
        return self.animator.size

    def start(self, image) -> SourceState:
        """Encode the source once: a (1, 3, S, S) tensor in [-1, 1], a uint8 (H, W, 3) array, or an image path."""
        if isinstance(image, (str, os.PathLike)):
            image = load_image(image, self.size)
        elif isinstance(image, np.ndarray):
            from .io import square_resize

            image = to_model(square_resize(image, self.size))
        with self.timer.stage("encode"):
            self.state = self.backend.encode_source(image)
        return self.state

    def render(self, alpha: torch.Tensor, state: SourceState | None = None) -> torch.Tensor:
        """Frames for motion codes (N, D) from the started source (absolute mode)."""
        state = state or self.state
        if state is None:
            raise InputError("no source: call session.start(image) first")
        with self.timer.stage("render", alpha.shape[0]):
            return self.backend.render(state, alpha)

    def stream(
        self,
        codes,
        *,
        n_frames: int | None = None,
        batch: int = 8,
        queue_size: int = 4,
        policy: str = "block",
        output: str = "tensor",
        seed: int | None = None,
        overlap: int = 0,
    ) -> Iterator[torch.Tensor | np.ndarray]:
        """Frames in batches of at most `batch`, from an LMDM MotionSampler (sampled from the source's own code,
        `n_frames` of them or without end) or an iterable of (n, D) code tensors. Memory is bounded by the queues:
        at most `queue_size` rendered batches wait for the consumer."""
        from .motion import MotionSampler

        if policy not in POLICIES:
            raise InputError(f"policy must be one of {POLICIES}, got {policy!r}")
        if output not in ("tensor", "uint8"):
            raise InputError(f"output must be 'tensor' or 'uint8', got {output!r}")
        if batch < 1 or queue_size < 1:
            raise InputError(f"batch and queue_size must be at least 1, got {batch} and {queue_size}")
        if self.state is None:
            raise InputError("no source: call session.start(image) first")
        if isinstance(codes, MotionSampler):
            sampler = codes
            start = self.state.alpha_src[:1].to(sampler.model.data_std)
            source: Iterable = (c[0] for c in sampler.stream(start, n_frames, overlap, seed))
        else:
            source = codes
        stop = threading.Event()
        code_q: queue.Queue = queue.Queue(maxsize=2)  # sampling runs at most two chunks ahead of rendering
        frame_q: queue.Queue = queue.Queue(maxsize=queue_size)
        self.dropped = 0

        def produce_codes():
            try:
                it = iter(source)
                emitted = 0
                while not stop.is_set() and (n_frames is None or emitted < n_frames):
                    with self.timer.stage("sample"):
                        chunk = next(it, None)
                    if chunk is None:
                        break
                    if n_frames is not None:
                        chunk = chunk[: n_frames - emitted]
                    emitted += chunk.shape[0]
                    _put(code_q, chunk, stop)
                _put(code_q, _DONE, stop)
            except BaseException as e:  # handed to the consumer, re-raised there
                _put(code_q, _Failed(e), stop)

        def render_frames():
            try:
                while not stop.is_set():
                    chunk = code_q.get()
                    if chunk is _DONE or isinstance(chunk, _Failed):
                        _put(frame_q, chunk, stop)
                        return
                    for i in range(0, chunk.shape[0], batch):
                        frames = self.render(chunk[i : i + batch])
                        item = to_uint8(frames) if output == "uint8" else frames
                        if policy == "block":
                            _put(frame_q, item, stop)
                        else:
                            self._put_dropping(frame_q, item)
            except BaseException as e:
                _put(frame_q, _Failed(e), stop)

        workers = [
            threading.Thread(target=produce_codes, daemon=True),
            threading.Thread(target=render_frames, daemon=True),
        ]
        for w in workers:
            w.start()
        try:
            while True:
                item = frame_q.get()
                if item is _DONE:
                    return
                if isinstance(item, _Failed):
                    raise item.exc
                yield item
        finally:
            stop.set()
            for q in (code_q, frame_q):  # unblock workers waiting on a full queue
                while not q.empty():
                    q.get_nowait()
            for w in workers:
                w.join(timeout=5)

    def _put_dropping(self, q: queue.Queue, item) -> None:
        while True:
            try:
                q.put_nowait(item)
                return
            except queue.Full:
                try:
                    q.get_nowait()  # the oldest waiting batch
                    self.dropped += 1
                except queue.Empty:
                    pass

    def stats(self) -> dict[str, dict[str, float]]:
        """Per-stage p50/p95 (ms per frame), totals and frames per second."""
        return self.timer.summary()


def _put(q: queue.Queue, item, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return
        except queue.Full:
            continue


def _engines_checkpoint(engines_dir: Path):
    """The checkpoint an engines directory was exported from, when the manifest records a readable path."""
    from .export import read_manifest

    path = read_manifest(engines_dir).get("checkpoint_path")
    return path if path and Path(path).exists() else None
