"""WebRTC with aiortc: the avatar as a video track paced at the session's fps; in drive mode, the client's camera
track coming in (the latest frame wins). Non-trickle ICE: the answer carries every local candidate."""

from __future__ import annotations

import asyncio
import contextlib
import time
from fractions import Fraction

from .live import FrameChannel, LiveSession

VIDEO_CLOCK = 90_000  # RTP video clock rate


def _video_track_class():
    from aiortc import MediaStreamTrack
    from aiortc.mediastreams import MediaStreamError

    class AvatarTrack(MediaStreamTrack):
        """Frames of one live session. The pump starts when the sender first asks for a frame (after DTLS), so
        nothing is rendered for a client that never connects."""

        kind = "video"

        def __init__(self, live: LiveSession, channel: FrameChannel):
            super().__init__()
            self._live, self._channel = live, channel
            self._t0: float | None = None

        async def recv(self):
            import av

            if self._t0 is None:
                self._t0 = time.monotonic()
                self._live.start(self._channel)
            item = await self._channel.get()
            if item is None:
                self.stop()
                raise MediaStreamError
            frame = av.VideoFrame.from_ndarray(item.data, format="rgb24")
            frame.pts = int((time.monotonic() - self._t0) * VIDEO_CLOCK)
            frame.time_base = Fraction(1, VIDEO_CLOCK)
            self._live.frame_sent(item)
            return frame

    return AvatarTrack


async def answer(manager, live: LiveSession, offer_sdp: str, offer_type: str, ice_servers=()) -> dict:
    """Set up the peer connection of a session from the client's offer; returns the answer {sdp, type}."""
    from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription

    from .sessions import ApiError

    cfg = manager.config
    metrics = manager.metrics
    # no ICE servers unless configured: aiortc would otherwise ask a public STUN server (and wait on a closed net)
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[RTCIceServer(u) for u in ice_servers]))
    live.peer = pc
    channel = FrameChannel(
        asyncio.get_running_loop(), cfg.send_queue, on_drop=lambda: metrics.frames_dropped.labels("webrtc").inc()
    )
    readers: set[asyncio.Task] = set()

    @pc.on("connectionstatechange")
    async def on_state():
        if pc.connectionState in ("failed", "closed") and live.id in manager:
            manager.close_soon(live.id, "client_gone")

    @pc.on("track")
    def on_track(track):
        if track.kind != "video" or live.drive is None:
            return
        task = asyncio.ensure_future(_read_camera(track, live, metrics))
        readers.add(task)
        task.add_done_callback(readers.discard)

    try:
        await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type=offer_type))
        if not any(t.kind == "video" for t in pc.getTransceivers()):
            raise ApiError(422, "the offer has no video; add a video transceiver (recvonly, or sendrecv to drive)")
        pc.addTrack(_video_track_class()(live, channel))
        await pc.setLocalDescription(await pc.createAnswer())
    except ApiError:
        raise
    except Exception as e:  # a malformed or unsupported offer
        raise ApiError(422, f"could not answer the WebRTC offer ({type(e).__name__}: {e})") from None
    return {"sdp": pc.localDescription.sdp, "type": pc.localDescription.type}


async def _read_camera(track, live: LiveSession, metrics) -> None:
    """Hand every decoded camera frame to the drive source, which keeps only the latest."""
    from aiortc.mediastreams import MediaStreamError

    with contextlib.suppress(MediaStreamError, asyncio.CancelledError):
        while live.drive is not None:
            frame = await track.recv()
            live.drive.offer(frame)
            live.touch()
            metrics.driving_frames.labels("webrtc").inc()
