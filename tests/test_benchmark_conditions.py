"""Fast checks of the marker benchmark's condition functions and its matching (benchmarks/)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from probe.audio.fixtures import load_fixture
from probe.watermark.design import session_payload
from probe.watermark.detect import Detection
from probe.watermark.embed import Placement, active_rms

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str) -> ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    env = dict(os.environ)  # marker_matrix pins BLAS threads for its workers; not for pytest
    try:
        spec.loader.exec_module(mod)
    finally:
        os.environ.clear()
        os.environ.update(env)
    return mod


C = _load("_conditions")
# Under CI a missing tool is a failure, never a skip.
_CI = os.environ.get("CI") == "true"
needs_sox = pytest.mark.skipif(
    shutil.which("sox") is None and not _CI, reason="sox not installed"
)
needs_ffmpeg = pytest.mark.skipif(
    shutil.which("ffmpeg") is None and not _CI, reason="ffmpeg not installed"
)


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    x, rate = load_fixture("speech_en_us")
    assert rate == 16000
    return C.loop_to(x, 3 * rate)


# --- time stretch ground truth -----------------------------------------------------------------


@needs_sox
def test_tempo_ramp_maps_unstretched_file_to_itself(speech: np.ndarray) -> None:
    st = C.sox_tempo(speech, 16000, 1.0)
    assert len(st.samples) == len(speech)
    np.testing.assert_array_equal(st.source_index, np.arange(len(speech), dtype=np.float64))
    np.testing.assert_allclose(st.samples, speech, atol=1e-6)
    assert C.source_index_at(st, 1234.0) == 1234.0
    assert C.source_index_at(st, 1234.5) == pytest.approx(1234.5)


@pytest.mark.parametrize("stretch", [1.02, 0.98])
@needs_sox
def test_tempo_ramp_tracks_the_audio(speech: np.ndarray, stretch: float) -> None:
    st = C.sox_tempo(speech, 16000, stretch)
    assert len(st.samples) == pytest.approx(len(speech) * stretch, abs=2)
    k = np.arange(len(st.samples))
    body = k < len(st.samples) - 1600  # sox pads the last segment
    # WSOLA moves audio by at most about its search window (here well under 30 ms).
    assert np.max(np.abs(st.source_index[body] - k[body] / stretch)) < 0.03 * 16000
    # Outside cross-fades the ramp is whole numbers rising by one, and the audio there is the
    # input sample the ramp names: the ramp is ground truth for the audio channel.
    # (a run of 65 unit steps: inside a cross-fade the blend's step is 1 only by accident).
    assert C.SOX_QUANTUM / C.ramp_scale(len(speech)) <= 1 / 32
    src = st.source_index
    unit = (np.diff(src) == 1.0) & (src[:-1] == np.round(src[:-1]))
    run = np.convolve(unit.astype(np.int64), np.ones(65, dtype=np.int64), mode="same")
    plain = np.flatnonzero((run == 65) & body[:-1])
    assert len(plain) > 0.5 * len(k)
    idx = src[plain].astype(np.int64)
    # A cross-fade between copies one sample apart may hide below the ramp's resolution: allow
    # a blend of the neighbours.
    x = speech.astype(np.float64)
    xp = np.concatenate([x, [0.0]])
    slack = np.maximum(np.abs(xp[idx + 1] - x[idx]), np.abs(x[idx] - xp[idx - 1])) + 1e-5
    assert np.all(np.abs(st.samples[plain] - x[idx]) <= slack)
    assert np.mean(np.abs(st.samples[plain] - x[idx]) <= 1e-5) > 0.99


def test_ramp_scale_keeps_the_ramp_below_half_scale() -> None:
    for n in (1, 1000, 480000, 1440000):
        assert n * C.ramp_scale(n) <= 0.5 < 2 * n * C.ramp_scale(n)


def test_source_index_at_clamps_to_the_ends() -> None:
    st = C.Stretched(np.zeros(4, np.float32), np.array([10.0, 11.0, 13.0, 14.0]))
    assert C.source_index_at(st, -5) == 10.0
    assert C.source_index_at(st, 1.5) == 12.0
    assert C.source_index_at(st, 99) == 14.0


# --- simple conditions -------------------------------------------------------------------------


def test_frame_loss_drops_five_percent_of_20ms_frames() -> None:
    x = np.ones(16000 * 60, dtype=np.float32)
    y, lost = C.frame_loss(x, 16000, 0.05, np.random.default_rng(1))
    assert len(lost) == 3000
    assert lost.sum() == 150
    frames = y.reshape(-1, 320)
    np.testing.assert_array_equal(frames[lost], 0.0)
    np.testing.assert_array_equal(frames[~lost], 1.0)
    y2, lost2 = C.frame_loss(x, 16000, 0.05, np.random.default_rng(1))
    np.testing.assert_array_equal(lost, lost2)


@pytest.mark.parametrize("snr", [10.0, 0.0, 25.0])
def test_noise_hits_requested_snr(speech: np.ndarray, snr: float) -> None:
    y, noise_rms = C.add_noise(speech, 16000, snr, np.random.default_rng(3))
    noise = y.astype(np.float64) - speech
    measured = 20 * np.log10(active_rms(speech, 16000) / np.sqrt(np.mean(noise**2)))
    assert measured == pytest.approx(snr, abs=0.05)
    assert np.sqrt(np.mean(noise**2)) == pytest.approx(noise_rms, rel=1e-3)


def test_noise_reference_is_the_unmarked_speech(speech: np.ndarray) -> None:
    louder = speech * np.float32(4.0)
    y, noise_rms = C.add_noise(louder, 16000, 10.0, np.random.default_rng(3), reference=speech)
    assert noise_rms == pytest.approx(active_rms(speech, 16000) / np.sqrt(10.0), rel=1e-6)


def test_gain_and_clipping(speech: np.ndarray) -> None:
    np.testing.assert_allclose(C.apply_gain(speech, -20.0), speech * 0.1, rtol=1e-6)
    y = C.apply_gain(speech, 12.0, clip=True)
    assert np.max(np.abs(y)) <= 1.0
    assert np.mean(np.abs(y) == 1.0) > 0.0


def test_prepend_silence_shifts_by_n(speech: np.ndarray) -> None:
    y = C.prepend_silence(speech, 1234)
    assert len(y) == len(speech) + 1234
    assert not y[:1234].any()
    np.testing.assert_array_equal(y[1234:], speech)


def test_second_speaker_at_equal_level(speech: np.ndarray) -> None:
    other, _ = load_fixture("speech_en_gb")
    y = C.mix_at_equal_level(speech, other * np.float32(0.1), 16000)
    added = y - speech
    assert len(y) == len(speech)
    assert active_rms(added, 16000) == pytest.approx(active_rms(speech, 16000), rel=1e-3)


def test_g711_and_resample_chain_keep_length(speech: np.ndarray) -> None:
    x8 = C.resample_chain(speech, (16000, 8000))
    assert len(x8) == len(speech) // 2
    for enc in ("mulaw", "alaw"):
        y = C.g711(x8, enc)
        assert len(y) == len(x8)
        assert np.max(np.abs(y - x8)) < 0.02
    back = C.resample_chain(C.loop_to(speech, 48000), (16000, 48000, 16000))
    assert len(back) == 48000


def test_estimate_offset_finds_a_known_delay(speech: np.ndarray) -> None:
    delayed = np.concatenate([np.zeros(37, np.float32), speech])[: len(speech)]
    assert C.estimate_offset(speech, delayed, 400) == 37
    assert C.estimate_offset(delayed, speech, 400) == -37
    assert C.estimate_offset(speech, speech, 400) == 0


def test_gsm610_round_trip_is_aligned(speech: np.ndarray) -> None:
    x8 = C.resample_chain(speech, (16000, 8000))
    y = C.gsm610(x8)
    assert len(y) == len(x8)
    assert C.estimate_offset(x8, y, 200) == 0
    assert np.corrcoef(x8, y)[0, 1] > 0.8


@needs_ffmpeg
@pytest.mark.parametrize(("codec", "bitrate"), [("libopus", "24k"), ("libmp3lame", "32k")])
def test_ffmpeg_codec_round_trip_is_aligned(
    speech: np.ndarray, codec: str, bitrate: str
) -> None:
    y = C.ffmpeg_codec(speech, 16000, codec, bitrate)
    assert len(y) == len(speech)
    assert C.estimate_offset(speech, y, 800) == 0


# --- unmarked material -------------------------------------------------------------------------


def test_unmarked_synth_is_seeded_and_exact() -> None:
    a = C.UnmarkedSynth(seed=5)
    b = C.UnmarkedSynth(seed=5)
    first = [a.chunk(16000 * 7) for _ in range(3)]
    second = [b.chunk(16000 * 7) for _ in range(3)]
    for x, y in zip(first, second, strict=True):
        assert len(x) == 16000 * 7
        assert x.dtype == np.float32
        np.testing.assert_array_equal(x, y)
        assert np.max(np.abs(x)) <= 1.0
    assert not np.array_equal(C.UnmarkedSynth(seed=6).chunk(16000), first[0][:16000])
    # continuity: chunks are consecutive slices of one stream
    c = C.UnmarkedSynth(seed=5)
    np.testing.assert_array_equal(c.chunk(16000 * 21), np.concatenate(first))


def test_unmarked_synth_makes_every_kind() -> None:
    s = C.UnmarkedSynth(seed=9)
    s.chunk(16000 * 600)
    assert all(v > 0 for v in s.kinds_made.values()), s.kinds_made


# --- matching ----------------------------------------------------------------------------------


def _det(sample: int, payload: bytes, score: float = 10.0) -> Detection:
    return Detection(sample, float(sample), 0.0, payload, score, 0.0)


def test_match_counts_found_wrong_and_duplicates() -> None:
    mm = _load("marker_matrix")
    pl = [Placement(i, 4000 + 8000 * i, session_payload(0xABC, i)) for i in range(4)]
    dets = [
        _det(4001, pl[0].payload),  # found, 1 sample late
        _det(12000 + 100, pl[1].payload),  # right payload, 6.25 ms off: not found
        _det(20000, pl[2].payload),  # found
        _det(20003, pl[2].payload),  # second copy: duplicate
        _det(28000, session_payload(0xABD, 3)),  # never placed: wrong
    ]
    m = mm.match(dets, pl, lambda d: float(d.sample), 80.0, 1.0)
    assert (m.found, m.wrong, m.dup) == (2, 1, 2)
    assert sorted(m.errors) == [0.0, 1.0]
    assert m.missed == [1, 3]


def test_match_reports_errors_at_the_output_rate() -> None:
    mm = _load("marker_matrix")
    pl = [Placement(0, 12000, session_payload(1, 0))]
    # embedded at 48 kHz, detected at 16 kHz one sample late: 3 samples at 48 kHz, 1 at 16 kHz
    m = mm.match([_det(4001, pl[0].payload)], pl, lambda d: d.sample * 3.0, 240.0, 1 / 3)
    assert m.found == 1
    assert m.errors == [pytest.approx(1.0)]


def test_offset_condition_end_to_end() -> None:
    mm = _load("marker_matrix")
    ci = [c.name for c in mm.CONDITIONS].index("offset")
    row = mm.run_condition(ci, 2.0, -20.0, 7)
    assert row["placed"] == 6 * 4
    assert row["found"] + len(row["misses"]) == row["placed"]
    # The codec's own misses are not under test here; the offset mapping is: nothing may be
    # reported off-position and every found marker is on time.
    assert row["found"] >= row["placed"] // 2
    assert row["dup"] == 0 and row["wrong"] == 0
    assert row["err_max"] <= 1.0
    assert row["out_rate"] == 16000


def test_wsola_logs_where_each_stretch_of_input_landed() -> None:
    speech, _ = load_fixture("speech_en_gb", rate=16000)
    x = speech[: 4 * 16000]
    same = C.wsola(x, 16000, 1.0)
    # Unstretched, (nearly) every frame continues the previous one and input lands where it was.
    assert np.mean(np.diff(same.starts) == same.hop) > 0.99
    for stretch in (1.03, 0.97):
        st = C.wsola(x, 16000, stretch)
        assert abs(len(st.samples) / len(x) - stretch) < 0.01
        assert np.mean(np.diff(st.starts) != st.hop) > 0.05  # it did splice
        loud = [s for s in range(4000, len(x) - 4000, 1000)
                 if np.sqrt(np.mean(x[s + 100 : s + 200] ** 2)) > 0.02]
        assert len(loud) >= 3
        for src in loud[:: max(1, len(loud) // 5)]:
            landed = st.landings(src, 384)
            assert landed and abs(landed[0] - src * stretch) < 0.02 * 16000
            # The best landing really carries that input: the output there matches it.
            at = int(landed[0])
            seg = st.samples[at + 100 : at + 200]
            ref = x[src + 100 : src + 200]
            assert float(np.dot(seg, ref)) / (np.linalg.norm(seg) * np.linalg.norm(ref)) > 0.9
