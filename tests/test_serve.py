"""leo-rt serve: the HTTP API, its errors and limits, and the WebSocket stream (ASGI test client, tiny animator)."""

import io
import json
import threading
import time

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from starlette.testclient import WebSocketDenialResponse

from leo_rt import LMDM, Animator, LMDMConfig
from leo_rt.core import FrameCore, frames_to_uint8
from leo_rt.io import square_resize, to_model
from leo_rt.model import PRESETS
from leo_rt.serve import ServeConfig, create_app
from leo_rt.serve.app import HEADER

# the smallest animator preset: the tests exercise the server, not the network
PRESET = min(PRESETS, key=lambda name: (PRESETS[name].size, PRESETS[name].channel_cap))


@pytest.fixture(scope="module")
def animator():
    return Animator.random(PRESET, seed=3)


@pytest.fixture(scope="module")
def lmdm():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LMDM(LMDMConfig.from_name("lmdm-tiny")).eval()


@pytest.fixture
def core(animator):
    with FrameCore(animator, max_batch=16, max_wait_ms=1.0) as core:
        yield core


@pytest.fixture(autouse=True)
def no_thread_outlives_its_test():
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 10
    while (left := [t for t in threading.enumerate() if t not in before and t.is_alive()]) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.02)
    assert not left, f"threads left running: {[t.name for t in left]}"


def png(w: int = 48, h: int = 40, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def client_for(core, lmdm, **config) -> TestClient:
    return TestClient(create_app(core, lmdm=lmdm, config=ServeConfig(**config)))


def create(client, image: bytes | None = None, headers=None, **fields):
    files = {"image": ("face.png", image if image is not None else png(), "image/png")}
    return client.post("/v1/sessions", files=files, data={k: str(v) for k, v in fields.items()}, headers=headers)


def reason(response) -> str:
    body = response.json()
    assert set(body) == {"error"} and body["error"]["status"] == response.status_code, body
    return body["error"]["reason"]


def receive_frames(ws, n: int):
    """n binary frames: [(seq, render time, payload)], skipping JSON messages (returned apart)."""
    frames, texts = [], []
    while len(frames) < n:
        msg = ws.receive()
        if msg.get("bytes") is not None:
            seq, t = HEADER.unpack_from(msg["bytes"])
            frames.append((seq, t, msg["bytes"][HEADER.size :]))
        elif msg.get("text") is not None:
            texts.append(json.loads(msg["text"]))
        else:
            raise AssertionError(f"the stream ended early: {msg}")
    return frames, texts


def receive_text(ws) -> dict:
    while True:
        msg = ws.receive()
        if msg.get("text") is not None:
            return json.loads(msg["text"])
        assert msg.get("bytes") is not None, msg


def metric(client, line_start: str) -> float:
    client.portal.call(client.app.state.manager.drain_core)  # what housekeeping does every second
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.split()[-1])
    return 0.0


# --------------------------------------------------------------------------------------------------- HTTP API


def test_page_health_and_static(core, lmdm):
    with client_for(core, lmdm) as client:
        page = client.get("/")
        assert page.status_code == 200 and "<video" in page.text and "/static/app.js" in page.text
        js = client.get("/static/app.js")
        assert js.status_code == 200 and "requestVideoFrameCallback" in js.text and "framesDecoded" in js.text
        health = client.get("/healthz").json()
        assert health["status"] == "ok" and health["sessions"] == 0 and health["size"] == core.size
        assert "leo_rt_sessions 0.0" in client.get("/metrics").text


def test_session_lifecycle_and_unknown_sessions(core, lmdm):
    with client_for(core, lmdm) as client:
        r = create(client, motion="lmdm", sampler="dpm++", steps=3, seed=11, fps=12.5)
        assert r.status_code == 201, r.text
        s = r.json()
        assert r.headers["location"] == f"/v1/sessions/{s['id']}"
        assert (s["motion"], s["sampler"], s["steps"], s["seed"], s["fps"], s["size"]) == (
            "lmdm", "dpm++", 3, 11, 12.5, core.size)  # fmt: skip
        assert client.get(f"/v1/sessions/{s['id']}").json()["client"] is None
        assert client.get("/healthz").json()["sessions"] == 1
        assert client.delete(f"/v1/sessions/{s['id']}").status_code == 204
        assert client.get("/healthz").json()["sessions"] == 0
        for method, path in [
            ("get", ""),
            ("delete", ""),
            ("post", "/control"),
            ("post", "/webrtc"),
        ]:
            r = client.request(method, f"/v1/sessions/{s['id']}{path}", json={"type": "pause"})
            assert r.status_code == 404 and "POST /v1/sessions" in reason(r)
        stream = f"/v1/sessions/{s['id']}/stream"
        with pytest.raises(WebSocketDenialResponse) as denied, client.websocket_connect(stream):
            pass
        assert denied.value.status_code == 404
        assert client.get("/v1/nowhere").status_code == 404


