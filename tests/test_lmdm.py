"""LMDM: learning on synthetic motion, chunked streaming, files, bad inputs.

The trained model comes from the session fixture `trained_lmdm` (conftest): a small LMDM trained once per test
session on motion with a known structure (circular motion per channel pair), then checked against that structure.
"""

import resource  # noqa: F401  (Linux only, as the CI machine)
import shutil

import numpy as np
import pytest
import torch

from conftest import LMDM_TRAIN_STEPS, rotation_codes
from leo_rt.checkpoint import CheckpointError
from leo_rt.lmdm import LMDM, LMDMConfig, load_lmdm, save_lmdm
from leo_rt.motion import MotionSampler
from leo_rt.train import MotionCodes, TrainConfig, train_lmdm

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (see conftest.one_thread)


def motion_stats(x: torch.Tensor) -> tuple[float, float]:
    """(mean |frame-to-frame step|, mean per-channel lag-1 autocorrelation) of codes (B, L, D)."""
    step = (x[:, 1:] - x[:, :-1]).abs().mean().item()
    xc = x - x.mean(1, keepdim=True)
    ac = ((xc[:, 1:] * xc[:, :-1]).sum(1) / (xc * xc).sum(1).clamp_min(1e-8)).mean().item()
    return step, ac


def test_training_learns_the_motion_structure(trained_lmdm):
    data, model, out, losses = trained_lmdm
    assert np.mean(losses[-50:]) < 0.6 * np.mean(losses[:50])
    chunk = model.cfg.chunk
    windows = torch.from_numpy(np.stack([v[s : s + chunk] for v in data.videos() for s in range(0, 64, 16)]))
    cond = windows[:64, 0]
    data_step, data_ac = motion_stats(windows)
    untrained = LMDM(model.cfg)
    untrained.load_state_dict(
        {k: v for k, v in model.state_dict().items() if "std" in k or "mean" in k}, strict=False
    )  # same data statistics, untrained weights
    results = {}
    for name, m in (("trained", model), ("untrained", untrained)):
        codes = MotionSampler(m, "ddim", 20).sample_chunk(cond[:, None], torch.Generator().manual_seed(0))
        assert torch.equal(codes[:, 0], cond)  # the first code is the condition, exactly
        results[name] = motion_stats(codes)
    (t_step, t_ac), (u_step, u_ac) = results["trained"], results["untrained"]
    assert abs(t_step - data_step) < 0.5 * abs(u_step - data_step), results
    assert abs(t_ac - data_ac) < 0.5 * abs(u_ac - data_ac), results


def test_checkpoints_resume_and_reload(trained_lmdm, tmp_path):
    data, model, trained_dir, _ = trained_lmdm
    out = tmp_path / "lmdm"
    shutil.copytree(trained_dir, out)  # the session's trained model stays as it is for the other tests
    again = load_lmdm(out)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values(), strict=True))
    assert (out / "train_state.pt").is_file()
    # resume continues from the saved step: N → N + 20
    steps = []
    resumed = train_lmdm(
        data,
        out,
        cfg=TrainConfig(steps=LMDM_TRAIN_STEPS + 20, batch=8, save_every=1000),
        resume=True,
        on_step=lambda s, loss: steps.append(s),
    )
    assert steps[0] == LMDM_TRAIN_STEPS + 1 and steps[-1] == LMDM_TRAIN_STEPS + 20
    assert not torch.equal(resumed.out.weight, model.out.weight)


@pytest.mark.parametrize("overlap", [0, 3])
def test_chunks_join_smoothly(trained_lmdm, overlap):
    _, model, _, _ = trained_lmdm
    sampler = MotionSampler(model, "ddim", 20)
    d = model.cfg.motion_dim
    start = torch.from_numpy(rotation_codes(1, 20, d=d, seed=5).codes[:1])
    parts = list(sampler.stream(start, n_codes=90, overlap=overlap, seed=0))
    codes = torch.cat(parts, dim=1)[0]  # (90, D)
    assert codes.shape == (90, d) and torch.equal(codes[0], start[0])
    steps = (codes[1:] - codes[:-1]).abs().mean(1)  # step i goes from code i to code i+1
    new_per_chunk = model.cfg.chunk - 1 - overlap
    joins = torch.arange(model.cfg.chunk - 1, 89, new_per_chunk)  # last code of a chunk → first new code
    inner = torch.ones(89, dtype=torch.bool)
    inner[joins] = False
    # stated tolerance: the mean step across joins is at most 1.5× the mean step inside chunks
    assert steps[joins].mean() <= 1.5 * steps[inner].mean(), (steps[joins], steps[inner].mean())


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def test_streaming_memory_is_flat():
    model = LMDM(LMDMConfig.from_name("lmdm-tiny"))
    sampler = MotionSampler(model, "ddim", 2)

    def run(n_chunks):
        it = sampler.stream(torch.zeros(1, 20), n_codes=None, seed=0)
        for _ in range(n_chunks):
            next(it)

    run(20)
    before = _rss_mb()
    run(20)
    after_20 = _rss_mb()
    run(200)
    after_200 = _rss_mb()
    assert after_200 - after_20 < 8.0, (before, after_20, after_200)  # 180 more chunks add (almost) nothing


