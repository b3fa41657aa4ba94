"""leo-rt serve: sessions batched on one frame core — equal to the frames each renders alone, fair, and a lagging
client drops only its own frames."""

import asyncio
import copy
import io
import json
import threading

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from test_serve import PRESET, create, no_thread_outlives_its_test, png, receive_frames, receive_text  # noqa: F401

from conftest import make_lia, random_images, rel_err
from leo_rt import LMDM, Animator, LMDMConfig, MotionSampler, Session
from leo_rt.core import FrameCore
from leo_rt.io import to_model
from leo_rt.serve import ServeConfig, create_app
from leo_rt.serve.live import DriveSource, FrameChannel, LiveSession, SessionOptions


@pytest.fixture(scope="module")
def lia():
    return make_lia(PRESET, seed=5)


@pytest.fixture(scope="module")
def lmdm():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return LMDM(LMDMConfig.from_name("lmdm-tiny")).eval()


def gated(core: FrameCore) -> threading.Event:
    """Hold the core's device worker until the returned event is set, so that requests queue up meanwhile."""
    gate = threading.Event()
    core.worker.submit(gate.wait)
    return gate


def test_batched_sessions_render_the_frames_each_renders_alone(lia):
    k, n = 3, 2
    a32 = Animator(lia)
    images = random_images(k, a32.size, seed=2)
    g = torch.Generator().manual_seed(3)
    codes = [0.5 * torch.randn(n, a32.config.motion_dim, generator=g) for _ in range(k)]
    with FrameCore(a32, max_batch=64) as core:
        sessions = [Session(core) for _ in range(k)]
        for s, image in zip(sessions, images, strict=True):
            s.start(image[None])
        alone = [s.render(c) for s, c in zip(sessions, codes, strict=True)]  # one source per call
        core.batch_sizes.clear()
        gate = gated(core)
        futures = [core.render(s.handle, c) for s, c in zip(sessions, codes, strict=True)]
        gate.set()
        batched = [f.result() for f in futures]
        assert core.batch_sizes == [k * n]  # all sessions' frames in one multi-source call
        for s in sessions:
            s.close()
    # the reference: the published network in float64, all sources in one call
    lia64, idx = copy.deepcopy(lia).double(), torch.arange(k).repeat_interleave(n)
    with torch.no_grad():
        w_a, feats = lia64.encode_app(images.double())
        ref = lia64.decode(w_a[idx], torch.cat(codes).double(), [f[idx] for f in feats]).split(n)
    for i in range(k):
        e_alone, e_batched = rel_err(alone[i], ref[i]), rel_err(batched[i], ref[i])
        assert e_batched <= max(2 * e_alone, 1e-5), (i, e_batched, e_alone)


def test_a_session_flooding_the_core_does_not_delay_another(lia):
    """Source B queued its one request after five of source A's: it is rendered in the first call all the same
    (a batch takes one request per source, oldest first)."""
    with FrameCore(Animator(lia), max_batch=8) as core:
        a, b = Session(core), Session(core)
        a.start(random_images(1, core.size, seed=1))
        b.start(random_images(1, core.size, seed=2))
        codes = torch.zeros(2, core.motion_dim)
        done: list[str] = []
        gate = gated(core)
        fa = [core.render(a.handle, codes) for _ in range(5)]
        fb = core.render(b.handle, codes)
        for name, fs in (("a", fa), ("b", [fb])):
            for f in fs:
                f.add_done_callback(lambda _, name=name: done.append(name))
        gate.set()
        for f in [*fa, fb]:
            f.result()
        assert core.batch_sizes == [4, 2, 2, 2, 2]  # A1 + B, then A's others one by one (one per source)
        assert done[:2] == ["a", "b"]
        a.close()
        b.close()


