"""The frame core: one device worker per process and device, coalesced multi-source renders and LMDM chunks."""

import dataclasses
import threading

import pytest
import torch

from conftest import make_lia, random_images
from leo_rt import Animator
from leo_rt.backends import BACKENDS, PREFERENCE, BackendUnavailable, choose_backend
from leo_rt.core import DeviceWorker, FrameCore
from leo_rt.errors import InputError
from leo_rt.lmdm import LMDM, LMDMConfig
from leo_rt.motion import MotionSampler
from leo_rt.precision import Precision
from leo_rt.session import Session


@pytest.fixture(scope="module")
def animator():
    return Animator(make_lia("lia-32-tiny", seed=2))


@pytest.fixture
def core(animator):
    with FrameCore(animator, max_batch=16) as c:
        yield c


def _hold(worker: DeviceWorker) -> threading.Event:
    """Occupy the worker until the returned event is set, so that requests queue up behind it."""
    release, started = threading.Event(), threading.Event()

    def wait():
        started.set()
        release.wait(10)

    worker.submit(wait)
    started.wait(10)
    return release


def _queued(worker: DeviceWorker, n: int) -> None:
    for _ in range(2000):
        if len(worker._jobs) >= n:
            return
        threading.Event().wait(0.005)
    raise AssertionError(f"{n} jobs never queued")


def _device_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("leo_rt-device")]


def test_one_worker_per_device_shared_and_ended_by_its_last_user(animator):
    before = _device_threads()
    a, b = FrameCore(animator), FrameCore(animator)
    assert a.worker is b.worker and len(_device_threads()) == len(before) + (0 if before else 1)
    ran_on = a.worker.call(threading.current_thread)
    assert ran_on is a.worker._thread and ran_on is not threading.current_thread()
    a.close()
    assert b.worker._thread.is_alive()  # still used by b
    b.close()
    b.close()  # idempotent
    assert _device_threads() == before
    with pytest.raises(Exception, match="closed"):
        a.add_source(random_images(1, 32))


def test_requests_of_several_sources_render_in_one_call_and_match_alone(core, animator):
    images = [random_images(1, 32, seed=s) for s in (1, 2, 3)]
    handles = [core.add_source(im) for im in images]
    alphas = [torch.randn(n, 20, generator=torch.Generator().manual_seed(n)) * 0.5 for n in (3, 1, 4)]
    calls = []
    real = core.runner.render
    core.runner.render = lambda state, alpha, src_index=None: (
        calls.append(alpha.shape[0]) or real(state, alpha, src_index)
    )
    try:
        release = _hold(core.worker)
        futures = [core.render(h, a) for h, a in zip(handles, alphas, strict=True)]
        release.set()
        got = [f.result(timeout=30) for f in futures]
    finally:
        del core.runner.render
    assert calls == [8] and core.batch_sizes[-1] == 8  # one batched call for the three sources
    for h, a, g in zip(handles, alphas, got, strict=True):
        want = animator.render(h.state, a)  # the source alone
        ref = Animator(make_lia("lia-32-tiny", seed=2).double()).render(h.state.to(torch.float64), a.double())
        err, own = (g.double() - ref).abs().max(), (want.double() - ref).abs().max()
        assert err <= max(2 * own, 1e-5 * ref.abs().max()), (err, own)


def test_one_request_per_source_per_batch_keeps_order_and_fairness(core):
    a, b = core.add_source(random_images(1, 32, seed=1)), core.add_source(random_images(1, 32, seed=2))
    codes = [torch.full((2, 20), 0.1 * i) for i in range(4)]
    release = _hold(core.worker)
    fa = [core.render(a, c) for c in codes]  # four requests of a, queued before b's one
    fb = core.render(b, codes[0])
    release.set()
    for f in [*fa, fb]:
        f.result(timeout=30)
    # a's first request and b's share the first batch: b did not wait behind all of a's
    assert core.batch_sizes[-4:] == [4, 2, 2, 2]
    assert all(torch.equal(f.result(), core.render_now(a, c)) for f, c in zip(fa, codes, strict=True))


def test_requests_above_max_batch_are_split_and_joined(core):
    h = core.add_source(random_images(1, 32, seed=4))
    alpha = torch.randn(37, 20) * 0.3
    out = core.render_now(h, alpha)
    assert out.shape == (37, 3, 32, 32) and core.batch_sizes[-3:] == [16, 16, 5]
    assert torch.equal(out[:16], core.render_now(h, alpha[:16]))
    u8 = core.render_now(h, alpha, output="uint8")
    assert u8.shape == (37, 32, 32, 3) and u8.dtype.name == "uint8"


