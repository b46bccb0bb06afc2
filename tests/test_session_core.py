"""The sans-I/O session core: frames, schedule, wire messages, the return side, close wording."""

from __future__ import annotations

import json

import numpy as np

from probe.audio.formats import decode, encode
from probe.protocol import AudioFormat, TraceContext
from probe.session.core import ReturnSide, SessionCore, SourceConfig, Violation
from probe.session.frames import carrier
from probe.watermark.design import session_payload
from probe.watermark.detect import detect_all
from probe.watermark.embed import embed

CTX = TraceContext("a" * 32, "b" * 16, 1)


def _core(**kw: object) -> SessionCore:
    kw.setdefault("duration_s", 3.0)
    cfg = SourceConfig(target="ws://127.0.0.1:1/{session}", **kw)  # type: ignore[arg-type]
    return SessionCore(cfg, "s-1", CTX, lambda i: session_payload(0xABCDEF, i))


def test_frames_are_the_marked_carrier_and_each_marker_is_sent_with_its_frame() -> None:
    core = _core()
    assert core.url == "ws://127.0.0.1:1/s-1"
    start = json.loads(core.opening()[0])
    assert start["session"] == "s-1" and start["type"] == "start"
    pcm = b"".join(bytes(core.message(n)) for n in range(core.n_frames))
    samples, ref = carrier("speech_en_us", 16000, 3.0)
    marked, placements = embed(
        samples, 16000, lambda i: session_payload(0xABCDEF, i), reference_rms=ref
    )
    assert pcm == encode(marked, "pcm_s16le")
    found = {d.payload for d in detect_all(decode(pcm, "pcm_s16le"), 16000)}
    assert found == {p.payload for p in placements}
    sends = []
    for n in range(core.n_frames):
        s = core.sent(n, 100.0 + n * core.frame_s + 0.003, 0.003)
        sends += list(s.markers)
    assert [i for i, _ in sends] == [p.index for p in placements]
    for (_, t), p in zip(sends, placements, strict=True):
        # the frame's actual send time plus the marker's offset in it
        assert abs(t - (100.003 + p.sample / 16000)) < 1e-9
    # Open model: from the frame's due time, so lateness is not hidden.
    k = placements[0].sample // core.frame_len
    late = core.sent(k, 100.0 + k * core.frame_s + 0.050, 0.050, from_intended=True)
    assert abs(late.markers[0][1] - (100.0 + placements[0].sample / 16000)) < 1e-9


def test_reply_mode_cuts_turns_and_reports_each_utterance_end() -> None:
    core = _core(reply=True, utterance_s=1.0, gap_s=0.5)
    ends = []
    for n in range(core.n_frames):
        ends += list(core.sent(n, n * core.frame_s, 0.0).utterance_ends)
    assert np.allclose(ends, [1.0, 2.5], atol=1e-9)
    pcm = b"".join(bytes(core.message(n)) for n in range(core.n_frames))
    x = decode(pcm, "pcm_s16le")
    assert np.all(x[int(1.05 * 16000) : int(1.45 * 16000)] == 0)  # the gap is silent


def test_twilio_dialect_wraps_media_and_the_return_side_reads_both_dialects() -> None:
    core = _core(dialect="twilio")
    assert core.cfg.rate == 8000 and core.cfg.encoding == "mulaw"
    connected, start = (json.loads(m) for m in core.opening())
    assert connected["event"] == "connected" and start["event"] == "start"
    media = json.loads(core.message(0))
    assert media["event"] == "media"
    assert json.loads(core.closing())["event"] == "stop"
    plain = ReturnSide(AudioFormat("pcm_s16le", 16000, 1), None)
    assert [type(e).__name__ for e in plain.receive(b"\x00\x00" * 160)] == ["Audio"]
    new = plain.receive(json.dumps({"type": "start", "audio": {
        "encoding": "mulaw", "sample_rate": 8000, "channels": 1}}))
    assert new == [AudioFormat("mulaw", 8000, 1)] and plain.audio_format == new[0]
    bad = ReturnSide(AudioFormat("pcm_s16le", 16000, 1), None).receive(json.dumps(
        {"type": "start", "audio": {"encoding": "opus", "sample_rate": 8000, "channels": 1}}))
    assert len(bad) == 1 and isinstance(bad[0], Violation) and bad[0].reason


