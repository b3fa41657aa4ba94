"""Settings and limits of `leo-rt serve` (every queue and count in the server is bounded by one of these)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = 8000
    token: str | None = None  # bearer token for /v1 and /metrics; None: no auth
    cors_origins: tuple[str, ...] = ()  # CORS off unless origins are named
    max_sessions: int = 8
    retry_after_s: int = 5  # Retry-After of a 429 when full
    idle_timeout_s: float = 60.0  # a session with no client for this long is closed
    max_upload_bytes: int = 10 * 2**20  # source image upload, and each driving frame over the WebSocket
    max_pixels: int = 25_000_000  # width × height of a source image or driving frame
    min_side: int = 16  # smallest source image side
    default_fps: float = 25.0
    max_fps: float = 60.0
    default_steps: int = 10
    max_steps: int = 200
    batch: int = 4  # codes per render request of an LMDM session (the core coalesces requests of all sessions)
    queue_size: int = 2  # rendered batches a session may hold ahead of its fps clock
    send_queue: int = 2  # frames waiting for a client; a lagging client drops its oldest
    jpeg_quality: int = 85
    ice_servers: tuple[str, ...] = ()  # STUN/TURN URLs for WebRTC beyond the local network; none by default

    def __post_init__(self):
        from ..errors import InputError

        for name in ("max_sessions", "max_upload_bytes", "max_pixels", "batch", "queue_size", "send_queue"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.default_fps <= self.max_fps:
            raise InputError(f"default_fps must be in (0, max_fps={self.max_fps}], got {self.default_fps}")
        if self.idle_timeout_s <= 0:
            raise InputError(f"idle_timeout_s must be positive, got {self.idle_timeout_s}")
        if not 1 <= self.jpeg_quality <= 95:
            raise InputError(f"jpeg_quality must be between 1 and 95, got {self.jpeg_quality}")
