"""Text results: shapes, placement on utterances, the figures, word errors (pure)."""

from __future__ import annotations

import json

import pytest

from probe.errors import ConfigError
from probe.measure.conversation import Figure, ResultTiming
from probe.measure.results import (
    PRESETS,
    Malformed,
    ResultTracker,
    Utterance,
    parse_shape,
    word_errors,
    words_of,
)

RATE = 16000
FRAME = 320  # 20 ms
T0 = 1000.0


def _tracker(shape: str = "generic", fields: str | None = None, **kw: object) -> ResultTracker:
    # Two utterances: 0.5-2.0 s ("hello there world") and 3.0-4.0 s ("good bye").
    utts = [
        Utterance(8000, 32000, "Hello there, world."),
        Utterance(48000, 64000, "Good bye!"),
    ]
    t = ResultTracker(
        "s1", shape=parse_shape(shape, fields), rate=RATE, frame_len=FRAME, utterances=utts,
        **kw,  # type: ignore[arg-type]
    )
    return t


def _send_all(t: ResultTracker, seconds: float = 5.0) -> None:
    for n in range(int(seconds * RATE / FRAME)):
        t.frame_sent(n, T0 + n * FRAME / RATE)


def _generic(kind: str, text: str, start: float | None, end: float | None) -> str:
    msg: dict[str, object] = {"type": kind, "text": text}
    if start is not None:
        msg["start"] = start
    if end is not None:
        msg["end"] = end
    return json.dumps(msg)


def test_result_latency_is_arrival_minus_send_time_of_the_covered_end() -> None:
    t = _tracker()
    _send_all(t)
    out = t.receive(_generic("partial", "hello", 0.5, 1.0), T0 + 1.0 + 0.150)
    r = out[0]
    assert isinstance(r, ResultTiming)
    assert r.kind == "interim" and r.utterance == 0
    assert r.latency_s == pytest.approx(0.150, abs=1e-9)
    first = out[1]
    assert isinstance(first, Figure) and first.name == "first_interim"
    assert first.latency_s == pytest.approx(1.150 - 0.5, abs=1e-9)


def test_final_after_the_utterance_end_gives_the_finalization_delay() -> None:
    t = _tracker()
    _send_all(t)
    t.receive(_generic("partial", "hello", 0.5, 1.0), T0 + 1.2)
    out = t.receive(_generic("final", "hello there world", 0.5, 2.0), T0 + 2.0 + 0.4)
    assert isinstance(out[0], ResultTiming) and out[0].latency_s == pytest.approx(0.4)
    fig = [f for f in out if isinstance(f, Figure)]
    assert [f.name for f in fig] == ["final_delay"]
    assert fig[0].latency_s == pytest.approx(0.4, abs=1e-9)
    # A second final for the same utterance does not settle it again.
    again = t.receive(_generic("final", "world", 1.5, 2.0), T0 + 2.6)
    assert not [f for f in again if isinstance(f, Figure)]


def test_a_final_before_the_end_is_a_split_not_the_finalization() -> None:
    t = _tracker()
    _send_all(t)
    out = t.receive(_generic("final", "hello", 0.5, 1.0), T0 + 1.1)
    assert not [f for f in out if isinstance(f, Figure) and f.name == "final_delay"]
    out = t.receive(_generic("final", "there world", 1.0, 2.0), T0 + 2.3)
    got = {f.name: f for f in out if isinstance(f, Figure)}
    assert got["final_delay"].latency_s == pytest.approx(0.3)
    assert got["first_interim"].latency_s is None
    assert got["first_interim"].why == "no interim before the final"
    figures, words = t.close()
    # The first utterance's two finals together are its script; the second got none.
    assert words is not None and words.errors == 2 and words.words == 5
    assert words.hypothesis == "hello there world"


def test_results_without_offsets_are_counted_and_placed_by_arrival() -> None:
    t = _tracker()
    _send_all(t)
    out = t.receive(_generic("partial", "hello", None, None), T0 + 0.9)
    assert isinstance(out[0], ResultTiming) and out[0].latency_s is None
    assert out[0].utterance == 0
    out = t.receive(_generic("final", "hello there world", None, None), T0 + 2.5)
    assert out[0].utterance == 0  # type: ignore[union-attr]
    assert [f.name for f in out if isinstance(f, Figure)] == ["final_delay"]
    # The second utterance's final, late but before the timeout.
    out = t.receive(_generic("final", "good bye", None, None), T0 + 4.7)
    assert out[0].utterance == 1  # type: ignore[union-attr]


def test_malformed_and_foreign_messages() -> None:
    t = _tracker()
    _send_all(t)
    assert t.receive("{not json", T0 + 1) == [Malformed("not JSON")]
    assert t.receive("[1, 2]", T0 + 1) == [Malformed("not a JSON object")]
    assert t.receive('{"type": "keepalive"}', T0 + 1) == []
    assert t.receive('{"event": "media"}', T0 + 1) == []
    bad_text = t.receive('{"type": "final", "text": 7}', T0 + 1)
    assert bad_text == [Malformed("text is not a string")]
    bad_off = t.receive('{"type": "final", "text": "a", "end": "soon"}', T0 + 1)
    assert bad_off == [Malformed("end is not a non-negative number")]
    ahead = t.receive(_generic("partial", "x", 0.0, 99.0), T0 + 1)
    assert Malformed("end offset after the audio sent") in ahead


