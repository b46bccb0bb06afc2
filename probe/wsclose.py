"""What a WebSocket close means to a probe session, for both shells (asyncio and gevent raise the
same ``websockets`` exception)."""

from __future__ import annotations

from websockets.exceptions import ConnectionClosed

__all__ = ["close_of"]


def close_of(exc: ConnectionClosed) -> tuple[int, str]:
    """The close code and reason the peer sent (1006 and no reason when it sent none)."""
    return (exc.rcvd.code, exc.rcvd.reason) if exc.rcvd is not None else (1006, "")
