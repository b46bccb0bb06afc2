"""The load generator's own health: is it keeping up, or would its figures blame the target?

A probe that cannot send its frames on time, or whose sink cannot search what arrives, measures
itself, not the system under test: late frames read as latency, unsearched audio as lost markers.
:class:`GeneratorHealth` is fed the generator's own signals, each with its time on the run's
clock, and says when they pass the stated bounds (:class:`Bounds`):

- **send lag**: more than 1 % of the frames of the last ``window_s`` were handed to the socket more
  than ``send_lag_s`` after they were due (the p99 is past the bound);
- **detection delay**: audio waited longer than ``detection_delay_s`` between its arrival and its
  search (the sink's backlog);
- **CPU**: a process (the worker, the sink child) used at least ``cpu_share`` of a core over the
  window; one Python process cannot use more than one, so it is saturated;
- **sink backlog**: return-direction audio queued for the sink child, not yet handed to it,
  reached the parent's byte bound (the child reads slower than audio comes back); audio past the
  bound is dropped unsearched and counted as shed;
- **a silent process**: the sink child, which reports its health four times a second, has not
  been heard from for longer than the detection-delay bound (its loop is starved or hung: what
  it holds is not being searched);
- **a dead process**: the sink child died (``sink_died``): nothing is detected any more, for
  the rest of the run.

The generator is *overloaded* from the first breach until every signal has stayed within its bound
for a whole window. The overloaded periods are kept (with their evidence), so a marker whose
wait for detection overlapped one counts as *unmeasured*, not missed: nobody can say whether the
target lost it. Pure and clock-free: callers pass times; not thread-safe (callers lock).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any

__all__ = ["Bounds", "Breach", "GeneratorHealth", "bounds_for"]


@dataclass(frozen=True)
class Bounds:
    """What the generator must stay within; see the module docstring."""

    send_lag_s: float = 0.020
    lag_share: float = 0.01
    detection_delay_s: float = 2.0
    cpu_share: float = 0.95
    window_s: float = 10.0


def bounds_for(marker_timeout_s: float, bounds: Bounds | None = None) -> Bounds:
    """``bounds`` (default :class:`Bounds`) with the detection-delay bound at most half the
    marker timeout: a backlog has to be flagged before the markers it holds back expire, or
    they would be counted missed, blamed on the target."""
    b = bounds or Bounds()
    if b.detection_delay_s <= marker_timeout_s / 2:
        return b
    return replace(b, detection_delay_s=marker_timeout_s / 2)


@dataclass(frozen=True)
class Breach:
    """A signal past its bound: what, how far, the bound, and when it was first seen."""

    signal: str
    value: float
    bound: float
    at: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "signal": self.signal,
            "value": round(self.value, 4),
            "bound": self.bound,
            "at": round(self.at, 3),
        }


@dataclass
class _Period:
    start: float
    end: float | None = None
    evidence: dict[str, Breach] = field(default_factory=dict)


class GeneratorHealth:
    """Watches the generator's signals against :class:`Bounds` (module docstring)."""

    def __init__(self, bounds: Bounds | None = None) -> None:
        self.bounds = bounds or Bounds()
        # Send lag per whole second of the run's clock: second -> [frames, frames late].
        self._lag: deque[tuple[int, list[int]]] = deque()
        self._delay: deque[tuple[float, float]] = deque()  # (time, delay) past the bound
        # (time, bytes queued, the bound) each time the sink child's backlog reached its bound
        self._backlog: deque[tuple[float, float, float]] = deque()
        self._cpu: dict[str, tuple[float, float]] = {}  # who -> (time, share), the latest
        self._heard: dict[str, float] = {}  # who -> when it last reported (while it should)
        self._gone: set[str] = set()  # stopped as asked: a late report does not count
        self._periods: list[_Period] = []
        self._calm_since: float | None = None
        self.frames = 0
        self.late_frames = 0
        self.frames_shed = 0
        self._dead: Breach | None = None

    # -- signals --------------------------------------------------------------------------------

    def frame_lag(self, at: float, lag_s: float) -> None:
        """A frame was handed to its socket ``lag_s`` after it was due, at ``at``."""
        second = int(at)
        if not self._lag or self._lag[-1][0] != second:
            self._lag.append((second, [0, 0]))
        bucket = self._lag[-1][1]
        bucket[0] += 1
        self.frames += 1
        if lag_s > self.bounds.send_lag_s:
            bucket[1] += 1
            self.late_frames += 1

    def detection_delay(self, at: float, delay_s: float) -> None:
        """The sink searched audio that had waited ``delay_s`` since it arrived."""
        if delay_s > self.bounds.detection_delay_s:
            self._delay.append((at, delay_s))

    def backlog(self, at: float, queued_bytes: float, bound_bytes: float) -> None:
        """Audio queued for the sink child reached ``bound_bytes`` (``queued_bytes`` waiting)
        at ``at``: the child is not keeping up, and what comes meanwhile is dropped."""
        self._backlog.append((at, queued_bytes, bound_bytes))

    def cpu(self, at: float, who: str, share: float) -> None:
        """Process ``who`` used ``share`` of a core over the window ending at ``at``."""
        self._cpu[who] = (at, share)

    def heard(self, at: float, who: str | None = None, *, gone: str | None = None) -> None:
        """Process ``who`` reported at ``at`` (it reports regularly from now on); ``gone``: that
        process was stopped as asked and is no longer expected to report."""
        if gone is not None:
            self._gone.add(gone)
            self._heard.pop(gone, None)
        if who is not None and who not in self._gone:
            self._heard[who] = at

    def dead(self, at: float, who: str) -> None:
        """Process ``who`` (``sink``) died at ``at``: the generator stays overloaded from then
        on (nothing it owes can be measured any more; the period never closes)."""
        if self._dead is None:
            self._dead = Breach(f"{who}_died", 1.0, 0.0, at)

    def shed(self, frames: int) -> None:
        """The sink dropped ``frames`` frames unsearched: they waited past the marker timeout,
        so nothing found in them could have counted (overload sheds them to catch up)."""
        self.frames_shed += frames

    # -- verdict --------------------------------------------------------------------------------

    def update(self, now: float) -> bool:
        """Judge the window ending at ``now``; True while the generator is overloaded."""
        breaches = self._breaches(now)
        current = self._periods[-1] if self._periods and self._periods[-1].end is None else None
        if breaches:
            self._calm_since = None
            if current is None:
                current = _Period(start=min(b.at for b in breaches))
                self._periods.append(current)
            for b in breaches:
                current.evidence.setdefault(b.signal, b)
                if b.value > current.evidence[b.signal].value:
                    current.evidence[b.signal] = Breach(
                        b.signal, b.value, b.bound, current.evidence[b.signal].at
                    )
        elif current is not None:
            if self._calm_since is None:
                self._calm_since = now
            if now - self._calm_since >= self.bounds.window_s:
                current.end = now
                self._calm_since = None
        return self.overloaded

    @property
    def overloaded(self) -> bool:
        return bool(self._periods) and self._periods[-1].end is None

    def overlapped(self, t0: float, t1: float) -> bool:
        """Whether the generator was overloaded at any time in ``[t0, t1]``."""
        for p in reversed(self._periods):
            if p.start <= t1 and (p.end is None or p.end >= t0):
                return True
            if p.end is not None and p.end < t0:
                return False
        return False

    def summary(self) -> dict[str, Any]:
        """What the report says of the generator: overloaded at all, when, and why."""
        return {
            "overloaded": bool(self._periods),
            "periods": [
                {
                    "start": round(p.start, 3),
                    "end": None if p.end is None else round(p.end, 3),
                    "evidence": [b.as_dict() for b in p.evidence.values()],
                }
                for p in self._periods
            ],
            "frames": self.frames,
            "late_frames": self.late_frames,
            "frames_shed": self.frames_shed,
            "bounds": {
                "send_lag_p99_ms": self.bounds.send_lag_s * 1000.0,
                "detection_delay_s": self.bounds.detection_delay_s,
                "cpu_share": self.bounds.cpu_share,
                "window_s": self.bounds.window_s,
            },
        }

    def _breaches(self, now: float) -> list[Breach]:
        b = self.bounds
        start = now - b.window_s
        while self._lag and self._lag[0][0] < int(start):
            self._lag.popleft()
        while self._delay and self._delay[0][0] < start:
            self._delay.popleft()
        while self._backlog and self._backlog[0][0] < start:
            self._backlog.popleft()
        out: list[Breach] = []
        frames = sum(v[0] for _, v in self._lag)
        late = sum(v[1] for _, v in self._lag)
        if frames and late > b.lag_share * frames:
            # Since the first second of the window that was late by itself.
            first = next((sec for sec, (n, k) in self._lag if k > b.lag_share * n), int(now))
            out.append(Breach("send_lag", late / frames, b.lag_share, float(first)))
        if self._delay:
            out.append(
                Breach("detection_delay", max(d for _, d in self._delay), b.detection_delay_s,
                       self._delay[0][0])
            )
        if self._backlog:
            out.append(
                Breach("sink_backlog", max(q for _, q, _ in self._backlog), self._backlog[0][2],
                       self._backlog[0][0])
            )
        for who, at in self._heard.items():
            if now - at > b.detection_delay_s:
                out.append(Breach(f"{who}_silent", now - at, b.detection_delay_s, at))
        for who, (at, share) in self._cpu.items():
            if at >= start and share >= b.cpu_share:
                out.append(Breach(f"cpu_{who}", share, b.cpu_share, at))
        if self._dead is not None:
            out.append(self._dead)
        return out
