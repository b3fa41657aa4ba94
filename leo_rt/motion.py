"""Motion-code pipelines: LMDM sampling chunk after chunk, generation of endless videos, and editing.

Chunks chain through their first code: each new chunk starts at the last code emitted so far (overlap 0) or
`overlap` codes before it, and those 1 + overlap codes are held fixed while sampling (replacement: at every
step they are set to the forward-noised known values, and exactly at the end), so consecutive chunks join
smoothly. Each chunk after the first adds chunk − 1 − overlap new codes. Memory does not grow with length.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch

from .animator import Animator
from .errors import InputError
from .fast import SourceState
from .io import to_model
from .lmdm import LMDM
from .schedulers import make_scheduler
from .timing import StageTimer


class MotionSampler:
    """Samples chunks of motion codes from an LMDM with one of the schedulers ('ddim', 'dpm++', 'ddpm')."""

    def __init__(
        self,
        model: LMDM,
        sampler: str = "ddim",
        steps: int = 25,
        eta: float = 0.0,
        clip_sample: float | None = 4.0,
        chunk: int | None = None,
    ):
        """chunk: codes per sampled chunk, at most the trained chunk length and a multiple of the U-Net's stride
        (default: the trained length). clip_sample clamps x̂_0 to ±that many data standard deviations."""
        cfg = model.cfg
        stride = 2 ** (len(cfg.channel_mults) - 1)
        self.chunk = cfg.chunk if chunk is None else chunk
        if not (2 <= self.chunk <= cfg.chunk and self.chunk % stride == 0):
            raise InputError(
                f"chunk must be a multiple of {stride} between {stride} and the trained {cfg.chunk}, got {self.chunk}"
            )
        self.model = model.eval()
        self.scheduler = make_scheduler(
            sampler,
            eta=eta,
            num_train_timesteps=cfg.num_train_timesteps,
            beta_schedule=cfg.beta_schedule,
            beta_start=cfg.beta_start,
            beta_end=cfg.beta_end,
            prediction_type=cfg.prediction_type,
            clip_sample=clip_sample,
        )
        self.scheduler.set_timesteps(steps)

    @torch.no_grad()
    def sample_chunk(self, known: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """known (B, K, D) codes, K ≥ 1: the chunk's first K codes, held fixed (known[:, 0] is the condition
        alpha_1). Returns (B, L, D) codes whose first K rows equal `known` exactly."""
        m = self.model
        b, k, d = known.shape
        if k < 1 or k > m.cfg.max_prefix:
            raise InputError(
                f"the fixed prefix must hold 1 … {m.cfg.max_prefix} codes (this LMDM's max_prefix), got {k}"
            )
        if d != m.cfg.motion_dim:
            raise InputError(f"codes have {d} channels but this LMDM models {m.cfg.motion_dim}")
        dev, dt = m.data_std.device, m.data_std.dtype
        known = known.to(dev, dt)
        alpha_1 = known[:, 0]
        x0_known = (known - alpha_1[:, None]) / m.data_std[:k]  # first row is exactly 0
        sched = self.scheduler
        x = torch.randn(b, self.chunk, d, generator=generator, device=dev, dtype=dt)
        x0_known_full = torch.zeros_like(x)
        x0_known_full[:, :k] = x0_known
        x[:, :k] = sched.add_noise(x0_known, x[:, :k], int(sched.timesteps[0]))
        for t in sched.timesteps:
            out = m(x, torch.full((b,), int(t), device=dev, dtype=torch.long), alpha_1, x0_known_full, k)
            _, eps = sched.to_x0_eps(out, int(t), x)
            x = sched.step(out, t, x, generator=generator)
            # replacement: the fixed rows follow the known codes, noised with the model's own ε̂ so that they
            # stay on the same trajectory as the rows being sampled
            prev = sched.prev_timestep(int(t))
            x[:, :k] = x0_known if prev < 0 else sched.add_noise(x0_known, eps[:, :k], prev)
        x[:, :k] = x0_known
        return alpha_1[:, None] + x * m.data_std[: self.chunk]

    def stream(
        self, alpha_start: torch.Tensor, n_codes: int | None = None, overlap: int = 0, seed: int | None = None
    ) -> Iterator[torch.Tensor]:
        """Codes (B, n, D) chunk by chunk, starting with alpha_start (B, D) itself, without end when n_codes is
        None. Sampling is reproducible for a given seed on a given device."""
        top = min(self.chunk - 2, self.model.cfg.max_prefix - 1)
        if not 0 <= overlap <= top:
            raise InputError(f"overlap must be between 0 and {top} for this LMDM, got {overlap}")
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.model.data_std.device).manual_seed(seed)
        emitted = 0
        tail = alpha_start[:, None].to(self.model.data_std)  # the last codes emitted so far
        first = True
        while n_codes is None or emitted < n_codes:
            codes = self.sample_chunk(tail[:, -(1 + overlap) :] if not first else tail, gen)
            new = codes if first else codes[:, 1 + overlap :]
            first = False
            if n_codes is not None:
                new = new[:, : n_codes - emitted]
            emitted += new.shape[1]
            tail = torch.cat([tail, new], dim=1)[:, -(1 + overlap) :]
            yield new


def generate(
    animator: Animator,
    sampler: MotionSampler,
    source: torch.Tensor,
    n_frames: int,
    *,
    overlap: int = 0,
    seed: int | None = None,
    batch: int = 8,
    timer: StageTimer | None = None,
) -> Iterator[torch.Tensor]:
    """Frames (n, 3, S, S) for a source image (1, 3, S, S): the source is encoded once, codes are sampled chunk
    after chunk starting from the source's own code, and each chunk is rendered in batches as it arrives."""
    if n_frames < 1:
        raise InputError(f"n_frames must be at least 1, got {n_frames}")
    if sampler.model.cfg.motion_dim != animator.config.motion_dim:
        raise InputError(
            f"the LMDM models {sampler.model.cfg.motion_dim}-d codes but the animator uses "
            f"{animator.config.motion_dim}-d ones"
        )
    timer = timer or StageTimer(animator.device)
    with timer.stage("source"):
        state = animator.encode_source(source)
    codes_iter = sampler.stream(state.alpha_src.to(sampler.model.data_std), n_frames, overlap, seed)
    while True:
        with timer.stage("sample"):
            codes = next(codes_iter, None)
        if codes is None:
            return
        codes = codes[0]  # one source
        for i in range(0, codes.shape[0], batch):
            alpha = codes[i : i + batch]
            with timer.stage("render", alpha.shape[0]):
                frames = animator.render(state, alpha)
            yield frames


