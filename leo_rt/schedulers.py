"""Diffusion noise schedules and samplers for LMDM (docs/ARCHITECTURE.md §4).

Each sampler is its own object with no model inside: ``set_timesteps(n)``, ``timesteps`` (descending), and
``step(model_output, t, x)`` returning the sample at the next (less noisy) timestep. Notation: ᾱ_t is
``alphas_cumprod[t]``, a_t = √ᾱ_t, σ_t = √(1 − ᾱ_t), so that x_t = a_t·x_0 + σ_t·ε.
"""

from __future__ import annotations

import math

import torch

from .errors import InputError

PREDICTION_TYPES = ("epsilon", "v_prediction")
SPACINGS = ("leading", "logsnr")
BETA_SCHEDULES = ("linear", "cosine")


def make_alphas_cumprod(
    num_train_timesteps: int = 1000,
    beta_schedule: str = "linear",
    beta_start: float = 1e-4,
    beta_end: float = 2e-2,
) -> torch.Tensor:
    """ᾱ_t for t = 0 … T−1 in float64. Linear: β_t evenly spaced from beta_start to beta_end (DDPM, Ho et al.
    2020). Cosine: ᾱ_t = f(t+1)/f(0), f(t) = cos²((t/T + s)/(1 + s)·π/2), s = 0.008, with β clipped at 0.999
    (Nichol & Dhariwal 2021)."""
    if num_train_timesteps < 1:
        raise InputError(f"num_train_timesteps must be at least 1, got {num_train_timesteps}")
    if beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    elif beta_schedule == "cosine":
        s, n = 0.008, num_train_timesteps
        f = torch.cos((torch.arange(n + 1, dtype=torch.float64) / n + s) / (1 + s) * math.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    else:
        raise InputError(f"unknown beta_schedule {beta_schedule!r}; choose one of {BETA_SCHEDULES}")
    return torch.cumprod(1 - betas, dim=0)


class _Scheduler:
    """Shared parts: the training schedule, timestep spacing, and conversions between parameterisations."""

    default_spacing = "leading"

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "linear",
        beta_start: float = 1e-4,
        beta_end: float = 2e-2,
        prediction_type: str = "epsilon",
        timestep_spacing: str | None = None,
        clip_sample: float | None = None,
    ):
        self.clip_sample = clip_sample
        spacing = timestep_spacing or self.default_spacing
        if spacing not in SPACINGS:
            raise InputError(f"unknown timestep_spacing {spacing!r}; choose one of {SPACINGS}")
        self.timestep_spacing = spacing
        if prediction_type not in PREDICTION_TYPES:
            raise InputError(f"unknown prediction_type {prediction_type!r}; choose one of {PREDICTION_TYPES}")
        self.num_train_timesteps = num_train_timesteps
        self.prediction_type = prediction_type
        self.alphas_cumprod = make_alphas_cumprod(num_train_timesteps, beta_schedule, beta_start, beta_end)
        self._tables: dict[torch.device, torch.Tensor] = {}
        self.timesteps = torch.empty(0, dtype=torch.long)
        self._prev: dict[int, int] = {}

    def set_timesteps(self, num_inference_steps: int) -> None:
        """n descending timesteps. 'leading': (n−1)k, …, k, 0 with k = T // n (DDIM's spacing). 'logsnr': evenly
        spaced in λ = log(a/σ) from t = T−1 to t = 0 (DPM-Solver's recommendation for few steps), rounded to
        distinct integer timesteps."""
        n, big_t = num_inference_steps, self.num_train_timesteps
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise InputError(f"num_inference_steps must be a positive integer, got {n!r}")
        if n > big_t:
            raise InputError(f"num_inference_steps={n} exceeds the {big_t} training timesteps; use at most {big_t}")
        if self.timestep_spacing == "leading":
            self.timesteps = torch.arange(n - 1, -1, -1, dtype=torch.long) * (big_t // n)
        else:
            ab = self.alphas_cumprod
            lam = 0.5 * torch.log(ab / (1 - ab))  # decreasing in t
            targets = torch.linspace(float(lam[-1]), float(lam[0]), n, dtype=torch.float64)
            picked, last = [], big_t
            for i, t in enumerate(torch.searchsorted(-lam, -targets).clamp(max=big_t - 1).tolist()):
                t = max(min(t, last - 1), n - 1 - i)  # strictly decreasing, room left for the rest
                picked.append(t)
                last = t
            self.timesteps = torch.tensor(picked, dtype=torch.long)
        self._prev = {int(t): (int(self.timesteps[i + 1]) if i + 1 < n else -1) for i, t in enumerate(self.timesteps)}

    def prev_timestep(self, t: int) -> int:
        """The timestep after t in the current sequence; −1 means the clean sample (ᾱ = 1)."""
        if int(t) not in self._prev:
            raise InputError(f"timestep {t} is not in the current sequence; call set_timesteps(n) first")
        return self._prev[int(t)]

    def alpha_bar(self, t: int) -> float:
        return 1.0 if t < 0 else float(self.alphas_cumprod[t])

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """Forward process: x_t = a_t·x_0 + σ_t·ε (t a scalar or one per batch element)."""
        if isinstance(t, int) or (isinstance(t, torch.Tensor) and t.dim() == 0 and t.device.type == "cpu"):
            ab = self.alpha_bar(int(t))  # a Python float: no host→device copy (and sync) per sampling step
            return math.sqrt(ab) * x0 + math.sqrt(1 - ab) * noise
        ab = self._table(x0.device)[t.to(x0.device)].to(x0.dtype)
        ab = ab.reshape(-1, *([1] * (x0.dim() - 1)))
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def _table(self, device: torch.device) -> torch.Tensor:
        """ᾱ on `device`, copied there once (training indexes it per batch)."""
        cached = self._tables.get(device)
        if cached is None:
            cached = self._tables[device] = self.alphas_cumprod.to(device)
        return cached

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the model learns to output: ε, or v = a_t·ε − σ_t·x_0 (Salimans & Ho 2022)."""
        if self.prediction_type == "epsilon":
            return noise
        ab = self._table(x0.device)[t.to(x0.device)].to(x0.dtype).reshape(-1, *([1] * (x0.dim() - 1)))
        return ab.sqrt() * noise - (1 - ab).sqrt() * x0

    def to_x0_eps(self, model_output: torch.Tensor, t: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x̂_0, ε̂) from the model output at timestep t; with clip_sample, x̂_0 is clamped to ±clip_sample
        and ε̂ recomputed from it."""
        ab = self.alpha_bar(t)
        a, s = math.sqrt(ab), math.sqrt(1 - ab)
        if self.prediction_type == "epsilon":
            x0, eps = (x - s * model_output) / a, model_output
        else:
            x0, eps = a * x - s * model_output, s * x + a * model_output  # v: x_0 = a·x_t − σ·v, ε = σ·x_t + a·v
        if self.clip_sample is not None:
            x0 = x0.clamp(-self.clip_sample, self.clip_sample)
            eps = (x - a * x0) / s
        return x0, eps

    @staticmethod
    def _noise(x: torch.Tensor, generator) -> torch.Tensor:
        return randn_rows(x.shape, generator, x.device, x.dtype)


class DDPMScheduler(_Scheduler):
    """Ancestral sampling of DDPM (Ho et al. 2020, Alg. 2), over any subsequence of timesteps (respaced:
    β'_t = 1 − ᾱ_t/ᾱ_prev)."""

    def step(self, model_output, t, x, generator: torch.Generator | None = None) -> torch.Tensor:
        t = int(t)
        prev = self.prev_timestep(t)
        ab_t, ab_prev = self.alpha_bar(t), self.alpha_bar(prev)
        beta = 1 - ab_t / ab_prev
        # 1. predicted clean sample
        x0, _ = self.to_x0_eps(model_output, t, x)
        # 2. posterior q(x_prev | x_t, x_0) mean (Ho et al. eq. 7)
        mean = (math.sqrt(ab_prev) * beta / (1 - ab_t)) * x0 + (math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab_t)) * x
        if prev < 0:
            return mean
        # 3. posterior variance β̃ = (1 − ᾱ_prev)/(1 − ᾱ_t)·β
        var = (1 - ab_prev) / (1 - ab_t) * beta
        return mean + math.sqrt(var) * self._noise(x, generator)


