"""A live session: a `Session` on the shared core, its code source, pacing, and the hand-off to one client.

Threads, per session with a client attached: the session's stream helper (leo_rt.session, pulls codes and submits
render requests to the core) and one pump (here) that takes rendered batches from `Session.stream`, paces them at
the session's fps and hands each frame to the client's `FrameChannel`. Both end when the session closes. The pump
takes frames under the stream's "block" policy, so rendering runs at most `queue_size` batches ahead of the fps
clock and a paused session renders nothing. A client that lags behind the fps drops its own oldest frames in its
channel; rendering, and every other session, go on as before.
"""

from __future__ import annotations

import asyncio
import io
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import InputError, MediaError
from ..io import square_resize
from ..session import Session

MOTIONS = ("lmdm", "drive")


@dataclass
class SessionOptions:
    """What a client chose when it created the session (validated by the API)."""

    motion: str = "lmdm"
    sampler: str = "ddim"
    steps: int = 10
    seed: int = 0
    fps: float = 25.0
    relative: bool = True  # drive: motion relative to the first driving frame, as the published demo


@dataclass
class Frame:
    seq: int  # 1, 2, … per session
    t_render: float  # wall clock (time.time()) when the frame's batch came out of the renderer
    data: object  # encoded bytes or a uint8 (S, S, 3) array, as the channel's encoder made it


# ----------------------------------------------------------------------------------------------- channel


class FrameChannel:
    """Frames from a session's pump thread to one client's sender on the event loop. Bounded: when the client
    has not taken the last `capacity` frames, the oldest is dropped (and counted): the newest frame wins and the
    pump never waits for a client. `encode` runs in the pump thread (JPEG encoding stays off the event loop)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        capacity: int = 2,
        encode: Callable[[np.ndarray], object] | None = None,
        on_drop: Callable[[], None] | None = None,
    ):
        if capacity < 1:
            raise InputError(f"a frame channel holds at least 1 frame, got {capacity}")
        self.capacity = capacity
        self.dropped = 0
        self.error: BaseException | None = None
        self._loop = loop
        self._encode = encode
        self._on_drop = on_drop or (lambda: None)
        self._items: deque[Frame] = deque()
        self._ready = asyncio.Event()
        self._ended = False

    # -- pump thread
    def put(self, frame: np.ndarray, seq: int, t_render: float) -> None:
        data = self._encode(frame) if self._encode is not None else frame
        self._call(self._push, Frame(seq, t_render, data))

    def end(self, error: BaseException | None = None) -> None:
        self._call(self._finish, error)

    def _call(self, fn, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the event loop is gone: nobody is listening any more
            pass

    # -- event loop
    def _push(self, item: Frame) -> None:
        if self._ended:
            return
        while len(self._items) >= self.capacity:
            self._items.popleft()
            self.dropped += 1
            self._on_drop()
        self._items.append(item)
        self._ready.set()

    def _finish(self, error: BaseException | None) -> None:
        self._ended, self.error = True, error
        self._ready.set()

    async def get(self) -> Frame | None:
        """The oldest frame still held, waiting for one; None once the session's stream has ended."""
        while not self._items:
            if self._ended:
                return None
            self._ready.clear()
            await self._ready.wait()
        return self._items.popleft()


# ------------------------------------------------------------------------------------------ driving frames


def decode_driving(frame, size: int, max_pixels: int) -> np.ndarray:
    """A driving frame (encoded image bytes, a uint8 (H, W, 3) array, or an av.VideoFrame) → uint8 (S, S, 3)."""
    if isinstance(frame, (bytes, bytearray, memoryview)):
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(frame)) as im:
                if im.width * im.height > max_pixels:
                    raise MediaError(f"driving frame of {im.width}×{im.height} pixels; the limit is {max_pixels}")
                arr = np.asarray(im.convert("RGB"))
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            if isinstance(e, MediaError):
                raise
            raise MediaError(f"could not decode a driving frame ({e}); send JPEG or PNG images") from None
    elif isinstance(frame, np.ndarray):
        arr = frame
    else:  # an av.VideoFrame from a WebRTC camera track
        arr = frame.to_ndarray(format="rgb24")
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3 or min(arr.shape[:2]) < 1:
        raise MediaError(f"a driving frame must be uint8 (H, W, 3), got {arr.dtype} {arr.shape}")
    return square_resize(np.ascontiguousarray(arr), size)


