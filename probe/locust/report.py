"""What Locust hears of a probe run: request events per hop, misses, fork failures, send lag.

:class:`LocustReporter` is a :class:`~probe.measure.observe.RunObserver` (called on the gevent hub
by the engine's registry). Entries, by request type and name:

- ``hop`` / *hop name*: one per marker detected on that hop, response time = the hop's cumulative
  latency in ms; a marker not seen within the marker timeout is a failure of the same entry with
  the timeout as its response time (a miss is at least that late);
- ``fork`` / *hop name*: a hop's fork that broke (garbage, stall, dropped connection), a failure;
- ``send`` / ``lag``: each session's largest frame send lag over each second of audio (ms);
- ``generator`` / ``overloaded``: a marker that came due while the worker or its sink child was
  overloaded (probe.measure.health): unmeasured, not the hop's failure;
- ``reply`` / ``voice`` (reply mode): one per utterance, response time = the voice-to-voice reply
  latency in ms (end of the utterance to the onset of the reply); an utterance with no reply
  within the marker timeout is a failure;
- ``result`` / ``interim`` or ``final`` (text results, ``--results``): one per result, response
  time = its result latency in ms (arrival minus the send time of the last audio it covers); a
  result without offsets has no latency and fires nothing (the first one is logged, and all are
  counted in the report and ``probe_results_total{offsets="no"}``);
- ``conversation`` / *figure* (``first_interim``, ``final_delay``, ``barge_in``, ``clear``): one
  per figure measured, response time in ms; one that never happened within the marker timeout is
  a failure with its reason, the timeout as its response time.

Exact values go to :class:`~probe.locust.hopstats.HopsStats` as well (every detection, every
frame's lag). Session connect and stream entries are fired by the user, which knows the connect
time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from probe.locust.hopstats import HopsStats
from probe.measure.conversation import Figure, ResultTiming
from probe.measure.observe import RunObserver
from probe.measure.registry import Measurement, Missed

__all__ = [
    "ConversationMissed",
    "ForkFailed",
    "GeneratorOverloaded",
    "LocustReporter",
    "MarkerMissed",
    "NoReply",
    "SendLagWindow",
    "fire",
]

log = logging.getLogger(__name__)

LAG_WINDOW_FRAMES = 50


def fire(events: Any, kind: str, name: str, ms: float, exc: Exception | None) -> None:
    """One Locust request entry: ``kind`` / ``name``, ``ms`` as its response time, a failure
    when ``exc`` is given."""
    events.request.fire(
        request_type=kind,
        name=name,
        response_time=ms,
        response_length=0,
        exception=exc,
        context={},
    )


class MarkerMissed(Exception):
    """A hop did not deliver a marker within the marker timeout."""


class ForkFailed(Exception):
    """A hop's fork broke."""


class GeneratorOverloaded(Exception):
    """The probe itself could not keep up while a marker was owed (probe.measure.health)."""


class NoReply(Exception):
    """The system did not answer an utterance within the marker timeout."""


class ConversationMissed(Exception):
    """A conversation figure never happened (an utterance never finalized, a bot never fell
    silent or never sent ``clear``)."""


class SendLagWindow:
    """Largest lag over each window of frames of one session."""

    __slots__ = ("frames", "worst")

    def __init__(self) -> None:
        self.frames = 0
        self.worst = 0.0


class LocustReporter(RunObserver):
    """Fires Locust request events for what the registry measures (module docstring)."""

    def __init__(
        self,
        events: Any,
        stats: HopsStats,
        *,
        marker_timeout_s: float,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.events = events
        self.stats = stats
        self.monotonic = monotonic
        self.marker_timeout_s = marker_timeout_s
        self._lag: dict[str, SendLagWindow] = {}
        self.results_without_offsets = 0

    def _fire(self, kind: str, name: str, ms: float, exc: Exception | None) -> None:
        fire(self.events, kind, name, ms, exc)

    def detected(self, m: Measurement, own_s: float | None) -> None:
        self.stats.add_detection(m.hop, m.latency_s, m.latency_s if own_s is None else own_s)
        self._fire("hop", m.hop, m.latency_s * 1000.0, None)

    def missed(self, m: Missed) -> None:
        if m.unmeasured:
            # Not the target's failure: the probe could not keep up while the marker was owed.
            self._fire("generator", "overloaded", 0.0, GeneratorOverloaded(
                "marker unmeasured: the probe itself was overloaded"))
            return
        self._fire(
            "hop",
            m.hop,
            self.marker_timeout_s * 1000.0,
            MarkerMissed(f"marker not detected within {self.marker_timeout_s:g} s"),
        )

    def hop_failed(self, hop: str, session: str | None, error: str) -> None:
        self._fire("fork", hop, 0.0, ForkFailed(error))

    def reply(self, session: str, utterance_end: float, latency_s: float | None) -> None:
        if latency_s is None:
            why = NoReply(f"no reply within {self.marker_timeout_s:g} s")
            self._fire("reply", "voice", self.marker_timeout_s * 1000.0, why)
        else:
            self._fire("reply", "voice", latency_s * 1000.0, None)

    def result(self, r: ResultTiming) -> None:
        if r.latency_s is None:
            self.results_without_offsets += 1
            if self.results_without_offsets == 1:
                log.warning(
                    "the target sends text results without offsets: their latency cannot be "
                    "measured, so they make no Locust entries (counted in the report and in "
                    "probe_results_total{offsets=\"no\"})"
                )
            return
        self._fire("result", r.kind, max(0.0, r.latency_s) * 1000.0, None)

    def figure(self, f: Figure) -> None:
        if f.latency_s is None:
            why = ConversationMissed(f.why or f"no {f.name} within {self.marker_timeout_s:g} s")
            self._fire("conversation", f.name, self.marker_timeout_s * 1000.0, why)
        else:
            self._fire("conversation", f.name, max(0.0, f.latency_s) * 1000.0, None)

    def send_lag(self, session: str, lag_s: float) -> None:
        self.stats.add_send_lag(lag_s)
        w = self._lag.get(session)
        if w is None:
            w = self._lag[session] = SendLagWindow()
        w.frames += 1
        if lag_s > w.worst:
            w.worst = lag_s
        if w.frames >= LAG_WINDOW_FRAMES:
            self._fire("send", "lag", w.worst * 1000.0, None)
            w.frames, w.worst = 0, 0.0

    def session_ended(self, session: str, at: float, error: str | None) -> None:
        w = self._lag.pop(session, None)
        if w is not None and w.frames:
            self._fire("send", "lag", w.worst * 1000.0, None)
