"""Barge-in timing: how fast a voice bot stops talking when the caller interrupts it. Pure.

The probe starts speaking again (the barge-in) a set time into the bot's reply. The tracker
follows the bot's returned audio on a playout timeline, as a telephone would play it: each block
plays from its arrival or, when audio is still queued, from the end of what was queued (a bot
that sends faster than real time is heard as it would be played). A Twilio ``clear`` drops what
is queued at its arrival, as Twilio does.

- **barge_in**: from the first barge-in sample sent to the start of the first stretch of
  ``silence_s`` with no 10 ms frame above ``threshold_dbfs`` (nothing received counts as
  silence). A stretch that began before the barge-in means the bot was already quiet then: the
  figure is missed with that reason, not timed as zero. A bot still talking ``timeout_s`` after
  the barge-in began is missed too.
- **clear** (Twilio dialect): from the first barge-in sample sent to the ``clear`` event.
- **talked over**: the bot, once silent, sounded again (a run of at least ``min_loud_s``) before
  the caller's barge-in speech ended.

Not thread-safe: feed one tracker from one thread.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from probe.measure.conversation import Figure
from probe.measure.reply import FRAME_S

__all__ = ["BargeDone", "BargeTracker"]

_F64 = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class BargeDone:
    """A barge-in is settled: whether the bot talked over the caller afterwards."""

    session: str
    talked_over: bool


@dataclass(slots=True)
class _Barge:
    t0: float
    t1: float
    silent_at: float | None = None
    settled_silence: bool = False
    clear_done: bool = False
    talked_over: bool = False


class BargeTracker:
    """One session's barge-ins, timed on the bot's playout (module docstring)."""

    def __init__(
        self,
        session: str,
        *,
        threshold_dbfs: float = -40.0,
        silence_s: float = 0.2,
        min_loud_s: float = 0.03,
        timeout_s: float = 10.0,
        expect_clear: bool = False,
    ) -> None:
        self.session = session
        self.silence_s = silence_s
        self.timeout_s = timeout_s
        self.expect_clear = expect_clear
        self._threshold = 10.0 ** (threshold_dbfs / 10.0)
        self._min_loud = max(1, int(round(min_loud_s / FRAME_S)))
        self._rate = 0
        self._rest: _F64 = np.zeros(0)
        self._t_next: float | None = None  # where the next received sample plays
        self._quiet_start: float | None = None
        self._loud_start: float | None = None
        self._loud_frames = 0
        self._barge: _Barge | None = None

    @property
    def active(self) -> bool:
        return self._barge is not None

    def barge(self, t0: float, t1: float = math.inf) -> list[Figure | BargeDone]:
        """The probe's barge-in speech began going out at ``t0`` (and ends at ``t1``, when
        known; else :meth:`ended` says); an earlier barge-in still open is settled first."""
        out = self._settle(final=True) if self._barge is not None else []
        self._barge = _Barge(t0, t1)
        return out

    def ended(self, t1: float) -> list[Figure | BargeDone]:
        """The probe's barge-in speech was all sent by ``t1``."""
        if self._barge is not None:
            self._barge.t1 = t1
        return []

    def clear(self, arrival: float) -> list[Figure | BargeDone]:
        """The bot sent a Twilio ``clear``: queued audio is dropped."""
        if self._t_next is not None and self._t_next > arrival:
            self._t_next = arrival
            self._rest = np.zeros(0)
        b = self._barge
        if b is None or b.clear_done or arrival < b.t0:
            return []
        b.clear_done = True
        return [Figure(self.session, "clear", b.t0, arrival - b.t0)]

    def feed(self, samples: npt.ArrayLike, rate: int, arrival: float) -> list[Figure | BargeDone]:
        """Returned audio (float samples) that arrived at ``arrival``."""
        x = np.asarray(samples, dtype=np.float64).ravel()
        frame = max(1, int(round(rate * FRAME_S)))
        if rate != self._rate:
            self._rate, self._rest = rate, np.zeros(0)
        out = self.tick(arrival)
        start = arrival if self._t_next is None or self._t_next < arrival else self._t_next
        if self._t_next is None or self._t_next < arrival:
            self._rest = np.zeros(0)
        t0 = start - len(self._rest) / rate
        buf = np.concatenate([self._rest, x]) if len(self._rest) else x
        self._t_next = start + len(x) / rate
        whole = len(buf) - len(buf) % frame
        self._rest = buf[whole:].copy()
        if whole:
            power = np.mean(buf[:whole].reshape(-1, frame) ** 2, axis=1)
            for k, p in enumerate(power.tolist()):
                out += self._frame(t0 + k * frame / rate, frame / rate, p > self._threshold)
        return out

    def tick(self, now: float) -> list[Figure | BargeDone]:
        """Time passes: nothing received since the queued audio ended is silence."""
        if self._t_next is not None and now > self._t_next and self._quiet_start is None:
            self._quiet_start = self._t_next
            self._loud_start, self._loud_frames = None, 0
        out = self._check_silence(now)
        b = self._barge
        if b is not None and now >= b.t1 and (b.settled_silence or now - b.t0 > self.timeout_s):
            out += self._settle(final=now - b.t0 > self.timeout_s or b.settled_silence)
        return out

    def close(self) -> list[Figure | BargeDone]:
        """The stream is over: settle the open barge-in."""
        return self._settle(final=True) if self._barge is not None else []

    # -- inside ---------------------------------------------------------------------------------

    def _frame(self, t: float, dur: float, loud: bool) -> list[Figure | BargeDone]:
        if not loud:
            self._loud_start, self._loud_frames = None, 0
            if self._quiet_start is None:
                self._quiet_start = t
            return self._check_silence(t + dur)
        if self._loud_start is None:
            self._loud_start = t
        self._loud_frames += 1
        if self._loud_frames >= self._min_loud:
            out = self._check_silence(self._loud_start)
            self._quiet_start = None
            b = self._barge
            if b is not None and b.silent_at is not None and self._loud_start < b.t1:
                b.talked_over = True
            return out
        return []

    def _check_silence(self, now: float) -> list[Figure | BargeDone]:
        b = self._barge
        q = self._quiet_start
        if b is None or b.settled_silence or q is None or now - q < self.silence_s:
            return []
        if now < b.t0:
            return []
        b.settled_silence = True
        if q < b.t0:
            return [Figure(self.session, "barge_in", b.t0, None,
                           why="the bot was already silent when the barge-in began")]
        b.silent_at = q
        return [Figure(self.session, "barge_in", b.t0, q - b.t0)]

    def _settle(self, *, final: bool) -> list[Figure | BargeDone]:
        b = self._barge
        if b is None or not final:
            return []
        out: list[Figure | BargeDone] = []
        if not b.settled_silence:
            out.append(Figure(self.session, "barge_in", b.t0, None,
                              why="the bot kept talking"))
        if self.expect_clear and not b.clear_done:
            out.append(Figure(self.session, "clear", b.t0, None, why="no clear event"))
        out.append(BargeDone(self.session, b.talked_over))
        self._barge = None
        return out
