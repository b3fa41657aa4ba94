"""`leo-rt serve` as a command: its options, and the function that runs the server (no web imports until run, so
the CLI's parser stays light)."""

from __future__ import annotations

import contextlib
import os
import socket
import time

from ..errors import InputError
from .config import ServeConfig


def add_serve_arguments(p) -> None:
    """The options of `leo-rt serve` (and of `python -m leo_rt.serve`)."""
    from ..backends import BACKENDS
    from ..precision import names as precision_names

    d = ServeConfig()
    p.add_argument("--checkpoint", default=None, help="animator checkpoint (default: RANDOM weights, for a demo)")
    p.add_argument("--lmdm", default=None, help="LMDM directory from train-lmdm (default: an untrained LMDM)")
    p.add_argument("--preset", default="lia-128", help="animator shape for random weights (default: lia-128)")
    p.add_argument("--host", default=d.host, help=f"address to bind (default: {d.host}, this machine only)")
    p.add_argument("--port", type=int, default=d.port, help=f"port (default: {d.port}; 0: any free port)")
    p.add_argument("--backend", choices=[*BACKENDS, "auto"], default="auto", help="runner backend (default: auto)")
    p.add_argument("--engines", default=None, help="an exported engines folder to run with the checkpoint")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    p.add_argument("--precision", choices=precision_names(), default="fp32", help="default: fp32")
    p.add_argument("--max-sessions", type=int, default=d.max_sessions, help=f"default: {d.max_sessions}")
    p.add_argument("--token", default=None, help="require 'Authorization: Bearer TOKEN' (or env LEO_RT_TOKEN)")
    p.add_argument("--idle-timeout", type=float, default=d.idle_timeout_s, help="close sessions without a client "
                   f"after this many seconds (default: {d.idle_timeout_s:g})")  # fmt: skip
    p.add_argument("--max-batch", type=int, default=32, help="frames per batched render call, all sessions (32)")
    p.add_argument("--max-wait-ms", type=float, default=2.0, help="how long a render call waits for company (2)")
    p.add_argument("--batch", type=int, default=d.batch, help=f"codes per render request of a session ({d.batch})")
    p.add_argument("--max-fps", type=float, default=d.max_fps, help=f"highest fps a session may ask ({d.max_fps:g})")
    p.add_argument("--max-upload-mb", type=float, default=d.max_upload_bytes / 2**20, help="default: 10")
    p.add_argument("--max-pixels", type=int, default=d.max_pixels, help=f"default: {d.max_pixels}")
    p.add_argument("--cors-origin", action="append", default=[], help="allow this origin (CORS is off by default)")
    p.add_argument("--ice-server", action="append", default=[], help="STUN/TURN URL for clients beyond the LAN")
    p.add_argument("--log-level", default="info", help="uvicorn log level (default: info)")


def config_from_args(args) -> ServeConfig:
    return ServeConfig(
        host=args.host,
        port=args.port,
        token=args.token or os.environ.get("LEO_RT_TOKEN") or None,
        cors_origins=tuple(args.cors_origin),
        max_sessions=args.max_sessions,
        idle_timeout_s=args.idle_timeout,
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        max_pixels=args.max_pixels,
        max_fps=args.max_fps,
        default_fps=min(ServeConfig.default_fps, args.max_fps),
        batch=args.batch,
        ice_servers=tuple(args.ice_server),
    )


def run_server(args) -> int:
    """`leo-rt serve`: load the model once, serve until interrupted (Ctrl-C closes every session first)."""
    import uvicorn

    cfg = config_from_args(args)
    if args.max_batch < 1 or args.max_wait_ms < 0:
        raise InputError(f"--max-batch must be ≥ 1 and --max-wait-ms ≥ 0, got {args.max_batch}, {args.max_wait_ms}")
    from .app import create_app
    from .engine import Engine

    sock = bind(cfg.host, cfg.port)  # before loading the model: a port in use fails at once
    try:
        engine = Engine.load(
            args.checkpoint,
            lmdm=args.lmdm,
            preset=args.preset,
            backend=args.backend,
            device=args.device,
            precision=args.precision,
            engines=args.engines,
            max_batch=args.max_batch,
            max_wait_ms=args.max_wait_ms,
            log=lambda s: print(s, flush=True),
        )
    except BaseException:
        sock.close()
        raise
    app = create_app(engine, config=cfg, owns_engine=True, log=lambda s: print(s, flush=True))
    host, port = sock.getsockname()[:2]
    if cfg.token is None and host not in ("127.0.0.1", "::1", "localhost"):
        print(f"WARNING: listening on {host} without --token: anyone who can reach it can use it", flush=True)
    print(
        f"leo-rt serve: http://{host if ':' not in host else f'[{host}]'}:{port}/ ({engine.backend_name} on "
        f"{engine.device}, size {engine.size}, weights: {engine.weights}, up to {cfg.max_sessions} sessions)",
        flush=True,
    )
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            log_level=args.log_level,
            ws_max_size=cfg.max_upload_bytes + 4096,
            limit_concurrency=16 + 4 * cfg.max_sessions,
            timeout_graceful_shutdown=5,
        )
    )
    try:
        server.run(sockets=[sock])  # uvicorn re-raises the Ctrl-C / SIGTERM it handled, after its shutdown
    except KeyboardInterrupt:
        pass  # how a server is stopped: every session was closed on the way out
    finally:
        sock.close()
        engine.close()
    print("leo-rt serve: stopped", flush=True)
    return 0


@contextlib.contextmanager
def serve_in_thread(app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
    """Run `app` on uvicorn in a background thread (tests, benchmarks, embedding); yields its base URL. On exit the
    server shuts down (closing every session) and the thread is joined."""
    import threading

    import uvicorn

    sock = bind(host, port)
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="leo_rt-serve-uvicorn")
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the server did not start; see its log above")
            time.sleep(0.01)
        h, p = sock.getsockname()[:2]
        yield f"http://{h if ':' not in h else f'[{h}]'}:{p}"
    finally:
        server.should_exit = True
        thread.join()
        sock.close()


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port or --host") from None
    return sock
