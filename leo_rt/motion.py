"""LMDM motion: sampling chunk after chunk, without end (frames are rendered by leo_rt.session.Session.stream).

Chunks chain through their first code: each new chunk starts at the last code emitted so far (overlap 0) or
`overlap` codes before it, and those 1 + overlap codes are held fixed while sampling (replacement: at every
step they are set to the forward-noised known values, and exactly at the end), so consecutive chunks join
smoothly. Each chunk after the first adds chunk − 1 − overlap new codes. Memory does not grow with length.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .errors import InputError
from .lmdm import LMDM
from .schedulers import make_scheduler, randn_rows


@dataclass
class MotionChain:
    """Where a stream of chunks stands: the codes its next chunk is conditioned on and the generator it samples
    with. `MotionSampler.stream` updates the chain it is given before handing out each chunk, so a stream stopped
    after any chunk goes on later, even elsewhere, with exactly the codes it would have had."""

    tail: torch.Tensor  # (B, K, D): the start code (K = 1) before the first chunk, then the last 1 + overlap codes
    generator: torch.Generator | None = None
    first: bool = True  # no chunk sampled yet: the first one is emitted whole, starting with the start code


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
    def batch_key(self) -> tuple:
        """Samplers with equal keys can sample their chunks in one batched call (same model and schedule)."""
        sched = self.scheduler
        return (id(self.model), type(sched).__name__, len(sched.timesteps), getattr(sched, "eta", 0.0),
                sched.clip_sample, self.chunk)  # fmt: skip

    def sample_chunk(self, known: torch.Tensor, generator=None) -> torch.Tensor:
        """known (B, K, D) codes, K ≥ 1: the chunk's first K codes, held fixed (known[:, 0] is the condition
        alpha_1). Returns (B, L, D) codes whose first K rows equal `known` exactly. `generator`: None, one
        torch.Generator, or one per row (each row then gets the codes it would get in a batch of one)."""
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
        x = randn_rows((b, self.chunk, d), generator, dev, dt)
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

    def chain(self, alpha_start: torch.Tensor, seed: int | None = None) -> MotionChain:
        """Where a stream starting with alpha_start (B, D) stands before its first chunk."""
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.model.data_std.device).manual_seed(seed)
        return MotionChain(alpha_start[:, None].to(self.model.data_std), gen)

    def stream(
        self,
        alpha_start: torch.Tensor | MotionChain,
        n_codes: int | None = None,
        overlap: int = 0,
        seed: int | None = None,
        sample: Callable[[torch.Tensor, torch.Generator | None], torch.Tensor] | None = None,
    ) -> Iterator[torch.Tensor]:
        """Codes (B, n, D) chunk by chunk, starting with alpha_start (B, D) itself, without end when n_codes is
        None. Sampling is reproducible for a given seed on a given device. `sample(known, generator)` samples one
        chunk (default: this sampler's sample_chunk; a frame core passes its batched one). alpha_start may be a
        MotionChain instead (where an earlier stream stood, or `chain()`): the stream goes on from it with its
        generator (seed must be None), and keeps it up to date."""
        if n_codes is not None and n_codes < 1:
            raise InputError(f"the number of codes must be at least 1, got {n_codes}")
        sample = sample or self.sample_chunk
        top = min(self.chunk - 2, self.model.cfg.max_prefix - 1)
        if not 0 <= overlap <= top:
            raise InputError(f"overlap must be between 0 and {top} for this LMDM, got {overlap}")
        if isinstance(alpha_start, MotionChain):
            if seed is not None:
                raise InputError("a MotionChain carries its own generator; pass seed=None with it")
            chain = alpha_start
        else:
            chain = self.chain(alpha_start, seed)
        k, emitted = 1 + overlap, 0
        while n_codes is None or emitted < n_codes:
            codes = sample(chain.tail if chain.first else chain.tail[:, -k:], chain.generator)
            new = codes if chain.first else codes[:, k:]
            if n_codes is not None:
                new = new[:, : n_codes - emitted]
            emitted += new.shape[1]
            chain.tail = torch.cat([chain.tail, new], dim=1)[:, -k:]
            chain.first = False
            yield new