class DriveSource:
    """The live code source of a drive session: each time the stream asks, the motion code of the latest driving
    frame received since it last asked (waiting for one). Frames that arrive while the renderer is busy replace
    each other — the latest wins, nothing queues — and only frames actually rendered are encoded. Relative mode
    (default) moves the source by the motion since the first driving frame, as the published demo."""

    def __init__(self, session: Session, *, relative: bool = True, max_pixels: int = 25_000_000):
        self.session = session
        self.relative = relative
        self.max_pixels = max_pixels
        self.received = self.skipped = self.bad = 0
        self.last_error: str | None = None
        self._cv = threading.Condition()
        self._latest = None
        self._new = False
        self._closed = False
        self._start: torch.Tensor | None = None

    def offer(self, frame) -> None:
        """A driving frame arrived (any thread). An older one not yet taken is skipped."""
        with self._cv:
            if self._closed:
                return
            self.received += 1
            self.skipped += self._new
            self._latest, self._new = frame, True
            self._cv.notify_all()

    def recenter(self) -> None:
        """Relative mode: take the next driving frame as the new neutral pose."""
        self._start = None

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._latest = None
            self._cv.notify_all()

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            with self._cv:
                while not self._new and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                frame, self._latest, self._new = self._latest, None, False
            try:
                image = decode_driving(frame, self.session.size, self.max_pixels)
            except MediaError as e:  # one bad frame is skipped, not fatal to the stream
                self.bad += 1
                self.last_error = str(e)
                continue
            alpha = self.session.encode_motion(image[None])  # (1, D)
            if self.relative:
                if self._start is None:
                    self._start = alpha
                alpha = self.session.relative_alpha(self.session.state, alpha, self._start)
            yield alpha


# ------------------------------------------------------------------------------------------- live session


