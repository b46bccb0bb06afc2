from __future__ import annotations

import numpy as np
import pytest

from probe.errors import ConfigError
from probe.measure.reply import MissedReply, ReplyTracker

RATE = 16000


def tone(seconds: float, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(round(seconds * RATE))) / RATE
    return (amp * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


def silence(seconds: float, noise: float = 0.0) -> np.ndarray:
    n = int(round(seconds * RATE))
    return (noise * np.random.default_rng(1).standard_normal(n)).astype(np.float32)


def feed_in_chunks(
    tr: ReplyTracker, session: str, x: np.ndarray, t0: float, chunk: int = 333
) -> list[float]:
    out: list[float] = []
    for i in range(0, len(x), chunk):
        out += tr.feed(session, x[i : i + chunk], RATE, t0 + i / RATE)
    return out


def test_onset_after_utterance_end() -> None:
    tr = ReplyTracker()
    tr.utterance_end("s", 10.0)
    # Quiet (-70 dBFS noise) until 10.8 s, then the reply.
    x = np.concatenate([silence(0.8, noise=3e-4), tone(1.0)])
    got = feed_in_chunks(tr, "s", x, 10.0)
    assert len(got) == 1
    assert got[0] == pytest.approx(0.8, abs=0.011)
    assert tr.latencies == got
    assert tr.expire(100.0) == []


def test_short_click_is_not_an_onset() -> None:
    tr = ReplyTracker(min_onset_s=0.03)
    tr.utterance_end("s", 0.0)
    x = np.concatenate([silence(0.3), tone(0.015), silence(0.3), tone(0.5)])
    got = feed_in_chunks(tr, "s", x, 0.0, chunk=160)
    assert got == [pytest.approx(0.615, abs=0.011)]


def test_one_latency_per_utterance_and_sound_already_playing_is_ignored() -> None:
    tr = ReplyTracker()
    # Sound that starts before the utterance ends is not its reply.
    x = np.concatenate([tone(1.0), silence(0.5), tone(0.5)])
    tr.utterance_end("s", 0.5)
    got = tr.feed("s", x, RATE, 0.0)
    assert got == [pytest.approx(1.0, abs=0.011)]
    # The second burst had no utterance waiting: nothing more.
    more = tr.feed("s", np.concatenate([silence(0.2), tone(0.3)]), RATE, 2.0)
    assert more == []


def test_missed_reply_after_max_wait_and_passed_over_utterances() -> None:
    tr = ReplyTracker(max_wait_s=2.0)
    tr.utterance_end("s", 0.0)
    assert tr.feed("s", silence(1.0), RATE, 0.0) == []
    assert tr.expire(1.9) == []
    assert tr.expire(2.1) == [MissedReply("s", 0.0)]
    assert tr.expire(5.0) == []
    # Two utterances, one reply: the latest utterance owns it, the earlier one is missed.
    tr.utterance_end("s", 10.0)
    tr.utterance_end("s", 11.0)
    got = tr.feed("s", np.concatenate([silence(1.5), tone(0.5)]), RATE, 10.0)
    assert got == [pytest.approx(0.5, abs=0.011)]
    assert tr.expire(12.0) == [MissedReply("s", 10.0)]


def test_reply_too_late_is_missed_not_measured() -> None:
    tr = ReplyTracker(max_wait_s=1.0)
    tr.utterance_end("s", 0.0)
    assert tr.feed("s", np.concatenate([silence(1.5), tone(0.2)]), RATE, 0.0) == []
    assert tr.expire(1.2) == [MissedReply("s", 0.0)]


def test_sessions_are_independent_and_threshold_applies() -> None:
    tr = ReplyTracker(threshold_dbfs=-20.0)
    tr.utterance_end("a", 0.0)
    tr.utterance_end("b", 0.0)
    # -30 dBFS tone: below a -20 dBFS threshold.
    assert tr.feed("a", tone(0.5, amp=0.0447), RATE, 0.0) == []
    assert tr.feed("b", np.concatenate([silence(0.2), tone(0.5)]), RATE, 0.0) == [
        pytest.approx(0.2, abs=0.011)
    ]
    tr.close("a")
    assert tr.expire(0.5) == [MissedReply("a", 0.0)]


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError):
        ReplyTracker(min_onset_s=0)
    with pytest.raises(ConfigError):
        ReplyTracker().feed("s", silence(0.1), 0, 0.0)


def test_a_pause_with_no_audio_at_all_counts_as_silence() -> None:
    """Discontinuous transmission: two loud replies with nothing sent between them."""
    rate = 8000
    tone = np.full(int(0.3 * rate), 0.3)
    tr = ReplyTracker(max_wait_s=5.0)
    tr.utterance_end("s", 1.0)
    tr.feed("s", tone, rate, 1.5)
    tr.utterance_end("s", 3.0)
    # Nothing arrives between 1.8 s and 3.4 s; the second reply is a new onset.
    tr.feed("s", tone, rate, 3.4)
    assert [round(x, 6) for x in tr.latencies] == [0.5, 0.4]
    assert tr.answers == [(1.0, tr.latencies[0]), (3.0, tr.latencies[1])]
