"""Sessions: one source on a frame core, and the one loop that turns motion codes into frames.

    with leo_rt.Session("vox.pt", backend="auto", device="cpu") as session:
        session.start(image)                       # encodes the source once
        frames = session.render(alpha)             # (N, 3, S, S)
        for frames in session.stream(sampler, n_frames=500, batch=8, queue_size=4, policy="block"):
            ...                                    # sampling of chunk k+1 overlaps rendering of chunk k

`stream` is the only frame loop of leo_rt: the CLI jobs (reenact, generate, edit, demo) and the server are code
sources feeding it. Codes come from an LMDM `MotionSampler` (sampled chunk after chunk from the source's own code)
or any iterable of (n, D) code tensors (a driving video, a live camera). One helper thread per stream pulls codes
and submits render requests to the frame core's device worker (leo_rt.core), which renders them — batched with
other sessions' requests when several share a core — and hands each batch to the stream's bounded outbox. The
outbox has a stated policy when the consumer is slower: "block" (rendering waits; no frame is lost) or
"drop_oldest" (the oldest waiting batch is discarded and its frames counted in `session.dropped`). Frames always
come out in order. The helper thread ends with the stream on every exit path: the end, an error, a consumer that
stops early, or a generator that is closed or garbage-collected.
"""

from __future__ import annotations

import threading
import weakref
from collections import deque
from collections.abc import Iterable, Iterator

import numpy as np
import torch

from .animator import Animator
from .core import FrameCore, SourceHandle, check_codes, first_nonfinite_row, images_on, ready
from .errors import InputError, LeoError
from .fast import SourceState
from .io import prepare_image
from .precision import Precision
from .runner import Runner

POLICIES = ("block", "drop_oldest")
OUTPUTS = ("tensor", "uint8")
NONFINITE = ("raise", "skip")
_END = object()


class _Failed:
    def __init__(self, exc: BaseException):
        self.exc = exc