@pytest.mark.parametrize(
    "case, status, words",
    [
        ("not multipart", 415, "multipart"),
        ("no image", 422, "image"),
        ("unknown field", 422, "unknown fields"),
        ("bad motion", 422, "motion"),
        ("bad sampler", 422, "sampler"),
        ("steps 0", 422, "steps"),
        ("fps too high", 422, "fps"),
        ("not a number", 422, "number"),
        ("not an image", 422, "PNG or JPEG"),
        ("too small", 422, "at least"),
        ("too many pixels", 413, "pixels"),
        ("too many bytes", 413, "larger than"),
    ],
)
def test_bad_requests_are_refused_with_a_reason(core, lmdm, case, status, words):
    with client_for(core, lmdm, max_pixels=100 * 100, max_upload_bytes=40_000, max_fps=30) as client:
        if case == "not multipart":
            r = client.post("/v1/sessions", json={"motion": "lmdm"})
        elif case == "no image":
            r = client.post("/v1/sessions", files={"other": ("x.txt", b"x")}, data={"motion": "lmdm"})
        else:
            image, fields = png(), {}
            if case == "unknown field":
                fields = {"sampeler": "ddim"}
            elif case == "bad motion":
                fields = {"motion": "dance"}
            elif case == "bad sampler":
                fields = {"sampler": "euler"}
            elif case == "steps 0":
                fields = {"steps": 0}
            elif case == "fps too high":
                fields = {"fps": 31}
            elif case == "not a number":
                fields = {"seed": "seven"}
            elif case == "not an image":
                image = b"GIF89a this is not an image at all"
            elif case == "too small":
                image = png(8, 8)
            elif case == "too many pixels":
                image = png(101, 100)
            elif case == "too many bytes":
                image = png(100, 100) + bytes(60_000)
            r = create(client, image, **fields)
        assert r.status_code == status, r.text
        assert words in reason(r)
        assert client.get("/healthz").json()["sessions"] == 0


def test_a_full_server_answers_429_with_retry_after(core, lmdm):
    with client_for(core, lmdm, max_sessions=2, retry_after_s=7) as client:
        ids = [create(client).json()["id"] for _ in range(2)]
        r = create(client)
        assert r.status_code == 429 and r.headers["retry-after"] == "7" and "full" in reason(r)
        client.delete(f"/v1/sessions/{ids[0]}")
        assert create(client).status_code == 201
        assert metric(client, 'leo_rt_sessions_refused_total{status="429"}') == 1


