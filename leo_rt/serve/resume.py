"""LMDM motion that can stop after any frame and go on elsewhere: the code source of a Ray renderer replica.

A stream of LMDM codes is a chain of sampled chunks (leo_rt.motion, docs/ARCHITECTURE.md §4.5); where it stands after
any frame is a small `MotionState`: the codes of the current chunk not rendered yet, the tail the next chunk is
conditioned on, and the stream's generator state. A replica renders a segment of frames from a state and hands
back, with each frame batch, the state after it; another replica given that state goes on exactly where the first
stopped, so a session survives the death of its replica with the same codes it would have had (the client sees a
pause, not different motion or an error). Without interruption the codes equal those of `MotionSampler.stream`
with the same seed, which is what the single-process server renders.

    motion = ResumableMotion(core, sampler, state, alpha_src)
    for frames in session.stream(motion, n_frames=16, batch=4):   # the one frame loop (leo_rt.session)
        state = motion.advance(frames.shape[0])                    # where a resumed stream would start
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import InputError
from ..motion import MotionChain


@dataclass
class MotionState:
    """Where an LMDM stream stands between two frames. Plain numpy arrays, so it travels between processes."""

    seed: int
    frames: int = 0  # frames delivered so far
    first: bool = True  # no chunk sampled yet: the first one is conditioned on the source's own code
    tail: np.ndarray | None = None  # (1 + overlap, D) last codes emitted: the next chunk's known prefix
    rng: np.ndarray | None = None  # uint8 state of the stream's torch.Generator after the last chunk sampled
    pending: np.ndarray | None = None  # (n, D) codes of the current chunk not rendered yet

    @classmethod
    def initial(cls, seed: int) -> MotionState:
        return cls(seed=int(seed))

    def to_dict(self) -> dict:
        return {
            "seed": self.seed,
            "frames": self.frames,
            "first": self.first,
            "tail": self.tail,
            "rng": self.rng,
            "pending": self.pending,
        }

    @classmethod
    def from_dict(cls, d: dict) -> MotionState:
        state = cls(**d)
        if not state.first and (state.tail is None or state.rng is None):
            raise InputError("a motion state after the first chunk needs its tail codes and generator state")
        return state


@dataclass
class _Chunk:
    codes: torch.Tensor  # (n, D) as handed to the frame loop
    after: MotionState  # the state once all of them are rendered (pending empty)


class ResumableMotion:
    """An iterable of (n, D) LMDM code chunks starting at `state`, for `Session.stream`. Its chunks are those of
    `MotionSampler.stream` continued from the state, sampled through the frame core (`core.sample_chunk`, batched
    with the other streams of the replica, each with its own generator). `advance(n)`, called by the consumer as
    frames come out (in order), returns the state after them. The frame loop pulls codes ahead of the frames it
    delivers, in its own thread; each chunk is recorded before it is handed out, so `advance` always finds it."""

    def __init__(self, core, sampler, state: MotionState, alpha_src: torch.Tensor, overlap: int = 0):
        self.core, self.sampler, self.overlap, self.seed = core, sampler, overlap, state.seed
        if state.first:
            self.chain = sampler.chain(alpha_src[:1], state.seed)  # from the source's own code, as Session.stream
        else:
            model = sampler.model
            gen = torch.Generator(device=model.data_std.device)
            gen.set_state(torch.from_numpy(np.ascontiguousarray(state.rng)))
            tail = torch.from_numpy(np.ascontiguousarray(state.tail)).to(model.data_std)[None]  # (1, K, D)
            self.chain = MotionChain(tail, gen, first=False)
        self._pending = state.pending if state.pending is not None and len(state.pending) else None
        self._start = MotionState(state.seed, state.frames, state.first, state.tail, state.rng, None)
        self._chunks: deque[_Chunk] = deque()
        self._done = 0  # frames of _chunks[0] delivered
        self._at = self._start if self._pending is None else None
        self._frames = state.frames
        self._lock = threading.Lock()

    def __iter__(self):
        if self._pending is not None:  # the rest of a chunk sampled before the stream moved here
            codes = torch.from_numpy(np.ascontiguousarray(self._pending))
            self._record(codes, self._start)
            yield codes
        chain = self.chain
        sample = lambda known, gen: self.core.sample_chunk(self.sampler, known, gen).result()  # noqa: E731
        for new in self.sampler.stream(chain, overlap=self.overlap, sample=sample):  # (1, n, D)
            tail, rng = chain.tail[0].cpu().numpy(), chain.generator.get_state().numpy().copy()
            self._record(new[0], MotionState(self.seed, 0, False, tail, rng, None))
            yield new[0]

    def _record(self, codes: torch.Tensor, after: MotionState) -> None:
        with self._lock:
            self._chunks.append(_Chunk(codes, after))

    def advance(self, n: int) -> MotionState:
        """n more frames were delivered; the state a stream resumed after them starts from."""
        with self._lock:
            self._frames += n
            while n > 0:
                if not self._chunks:
                    raise RuntimeError("more frames delivered than codes handed out")  # a bug, not a user error
                chunk = self._chunks[0]
                take = min(n, chunk.codes.shape[0] - self._done)
                self._done += take
                n -= take
                rest = chunk.codes[self._done :]
                a = chunk.after
                self._at = MotionState(a.seed, 0, a.first, a.tail, a.rng, rest.cpu().numpy() if len(rest) else None)
                if not len(rest):
                    self._chunks.popleft()
                    self._done = 0
            self._at.frames = self._frames
            return self._at

    @property
    def state(self) -> MotionState:
        """The state after the frames delivered so far."""
        with self._lock:
            if self._at is None:  # nothing delivered yet: where we started
                return MotionState(
                    self.seed, self._frames, self._start.first, self._start.tail, self._start.rng, self._pending
                )
            return self._at