def test_never_finalized_utterances_are_missed_at_close() -> None:
    t = _tracker()
    _send_all(t)
    figures, words = t.close()
    names = sorted((f.name, f.why) for f in figures)
    assert names == [
        ("final_delay", "no final before the stream ended"),
        ("final_delay", "no final before the stream ended"),
        ("first_interim", "no interim"),
        ("first_interim", "no interim"),
    ]
    assert words is not None and words.errors == 5 and words.words == 5


def test_an_utterance_not_sent_whole_is_not_owed() -> None:
    t = _tracker()
    _send_all(t, seconds=3.5)  # the second utterance (3.0-4.0 s) is cut
    t.receive(_generic("final", "hello there world", 0.5, 2.0), T0 + 2.3)
    assert t.settled()
    figures, words = t.close()
    assert figures == []
    assert words is not None and words.words == 3 and words.errors == 0


def test_settled_waits_for_every_final() -> None:
    t = _tracker()
    _send_all(t)
    assert not t.settled()
    t.receive(_generic("final", "hello there world", 0.5, 2.0), T0 + 2.3)
    assert not t.settled()
    t.receive(_generic("final", "good bye", 3.0, 4.0), T0 + 4.3)
    assert t.settled()


def test_a_final_later_than_the_timeout_is_missed() -> None:
    t = _tracker(timeout_s=1.0)
    _send_all(t)
    out = t.receive(_generic("final", "hello there world", 0.5, 2.0), T0 + 3.5)
    fig = [f for f in out if isinstance(f, Figure) and f.name == "final_delay"]
    assert fig[0].latency_s is None and fig[0].why == "no final within 1 s"


def test_deepgram_preset_uses_start_plus_duration() -> None:
    t = _tracker("deepgram")
    _send_all(t)
    msg = {
        "type": "Results", "is_final": True, "speech_final": True, "start": 0.5,
        "duration": 1.5, "channel": {"alternatives": [{"transcript": "hello there world"}]},
    }
    out = t.receive(json.dumps(msg), T0 + 2.25)
    assert isinstance(out[0], ResultTiming) and out[0].kind == "final"
    assert out[0].latency_s == pytest.approx(0.25)
    assert t.receive(json.dumps({"type": "Metadata", "request_id": "x"}), T0 + 3) == []
    # is_final 1 is not JSON true: not a result of this shape.
    assert t.receive(json.dumps({**msg, "is_final": 1}), T0 + 3) == []


def test_seed_preset_in_milliseconds() -> None:
    t = _tracker("seed")
    _send_all(t)
    msg = {"type": "result", "final": False, "text": "hello", "start_ms": 500, "end_ms": 1000,
           "trace_id": "ab" * 16}
    out = t.receive(json.dumps(msg), T0 + 1.1)
    assert isinstance(out[0], ResultTiming) and out[0].latency_s == pytest.approx(0.1)


def test_fields_override_a_preset() -> None:
    shape = parse_shape("generic", "kind=status,final=done|closed,interim=partial,"
                        "text=alt.0.words,end=stop,unit=samples")
    assert shape.kind == "status" and shape.final == ("done", "closed")
    assert shape.text == "alt.0.words" and shape.end == "stop" and shape.unit == "samples"
    t = ResultTracker("s", shape=shape, rate=RATE, frame_len=FRAME,
                      utterances=[Utterance(0, 16000, "a b")])
    _send_all(t, 2.0)
    out = t.receive(json.dumps({"status": "closed", "alt": [{"words": "a b"}], "stop": 16000}),
                    T0 + 1.3)
    assert isinstance(out[0], ResultTiming) and out[0].latency_s == pytest.approx(0.3)
    assert parse_shape("deepgram", "final=true").final == (True,)


@pytest.mark.parametrize(
    ("preset", "fields", "says"),
    [
        ("nope", None, "--results must be one of"),
        ("generic", "colour=red", "key=value pairs"),
        ("generic", "unit=hours", "unit must be s, ms or samples"),
        ("generic", "text=", "needs a path"),
        ("generic", "final=", "needs at least one value"),
    ],
)
def test_bad_shapes_are_one_sentence(preset: str, fields: str | None, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        parse_shape(preset, fields)


def test_word_errors() -> None:
    assert words_of("Hello, World! It's 3 o\u2019clock.") == [
        "hello", "world", "it's", "3", "o'clock"
    ]
    assert word_errors(["a", "b", "c"], ["a", "b", "c"]) == 0
    assert word_errors(["a", "x", "c"], ["a", "b", "c"]) == 1
    assert word_errors(["a", "c"], ["a", "b", "c"]) == 1
    assert word_errors(["a", "b", "c", "d"], ["a", "b", "c"]) == 1
    assert word_errors([], ["a", "b"]) == 2
    assert set(PRESETS) == {"seed", "deepgram", "generic"}


def test_a_stream_the_probe_cut_short_owes_no_pending_final() -> None:
    t = _tracker()
    _send_all(t)
    t.receive(_generic("final", "hello there world", 0.5, 2.0), T0 + 2.3)
    figures, words = t.close(cut=True)
    assert figures == []
    # Only the finalized utterance is scored.
    assert words is not None and words.words == 3 and words.errors == 0
