"""Pure parts of the reference pipeline: the --hops language, the resampler, the hop core."""

from __future__ import annotations

import numpy as np
import pytest

from probe.audio.formats import decode, encode
from probe.errors import ConfigError, ProtocolError
from probe.pipeline import (
    Emission,
    HopCore,
    HopSpec,
    LowLatencyResampler,
    check_hops,
    format_hops,
    output_format,
    parse_hops,
)
from probe.protocol import AudioFormat

PCM16K = AudioFormat("pcm_s16le", 16000)
T0 = 1_700_000_000.0

# --- spec ----------------------------------------------------------------------------------------


def test_parse_simple_and_units() -> None:
    a, b, c = parse_hops("asr:20ms, llm:1.5s ,tts:0")
    assert a.name == "asr" and a.delay == pytest.approx(0.020) and a.jitter == 0.0
    assert b.delay == 1.5 and c.delay == 0.0
    assert a.fork and not a.garbage and a.codec is None


def test_parse_jitter_step_and_every_option() -> None:
    (h,) = parse_hops(
        "x.y-z_1:50ms~5ms->2s~100ms@3s:mulaw8k:gain=-6:noise=30:loss=5:stall@4s:close@4500ms"
        ":garbage:nofork"
    )
    assert h.delay == pytest.approx(0.05) and h.jitter == pytest.approx(0.005)
    assert h.step_delay == 2.0 and h.step_jitter == pytest.approx(0.1) and h.step_at == 3.0
    assert h.codec == "mulaw" and h.gain_db == -6 and h.noise_snr_db == 30
    assert h.loss_pct == 5 and h.stall_at == 4.0 and h.close_at == pytest.approx(4.5)
    assert h.garbage and not h.fork
    assert h.delay_at(2.99) == (h.delay, h.jitter)
    assert h.delay_at(3.0) == (2.0, h.step_jitter)
    (r,) = parse_hops("first:0:rate=8000:refuse:alaw8k")
    assert r.rate == 8000 and r.refuse and r.codec == "alaw"
    assert parse_hops("s:1s:stall@2")[0].stall_at == 2.0  # bare S means seconds


def test_format_round_trips() -> None:
    text = "a:20ms~5ms:mulaw8k:loss=2,b:50ms->2s@3s:rate=48000:gain=3.5:noise=20,c:0:close@1.5s"
    hops = parse_hops(text)
    assert parse_hops(format_hops(hops)) == hops


