"""leo-rt serve's page in a real browser: headless Chromium (Debian's `chromium`, driven by Playwright) loads /,
uploads the shared portrait and receives the avatar over WebRTC — from LMDM, and driven by a synthetic camera
made from the shared driving video. Screenshots go to test-artifacts/serve/ (or $LEO_RT_TEST_ARTIFACTS)."""

import os
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from test_serve import PRESET, no_thread_outlives_its_test  # noqa: F401

from conftest import SHARED
from leo_rt import LMDM, Animator, LMDMConfig
from leo_rt.core import FrameCore
from leo_rt.serve import ServeConfig, create_app
from leo_rt.serve.app import serve_in_thread

CHROMIUM = os.environ.get("LEO_RT_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("LEO_RT_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))
# Loopback WebRTC in headless Chromium: real host candidates (mDNS names do not resolve on a closed network),
# no sandbox (CI runs as root), nothing that phones home.
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-features=WebRtcHideLocalIpsWithMdns",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--autoplay-policy=no-user-gesture-required",
]
FRAMES = 30  # decoded by the browser, not merely sent by the server


def unavailable(why: str):
    """Skip a real-component test with a reason; under CI a skip of this kind is a failure."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true: {why}")
    pytest.skip(why)


@pytest.fixture
def chromium(tmp_path):
    """A persistent context on a fresh profile directory (yields launch(extra_args) -> context)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("playwright is not installed: pip install 'leo_rt[browser]'")
    if not Path(CHROMIUM).is_file():
        unavailable(f"no Chromium at {CHROMIUM}: apt-get install -y chromium (or set LEO_RT_CHROMIUM)")
    with sync_playwright() as p:
        contexts = []

        def launch(*extra: str, **kw):
            ctx = p.chromium.launch_persistent_context(
                str(tmp_path / f"profile{len(contexts)}"),
                executable_path=CHROMIUM,
                headless=True,
                args=[*FLAGS, *extra],
                **kw,
            )
            contexts.append(ctx)
            return ctx

        try:
            yield launch
        finally:
            for ctx in contexts:
                ctx.close()


@pytest.fixture
def portrait() -> Path:
    path = SHARED / "vox" / "mona_lisa.png"
    if not path.is_file():
        unavailable(f"the shared portrait is not at {path}")
    return path


@pytest.fixture
def server():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        lmdm = LMDM(LMDMConfig.from_name("lmdm-tiny")).eval()
    with FrameCore(Animator.random(PRESET, seed=3), max_batch=16, max_wait_ms=1.0) as core:
        with serve_in_thread(create_app(core, lmdm=lmdm, config=ServeConfig(max_sessions=2))) as url:
            yield url


def play(page, url: str, portrait: Path, motion: str) -> dict:
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url + "/")
    page.set_input_files("#photo", str(portrait))
    page.check(f"input[name=motion][value={motion}]")
    if motion == "lmdm":
        page.fill("#steps", "2")
    page.click("#start")
    page.wait_for_function(f"window.leo.framesDecoded >= {FRAMES} || window.leo.error !== null", timeout=90_000)
    page.wait_for_function("window.leo.fps > 0 && window.leo.latencyMs !== null", timeout=30_000)
    leo = page.evaluate("window.leo")
    assert leo["error"] is None and not errors, (leo, errors)
    return leo


def screenshot(page, name: str) -> Path:
    ARTIFACTS.joinpath("serve").mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / "serve" / name
    page.screenshot(path=str(path))
    print(f"screenshot: {path}")
    return path


def stop(page, url: str) -> None:
    page.click("#stop")
    page.wait_for_function("window.leo.state === 'idle'")
    assert httpx.get(f"{url}/healthz").json()["sessions"] == 0


def test_the_page_plays_an_lmdm_avatar_in_chromium(chromium, portrait, server):
    page = chromium().new_page()
    leo = play(page, server, portrait, "lmdm")
    assert leo["framesDecoded"] >= FRAMES and leo["state"] == "connected"
    shown_fps = float(page.inner_text("#fps-value"))
    assert shown_fps > 0 and float(page.inner_text("#latency")) > 0
    info = httpx.get(f"{server}/v1/sessions/{leo['sessionId']}").json()
    assert info["client"] == "webrtc" and info["frames_sent"] >= FRAMES
    assert screenshot(page, "page_lmdm.png").stat().st_size > 0
    stop(page, server)


def write_y4m(path: Path, frames: list[np.ndarray], fps: int = 25) -> Path:
    """uint8 (H, W, 3) frames → a 4:2:0 YUV4MPEG2 file, the format of Chromium's fake camera."""
    h, w = frames[0].shape[:2]
    with open(path, "wb") as f:
        f.write(f"YUV4MPEG2 W{w} H{h} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
        for frame in frames:
            ycc = np.asarray(Image.fromarray(frame).convert("YCbCr"), dtype=np.float32)
            chroma = [ycc[..., c].reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3)) for c in (1, 2)]
            f.write(b"FRAME\n" + ycc[..., 0].astype(np.uint8).tobytes())
            for plane in chroma:
                f.write(np.round(plane).astype(np.uint8).tobytes())
    return path


def test_the_page_drives_the_avatar_with_a_camera_in_chromium(chromium, portrait, server, tmp_path):
    from leo_rt.io import iter_video

    video = SHARED / "vox" / "driving1.mp4"
    if not video.is_file():
        unavailable(f"the shared driving video is not at {video}")
    frames = [np.asarray(Image.fromarray(f).resize((160, 120))) for f in iter_video(video, max_frames=50)]
    camera = write_y4m(tmp_path / "camera.y4m", frames)
    ctx = chromium(
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-video-capture={camera}",
        permissions=["camera"],
    )
    page = ctx.new_page()
    leo = play(page, server, portrait, "drive")
    info = httpx.get(f"{server}/v1/sessions/{leo['sessionId']}").json()
    assert info["motion"] == "drive" and info["driving"]["received"] >= FRAMES and info["driving"]["bad"] == 0
    assert screenshot(page, "page_drive.png").stat().st_size > 0
    stop(page, server)
