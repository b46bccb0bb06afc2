"""The markers each session is expected to carry, for informed detection (no I/O, no locks).

The source records every marker it sends in the registry; a send listener copies (session,
payload, send time, deadline) into an :class:`ExpectationBook` beside the detectors (in the sink's
child process, over its message pipe, or on the detection thread of an in-process sink). Each
detection stream of a known session subscribes to it and gets every expected marker of that
session, including the recent ones sent before the stream subscribed (a fork that connects late).

Bounded: a session keeps its last :data:`RECENT` expectations; the book forgets a session once
its last marker's deadline is :data:`GRACE_S` behind the newest send it heard of (time comes from
the sends themselves: no clock) and nothing subscribes to it, and never keeps more than
:data:`MAX_SESSIONS`, so memory follows the sessions in flight however long a run lasts. Touch it
from one thread only (the detection worker's).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Protocol

from probe.watermark.informed import Expected

__all__ = ["GRACE_S", "MAX_SESSIONS", "RECENT", "ExpectationBook", "Subscriber"]

# 64 markers at the default 0.5 s cadence cover 32 s, three times the default marker timeout.
RECENT = 64
MAX_SESSIONS = 4096
# A session is forgotten this long after its last marker's deadline (a late fork is told its
# recent markers until then; after it, there is nothing left to find).
GRACE_S = 30.0


class Subscriber(Protocol):
    def expect(self, marker: Expected) -> None: ...


class _Entry:
    __slots__ = ("deadline", "recent", "subscribers", "token")

    def __init__(self, token: bytes) -> None:
        self.recent: deque[Expected] = deque(maxlen=RECENT)
        self.subscribers: list[Subscriber] = []
        self.token = token
        self.deadline = float("-inf")


class ExpectationBook:
    """Session -> the markers it is expected to carry; fans new ones out to subscribers."""

    def __init__(self, *, max_sessions: int = MAX_SESSIONS) -> None:
        self._sessions: OrderedDict[str, _Entry] = OrderedDict()
        self._by_token: dict[bytes, str] = {}
        self._max = max_sessions
        self._newest = float("-inf")  # the latest send time heard of

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
                self._drop_oldest()
        else:
            self._sessions.move_to_end(session)
        marker = Expected(payload=payload, send_time=send_time, deadline=deadline)
        entry.recent.append(marker)
        entry.deadline = max(entry.deadline, deadline)
        self._newest = max(self._newest, send_time)
        # Sessions are in order of their last marker: forget the stale ones at the front.
        while self._sessions:
            first = next(iter(self._sessions.values()))
            if first.subscribers or first.deadline + GRACE_S >= self._newest:
                break
            self._drop_oldest()
        for sub in entry.subscribers:
            sub.expect(marker)

    def _drop_oldest(self) -> None:
        _, old = self._sessions.popitem(last=False)
        if self._by_token.get(old.token) is not None:
            del self._by_token[old.token]

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