class Session:
    """A frame core holding one source at a time. `Session(core)` shares an existing core (many sessions, one model,
    one process); otherwise the session opens its own core and closes it with itself."""

    def __init__(
        self,
        source,
        *,
        backend: str = "auto",
        device: str | torch.device = "cpu",
        precision: Precision | str = "fp32",
        size: int | None = None,
        engines=None,
        max_batch: int = 32,
        log=None,
    ):
        if isinstance(source, FrameCore):
            self.core, self._owns_core = source, False
        elif isinstance(source, Runner) and not isinstance(source, Animator):  # a backend made by the caller
            self.core, self._owns_core = FrameCore(source, precision=precision, max_batch=max_batch), True
        else:
            self.core = FrameCore.load(
                source,
                backend=backend,
                device=device,
                precision=precision,
                size=size,
                engines=engines,
                max_batch=max_batch,
                log=log,
            )
            self._owns_core = True
        self.handle: SourceHandle | None = None
        self.dropped = 0  # frames dropped by the last drop_oldest stream
        self.skipped = 0  # non-finite codes skipped by the last stream with nonfinite="skip"
        self._streams: weakref.WeakSet = weakref.WeakSet()
        self._closed = False

    # ---------------------------------------------------------------------------------------- the runner's facts
    @property
    def backend(self):
        """The runner behind the core (the Animator for the torch backend)."""
        return self.core.runner

    @property
    def backend_name(self) -> str:
        return self.core.name

    @property
    def size(self) -> int:
        return self.core.size

    @property
    def device(self) -> torch.device:
        return self.core.device

    @property
    def precision(self) -> Precision:
        return self.core.precision

    @property
    def timer(self):
        return self.core.timer

    @property
    def state(self) -> SourceState | None:
        return self.handle.state if self.handle is not None else None

    # -------------------------------------------------------------------------------------------- single calls
    def start(self, image) -> SourceState:
        """Encode the source once: a (1, 3, S, S) tensor in [-1, 1], a uint8 (H, W, 3) array, or an image path."""
        self._check_open()
        image = prepare_image(image, self.size)  # paths, uint8 arrays, tensors: checked, small sources warned
        handle = self.core.add_source(image)
        if self.handle is not None:
            self.core.remove_source(self.handle)
        self.handle = handle
        return handle.state

    def render(self, alpha: torch.Tensor, state: SourceState | None = None) -> torch.Tensor:
        """Frames (N, 3, S, S) for motion codes (N, D) from the started source (absolute mode)."""
        handle = self._require_source() if state is None or state is self.state else SourceHandle(-1, state)
        return self.core.render_now(handle, alpha)

    def encode_motion(self, images) -> torch.Tensor:
        """Motion codes (B, D) of driving images: a (B, 3, S, S) tensor in [-1, 1] or uint8 frames (B, S, S, 3)."""
        self._check_open()
        if isinstance(images, np.ndarray) or (isinstance(images, torch.Tensor) and images.dtype == torch.uint8):
            images = images_on(images, self.device)
        return self.core.encode_motion(images)

    def relative_alpha(self, state: SourceState, alpha_drv: torch.Tensor, alpha_start: torch.Tensor):
        """Relative reenactment as in the published demo: alpha_drv − alpha_start + alpha_src."""
        return self.core.runner.relative_alpha(state, alpha_drv, alpha_start)

    # ----------------------------------------------------------------------------------------------- streaming
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
        threaded: bool = True,
        nonfinite: str = "raise",
    ) -> Iterator[torch.Tensor]:
        """Frames in batches of at most `batch`, from an LMDM MotionSampler (sampled from the source's own code,
        `n_frames` of them or without end) or an iterable of (n, D) code tensors. output="tensor" gives
        (n, 3, S, S) device tensors, "uint8" host (n, S, S, 3) uint8 tensors converted on the device. Memory is
        bounded: at most `queue_size` rendered batches wait for the consumer. threaded=False renders in the
        caller's thread, one batch per iteration (no helper thread, no overlap). nonfinite="raise" refuses a chunk
        holding NaN/inf codes (naming the first bad row); "skip" drops those codes and counts them in
        `session.skipped`."""
        if policy not in POLICIES:
            raise InputError(f"policy must be one of {POLICIES}, got {policy!r}")
        if output not in OUTPUTS:
            raise InputError(f"output must be one of {OUTPUTS}, got {output!r}")
        if nonfinite not in NONFINITE:
            raise InputError(f"nonfinite must be one of {NONFINITE}, got {nonfinite!r}")
        if batch < 1 or queue_size < 1:
            raise InputError(f"batch and queue_size must be at least 1, got {batch} and {queue_size}")
        if n_frames is not None and n_frames < 1:
            raise InputError(f"n_frames must be at least 1 (or None for no end), got {n_frames}")
        handle = self._require_source()
        self.dropped = self.skipped = 0
        chunks = self._chunks(codes, n_frames, seed, overlap, nonfinite)
        if threaded:
            gen = self._stream_threaded(handle, chunks, batch, queue_size, policy, output)
        else:
            gen = self._stream_inline(handle, chunks, batch, output)
        self._streams.add(gen)
        return gen

    def _chunks(self, codes, n_frames, seed, overlap, nonfinite) -> Iterator[torch.Tensor]:
        """The code source as (n, D) chunks: checked, non-finite rows handled, cut at n_frames."""
        from .motion import MotionSampler

        core = self.core
        if isinstance(codes, MotionSampler):
            if codes.model.cfg.motion_dim != core.motion_dim:
                raise InputError(
                    f"the LMDM models {codes.model.cfg.motion_dim}-d codes but the animator uses {core.motion_dim}-d"
                )
            start = self.handle.state.alpha_src[:1].to(codes.model.data_std)
            sampler = codes
            source: Iterable = (
                c[0]
                for c in sampler.stream(
                    start, n_frames, overlap, seed, sample=lambda k, g: core.sample_chunk(sampler, k, g).result()
                )
            )
        elif isinstance(codes, (torch.Tensor, np.ndarray)):
            raise InputError("codes must be a MotionSampler or an iterable of (n, D) tensors; wrap a tensor in a list")
        else:
            source = codes

        def chunks() -> Iterator[torch.Tensor]:
            emitted = 0
            for chunk in source:
                if not isinstance(chunk, torch.Tensor):
                    raise InputError(f"each item of a code source must be an (n, D) tensor, got {type(chunk).__name__}")
                if n_frames is not None:
                    chunk = chunk[: n_frames - emitted]
                if nonfinite == "skip" and chunk.dim() == 2 and first_nonfinite_row(chunk) is not None:
                    good = torch.isfinite(chunk).all(dim=1)
                    self.skipped += int((~good).sum())
                    chunk = chunk[good]
                check_codes(chunk, core.motion_dim)
                emitted += chunk.shape[0]
                if chunk.shape[0]:
                    yield chunk
                if n_frames is not None and emitted >= n_frames:
                    return

        return chunks()

    def _stream_inline(self, handle, chunks, batch, output) -> Iterator[torch.Tensor]:
        for chunk in chunks:
            for i in range(0, chunk.shape[0], batch):
                yield ready(self.core.render(handle, chunk[i : i + batch], output).result())

    def _stream_threaded(self, handle, chunks, batch, queue_size, policy, output) -> Iterator[torch.Tensor]:
        stop = threading.Event()
        outbox = _Outbox(queue_size)
        credits = threading.Semaphore(queue_size)  # block: batches not yet taken; drop_oldest: renders in flight
        pending: deque = deque()

        def deliver(fut) -> None:  # on the device worker, in submission order: never blocks
            if stop.is_set() or fut.cancelled():
                return
            if fut.exception() is not None:
                outbox.put_final(_Failed(fut.exception()))
            elif policy == "block":
                outbox.put(fut.result())  # room is guaranteed by the credit taken for it
            else:
                credits.release()
                self.dropped += outbox.put_dropping(fut.result())

        def produce() -> None:
            last = None
            try:
                for chunk in chunks:
                    for i in range(0, chunk.shape[0], batch):
                        while not credits.acquire(timeout=0.05):
                            if stop.is_set():
                                return
                        if stop.is_set():
                            return
                        last = self.core.render(handle, chunk[i : i + batch], output)
                        last.add_done_callback(deliver)
                        pending.append(last)
                        while pending and pending[0].done():
                            pending.popleft()
                    if stop.is_set():
                        return
                if last is None:
                    outbox.put_final(_END)
                else:  # after the last batch's own delivery (callbacks run in the order they were added)
                    last.add_done_callback(lambda f: outbox.put_final(_END))
            except BaseException as e:  # handed to the consumer, re-raised there
                outbox.put_final(_Failed(e))

        worker = threading.Thread(target=produce, name="leo_rt-stream-codes", daemon=True)
        worker.start()
        try:
            while True:
                item = outbox.get()
                if item is _END:
                    return
                if isinstance(item, _Failed):
                    raise item.exc
                if policy == "block":
                    credits.release()
                yield ready(item)
        finally:
            stop.set()
            outbox.close()
            for fut in list(pending):
                fut.cancel()
            for _ in range(queue_size + 1):  # wake a producer waiting for a credit
                credits.release()
            worker.join()

    # ---------------------------------------------------------------------------------------------- lifecycle
    def stats(self) -> dict[str, dict[str, float]]:
        """Per-stage p50/p95 (ms per frame), totals and frames per second."""
        return self.core.timer.summary()

    def close(self) -> None:
        """End this session's streams, forget its source, and close its core when it opened one. Idempotent."""
        if self._closed:
            return
        for gen in list(self._streams):
            try:
                gen.close()
            except ValueError:  # a stream running in another thread ends when its consumer returns
                pass
        if self.handle is not None:
            self.core.remove_source(self.handle)
            self.handle = None
        if self._owns_core:
            self.core.close()
        self._closed = True

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _require_source(self) -> SourceHandle:
        self._check_open()
        if self.handle is None:
            raise InputError("no source: call session.start(image) first")
        return self.handle

    def _check_open(self) -> None:
        if self._closed:
            raise LeoError("this session is closed; open a new one")


class _Outbox:
    """A bounded FIFO of rendered batches between the device worker and the consumer. `put` never blocks (the
    producer holds a credit for it); `put_dropping` drops the oldest waiting batch when full and returns the number
    of frames dropped; `put_final` (the end or an error) always goes in."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._items: deque = deque()
        self._cv = threading.Condition()
        self._closed = False

    def put(self, item) -> None:
        with self._cv:
            if not self._closed:
                self._items.append(item)
                self._cv.notify()

    def put_dropping(self, item) -> int:
        dropped = 0
        with self._cv:
            if self._closed:
                return 0
            while len(self._items) >= self.capacity and not _final(self._items[0]):
                dropped += _frames_in(self._items.popleft())
            self._items.append(item)
            self._cv.notify()
        return dropped

    def put_final(self, item) -> None:
        self.put(item)

    def get(self):
        with self._cv:
            while not self._items:
                self._cv.wait()
            return self._items.popleft()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._items.clear()


def _final(item) -> bool:
    return item is _END or isinstance(item, _Failed)


def _frames_in(item) -> int:
    return int(ready(item).shape[0])