def test_bearer_token(core, lmdm):
    with client_for(core, lmdm, token="s3cret") as client:
        for headers in (None, {"Authorization": "Bearer nope"}, {"Authorization": "s3cret"}):
            r = create(client, headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer" and "token" in reason(r)
        assert client.get("/metrics").status_code == 401
        assert client.get("/healthz").status_code == 200 and client.get("/").status_code == 200
        good = {"Authorization": "Bearer s3cret"}
        sid = create(client, headers=good).json()["id"]
        assert client.get(f"/v1/sessions/{sid}").status_code == 401
        assert client.get(f"/v1/sessions/{sid}", headers=good).status_code == 200
        with pytest.raises(WebSocketDenialResponse) as denied, client.websocket_connect(f"/v1/sessions/{sid}/stream"):
            pass
        assert denied.value.status_code == 401
        with client.websocket_connect(f"/v1/sessions/{sid}/stream?token=s3cret") as ws:  # browsers: no WS headers
            assert receive_text(ws)["type"] == "hello"
            ws.send_text(json.dumps({"type": "stop"}))


def test_cors_is_off_by_default_and_on_for_named_origins(core, lmdm):
    preflight = {"Origin": "http://example.org", "Access-Control-Request-Method": "POST"}
    with client_for(core, lmdm) as client:
        assert (
            "access-control-allow-origin"
            not in client.get("/healthz", headers={"Origin": "http://example.org"}).headers
        )
        assert "access-control-allow-origin" not in client.options("/v1/sessions", headers=preflight).headers
    with client_for(core, lmdm, cors_origins=("http://example.org",)) as client:
        r = client.options("/v1/sessions", headers=preflight)
        assert r.headers["access-control-allow-origin"] == "http://example.org"
        r = client.options("/v1/sessions", headers={**preflight, "Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in r.headers


def test_idle_sessions_are_closed(core, lmdm):
    with client_for(core, lmdm, idle_timeout_s=30) as client:
        manager = client.app.state.manager
        idle, fresh = (create(client).json()["id"] for _ in range(2))
        manager.get(idle).last_active -= 31  # as if 31 s had passed without a client
        client.portal.call(manager.sweep)
        assert client.get(f"/v1/sessions/{idle}").status_code == 404
        assert client.get(f"/v1/sessions/{fresh}").status_code == 200
        assert metric(client, 'leo_rt_sessions_closed_total{reason="idle"}') == 1


# -------------------------------------------------------------------------------------------------- WebSocket


def test_websocket_streams_numbered_jpeg_frames_then_stops(core, lmdm):
    n = 12
    with client_for(core, lmdm, max_fps=500) as client:
        sid = create(client, steps=2, seed=1, fps=200).json()["id"]
        with client.websocket_connect(f"/v1/sessions/{sid}/stream") as ws:
            hello = receive_text(ws)
            assert hello["type"] == "hello" and hello["id"] == sid and hello["format"] == "jpeg"
            frames, _ = receive_frames(ws, n)
            seqs = [f[0] for f in frames]
            assert seqs == sorted(seqs) and len(set(seqs)) == n and seqs[0] >= 1
            assert all(0 < t <= time.time() for _, t, _ in frames)
            for _, _, jpeg in frames[:3]:
                with Image.open(io.BytesIO(jpeg)) as im:
                    assert (im.format, im.size, im.mode) == ("JPEG", (core.size, core.size), "RGB")
            info = client.get(f"/v1/sessions/{sid}").json()
            assert info["client"] == "websocket" and info["frames_sent"] >= n
            # a second client is refused while the first is attached
            with pytest.raises(WebSocketDenialResponse) as busy, client.websocket_connect(f"/v1/sessions/{sid}/stream"):
                pass
            assert busy.value.status_code == 409
            ws.send_text(json.dumps({"type": "stop"}))
            while ws.receive()["type"] != "websocket.close":
                pass
        assert client.get(f"/v1/sessions/{sid}").status_code == 404
        assert metric(client, 'leo_rt_frames_sent_total{transport="websocket"}') >= n
        assert metric(client, 'leo_rt_sessions_closed_total{reason="stopped"}') == 1
        assert metric(client, "leo_rt_frames_rendered_total") >= n


def test_websocket_controls_and_their_errors(core, lmdm):
    with client_for(core, lmdm, max_fps=500, send_queue=2) as client:
        sid = create(client, steps=2, seed=1, fps=100).json()["id"]
        with client.websocket_connect(f"/v1/sessions/{sid}/stream?format=raw") as ws:
            receive_text(ws)
            receive_frames(ws, 2)
            for bad, words in [
                ("not json", "not JSON"),
                (json.dumps({"type": "dance"}), "unknown control"),
                (json.dumps({"type": "seed", "seed": -1}), "seed"),
                (json.dumps({"type": "recenter"}), "drive sessions"),
            ]:
                ws.send_text(bad)
                msg = receive_text(ws)
                assert msg["type"] == "error" and words in msg["reason"], msg
            ws.send_bytes(png())  # a driving frame sent to an LMDM session
            msg = receive_text(ws)
            assert msg["type"] == "error" and "motion=drive" in msg["reason"]

            ws.send_text(json.dumps({"type": "pause"}))
            assert receive_text(ws) == {"type": "ok", "control": "pause"}
            assert client.get(f"/v1/sessions/{sid}").json()["paused"] is True
            sent = client.get(f"/v1/sessions/{sid}").json()["frames_sent"]
            time.sleep(0.3)  # 30 frame periods: a paused session sends at most what was already on its way
            assert client.get(f"/v1/sessions/{sid}").json()["frames_sent"] <= sent + 3
            ws.send_text(json.dumps({"type": "seed", "seed": 99}))
            ws.send_text(json.dumps({"type": "resume"}))
            receive_frames(ws, 3)
            info = client.get(f"/v1/sessions/{sid}").json()
            assert info["seed"] == 99 and info["paused"] is False
            r = client.post(f"/v1/sessions/{sid}/control", json={"type": "seed", "seed": "x"})
            assert r.status_code == 422 and "seed" in reason(r)
            assert client.post(f"/v1/sessions/{sid}/control", json={"type": "stop"}).json()["closed"] is True
        assert client.get(f"/v1/sessions/{sid}").status_code == 404


def test_a_vanished_websocket_client_frees_its_session(core, lmdm):
    with client_for(core, lmdm, max_fps=500) as client:
        sid = create(client, steps=2, fps=100).json()["id"]
        with client.websocket_connect(f"/v1/sessions/{sid}/stream") as ws:
            receive_frames(ws, 2)
            ws.close(1001)  # the connection went away (1001: going away), without stop or DELETE
            deadline = time.monotonic() + 10
            while client.get(f"/v1/sessions/{sid}").status_code != 404 and time.monotonic() < deadline:
                time.sleep(0.02)
        assert client.get(f"/v1/sessions/{sid}").status_code == 404
        assert metric(client, 'leo_rt_sessions_closed_total{reason="client_gone"}') == 1


def _reference_uint8(frames: torch.Tensor) -> np.ndarray:
    return frames_to_uint8(frames)


@pytest.mark.parametrize("relative", [True, False])
def test_websocket_drive_renders_the_motion_of_the_latest_frame(core, lmdm, animator, relative):
    size = core.size
    source, driving = png(60, 50, seed=1), [png(40, 40, seed=s) for s in (7, 8)]
    with client_for(core, lmdm, max_fps=500) as client:
        r = create(client, source, motion="drive", relative=str(relative).lower(), fps=100)
        sid = r.json()["id"]
        assert r.json()["relative"] is relative
        with client.websocket_connect(f"/v1/sessions/{sid}/stream?format=raw") as ws:
            receive_text(ws)
            ws.send_bytes(driving[0])
            (first,), _ = receive_frames(ws, 1)
            ws.send_bytes(driving[1])
            (second,), _ = receive_frames(ws, 1)
            info = client.get(f"/v1/sessions/{sid}").json()
            assert info["driving"]["received"] == 2 and info["driving"]["bad"] == 0
            ws.send_bytes(b"not an image")
            ws.send_text(json.dumps({"type": "stop"}))
    got = [np.frombuffer(f[2], np.uint8).reshape(size, size, 3) for f in (first, second)]

    # the same computation by the animator itself: source encoded once, each driving frame's code
    def model_input(data):
        with Image.open(io.BytesIO(data)) as im:
            return to_model(square_resize(np.asarray(im.convert("RGB")), size))

    state = animator.encode_source(model_input(source))
    codes = animator.encode_motion(torch.cat([model_input(d) for d in driving]))
    if relative:
        codes = animator.relative_alpha(state, codes, codes[:1])
    want = _reference_uint8(animator.render(state, codes))
    for g, w in zip(got, want, strict=True):
        # one quantisation step: the float frames differ only by batching order (see test_serve_stream.py)
        assert np.abs(g.astype(int) - w.astype(int)).max() <= 1
    assert np.abs(want[0].astype(int) - want[1].astype(int)).max() > 1  # the motion did change the frame


# ------------------------------------------------------------------------------------------------ the command


def test_the_serve_command_announces_random_weights_and_listens_on_loopback():
    import queue
    import re
    import signal
    import subprocess
    import sys

    import httpx

    cmd = [sys.executable, "-m", "leo_rt.serve", "--preset", PRESET, "--device", "cpu", "--port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], name="serve-output")
    reader.start()
    out, url = [], None
    try:
        while url is None:
            line = lines.get(timeout=120)
            out.append(line)
            if m := re.search(r"leo-rt serve: (http://127\.0\.0\.1:\d+)/ ", line):
                url = m.group(1)
        text = "".join(out)
        assert "RANDOM WEIGHTS" in text and "UNTRAINED LMDM" in text, text
        deadline = time.monotonic() + 60
        while True:
            try:
                health = httpx.get(f"{url}/healthz").json()
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "".join(out)
                time.sleep(0.1)
        assert health["weights"] == "random" and health["auth"] is False
        r = httpx.post(f"{url}/v1/sessions", files={"image": ("face.png", png(), "image/png")}, data={"steps": "2"})
        assert r.status_code == 201, r.text
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C: sessions closed, the process exits cleanly
        rc = proc.wait(timeout=60)
        reader.join()
        proc.stdout.close()
    while not lines.empty():
        out.append(lines.get())
    assert rc == 0, "".join(out)