class DDIMScheduler(_Scheduler):
    """DDIM (Song et al. 2021, eq. 12): eta = 0 is the deterministic sampler, eta = 1 matches DDPM's variance."""

    def __init__(self, *args, eta: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        if eta < 0:
            raise InputError(f"eta must be >= 0, got {eta}")
        self.eta = eta

    def step(self, model_output, t, x, generator: torch.Generator | None = None) -> torch.Tensor:
        t = int(t)
        prev = self.prev_timestep(t)
        ab_t, ab_prev = self.alpha_bar(t), self.alpha_bar(prev)
        # 1. predicted x_0 and ε
        x0, eps = self.to_x0_eps(model_output, t, x)
        # 2. σ_t(η) = η·√((1 − ᾱ_prev)/(1 − ᾱ_t))·√(1 − ᾱ_t/ᾱ_prev)
        sigma = self.eta * math.sqrt((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev))
        # 3. x_prev = √ᾱ_prev·x̂_0 + √(1 − ᾱ_prev − σ²)·ε̂ + σ·z
        out = math.sqrt(ab_prev) * x0 + math.sqrt(max(1 - ab_prev - sigma**2, 0.0)) * eps
        if sigma > 0:
            out = out + sigma * self._noise(x, generator)
        return out

    def inverse_step(self, model_output, t, x) -> torch.Tensor:
        """Deterministic DDIM inversion: from x at timestep `prev_timestep(t)` to timestep t, with the model
        output evaluated at (x, that timestep); from the clean end (−1), evaluate the model at timestep 0.
        Run over reversed(timesteps) it maps data to noise."""
        t = int(t)
        prev = self.prev_timestep(t)
        x0, eps = self.to_x0_eps(model_output, max(prev, 0), x)
        ab_t = self.alpha_bar(t)
        return math.sqrt(ab_t) * x0 + math.sqrt(1 - ab_t) * eps


class DPMSolverMultistepScheduler(_Scheduler):
    """DPM-Solver++(2M) with data prediction (Lu et al. 2022, Alg. 2), first order on the first and last step.
    λ_t = log(a_t/σ_t); h = λ_prev − λ_t. Timesteps are logSNR-spaced by default: with DDIM's spacing the last
    step jumps far in λ and the two-step extrapolation overshoots."""

    default_spacing = "logsnr"

    def set_timesteps(self, num_inference_steps: int) -> None:
        super().set_timesteps(num_inference_steps)
        self._last_x0: torch.Tensor | None = None
        self._last_lambda: float | None = None

    def _lambda(self, t: int) -> float:
        ab = self.alpha_bar(t)
        return 0.5 * math.log(ab / (1 - ab))

    def step(self, model_output, t, x, generator: torch.Generator | None = None) -> torch.Tensor:
        t = int(t)
        prev = self.prev_timestep(t)
        x0, _ = self.to_x0_eps(model_output, t, x)
        if prev < 0:  # to the clean sample (σ = 0, λ = ∞): the first-order update is x̂_0 itself
            self._last_x0 = None
            return x0
        lam_t, lam_prev = self._lambda(t), self._lambda(prev)
        h = lam_prev - lam_t
        a_prev, s_prev = math.sqrt(self.alpha_bar(prev)), math.sqrt(1 - self.alpha_bar(prev))
        s_t = math.sqrt(1 - self.alpha_bar(t))
        if self._last_x0 is None:
            d = x0  # 1st order (DPM-Solver++ 1 = DDIM)
        else:
            r = (lam_t - self._last_lambda) / h  # h_{i-1} / h_i
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * self._last_x0
        self._last_x0, self._last_lambda = x0, lam_t
        # x_prev = (σ_prev/σ_t)·x_t − a_prev·(e^{−h} − 1)·D
        return (s_prev / s_t) * x - a_prev * math.expm1(-h) * d


SAMPLERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpm++": DPMSolverMultistepScheduler}


def make_scheduler(name: str, eta: float = 0.0, **kwargs) -> _Scheduler:
    """A sampler by CLI name ('ddpm', 'ddim', 'dpm++'); eta applies to DDIM only."""
    if name not in SAMPLERS:
        raise InputError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    return DDIMScheduler(eta=eta, **kwargs) if name == "ddim" else SAMPLERS[name](**kwargs)


def randn_rows(shape, generator, device, dtype) -> torch.Tensor:
    """Standard normal noise of `shape`. `generator` is None, one torch.Generator, or one per row (dim 0): each
    row then draws from its own generator exactly what a batch of one would, so a stream sampled in a batch with
    others gets the codes it would get alone."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise InputError(f"{len(generator)} generators for {shape[0]} rows; give one per row")
        return torch.cat([torch.randn((1, *shape[1:]), generator=g, device=device, dtype=dtype) for g in generator])
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)
