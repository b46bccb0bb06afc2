"""Run observers: how telemetry (traces, metrics, Locust) hears what a run measures, as it happens.

The :class:`~probe.measure.registry.SessionRegistry` is the hub. It calls its ``observer`` after
each state change, outside its lock, from whichever thread made the change (the event loop for
sessions and send lag, the detection thread for detections). Implementations must therefore be
thread-safe and quick; they never raise into the run (:class:`Observers` logs and swallows).

:class:`RunObserver` is a base with no-op methods: override what you need. :class:`Observers`
fans out to several and adds each detection's *own* latency (cumulative minus the cumulative of
the nearest earlier hop that saw the same marker), using the declared hop order when given and
otherwise the order of the hops' running mean cumulative latency.
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
        # (session, seq) -> hop -> cumulative latency, oldest first, bounded.
        self._markers: OrderedDict[tuple[str, int], dict[str, float]] = OrderedDict()
        self._sums: dict[str, list[float]] = {}

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

    def own_latency(self, m: Measurement) -> float:
        """Own latency of ``m`` against the earlier hops seen so far for the same marker."""
        with self._lock:
            acc = self._sums.setdefault(m.hop, [0.0, 0.0])
            acc[0] += m.latency_s
            acc[1] += 1.0
            key = (m.session, m.seq)
            seen = self._markers.get(key)
            if seen is None:
                seen = self._markers[key] = {}
                while len(self._markers) > self._max:
                    self._markers.popitem(last=False)
            seen[m.hop] = m.latency_s
            mine = self._rank(m.hop)
            earlier = [(self._rank(h), v) for h, v in seen.items() if self._rank(h) < mine]
        if not earlier:
            return m.latency_s
        return m.latency_s - max(earlier)[1]

    def session_started(self, session: str, target: str, at: float) -> TraceContext | None:
        found = [c for c in self._each("session_started", session, target, at) if c is not None]
        return found[0] if found else None

    def session_ended(self, session: str, at: float, error: str | None) -> None:
        self._each("session_ended", session, at, error)

    def hop_joined(self, hop: str, session: str | None, trace: TraceContext | None) -> None:
        self._each("hop_joined", hop, session, trace)

    def hop_failed(self, hop: str, session: str | None, error: str) -> None:
        self._each("hop_failed", hop, session, error)

    def detected(self, m: Measurement, own_s: float | None) -> None:
        if not self.observers:
            return
        self._each("detected", m, self.own_latency(m) if own_s is None else own_s)

    def missed(self, m: Missed) -> None:
        self._each("missed", m)

    def send_lag(self, session: str, lag_s: float) -> None:
        self._each("send_lag", session, lag_s)

    def reply(self, session: str, utterance_end: float, latency_s: float | None) -> None:
        self._each("reply", session, utterance_end, latency_s)

    def run_finished(self, report: dict[str, Any]) -> None:
        self._each("run_finished", report)

    def close(self) -> None:
        self._each("close")