def video_codes(animator: Animator, frames: Iterable[np.ndarray], batch: int = 16) -> torch.Tensor:
    """Motion codes (T, D) of every frame of a video (uint8 (S, S, 3) frames), encoded in batches."""
    out, chunk = [], []
    for f in frames:
        chunk.append(f)
        if len(chunk) == batch:
            out.append(animator.encode_motion(to_model(np.stack(chunk))))
            chunk = []
    if chunk:
        out.append(animator.encode_motion(to_model(np.stack(chunk))))
    if not out:
        raise InputError("the video holds no frames")
    return torch.cat(out)


def edit(
    animator: Animator,
    codes: torch.Tensor,
    first_frame: torch.Tensor,
    *,
    relative: bool = False,
    batch: int = 8,
    timer: StageTimer | None = None,
) -> Iterator[torch.Tensor]:
    """Content-preserving editing: the video's motion codes (T, D) rendered with the appearance of an edited
    first frame (1, 3, S, S). Absolute mode by default (the codes as they are); relative mode moves the edited
    frame by the motion since the video's first frame."""
    timer = timer or StageTimer(animator.device)
    with timer.stage("source"):
        state: SourceState = animator.encode_source(first_frame)
    if relative:
        codes = animator.relative_alpha(state, codes, codes[:1])
    for i in range(0, codes.shape[0], batch):
        alpha = codes[i : i + batch]
        with timer.stage("render", alpha.shape[0]):
            frames = animator.render(state, alpha)
        yield frames