class LiveSession:
    """One client's avatar: the source encoded once, its motion (LMDM or driving frames), pacing and controls.

    `start(channel)` starts the pump (once); `pause()`, `resume()`, `set_seed()` act at the next frame; `close()`
    ends the pump and the stream (joining their threads) and frees the source. Control methods are thread-safe."""

    def __init__(
        self,
        sid: str,
        session: Session,
        options: SessionOptions,
        *,
        sampler=None,
        batch: int = 4,
        queue_size: int = 2,
        max_pixels: int = 25_000_000,
        on_frame: Callable[[Frame], None] | None = None,
    ):
        self.id = sid
        self.session = session
        self.options = options
        self.sampler = sampler
        # drive: one code per driving frame, one batch ahead at most (latency); LMDM: `batch` codes per request
        self.batch = 1 if options.motion == "drive" else batch
        self.queue_size = 1 if options.motion == "drive" else queue_size
        self.drive = (
            DriveSource(session, relative=options.relative, max_pixels=max_pixels)
            if options.motion == "drive"
            else None
        )
        self.client: str | None = None  # "websocket" or "webrtc" once a client is attached
        self.peer = None  # the aiortc RTCPeerConnection of a WebRTC client
        self.created = self.last_active = time.monotonic()
        self.frames_out = 0
        self.error: BaseException | None = None
        self.delays: deque[float] = deque(maxlen=256)  # render → hand-off to the transport, seconds
        self._sent_times: deque[float] = deque(maxlen=64)
        self._on_frame = on_frame or (lambda f: None)
        self._cv = threading.Condition()
        self._stop = self._paused = self._restart = False
        self._next_t: float | None = None
        self._seq = 0
        self._thread: threading.Thread | None = None
        self._channel: FrameChannel | None = None
        self._closed = False

    # ----------------------------------------------------------------------------------------- client side
    def claim(self, transport: str) -> bool:
        """Attach a client (one at a time); False when one is attached already or the session is closing."""
        with self._cv:
            if self.client is not None or self._stop:
                return False
            self.client = transport
            self.touch()
            return True

    def touch(self) -> None:
        self.last_active = time.monotonic()

    @property
    def started(self) -> bool:
        return self._thread is not None

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def channel(self) -> FrameChannel | None:
        return self._channel

    @property
    def dropped(self) -> int:
        """Frames this session's client was too slow to take."""
        return self._channel.dropped if self._channel is not None else 0

    def frame_sent(self, frame: Frame) -> None:
        """The transport took a frame (called on the event loop)."""
        now = time.time()
        self.delays.append(now - frame.t_render)
        self._sent_times.append(now)
        self.touch()
        self._on_frame(frame)

    def info(self) -> dict:
        d = sorted(self.delays)
        q = (lambda p: round(1e3 * d[min(len(d) - 1, int(p * len(d)))], 2)) if d else (lambda p: None)
        t = list(self._sent_times)
        o = self.options
        out = {
            "id": self.id,
            "motion": o.motion,
            "fps": o.fps,
            "size": self.session.size,
            "client": self.client,
            "paused": self._paused,
            "frames_sent": self.frames_out,
            "frames_dropped": self.dropped,
            "fps_out": round((len(t) - 1) / (t[-1] - t[0]), 2) if len(t) > 1 and t[-1] > t[0] else None,
            "delay_ms": {"p50": q(0.5), "p95": q(0.95)},
        }
        if o.motion == "lmdm":
            out.update(sampler=o.sampler, steps=o.steps, seed=o.seed)
        else:
            dr = self.drive
            out.update(relative=o.relative, driving={"received": dr.received, "skipped": dr.skipped, "bad": dr.bad})
        return out

    # ------------------------------------------------------------------------------------------- controls
    def pause(self) -> None:
        with self._cv:
            self._paused = True
            self._cv.notify_all()

    def resume(self) -> None:
        with self._cv:
            self._paused = False
            self._next_t = None  # no burst of frames after a pause
            self._cv.notify_all()

    def set_seed(self, seed: int) -> None:
        """LMDM: restart the motion from the source's own pose with a new seed."""
        if self.options.motion != "lmdm":
            raise InputError("seed applies to LMDM sessions only; this session is driven by the client's frames")
        with self._cv:
            self.options.seed = seed
            self._restart = True
            self._cv.notify_all()

    def start(self, channel: FrameChannel) -> None:
        """Start streaming into `channel` (the pump thread); a second call does nothing."""
        with self._cv:
            if self._thread is not None or self._stop:
                return
            self._channel = channel
            self._thread = threading.Thread(target=self._pump, args=(channel,), name=f"leo_rt-serve-{self.id[:8]}")
            self._thread.start()

    def stop(self) -> None:
        """Ask the pump to end (does not wait)."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self.drive is not None:
            self.drive.close()

    def close(self) -> None:
        """End the stream and its threads, and free the source. Blocking; idempotent."""
        self.stop()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        if not self._closed:
            self._closed = True
            self.session.close()

    # ----------------------------------------------------------------------------------------------- pump
    def _codes(self):
        return self.drive if self.drive is not None else self.sampler

    def _pump(self, channel: FrameChannel) -> None:
        error = None
        try:
            while not self._stop:
                with self._cv:
                    self._restart = False
                frames = self.session.stream(
                    self._codes(),
                    batch=self.batch,
                    queue_size=self.queue_size,
                    policy="block",
                    output="uint8",
                    seed=self.options.seed if self.options.motion == "lmdm" else None,
                )
                try:
                    ended = True
                    for batch in frames:
                        if not self._emit(batch, time.time(), channel):
                            ended = False
                            break
                finally:
                    frames.close()
                if ended:  # the code source ran out (a drive source closed)
                    break
        except BaseException as e:  # handed to the client's sender, which reports it
            error = self.error = e
        finally:
            channel.end(error)

    def _emit(self, batch: np.ndarray, t_render: float, channel: FrameChannel) -> bool:
        period = 1.0 / self.options.fps
        for frame in batch:
            with self._cv:
                while True:
                    if self._stop or self._restart:
                        return False
                    if self._paused:
                        self._cv.wait()
                        continue
                    now = time.monotonic()
                    if self._next_t is None:
                        self._next_t = now
                    if self._next_t <= now:
                        break
                    self._cv.wait(self._next_t - now)
                self._next_t = max(self._next_t + period, now)  # late: the next frame may follow at once, once
                self._seq += 1
                seq = self._seq
            channel.put(frame, seq, t_render)
            self.frames_out += 1
        return True


def encode_jpeg(quality: int = 85) -> Callable[[np.ndarray], bytes]:
    from PIL import Image

    def encode(frame: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(frame).save(buf, format="JPEG", quality=quality)
        return buf.getvalue()

    return encode


def encode_raw(frame: np.ndarray) -> bytes:
    return np.ascontiguousarray(frame).tobytes()
