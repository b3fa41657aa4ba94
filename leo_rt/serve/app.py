"""The HTTP/WebSocket API of `leo-rt serve` (FastAPI on uvicorn), and the functions the CLI calls.

    POST   /v1/sessions                 multipart: image + options → 201 {id, …}; the source is encoded here, once
    GET    /v1/sessions/{id}            the session's options and live counters
    DELETE /v1/sessions/{id}            close it → 204
    POST   /v1/sessions/{id}/control    {"type": "pause" | "resume" | "seed" (+ "seed") | "recenter" | "stop"}
    POST   /v1/sessions/{id}/webrtc     {"sdp", "type": "offer"} → {"sdp", "type": "answer"}
    WS     /v1/sessions/{id}/stream     binary frames out (HEADER + JPEG or raw RGB), driving images and JSON in
    GET    /healthz, /metrics (Prometheus), / (the page)

Errors are JSON, {"error": {"status": 404, "reason": "…"}}. With a token set, /v1 and /metrics need
`Authorization: Bearer TOKEN` (a WebSocket may pass `?token=` instead, as browsers cannot set its headers).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import secrets
import struct
import tempfile
from importlib import resources

import numpy as np
from fastapi import FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from ..core import FrameCore
from ..errors import InputError, LeoError, MediaError
from ..lmdm import LMDM
from .command import add_serve_arguments, bind, config_from_args, run_server, serve_in_thread  # noqa: F401
from .config import ServeConfig
from .engine import Engine
from .live import MOTIONS, FrameChannel, LiveSession, SessionOptions, encode_jpeg, encode_raw
from .metrics import ServeMetrics
from .sessions import ApiError, SessionManager

# Each binary WebSocket message from the server: this header, then the frame (JPEG, or raw RGB S×S×3 bytes).
HEADER = struct.Struct("<Qd")  # sequence number (uint64, 1, 2, …), render time (float64, Unix seconds)
FORM_FIELDS = {"image", "motion", "sampler", "steps", "seed", "fps", "relative"}
CONTROLS = ("pause", "resume", "seed", "recenter", "stop")


def create_app(
    core: FrameCore | Engine | SessionManager,
    *,
    lmdm: LMDM | None = None,
    config: ServeConfig | None = None,
    owns_engine: bool = False,
    log=None,
    title: str = "leo_rt serve",
):
    """The FastAPI app serving sessions on an existing frame core (or an Engine). The core is the caller's to
    close unless `owns_engine`; every session, stream and peer connection is closed when the app shuts down.
    `core` may instead be a session manager, which brings its engine, config and metrics: the Ray ingress passes
    one whose sessions live in the cluster (leo_rt.serve.remote)."""
    if isinstance(core, SessionManager):
        manager = core
    else:
        engine = core if isinstance(core, Engine) else Engine(core, lmdm, log=log)
        manager = SessionManager(engine, config or ServeConfig(), ServeMetrics())
    engine, cfg, metrics = manager.engine, manager.config, manager.metrics

    @contextlib.asynccontextmanager
    async def lifespan(app):
        task = asyncio.create_task(manager.housekeeping())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await manager.shutdown()
            if owns_engine:
                engine.close()

    app = FastAPI(title=title, version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine, app.state.manager, app.state.metrics, app.state.config = engine, manager, metrics, cfg
    if cfg.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cfg.cors_origins),
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
        )

    # ------------------------------------------------------------------------------------------------ errors
    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return error_response(e)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        return error_response(ApiError(e.status_code, str(e.detail), dict(e.headers or {})))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e: RequestValidationError):
        parts = [f"{'.'.join(str(x) for x in err.get('loc', ()))}: {err.get('msg')}" for err in e.errors()]
        return error_response(ApiError(422, "invalid request: " + "; ".join(parts)))

    def authorize(conn, allow_query: bool = False) -> None:
        if cfg.token is None:
            return
        header = conn.headers.get("authorization", "")
        given = header[7:].strip() if header[:7].lower() == "bearer " else None
        if given is None and allow_query:
            given = conn.query_params.get("token")
        if given is None or not secrets.compare_digest(given.encode(), cfg.token.encode()):
            raise ApiError(401, "missing or wrong bearer token; send 'Authorization: Bearer TOKEN'",
                           {"WWW-Authenticate": "Bearer"})  # fmt: skip

    # -------------------------------------------------------------------------------------------- page, health
    @app.get("/", include_in_schema=False)
    async def page():
        return HTMLResponse((resources.files("leo_rt.serve") / "static" / "index.html").read_text())

    app.mount("/static", StaticFiles(directory=str(resources.files("leo_rt.serve") / "static")), name="static")

    @app.get("/healthz")
    async def healthz():
        return await manager.health()

    @app.get("/metrics")
    async def prometheus(request: Request):
        authorize(request)
        return Response(await manager.metrics_text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    # ------------------------------------------------------------------------------------------------ sessions
    @app.post("/v1/sessions", status_code=201)
    async def create_session(request: Request):
        authorize(request)
        try:
            data, options = await read_session_form(request, cfg)
            image = await asyncio.to_thread(decode_source, data, cfg)
        except ApiError as e:
            metrics.sessions_refused.labels(str(e.status)).inc()
            raise
        live = await manager.create(image, options)
        links = {
            "self": f"/v1/sessions/{live.id}",
            "webrtc": f"/v1/sessions/{live.id}/webrtc",
            "stream": f"/v1/sessions/{live.id}/stream",
        }
        body = {**live.info(), "links": links, **manager.labels}
        return JSONResponse(body, status_code=201, headers={"Location": links["self"]})

    @app.get("/v1/sessions/{sid}")
    async def session_info(sid: str, request: Request):
        authorize(request)
        live = await manager.lookup(sid)
        return {**await manager.session_info(live), **manager.labels}

    @app.delete("/v1/sessions/{sid}", status_code=204)
    async def delete_session(sid: str, request: Request):
        authorize(request)
        await manager.lookup(sid)
        await manager.close(sid, "deleted")
        return Response(status_code=204)

    @app.post("/v1/sessions/{sid}/control")
    async def control(sid: str, request: Request):
        authorize(request)
        live = await manager.lookup(sid)
        cmd = await read_json(request)
        if apply_control(live, cmd) == "stop":
            await manager.close(sid, "stopped")
            return {"id": sid, "closed": True}
        return live.info()

    @app.post("/v1/sessions/{sid}/webrtc")
    async def webrtc(sid: str, request: Request):
        from .webrtc import answer

        authorize(request)
        live = await manager.lookup(sid)
        offer = await read_json(request)
        if not isinstance(offer.get("sdp"), str) or offer.get("type") != "offer":
            raise ApiError(422, 'send the SDP offer as {"sdp": "...", "type": "offer"}')
        manager.claim(live, "webrtc")
        try:
            return await answer(manager, live, offer["sdp"], "offer", cfg.ice_servers)
        except BaseException:
            await manager.close(sid, "error")
            raise

    @app.websocket("/v1/sessions/{sid}/stream")
    async def stream(ws: WebSocket, sid: str):
        fmt = ws.query_params.get("format", "jpeg")
        try:
            authorize(ws, allow_query=True)
            if fmt not in ("jpeg", "raw"):
                raise ApiError(422, f"format must be jpeg or raw, got {fmt!r}")
            live = await manager.lookup(sid)
            manager.claim(live, "websocket")
        except ApiError as e:
            await deny(ws, e)
            return
        await ws.accept()
        await serve_websocket(ws, live, fmt, manager)

    return app


# ---------------------------------------------------------------------------------------------- requests


def error_response(e: ApiError):
    return JSONResponse({"error": {"status": e.status, "reason": e.reason}}, status_code=e.status, headers=e.headers)


async def deny(ws, e: ApiError) -> None:
    """Refuse a WebSocket before accepting it: an HTTP error response where the server supports it."""
    if "websocket.http.response" in ws.scope.get("extensions", {}):
        await ws.send_denial_response(error_response(e))
    else:
        await ws.close(code=4000 + e.status, reason=e.reason[:120])


async def read_json(request) -> dict:
    body = await request.body()
    if len(body) > 256 * 1024:
        raise ApiError(413, f"JSON body of {len(body)} bytes; the limit is 262144")
    try:
        obj = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(422, f"the body is not JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ApiError(422, "the body must be a JSON object")
    return obj


async def read_session_form(request, cfg: ServeConfig) -> tuple[bytes, SessionOptions]:
    """The uploaded image bytes and the options, reading at most the upload limit (413 beyond it)."""
    from starlette.datastructures import UploadFile

    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ApiError(415, "send the source as multipart/form-data with the photo in the field 'image'")
    limit = cfg.max_upload_bytes + 64 * 1024  # the multipart framing and the option fields
    declared = request.headers.get("content-length", "")
    too_big = f"upload larger than {cfg.max_upload_bytes} bytes; send a smaller image"
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, too_big)
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit:
            raise ApiError(413, too_big)
        chunks.append(chunk)
    body = b"".join(chunks)

    async def replay():
        return {"type": "http.request", "body": body, "more_body": False}

    form = await Request(request.scope, replay).form(max_files=1, max_fields=len(FORM_FIELDS))
    try:
        unknown = set(form.keys()) - FORM_FIELDS
        if unknown:
            raise ApiError(422, f"unknown fields {sorted(unknown)}; known: {sorted(FORM_FIELDS)}")
        upload = form.get("image")
        if not isinstance(upload, UploadFile):
            raise ApiError(422, "no image: send the photo as the file field 'image'")
        data = await upload.read()
        if len(data) > cfg.max_upload_bytes:
            raise ApiError(413, too_big)
        options = parse_options({k: v for k, v in form.items() if k != "image"}, cfg)
    finally:
        await form.close()
    return data, options


def parse_options(fields: dict, cfg: ServeConfig) -> SessionOptions:
    from ..schedulers import SAMPLERS

    def number(name, kind, default, lo, hi):
        raw = fields.get(name)
        if raw is None or raw == "":
            return default
        try:
            value = kind(raw)
        except ValueError:
            raise ApiError(422, f"{name} must be a number, got {raw!r}") from None
        if not lo <= value <= hi:
            raise ApiError(422, f"{name} must be between {lo} and {hi}, got {value}")
        return value

    motion = fields.get("motion") or "lmdm"
    if motion not in MOTIONS:
        raise ApiError(422, f"motion must be one of {MOTIONS}, got {motion!r}")
    sampler = fields.get("sampler") or "ddim"
    if sampler not in SAMPLERS:
        raise ApiError(422, f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}")
    relative = str(fields.get("relative", "true")).lower()
    if relative not in ("true", "false", "1", "0"):
        raise ApiError(422, f"relative must be true or false, got {relative!r}")
    fps = number("fps", float, cfg.default_fps, 0.1, cfg.max_fps)
    return SessionOptions(
        motion=motion,
        sampler=sampler,
        steps=number("steps", int, cfg.default_steps, 1, cfg.max_steps),
        seed=number("seed", int, secrets.randbelow(2**31), 0, 2**63 - 1),
        fps=fps,
        relative=relative in ("true", "1"),
    )


def decode_source(data: bytes, cfg: ServeConfig) -> np.ndarray:
    """Uploaded bytes → uint8 (H, W, 3), after the pixel limit (413) and a readability check (422)."""
    from PIL import Image, UnidentifiedImageError

    from ..io import read_image

    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h, fmt = im.width, im.height, (im.format or "img").lower()
    except Image.DecompressionBombError:
        raise ApiError(413, f"image has more than {cfg.max_pixels} pixels; send a smaller one") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ApiError(422, f"could not read the image ({e}); send a PNG or JPEG photo") from None
    if w * h > cfg.max_pixels:
        raise ApiError(413, f"image of {w}×{h} = {w * h} pixels; the limit is {cfg.max_pixels}")
    if min(w, h) < cfg.min_side:
        raise ApiError(422, f"image of {w}×{h} pixels; each side must be at least {cfg.min_side}")
    # the one image reader of leo_rt (EXIF orientation, alpha on white, 16-bit grey) reads files
    with tempfile.TemporaryDirectory(prefix="leo_rt-upload-") as tmp:
        path = os.path.join(tmp, f"source.{fmt}")
        with open(path, "wb") as f:
            f.write(data)
        try:
            return read_image(path)
        except MediaError as e:
            raise ApiError(422, str(e)) from None


def apply_control(live: LiveSession, cmd: dict) -> str | None:
    """Apply one control message; returns "stop" when the client asked to end the session."""
    kind = cmd.get("type")
    if kind == "pause":
        live.pause()
    elif kind == "resume":
        live.resume()
    elif kind == "seed":
        seed = cmd.get("seed")
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
            raise ApiError(422, f'seed must be an integer ≥ 0, as {{"type": "seed", "seed": 7}}; got {seed!r}')
        try:
            live.set_seed(seed)
        except InputError as e:
            raise ApiError(422, str(e)) from None
    elif kind == "recenter":
        if live.drive is None:
            raise ApiError(422, "recenter applies to drive sessions only")
        live.drive.recenter()
    elif kind == "stop":
        return "stop"
    else:
        raise ApiError(422, f"unknown control {kind!r}; use one of {list(CONTROLS)}")
    live.touch()
    return None


# --------------------------------------------------------------------------------------------- websocket


async def serve_websocket(ws, live: LiveSession, fmt: str, manager: SessionManager) -> None:
    """Frames out, driving frames and control in, until the stream ends, the client stops or vanishes; the
    session is closed in every case."""
    cfg, metrics = manager.config, manager.metrics
    encode = encode_jpeg(cfg.jpeg_quality) if fmt == "jpeg" else encode_raw
    channel = FrameChannel(
        asyncio.get_running_loop(),
        cfg.send_queue,
        encode=encode,
        on_drop=lambda: metrics.frames_dropped.labels("websocket").inc(),
    )
    lock = asyncio.Lock()

    async def send(text: dict | None = None, data: bytes | None = None) -> None:
        async with lock:
            if text is not None:
                await ws.send_text(json.dumps(text))
            else:
                await ws.send_bytes(data)

    async def frames_out() -> str:
        while True:
            item = await channel.get()
            if item is None:
                if channel.error is not None:
                    await send({"type": "error", "reason": describe(channel.error)})
                    return "error"
                return "ended"
            await send(data=HEADER.pack(item.seq, item.t_render) + item.data)
            live.frame_sent(item)

    async def messages_in() -> str:
        while True:
            msg = await ws.receive()
            if msg["type"] == "websocket.disconnect":
                return "client_gone"
            live.touch()
            if msg.get("bytes") is not None:
                data = msg["bytes"]
                if live.drive is None:
                    await send({"type": "error", "reason": "binary messages are driving frames; this session is "
                                "driven by LMDM (create it with motion=drive)"})  # fmt: skip
                elif len(data) > cfg.max_upload_bytes:
                    await send({"type": "error", "reason": f"driving frame over {cfg.max_upload_bytes} bytes"})
                else:
                    live.drive.offer(data)
                    metrics.driving_frames.labels("websocket").inc()
                continue
            try:
                cmd = json.loads(msg.get("text") or "")
                if not isinstance(cmd, dict):
                    raise ApiError(422, 'control messages are JSON objects, as {"type": "pause"}')
                if apply_control(live, cmd) == "stop":
                    return "stopped"
                await send({"type": "ok", "control": cmd.get("type")})
            except json.JSONDecodeError as e:
                await send({"type": "error", "reason": f"control message is not JSON ({e})"})
            except ApiError as e:
                await send({"type": "error", "reason": e.reason})

    live.start(channel)
    reason = "client_gone"
    tasks = [asyncio.ensure_future(frames_out()), asyncio.ensure_future(messages_in())]
    try:
        await send({"type": "hello", "header": "<Qd: seq uint64, render time float64 (Unix s)", "format": fmt,
                    **live.info()})  # fmt: skip
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        first = done.pop()
        reason = first.result() if first.exception() is None else "client_gone"
    except Exception:  # the client vanished while we were sending
        reason = "client_gone"
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.shield(manager.close_soon(live.id, reason))  # even if this handler is being cancelled
        if reason != "client_gone":
            with contextlib.suppress(Exception):
                await ws.close(code=1000 if reason in ("stopped", "ended") else 1011, reason=reason)


def describe(e: BaseException) -> str:
    if isinstance(e, LeoError):
        return str(e)
    return f"the stream failed ({type(e).__name__}: {e}); see the server log"
