"""Sessions and backends: parity of every CPU backend, streaming policies, bounded memory, auto."""

import time

import numpy as np
import pytest
import torch

from conftest import make_lia, random_images, rel_err
from leo_rt import Animator, load_animator
from leo_rt.backends import BackendUnavailable, backend_status, choose_backend
from leo_rt.lmdm import LMDM, LMDMConfig
from leo_rt.motion import MotionSampler
from leo_rt.pipelines import generate
from leo_rt.session import Session

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("session")
    torch.save({"gen": make_lia("lia-32-tiny", seed=6).state_dict()}, d / "anim.pt")
    return d / "anim.pt"


@pytest.fixture(scope="module")
def sampler():
    lmdm = LMDM(LMDMConfig.from_name("lmdm-tiny"))
    with torch.no_grad():
        for p in lmdm.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    return MotionSampler(lmdm, "ddim", 3)


@pytest.mark.parametrize("backend", ["torch", "compile", "onnxruntime", "aoti"])
def test_every_cpu_backend_renders_the_reference_frames(backend, ckpt, sampler, tmp_path, monkeypatch):
    if backend_status("cpu")[backend] is not None:
        pytest.skip(backend_status("cpu")[backend])
    monkeypatch.setenv("LEO_RT_CACHE", str(tmp_path / "cache"))
    ref = load_animator(ckpt)
    session = Session(ckpt, backend=backend)
    image = random_images(1, 32, seed=3)
    session.start(image)
    state = ref.encode_source(image)
    alpha = torch.randn(5, 20, generator=torch.Generator().manual_seed(1)) * 0.5
    assert rel_err(session.render(alpha), ref.render(state, alpha)) <= 1e-4  # stated tolerance: 1e-4 relative L2
    codes = session.backend.encode_motion(random_images(3, 32, seed=4))
    assert rel_err(codes, ref.encode_motion(random_images(3, 32, seed=4))) <= 1e-4
    # a short generated stream: 12 frames sampled by the LMDM while earlier ones render
    got = torch.cat(list(session.stream(sampler, n_frames=12, batch=4, seed=0)))
    want = torch.cat(list(generate(ref, sampler, image, 12, seed=0, batch=4)))
    assert got.shape == want.shape == (12, 3, 32, 32)
    assert rel_err(got, want) <= 1e-3  # the sampled codes start from the backend's own alpha_src


def _instrumented(session):
    calls = {"render": 0}
    real = session.backend.render

    def render(state, alpha):
        calls["render"] += 1
        return real(state, alpha)

    session.backend.render = render
    return calls


def _codes(n_chunks, per_chunk=2):
    return [torch.full((per_chunk, 20), 0.05 * i) for i in range(n_chunks)]


def test_blocking_policy_loses_nothing_and_bounds_the_queue():
    session = Session(Animator(make_lia("lia-32-tiny", seed=1)), backend="torch")
    session.start(random_images(1, 32))
    codes = _codes(12)
    want = [session.render(c) for c in codes]
    calls = _instrumented(session)
    got = []
    for frames in session.stream(iter(codes), batch=2, queue_size=2, policy="block"):
        time.sleep(0.02)  # a slow consumer
        got.append(frames)
        assert calls["render"] - len(got) <= 2 + 1  # queue_size waiting + the one being rendered
    assert len(got) == 12 and session.dropped == 0
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))  # in order, none lost


def test_drop_oldest_policy_drops_and_keeps_order():
    session = Session(Animator(make_lia("lia-32-tiny", seed=1)), backend="torch")
    session.start(random_images(1, 32))
    codes = _codes(30, per_chunk=1)
    want = {float(c[0, 0]): session.render(c) for c in codes}
    got = []
    for frames in session.stream(iter(codes), batch=1, queue_size=2, policy="drop_oldest", output="tensor"):
        time.sleep(0.05)
        got.append(frames)
    assert session.dropped > 0 and len(got) + session.dropped == 30
    order = [next(k for k, v in want.items() if torch.equal(v, g)) for g in got]
    assert order == sorted(order)  # what arrives comes in order; the last batch is never dropped
    assert order[-1] == pytest.approx(0.05 * 29)


def test_stream_memory_is_flat_and_uint8_output():
    session = Session(Animator(make_lia("lia-32-tiny", seed=1)), backend="torch")
    session.start(random_images(1, 32))

    def rss_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20

    def run(n):
        for frames in session.stream((torch.randn(4, 20) * 0.3 for _ in range(n)), batch=4, output="uint8"):
            assert frames.dtype == np.uint8 and frames.shape == (4, 32, 32, 3)

    run(20)
    before = rss_mb()
    run(200)
    assert rss_mb() - before < 10.0


def test_auto_and_unavailable_backends(ckpt):
    assert choose_backend("auto", "cpu") in {b for b, why in backend_status("cpu").items() if why is None}
    with pytest.raises(BackendUnavailable, match=r"'tensorrt' is not available on cpu: .*Available: .*torch"):
        choose_backend("tensorrt", "cpu")
    with pytest.raises(BackendUnavailable, match="unknown backend 'fast'"):
        Session(ckpt, backend="fast")
    with pytest.raises(ValueError, match="call session.start"):
        Session(ckpt, backend="torch").render(torch.zeros(1, 20))
    with pytest.raises(ValueError, match="policy must be one of"):
        s = Session(ckpt, backend="torch")
        s.start(random_images(1, 32))
        next(s.stream(iter(_codes(2)), policy="newest"))
