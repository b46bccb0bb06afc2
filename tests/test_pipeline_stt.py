"""The text hop: its spec language, and its sans-I/O core fed arrays (no sockets, no loop)."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest

from probe.audio.fixtures import SPEECH_FIXTURES, fixture_script, load_fixture
from probe.audio.formats import decode, encode
from probe.errors import ConfigError
from probe.pipeline import (
    HopSpec,
    SentenceBank,
    SpeechToTextCore,
    TextResult,
    TextSpec,
    configured_conversation,
    format_hops,
    parse_hops,
)

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
T0 = 1000.0


def _one_sentence(e: pytest.ExceptionInfo[ConfigError]) -> str:
    msg = str(e.value)
    assert msg.endswith(".") and "\n" not in msg and msg.count(". ") == 0, msg
    return msg


def _run(core: SpeechToTextCore, x: np.ndarray, rate: int, frame: float = 0.020,
         t0: float = T0) -> list[TextResult]:
    """Feed `x` in frames arriving exactly in real time from `t0`, then stop."""
    n = max(1, round(frame * rate))
    out: list[TextResult] = []
    for k in range(0, len(x), n):
        out += core.push(x[k:k + n], t0 + k / rate)
    return out + core.finish(t0 + len(x) / rate)


def _sentences(rate: int) -> list[tuple[str, str, np.ndarray]]:
    out = []
    for name in SPEECH_FIXTURES:
        x, _ = load_fixture(name, rate=rate)
        script = fixture_script(name)
        assert script is not None
        for s in script:
            out.append((name, s.text, x[round(s.start_s * rate):round(s.end_s * rate)]))
    return out


def _burst(seconds: float, rate: int, level: float = 0.1) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (level * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


def _bank(rate: int, *items: tuple[str, np.ndarray]) -> SentenceBank:
    return SentenceBank(rate, list(items))


# --- the spec ------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    "stt:150ms:text",
    "asr:20ms,codec:35ms:mulaw8k,stt:150ms:text=deepgram",
    "stt:0ms:text=generic:every=100ms:endpoint=1s",
    "stt:150ms:text:nooffsets:nofinal:badjson",
])
def test_text_hop_spec_round_trips(text: str) -> None:
    hops = parse_hops(text)
    assert format_hops(hops) == text
    assert parse_hops(format_hops(hops)) == hops
    assert hops[-1].text is not None


def test_text_hop_spec_fields() -> None:
    (hop,) = parse_hops("stt:150ms:text=deepgram:every=100ms:endpoint=0.5s:nooffsets:badjson")
    assert hop.delay == pytest.approx(0.15)
    assert hop.text == TextSpec(preset="deepgram", every=0.1, endpoint=0.5, offsets=False,
                                final=True, badjson=True)
    assert hop.max_delay == pytest.approx(0.65)  # the drain covers the endpoint too
    assert parse_hops("stt:150ms:text")[0].text == TextSpec()


@pytest.mark.parametrize(("text", "match"), [
    ("stt:150ms:text,after:10ms", "Text hop 'stt' must be the last hop"),
    ("stt:150ms:every=1s", "belongs to a text hop; add the text option"),
    ("stt:150ms:nofinal", "belongs to a text hop"),
    ("stt:150ms:text=whisper", "text preset 'whisper' of hop 'stt' is unknown"),
    ("stt:150ms:text:mulaw8k", "is a text hop and takes only text options"),
    ("stt:150ms~10ms:text", "not jitter"),
    ("stt:150ms->1s@2s:text", "not a delay step"),
    ("stt:150ms:text:refuse", "not refuse"),
    ("stt:150ms:text:every=0", "every= must be from 10ms to 60 s"),
    ("stt:150ms:text:endpoint=2m", "is not a duration"),
    ("stt:150ms:text:every=5", "needs a unit"),
    ("stt:150ms:text:every", "needs a duration"),
    ("stt:150ms:text:badjson=yes", "takes no value"),
    ("stt:150ms:text:text=generic", "given twice"),
])
def test_text_hop_spec_mistakes(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as e:
        parse_hops(text)
    _one_sentence(e)


def test_text_hop_built_in_python_is_checked_too() -> None:
    with pytest.raises(ConfigError, match="takes only text options"):
        HopSpec("stt", 0.1, gain_db=3.0, text=TextSpec())
    with pytest.raises(ConfigError, match="preset must be one of"):
        TextSpec(preset="nope")  # type: ignore[arg-type]


def test_configured_conversation() -> None:
    assert configured_conversation(parse_hops("a:20ms")) is None
    got = configured_conversation(parse_hops("a:20ms,stt:150ms:text:every=100ms:endpoint=300ms"))
    assert got == pytest.approx({"interim": 0.17, "final": 0.47, "first_interim": 0.27,
                                 "final_delay": 0.47})


# --- speech, utterances and the schedule ---------------------------------------------------------


def test_speech_detection_and_schedule() -> None:
    rate = 16000
    lead = 5000  # silence before the utterance, in samples
    speech = _burst(1.0, rate)
    x = np.concatenate([np.zeros(lead), speech, np.zeros(rate)]).astype(np.float32)
    x[lead + 8000:lead + 8000 + 1600] = 5e-5  # a 100 ms dip below 1e-4: still one utterance
    core = SpeechToTextCore(TextSpec(preset="generic"), delay=0.15, rate=rate, trace_id=TRACE)
    results = _run(core, x, rate)
    # the sine's first sample is 0; its next one is speech
    start = lead + 1
    end = lead + len(speech)
    while abs(x[end - 1]) < 1e-4:
        end -= 1
    interims = [r for r in results if not r.final]
    finals = [r for r in results if r.final]
    assert core.utterances == 1 and len(finals) == 1
    offsets = [start + k * 4000 for k in range(1, 5) if start + k * 4000 < end]
    assert [round(r.end * rate) for r in interims] == offsets
    for r, o in zip(interims, offsets, strict=True):
        assert r.start == start / rate
        assert r.due == pytest.approx(T0 + o / rate + 0.15, abs=1e-9)
    (final,) = finals
    assert (round(final.start * rate), round(final.end * rate)) == (start, end)
    assert final.due == pytest.approx(T0 + end / rate + 0.25 + 0.15, abs=1e-9)
    assert [r.due for r in results] == sorted(r.due for r in results)
    assert {r.text for r in results} == {""}  # no bank: no words
    assert json.loads(final.message) == {"type": "final", "text": "", "start": start / rate,
                                         "end": end / rate}


def test_arrival_times_follow_the_chunks() -> None:
    rate = 8000
    core = SpeechToTextCore(TextSpec(every=0.1, endpoint=0.1), delay=0.05, rate=rate)
    x = np.concatenate([_burst(0.35, rate), np.zeros(rate // 2)])
    x[0] = 0.5  # speech from sample 0
    out: list[TextResult] = []
    # 40 ms chunks, each 3 ms later than the one before; the third 20 ms later still
    late = 0.0
    for i, k in enumerate(range(0, len(x), 320)):
        late += 0.003 + (0.020 if i == 2 else 0.0)
        out += core.push(x[k:k + 320], T0 + k / rate + late)
    interims = [r for r in out if not r.final]
    # offset 800 lies in chunk 2 (samples 640-959), which arrived 29 ms late
    assert round(interims[0].end * rate) == 800
    assert interims[0].due == pytest.approx(T0 + 0.1 + 0.029 + 0.05, abs=1e-9)
    # offset 1600 is chunk 5's first sample (38 ms late)
    assert round(interims[1].end * rate) == 1600
    assert interims[1].due == pytest.approx(T0 + 0.2 + 0.038 + 0.05, abs=1e-9)


def test_two_utterances_and_the_endpoint() -> None:
    rate = 16000
    a, b = _burst(0.6, rate), _burst(0.4, rate)
    gap_short = np.zeros(round(0.2 * rate))  # < endpoint: the same utterance
    gap_long = np.zeros(round(0.3 * rate))  # >= endpoint: a new one
    x = np.concatenate([a, gap_short, a, gap_long, b, np.zeros(rate)])
    core = SpeechToTextCore(TextSpec(), delay=0.1, rate=rate)
    results = _run(core, x, rate)
    finals = [r for r in results if r.final]
    assert core.utterances == 2 and [r.utterance for r in finals] == [0, 1]
    assert finals[0].end == pytest.approx(1.4, abs=2 / rate)
    assert finals[1].start == pytest.approx(1.7, abs=2 / rate)
    # every result of utterance 0 comes before any of utterance 1, each final last of its own
    kinds = [(r.utterance, r.final) for r in results]
    assert kinds == sorted(kinds)


def test_stream_stop_ends_the_utterance() -> None:
    rate = 16000
    core = SpeechToTextCore(TextSpec(), delay=0.1, rate=rate)
    x = _burst(0.6, rate)
    results = _run(core, x, rate)  # no silence after: the stop ends it
    assert [r.final for r in results] == [False, False, True]
    last = len(x) - 1
    while abs(x[last]) < 1e-4:
        last -= 1
    assert results[-1].end == (last + 1) / rate
    assert results[-1].due == pytest.approx(T0 + (last + 1) / rate + 0.25 + 0.1)
    assert core.finish(T0 + 5) == [] and core.push(x, T0 + 5) == []


def test_silence_and_tiny_noise_make_no_results() -> None:
    rate = 8000
    core = SpeechToTextCore(TextSpec(), delay=0.1, rate=rate)
    x = np.full(rate * 2, 9e-5, np.float32) * np.sign(np.sin(np.arange(rate * 2)))
    assert _run(core, x, rate) == [] and core.utterances == 0


def test_a_pause_longer_than_the_delay_makes_its_interim_late_not_lost() -> None:
    rate = 16000
    # speech 0-240 ms, a 200 ms pause (under the 250 ms endpoint), speech again
    x = np.concatenate([_burst(0.24, rate), np.zeros(round(0.2 * rate)), _burst(0.3, rate),
                        np.zeros(rate)])
    x[0] = 0.5
    core = SpeechToTextCore(TextSpec(), delay=0.05, rate=rate)
    out: list[tuple[float, TextResult]] = []  # (when it was decided, result)
    for k in range(0, len(x), 320):
        t = T0 + (k + 320) / rate
        out += [(t, r) for r in core.push(x[k:k + 320], T0 + k / rate)]
    first = out[0][1]
    assert round(first.end * rate) == 4000 and not first.final
    assert first.due == pytest.approx(T0 + 0.25 + 0.05)
    assert out[0][0] == pytest.approx(T0 + 0.46, abs=0.021)  # known only when speech resumed


# --- shapes and faults ---------------------------------------------------------------------------


def _shapes(preset: str, **kw: Any) -> list[Any]:
    rate = 16000
    x = np.concatenate([np.zeros(4000), _burst(0.6, rate), np.zeros(rate)])
    core = SpeechToTextCore(TextSpec(preset=preset, **kw), delay=0.1, rate=rate,  # type: ignore[arg-type]
                            trace_id=TRACE)
    out = []
    for r in _run(core, x, rate):
        try:
            out.append(json.loads(r.message))
        except ValueError:
            out.append(r.message)
    return out


def test_seed_shape() -> None:
    msgs = _shapes("seed")
    assert msgs[0] == {"type": "result", "final": False, "text": "", "start_ms": 250.0625,
                       "end_ms": 500.0625, "trace_id": TRACE}
    assert list(msgs[-1]) == ["type", "final", "text", "start_ms", "end_ms", "trace_id"]
    assert msgs[-1]["final"] is True and msgs[-1]["end_ms"] == 850
    assert [list(m) for m in _shapes("seed", offsets=False)][0] == [
        "type", "final", "text", "trace_id"]


def test_deepgram_shape() -> None:
    msgs = _shapes("deepgram")
    assert msgs[0] == {"type": "Results", "is_final": False, "speech_final": False,
                       "start": 0.2500625, "duration": 0.25,
                       "channel": {"alternatives": [{"transcript": "", "confidence": 0.0}]}}
    assert msgs[-1]["is_final"] is True and msgs[-1]["speech_final"] is True
    assert msgs[-1]["duration"] == pytest.approx(0.6, abs=1e-4)
    assert "start" not in _shapes("deepgram", offsets=False)[0]


def test_generic_shape() -> None:
    msgs = _shapes("generic")
    assert msgs[0] == {"type": "partial", "text": "", "start": 0.2500625, "end": 0.5000625}
    assert msgs[-1]["type"] == "final" and msgs[-1]["end"] == 0.85
    assert _shapes("generic", offsets=False)[-1] == {"type": "final", "text": ""}


def test_faults_nofinal_and_badjson() -> None:
    assert [m["type"] for m in _shapes("generic", final=False)] == ["partial", "partial"]
    msgs = _shapes("generic", badjson=True)
    assert len(msgs) == 3
    assert isinstance(msgs[2], str) and msgs[2].startswith('{"type": "final"')
    assert all(isinstance(m, dict) for m in msgs[:2])


# --- recognition ---------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [8000, 16000])
def test_every_shipped_sentence_is_recognised(rate: int) -> None:
    bank = SentenceBank.shipped(rate)
    sentences = _sentences(rate)
    assert len(bank) == len(sentences) >= 17
    for name, text, audio in sentences:
        x = np.concatenate([np.zeros(rate // 4), audio, np.zeros(rate // 2)])
        core = SpeechToTextCore(TextSpec(), delay=0.15, rate=rate, bank=bank, trace_id=TRACE)
        results = _run(core, x, rate)
        finals = [r for r in results if r.final]
        assert [r.text for r in finals] == [text], (name, text)
        words = text.lower().rstrip(".?!").replace(",", "").split()
        interims = [r for r in results if not r.final]
        assert interims and core.utterances == 1
        # interims: a growing prefix of the sentence's words, in proportion to the audio covered
        for r in interims:
            covered = r.end - r.start
            count = math.floor(len(words) * covered * rate / len(audio) + 0.5)
            assert r.text == " ".join(words[:count]), (text, r.text)
        assert json.loads(finals[0].message)["text"] == text


def test_mulaw_audio_is_recognised() -> None:
    rate = 8000
    bank = SentenceBank.shipped(rate)
    for _, text, audio in _sentences(rate)[::3]:
        x = decode(encode(np.concatenate([audio, np.zeros(rate // 2)]), "mulaw"), "mulaw")
        core = SpeechToTextCore(TextSpec(), delay=0.1, rate=rate, bank=bank)
        finals = [r.text for r in _run(core, x, rate) if r.final]
        assert finals == [text]


def test_recognition_tolerates_a_shift_and_gain_but_not_other_audio() -> None:
    rate = 16000
    bank = SentenceBank.shipped(rate)
    _, text, audio = _sentences(rate)[4]
    # 15 ms of the sentence's start lost, half the level: still that sentence
    x = np.concatenate([0.5 * audio[240:], np.zeros(rate // 2)])
    finals = [r.text for r in _run(SpeechToTextCore(TextSpec(), delay=0.1, rate=rate, bank=bank),
                                   x, rate) if r.final]
    assert finals == [text]
    music, _ = load_fixture("music", rate=rate)
    results = _run(SpeechToTextCore(TextSpec(), delay=0.1, rate=rate, bank=bank),
                   np.concatenate([music[:rate * 2], np.zeros(rate // 2)]), rate)
    assert results and {r.text for r in results} == {""}


def test_length_rule() -> None:
    rate = 8000
    ref = _burst(1.0, rate) * np.linspace(0.2, 1, rate, dtype=np.float32)
    bank = _bank(rate, ("One long tone.", ref))
    # the same sound 25 % longer is not that sentence; 10 % longer is
    for extra, heard in ((0.25, ""), (0.10, "One long tone.")):
        x = np.concatenate([ref, _burst(extra, rate, 0.01), np.zeros(rate // 2)])
        finals = [r.text for r in _run(SpeechToTextCore(TextSpec(), delay=0.0, rate=rate,
                                                        bank=bank), x, rate) if r.final]
        assert finals == [heard], extra


def test_bank_rate_must_match() -> None:
    with pytest.raises(ValueError, match="8000 Hz"):
        SpeechToTextCore(TextSpec(), delay=0.1, rate=16000, bank=_bank(8000))
