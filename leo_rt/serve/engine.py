"""The server's one model, and every call the server makes into the frame core (kept here, in one place).

One `FrameCore` per process (one runner behind the device's one worker thread); each client session is a
`Session(core)` on it, so the frames of all sessions are coalesced into batched multi-source render calls and
their LMDM chunks into batched sampling calls (leo_rt.core). The server writes no frame loop of its own: frames
come from `Session.stream` over a live code source (an LMDM `MotionSampler` or a `DriveSource`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future

import numpy as np
import torch

from ..core import FrameCore
from ..errors import InputError
from ..lmdm import LMDM
from ..motion import MotionSampler
from ..schedulers import SAMPLERS
from ..session import Session

RANDOM_WEIGHTS_WARNING = (
    "WARNING: no --checkpoint given: serving an animator with RANDOM WEIGHTS ({preset}). Avatars will not look "
    "like the photo; this only shows the code path. Pass --checkpoint vox.pt for real output."
)
UNTRAINED_LMDM_WARNING = (
    "WARNING: no --lmdm given: LMDM sessions use an UNTRAINED LMDM (lmdm-small, random weights); their motion "
    "is noise. Train one with `leo-rt train-lmdm` and pass --lmdm DIR."
)


class Engine:
    """A frame core shared by every session of the server, plus the LMDM that LMDM-driven sessions sample from.

    `owns_core`: close the core with the engine (the server built it); a core passed in by the caller (tests, an
    embedding application) stays open."""

    def __init__(
        self,
        core: FrameCore,
        lmdm: LMDM | None = None,
        *,
        owns_core: bool = False,
        weights: str = "given",
        log: Callable[[str], None] | None = None,
    ):
        self.core = core
        self.owns_core = owns_core
        self.weights = weights  # "checkpoint", "random" or "given" (a core built by the caller)
        self._log = log or logging.getLogger("leo_rt.serve").warning
        self._lmdm = lmdm.to(core.device).eval() if lmdm is not None else None

    @classmethod
    def load(
        cls,
        checkpoint: str | None = None,
        *,
        lmdm: str | None = None,
        preset: str = "lia-128",
        backend: str = "auto",
        device: str = "auto",
        precision: str = "fp32",
        engines: str | None = None,
        max_batch: int = 32,
        max_wait_ms: float = 2.0,
        log: Callable[[str], None] = print,
    ) -> Engine:
        """The core for a checkpoint (or random weights of `preset`, announced loudly) and the LMDM of a directory
        (or an untrained one, announced loudly)."""
        from ..animator import Animator
        from ..backends import resolve_device
        from ..lmdm import load_lmdm

        dev = resolve_device(device)
        source, weights = checkpoint, "checkpoint"
        if checkpoint is None:
            log(RANDOM_WEIGHTS_WARNING.format(preset=preset))
            source, weights = Animator.random(preset, device=dev), "random"
        core = FrameCore.load(
            source,
            backend=backend,
            device=dev,
            precision=precision,
            engines=engines,
            max_batch=max_batch,
            max_wait_ms=max_wait_ms,
            log=log,
        )
        model = load_lmdm(lmdm, device=core.device) if lmdm is not None else None
        engine = cls(core, model, owns_core=True, weights=weights, log=log)
        if model is None:
            engine.lmdm  # noqa: B018 - made (and announced) now, not when the first client comes
        return engine

    # --------------------------------------------------------------------------------------------------- facts
    @property
    def size(self) -> int:
        return self.core.size

    @property
    def device(self) -> torch.device:
        return self.core.device

    @property
    def backend_name(self) -> str:
        return self.core.name

    @property
    def lmdm(self) -> LMDM:
        """The LMDM; without one given, an untrained lmdm-small made on first use (and announced)."""
        if self._lmdm is None:
            from ..lmdm import LMDMConfig

            self._log(UNTRAINED_LMDM_WARNING)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                self._lmdm = LMDM(LMDMConfig.from_name("lmdm-small")).to(self.device).eval()
        return self._lmdm

    # ------------------------------------------------------------------------------------------------ sessions
    def open_session(self, image: np.ndarray) -> Session:
        """A session on the shared core with its source encoded (once): image is uint8 (H, W, 3), any size."""
        session = Session(self.core)
        try:
            session.start(image)
        except BaseException:
            session.close()
            raise
        return session

    def sampler(self, name: str, steps: int) -> MotionSampler:
        """A sampler of the shared LMDM. Samplers with equal settings batch their chunks together in the core;
        each stream keeps its own generator, so its codes are those it would get alone."""
        if name not in SAMPLERS:
            raise InputError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
        return MotionSampler(self.lmdm, name, steps)

    # ------------------------------------------------------------------------------------------------ metrics
    def drain_stats(self) -> Future:
        """A future of the core's stage timings [(stage, seconds, frames)] and render batch sizes recorded since the
        last call, removed from the core so that a long-running server keeps no growing history. Runs on the
        device worker, between device calls, so nothing is lost to a race."""

        def drain():
            stages = self.core.timer.drain()  # pending CUDA event timings resolved first
            sizes = self.core.batch_sizes
            n = len(sizes)
            batches = sizes[:n]
            del sizes[:n]
            return stages, batches

        return self.core.worker.submit(drain)

    def close(self) -> None:
        if self.owns_core:
            self.core.close()
