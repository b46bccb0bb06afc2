"""Per-hop latencies: the pipeline order of hops and each hop's own share of the latency.

A hop's cumulative latency for a marker is its arrival time minus the marker's send time; its own
latency is that minus the cumulative latency of the hop before it, for the same marker
(PROTOCOL.md section 4). When the previous hop missed the marker, the nearest earlier hop that saw
it stands in; the first hop (in order) that saw it owns its whole cumulative latency.
"""

from __future__ import annotations

import statistics
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence

from probe.measure.registry import Measurement

__all__ = ["RETURN_HOP", "OwnLatencyJoin", "hop_order", "hop_order_by_median", "own_latencies"]

# The audio that comes back on the client's own connection: always the end of the pipeline.
RETURN_HOP = "return"


def hop_order(
    measurements: Iterable[Measurement],
    declared: Sequence[str] | None = None,
    *,
    known: Iterable[str] = (),
) -> list[str]:
    """Hops in pipeline order.

    With ``declared``, that order, then any other hop measured, by median cumulative latency.
    Without, every hop measured by median cumulative latency. Hops in ``known`` with no
    measurement follow the measured ones. The ``return`` hop goes last unless declared elsewhere.
    """
    by_hop: dict[str, list[float]] = {}
    for m in measurements:
        by_hop.setdefault(m.hop, []).append(m.latency_s)
    medians = {hop: statistics.median(v) for hop, v in by_hop.items()}
    return hop_order_by_median(medians, declared, known=known)


def hop_order_by_median(
    medians: Mapping[str, float],
    declared: Sequence[str] | None = None,
    *,
    known: Iterable[str] = (),
) -> list[str]:
    """:func:`hop_order` given each measured hop's median cumulative latency (seconds)."""
    head = list(dict.fromkeys(declared or ()))
    measured = sorted((h for h in medians if h not in head), key=lambda h: (medians[h], h))
    unmeasured = [h for h in dict.fromkeys(known) if h not in head and h not in medians]
    tail = measured + unmeasured
    if RETURN_HOP in tail:
        tail.remove(RETURN_HOP)
        tail.append(RETURN_HOP)
    return head + tail


def own_latencies(
    measurements: Iterable[Measurement], order: Sequence[str]
) -> dict[str, list[float]]:
    """Each hop's own latencies (seconds), keyed by every hop of ``order``; measurements of hops
    not in ``order`` are ignored."""
    rank = {hop: i for i, hop in enumerate(order)}
    markers: dict[tuple[str, int], dict[str, float]] = {}
    for m in measurements:
        if m.hop in rank:
            markers.setdefault((m.session, m.seq), {})[m.hop] = m.latency_s
    out: dict[str, list[float]] = {hop: [] for hop in order}
    for seen in markers.values():
        previous: float | None = None
        for hop in sorted(seen, key=rank.__getitem__):
            cumulative = seen[hop]
            out[hop].append(cumulative if previous is None else cumulative - previous)
            previous = cumulative
    return out


