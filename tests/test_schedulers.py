"""Samplers checked against mathematics: a Gaussian data distribution has a closed-form optimal denoiser."""

import math

import pytest
import torch

from leo_rt.schedulers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    make_alphas_cumprod,
    make_scheduler,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # 10000 × 4 samples: small ops (see conftest.one_thread)

MU = torch.tensor([1.5, -0.5, 0.0, 3.0])
STD = torch.tensor([0.5, 1.0, 2.0, 0.7])


def optimal_output(sched, x, t):
    """The exact MMSE denoiser for x_0 ~ N(MU, diag(STD²)), expressed in the scheduler's parameterisation:
    E[x_0 | x_t] = μ + a·s²/(a²s² + σ²)·(x_t − a·μ)."""
    ab = sched.alpha_bar(int(t))
    a, s = math.sqrt(ab), math.sqrt(1 - ab)
    mu, var = MU.double(), STD.double() ** 2
    x0 = mu + a * var / (a * a * var + s * s) * (x - a * mu)
    eps = (x - a * x0) / s
    return eps if sched.prediction_type == "epsilon" else a * eps - s * x0


def sample(sched, n_steps, n=10000, seed=0):
    sched.set_timesteps(n_steps)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    for t in sched.timesteps:
        x = sched.step(optimal_output(sched, x, t), t, x, generator=g)
    return x


# (sampler, steps, schedule, prediction): tolerance on the mean (in data std units) and on the std (relative).
# With 10000 samples the Monte-Carlo error is ~1% on either; the rest is the sampler's discretisation error at
# that step count (measured below 1.5% here; DDIM at 50 steps would be ~5% off, DPM++ at 25 steps ~2.7%).
CASES = [
    ("ddpm", 1000, "linear", "epsilon", 0.03, 0.03),
    ("ddpm", 1000, "cosine", "v_prediction", 0.03, 0.03),
    ("ddim-eta1", 1000, "cosine", "epsilon", 0.03, 0.03),
    ("ddim", 200, "linear", "epsilon", 0.03, 0.03),
    ("ddim", 200, "cosine", "v_prediction", 0.03, 0.03),
    ("dpm++", 50, "linear", "v_prediction", 0.03, 0.03),
    ("dpm++", 50, "cosine", "epsilon", 0.03, 0.03),
    ("dpm++", 25, "linear", "epsilon", 0.03, 0.04),
]
MAKERS = {
    "ddpm": DDPMScheduler,
    "ddim": lambda **k: DDIMScheduler(eta=0.0, **k),
    "ddim-eta1": lambda **k: DDIMScheduler(eta=1.0, **k),
    "dpm++": DPMSolverMultistepScheduler,
}


@pytest.mark.parametrize("name,steps,schedule,prediction,tol_mean,tol_std", CASES)
def test_samplers_recover_the_data_distribution(name, steps, schedule, prediction, tol_mean, tol_std):
    sched = MAKERS[name](prediction_type=prediction, beta_schedule=schedule)
    x = sample(sched, steps)
    mean_err = ((x.mean(0) - MU.double()) / STD.double()).abs().max().item()
    std_err = (x.std(0) / STD.double() - 1).abs().max().item()
    assert mean_err < tol_mean, f"mean off by {mean_err:.3f} std"
    assert std_err < tol_std, f"std off by {100 * std_err:.1f}%"


def test_a_wrong_denoiser_is_caught():
    """The check above has teeth: a denoiser for the wrong variance gives the wrong sample variance."""
    sched = DDIMScheduler()
    sched.set_timesteps(50)
    x = torch.randn(10000, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    global STD
    saved, STD = STD, STD * 1.2
    try:
        for t in sched.timesteps:
            x = sched.step(optimal_output(sched, x, t), t, x)
    finally:
        STD = saved
    assert (x.std(0) / STD.double() - 1).abs().max() > 0.1


def test_ddim_eta0_is_deterministic_and_invertible():
    sched = DDIMScheduler(eta=0.0)
    sched.set_timesteps(1000)  # inversion is first order: its error halves when the step count doubles
    g = torch.Generator().manual_seed(1)
    x0 = MU.double() + STD.double() * torch.randn(64, 4, generator=g, dtype=torch.float64)
    x = x0
    for t in reversed(sched.timesteps):  # data → noise along the deterministic path
        prev = sched.prev_timestep(int(t))
        x = sched.inverse_step(optimal_output(sched, x, max(prev, 0)), t, x)
    assert x.std() > 0.9  # it really reached noise
    a, b = sample_from(sched, x), sample_from(sched, x.clone())
    assert torch.equal(a, b)  # deterministic
    err = (a - x0).abs() / STD.double()
    assert err.max() < 0.03 and err.mean() < 0.01, f"inversion round trip off by up to {err.max():.3f} std"


def sample_from(sched, x):
    for t in sched.timesteps:
        x = sched.step(optimal_output(sched, x, t), t, x)
    return x


def test_alphas_cumprod_match_closed_forms():
    ab = make_alphas_cumprod(1000, "linear", 1e-4, 2e-2)
    t = torch.arange(1000, dtype=torch.float64)
    betas = 1e-4 + (2e-2 - 1e-4) * t / 999
    assert torch.allclose(ab, torch.exp(torch.cumsum(torch.log1p(-betas), 0)), rtol=1e-12)
    ab = make_alphas_cumprod(1000, "cosine")
    f = lambda u: math.cos((u / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for i in (0, 10, 500, 900):
        assert ab[i].item() == pytest.approx(f(i + 1) / f(0), rel=1e-9)
    assert 0 < ab[-1] < 1e-4


def test_bad_arguments():
    with pytest.raises(ValueError, match="positive integer"):
        DDIMScheduler().set_timesteps(0)
    with pytest.raises(ValueError, match="exceeds the 1000 training timesteps"):
        DDPMScheduler().set_timesteps(1001)
    with pytest.raises(ValueError, match="unknown prediction_type 'sample'"):
        DDIMScheduler(prediction_type="sample")
    with pytest.raises(ValueError, match="unknown beta_schedule"):
        DDIMScheduler(beta_schedule="quadratic")
    with pytest.raises(ValueError, match="eta must be >= 0"):
        DDIMScheduler(eta=-1)
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        make_scheduler("euler")
    with pytest.raises(ValueError, match="call set_timesteps"):
        DDIMScheduler().step(torch.zeros(1), 999, torch.zeros(1))


def test_seeded_sampling_is_reproducible():
    a = sample(DDPMScheduler(), 20, n=8, seed=3)
    b = sample(DDPMScheduler(), 20, n=8, seed=3)
    c = sample(DDPMScheduler(), 20, n=8, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
