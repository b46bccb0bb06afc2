"""A streaming resampler with a small, fixed hold-back, for hops that must keep their timing.

`probe.audio.resample.StreamResampler` (soxr "HQ") withholds output in large blocks: measured
with 20 ms input chunks, 16 -> 8 kHz held back 12.5-115 ms (mean 64 ms), and soxr's "LQ" and
"MQ" recipes still 4-61 ms and 10-118 ms. A hop whose configured delay is 35 ms could then not
keep it. So a pipeline hop resamples with soxr's "QQ" recipe (cubic interpolation, delay-
compensated, held back 0.13 ms at 16 -> 8 kHz, 0.25 ms at 8 -> 16 kHz) and adds what QQ lacks,
the anti-alias / anti-image low-pass, as a linear-phase Kaiser FIR run at the higher rate
(passband to 0.42 of the lower rate, stopband from 0.5 of it, 60 dB). The FIR's output is shifted
by its group delay so that output sample k is input time k / to_rate, exactly as soxr's; the price
is that it holds back half its length, about 23 samples of the lower rate. Measured with 20 ms
input chunks (constant over the stream; an impulse still lands on its exact output index):

    16 -> 8 kHz    93 taps at 16 kHz, hold-back 3.00 ms      8 -> 16 kHz   3.13 ms
    48 -> 16 kHz  137 taps at 48 kHz, hold-back 1.44 ms     16 -> 48 kHz   1.52 ms
    48 -> 8 kHz   273 taps at 48 kHz, hold-back 2.88 ms      8 -> 48 kHz   3.08 ms

Response at 16 -> 8 kHz: 0.0 dB to 3.3 kHz, -0.7 dB at 3.5 kHz, below -77 dB from 4 kHz up
(tests/test_pipeline_core.py checks these). Whatever is held back, the caller can
always map an output sample to the input sample it stands for, by index.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import soxr

from probe.errors import ConfigError

__all__ = ["LowLatencyResampler", "lowpass_taps"]

F32 = npt.NDArray[np.float32]

_STOPBAND_DB = 60.0
_PASS_EDGE = 0.42  # of the lower rate
_STOP_EDGE = 0.50


def lowpass_taps(rate: int, low_rate: int) -> F32:
    """Kaiser-window FIR (odd length, unit DC gain) that keeps what `low_rate` can carry."""
    if not 0 < low_rate < rate:
        raise ConfigError(f"A low-pass needs 0 < {low_rate} < {rate} Hz.")
    width = (_STOP_EDGE - _PASS_EDGE) * low_rate / rate  # cycles per sample
    order = math.ceil((_STOPBAND_DB - 7.95) / (14.36 * width))
    order += order % 2
    beta = 0.1102 * (_STOPBAND_DB - 8.7)
    cutoff = (_STOP_EDGE + _PASS_EDGE) / 2.0 * low_rate / rate
    n = np.arange(order + 1) - order / 2.0
    h = 2.0 * cutoff * np.sinc(2.0 * cutoff * n) * np.kaiser(order + 1, beta)
    return np.asarray(h / h.sum(), dtype=np.float32)


class _Fir:
    """Streaming linear-phase FIR, delay-compensated: output k is filtered input k."""

    def __init__(self, taps: F32) -> None:
        self.taps = taps
        self.half = (len(taps) - 1) // 2
        self._buf = np.zeros(self.half, dtype=np.float32)

    def process(self, x: F32, last: bool) -> F32:
        buf = np.concatenate([self._buf, x])
        if last:
            buf = np.concatenate([buf, np.zeros(self.half, dtype=np.float32)])
        if len(buf) < len(self.taps):
            self._buf = buf
            return np.zeros(0, dtype=np.float32)
        out = np.convolve(buf, self.taps, mode="valid").astype(np.float32)
        self._buf = buf[len(buf) - len(self.taps) + 1:]
        return out


class LowLatencyResampler:
    """Resample a mono float32 stream block by block; see the module docstring for timing."""

    def __init__(self, from_rate: int, to_rate: int) -> None:
        if from_rate <= 0 or to_rate <= 0:
            raise ConfigError(f"Sample rates must be positive, got {from_rate} and {to_rate} Hz.")
        self.from_rate = from_rate
        self.to_rate = to_rate
        self._fir: _Fir | None = None
        self._soxr: soxr.ResampleStream | None = None
        if from_rate != to_rate:
            high, low = max(from_rate, to_rate), min(from_rate, to_rate)
            self._fir = _Fir(lowpass_taps(high, low))
            self._soxr = soxr.ResampleStream(from_rate, to_rate, 1, dtype="float32", quality="QQ")
        self._finished = False

    @property
    def holdback(self) -> float:
        """Seconds of audio the FIR holds back (QQ adds at most one sample more)."""
        if self._fir is None:
            return 0.0
        return self._fir.half / max(self.from_rate, self.to_rate)

    def process(self, block: npt.ArrayLike, last: bool = False) -> F32:
        """Feed one block; returns the output now ready. Pass last=True once, at the end."""
        if self._finished:
            raise ConfigError("This resampler was already flushed with last=True.")
        self._finished = last
        x = np.ascontiguousarray(np.asarray(block, dtype=np.float32).ravel())
        if self._soxr is None or self._fir is None:
            return x.copy()
        if self.to_rate < self.from_rate:
            y = self._fir.process(x, last)
            return np.asarray(self._soxr.resample_chunk(y, last=last), dtype=np.float32)
        y = np.asarray(self._soxr.resample_chunk(x, last=last), dtype=np.float32)
        return self._fir.process(y, last)