def test_nonfinite_inputs_are_refused_with_the_first_bad_row(core):
    h = core.add_source(random_images(1, 32))
    alpha = torch.zeros(5, 20)
    alpha[3, 7] = float("nan")
    with pytest.raises(InputError, match="row 3"):
        core.render(h, alpha)
    alpha[3, 7], alpha[1, 0] = 0.0, float("inf")
    with pytest.raises(InputError, match="row 1"):
        core.render(h, alpha)
    image = random_images(1, 32)
    image[0, 1, 2, 3] = float("nan")
    with pytest.raises(InputError, match="NaN or infinite"):
        core.add_source(image)
    with pytest.raises(InputError, match=r"\(N, 20\)"):
        core.render(h, torch.zeros(3, 19))


def test_errors_inside_a_batch_reach_every_caller_and_the_worker_survives(core):
    h = core.add_source(random_images(1, 32))
    real = core.runner.render

    def broken(*a, **k):
        raise RuntimeError("boom")

    core.runner.render = broken
    try:
        with pytest.raises(RuntimeError, match="boom"):
            core.render_now(h, torch.zeros(2, 20))
    finally:
        core.runner.render = real
    assert core.render_now(h, torch.zeros(2, 20)).shape == (2, 3, 32, 32)


def test_precision_means_what_it_says_on_the_worker(core):
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        seen = core.worker.call(core._guarded, lambda: (torch.backends.cudnn.allow_tf32,
                                                         torch.backends.cuda.matmul.allow_tf32))  # fmt: skip
        assert seen == (False, False)  # fp32: TF32 off for our calls
        assert torch.backends.cudnn.allow_tf32  # restored after
        with Precision.TF32.math():
            assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    assert Precision.parse("TF32") is Precision.TF32 and Precision.TF32.dtype == torch.float32
    with pytest.raises(InputError, match="choose one of"):
        Precision.parse("fp8")


def test_auto_follows_the_preference_order_and_never_picks_unverified(monkeypatch):
    assert choose_backend("auto", "cpu") == "torch"
    assert PREFERENCE["cuda"][0] == "compile"

    def available(name, why=None):  # the registry entry with its prerequisites met (or not): no CUDA needed
        spec = BACKENDS[name]
        monkeypatch.setitem(BACKENDS, name, dataclasses.replace(spec, why_not=lambda d: why))

    available("compile")
    available("torch")
    # on a CUDA device compile comes first while it is available …
    assert choose_backend("auto", "cuda") == "compile"
    # … and torch when it is not
    available("compile", "no")
    assert choose_backend("auto", "cuda") == "torch"
    available("torch", "no either")
    with pytest.raises(BackendUnavailable, match="no backend can run on cuda: compile: no; torch: no either"):
        choose_backend("auto", "cuda")
    available("torch")
    # an unverified backend is never chosen by auto even when listed first and available
    available("tensorrt")
    assert not BACKENDS["tensorrt"].verified
    monkeypatch.setitem(PREFERENCE, "cuda", ("tensorrt", "compile", "torch"))
    assert choose_backend("auto", "cuda") == "torch"


@pytest.fixture(scope="module")
def lmdm():
    model = LMDM(LMDMConfig.from_name("lmdm-tiny"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    return model


def test_lmdm_chunks_of_several_streams_sample_in_one_call_with_their_own_seeds(core, lmdm):
    sampler = MotionSampler(lmdm, "ddpm", 4)  # DDPM draws noise at every step: per-stream generators matter
    known = [torch.randn(1, 1, 20, generator=torch.Generator().manual_seed(s)) for s in (5, 6)]
    alone = [sampler.sample_chunk(k, torch.Generator().manual_seed(10 + i)) for i, k in enumerate(known)]
    calls = []
    real = sampler.sample_chunk
    sampler.sample_chunk = lambda k, g=None: calls.append(k.shape[0]) or real(k, g)
    release = _hold(core.worker)
    futures = [core.sample_chunk(sampler, k, torch.Generator().manual_seed(10 + i)) for i, k in enumerate(known)]
    release.set()
    got = [f.result(timeout=60) for f in futures]
    assert calls == [2]
    for g, a in zip(got, alone, strict=True):
        assert g.shape == a.shape and torch.allclose(g, a, rtol=1e-4, atol=1e-4)


def test_sessions_sharing_a_core_stream_their_own_frames(animator, lmdm):
    sampler = MotionSampler(lmdm, "ddim", 3)
    images = [random_images(1, 32, seed=s) for s in (7, 8)]
    alone = []
    for i, im in enumerate(images):
        with Session(animator, backend="torch") as s:
            s.start(im)
            alone.append(torch.cat(list(s.stream(sampler, n_frames=20, batch=4, seed=i))))
    with FrameCore(animator, max_batch=8) as shared:
        sessions = [Session(shared) for _ in images]
        for s, im in zip(sessions, images, strict=True):
            s.start(im)
        out = [[] for _ in images]

        def run(i):
            out[i] = torch.cat(list(sessions[i].stream(sampler, n_frames=20, batch=4, seed=i)))

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        for s in sessions:
            s.close()
        assert not shared._closed  # a shared core outlives its sessions
    for got, want in zip(out, alone, strict=True):
        assert got.shape == want.shape == (20, 3, 32, 32)
        assert (got - want).abs().max() <= 1e-3 * want.abs().max()
