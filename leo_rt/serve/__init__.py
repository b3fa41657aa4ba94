"""leo-rt serve: live avatars over WebRTC and WebSocket, many sessions batched on one frame core.

    from leo_rt.serve import create_app, ServeConfig
    app = create_app(core, config=ServeConfig(max_sessions=8))     # core: a leo_rt.FrameCore (one per process)

See leo_rt/serve/app.py for the API, docs/ARCHITECTURE.md §7 for the design. FastAPI, uvicorn and aiortc are the
`serve` extra: `pip install "leo_rt[serve]"`.
"""

from .config import ServeConfig

__all__ = ["ServeConfig", "add_serve_arguments", "create_app", "run_server"]


def __getattr__(name):  # the web stack is imported only when the server is used
    if name == "create_app":
        from .app import create_app

        return create_app
    if name in ("run_server", "add_serve_arguments"):
        from . import command

        return getattr(command, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
