"""Run observers: how telemetry (traces, metrics, Locust) hears what a run measures, as it happens.

The :class:`~probe.measure.registry.SessionRegistry` is the hub. It calls its ``observer`` after
each state change, outside its lock, from whichever thread made the change (the event loop for
sessions and send lag, the detection thread for detections). Implementations must therefore be
thread-safe and quick; they never raise into the run (:class:`Observers` logs and swallows).

:class:`RunObserver` is a base with no-op methods: override what you need. :class:`Observers`
fans out to several and adds each detection's *own* latency by the one rule of
:class:`~probe.measure.latency.OwnLatencyJoin` (which holds a later hop's detection until the
earlier hops have an outcome for that marker). Pure: a shell that calls it from several threads
passes a ``lock``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from probe.measure.conversation import Figure, ResultTiming
from probe.measure.latency import OwnLatencyJoin
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

    def fork_rejected(self, reason: str) -> None:
        """The sink refused a fork connection (it did not present the run's capability)."""

    def detected(self, m: Measurement, own_s: float | None) -> None:
        """Marker ``m.seq`` of ``m.session`` was seen on ``m.hop``; ``own_s`` is that hop's own
        latency when an earlier hop saw the same marker, else its cumulative latency."""

    def missed(self, m: Missed) -> None:
        """A hop did not deliver a marker within the marker timeout."""

    def send_lag(self, session: str, lag_s: float) -> None:
        """One frame's send lag (actual minus due send time)."""

    def reply(self, session: str, utterance_end: float, latency_s: float | None) -> None:
        """Voice-to-voice reply latency for an utterance, or ``None`` when it got no reply."""

    def result(self, r: ResultTiming) -> None:
        """A text result (interim or final) came back from a speech-to-text target."""

    def figure(self, f: Figure) -> None:
        """A conversation figure (first interim, final delay, barge-in, clear) was measured,
        or missed (``f.latency_s`` None)."""

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
        lock: AbstractContextManager[Any] | None = None,
    ) -> None:
        self.observers: list[RunObserver] = list(observers)
        self._join = OwnLatencyJoin(hop_order or (), max_markers=max_markers)
        self._lock: AbstractContextManager[Any] = lock if lock is not None else nullcontext()

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

    def own_latency(self, m: Measurement) -> float:
        """Own latency of ``m`` against the earlier hops seen so far for the same marker."""
        with self._lock:
            return self._join.own_now(m)

    def _tell(self, out: list[tuple[Measurement, float]]) -> None:
        for m, own in out:
            self._each("detected", m, own)

    def session_started(self, session: str, target: str, at: float) -> TraceContext | None:
        found = [c for c in self._each("session_started", session, target, at) if c is not None]
        return found[0] if found else None

    def session_ended(self, session: str, at: float, error: str | None) -> None:
        with self._lock:
            self._join.ended(session, at)
        self._each("session_ended", session, at, error)

    def hop_joined(self, hop: str, session: str | None, trace: TraceContext | None) -> None:
        if session is not None:
            with self._lock:
                self._join.joined(hop, session)
        self._each("hop_joined", hop, session, trace)

    def hop_failed(self, hop: str, session: str | None, error: str) -> None:
        self._each("hop_failed", hop, session, error)

    def fork_rejected(self, reason: str) -> None:
        self._each("fork_rejected", reason)

    def detected(self, m: Measurement, own_s: float | None) -> None:
        if not self.observers:
            return
        if own_s is not None:
            self._each("detected", m, own_s)
            return
        with self._lock:
            out = self._join.detected(m)
        self._tell(out)

    def missed(self, m: Missed) -> None:
        with self._lock:
            out = self._join.missed(m.hop, m.session, m.seq)
        self._each("missed", m)
        self._tell(out)

    def send_lag(self, session: str, lag_s: float) -> None:
        self._each("send_lag", session, lag_s)

    def reply(self, session: str, utterance_end: float, latency_s: float | None) -> None:
        self._each("reply", session, utterance_end, latency_s)

    def result(self, r: ResultTiming) -> None:
        self._each("result", r)

    def figure(self, f: Figure) -> None:
        self._each("figure", f)

    def run_finished(self, report: dict[str, Any]) -> None:
        self._each("run_finished", report)

    def flush(self) -> None:
        """Pass on every detection still held for an earlier hop's outcome (a run or a test
        stopped before its markers settled), with the own latency known now."""
        with self._lock:
            out = self._join.flush()
        self._tell(out)

    def close(self) -> None:
        self.flush()
        self._each("close")
