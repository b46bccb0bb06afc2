"""WebSocket connections that stamp each message's arrival when its bytes are read off the socket.

PROTOCOL.md section 4 times a frame by when it was received. ``await ws.recv()`` returns only
when the receiving task next runs, which under load can be well after the loop read the bytes;
these connection classes record the injected clock at the moment the frame is parsed from the
socket (in the protocol callback), one stamp per message, and :meth:`arrival` hands them out in
message order.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.server import ServerConnection
from websockets.frames import Frame, Opcode

__all__ = ["StampedClientConnection", "StampedServerConnection", "client_factory", "server_factory"]

_FIRST = (Opcode.TEXT, Opcode.BINARY)  # the first frame of every data message


class _Stamping:
    arrivals: deque[float]

    @staticmethod
    def clock() -> float:  # replaced per factory
        raise NotImplementedError

    def _stamp(self, event: object) -> None:
        if isinstance(event, Frame) and event.opcode in _FIRST:
            self.arrivals.append(self.clock())

    def arrival(self) -> float:
        """The arrival time of the message ``recv()`` just returned (the clock now if unknown)."""
        return self.arrivals.popleft() if self.arrivals else self.clock()


class StampedServerConnection(_Stamping, ServerConnection):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.arrivals = deque()

    def process_event(self, event: Any) -> None:
        self._stamp(event)
        super().process_event(event)


class StampedClientConnection(_Stamping, ClientConnection):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.arrivals = deque()

    def process_event(self, event: Any) -> None:
        self._stamp(event)
        super().process_event(event)


@lru_cache(maxsize=8)
def server_factory(clock: Callable[[], float]) -> type[StampedServerConnection]:
    """``create_connection`` for ``serve``: server connections stamped with ``clock``."""
    return type("StampedServer", (StampedServerConnection,), {"clock": staticmethod(clock)})


@lru_cache(maxsize=8)
def client_factory(clock: Callable[[], float]) -> type[StampedClientConnection]:
    """``create_connection`` for ``connect``: client connections stamped with ``clock``."""
    return type("StampedClient", (StampedClientConnection,), {"clock": staticmethod(clock)})
