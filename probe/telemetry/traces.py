"""OpenTelemetry spans made from a run's measurements: one trace per session.

The trace of a session::

    probe session            (root; its context is the `traceparent` sent in `start`)
    +-- marker <hop>         one per marker and hop: send time -> arrival time, linked to the
    |                        hop's own span context from its fork `start`
    +-- marker <hop>         a missed marker: send time -> when it was declared missed, ERROR
    +-- hop failed <hop>     a fork that broke (garbage, stall, dropped), ERROR
    +-- reply                voice-to-voice reply: utterance end -> reply onset (ERROR: none)
    +-- result               a text result: send time of the audio it covers -> its arrival
    |                        (a result without offsets: a point at its arrival)
    +-- first_interim        conversation figures (probe.measure.conversation), each from its
    +-- final_delay          start to start + latency; a missed one (it never happened) ends
    +-- barge_in             when it was declared missed, ERROR with the reason
    +-- clear

Every span takes explicit start and end times from the run's clock (epoch seconds, the clock the
registry stamps sends and arrivals with); marker spans are made when the detection (or miss) is
known, often after the session span has ended, so they name the session span as their parent
explicitly. A session whose root span was not sampled gets no child spans at all, whatever the
sampler would say about them: half a trace is worse than none.

The hop side (the reference pipeline, or any system that follows PROTOCOL.md) makes its own spans
under the same trace id; :func:`start_child_span` is what the reference pipeline uses.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    Tracer,
    TracerProvider,
)
from opentelemetry.util.types import AttributeValue

from probe.measure.conversation import Figure, ResultTiming
from probe.measure.observe import RunObserver
from probe.measure.registry import Measurement, Missed
from probe.protocol import TraceContext

__all__ = [
    "RESULT_SPAN",
    "RESULT_TEXT_CHARS",
    "SESSION_SPAN",
    "TraceObserver",
    "otel_parent",
    "start_child_span",
    "to_ns",
    "trace_context_of",
]

SESSION_SPAN = "probe session"
RESULT_SPAN = "result"
RESULT_TEXT_CHARS = 200
_SCOPE = "probe"


def to_ns(t: float) -> int:
    """Epoch seconds (the run clock) to the integer nanoseconds OTel wants."""
    return int(round(t * 1e9))


def trace_context_of(sc: SpanContext) -> TraceContext:
    """An OTel span context as the protocol's :class:`TraceContext`."""
    return TraceContext(f"{sc.trace_id:032x}", f"{sc.span_id:016x}", int(sc.trace_flags) & 0xFF)


def _span_context(ctx: TraceContext, *, remote: bool) -> SpanContext:
    return SpanContext(
        trace_id=int(ctx.trace_id, 16),
        span_id=int(ctx.span_id, 16),
        is_remote=remote,
        trace_flags=TraceFlags(ctx.flags),
    )


def otel_parent(ctx: TraceContext) -> Context:
    """An OTel context whose current span is the remote span ``ctx`` (to parent spans on it)."""
    return trace.set_span_in_context(NonRecordingSpan(_span_context(ctx, remote=True)))


def start_child_span(
    tracer: Tracer,
    name: str,
    parent: TraceContext,
    start_s: float,
    attributes: Mapping[str, AttributeValue] | None = None,
    kind: SpanKind = SpanKind.INTERNAL,
) -> tuple[Span, TraceContext]:
    """Start a span under the (remote) ``parent`` at ``start_s`` epoch seconds; returns it and
    its context as a :class:`TraceContext` (the ids to pass on, whether or not it is sampled)."""
    span = tracer.start_span(
        name,
        context=otel_parent(parent),
        kind=kind,
        attributes=attributes,
        start_time=to_ns(start_s),
    )
    return span, trace_context_of(span.get_span_context())


@dataclass(slots=True)
class _SessionTrace:
    span: Span | None  # released once ended; the context in `parent` is all children need
    parent: Context
    sampled: bool
    trace_id: str
    ended: bool = False
    hops: dict[str, SpanContext] = field(default_factory=dict)


