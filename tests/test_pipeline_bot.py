"""The reply bot's pure core (probe/pipeline/bot.py), driven with arrays and made-up times."""

from __future__ import annotations

import math

import numpy as np
import pytest

from probe.audio.formats import decode, encode
from probe.errors import ConfigError
from probe.pipeline.bot import (
    BotAudio,
    BotClear,
    BotMark,
    BotOutput,
    ReplyBot,
    ReplyConfig,
    reply_clip,
)
from probe.protocol import AudioFormat

PCM16K = AudioFormat("pcm_s16le", 16000)
MULAW8K = AudioFormat("mulaw", 8000)
T0 = 1_700_000_000.0
CHUNK = 0.020


def caller(fmt: AudioFormat, total: float, speech: list[tuple[float, float]]) -> list[bytes]:
    """20 ms chunks of `total` seconds: a -20 dBFS tone in the `speech` spans, zeros elsewhere."""
    rate = fmt.sample_rate
    n = round(total * rate)
    t = np.arange(n) / rate
    x = np.zeros(n, np.float32)
    for a, b in speech:
        on = (t >= a) & (t < b)
        x[on] = (0.1 * math.sqrt(2) * np.sin(2 * np.pi * 440.0 * t[on])).astype(np.float32)
    step = round(CHUNK * rate)
    return [encode(x[i:i + step], fmt.encoding) for i in range(0, n, step)]


def drive(bot: ReplyBot, chunks: list[bytes]) -> list[BotOutput]:
    """Play the caller in real time: at each chunk's arrival, first what fell due before it."""
    out: list[BotOutput] = []
    for k, data in enumerate(chunks):
        t = T0 + k * CHUNK
        out += bot.pop_due(t - 1e-9)
        bot.push(data, t)
    end = T0 + len(chunks) * CHUNK
    bot.finish(end)
    out += bot.pop_due(math.inf)
    assert bot.done and bot.next_due() is None
    return out


def audio(out: list[BotOutput], reply: int | None = None) -> list[BotAudio]:
    return [o for o in out if isinstance(o, BotAudio) and (reply is None or o.reply == reply)]


def rel(t: float) -> float:
    return round(t - T0, 9)


# --- config and clip ------------------------------------------------------------------------------


def test_config_validation_and_options() -> None:
    assert ReplyConfig().options() == []
    cfg = ReplyConfig(stop=0.25, say=1.5, talkover=True, clear=False)
    assert cfg.options() == ["stop=250ms", "say=1500ms", "talkover", "noclear"]
    with pytest.raises(ConfigError, match="stop delay"):
        ReplyConfig(stop=-0.1)
    with pytest.raises(ConfigError, match="say="):
        ReplyConfig(say=0.0)
    with pytest.raises(ConfigError, match="reply delay"):
        ReplyBot(ReplyConfig(), -1.0, PCM16K, PCM16K)


@pytest.mark.parametrize("rate", [8000, 16000, 48000])
def test_reply_clip_is_loud_in_every_10ms_window(rate: int) -> None:
    # The probe times onsets and silences with 10 ms frames at -40 dBFS, wherever its frames
    # fall: the reply must be above that from its first sample to its last, with no pause.
    x = reply_clip(2.0, rate)
    assert len(x) == 2 * rate
    w = rate // 100
    c = np.concatenate([[0.0], np.cumsum(x.astype(np.float64) ** 2)])
    worst = 10 * np.log10(np.min(c[w:] - c[:-w]) / w)
    assert worst > -34.0, worst
    longer = reply_clip(20.0, rate)  # longer than the fixture: looped
    assert len(longer) == 20 * rate and np.array_equal(longer[:len(x)], x)


# --- reply timing ---------------------------------------------------------------------------------