class OwnLatencyJoin:
    """Own latency joined live, by the rule :func:`own_latencies` applies to a finished run.

    Hops are detected on independent streams, so a later hop's detection can arrive before an
    earlier hop's for the same marker. A detection is therefore held while an earlier hop that
    joined the same session has no outcome (detected or missed) for that marker, and passed on
    as soon as they all have one; the registry declares every undelivered marker missed after the
    marker timeout, so nothing waits longer than that. :meth:`flush` passes on what is still held
    with the own latency known then. Order: ``declared`` hops first, then others by their running
    mean cumulative latency, ``return`` last. Bounded: a marker is forgotten once every hop that
    joined its session has an outcome for it, a session ``linger_s`` after it ended (by then the
    registry has settled its markers), and at most the latest ``max_markers`` markers and
    ``max_sessions`` sessions are remembered. Not thread-safe (callers lock)."""

    def __init__(
        self,
        declared: Sequence[str] = (),
        *,
        max_markers: int = 100_000,
        max_sessions: int = 4096,
        linger_s: float = 120.0,
    ) -> None:
        self._declared = list(dict.fromkeys(declared))
        self._max = max_markers
        self._max_sessions = max_sessions
        self._linger = linger_s
        # session -> when it ended, oldest first.
        self._ended: OrderedDict[str, float] = OrderedDict()
        # (session, seq) -> hop -> cumulative latency (None: missed), oldest first.
        self._markers: OrderedDict[tuple[str, int], dict[str, float | None]] = OrderedDict()
        self._sums: dict[str, list[float]] = {}
        # session -> hops that joined it (forks and the return direction), oldest first.
        self._joined: OrderedDict[str, set[str]] = OrderedDict()
        # (session, seq) -> detections held back until the earlier hops have an outcome.
        self._held: OrderedDict[tuple[str, int], list[Measurement]] = OrderedDict()

    def rank(self, hop: str) -> tuple[int, float, str]:
        if hop in self._declared:
            return (0, float(self._declared.index(hop)), hop)
        if hop == RETURN_HOP:
            return (2, 0.0, hop)
        total, count = self._sums.get(hop, [0.0, 0.0])
        return (1, total / count if count else 0.0, hop)

    def joined(self, hop: str, session: str) -> None:
        """``hop`` owes ``session`` its markers (a fork started, or audio came back)."""
        self._joined.setdefault(session, set()).add(hop)
        self._joined.move_to_end(session)
        while len(self._joined) > self._max_sessions:
            self._joined.popitem(last=False)

    def ended(self, session: str, at: float) -> None:
        """``session`` ended at ``at``; sessions that ended ``linger_s`` before that are
        forgotten (their markers settled long ago)."""
        self._ended[session] = at
        self._ended.move_to_end(session)
        while self._ended:
            old, when = next(iter(self._ended.items()))
            if at - when < self._linger:
                break
            del self._ended[old]
            self._joined.pop(old, None)

    def detected(self, m: Measurement) -> list[tuple[Measurement, float]]:
        """Record a detection; return the detections (this one included, or not yet) whose own
        latency is now known, with it."""
        self._record(m)
        key = (m.session, m.seq)
        out: list[tuple[Measurement, float]] = []
        if not self._waiting(m):
            out = [(m, self._own(m)), *self._release(key)]
            self._forget_if_done(key)
            return out
        self._held.setdefault(key, []).append(m)
        while len(self._held) > self._max:
            _, old = self._held.popitem(last=False)
            out += [(h, self._own(h)) for h in old]
        return out

    def missed(self, hop: str, session: str, seq: int) -> list[tuple[Measurement, float]]:
        """Record that ``hop`` missed marker ``seq`` of ``session``; return what that releases."""
        key = (session, seq)
        self._outcomes(key).setdefault(hop, None)
        out = self._release(key)
        self._forget_if_done(key)
        return out

    def flush(self) -> list[tuple[Measurement, float]]:
        """Everything still held, with the own latency known now."""
        out = [(m, self._own(m)) for held in self._held.values() for m in held]
        self._held.clear()
        return out

    def own_now(self, m: Measurement) -> float:
        """Record ``m`` and return its own latency against what is known now (no holding)."""
        self._record(m)
        return self._own(m)

    def _forget_if_done(self, key: tuple[str, int]) -> None:
        """Drop a marker once every hop that joined its session has an outcome for it and
        nothing waits on it: memory then follows the markers in flight, not the run."""
        joined = self._joined.get(key[0])
        seen = self._markers.get(key)
        if joined and seen is not None and key not in self._held and joined <= seen.keys():
            del self._markers[key]

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
        mine = self.rank(m.hop)
        earlier = [
            (self.rank(h), v) for h, v in seen.items() if v is not None and self.rank(h) < mine
        ]
        if not earlier:
            return m.latency_s
        return m.latency_s - max(earlier)[1]

    def _waiting(self, m: Measurement) -> bool:
        seen = self._markers.get((m.session, m.seq), {})
        mine = self.rank(m.hop)
        return any(
            h not in seen and self.rank(h) < mine for h in self._joined.get(m.session, ())
        )

    def _release(self, key: tuple[str, int]) -> list[tuple[Measurement, float]]:
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