class TraceObserver(RunObserver):
    """Spans of a run, one trace per session (module docstring), through ``tracer_provider``.

    ``clock`` gives the time a miss or a hop failure was noticed (the registry does not pass it);
    at most ``max_sessions`` sessions are remembered (the oldest is forgotten first), so a long
    load run holds bounded memory. Thread-safe.
    """

    def __init__(
        self,
        tracer_provider: TracerProvider,
        *,
        clock: Callable[[], float] = time.time,
        max_sessions: int = 20_000,
    ) -> None:
        self._tracer = tracer_provider.get_tracer(_SCOPE)
        self._clock = clock
        self._max = max(1, max_sessions)
        self._lock = threading.Lock()
        self._sessions: OrderedDict[str, _SessionTrace] = OrderedDict()

    def trace_id(self, session: str) -> str | None:
        """The trace id of a session's trace when it is sampled (for metric exemplars)."""
        with self._lock:
            st = self._sessions.get(session)
        return st.trace_id if st is not None and st.sampled else None

    def _get(self, session: str | None) -> _SessionTrace | None:
        if session is None:
            return None
        with self._lock:
            st = self._sessions.get(session)
        return st if st is not None and st.sampled else None

    def session_started(self, session: str, target: str, at: float) -> TraceContext | None:
        span = self._tracer.start_span(
            SESSION_SPAN,
            context=Context(),  # a new trace: the session is the root
            kind=SpanKind.CLIENT,
            attributes={"probe.session": session, "probe.target": target},
            start_time=to_ns(at),
        )
        sc = span.get_span_context()
        st = _SessionTrace(
            span=span,
            parent=trace.set_span_in_context(NonRecordingSpan(sc)),
            sampled=sc.trace_flags.sampled,
            trace_id=f"{sc.trace_id:032x}",
        )
        dropped: list[_SessionTrace] = []
        with self._lock:
            old = self._sessions.pop(session, None)
            if old is not None:
                dropped.append(old)
            self._sessions[session] = st
            while len(self._sessions) > self._max:
                dropped.append(self._sessions.popitem(last=False)[1])
        for d in dropped:  # _end skips the ones that ended on their own
            self._end(d, at, "too many sessions at once: this span was ended before its session")
        return trace_context_of(sc)

    def _end(self, st: _SessionTrace, at: float, error: str | None) -> None:
        with self._lock:
            span, st.span = st.span, None
            if st.ended or span is None:
                return
            st.ended = True
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, error))
            span.set_attribute("probe.outcome", "failed")
        else:
            span.set_attribute("probe.outcome", "completed")
        span.end(end_time=to_ns(at))

    def session_ended(self, session: str, at: float, error: str | None) -> None:
        with self._lock:
            st = self._sessions.get(session)
        if st is not None:
            self._end(st, at, error)

    def hop_joined(self, hop: str, session: str | None, trace: TraceContext | None) -> None:
        st = self._get(session)
        if st is not None and trace is not None:
            with self._lock:
                st.hops[hop] = _span_context(trace, remote=True)

    def _links(self, st: _SessionTrace, hop: str) -> list[Link]:
        with self._lock:
            sc = st.hops.get(hop)
        return [Link(sc, {"probe.link": "hop span"})] if sc is not None else []

    def detected(self, m: Measurement, own_s: float | None) -> None:
        st = self._get(m.session)
        if st is None:
            return
        attributes: dict[str, AttributeValue] = {
            "probe.hop": m.hop,
            "probe.session": m.session,
            "probe.marker": m.seq,
            "probe.outcome": "detected",
            "probe.latency_ms": round(m.latency_s * 1000.0, 3),
            "probe.detection_score": round(m.score, 3),
        }
        if own_s is not None:
            attributes["probe.own_latency_ms"] = round(own_s * 1000.0, 3)
        span = self._tracer.start_span(
            f"marker {m.hop}",
            context=st.parent,
            links=self._links(st, m.hop),
            attributes=attributes,
            start_time=to_ns(m.send_time),
        )
        # A detection may land a few ms "before" its send (frame-granular stamps on two
        # threads); a span cannot end before it starts.
        span.end(end_time=to_ns(max(m.arrival_time, m.send_time)))

    def missed(self, m: Missed) -> None:
        st = self._get(m.session)
        if st is None:
            return
        span = self._tracer.start_span(
            f"marker {m.hop}",
            context=st.parent,
            links=self._links(st, m.hop),
            attributes={
                "probe.hop": m.hop,
                "probe.session": m.session,
                "probe.marker": m.seq,
                "probe.outcome": "unmeasured" if m.unmeasured else "missed",
            },
            start_time=to_ns(m.send_time),
        )
        if m.unmeasured:
            why = f"marker {m.seq} unmeasured on hop {m.hop}: the probe itself was overloaded"
        else:
            why = f"hop {m.hop} did not deliver marker {m.seq}"
        span.set_status(Status(StatusCode.ERROR, why))
        span.end(end_time=to_ns(max(self._clock(), m.send_time)))

    def hop_failed(self, hop: str, session: str | None, error: str) -> None:
        st = self._get(session)
        if st is None:
            return
        now = to_ns(self._clock())
        span = self._tracer.start_span(
            f"hop failed {hop}",
            context=st.parent,
            links=self._links(st, hop),
            attributes={"probe.hop": hop, "probe.session": session or "", "probe.error": error},
            start_time=now,
        )
        span.set_status(Status(StatusCode.ERROR, error))
        span.end(end_time=now)

    def reply(self, session: str, utterance_end: float, latency_s: float | None) -> None:
        st = self._get(session)
        if st is None:
            return
        attributes: dict[str, AttributeValue] = {"probe.session": session}
        if latency_s is not None:
            attributes["probe.latency_ms"] = round(latency_s * 1000.0, 3)
        span = self._tracer.start_span(
            "reply", context=st.parent, attributes=attributes, start_time=to_ns(utterance_end)
        )
        if latency_s is None:
            span.set_status(Status(StatusCode.ERROR, "no reply to this utterance"))
            span.end(end_time=to_ns(max(self._clock(), utterance_end)))
        else:
            span.end(end_time=to_ns(utterance_end + max(0.0, latency_s)))

    def result(self, r: ResultTiming) -> None:
        st = self._get(r.session)
        if st is None:
            return
        attributes: dict[str, AttributeValue] = {
            "probe.session": r.session,
            "probe.result.kind": r.kind,
            "probe.result.text": r.text[:RESULT_TEXT_CHARS],
        }
        if r.utterance is not None:
            attributes["probe.result.utterance"] = r.utterance
        if r.latency_s is not None:
            attributes["probe.result.latency_ms"] = round(r.latency_s * 1000.0, 3)
        start = r.covered_end_sent if r.covered_end_sent is not None else r.arrival
        span = self._tracer.start_span(
            RESULT_SPAN, context=st.parent, attributes=attributes, start_time=to_ns(start)
        )
        span.end(end_time=to_ns(max(r.arrival, start)))

    def figure(self, f: Figure) -> None:
        st = self._get(f.session)
        if st is None:
            return
        attributes: dict[str, AttributeValue] = {"probe.session": f.session}
        if f.utterance is not None:
            attributes["probe.utterance"] = f.utterance
        if f.latency_s is not None:
            attributes["probe.latency_ms"] = round(f.latency_s * 1000.0, 3)
        span = self._tracer.start_span(
            f.name, context=st.parent, attributes=attributes, start_time=to_ns(f.start)
        )
        if f.latency_s is None:
            span.set_status(Status(StatusCode.ERROR, f.why or f"{f.name} never happened"))
            span.end(end_time=to_ns(max(self._clock(), f.start)))
        else:
            span.end(end_time=to_ns(f.start + max(0.0, f.latency_s)))

    def close(self) -> None:
        """End the spans of sessions still open (a run cut short)."""
        now = self._clock()
        with self._lock:
            open_ = [st for st in self._sessions.values() if not st.ended]
        for st in open_:
            self._end(st, now, "the run ended before this session did")
