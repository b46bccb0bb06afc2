"""Informed detection: find the markers a stream is *expected* to carry (sans-I/O).

The live sink is not blind: a fork's ``start`` names its session, the source knows its own return
stream, and the registry knows the payload and send time of every marker sent. So instead of
decoding 24 ms symbols one at a time, the informed detector correlates the whitened stream with
each expected marker's whole known data part (192 ms of energy at once) in a window from its send
time to its deadline. That finds markers through low-bitrate codecs, denoisers and noise that
defeat a blind decode.

Identity (which marker this is) is safe by construction: only the eight data segments are
correlated, never the two sync segments every marker shares, and in marker format v2 the data
segments are keyed by the whole payload (:mod:`probe.watermark.design`), so a neighbouring marker
or another session's marker correlates like noise at every lag. The statistic is also robust to a
single segment that happens to match (a 1/128 event per segment): each segment's z-score is capped
before the segments are summed, so no one segment can carry a detection.

Time stretch (jitter buffers, WSOLA) cuts a marker into pieces with different lags. When the
whole-template match fails, each data segment is correlated on its own and a dynamic-programming
path picks one lag per segment (lag changes between neighbouring segments bounded and penalised);
the marker's start is then timed by its opening sync segment near where the path puts it. That
search is opt-in (``dp_threshold``): measured, its null distribution overlaps the scores of real
stretched markers, so it would trade identity safety for stretch coverage.

Where to look: a stream's latency changes slowly, so each expected marker is first searched
within +-2.5 ms, then +-60 ms, of where the stream's previous detection says it should be; only
when that fails is the whole window from its send time to its deadline searched, block by block as
audio arrives, so the cost does not grow with the marker timeout.

The score is energy-normalised: each lag's correlation is divided by the whitened energy under the
template, and each segment's by the energy under that segment, so stretches of digital silence
(which whiten to nothing) neither shrink the noise scale nor inflate a peak elsewhere (with one
noise scale per window, a 3 s window over unmarked audio reached 8.2).

Thresholds are set from measured null distributions, one per window size (the constants below say
how), not by hand; ``benchmarks/informed_matrix.py`` checks them with its null rows (unmarked
audio, other sessions' audio and neighbour markers against the templates).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import numpy.typing as npt
import soxr

from probe.watermark.design import (
    DATA_SEGMENTS,
    DETECT_RATE,
    MARKER_S,
    marker_waveform,
    segment_samples,
    sync_segment,
)
from probe.watermark.detect import (
    _MASK,
    _WINDOW,
    F64,
    Detection,
    _Clock,
    _fast_len,
    _sanitize,
    whiten,
)

__all__ = [
    "DP_THRESHOLD",
    "THRESHOLD",
    "TIGHT_THRESHOLD",
    "WIDE_THRESHOLD",
    "Expected",
    "Gap",
    "Hit",
    "InformedDetector",
    "Whitener",
    "Sent",
    "follow_markers",
    "locate",
    "recover_missing",
    "search_gaps",
    "series_gaps",
    "whiten_signal",
]

_N = segment_samples(DETECT_RATE)  # 192
_DATA = DATA_SEGMENTS * _N  # 1536: the payload-keyed part
_MARKER = (DATA_SEGMENTS + 2) * _N
# Per-segment z-scores are capped at this before they are summed (identity: no single segment
# may carry a detection).
CAP = 6.0
# Acceptance thresholds on the capped statistic (sum of capped segment z / sqrt(8)); see the
# module docstring and benchmarks/marker_matrix.py for the null distributions behind them.
#
# Three windows, three thresholds: the more lags a search tries, the higher its null maximum.
# Measured over 10 h of unmarked audio (speech, music, noise, babble, silence, mixtures; a
# random payload expected every 0.5 s): the highest score of a +-2.5 ms window was 5.11, of a
# +-60 ms window 5.81 (6.02 in another 3 h), of a 3 s wide window 6.16. Each threshold sits
# about one tail decade (0.5) above that: under 0.1 expected false detections per 10 h.
TIGHT_THRESHOLD = 5.5
THRESHOLD = 6.25
WIDE_THRESHOLD = 7.0
DP_THRESHOLD = 9.0
# Stretch: how far (samples at 8 kHz) a data segment may sit from the whole-template lag (sox
# tempo and jitter buffers splice 5-15 ms apart), the cost (z units) of a lag jump between
# neighbouring segments, how many coarse peaks the stretch search refines, and the sync z-score
# that times a stretched marker's start.
_WANDER = 160
_JUMP = 3.0
_CANDIDATES = 3
_SYNC_Z = 3.0
_SYNC_FAR_Z = 4.75
_SYNC_MARGIN = 1.0
# A stream counts as stretching for _DRIFT_HOLD hits after two hits drifted by over _DRIFT_S.
_DRIFT_S = 0.0005
_DRIFT_HOLD = 8
_SYNC_SURE = 4.0
_SYNC_GAP = 3.0
# Measured at the -14 dB marker level (informed_matrix, 6 voices x 30 s): at 4.5, WSOLA +3 % and
# -3 % left 3 and 6 markers timed over 5 ms off (a moved opening sync not taken) and G.723.1
# none; at 3.5, 2 and 1, and G.723.1 1 (a speech peak taken for the sync); at 3.0, 0 and 2, and
# G.723.1 3 and GSM 2.
_SYNC_MOVED_Z = 3.5
# Until a stream has shown drift (its first hits, held as stretching in case it is), the higher
# bar: a constant-latency stream's sync is rarely weak, and a speech peak must not move it.
# Measured (same matrix): G.723.1 1 -> 0 mistimed, WSOLA +-3 % unchanged (2 and 1).
_SYNC_MOVED_Z_UNSURE = 4.5
# A whole-template hit is checked for a splice when its correlation has a second peak within
# _WANDER of at least _SPLIT_Z noise units and _SPLIT_SHARE of the main peak, and taken as
# spliced when the piecewise path gains _GAIN z units over the single lag.
_SPLIT_Z = 3.5
_SPLIT_SHARE = 0.25
_GAIN = 3.0
# Tight and narrow search half-widths around the predicted start (samples at 8 kHz).
_TIGHT = 20
# A window's best lag must be the highest within this many samples (outside the window too).
_EDGE = 24
_NARROW = 480
_EARLY_S = 0.05
# Whitened energy per sample under which audio counts as digital silence (whitened PHAT output
# has about 0.3 per sample in the band).
_ENERGY_FLOOR = 1e-6
_HISTORY_S = 3.0
_HISTORY_DTYPE = np.float16
# How far before a search window's first candidate :func:`locate` may read (8 kHz samples): the
# widening pad (128), a stretched marker's sync scan (2 x _WANDER) and more, rounded up.
_REACH = 1024
# Audio is whitened and searched in blocks of this much: per-call costs are paid twice a second
# (informed_matrix, clean and mu-law rows: 0.64 and 0.60 ms per stream-second with 0.25 s
# blocks, 0.57 and 0.54 with 0.5 s). A detection is reported at most one block after its audio;
# its time is the arrival stamp of its own samples, so latency does not change.
_BLOCK_S = 0.5
# Input fed to the resampler per call (see _resample_in_steps).
_RESAMPLE_STEP_S = 0.1


@dataclass(frozen=True, slots=True)
class Expected:
    """A marker a stream should carry: its payload, the send time of its first sample, and the
    time after which it is no longer looked for (its send time plus the marker timeout)."""

    payload: bytes
    send_time: float
    deadline: float


@dataclass(frozen=True, slots=True)
class Hit:
    """Where a known marker starts in a whitened 8 kHz signal (fractional index), its score
    (capped statistic), and whether it took the stretch search."""

    position: float
    score: float
    stretched: bool


@dataclass(frozen=True, slots=True)
class _Template:
    data: F64  # the data part, (DATA_SEGMENTS * _N,)
    segments: F64  # (DATA_SEGMENTS, _N)
    # conj(rfft(data, nfft)) per FFT size used: every search of a marker reuses its spectrum.
    spectra: dict[int, npt.NDArray[np.complex128]]

    def spectrum(self, nfft: int) -> npt.NDArray[np.complex128]:
        s = self.spectra.get(nfft)
        if s is None:
            s = np.conj(np.fft.rfft(self.data, nfft))
            # A wide search's spectrum (up to 200 kB, a new size at every block) is not kept:
            # it is rarely asked for again, and hundreds of them are what a sink child's memory
            # would hold at the start of a run.
            if nfft <= _KEPT_NFFT:
                self.spectra[nfft] = s
        return s


# The largest FFT size whose template spectrum is kept: a +-60 ms window's (2700).
_KEPT_NFFT = 4096


# Making a template takes about 40 us, its spectrum for a search a quarter of that; a large cache
# only costs memory (12 kB per payload and 15-22 kB per narrow FFT size searched), so it holds what
# the open searches reuse. Both streams of a session (its fork and its return direction) search
# each of its markers, and at load every session's streams can reach their search blocks at about
# the same time: with room for 64, the 200 streams of 100 sessions made most templates twice
# (measured: 3556 made for 2000 payloads, 4000 searches); 256 holds the markers of 256 sessions'
# streams searched in turn.
@lru_cache(maxsize=256)
def _template(payload: bytes) -> _Template:
    wave = marker_waveform(payload, DETECT_RATE).astype(np.float64)
    data = np.ascontiguousarray(wave[_N : _N + _DATA])
    data.setflags(write=False)
    segs = data.reshape(DATA_SEGMENTS, _N)
    return _Template(data=data, segments=segs, spectra={})


_SYNC = sync_segment(DETECT_RATE).astype(np.float64)
# The opening sync as a template of its own: its spectrum per FFT size is kept (a sync scan is
# always +-_WANDER wide, so there are one or two sizes).
_SYNC_TMPL = _Template(data=_SYNC, segments=_SYNC.reshape(1, -1), spectra={})


def _correlate(x: F64, kernel: F64, tmpl: _Template | None = None) -> F64:
    """Valid-mode cross-correlation: out[i] = sum_n x[i + n] * kernel[n] (``kernel`` the data
    part of ``tmpl`` when given: its spectrum is then reused)."""
    n = len(x) - len(kernel) + 1
    if n <= 0:
        return np.zeros(0)
    nfft = _fast_len(len(x))
    conj = tmpl.spectrum(nfft) if tmpl is not None else np.conj(np.fft.rfft(kernel, nfft))
    out: F64 = np.fft.irfft(np.fft.rfft(x, nfft) * conj, nfft)[:n]
    return out


def _spread(c: F64, peak: int, guard: int = 24) -> float:
    """Noise scale of a correlation: its RMS away from the peak."""
    lo, hi = max(0, peak - guard), peak + guard + 1
    rest = np.concatenate([c[:lo], c[hi:]])
    if rest.size < 32:
        return float("nan")
    return float(np.sqrt(np.dot(rest, rest) / rest.size))


def _frac(c: F64, i: int) -> float:
    if i <= 0 or i >= len(c) - 1:
        return 0.0
    a, b, d = float(c[i - 1]), float(c[i]), float(c[i + 1])
    den = a - 2 * b + d
    if den >= 0.0:
        return 0.0
    return float(min(0.5, max(-0.5, 0.5 * (a - d) / den)))


def _sliding_energy(x: F64, n: int) -> F64:
    """out[i] = sum(x[i : i + n] ** 2)."""
    cs = np.empty(len(x) + 1)
    cs[0] = 0.0
    np.cumsum(x * x, out=cs[1:])
    out: F64 = cs[n:] - cs[:-n]
    return out


def _segment_z(w: F64, start: int, tmpl: _Template, sigma: float) -> F64:
    """Each data segment's z-score at marker start ``start``: its correlation over the whitened
    energy under it, in units of ``sigma`` (the energy-normalised correlation's noise scale)."""
    block = w[start + _N : start + _N + _DATA]
    if len(block) < _DATA:
        return np.zeros(DATA_SEGMENTS)
    segs = block.reshape(DATA_SEGMENTS, _N)
    raw = np.einsum("jn,jn->j", segs, tmpl.segments)
    energy = np.einsum("jn,jn->j", segs, segs)
    live = energy > _ENERGY_FLOOR * _N
    out: F64 = np.where(live, raw / (np.sqrt(np.maximum(energy, 1e-30)) * sigma), 0.0)
    return out


def locate(
    w: F64,
    payload: bytes,
    lo: int,
    hi: int,
    *,
    threshold: float = THRESHOLD,
    dp_threshold: float | None = None,
    stretching: bool = True,
    moved_z: float = _SYNC_MOVED_Z,
) -> Hit | None:
    """Find the marker carrying ``payload`` starting anywhere in ``[lo, hi]`` of the whitened
    8 kHz signal ``w`` (indices into ``w``); None when it is not there.

    Needs ``w`` to hold the marker wholly: candidates whose data part runs past ``w`` are not
    considered. ``dp_threshold`` None disables the stretch search. ``stretching`` False (the
    stream has shown no drift) keeps the start where the data part puts it unless the data
    segments themselves show a splice: a sync-like bit of speech near a marker must not move a
    constant-latency stream's timing."""
    lo = max(0, lo)
    hi = min(hi, len(w) - _MARKER)
    if hi < lo:
        return None
    tmpl = _template(payload)
    # Widen by a margin so the noise scale has enough lags even for a narrow window.
    pad = max(0, (256 - (hi - lo)) // 2)
    a = max(0, lo - pad)
    b = min(len(w) - _MARKER, hi + pad)
    span = w[a + _N : b + _N + _DATA]
    c = _correlate(span, tmpl.data, tmpl)
    if c.size == 0:
        return None
    # Normalise each lag by the whitened energy under the template, so quiet stretches (digital
    # silence whitens to zero) neither shrink the noise scale nor inflate the peaks elsewhere.
    energy = _sliding_energy(span, _DATA)[: c.size]
    live = energy > _ENERGY_FLOOR * _DATA
    cn = np.where(live, c / np.sqrt(np.maximum(energy, 1e-30)), 0.0)
    inner = cn[lo - a : hi - a + 1]
    peak = lo - a + int(np.argmax(inner))
    if float(cn[max(0, peak - _EDGE) : peak + _EDGE + 1].max()) > float(cn[peak]):
        # The window's best lag is the flank of a higher peak just outside it (a tight window
        # after a latency change): that marker belongs to a wider search, which times it right.
        return None
    sigma = _spread(cn[live[: cn.size]], int(np.count_nonzero(live[:peak])))
    if not np.isfinite(sigma) or sigma <= 1e-12:
        return None
    z = _segment_z(w, a + peak, tmpl, sigma)
    score = float(np.minimum(z, CAP).sum() / np.sqrt(DATA_SEGMENTS))
    if score >= threshold:
        position = a + peak + _frac(cn, peak)
        moved = (
            _moved_sync(w, a + peak, sigma, float(np.mean(np.minimum(z, CAP))), moved_z)
            if stretching
            else None
        )
        if moved is not None:
            return Hit(position=moved, score=score, stretched=True)
        if not _split(cn, peak, sigma):
            return Hit(position=position, score=score, stretched=False)
        return _timed(w, tmpl, a + peak, position, score, sigma)
    if dp_threshold is None:
        return None
    # Stretch: the strongest few coarse peaks (a stretched marker still lines up some of its
    # segments near where it starts), each refined segment by segment.
    best: Hit | None = None
    order = np.argsort(inner)[::-1]
    tried: list[int] = []
    for i in order[: 4 * _CANDIDATES]:
        t0 = a + lo - a + int(i)
        if any(abs(t0 - t) < _N for t in tried):
            continue
        tried.append(t0)
        z_lags = _lag_z(w, tmpl, t0, sigma)
        if z_lags is not None:
            dp, lags = _piecewise(z_lags)
            if dp >= dp_threshold and (best is None or dp > best.score):
                best = _stretched(w, t0, lags, dp, float(t0), sigma)
        if len(tried) >= _CANDIDATES:
            break
    return best


def _lag_z(w: F64, tmpl: _Template, t0: int, sigma: float) -> F64 | None:
    """z[j, k]: data segment j's energy-normalised z-score when it sits ``k - _WANDER`` samples
    from where a marker starting at ``t0`` puts it; None near the ends of ``w``."""
    lags = 2 * _WANDER + 1
    first = t0 + _N - _WANDER
    if first < 0 or t0 + _N + _DATA + _WANDER > len(w):
        return None
    z = np.empty((DATA_SEGMENTS, lags))
    for j in range(DATA_SEGMENTS):
        start = first + j * _N
        win = np.lib.stride_tricks.sliding_window_view(w[start : start + lags - 1 + _N], _N)
        energy = np.einsum("ln,ln->l", win, win)
        z[j] = np.where(
            energy > _ENERGY_FLOOR * _N,
            (win @ tmpl.segments[j]) / (np.sqrt(np.maximum(energy, 1e-30)) * sigma),
            0.0,
        )
    return z


def _piecewise(z: F64) -> tuple[float, npt.NDArray[np.int64]]:
    """The best piecewise-constant lag path through ``z`` (segments x lags): a WSOLA stretch
    moves a marker in unstretched pieces, so neighbouring segments keep their lag (+-1 sample,
    free) or jump anywhere at a cost of ``_JUMP``. Returns the path's capped score (sum over
    sqrt(segments), jump costs included) and each segment's lag index."""
    capped = np.minimum(z, CAP)
    segs, lags = capped.shape
    value = capped[0].copy()
    back = np.zeros((segs, lags), dtype=np.int64)
    idx = np.arange(lags)
    for j in range(1, segs):
        padded = np.concatenate([[-np.inf], value, [-np.inf]])
        near = np.lib.stride_tricks.sliding_window_view(padded, 3)
        arg = np.argmax(near, axis=1)
        stay = near[idx, arg]
        top = int(np.argmax(value))
        jump = value[top] - _JUMP
        use_jump = jump > stay
        back[j] = np.where(use_jump, top, idx + arg - 1)
        value = np.where(use_jump, jump, stay) + capped[j]
    k = int(np.argmax(value))
    score = float(value[k] / np.sqrt(segs))
    path = np.empty(segs, dtype=np.int64)
    for j in range(segs - 1, -1, -1):
        path[j] = k
        k = int(back[j, k])
    return score, path


def _sync_scan(w: F64, lo: int, hi: int, sigma: float) -> tuple[int, F64]:
    """The opening sync's energy-normalised z-score at every start in ``[lo, hi]`` (clipped to
    ``w``): the first index and the scores."""
    lo, hi = max(0, lo), min(len(w) - _N, hi)
    if hi < lo:
        return lo, np.zeros(0)
    span = w[lo : hi + _N]
    sc = _correlate(span, _SYNC, _SYNC_TMPL)
    energy = _sliding_energy(span, _N)[: sc.size]
    live = energy > _ENERGY_FLOOR * _N
    out: F64 = np.where(live, sc / (np.sqrt(np.maximum(energy, 1e-30)) * sigma), 0.0)
    return lo, out


def _moved_sync(
    w: F64, t0: int, sigma: float, data_z: float, moved_z: float = _SYNC_MOVED_Z
) -> float | None:
    """Where a marker whose data part matched at ``t0`` really started when a splice inside it
    moved its opening (a jitter buffer or tempo change: a repeat leaves the opening's first copy
    earlier, a drop leaves it later than the data implies): the earliest clear sync peak within
    ``_WANDER`` of ``t0`` that beats the sync at ``t0`` by a margin; None when there is none
    (the usual case). When the data segments are strong (mean capped z ``data_z`` of at least
    ``_SYNC_SURE``) but the sync at ``t0`` is far weaker than they are, the sync was moved for
    certain, and its best peak is taken at a lower bar (``_SYNC_MOVED_Z``)."""
    lo, z = _sync_scan(w, t0 - _WANDER, t0 + _WANDER, sigma)
    here = t0 - lo
    if z.size == 0 or not 0 <= here < z.size:
        return None
    at_t0 = float(z[max(0, here - 1) : here + 2].max())
    if data_z >= _SYNC_SURE and at_t0 < data_z - _SYNC_GAP:
        away = z.copy()
        away[max(0, here - 2) : here + 3] = -np.inf
        m = int(np.argmax(away))
        if away[m] >= moved_z:
            return lo + m + _frac(z, m)
    strong = np.flatnonzero((z >= _SYNC_FAR_Z) & (z >= at_t0 + _SYNC_MARGIN))
    if strong.size == 0:
        return None
    m = int(strong[0])
    while m + 1 < z.size and z[m + 1] > z[m]:
        m += 1  # climb to the local peak
    if abs(lo + m - t0) <= 2:
        return None
    return lo + m + _frac(z, m)


def _split(cn: F64, peak: int, sigma: float) -> bool:
    """Whether the whole-template correlation ``cn`` has a second peak within ``_WANDER`` of
    ``peak`` that stands clear of the noise and holds a fair share of the main one: the sign of
    a marker cut into pieces at different lags (a WSOLA splice). Cheap: ``cn`` is at hand."""
    lo, hi = max(0, peak - _WANDER), min(cn.size, peak + _WANDER + 1)
    near = cn[lo:hi].copy()
    near[max(0, peak - 2 - lo) : peak + 3 - lo] = -np.inf
    if near.size == 0:
        return False
    second = float(near.max())
    return second >= _SPLIT_Z * sigma and second >= _SPLIT_SHARE * float(cn[peak])


def _timed(w: F64, tmpl: _Template, t0: int, position: float, score: float, sigma: float) -> Hit:
    """A whole-template hit at ``t0`` that looks split, checked segment by segment: when the
    best piecewise path moves some data segments off the hit's lag by enough to matter (its
    gain over the single lag exceeds what noise gives), the marker is timed by its opening sync
    (the whole-template peak is then a compromise between the pieces, off by up to the splice
    displacement)."""
    z_lags = _lag_z(w, tmpl, t0, sigma)
    if z_lags is None:
        return Hit(position=position, score=score, stretched=False)
    dp, lags = _piecewise(z_lags)
    flat = int(np.max(np.abs(lags - _WANDER))) <= 1
    if flat or (dp - score) * np.sqrt(DATA_SEGMENTS) < _GAIN:
        return Hit(position=position, score=score, stretched=False)
    return _stretched(w, t0, lags, max(dp, score), position, sigma)


def _stretched(
    w: F64, t0: int, lags: npt.NDArray[np.int64], score: float, fallback: float, sigma: float
) -> Hit:
    """A stretched marker's start: its opening sync, searched up to ``_WANDER`` before the start
    its first data segment implies (a splice may repeat or drop what came before)."""
    first = t0 + int(lags[0]) - _WANDER
    fallback_at = fallback if first == t0 else float(first)
    s_lo, scn = _sync_scan(w, first - _WANDER, first + 2, sigma)
    if scn.size == 0:
        return Hit(position=fallback_at, score=score, stretched=True)
    # The sync where the first data segment says it is wins when it is there; one further back
    # (a splice repeated or dropped the marker's opening) only when it stands clear of the noise
    # of that many lags.
    here = first - s_lo
    near = scn[max(0, here - 1) : here + 2]
    if near.size and float(near.max()) >= _SYNC_Z:
        m = max(0, here - 1) + int(np.argmax(near))
        return Hit(position=s_lo + m + _frac(scn, m), score=score, stretched=True)
    m = int(np.argmax(scn))
    if scn[m] >= _SYNC_FAR_Z:
        return Hit(position=s_lo + m + _frac(scn, m), score=score, stretched=True)
    return Hit(position=fallback_at, score=score, stretched=True)


def _resample_in_steps(
    resampler: soxr.ResampleStream, x: npt.NDArray[np.float32], step: int, *, last: bool
) -> npt.NDArray[np.float32]:
    """``resampler.resample_chunk(x)`` fed ``step`` samples at a time: libsoxr sizes a stream's
    buffers to the largest chunk it was given (measured: 144 KiB per stream fed 0.5 s chunks at
    16 kHz, 89 KiB fed 0.1 s ones), and a sink child holds two streams per session."""
    if len(x) <= step:
        return np.asarray(resampler.resample_chunk(x, last=last), np.float32)
    parts = [
        resampler.resample_chunk(x[i : i + step], last=last and i + step >= len(x))
        for i in range(0, len(x), step)
    ]
    return np.concatenate(parts).astype(np.float32, copy=False)


@lru_cache(maxsize=64)
def _frame_index(frames: int) -> npt.NDArray[np.intp]:
    """Indices of ``frames`` Whitener frames in a buffer (the same few counts every block)."""
    idx = np.arange(frames)[:, None] * Whitener._HOP + np.arange(Whitener._FRAME)[None, :]
    idx.setflags(write=False)
    return idx


class Whitener:
    """Phase-transform whitening (as :func:`probe.watermark.detect.whiten`) of an endless 8 kHz
    stream, block by block: each pushed block returns the whitened samples now final, which
    continue those returned before (``done`` counts them)."""

    _FRAME = 256
    _HOP = 128

    def __init__(self) -> None:
        self._raw = np.zeros(0)
        self._carry = np.zeros(self._HOP)
        self.done = 0

    def push(self, x: F64) -> F64:
        raw = np.concatenate([self._raw, x]) if self._raw.size else np.asarray(x, np.float64)
        frames = (len(raw) - self._FRAME) // self._HOP + 1
        if frames <= 0:
            self._raw = raw
            return np.zeros(0)
        spec = np.fft.rfft(raw[_frame_index(frames)] * _WINDOW, axis=1)
        mag = np.abs(spec)
        spec = np.where(_MASK, spec / np.maximum(mag, 1e-12), 0.0)
        spec[mag < 1e-9] = 0.0
        halves = np.fft.irfft(spec, self._FRAME, axis=1).reshape(frames, 2, self._HOP)
        out = np.zeros((frames + 1) * self._HOP)
        out[: frames * self._HOP] += halves[:, 0, :].reshape(-1)
        out[self._HOP :] += halves[:, 1, :].reshape(-1)
        out[: self._HOP] += self._carry
        span = frames * self._HOP
        # Copies: views would keep this block's whole arrays alive until the next one.
        self._carry = out[span:].copy()
        self._raw = raw[span:].copy()
        self.done += span
        return out[:span]


def _drifted(last: tuple[float, float] | None, position: float, send_time: float) -> bool:
    """Whether the stream's audio moved against its send clock between two hits (a jitter
    buffer or tempo change stretched it, or frames were dropped): their distance in the stream
    differs from their distance in send time by more than ``_DRIFT_S``. Arrival-stamp jitter
    does not count: positions are stream samples, not arrival times."""
    if last is None:
        return False
    return abs((position - last[0]) / DETECT_RATE - (send_time - last[1])) > _DRIFT_S


@dataclass(slots=True)
class _Pending:
    expected: Expected
    narrow_tried: bool = False
    searched_to: int | None = None  # next candidate start (8 kHz index) of the wide search


class InformedDetector:
    """Finds the expected markers in one stream, fed block by block (sans-I/O: no clock).

    ``expect(Expected)`` adds a marker to look for (in any order relative to the audio: the last
    few seconds of whitened audio are kept, so an expectation that arrives after its audio is
    still searched). ``feed(samples, arrival)`` takes float samples at ``rate`` and the arrival
    time of the block's first sample, on the clock of the send times. Detections are reported
    with the expected payload; an expectation past its deadline is dropped silently (the
    registry declares the miss).
    """

    def __init__(
        self,
        rate: int,
        *,
        tight_threshold: float = TIGHT_THRESHOLD,
        threshold: float = THRESHOLD,
        wide_threshold: float = WIDE_THRESHOLD,
        dp_threshold: float | None = None,
        history_s: float = _HISTORY_S,
        latency: float | None = None,
    ) -> None:
        if not 8000 <= rate <= 48000:
            raise ValueError(f"sample rate {rate} Hz is outside 8000-48000 Hz")
        self.rate = rate
        self.tight_threshold = tight_threshold
        self.threshold = threshold
        self.wide_threshold = wide_threshold
        self.dp_threshold = dp_threshold
        self._history = int(history_s * DETECT_RATE)
        self._resampler = (
            None
            if rate == DETECT_RATE
            else soxr.ResampleStream(rate, DETECT_RATE, 1, dtype="float32", quality="HQ")
        )
        self._clock = _Clock(rate)
        self._fed = 0
        self._pending_raw: list[npt.ArrayLike] = []
        self._pending_n = 0
        self._block = max(1, int(_BLOCK_S * rate))
        self._step = max(1, int(_RESAMPLE_STEP_S * rate))
        self._whitener = Whitener()
        # The whitened 8 kHz history, kept as float16 in one buffer that is reused (a quarter of
        # the memory of float64, and no new array per block); searched as float64 (:meth:`_w64`).
        # Whitening leaves every sample at the same scale (each frame's spectrum has unit
        # magnitude, digital silence is exactly 0), so float16's 11-bit mantissa puts its
        # rounding about 66 dB below the signal, whatever the input level.
        self._buf = np.zeros(self._history + 2 * int(_BLOCK_S * DETECT_RATE), _HISTORY_DTYPE)
        self._n = 0
        self._w64_cache: F64 | None = None
        self._w64_base = 0  # 8 kHz index of _w64_cache[0]
        self._w_start = 0  # 8 kHz index of _w[0]
        self._expected: deque[_Pending] = deque()
        self._latency = latency
        self._last: tuple[float, float] | None = None  # (8 kHz position, send time) of a hit
        # Hits left during which the stream counts as stretching; a new stream may be.
        self._drifting = _DRIFT_HOLD
        self._drift_seen = False
        self.searches = 0

    @property
    def pending(self) -> int:
        """Expected markers not yet found nor expired."""
        return len(self._expected)

    @property
    def until_search(self) -> int:
        """Samples still to feed before the next search (a feed that brings them searches)."""
        return self._block - self._pending_n

    def expect(self, marker: Expected) -> None:
        self._expected.append(_Pending(marker))

    def feed(self, samples: npt.ArrayLike, arrival: float) -> list[Detection]:
        return self.feed_frames(samples, ((0, arrival),))

    def feed_frames(
        self, samples: npt.ArrayLike, stamps: Sequence[tuple[int, float]]
    ) -> list[Detection]:
        """Several frames at once: ``samples`` concatenated, ``stamps`` the (offset in
        ``samples``, arrival time) of each frame's first sample, offsets increasing."""
        return self.feed_stamped(samples, [o for o, _ in stamps], [float(a) for _, a in stamps])

    def feed_stamped(
        self, samples: npt.ArrayLike, offsets: Sequence[int], arrivals: Sequence[float]
    ) -> list[Detection]:
        """:meth:`feed_frames` with the stamps as two lists: ``offsets[i]`` arrived at
        ``arrivals[i]``."""
        n = int(np.size(samples))
        if n == 0:
            return []
        self._clock.stamps(self._fed, offsets, arrivals)
        self._fed += n
        self._pending_raw.append(samples)
        self._pending_n += n
        if self._pending_n < self._block:
            return []
        return self._advance(last=False)

    def flush(self) -> list[Detection]:
        """End of stream: search what is buffered."""
        out = self._advance(last=True)
        # Whatever is still expected can only be searched up to the end of the audio.
        self._append(np.zeros(_MARKER + 256))
        out.extend(self._search(final=True))
        self._expected.clear()
        return out

    # -- internals ------------------------------------------------------------------------------

    def _advance(self, *, last: bool) -> list[Detection]:
        x = _sanitize(self._pending_raw)
        self._pending_raw = []
        self._pending_n = 0
        if self._resampler is not None:
            x = _resample_in_steps(self._resampler, x, self._step, last=last)
        if last:
            x = np.concatenate([np.asarray(x, np.float64), np.zeros(256)])
        fresh = self._whitener.push(np.asarray(x, np.float64))
        if fresh.size:
            self._append(fresh)
        out = self._search(final=False)
        drop = self._n - self._history
        if drop > 0:
            self._drop(drop)
            self._clock.forget_before((self._w_start - DETECT_RATE) * self.rate / DETECT_RATE)
        return out

    def _append(self, x: npt.ArrayLike) -> None:
        x = np.asarray(x)
        need = self._n + len(x)
        if need > len(self._buf):
            grown = np.zeros(max(need, 2 * len(self._buf)), _HISTORY_DTYPE)
            grown[: self._n] = self._buf[: self._n]
            self._buf = grown
        self._buf[self._n : need] = x
        self._n = need
        self._w64_cache = None

    def _drop(self, k: int) -> None:
        """Forget the oldest ``k`` whitened samples."""
        keep = self._n - k
        self._buf[:keep] = self._buf[k : self._n]
        self._n = keep
        self._w_start += k
        self._w64_cache = None

    def _w64(self, first: int) -> tuple[F64, int]:
        """The whitened history as float64 for a search of candidates from 8 kHz index
        ``first`` on, and the index of its first sample: it starts ``_REACH`` before ``first``
        (or at the oldest sample kept) and runs to the newest. Converted once per block unless a
        later search reaches further back; a block's searches are of recent audio, so this is
        usually a second or so of the history, not all of it."""
        start = max(self._w_start, first - _REACH)
        if self._w64_cache is None or self._w64_base > start:
            self._w64_cache = self._buf[start - self._w_start : self._n].astype(np.float64)
            self._w64_base = start
        return self._w64_cache, self._w64_base

    def _index_of(self, t: float) -> float:
        """The 8 kHz stream index of arrival time ``t`` (the inverse of the arrival clock)."""
        chosen = self._clock.sample_at(t)
        if chosen is None:
            return 0.0
        return (chosen[0] + (t - chosen[1]) * self.rate) * DETECT_RATE / self.rate

    def _search(self, *, final: bool) -> list[Detection]:
        end = self._w_start + self._n  # 8 kHz index after the last whitened sample
        last_start = end - _MARKER  # latest candidate start wholly available
        out: list[Detection] = []
        keep: deque[_Pending] = deque()
        while self._expected:
            p = self._expected.popleft()
            e = p.expected
            lo = int(np.floor(self._index_of(e.send_time - _EARLY_S)))
            hi = int(np.ceil(self._index_of(e.deadline)))
            hit: Hit | None = None
            if not p.narrow_tried and self._latency is not None:
                centre = int(round(self._index_of(e.send_time + self._latency)))
                n_lo, n_hi = max(lo, centre - _NARROW), min(hi, centre + _NARROW)
                if n_hi <= last_start or final:
                    p.narrow_tried = True
                    t_lo, t_hi = max(lo, centre - _TIGHT), min(hi, centre + _TIGHT)
                    if t_hi >= t_lo:
                        hit = self._locate(e.payload, t_lo, t_hi, self.tight_threshold)
                    if hit is None:
                        hit = self._locate(e.payload, n_lo, n_hi, self.threshold)
            if hit is None and (p.narrow_tried or self._latency is None):
                start = max(lo, self._w_start) if p.searched_to is None else p.searched_to
                stop = min(hi, last_start)
                if stop >= start:
                    hit = self._locate(e.payload, start, stop, self.wide_threshold)
                    p.searched_to = stop + 1
            if hit is not None:
                out.append(self._detection(e, hit))
                continue
            expired = (p.searched_to or lo) > hi or self._index_of(e.deadline) < self._w_start
            if not expired and not final:
                keep.append(p)
        self._expected = keep
        self._w64_cache = None  # made again for the next block's search; not kept meanwhile
        return out

    def _locate(self, payload: bytes, lo: int, hi: int, threshold: float) -> Hit | None:
        self.searches += 1
        # Candidates need a little context before them in the buffer (whitening is causal
        # enough; the correlation only reads the marker's own span).
        w, base = self._w64(lo)
        found = locate(
            w,
            payload,
            lo - base,
            hi - base,
            threshold=threshold,
            dp_threshold=self.dp_threshold,
            stretching=self._drifting > 0,
            moved_z=_SYNC_MOVED_Z if self._drift_seen else _SYNC_MOVED_Z_UNSURE,
        )
        if found is None:
            return None
        return Hit(found.position + base, found.score, found.stretched)

    def _detection(self, e: Expected, hit: Hit) -> Detection:
        if _drifted(self._last, hit.position, e.send_time):
            self._drifting = _DRIFT_HOLD
            self._drift_seen = True
        elif self._drifting:
            self._drifting -= 1
        self._last = (hit.position, e.send_time)
        position = hit.position * self.rate / DETECT_RATE
        arrival = self._clock.time_of(position)
        self._latency = arrival - e.send_time
        return Detection(
            sample=int(np.floor(position + 0.5)),
            position=float(position),
            time=arrival,
            payload=e.payload,
            score=hit.score,
            stretch=0.0,
        )


def whiten_signal(samples: npt.ArrayLike, rate: int) -> F64:
    """A whole recording at ``rate`` whitened at 8 kHz (for offline informed detection)."""
    x = _sanitize([samples])
    if rate != DETECT_RATE:
        x = np.asarray(soxr.resample(x, rate, DETECT_RATE, quality="HQ"), dtype=np.float32)
    return whiten(np.asarray(x, np.float64))


@dataclass(frozen=True, slots=True)
class Sent:
    """A marker known to have been sent: its payload and the time of its first sample (seconds
    from the start of the sent audio)."""

    payload: bytes
    time: float


def follow_markers(
    samples: npt.ArrayLike,
    rate: int,
    sent: list[Sent],
    *,
    max_delay: float = 5.0,
    tight_threshold: float = TIGHT_THRESHOLD,
    threshold: float = THRESHOLD,
    wide_threshold: float = WIDE_THRESHOLD,
) -> list[Detection | None]:
    """Offline informed detection in a whole recording of what ``sent`` went through: for each
    sent marker (in the order given), its detection or None. A detection's ``time`` is seconds
    from the recording's start, so ``time - sent.time`` is the marker's delay.

    As in the live sink, each marker is looked for first within +-2.5 ms, then +-60 ms, of the
    delay of the marker found before it, then anywhere from 50 ms before its send time to
    ``max_delay`` after. Markers that share a payload (``probe mark --payload``) are told apart
    by time alone: one is never looked for past the next send of the same payload plus the
    current delay, nor before the detection of the previous one.
    """
    w = whiten_signal(samples, rate)
    order = sorted(range(len(sent)), key=lambda i: sent[i].time)
    out: list[Detection | None] = [None] * len(sent)
    delay: float | None = None
    last: tuple[float, float] | None = None
    drifting = _DRIFT_HOLD
    after: dict[bytes, int] = {}  # payload -> earliest start allowed (past its last detection)
    next_same: dict[int, float] = {}
    last_seen: dict[bytes, int] = {}
    for i in reversed(order):
        if sent[i].payload in last_seen:
            next_same[i] = sent[last_seen[sent[i].payload]].time
        last_seen[sent[i].payload] = i
    for i in order:
        m = sent[i]
        lo = max(int(np.floor((m.time - _EARLY_S) * DETECT_RATE)), after.get(m.payload, 0))
        hi_t = m.time + max_delay
        if i in next_same:
            hi_t = min(hi_t, next_same[i] + (delay or 0.0) - _EARLY_S)
        hi = int(np.ceil(hi_t * DETECT_RATE))
        hit: Hit | None = None
        if delay is not None:
            centre = int(round((m.time + delay) * DETECT_RATE))
            t_lo, t_hi = max(lo, centre - _TIGHT), min(hi, centre + _TIGHT)
            if t_hi >= t_lo:
                hit = locate(
                    w, m.payload, t_lo, t_hi, threshold=tight_threshold, stretching=drifting > 0
                )
            n_lo, n_hi = max(lo, centre - _NARROW), min(hi, centre + _NARROW)
            if hit is None and n_hi >= n_lo:
                hit = locate(
                    w, m.payload, n_lo, n_hi, threshold=threshold, stretching=drifting > 0
                )
        if hit is None and hi >= lo:
            hit = locate(w, m.payload, lo, hi, threshold=wide_threshold, stretching=drifting > 0)
        if hit is None:
            continue
        if _drifted(last, hit.position, m.time):
            drifting = _DRIFT_HOLD
        elif drifting:
            drifting -= 1
        last = (hit.position, m.time)
        position = hit.position * rate / DETECT_RATE
        out[i] = Detection(
            sample=int(np.floor(position + 0.5)),
            position=float(position),
            time=position / rate,
            payload=m.payload,
            score=hit.score,
            stretch=0.0,
        )
        delay = position / rate - m.time
        after[m.payload] = int(hit.position) + _MARKER
    return out


def _cadence(gaps: F64) -> float | None:
    """The spacing of a series of markers from the gaps between those found (each a whole
    number of spacings, as markers went missing): the largest spacing of at least one marker's
    length that every gap is a multiple of, to within 5 ms; None when there is none.

    Each candidate (the shortest gap over k) is refined from the shortest gaps up, as the total
    of the gaps so far over their total count of spacings: the shortest gap alone is off by up to
    a sample, and over a gap of hundreds of spacings that error alone passed the 5 ms (a 1-hour
    file whose blind pass found one marker in a hundred got no series at all)."""
    if gaps.size == 0 or float(gaps.min()) < MARKER_S:
        return None
    ordered = np.sort(gaps)
    for k in range(1, 9):
        step = float(ordered[0]) / k
        if step < MARKER_S:
            break
        total, count = 0.0, 0
        for gap in ordered.tolist():
            total += gap
            count += round(gap / step)
            step = total / count
        if float(np.max(np.abs(gaps - step * np.round(gaps / step)))) <= 0.005:
            return step
    return None


def recover_missing(
    samples: npt.ArrayLike, rate: int, found: list[Detection]
) -> list[Detection]:
    """Markers a blind pass over a whole recording missed, looked for by what it did find.

    Markers come in series: a session's carry its 24-bit token and consecutive marker numbers
    (:func:`~probe.watermark.design.session_payload`), and ``probe mark`` repeats one payload.
    Each series with two or more blind detections gives a time for every marker number (a line
    through the detections: marker spacing and offset, medians of the pairs), so every marker of
    the series that the recording holds and the blind pass missed has a known payload and a
    predicted start. Each is looked for within +-2.5 ms of it, then +-60 ms, by informed
    detection at the thresholds of those windows. Returns the new detections, in time order.
    (:func:`series_gaps` and :func:`search_gaps` are the two halves, for a recording searched a
    window at a time.)"""
    wanted = series_gaps(found, rate, int(np.size(samples)))
    return search_gaps(samples, rate, wanted) if wanted else []


@dataclass(frozen=True, slots=True)
class Gap:
    """A marker a series says the recording holds and the blind pass missed: its payload, the
    predicted start (in samples at the detection rate, from the recording's start) and whether
    the series drifted off its line (then its search allows a stretch)."""

    payload: bytes
    centre: int
    moved: bool


def series_gaps(found: list[Detection], rate: int, frames: int) -> list[Gap]:
    """The first half of :func:`recover_missing`: the missing markers of each series in
    ``found`` (blind detections in a recording of ``frames`` samples at ``rate``), in time
    order. A recording searched in windows gets them once, for the whole of it, so each marker
    is owned by exactly one window whatever the windows' own arithmetic."""
    duration = frames / rate
    series: dict[int, list[Detection]] = {}
    for d in sorted(found, key=lambda d: d.position):
        series.setdefault(int.from_bytes(d.payload[:3], "big"), []).append(d)
    wanted: list[Gap] = []
    for ds in series.values():
        if len(ds) < 2:
            continue
        t = np.array([d.position / rate for d in ds])
        fixed = len({d.payload for d in ds}) == 1
        if fixed:
            step = _cadence(np.diff(t))
            if step is None:
                continue
            n = np.round((t - t[0]) / step).astype(np.int64)
        else:
            raw = np.array([d.payload[3] for d in ds], dtype=np.int64)
            n = raw + 256 * np.concatenate([[0], np.cumsum(np.diff(raw) < 0)])  # unwrap
        dn, dt = np.diff(n), np.diff(t)
        ok = dn > 0
        if not ok.any():
            continue
        step = float(np.median(dt[ok] / dn[ok]))
        if step <= MARKER_S:
            continue
        offset = float(np.median(t - step * n))
        # Detections off the line mean the recording was stretched (a jitter buffer, a tempo
        # change): then a splice may have moved a marker's opening, and its sync times it.
        moved = bool(np.max(np.abs(t - offset - step * n)) > _DRIFT_S)
        have = set(n.tolist())
        first = int(np.ceil(-offset / step))
        last = int(np.floor((duration - MARKER_S - offset) / step))
        for k in range(first, last + 1):
            if k in have:
                continue
            payload = ds[0].payload if fixed else ds[0].payload[:3] + bytes([k % 256])
            wanted.append(Gap(payload, int(round((offset + step * k) * DETECT_RATE)), moved))
    return sorted(wanted, key=lambda g: g.centre)


def search_gaps(
    samples: npt.ArrayLike, rate: int, gaps: Sequence[Gap], *, first: int = 0
) -> list[Detection]:
    """The second half of :func:`recover_missing`: each of ``gaps`` looked for in ``samples``,
    which start at sample ``first`` of the recording (a whole number of detection-rate samples;
    the gaps' context, tens of ms around each, must be inside). Positions are in ``samples``."""
    shift = first * DETECT_RATE // rate
    if shift * rate != first * DETECT_RATE:
        raise ValueError(f"a window must start on a {DETECT_RATE} Hz sample, got {first}")
    w = whiten_signal(samples, rate)
    out: list[Detection] = []
    for g in gaps:
        centre = g.centre - shift
        hit = locate(w, g.payload, centre - _TIGHT, centre + _TIGHT, threshold=TIGHT_THRESHOLD,
                     stretching=g.moved)
        if hit is None:
            hit = locate(w, g.payload, centre - _NARROW, centre + _NARROW, threshold=THRESHOLD,
                         stretching=g.moved)
        if hit is None:
            continue
        position = hit.position * rate / DETECT_RATE
        out.append(Detection(sample=int(np.floor(position + 0.5)), position=float(position),
                             time=position / rate, payload=g.payload, score=hit.score,
                             stretch=0.0))
    return out
