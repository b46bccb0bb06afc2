"""The markers each session is expected to carry, for informed detection (no I/O, no locks).

The source records every marker it sends in the registry; a send listener copies (session,
payload, send time, deadline) into an :class:`ExpectationBook` beside the detectors (in the sink's
child process, over its message pipe, or on the detection thread of an in-process sink). Each
detection stream of a known session subscribes to it and gets every expected marker of that
session, including the recent ones sent before the stream subscribed (a fork that connects late).

Bounded: a session keeps its last :data:`RECENT` expectations and the book its last
:data:`MAX_SESSIONS` sessions, so memory is flat however long a run lasts. Touch it from one
thread only (the detection worker's).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Protocol

from probe.watermark.informed import Expected

__all__ = ["MAX_SESSIONS", "RECENT", "ExpectationBook", "Subscriber"]

# 64 markers at the default 0.5 s cadence cover 32 s, three times the default marker timeout.
RECENT = 64
MAX_SESSIONS = 4096


class Subscriber(Protocol):
    def expect(self, marker: Expected) -> None: ...


class _Entry:
    __slots__ = ("recent", "subscribers", "token")

    def __init__(self, token: bytes) -> None:
        self.recent: deque[Expected] = deque(maxlen=RECENT)
        self.subscribers: list[Subscriber] = []
        self.token = token


class ExpectationBook:
    """Session -> the markers it is expected to carry; fans new ones out to subscribers."""

    def __init__(self, *, max_sessions: int = MAX_SESSIONS) -> None:
        self._sessions: OrderedDict[str, _Entry] = OrderedDict()
        self._by_token: dict[bytes, str] = {}
        self._max = max_sessions

    def __len__(self) -> int:
        return len(self._sessions)

    def knows(self, session: str) -> bool:
        return session in self._sessions

    def session_of(self, payload: bytes) -> str | None:
        """The session whose markers carry ``payload``'s token (its first three bytes)."""
        return self._by_token.get(payload[:3])

    def add(self, session: str, payload: bytes, send_time: float, deadline: float) -> None:
        """Marker ``payload`` of ``session`` was sent at ``send_time``; look until ``deadline``."""
        entry = self._sessions.get(session)
        if entry is None:
            entry = _Entry(payload[:3])
            self._sessions[session] = entry
            self._by_token[entry.token] = session
            while len(self._sessions) > self._max:
                _, old = self._sessions.popitem(last=False)
                if self._by_token.get(old.token) is not None:
                    del self._by_token[old.token]
        else:
            self._sessions.move_to_end(session)
        marker = Expected(payload=payload, send_time=send_time, deadline=deadline)
        entry.recent.append(marker)
        for sub in entry.subscribers:
            sub.expect(marker)

    def subscribe(self, session: str, subscriber: Subscriber) -> bool:
        """Send ``subscriber`` the session's recent and future expectations; False (and nothing
        subscribed) when the book does not know the session."""
        entry = self._sessions.get(session)
        if entry is None:
            return False
        entry.subscribers.append(subscriber)
        for marker in entry.recent:
            subscriber.expect(marker)
        return True

    def unsubscribe(self, session: str, subscriber: Subscriber) -> None:
        entry = self._sessions.get(session)
        if entry is not None and subscriber in entry.subscribers:
            entry.subscribers.remove(subscriber)