def test_reply_starts_delay_after_the_last_speech_sample_and_is_paced() -> None:
    bot = ReplyBot(ReplyConfig(say=1.0), 0.8, PCM16K, PCM16K)
    out = drive(bot, caller(PCM16K, 4.0, [(0.5, 1.5)]))
    assert [rel(t) for u in bot.utterances for t in u] == pytest.approx([0.5, 1.5])
    frames = audio(out)
    assert len(frames) == 50 and all(len(f.data) == 640 for f in frames)
    assert [rel(f.due) for f in frames] == pytest.approx([2.3 + 0.02 * k for k in range(50)])
    assert [f.frame for f in frames] == list(range(50))
    assert not [o for o in out if not isinstance(o, BotAudio)]  # probe dialect: audio only
    sent = np.concatenate([decode(f.data, "pcm_s16le") for f in frames])
    assert np.allclose(sent, reply_clip(1.0, 16000), atol=1 / 32768)


def test_speech_end_on_the_10ms_grid_and_delay_below_endpoint() -> None:
    # Speech ends 5 ms into a 10 ms frame: the utterance ends at that frame's end. A delay below
    # the 200 ms endpoint starts the reply when the end is known.
    bot = ReplyBot(ReplyConfig(say=0.2), 0.05, PCM16K, PCM16K)
    out = drive(bot, caller(PCM16K, 2.0, [(0.3, 1.005)]))
    assert rel(bot.utterances[0][1]) == pytest.approx(1.01)
    assert rel(audio(out)[0].due) == pytest.approx(1.01 + 0.2)


def test_quiet_sound_is_not_speech() -> None:
    bot = ReplyBot(ReplyConfig(), 0.1, PCM16K, PCM16K)
    chunks = caller(PCM16K, 2.0, [])
    quiet = encode(np.full(320, 10 ** (-55 / 20), np.float32), "pcm_s16le")  # -55 dBFS
    out = drive(bot, [quiet if 20 <= k < 60 else c for k, c in enumerate(chunks)])
    assert out == [] and bot.utterances == []


def test_pause_shorter_than_endpoint_keeps_one_utterance() -> None:
    bot = ReplyBot(ReplyConfig(say=0.2), 0.3, PCM16K, PCM16K)
    out = drive(bot, caller(PCM16K, 3.0, [(0.2, 0.8), (0.99, 1.4)]))
    assert [rel(e) for _, e in bot.utterances] == pytest.approx([1.4])
    assert rel(audio(out)[0].due) == pytest.approx(1.7)


def test_reply_not_yet_started_is_dropped_when_the_caller_goes_on() -> None:
    # A 300 ms pause ends the first utterance, but the caller speaks again before the 500 ms
    # delay is up: that reply never starts; the second utterance gets reply-1.
    bot = ReplyBot(ReplyConfig(say=0.2), 0.5, MULAW8K, MULAW8K, marks=True)
    out = drive(bot, caller(MULAW8K, 4.0, [(0.2, 0.8), (1.1, 1.6)]))
    assert len(bot.utterances) == 2
    assert bot.reply_starts == [(1, pytest.approx(T0 + 2.1))]
    assert {f.reply for f in audio(out)} == {1}
    assert [o.name for o in out if isinstance(o, BotMark)] == ["reply-1"]


# --- Twilio marks ---------------------------------------------------------------------------------


def test_twilio_mark_follows_the_last_media() -> None:
    bot = ReplyBot(ReplyConfig(say=0.5), 0.4, MULAW8K, MULAW8K, marks=True)
    out = drive(bot, caller(MULAW8K, 4.0, [(0.2, 1.0), (2.0, 2.5)]))
    frames = audio(out)
    assert all(len(f.data) == 160 for f in frames)
    kinds = [type(o).__name__ for o in out]
    assert kinds == ["BotAudio"] * 25 + ["BotMark"] + ["BotAudio"] * 25 + ["BotMark"]
    marks = [o for o in out if isinstance(o, BotMark)]
    assert [m.name for m in marks] == ["reply-1", "reply-2"]
    assert rel(marks[0].due) == pytest.approx(1.4 + 24 * 0.02)
    assert rel(marks[1].due) == pytest.approx(2.9 + 24 * 0.02)


# --- barge-in -------------------------------------------------------------------------------------


