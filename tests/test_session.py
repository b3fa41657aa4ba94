"""Sessions and backends: parity of every CPU backend, streaming policies, bounded memory, auto."""

import gc
import threading
import time

import numpy as np
import pytest
import torch

from conftest import make_lia, random_images, rel_err
from leo_rt import Animator, load_animator
from leo_rt.backends import BackendUnavailable, backend_status, choose_backend
from leo_rt.errors import InputError
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
def test_every_cpu_backend_renders_the_reference_frames(backend, ckpt, sampler, exported, tmp_path, monkeypatch):
    if backend_status("cpu")[backend] is not None:
        pytest.skip(backend_status("cpu")[backend])
    monkeypatch.setenv("LEO_RT_CACHE", str(tmp_path / "cache"))
    engines = None
    if backend == "aoti":  # the packages exported once for the suite (onnxruntime exports into the cache itself)
        ckpt, engines = exported[0] / "anim.pt", exported[0] / "out"
    ref = load_animator(ckpt)
    session = Session(ckpt, backend=backend, engines=engines)
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

    def render(state, alpha, src_index=None):
        calls["render"] += 1
        return real(state, alpha) if src_index is None else real(state, alpha, src_index)

    session.backend.render = render
    return calls


def _codes(n_chunks, per_chunk=2):
    return [torch.full((per_chunk, 20), 0.05 * i) for i in range(n_chunks)]


def _wait_for(cond, what, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def _stream_threads():
    return [t for t in threading.enumerate() if t.name == "leo_rt-stream-codes"]


@pytest.fixture
def session():
    with Session(Animator(make_lia("lia-32-tiny", seed=1)), backend="torch") as s:
        s.start(random_images(1, 32))
        yield s
    assert not _stream_threads()


def test_blocking_policy_loses_nothing_and_bounds_the_queue(session):
    codes = _codes(12)
    want = [session.render(c) for c in codes]
    calls = _instrumented(session)
    got = []
    stream = session.stream(iter(codes), batch=2, queue_size=2, policy="block")
    got.append(next(stream))
    # the consumer stops reading: rendering runs ahead by exactly queue_size batches, then waits
    _wait_for(lambda: calls["render"] >= 1 + 2, "the renderer to fill the queue")
    time.sleep(0.2)
    assert calls["render"] == 1 + 2
    got.extend(stream)
    assert len(got) == 12 and session.dropped == 0
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))  # in order, none lost


def test_drop_oldest_policy_drops_the_oldest_and_keeps_order(session):
    codes = _codes(30, per_chunk=1)
    want = [session.render(c) for c in codes]
    stream = session.stream(iter(codes), batch=1, queue_size=3, policy="drop_oldest")
    first = next(stream)
    # the consumer stalls until every batch has been rendered and delivered: all but the newest three are dropped
    _wait_for(lambda: session.dropped == 30 - 1 - 3, "the drops")
    got = [first, *stream]
    assert torch.equal(got[0], want[0]) and len(got) == 4 and session.dropped == 26
    assert all(torch.equal(g, w) for g, w in zip(got[1:], want[-3:], strict=True))  # newest three, in order


def test_inline_mode_gives_the_same_frames_without_a_thread(session):
    codes = _codes(5, per_chunk=3)
    threaded = list(session.stream(iter(codes), batch=2))
    inline = []
    for frames in session.stream(iter(codes), batch=2, threaded=False):
        assert not _stream_threads()
        inline.append(frames)
    assert len(inline) == len(threaded) == 10
    assert all(torch.equal(a, b) for a, b in zip(inline, threaded, strict=True))


def test_no_thread_outlives_its_stream_on_any_exit_path(session):
    slow = threading.Event()

    def slow_codes():
        yield torch.zeros(2, 20)
        yield torch.zeros(2, 20)
        slow.wait(0.5)  # a slow producer (an LMDM chunk, a camera)
        yield torch.zeros(2, 20)

    # the consumer leaves after one batch while the producer is slow
    for _ in session.stream(slow_codes(), batch=2):
        break
    assert not _stream_threads()
    # the consumer keeps the generator without reading, then drops it
    stream = session.stream((torch.zeros(2, 20) for _ in range(100)), batch=2, queue_size=1)
    next(stream)
    del stream
    gc.collect()
    assert not _stream_threads()

    # the producer fails mid-way: the error reaches the consumer, and nothing is left running
    def failing():
        yield torch.zeros(2, 20)
        raise RuntimeError("camera unplugged")

    with pytest.raises(RuntimeError, match="camera unplugged"):
        list(session.stream(failing(), batch=2))
    assert not _stream_threads()
    # a wrong code width is a clear error, also after frames went out
    with pytest.raises(InputError, match=r"\(N, 20\)"):
        list(session.stream(iter([torch.zeros(2, 20), torch.zeros(2, 19)]), batch=2))
    # session.close ends a stream still held by the consumer
    stream = session.stream((torch.zeros(2, 20) for _ in range(100)), batch=2)
    next(stream)
    session.close()
    assert not _stream_threads()


def test_nonfinite_codes_are_refused_or_skipped_by_policy(session):
    codes = torch.zeros(6, 20)
    codes[4, 3] = float("nan")
    with pytest.raises(InputError, match="row 4"):
        list(session.stream([codes], batch=3))
    frames = torch.cat(list(session.stream([codes], batch=3, nonfinite="skip")))
    assert frames.shape[0] == 5 and session.skipped == 1 and torch.isfinite(frames).all()


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
    with pytest.raises(BackendUnavailable, match=r"'tensorrt' is not available on cpu: .*Available: .*torch"):
        choose_backend("tensorrt", "cpu")
    with pytest.raises(BackendUnavailable, match="unknown backend 'fast'"):
        Session(ckpt, backend="fast")
    with pytest.raises(ValueError, match="call session.start"):
        Session(ckpt, backend="torch").render(torch.zeros(1, 20))
    with pytest.raises(ValueError, match="policy must be one of"):
        s = Session(ckpt, backend="torch")
        s.start(random_images(1, 32))
        s.stream(iter(_codes(2)), policy="newest")


def test_a_precision_the_runner_does_not_compute_in_is_refused(ckpt):
    fp32 = Animator(make_lia("lia-32-tiny", seed=1))
    with pytest.raises(InputError, match=r"precision fp16 was asked for, but the runner computes in float32.*'fp32'"):
        Session(fp32, precision="fp16")
    with Session(fp32, precision="tf32") as s:  # TF32 stores fp32: only the math mode differs
        assert s.precision.value == "tf32"
    with Session(ckpt, backend="torch", precision="bf16") as s:  # a checkpoint is loaded in the precision asked for
        assert s.backend.dtype == torch.bfloat16 and s.precision.value == "bf16"
