from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from probe.audio.resample import StreamResampler, resample
from probe.errors import ConfigError

RATE_PAIRS = [(48000, 16000), (16000, 48000), (8000, 16000), (16000, 8000), (44100, 16000)]


def _stream(x: npt.NDArray[np.float32], fr: int, to: int, block: int) -> tuple[
    npt.NDArray[np.float32], list[float]
]:
    rs = StreamResampler(fr, to)
    outs, delays, fed, got = [], [], 0, 0
    for i in range(0, len(x), block):
        out = rs.process(x[i : i + block])
        fed += len(x[i : i + block])
        got += len(out)
        outs.append(out)
        delays.append(rs.delay_samples)
        # delay_samples is exactly the output owed for the input fed so far
        assert rs.delay_samples == pytest.approx(fed * to / fr - got, abs=1.0)
    outs.append(rs.process(np.zeros(0, np.float32), last=True))
    return np.concatenate(outs), delays


def test_identity_when_rates_equal() -> None:
    x = np.arange(10, dtype=np.float32)
    y = resample(x, 16000, 16000)
    np.testing.assert_array_equal(x, y)
    assert y is not x
    rs = StreamResampler(16000, 16000)
    np.testing.assert_array_equal(rs.process(x), x)
    assert rs.delay_samples == 0.0


@pytest.mark.parametrize(("fr", "to"), RATE_PAIRS)
def test_impulse_lands_on_time_one_shot_and_streamed(fr: int, to: int) -> None:
    # libsoxr compensates its group delay: an impulse at t stays at t (output index t * to)
    x = np.zeros(fr, np.float32)
    x[fr // 2] = 1.0
    y = resample(x, fr, to)
    assert y.dtype == np.float32 and len(y) == to
    assert int(np.argmax(y)) == to // 2
    z, delays = _stream(x, fr, to, fr // 50)
    assert len(z) == to and int(np.argmax(z)) == to // 2
    np.testing.assert_allclose(z, y, atol=1e-6)
    # buffering latency in steady state: bounded, under 120 ms at the output rate
    assert 0 < max(delays[5:]) < 0.12 * to


@pytest.mark.parametrize(("fr", "to"), RATE_PAIRS)
def test_no_sub_sample_delay(fr: int, to: int) -> None:
    t_in = np.arange(fr) / fr
    f = 440.0
    y = resample(np.sin(2 * np.pi * f * t_in).astype(np.float32), fr, to)
    t_out = np.arange(len(y)) / to
    mid = slice(to // 10, -to // 10)
    err = y[mid] - np.sin(2 * np.pi * f * t_out[mid])
    assert np.max(np.abs(err)) < 1e-3


def test_process_after_last_and_bad_input() -> None:
    rs = StreamResampler(8000, 16000)
    rs.process(np.zeros(80, np.float32), last=True)
    with pytest.raises(ConfigError, match="already flushed"):
        rs.process(np.zeros(80, np.float32))
    with pytest.raises(ConfigError, match="positive"):
        StreamResampler(0, 16000)
    with pytest.raises(ConfigError, match="mono"):
        resample(np.zeros((10, 2), np.float32), 8000, 16000)