@pytest.mark.parametrize(
    ("spec", "piece"),
    [
        ("", "empty"),
        ("a:20ms,,b:1s", "empty hop"),
        ("a", "no delay"),
        ("a:", "no delay"),
        ("a:20", "'20' needs a unit"),
        ("a:20xs", "'20xs' is not a duration"),
        ("a:-5ms", "'-5ms'"),
        ("a:5ms~10ms", "exceeds its delay"),
        ("a:50ms->2s", "needs a time"),
        ("a:50ms->2s@soon", "'soon'"),
        ("a:20ms:bogus", "Unknown option 'bogus'"),
        ("a:20ms:rate=7000", "rate"),
        ("a:20ms:rate=16000.5", "whole number"),
        ("a:20ms:mulaw8k:rate=16000", "rate=16000"),
        ("a:20ms:mulaw8k:alaw8k", "only one of mulaw8k and alaw8k"),
        ("a:20ms:loss=150", "loss"),
        ("a:20ms:gain=loud", "'loud' is not a number"),
        ("a:20ms:gain=1:gain=2", "'gain' is given twice"),
        ("a:20ms,a:30ms", "'a' is used twice"),
        ("a:20ms,b:10ms:refuse", "Only the first hop can refuse"),
        ("bad name:20ms", "'bad name'"),
        ("x" * 65 + ":20ms", "1-64 characters"),
        ("a:61s", "from 0 to 60 s"),
    ],
)
def test_bad_specs_name_the_piece(spec: str, piece: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        parse_hops(spec)
    assert piece in str(info.value)
    assert str(info.value).endswith(".")


def test_hopspec_validates_itself() -> None:
    with pytest.raises(ConfigError, match="needs both a new delay and a time"):
        HopSpec("a", delay=0.01, step_delay=1.0)
    with pytest.raises(ConfigError, match="Only the first hop can refuse"):
        check_hops([HopSpec("a"), HopSpec("b", refuse=True)])
    with pytest.raises(ConfigError, match="used twice"):
        check_hops([HopSpec("a"), HopSpec("a")])


# --- resampler -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fr", "to", "holdback_ms"),
    [(16000, 8000, 3.0), (8000, 16000, 3.125), (48000, 16000, 1.44), (16000, 48000, 1.52),
     (48000, 8000, 2.88), (8000, 48000, 3.08)],
)
def test_resampler_is_index_aligned_with_small_holdback(fr: int, to: int,
                                                        holdback_ms: float) -> None:
    r = LowLatencyResampler(fr, to)
    x = np.zeros(fr * 2, np.float32)
    x[fr] = 1.0  # an impulse at exactly 1 s
    fed = made = 0
    held: list[float] = []
    outs = []
    for i in range(0, len(x), fr // 50):
        y = r.process(x[i : i + fr // 50])
        fed += fr // 50
        made += len(y)
        outs.append(y)
        held.append(fed / fr - made / to)
    outs.append(r.process(np.zeros(0, np.float32), last=True))
    y = np.concatenate(outs)
    assert len(y) == 2 * to
    assert int(np.argmax(np.abs(y))) == to
    assert max(held[5:]) * 1e3 == pytest.approx(holdback_ms, abs=0.02)
    assert r.holdback * 1e3 <= holdback_ms


def test_resampler_response_16k_to_8k() -> None:
    t = np.arange(16000) / 16000

    def gain_db(freq: float) -> float:
        x = np.sin(2 * np.pi * freq * t).astype(np.float32)
        r = LowLatencyResampler(16000, 8000)
        y = np.concatenate([r.process(x[i : i + 320]) for i in range(0, 16000, 320)])
        return float(20 * np.log10(np.sqrt(np.mean(y[800:-800] ** 2) / 0.5) + 1e-12))

    assert abs(gain_db(1000)) < 0.1 and abs(gain_db(3300)) < 0.2
    assert max(gain_db(f) for f in (4500, 5000, 6000, 7000)) < -60


# --- hop core ------------------------------------------------------------------------------------


def _speechlike(seconds: float, rate: int = 16000, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    x = sum(np.sin(2 * np.pi * f * t + rng.uniform(0, 6)) for f in (310, 770, 1450, 2300))
    return (0.15 * np.asarray(x)).astype(np.float32)


def _run(core: HopCore, x: np.ndarray, fmt: AudioFormat, chunk: int = 320,
         period: float = 0.02) -> list[Emission]:
    out = []
    for i, start in enumerate(range(0, len(x), chunk)):
        out += core.push(encode(x[start : start + chunk], fmt.encoding), T0 + i * period)
    out += core.finish(T0 + len(x) / fmt.sample_rate)
    return out


def test_plain_delay_releases_at_arrival_plus_delay() -> None:
    spec = HopSpec("a", delay=0.020)
    core = HopCore(PCM16K, output_format(spec, PCM16K), t0=T0, seed="s", spec=spec)
    x = _speechlike(0.5)
    out = _run(core, x, PCM16K)
    assert [e.due for e in out] == pytest.approx([T0 + i * 0.02 + 0.020 for i in range(25)])
    y = np.concatenate([decode(e.data, "pcm_s16le") for e in out])
    assert np.max(np.abs(y - x)) < 1e-4


def test_jitter_keeps_fifo_order_and_bounds() -> None:
    spec = HopSpec("a", delay=0.030, jitter=0.025)
    core = HopCore(PCM16K, PCM16K, t0=T0, seed="s", spec=spec)
    out = _run(core, _speechlike(1.0), PCM16K)
    dues = [e.due for e in out]
    assert dues == sorted(dues)
    lat = [e.due - e.input_time for e in out]
    assert min(lat) >= 0.005 - 1e-9 and max(lat) <= 0.055 + 1e-9
    assert len({round(v, 4) for v in lat}) > 10  # it really jitters
    again = _run(HopCore(PCM16K, PCM16K, t0=T0, seed="s", spec=spec), _speechlike(1.0), PCM16K)
    assert [e.due for e in again] == dues  # seeded


def test_delay_step() -> None:
    spec = parse_hops("a:50ms->200ms@0.5s")[0]
    core = HopCore(PCM16K, PCM16K, t0=T0, seed="s", spec=spec)
    out = _run(core, _speechlike(1.0), PCM16K)
    for e in out:
        expected = 0.05 if e.input_time - T0 < 0.5 else 0.2
        assert e.due == pytest.approx(e.input_time + expected)


def test_mulaw_hop_keeps_its_delay_through_the_resampler() -> None:
    spec = parse_hops("codec:35ms:mulaw8k")[0]
    out_fmt = output_format(spec, PCM16K)
    assert out_fmt == AudioFormat("mulaw", 8000)
    core = HopCore(PCM16K, out_fmt, t0=T0, seed="s", spec=spec)
    out = _run(core, _speechlike(1.0), PCM16K)
    for e in out:
        assert e.input_time == pytest.approx(T0 + e.index / 8000)
        assert e.due == pytest.approx(e.input_time + 0.035)
    assert sum(len(e.data) for e in out) == 8000


def test_zero_delay_resampling_shows_the_holdback() -> None:
    core = HopCore(PCM16K, AudioFormat("pcm_s16le", 8000), t0=T0, seed="s")
    out = _run(core, _speechlike(1.0), PCM16K)[1:-1]
    extra = [e.due - e.input_time for e in out]
    # Each chunk leaves when its input arrives; its first sample is older by up to a chunk.
    assert min(extra) == pytest.approx(0.003, abs=1e-4)


def test_stall_stops_everything() -> None:
    spec = parse_hops("a:10ms:stall@0.3s")[0]
    core = HopCore(PCM16K, PCM16K, t0=T0, seed="s", spec=spec)
    out = _run(core, _speechlike(1.0), PCM16K)
    assert out and max(e.due for e in out) < T0 + 0.3
    assert core.stalled


def test_loss_gain_noise() -> None:
    x = _speechlike(4.0)
    lossy = parse_hops("a:0:loss=25")[0]
    out = _run(HopCore(PCM16K, PCM16K, t0=T0, seed="s", spec=lossy), x, PCM16K)
    y = np.concatenate([decode(e.data, "pcm_s16le") for e in out]).reshape(-1, 320)
    lost = np.all(y == 0, axis=1)
    assert 0.15 < lost.mean() < 0.35
    # Chunking does not change which 20 ms frames are lost.
    out2 = _run(HopCore(PCM16K, PCM16K, t0=T0, seed="s", spec=lossy), x, PCM16K, chunk=111,
                period=111 / 16000)
    y2 = np.concatenate([decode(e.data, "pcm_s16le") for e in out2]).reshape(-1, 320)
    assert np.array_equal(np.all(y2 == 0, axis=1), lost)

    quiet = x * np.float32(0.4)  # peaks at 0.24: doubling must not clip
    loud = parse_hops("a:0:gain=6.0206")[0]
    out = _run(HopCore(PCM16K, PCM16K, t0=T0, seed="s", spec=loud), quiet, PCM16K)
    y = np.concatenate([decode(e.data, "pcm_s16le") for e in out])
    assert np.sqrt(np.mean(y**2)) / np.sqrt(np.mean(quiet**2)) == pytest.approx(2.0, rel=1e-3)

    noisy = parse_hops("a:0:noise=20")[0]
    out = _run(HopCore(PCM16K, PCM16K, t0=T0, seed="s", spec=noisy), x, PCM16K)
    y = np.concatenate([decode(e.data, "pcm_s16le") for e in out])
    snr = 10 * np.log10(np.mean(x**2) / np.mean((y - x) ** 2))
    assert snr == pytest.approx(20.0, abs=0.5)


def test_reframing_for_twilio() -> None:
    core = HopCore(AudioFormat("pcm_s16le", 8000), AudioFormat("mulaw", 8000), t0=T0, seed="s",
                   frame_samples=160)
    x = _speechlike(0.5, 8000)
    out = _run(core, x, AudioFormat("pcm_s16le", 8000), chunk=137, period=137 / 8000)
    assert all(len(e.data) == 160 for e in out)
    assert sum(len(e.data) for e in out) == 4000


# --- pass-through ------------------------------------------------------------------------------


def _raw_run(core: HopCore, chunks: list[bytes], period: float = 0.02) -> list[Emission]:
    out = []
    for i, chunk in enumerate(chunks):
        out += core.push(chunk, T0 + i * period)
    out += core.finish(T0 + len(chunks) * period + 0.001)
    return out


MULAW8K = AudioFormat("mulaw", 8000)
PCM8K = AudioFormat("pcm_s16le", 8000)


@pytest.mark.parametrize(("fmt", "spec_text", "out", "frame"), [
    (PCM16K, "a:20ms", None, None),
    (PCM16K, "a:30ms~25ms->200ms@0.3s:stall@0.7s", None, None),
    (MULAW8K, "a:40ms~10ms", None, None),  # a hop emits pcm16: mu-law to pcm16 by table
    (AudioFormat("alaw", 8000), "a:0", None, None),
    (PCM8K, "codec:35ms:mulaw8k", None, None),  # a codec at the rate it already has
    (MULAW8K, "codec:35ms~5ms:alaw8k", None, None),
    (PCM8K, None, MULAW8K, 160),  # the return of a Twilio session: 20 ms media frames
    (PCM16K, None, PCM16K, 160),
])
def test_pass_through_is_byte_identical_to_the_float_path(
        fmt: AudioFormat, spec_text: str | None, out: AudioFormat | None,
        frame: int | None) -> None:
    spec = None if spec_text is None else parse_hops(spec_text)[0]
    out_fmt = out if spec is None else output_format(spec, fmt)
    assert out_fmt is not None
    rng = np.random.default_rng(7)
    # every code, full-scale samples included, in chunks of uneven length (partial frames)
    sizes = rng.integers(0, 400, 60) * fmt.sample_width
    chunks = [rng.integers(0, 256, int(n), dtype=np.uint8).tobytes() for n in sizes]
    fast = HopCore(fmt, out_fmt, t0=T0, seed="s", spec=spec, frame_samples=frame)
    slow = HopCore(fmt, out_fmt, t0=T0, seed="s", spec=spec, frame_samples=frame)
    assert fast.passthrough
    slow.passthrough = False  # the float path: decode, resample, transform, encode
    got, want = _raw_run(fast, chunks), _raw_run(slow, chunks)
    assert len(want) > 10
    assert got == want
    assert fast.stalled == slow.stalled


@pytest.mark.parametrize(("fmt", "spec_text"), [
    (PCM16K, "a:20ms:mulaw8k"), (PCM16K, "a:20ms:alaw8k"), (PCM16K, "a:20ms:gain=-6"),
    (PCM16K, "a:20ms:noise=30"), (PCM16K, "a:20ms:loss=5"), (PCM16K, "a:20ms:rate=8000"),
    (PCM8K, "a:20ms:mulaw8k:gain=0"), (MULAW8K, "a:20ms:rate=16000"),
])
def test_a_hop_that_changes_the_audio_does_not_pass_through(fmt: AudioFormat,
                                                            spec_text: str) -> None:
    spec = parse_hops(spec_text)[0]
    assert not HopCore(fmt, output_format(spec, fmt), t0=T0, seed="s", spec=spec).passthrough


def test_float_samples_do_not_pass_through() -> None:
    f32 = AudioFormat("pcm_f32le", 16000)
    assert not HopCore(f32, PCM16K, t0=T0, seed="s", spec=parse_hops("a:20ms")[0]).passthrough
    assert not HopCore(PCM16K, f32, t0=T0, seed="s").passthrough
    assert HopCore(PCM16K, PCM16K, t0=T0, seed="s").passthrough


def test_pass_through_rejects_a_partial_sample() -> None:
    core = HopCore(PCM16K, PCM16K, t0=T0, seed="s", spec=parse_hops("a:20ms")[0])
    with pytest.raises(ProtocolError):
        core.push(b"\x00\x01\x02", T0)