def test_seeded_streams_are_reproducible():
    model = LMDM(LMDMConfig.from_name("lmdm-tiny"))
    with torch.no_grad():
        model.out.weight.normal_(0, 0.1)  # not the all-zero output of a fresh model
    s = MotionSampler(model, "dpm++", 5)
    a = torch.cat(list(s.stream(torch.zeros(1, 20), 40, seed=3)), 1)
    b = torch.cat(list(s.stream(torch.zeros(1, 20), 40, seed=3)), 1)
    c = torch.cat(list(s.stream(torch.zeros(1, 20), 40, seed=4)), 1)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("overlap", [0, 3])
def test_a_stream_goes_on_from_its_chain(overlap):
    """Stopped after any chunk, a stream continued from its MotionChain gives the codes of one uninterrupted
    stream, bit for bit."""
    model = LMDM(LMDMConfig.from_name("lmdm-tiny"))
    with torch.no_grad():
        model.out.weight.normal_(0, 0.1)
    s = MotionSampler(model, "ddim", 2)
    start = torch.randn(1, 20, generator=torch.Generator().manual_seed(1))
    want = torch.cat(list(s.stream(start, 60, overlap, seed=3)), 1)
    chain = s.chain(start, seed=3)
    it = s.stream(chain, overlap=overlap)
    got = [next(it), next(it)]  # the chain now stands after two chunks; this stream is dropped there
    got += s.stream(chain, 60 - sum(c.shape[1] for c in got), overlap)
    assert torch.equal(torch.cat(got, 1), want)
    with pytest.raises(ValueError, match="carries its own generator"):
        next(s.stream(chain, 10, seed=3))


def test_files_and_bad_inputs(tmp_path):
    m = LMDM(LMDMConfig.from_name("lmdm-tiny"))
    save_lmdm(m, tmp_path / "ok")
    assert load_lmdm(tmp_path / "ok").cfg == m.cfg
    with pytest.raises(CheckpointError, match="not an LMDM checkpoint directory"):
        load_lmdm(tmp_path / "missing")
    (tmp_path / "anim").mkdir()
    (tmp_path / "anim" / "config.json").write_text('{"format": "leo_rt.animator", "config": {}}')
    (tmp_path / "anim" / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="not an LMDM"):
        load_lmdm(tmp_path / "anim")
    bad = MotionCodes(np.zeros((10, 19), np.float32), np.array([10]), np.array([10.0]), ["a"])
    bad.save(tmp_path / "c.npz")
    with pytest.raises(ValueError, match="19 channels"):
        MotionCodes.load(tmp_path / "c.npz", motion_dim=20)
    np.savez(tmp_path / "d.npz", codes=np.zeros((4, 5, 20)), lengths=np.array([4]))
    with pytest.raises(ValueError, match=r"shape \(frames, motion_dim\)"):
        MotionCodes.load(tmp_path / "d.npz")
    np.savez(tmp_path / "e.npz", codes=np.zeros((4, 20)), lengths=np.array([5]))
    with pytest.raises(ValueError, match="do not add up"):
        MotionCodes.load(tmp_path / "e.npz")
    short = MotionCodes(np.zeros((10, 20), np.float32), np.array([10]), np.array([10.0]), ["a"])
    with pytest.raises(ValueError, match="no video has at least 16 frames"):
        train_lmdm(short, tmp_path / "x", preset="lmdm-tiny", cfg=TrainConfig(steps=1))
    with pytest.raises(ValueError, match="overlap must be between 0 and"):
        next(MotionSampler(m, "ddim", 2).stream(torch.zeros(1, 20), 10, overlap=15))
    with pytest.raises(ValueError, match="chunk must be a multiple of 2"):
        LMDMConfig(chunk=15, channel_mults=(1, 2))
