"""leo-rt serve: live avatars over WebRTC and WebSocket (see docs/ARCHITECTURE.md)."""