def test_barge_in_stops_the_reply_stop_after_the_caller_starts() -> None:
    # Reply at 1.3 s; the caller barges in at 1.515 s (in the 10 ms frame from 1.51 s); stop
    # 100 ms: silent from 1.61 s on.
    bot = ReplyBot(ReplyConfig(stop=0.1, say=2.0), 0.3, PCM16K, PCM16K)
    out = drive(bot, caller(PCM16K, 5.0, [(0.2, 1.0), (1.515, 2.4)]))
    assert len(bot.barge_ins) == 1
    b = bot.barge_ins[0]
    assert (rel(b.t), rel(b.stop_at), b.reply) == (pytest.approx(1.51), pytest.approx(1.61), 1)
    first = audio(out, 1)
    assert rel(first[-1].due) == pytest.approx(1.6)  # the last frame due before 1.61
    last = decode(first[-1].data, "pcm_s16le")
    clip = reply_clip(2.0, 16000)[15 * 320:16 * 320]
    assert np.allclose(last[:160], clip[:160], atol=1 / 32768)
    assert not last[160:].any() and np.abs(clip[160:]).max() > 0.01  # silent from 1.91 exactly
    # The barge-in speech is an utterance: reply-2 0.3 s after it ends.
    second = audio(out, 2)
    assert rel(bot.utterances[1][1]) == pytest.approx(2.4)
    assert rel(second[0].due) == pytest.approx(2.7) and len(second) == 100


def test_barge_in_on_the_frame_grid_needs_no_zeroing() -> None:
    bot = ReplyBot(ReplyConfig(stop=0.06), 0.2, PCM16K, PCM16K)
    out = drive(bot, caller(PCM16K, 3.0, [(0.2, 0.6), (1.0, 1.3)]))
    first = audio(out, 1)
    assert rel(first[0].due) == pytest.approx(0.8)
    assert rel(first[-1].due) == pytest.approx(1.04)  # stop at 1.06: frames due before it
    assert np.abs(decode(first[-1].data, "pcm_s16le")[-16:]).max() > 0.0


def test_twilio_barge_in_mark_then_clear_at_the_stop() -> None:
    bot = ReplyBot(ReplyConfig(stop=0.15), 0.3, MULAW8K, MULAW8K, marks=True)
    out = drive(bot, caller(MULAW8K, 5.0, [(0.2, 1.0), (1.8, 2.3)]))
    stop_at = T0 + 1.8 + 0.15
    controls = [o for o in out if not isinstance(o, BotAudio)]
    assert controls == [BotMark(pytest.approx(stop_at), "reply-1"),  # type: ignore[arg-type]
                        BotClear(pytest.approx(stop_at)),  # type: ignore[arg-type]
                        BotMark(controls[2].due, "reply-2")]
    i = out.index(controls[0])
    assert isinstance(out[i - 1], BotAudio) and out[i - 1].due < stop_at
    assert isinstance(out[i + 2], BotAudio) and out[i + 2].reply == 2


def test_noclear_sends_no_clear() -> None:
    bot = ReplyBot(ReplyConfig(clear=False), 0.3, MULAW8K, MULAW8K, marks=True)
    out = drive(bot, caller(MULAW8K, 5.0, [(0.2, 1.0), (1.8, 2.3)]))
    assert not [o for o in out if isinstance(o, BotClear)]
    assert [o.name for o in out if isinstance(o, BotMark)] == ["reply-1", "reply-2"]


def test_clear_even_when_the_reply_ends_before_the_stop() -> None:
    # say 0.5 s from 1.3 s: it ends at 1.8; the caller starts at 1.78 and stop is 100 ms.
    bot = ReplyBot(ReplyConfig(stop=0.1, say=0.5), 0.3, MULAW8K, MULAW8K, marks=True)
    out = drive(bot, caller(MULAW8K, 4.0, [(0.2, 1.0), (1.78, 2.0)]))
    assert len(audio(out, 1)) == 25
    controls = [(type(o).__name__, round(o.due - T0, 6)) for o in out
                if not isinstance(o, BotAudio)]
    assert controls[:2] == [("BotMark", 1.78), ("BotClear", 1.88)]


