"""Voice-to-voice latency for hops that answer with their own voice instead of passing audio on.

The probe notes when it finished each utterance; the reply audio is cut into 10 ms frames and the
reply's onset is the start of the first run of frames, each louder than ``threshold_dbfs`` (RMS
relative to a full-scale 1.0 RMS), lasting at least ``min_onset_s``, that starts at or after the
utterance's end. Sound already playing when the utterance ends is not an onset: the reply must
start afresh. Systems that send nothing between replies (discontinuous transmission) are handled:
a pause of more than ``GAP_S`` with no audio received at all counts as silence.

One onset answers the latest utterance that ended before it; utterances before that one were
passed over without a reply and are reported missed, as are utterances still unanswered
``max_wait_s`` after they ended (:meth:`ReplyTracker.expire`). Not thread-safe: feed one tracker
from one thread.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from probe.errors import ConfigError

__all__ = ["FRAME_S", "MissedReply", "ReplyTracker"]

FRAME_S = 0.010
# A pause in the reply stream this long (no audio received at all) counts as silence.
GAP_S = 0.100
_F64 = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class MissedReply:
    """An utterance that got no reply within the wait (or was passed over by a later one)."""

    session: str
    utterance_end: float


@dataclass(slots=True)
class _Stream:
    rate: int = 0
    rest: _F64 = field(default_factory=lambda: np.zeros(0, dtype=np.float64))
    run_start: float | None = None
    run_frames: int = 0
    onset_done: bool = False
    # When the audio received so far ends (arrival of the last block plus its length).
    heard_until: float | None = None
    waiting: list[float] = field(default_factory=list)


class ReplyTracker:
    """Reply onsets after utterance ends, per session (module docstring)."""

    def __init__(
        self,
        *,
        threshold_dbfs: float = -40.0,
        min_onset_s: float = 0.03,
        max_wait_s: float = 10.0,
    ) -> None:
        if not min_onset_s > 0:
            raise ConfigError(f"min_onset_s must be positive seconds, got {min_onset_s}.")
        if not max_wait_s > 0:
            raise ConfigError(f"max_wait_s must be positive seconds, got {max_wait_s}.")
        self.threshold_dbfs = float(threshold_dbfs)
        self.min_onset_s = float(min_onset_s)
        self.max_wait_s = float(max_wait_s)
        self._min_frames = max(1, math.ceil(self.min_onset_s / FRAME_S - 1e-9))
        # Compare mean squares, not dB: no log of every frame.
        self._threshold_ms = 10.0 ** (self.threshold_dbfs / 10.0)
        self._streams: dict[str, _Stream] = {}
        self._missed: list[MissedReply] = []
        self.latencies: list[float] = []
        # (utterance end, latency) of every reply, in the order found.
        self.answers: list[tuple[float, float]] = []

    def utterance_end(self, session: str, t: float) -> None:
        """The probe finished an utterance at ``t`` (same clock as arrival times)."""
        self._streams.setdefault(session, _Stream()).waiting.append(t)

    def feed(
        self, session: str, samples: npt.ArrayLike, rate: int, arrival_time: float
    ) -> list[float]:
        """Reply audio (float samples, ``arrival_time`` of the first); returns new reply latencies
        (onset minus utterance end, seconds)."""
        if rate <= 0:
            raise ConfigError(f"A sample rate is a positive number of Hz, got {rate}.")
        frame = int(round(rate * FRAME_S))
        if frame < 1:
            raise ConfigError(f"A sample rate of {rate} Hz is too low for 10 ms frames.")
        st = self._streams.setdefault(session, _Stream())
        x = np.asarray(samples, dtype=np.float64).ravel()
        if st.rate != rate:
            st.rate = rate
            st.rest = np.zeros(0, dtype=np.float64)
        # The held-back samples are placed just before this block's first sample, so every frame
        # is timed from the latest arrival stamp.
        if st.heard_until is not None and arrival_time - st.heard_until > GAP_S:
            # Nothing was sent for a while (discontinuous transmission between replies): that
            # was silence, so a sound after it is a new onset.
            st.rest = np.zeros(0, dtype=np.float64)
            st.run_start, st.run_frames, st.onset_done = None, 0, False
        st.heard_until = arrival_time + len(x) / rate
        t0 = arrival_time - len(st.rest) / rate
        buf = np.concatenate([st.rest, x]) if len(st.rest) else x
        whole = len(buf) - len(buf) % frame
        st.rest = buf[whole:].copy()
        if whole == 0:
            return []
        power = np.mean(buf[:whole].reshape(-1, frame) ** 2, axis=1)
        loud = power > self._threshold_ms
        out: list[float] = []
        for k, is_loud in enumerate(loud.tolist()):
            start = t0 + k * frame / rate
            if not is_loud:
                st.run_start, st.run_frames, st.onset_done = None, 0, False
                continue
            if st.run_start is None:
                st.run_start = start
            st.run_frames += 1
            if st.run_frames >= self._min_frames and not st.onset_done:
                st.onset_done = True
                latency = self._onset(session, st, st.run_start)
                if latency is not None:
                    out.append(latency)
        return out

    def _onset(self, session: str, st: _Stream, onset: float) -> float | None:
        answered = [t for t in st.waiting if t <= onset]
        if not answered:
            return None
        st.waiting = [t for t in st.waiting if t > onset]
        *passed_over, end = sorted(answered)
        self._missed.extend(MissedReply(session, t) for t in passed_over)
        latency = onset - end
        if latency > self.max_wait_s:
            self._missed.append(MissedReply(session, end))
            return None
        self.latencies.append(latency)
        self.answers.append((end, latency))
        return latency

    def expire(self, now: float) -> list[MissedReply]:
        """Utterances with no reply within ``max_wait_s`` of ``now``, plus any passed over; each
        is reported once."""
        out, self._missed = self._missed, []
        for session, st in self._streams.items():
            keep: list[float] = []
            for t in st.waiting:
                if now - t > self.max_wait_s:
                    out.append(MissedReply(session, t))
                else:
                    keep.append(t)
            st.waiting = keep
        return out

    def close(self, session: str) -> None:
        """Forget a session's audio state (its unanswered utterances are reported by expire)."""
        st = self._streams.pop(session, None)
        if st is not None:
            self._missed.extend(MissedReply(session, t) for t in st.waiting)
