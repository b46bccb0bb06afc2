"""The marker codec on arrays: round trips, rates, payload checks, and hostile input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from probe.audio.fixtures import load_fixture
from probe.errors import ConfigError
from probe.watermark.design import (
    MARKER_S,
    marker_waveform,
    parse_payload_hex,
    payload_to_symbols,
    session_payload,
    split_session_payload,
    symbols_to_payload,
)
from probe.watermark.detect import MarkerDetector, detect_all
from probe.watermark.embed import embed, marker_positions


def _speech(rate: int) -> np.ndarray:
    x, _ = load_fixture("speech_en_us", rate=rate)
    return np.asarray(x, dtype=np.float32)


def test_payload_symbols_round_trip() -> None:
    for word in (0, 1, 0xDEADBEEF, 0xFFFFFFFF):
        payload = word.to_bytes(4, "big")
        assert symbols_to_payload(payload_to_symbols(payload)) == payload


def test_any_single_symbol_error_fails_the_check() -> None:
    symbols = payload_to_symbols(bytes.fromhex("a1b2c3d4"))
    for i in range(len(symbols)):
        for delta in (1, 17, 64):
            bad = list(symbols)
            bad[i] = (bad[i] + delta) % 128
            assert symbols_to_payload(bad) is None


def test_session_payload_layout() -> None:
    payload = session_payload(0xABCDEF, 300)
    assert split_session_payload(payload) == (0xABCDEF, 300 % 256)


def test_parse_payload_hex_rejects_bad_input() -> None:
    assert parse_payload_hex("0xDEADBEEF") == bytes.fromhex("deadbeef")
    for bad in ("", "xyz", "deadbee", "deadbeef00"):
        with pytest.raises(ConfigError):
            parse_payload_hex(bad)


@pytest.mark.parametrize("rate", [8000, 16000, 24000, 48000])
def test_marker_is_band_limited_and_sized(rate: int) -> None:
    wave = marker_waveform(bytes(4), rate)
    assert len(wave) == round(MARKER_S * rate)
    spec = np.abs(np.fft.rfft(wave)) ** 2
    freqs = np.fft.rfftfreq(len(wave), 1 / rate)
    inside = spec[(freqs >= 300) & (freqs <= 3400)].sum()
    assert inside / spec.sum() > 0.985  # v2: independent codewords meet at segment edges


@pytest.mark.parametrize("rate", [8000, 16000, 24000, 48000])
def test_round_trip_in_speech_is_sample_exact(rate: int) -> None:
    carrier = _speech(rate)
    marked, placed = embed(carrier, rate, lambda i: session_payload(0x123456, i))
    assert len(placed) >= 8
    found = {d.payload: d for d in detect_all(marked, rate)}
    hits = [p for p in placed if p.payload in found]
    assert len(hits) >= len(placed) - 1
    for p in hits:
        assert abs(found[p.payload].sample - p.sample) <= 1
    assert set(found) <= {p.payload for p in placed}


def test_streaming_detection_reports_arrival_times() -> None:
    rate = 16000
    marked, placed = embed(_speech(rate), rate, lambda i: session_payload(7, i))
    det = MarkerDetector(rate)
    frame = 320
    t0 = 1000.0
    found = []
    for i in range(0, len(marked), frame):
        found.extend(det.feed(marked[i : i + frame], t0 + i / rate))
    found.extend(det.flush())
    by_payload = {d.payload: d for d in found}
    assert len(by_payload) >= len(placed) - 1
    for p in placed:
        if p.payload in by_payload:
            assert by_payload[p.payload].time == pytest.approx(t0 + p.sample / rate, abs=1e-4)


def test_unmarked_speech_gives_nothing() -> None:
    assert detect_all(_speech(16000), 16000) == []


def test_marker_positions_refuse_overlap() -> None:
    with pytest.raises(ConfigError):
        marker_positions(16000, 16000, every_s=0.1)


@settings(max_examples=60, deadline=None)
@given(
    arrays(
        np.float32,
        st.integers(0, 3000),
        elements=st.floats(width=32, allow_nan=True, allow_infinity=True),
    ),
    st.sampled_from([8000, 16000, 44100]),
)
def test_detector_never_raises_on_any_samples(x: np.ndarray, rate: int) -> None:
    det = MarkerDetector(rate)
    det.feed(x, 0.0)
    det.feed(x[:1], 0.1)
    det.feed(np.zeros(0, dtype=np.float32), 0.2)
    det.flush()


@pytest.mark.parametrize(
    "signal",
    [
        np.zeros(40000, dtype=np.float32),
        np.ones(40000, dtype=np.float32),
        np.full(40000, np.nan, dtype=np.float32),
        np.where(np.arange(40000) % 2, 1.0, -1.0).astype(np.float32),
    ],
)
def test_degenerate_signals_give_nothing(signal: np.ndarray) -> None:
    assert detect_all(signal, 16000) == []
