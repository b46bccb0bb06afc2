"""Run observers: how telemetry (traces, metrics, Locust) hears what a run measures, as it happens.

The :class:`~probe.measure.registry.SessionRegistry` is the hub. It calls its ``observer`` after
each state change, outside its lock, from whichever thread made the change (the event loop for
sessions and send lag, the detection thread for detections). Implementations must therefore be
thread-safe and quick; they never raise into the run (:class:`Observers` logs and swallows).

:class:`RunObserver` is a base with no-op methods: override what you need. :class:`Observers`
fans out to several and adds each detection's *own* latency (cumulative minus the cumulative of
the nearest earlier hop that saw the same marker), using the declared hop order when given and
otherwise the order of the hops' running mean cumulative latency.

Hops are detected on independent streams, so a later hop's detection can arrive before an earlier
hop's for the same marker. :class:`Observers` therefore holds a detection back while an earlier hop
that joined the same session has no outcome (detected or missed) for that marker yet, and passes it
on as soon as they all have one; the registry declares every undelivered marker missed after the
marker timeout, so nothing waits longer than that. Whatever is still held at :meth:`close` is
passed on with the own latency known then.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

from probe.measure.latency import RETURN_HOP
from probe.measure.registry import Measurement, Missed
from probe.protocol import TraceContext

log = logging.getLogger(__name__)

__all__ = ["Observers", "RunObserver"]


class RunObserver:
    """Hooks called as a run progresses; all no-ops here. Times are the run clock's seconds."""

    def session_started(self, session: str, target: str, at: float) -> TraceContext | None:
        """A session is about to connect; may return the trace context to send in ``start``
        (the session's root span). ``None`` lets the source make a random one."""
        return None

    def session_ended(self, session: str, at: float, error: str | None) -> None:
        """A session completed (``error`` None) or failed with a reason."""

    def hop_joined(self, hop: str, session: str | None, trace: TraceContext | None) -> None:
        """A hop's fork (or the return direction) started; ``trace`` is the hop's own span
        context from its fork ``start``, when it sent one."""

    def hop_failed(self, hop: str, session: str | None, error: str) -> None:
        """A hop's fork broke (garbage, stall, dropped connection)."""

    def detected(self, m: Measurement, own_s: float | None) -> None:
        """Marker ``m.seq`` of ``m.session`` was seen on ``m.hop``; ``own_s`` is that hop's own
        latency when an earlier hop saw the same marker, else its cumulative latency."""

    def missed(self, m: Missed) -> None:
        """A hop did not deliver a marker within the marker timeout."""

    def send_lag(self, session: str, lag_s: float) -> None:
        """One frame's send lag (actual minus due send time)."""

    def reply(self, session: str, utterance_end: float, latency_s: float | None) -> None:
        """Voice-to-voice reply latency for an utterance, or ``None`` when it got no reply."""

    def run_finished(self, report: dict[str, Any]) -> None:
        """The run's report is built."""

    def close(self) -> None:
        """Flush and release; called once when the command ends."""


