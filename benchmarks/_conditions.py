"""Signal conditions for the marker benchmark, and the unmarked material for false detections.

Every function here is deterministic given its arguments (randomness comes in as a seeded
``numpy.random.Generator``). External tools (ffmpeg, sox) run on temporary files; a tool that is
missing or fails raises ``ToolError`` with its stderr, it is never skipped silently.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import soundfile as sf
import soxr

from probe.audio.formats import decode, encode
from probe.watermark.embed import active_rms

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]

# The tempo ground-truth channel carries input sample index k as k * ramp_scale(n). sox keeps
# samples to 2**-25 of full scale (measured through a unity `tempo` call), so the largest power of
# two that keeps the ramp under 0.5 gives the finest index resolution (1/32 sample for 30 s at
# 16 kHz). The ramp's slope stays tiny, so its share of sox's least-squares overlap search (which
# sums over both channels) is negligible next to the audio's.
SOX_QUANTUM = 2.0**-25


def ramp_scale(n: int) -> float:
    """Per-sample step of the index ramp for an ``n``-sample signal."""
    return float(2.0 ** np.floor(np.log2(0.5 / max(n, 1))))


class ToolError(RuntimeError):
    """An external tool (ffmpeg, sox) is missing or failed."""


def _run(cmd: Sequence[str]) -> None:
    if shutil.which(cmd[0]) is None:
        raise ToolError(f"{cmd[0]} is not installed (needed for: {' '.join(cmd)})")
    proc = subprocess.run(list(cmd), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ToolError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")


def fit_length(x: npt.ArrayLike, n: int) -> F32:
    """``x`` cut or zero-padded to exactly ``n`` samples, float32."""
    a = np.asarray(x, dtype=np.float32)
    if len(a) >= n:
        return np.ascontiguousarray(a[:n])
    return np.concatenate([a, np.zeros(n - len(a), dtype=np.float32)])


def loop_to(x: F32, n: int) -> F32:
    """``x`` repeated end to end until it is ``n`` samples long."""
    return np.resize(np.asarray(x, dtype=np.float32), n).astype(np.float32)


# --- simple signal conditions ------------------------------------------------------------------


def apply_gain(x: F32, db: float, *, clip: bool = False) -> F32:
    """``x`` scaled by ``db``; with ``clip`` hard-limited to [-1, 1]."""
    y = np.asarray(x, dtype=np.float32) * np.float32(10 ** (db / 20))
    return np.clip(y, -1.0, 1.0).astype(np.float32) if clip else y.astype(np.float32)


def add_noise(
    x: F32, rate: int, snr_db: float, rng: np.random.Generator, *, reference: F32 | None = None
) -> tuple[F32, float]:
    """White Gaussian noise added at ``snr_db`` below the active speech level of ``reference``
    (default ``x``; pass the unmarked speech so the marker does not count as signal).

    Returns the noisy signal and the noise RMS used.
    """
    ref = active_rms(np.asarray(x if reference is None else reference, np.float32), rate)
    noise_rms = ref * 10 ** (-snr_db / 20)
    noise = rng.standard_normal(len(x))
    noise *= noise_rms / np.sqrt(np.mean(noise**2))
    return (np.asarray(x, np.float64) + noise).astype(np.float32), float(noise_rms)


def frame_loss(
    x: F32, rate: int, fraction: float, rng: np.random.Generator, *, frame_s: float = 0.02
) -> tuple[F32, npt.NDArray[np.bool_]]:
    """Zero-fill ``round(fraction * frames)`` of the ``frame_s`` frames, chosen at random.

    Returns the damaged signal and the per-frame loss mask.
    """
    n = int(round(frame_s * rate))
    frames = int(np.ceil(len(x) / n))
    lost = np.zeros(frames, dtype=bool)
    lost[rng.choice(frames, size=int(round(fraction * frames)), replace=False)] = True
    y = np.array(x, dtype=np.float32, copy=True)
    for f in np.flatnonzero(lost):
        y[f * n : (f + 1) * n] = 0.0
    return y, lost


def prepend_silence(x: F32, n: int) -> F32:
    """``n`` samples of digital silence, then ``x``."""
    return np.concatenate([np.zeros(n, dtype=np.float32), np.asarray(x, np.float32)])


def mix_at_equal_level(x: F32, other: F32, rate: int, *, reference: F32 | None = None) -> F32:
    """``x`` plus ``other`` (looped to length) scaled to the active level of ``reference``
    (default ``x``)."""
    o = loop_to(other, len(x))
    ref = active_rms(np.asarray(x if reference is None else reference, np.float32), rate)
    o = o * np.float32(ref / active_rms(o, rate))
    return (np.asarray(x, np.float32) + o).astype(np.float32)


def g711(x: F32, enc: str) -> F32:
    """A G.711 round trip (``enc`` is "mulaw" or "alaw") with probe.audio.formats."""
    return decode(encode(x, enc), enc)  # type: ignore[arg-type]


def resample_chain(x: F32, rates: Sequence[int]) -> F32:
    """Resample through each rate in turn with soxr HQ, e.g. (48000, 16000, 8000, 16000)."""
    y = np.asarray(x, np.float32)
    for a, b in zip(rates[:-1], rates[1:], strict=True):
        y = np.asarray(soxr.resample(y, a, b, quality="HQ"), dtype=np.float32)
    return y


# --- lossy codecs ------------------------------------------------------------------------------


def ffmpeg_codec(x: F32, rate: int, codec: str, bitrate: str) -> F32:
    """Encode with ffmpeg (``codec`` "libopus" into Ogg or "libmp3lame" into MP3) at
    ``bitrate`` (e.g. "12k"), decode with ffmpeg back to ``rate``; same length as ``x``."""
    ext = {"libopus": "ogg", "libmp3lame": "mp3"}[codec]
    with tempfile.TemporaryDirectory(prefix="marker_codec_") as d:
        src, mid, dst = Path(d, "in.wav"), Path(d, f"coded.{ext}"), Path(d, "out.wav")
        sf.write(src, np.asarray(x, np.float32), rate, subtype="FLOAT")
        _run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-i", str(src),
              "-c:a", codec, "-b:a", bitrate, str(mid)])
        _run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-i", str(mid),
              "-ar", str(rate), "-ac", "1", "-c:a", "pcm_f32le", str(dst)])
        y, got = sf.read(dst, dtype="float32")
    if got != rate:
        raise ToolError(f"ffmpeg decoded {codec} at {got} Hz, asked for {rate} Hz")
    return fit_length(y, len(x))


def gsm610(x: F32, rate: int = 8000) -> F32:
    """A GSM 6.10 full-rate round trip through libsndfile (WAV subtype GSM610); 8 kHz only."""
    if rate != 8000:
        raise ValueError("GSM 6.10 is an 8 kHz codec")
    with tempfile.TemporaryDirectory(prefix="marker_gsm_") as d:
        path = Path(d, "gsm.wav")
        sf.write(path, np.clip(np.asarray(x, np.float32), -1, 1), rate, subtype="GSM610")
        y, _ = sf.read(path, dtype="float32")
    return fit_length(y, len(x))


def estimate_offset(before: F32, after: F32, max_lag: int) -> int:
    """Lag (samples) that best aligns ``after`` with ``before``: after[k + lag] ~ before[k].

    Cross-correlation via FFT over lags -max_lag..max_lag; positive means ``after`` is late.
    """
    n = min(len(before), len(after))
    a = np.asarray(before[:n], np.float64)
    b = np.asarray(after[:n], np.float64)
    nfft = 1 << int(np.ceil(np.log2(2 * n)))
    c = np.fft.irfft(np.conj(np.fft.rfft(a, nfft)) * np.fft.rfft(b, nfft), nfft)
    lags = np.concatenate([np.arange(-max_lag, 0), np.arange(0, max_lag + 1)])
    return int(lags[int(np.argmax(c[lags]))])


# --- time stretch with a ground-truth ramp ------------------------------------------------------


@dataclass(frozen=True)
class Stretched:
    """Output of :func:`sox_tempo`: the stretched audio and, per output sample, the input sample
    index it came from (read from the ramp channel; a cross-fade gives a blend of two)."""

    samples: F32
    source_index: F64


def sox_tempo(x: F32, rate: int, stretch: float, *, speech: bool = True) -> Stretched:
    """Make ``x`` ``stretch`` times as long without changing pitch (sox ``tempo``, WSOLA).

    One stereo call: channel 1 is ``x``, channel 2 the ramp k * ramp_scale(len(x)), so the
    ground truth has been through exactly the segment choices the audio has; it resolves
    SOX_QUANTUM / ramp_scale of a sample.
    """
    scale = ramp_scale(len(x))
    ramp = np.arange(len(x), dtype=np.float64) * scale
    stereo = np.stack([np.asarray(x, np.float32), ramp.astype(np.float32)], axis=1)
    opts = ["-s"] if speech else []
    with tempfile.TemporaryDirectory(prefix="marker_tempo_") as d:
        src, dst = Path(d, "in.wav"), Path(d, "out.wav")
        sf.write(src, stereo, rate, subtype="FLOAT")
        _run(["sox", "-V1", "-D", str(src), "-e", "floating-point", "-b", "32", str(dst),
              "tempo", *opts, f"{1.0 / stretch:.10f}"])
        y, got = sf.read(dst, dtype="float64", always_2d=True)
    if got != rate or y.shape[1] != 2:
        raise ToolError(f"sox tempo gave {y.shape[1]} channels at {got} Hz")
    return Stretched(samples=y[:, 0].astype(np.float32), source_index=y[:, 1] / scale)


@dataclass(frozen=True)
class Wsola:
    """Output of :func:`wsola`: the stretched audio and its splice log. Output frame k (Hann
    window, ``frame`` samples) is input ``starts[k]`` onward, added at output ``k * hop``."""

    samples: F32
    starts: npt.NDArray[np.int64]
    frame: int
    hop: int

    def landings(self, source: int, length: int, min_share: float = 0.2) -> list[float]:
        """Where the input stretch ``source .. source + length`` (a marker's first segment)
        landed: each output start a frame implies for it (output index of ``source`` in that
        frame's mapping), weighted by how much of the stretch the frame carries through its
        cross-fade; the starts holding at least ``min_share`` of the weight, best first. A
        splice inside the stretch can give two."""
        window = np.hanning(self.frame + 2)[1:-1]
        weight: dict[int, float] = {}
        span = np.arange(length)
        for k, start in enumerate(self.starts):
            offs = source + span - int(start)
            offs = offs[(offs >= 0) & (offs < self.frame)]
            if offs.size:
                at = k * self.hop + source - int(start)
                weight[at] = weight.get(at, 0.0) + float(window[offs].sum())
        total = sum(weight.values())
        if total <= 0:
            return []
        keep = [(w, at) for at, w in weight.items() if w >= min_share * total]
        return [float(at) for w, at in sorted(keep, reverse=True)]


def wsola(x: F32, rate: int, stretch: float, *, frame_ms: float = 20.0,
          search_ms: float = 8.0) -> Wsola:
    """Waveform-similarity overlap-add (Verhelst & Roelands 1993): ``x`` made ``stretch`` times
    as long without changing pitch, as a jitter buffer's accelerate/expand or a tempo change
    does it, with a log of where the input landed (:meth:`Wsola.landings`).

    Frames of ``frame_ms`` at 50 % overlap; each next frame is the input stretch within
    +-``search_ms`` of its nominal position that best continues the previous one."""
    x = np.asarray(x, np.float64)
    frame = int(round(frame_ms * rate / 1000)) // 2 * 2
    hop = frame // 2
    search = int(round(search_ms * rate / 1000))
    window = np.hanning(frame + 2)[1:-1]
    n_out = int(len(x) * stretch)
    frames = max(1, (n_out - frame) // hop + 1)
    out = np.zeros((frames - 1) * hop + frame)
    starts = np.zeros(frames, dtype=np.int64)
    prev = 0
    used = 0
    for k in range(frames):
        nominal = int(round(k * hop / stretch))
        start = 0
        if k > 0:
            natural = prev + hop  # what continues the previous frame seamlessly
            lo = max(0, nominal - search)
            hi = min(len(x) - frame, nominal + search)
            if hi < lo or natural + hop > len(x):
                break
            target = x[natural : natural + hop]
            cand = np.lib.stride_tricks.sliding_window_view(x[lo : hi + hop], hop)
            norm = np.sqrt(np.einsum("ln,ln->l", cand, cand)) + 1e-12
            start = lo + int(np.argmax((cand @ target) / norm))
        if start + frame > len(x):
            break
        starts[k] = start
        out[k * hop : k * hop + frame] += window * x[start : start + frame]
        prev = start
        used = k + 1
    return Wsola(samples=out[: (used - 1) * hop + frame].astype(np.float32),
                 starts=starts[:used], frame=frame, hop=hop)


def source_index_at(st: Stretched, position: float) -> float:
    """The input sample index at (fractional) output ``position``, linearly interpolated."""
    idx = st.source_index
    p = min(max(position, 0.0), len(idx) - 1.0)
    i = int(np.floor(p))
    j = min(i + 1, len(idx) - 1)
    return float(idx[i] + (idx[j] - idx[i]) * (p - i))


# --- unmarked material for the false-detection run ---------------------------------------------

SPEECH = (
    "speech_en_us",
    "speech_en_gb",
    "speech_en_scotland",
    "speech_en_f3",
    "speech_en_us_m5",
    "speech_en_klatt",
)
BEDS = ("music", "pink_noise", "babble")


class UnmarkedSynth:
    """An endless, seeded stream of unmarked audio built from the fixtures.

    Segments: speech runs (fixtures in random order, random gains, random speed +-8 %, random
    gaps), random slices of music / pink noise / babble, digital silence, near-silent noise and
    mixtures (speech over a bed or over other speech at -5..+20 dB). Levels span -45..+6 dB
    around the fixtures' -20 dBFS; the result is hard-clipped at +-1 like a real file would be.
    """

    KINDS = ("speech", "bed", "silence", "hiss", "mix")
    WEIGHTS = (0.38, 0.22, 0.08, 0.04, 0.28)

    def __init__(self, seed: int, rate: int = 16000) -> None:
        from probe.audio.fixtures import load_fixture

        self.rate = rate
        self.rng = np.random.default_rng(seed)
        self.speech = [load_fixture(n, rate=rate)[0] for n in SPEECH]
        self.beds = {n: load_fixture(n, rate=rate)[0] for n in BEDS}
        self._left = np.zeros(0, dtype=np.float32)
        self.kinds_made: dict[str, float] = {k: 0.0 for k in self.KINDS}

    def chunk(self, n: int) -> F32:
        """The next ``n`` samples."""
        parts = [self._left]
        have = len(self._left)
        while have < n:
            seg = self._segment()
            parts.append(seg)
            have += len(seg)
        out = np.concatenate(parts)
        self._left = out[n:]
        return np.clip(out[:n], -1.0, 1.0).astype(np.float32)

    def _gain(self, lo: float = -25.0, hi: float = 6.0) -> np.float32:
        return np.float32(10 ** (self.rng.uniform(lo, hi) / 20))

    def _speech_run(self) -> F32:
        parts = []
        for k in self.rng.permutation(len(self.speech))[: self.rng.integers(1, 5)]:
            x = self.speech[int(k)]
            speed = self.rng.uniform(0.92, 1.08)
            if abs(speed - 1) > 0.005:
                x = np.asarray(soxr.resample(x, self.rate * speed, self.rate, "HQ"), np.float32)
            start = int(self.rng.integers(0, len(x) // 2))
            parts.append(x[start:] * self._gain())
            gap = int(self.rng.uniform(0.0, 0.6) * self.rate)
            parts.append(np.zeros(gap, dtype=np.float32))
        return np.concatenate(parts).astype(np.float32)

    def _bed(self, name: str | None = None) -> F32:
        name = name or str(self.rng.choice(BEDS))
        x = self.beds[name]
        n = int(self.rng.uniform(1.0, 12.0) * self.rate)
        start = int(self.rng.integers(0, len(x)))
        return (np.roll(loop_to(x, max(n, len(x))), -start)[:n] * self._gain()).astype(np.float32)

    def _segment(self) -> F32:
        kind = str(self.rng.choice(self.KINDS, p=self.WEIGHTS))
        if kind == "speech":
            seg = self._speech_run()
        elif kind == "bed":
            seg = self._bed()
        elif kind == "silence":
            seg = np.zeros(int(self.rng.uniform(0.2, 3.0) * self.rate), dtype=np.float32)
        elif kind == "hiss":
            n = int(self.rng.uniform(0.5, 4.0) * self.rate)
            level = 10 ** (self.rng.uniform(-80, -55) / 20)
            seg = (self.rng.standard_normal(n) * level).astype(np.float32)
        else:
            seg = self._speech_run()
            other = self._speech_run() if self.rng.random() < 0.3 else self._bed()
            other = loop_to(other, len(seg))
            snr = self.rng.uniform(-5.0, 20.0)
            scale = active_rms(seg, self.rate) / active_rms(other, self.rate) * 10 ** (-snr / 20)
            seg = (seg + other * np.float32(scale)).astype(np.float32)
        self.kinds_made[kind] += len(seg) / self.rate
        return seg
