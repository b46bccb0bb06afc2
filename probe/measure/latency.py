"""Per-hop latencies: the pipeline order of hops and each hop's own share of the latency.

A hop's cumulative latency for a marker is its arrival time minus the marker's send time; its own
latency is that minus the cumulative latency of the hop before it, for the same marker
(PROTOCOL.md section 4). When the previous hop missed the marker, the nearest earlier hop that saw
it stands in; the first hop (in order) that saw it owns its whole cumulative latency.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence

from probe.measure.registry import Measurement

__all__ = ["RETURN_HOP", "hop_order", "own_latencies"]

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