class Observers(RunObserver):
    """Fan-out to several observers, with own latency joined live (module docstring)."""

    def __init__(
        self,
        observers: Iterable[RunObserver] = (),
        *,
        hop_order: Sequence[str] | None = None,
        max_markers: int = 100_000,
    ) -> None:
        self.observers: list[RunObserver] = list(observers)
        self._declared = list(dict.fromkeys(hop_order or ()))
        self._max = max_markers
        self._lock = threading.Lock()
        # (session, seq) -> hop -> cumulative latency (None: missed), oldest first, bounded.
        self._markers: OrderedDict[tuple[str, int], dict[str, float | None]] = OrderedDict()
        self._sums: dict[str, list[float]] = {}
        # session -> hops that joined it (forks and the return direction), oldest first, bounded.
        self._joined: OrderedDict[str, set[str]] = OrderedDict()
        # (session, seq) -> detections held back until the earlier hops have an outcome.
        self._held: OrderedDict[tuple[str, int], list[Measurement]] = OrderedDict()

    def add(self, observer: RunObserver) -> None:
        self.observers.append(observer)

    def _each(self, name: str, *args: Any) -> list[Any]:
        out: list[Any] = []
        for o in self.observers:
            try:
                out.append(getattr(o, name)(*args))
            except Exception as exc:  # an observer must never break the run
                log.warning("%s.%s failed: %s", type(o).__name__, name, exc)
        return out

    def _rank(self, hop: str) -> tuple[int, float, str]:
        if hop in self._declared:
            return (0, float(self._declared.index(hop)), hop)
        if hop == RETURN_HOP:
            return (2, 0.0, hop)
        total, count = self._sums.get(hop, [0.0, 0.0])
        return (1, total / count if count else 0.0, hop)

    def _outcomes(self, key: tuple[str, int]) -> dict[str, float | None]:
        seen = self._markers.get(key)
        if seen is None:
            seen = self._markers[key] = {}
            while len(self._markers) > self._max:
                self._markers.popitem(last=False)
        return seen

    def _record(self, m: Measurement) -> None:
        acc = self._sums.setdefault(m.hop, [0.0, 0.0])
        acc[0] += m.latency_s
        acc[1] += 1.0
        self._outcomes((m.session, m.seq))[m.hop] = m.latency_s

    def _own(self, m: Measurement) -> float:
        seen = self._markers.get((m.session, m.seq), {})
        mine = self._rank(m.hop)
        earlier = [
            (self._rank(h), v) for h, v in seen.items() if v is not None and self._rank(h) < mine
        ]
        if not earlier:
            return m.latency_s
        return m.latency_s - max(earlier)[1]

    def _waiting(self, m: Measurement) -> bool:
        """True while an earlier hop that joined ``m``'s session has no outcome for its marker."""
        seen = self._markers.get((m.session, m.seq), {})
        mine = self._rank(m.hop)
        return any(
            h not in seen and self._rank(h) < mine for h in self._joined.get(m.session, ())
        )

    def own_latency(self, m: Measurement) -> float:
        """Own latency of ``m`` against the earlier hops seen so far for the same marker."""
        with self._lock:
            self._record(m)
            return self._own(m)

    def _release(self, key: tuple[str, int]) -> list[tuple[Measurement, float]]:
        """The held detections of marker ``key`` that wait no longer (lock held)."""
        held = self._held.get(key)
        if not held:
            return []
        ready = [m for m in held if not self._waiting(m)]
        if not ready:
            return []
        rest = [m for m in held if m not in ready]
        if rest:
            self._held[key] = rest
        else:
            del self._held[key]
        return [(m, self._own(m)) for m in ready]

    def _tell(self, out: list[tuple[Measurement, float]]) -> None:
        for m, own in out:
            self._each("detected", m, own)

    def session_started(self, session: str, target: str, at: float) -> TraceContext | None:
        found = [c for c in self._each("session_started", session, target, at) if c is not None]
        return found[0] if found else None

    def session_ended(self, session: str, at: float, error: str | None) -> None:
        self._each("session_ended", session, at, error)

    def hop_joined(self, hop: str, session: str | None, trace: TraceContext | None) -> None:
        if session is not None:
            with self._lock:
                self._joined.setdefault(session, set()).add(hop)
                self._joined.move_to_end(session)
                while len(self._joined) > self._max:
                    self._joined.popitem(last=False)
        self._each("hop_joined", hop, session, trace)

    def hop_failed(self, hop: str, session: str | None, error: str) -> None:
        self._each("hop_failed", hop, session, error)

    def detected(self, m: Measurement, own_s: float | None) -> None:
        if not self.observers:
            return
        if own_s is not None:
            self._each("detected", m, own_s)
            return
        key = (m.session, m.seq)
        out: list[tuple[Measurement, float]] = []
        with self._lock:
            self._record(m)
            if self._waiting(m):
                self._held.setdefault(key, []).append(m)
                while len(self._held) > self._max:
                    _, old = self._held.popitem(last=False)
                    out += [(h, self._own(h)) for h in old]
            else:
                out = [(m, self._own(m)), *self._release(key)]
        self._tell(out)

    def missed(self, m: Missed) -> None:
        key = (m.session, m.seq)
        with self._lock:
            self._outcomes(key).setdefault(m.hop, None)
            out = self._release(key)
        self._each("missed", m)
        self._tell(out)

    def send_lag(self, session: str, lag_s: float) -> None:
        self._each("send_lag", session, lag_s)

    def reply(self, session: str, utterance_end: float, latency_s: float | None) -> None:
        self._each("reply", session, utterance_end, latency_s)

    def run_finished(self, report: dict[str, Any]) -> None:
        self._each("run_finished", report)

    def close(self) -> None:
        with self._lock:
            out = [(m, self._own(m)) for held in self._held.values() for m in held]
            self._held.clear()
        self._tell(out)
        self._each("close")
