"""Barge-in timing on the bot's playout (pure)."""

from __future__ import annotations

import numpy as np
import pytest

from probe.measure.barge import BargeDone, BargeTracker
from probe.measure.conversation import Figure

RATE = 8000
BLOCK = 160  # 20 ms


def _tone(n: int) -> np.ndarray:
    return 0.3 * np.sin(2 * np.pi * 440 * np.arange(n) / RATE)


def _play(tr: BargeTracker, t0: float, t1: float, *, loud_until: float | None,
          resume: tuple[float, float] | None = None, stop_sending: bool = False
          ) -> list[Figure | BargeDone]:
    """The bot's audio in 20 ms blocks from t0 to t1: loud until ``loud_until``, then
    silence (or nothing at all with ``stop_sending``), loud again in ``resume``."""
    out: list[Figure | BargeDone] = []
    t = t0
    while t < t1 - 1e-9:
        loud = (loud_until is None or t < loud_until) or (
            resume is not None and resume[0] <= t < resume[1]
        )
        if loud:
            out += tr.feed(_tone(BLOCK), RATE, t)
        elif stop_sending:
            out += tr.tick(t)
        else:
            out += tr.feed(np.zeros(BLOCK), RATE, t)
        t += BLOCK / RATE
    return out


def _figures(events: list[Figure | BargeDone], name: str) -> list[Figure]:
    return [e for e in events if isinstance(e, Figure) and e.name == name]


@pytest.mark.parametrize("stop_sending", [False, True])
def test_barge_in_latency_is_barge_start_to_silence(stop_sending: bool) -> None:
    tr = BargeTracker("s", silence_s=0.3)
    out = _play(tr, 10.0, 11.0, loud_until=None)
    out += tr.barge(11.0, 12.0)
    out += _play(tr, 11.0, 13.0, loud_until=11.11, stop_sending=stop_sending)
    fig = _figures(out, "barge_in")
    assert len(fig) == 1
    assert fig[0].latency_s == pytest.approx(0.12, abs=0.011)
    done = [e for e in out if isinstance(e, BargeDone)]
    assert done == [BargeDone("s", False)]


def test_talking_over_the_caller_is_flagged() -> None:
    tr = BargeTracker("s", silence_s=0.3)
    _play(tr, 10.0, 11.0, loud_until=None)
    out = tr.barge(11.0, 12.0)
    out += _play(tr, 11.0, 13.0, loud_until=11.09, resume=(11.61, 12.5))
    assert _figures(out, "barge_in")[0].latency_s == pytest.approx(0.1, abs=0.011)
    assert [e for e in out if isinstance(e, BargeDone)] == [BargeDone("s", True)]


def test_a_bot_that_keeps_talking_is_missed() -> None:
    tr = BargeTracker("s", silence_s=0.3, timeout_s=2.0)
    _play(tr, 10.0, 11.0, loud_until=None)
    out = tr.barge(11.0, 12.0)
    out += _play(tr, 11.0, 13.5, loud_until=None)
    fig = _figures(out, "barge_in")
    assert fig and fig[0].latency_s is None and fig[0].why == "the bot kept talking"


def test_a_bot_already_silent_is_not_timed_as_zero() -> None:
    tr = BargeTracker("s", silence_s=0.3)
    _play(tr, 10.0, 11.0, loud_until=10.5)
    out = tr.barge(11.0, 12.0)
    out += _play(tr, 11.0, 12.5, loud_until=10.5)
    fig = _figures(out, "barge_in")
    assert fig[0].latency_s is None
    assert fig[0].why == "the bot was already silent when the barge-in began"


def test_clear_is_timed_and_drops_the_queued_audio() -> None:
    tr = BargeTracker("s", silence_s=0.3, expect_clear=True)
    # The bot sends 3 s of audio at once at t=10: it plays until 13.
    tr.feed(_tone(3 * RATE), RATE, 10.0)
    out = tr.barge(11.0, 12.0)
    out += tr.clear(11.2)
    assert _figures(out, "clear")[0].latency_s == pytest.approx(0.2)
    out += tr.tick(11.6)
    fig = _figures(out, "barge_in")
    assert fig[0].latency_s == pytest.approx(0.2)
    out += tr.tick(12.1)
    assert [e for e in out if isinstance(e, BargeDone)] == [BargeDone("s", False)]


def test_no_clear_is_missed_in_twilio() -> None:
    tr = BargeTracker("s", silence_s=0.3, expect_clear=True)
    _play(tr, 10.0, 11.0, loud_until=None)
    out = tr.barge(11.0, 12.0)
    out += _play(tr, 11.0, 12.0, loud_until=11.1)
    out += tr.close()
    clear = _figures(out, "clear")
    assert clear and clear[0].latency_s is None and clear[0].why == "no clear event"


def test_a_barge_in_open_at_the_end_is_judged_at_that_time() -> None:
    tr = BargeTracker("s", silence_s=0.2)
    out = _play(tr, 0.0, 1.0, loud_until=None)
    out += tr.barge(0.8)
    out += tr.ended(1.8)
    # Nothing more arrives; the stream ends at 2.0.
    out += tr.tick(2.0) + tr.close()
    fig = _figures(out, "barge_in")
    assert [f.latency_s for f in fig] == [pytest.approx(0.2)]
    assert [e for e in out if isinstance(e, BargeDone)] == [BargeDone("s", False)]