def test_close_wording() -> None:
    core = _core()
    assert core.closed(1008, "no", 0) == "target refused the stream: close 1008 no"
    after = "target closed the connection after 1.00 s: close 1011 boom"
    assert core.closed(1011, "boom", 50) == after
    assert core.incomplete(core.n_frames) is None
    assert core.incomplete(3) == f"stream ended after 3 of {core.n_frames} frames"
    assert core.connect_failed("HTTP 503") == "cannot connect to ws://127.0.0.1:1/s-1: HTTP 503"


def test_results_mode_sends_whole_script_sentences_with_silent_gaps() -> None:
    from probe.audio.fixtures import fixture_script

    script = fixture_script("speech_en_us")
    assert script
    cfg = SourceConfig(target="ws://127.0.0.1:1/{session}", duration_s=12.0, results="generic",
                       gap_s=1.0, rate=8000, encoding="mulaw")
    core = SessionCore(cfg, "s-1", CTX, lambda i: session_payload(0xABCDEF, i))
    texts = [u.text for u in core.utterances]
    assert texts == [s.text for s in script][: len(texts)] and len(texts) >= 2
    pcm = b"".join(bytes(core.message(n)) for n in range(core.n_frames))
    x = decode(pcm, "mulaw")
    for i, u in enumerate(core.utterances):
        sentence = script[i % len(script)]
        assert abs((u.end - u.start) - (sentence.end_s - sentence.start_s) * 8000) <= 1
    for a, b in zip(core.utterances, core.utterances[1:], strict=False):
        assert np.all(x[a.end : b.start] == 0)  # the gap after each is digital silence
        assert b.start - a.end == 8000
        assert x[a.end - 1] != 0 and x[a.start] != 0


def test_a_barge_in_fills_the_gap_with_speech_from_the_requested_time() -> None:
    core = _core(reply=True, utterance_s=1.0, gap_s=1.5, duration_s=4.0)
    base = 50.0
    sent = []
    for n in range(core.n_frames):
        if n == 60:  # 1.2 s: in the gap; the tap heard a reply onset and asks for 1.5 s
            core.request_barge(base + 1.5)
        msg = core.message(n)
        s = core.sent(n, base + n * core.frame_s, 0.0)
        sent.append((bytes(msg), s))
    starts = [(n, s.barge_start) for n, (_, s) in enumerate(sent) if s.barge_start is not None]
    ends = [s.barge_end for _, s in sent if s.barge_end is not None]
    assert len(starts) == 1 and len(ends) == 1
    (n0, t0), t1 = starts[0], ends[0]
    assert n0 == 75 and abs(t0 - (base + 1.5)) < 1e-9
    # It stops where the next utterance begins (2.5 s), 1 s of speech at most.
    assert abs(t1 - (base + 2.5)) < 1e-9
    x = decode(b"".join(m for m, _ in sent), "pcm_s16le")
    assert np.all(x[int(1.0 * 16000) + 320 : int(1.5 * 16000)] == 0)
    assert np.sqrt(np.mean(x[int(1.5 * 16000) : int(2.5 * 16000)] ** 2)) > 0.01


def test_no_barge_in_shorter_than_half_a_second() -> None:
    core = _core(reply=True, utterance_s=1.0, gap_s=1.0, duration_s=3.0)
    core.sent(0, 0.0, 0.0)
    core.request_barge(1.6)  # 0.4 s before the next utterance
    assert all(core.sent(n, n * core.frame_s, 0.0).barge_start is None
               for n in range(1, core.n_frames) if core.message(n) is not None)


def test_no_barge_in_over_the_probes_own_utterance() -> None:
    core = _core(reply=True, utterance_s=1.0, gap_s=1.0, duration_s=3.0)
    core.sent(0, 0.0, 0.0)
    core.request_barge(0.5)
    assert all(core.sent(n, n * core.frame_s, 0.0).barge_start is None
               for n in range(1, core.n_frames) if core.message(n) is not None)


def test_twilio_marks_are_answered_when_the_audio_before_them_has_played() -> None:
    core = _core(dialect="twilio")
    core.opening()
    core.played(0.5, 10.0)  # half a second of the bot's audio arrived at 10.0
    core.mark("reply-1", 10.01)
    assert core.outgoing(10.2) == []
    out = core.outgoing(10.5)
    assert [json.loads(m)["mark"]["name"] for m in out] == ["reply-1"]
    core.played(1.0, 11.0)
    core.mark("reply-2", 11.0)
    core.clear(11.3)  # queued audio dropped: pending marks are answered at once
    assert [json.loads(m)["mark"]["name"] for m in core.outgoing(11.3)] == ["reply-2"]