def test_talkover_resumes_300ms_after_stopping() -> None:
    bot = ReplyBot(ReplyConfig(stop=0.1, say=1.0, talkover=True), 0.3, MULAW8K, MULAW8K,
                   marks=True)
    out = drive(bot, caller(MULAW8K, 6.0, [(0.2, 1.0), (1.5, 3.0)]))
    first = audio(out, 1)
    assert [f.frame for f in first] == list(range(50))  # the whole reply, in two parts
    dues = [rel(f.due) for f in first]
    assert dues[:15] == pytest.approx([1.3 + 0.02 * k for k in range(15)])
    assert dues[15] == pytest.approx(1.6 + 0.3) and dues[-1] == pytest.approx(1.9 + 34 * 0.02)
    controls = [(type(o).__name__, round(o.due - T0, 6)) for o in out
                if not isinstance(o, BotAudio)]
    assert controls[:2] == [("BotClear", 1.6), ("BotMark", 2.58)]
    assert rel(audio(out, 2)[0].due) == pytest.approx(3.3)


def test_a_new_reply_cuts_off_a_talked_over_one() -> None:
    bot = ReplyBot(ReplyConfig(stop=0.1, say=2.0, talkover=True), 0.3, MULAW8K, MULAW8K,
                   marks=True)
    out = drive(bot, caller(MULAW8K, 6.0, [(0.2, 1.0), (1.5, 2.0)]))
    # Stopped at 1.6, resumed at 1.9; the caller's second utterance ends at 2.0: reply-2 at 2.3.
    assert rel(audio(out, 1)[-1].due) == pytest.approx(2.28)
    names = [(type(o).__name__, round(o.due - T0, 6), getattr(o, "reply", None)) for o in out
             if not isinstance(o, BotAudio) or o.frame == 0]
    assert names == [("BotAudio", 1.3, 1), ("BotClear", 1.6, None), ("BotMark", 2.3, None),
                     ("BotAudio", 2.3, 2), ("BotMark", 4.28, None)]


def test_silence_while_the_bot_talks_is_not_a_barge_in() -> None:
    bot = ReplyBot(ReplyConfig(), 0.2, PCM16K, PCM16K)
    out = drive(bot, caller(PCM16K, 4.0, [(0.2, 0.6)]))
    assert bot.barge_ins == [] and len(audio(out)) == 100


def test_an_utterance_cut_by_the_end_of_input_still_gets_its_reply() -> None:
    bot = ReplyBot(ReplyConfig(say=0.1), 0.5, PCM16K, PCM16K)
    out = drive(bot, caller(PCM16K, 1.0, [(0.2, 1.0)]))
    assert rel(bot.utterances[0][1]) == pytest.approx(1.0)
    assert rel(audio(out)[0].due) == pytest.approx(1.5)


def test_input_and_output_formats_may_differ() -> None:
    bot = ReplyBot(ReplyConfig(say=0.1), 0.25, PCM16K, MULAW8K)
    out = drive(bot, caller(PCM16K, 1.0, [(0.1, 0.4)]))
    assert [len(f.data) for f in audio(out)] == [160] * 5
    assert rel(audio(out)[0].due) == pytest.approx(0.65)


def test_configured_reply() -> None:
    from probe.pipeline import configured_reply, parse_hops

    assert configured_reply(parse_hops("a:20ms")) is None
    got = configured_reply(parse_hops("a:20ms,b:30ms,bot:800ms:reply:stop=150ms"))
    assert got == pytest.approx({"reply": 0.85, "barge_in": 0.2, "clear": 0.2})
    assert configured_reply(parse_hops("bot:50ms:reply")) == pytest.approx(
        {"reply": 0.2, "barge_in": 0.1, "clear": 0.1})


def test_the_bot_core_is_sans_io() -> None:
    import ast
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "probe" / "pipeline" / "bot.py"
    shell = {"socket", "asyncio", "gevent", "threading", "websockets", "selectors", "time"}
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    assert [n for n in names if n.split(".")[0] in shell] == []
