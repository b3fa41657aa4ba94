"""pytest-benchmark suite: kernels, animator stages, LMDM step, end-to-end stream (tiny sizes by default).

    python -m pytest benchmarks/test_bench_suite.py --benchmark-only          # measure
    python -m pytest benchmarks/test_bench_suite.py --benchmark-disable      # run each once (CI does this)

LEO_RT_BENCH_PRESET=lia-256 measures the full-size animator instead of lia-64-tiny.
"""

import os

import pytest
import torch

from leo_rt import Animator
from leo_rt.kernels import base_grid, warp_blend_reference
from leo_rt.lmdm import LMDM, LMDMConfig
from leo_rt.motion import MotionSampler
from leo_rt.session import Session

PRESET = os.environ.get("LEO_RT_BENCH_PRESET", "lia-64-tiny")


@pytest.fixture(scope="module")
def anim():
    return Animator.random(PRESET, seed=0)


@pytest.fixture(scope="module")
def state(anim):
    return anim.encode_source(torch.rand(1, 3, anim.size, anim.size) * 2 - 1)


def test_warp_blend_reference(benchmark):
    feat, logits, h = torch.randn(1, 64, 64, 64), torch.randn(8, 3, 64, 64), torch.randn(8, 64, 64, 64)
    grid = base_grid(64)
    warped, out = benchmark(warp_blend_reference, feat, logits, h, grid)
    assert out.shape == h.shape


def test_encode_source(benchmark, anim):
    x = torch.rand(1, 3, anim.size, anim.size) * 2 - 1
    assert benchmark(anim.encode_source, x).w_a.shape[0] == 1


def test_encode_motion_batch8(benchmark, anim):
    x = torch.rand(8, 3, anim.size, anim.size) * 2 - 1
    assert benchmark(anim.encode_motion, x).shape == (8, 20)


@pytest.mark.parametrize("batch", [1, 8])
def test_render(benchmark, anim, state, batch):
    alpha = torch.randn(batch, 20) * 0.5
    assert benchmark(anim.render, state, alpha).shape[0] == batch


def test_lmdm_denoiser_step(benchmark):
    model = LMDM(LMDMConfig.from_name("lmdm-small")).eval()
    x, t, c = torch.randn(1, 32, 20), torch.tensor([500]), torch.randn(1, 20)
    with torch.no_grad():
        assert benchmark(model, x, t, c).shape == x.shape


def test_stream_end_to_end(benchmark, anim):
    sampler = MotionSampler(LMDM(LMDMConfig.from_name("lmdm-tiny")), "ddim", 5)
    with Session(anim, backend="torch") as session:
        session.start(torch.rand(1, 3, anim.size, anim.size) * 2 - 1)

        def run():
            return sum(f.shape[0] for f in session.stream(sampler, n_frames=32, batch=8, seed=0))

        assert benchmark(run) == 32