def test_a_lagging_client_drops_only_its_own_frames(lia, lmdm):
    want = 24

    async def run(core):
        loop = asyncio.get_running_loop()
        lives, channels = [], []
        for i in range(3):
            session = Session(core)
            session.start(random_images(1, core.size, seed=10 + i))
            options = SessionOptions(motion="lmdm", steps=2, seed=i, fps=50)
            lives.append(LiveSession(f"s{i}", session, options, sampler=MotionSampler(lmdm, "ddim", 2), batch=2))
            channels.append(FrameChannel(loop, capacity=4 if i < 2 else 2))
        for live, channel in zip(lives, channels, strict=True):
            live.start(channel)

        async def read(channel):  # clients 0 and 1 keep up; client 2 never reads
            seqs = []
            while len(seqs) < want:
                seqs.append((await channel.get()).seq)
            return seqs

        try:
            seqs = await asyncio.wait_for(asyncio.gather(read(channels[0]), read(channels[1])), 120)
        finally:
            await asyncio.gather(*(asyncio.to_thread(live.close) for live in lives))
        return lives, channels, seqs

    with FrameCore(Animator(lia), max_batch=16) as core:
        lives, channels, seqs = asyncio.run(run(core))
    for s in seqs:
        assert s == list(range(1, want + 1))  # nothing lost for the clients that keep up
    assert channels[0].dropped == channels[1].dropped == 0
    assert channels[2].dropped > 0
    assert channels[2].dropped == lives[2].frames_out - 2  # it kept its newest 2 and lost the rest
    assert lives[2].frames_out >= want // 2  # and its session was served like the others meanwhile


def test_frame_channel_keeps_the_newest_frames():
    async def run():
        dropped = []
        channel = FrameChannel(asyncio.get_running_loop(), capacity=2, on_drop=lambda: dropped.append(1))
        for seq in range(1, 6):
            channel.put(np.zeros((2, 2, 3), np.uint8), seq, 0.0)
        channel.end()
        await asyncio.sleep(0)
        got = []
        while (item := await channel.get()) is not None:
            got.append(item.seq)
        return got, channel.dropped, len(dropped)

    assert asyncio.run(run()) == ([4, 5], 3, 3)


def test_drive_source_encodes_only_the_latest_frame(lia):
    with FrameCore(Animator(lia)) as core, Session(core) as session:
        session.start(random_images(1, core.size, seed=1))
        drive = DriveSource(session, relative=False)
        rng = np.random.default_rng(0)
        frames = [rng.integers(0, 256, (core.size, core.size, 3), dtype=np.uint8) for _ in range(3)]
        for f in frames:
            drive.offer(f)
        codes = iter(drive)
        alpha = next(codes)
        assert (drive.received, drive.skipped) == (3, 2)
        torch.testing.assert_close(alpha, session.encode_motion(to_model(frames[2])), rtol=0, atol=0)
        waiting = threading.Thread(target=lambda: next(codes, None))  # waits for a frame that never comes
        waiting.start()
        drive.close()
        waiting.join(timeout=10)
        assert not waiting.is_alive()


def test_lmdm_sessions_served_together_get_the_frames_they_would_get_alone(lia, lmdm):
    """Three LMDM sessions on one server (two with the same sampler settings, so their chunks are sampled in one
    batched call), each with its own seed: each receives the frames a lone Session renders with its settings."""
    n = 10
    settings = [("ddim", 2, 3), ("ddim", 2, 4), ("dpm++", 3, 5)]
    images = [png(40, 40, seed=20 + i) for i in range(3)]
    with FrameCore(Animator(lia), max_batch=32, max_wait_ms=2.0) as core:
        app = create_app(core, lmdm=lmdm, config=ServeConfig(max_fps=1000, send_queue=64))
        with TestClient(app) as client:
            ids = [
                create(client, image, sampler=s, steps=st, seed=seed, fps=100).json()["id"]
                for image, (s, st, seed) in zip(images, settings, strict=True)
            ]
            sockets = [client.websocket_connect(f"/v1/sessions/{sid}/stream?format=raw") for sid in ids]
            got = []
            for ws in sockets:
                ws.__enter__()
                receive_text(ws)
            for ws in sockets:
                frames, _ = receive_frames(ws, n)
                assert [f[0] for f in frames] == list(range(1, n + 1))
                got.append(np.stack([np.frombuffer(f[2], np.uint8).reshape(core.size, core.size, 3) for f in frames]))
                ws.send_text(json.dumps({"type": "stop"}))
            for ws in sockets:
                ws.__exit__(None, None, None)
            batches = list(core.batch_sizes)
    assert max(batches) > 2  # frames of several sessions did share render calls

    for image, (sampler, steps, seed), frames in zip(images, settings, got, strict=True):
        with FrameCore(Animator(lia)) as alone, Session(alone) as session:
            session.start(np.asarray(Image.open(io.BytesIO(image)).convert("RGB")))
            stream = session.stream(MotionSampler(lmdm, sampler, steps), n_frames=n, batch=4, seed=seed, output="uint8")
            want = np.concatenate(list(stream))
        assert np.abs(frames.astype(int) - want.astype(int)).max() <= 1, (sampler, steps, seed)
