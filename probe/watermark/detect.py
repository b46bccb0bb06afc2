"""The streaming marker detector: blocks of samples and their arrival times in, detections out.

How it finds a marker (all at 8 kHz, whatever the stream's rate):

1. Whiten: a short-time Fourier transform (32 ms Hann frames, 50 % overlap) with every bin of the
   marker's band set to unit magnitude and every other bin to zero (the phase transform). Speech
   keeps its energy in few bins at a time; after whitening the marker's phase coherence stands
   out wherever the speech is not loud, which plain matched filtering cannot see.
2. Correlate the whitened signal with the sync segment (one FFT per block) and turn it into
   z-scores against the block's robust spread.
3. A candidate is a sync peak with a partner peak of the same sign 9 segments later (within
   +-3 %, which is how far a jitter buffer may have stretched it). The partner's offset gives the
   stretch, used to place the eight data segments.
4. Each data segment is correlated with the 64 codewords of its position, at its lag and one
   sample either side (one batched matrix product); the best codeword and its sign give 7 bits.
   The 56 bits must pass the 24-bit check, else nothing is reported.
5. The sync peak is interpolated to a fraction of a sample and mapped back to the stream's rate
   and to the arrival clock.

It never raises on samples: NaN and infinities become zeros and full scale, any block length is
fine, including empty ones.
"""

from __future__ import annotations

import bisect
import heapq
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import numpy.typing as npt
import soxr

from probe.watermark.design import (
    BAND_HZ,
    DATA_SEGMENTS,
    DETECT_RATE,
    SEGMENTS,
    Float32Array,
    codebook,
    segment_samples,
    symbols_to_payload,
    sync_segment,
)

F64 = npt.NDArray[np.float64]

_N = segment_samples(DETECT_RATE)
_FRAME = 256
_HOP = _FRAME // 2
_MAX_STRETCH = 0.03
_PARTNER = (SEGMENTS - 1) * _N
_MARKER = SEGMENTS * _N
_SLACK = int(np.ceil(_MAX_STRETCH * _PARTNER)) + 2
# Context before the owned part of each block (whitening warm-up) and after it (room for a whole
# stretched marker that starts at the block's last owned sample).
_PRE = 2 * _FRAME
_POST = SEGMENTS * _N + _SLACK + 2 * _FRAME
DEFAULT_THRESHOLD = 5.5
_CANDIDATE_Z = 3.5
_MAX_CANDIDATES = 48
_PEAK_HALF = 12
_ALTERNATIVES = 4
_TRIES = 64
_MIN_DATA_Z = 4.0
_PARTNER_Z = 2.5


@dataclass(frozen=True, slots=True)
class Detection:
    """A marker found in a stream.

    ``sample`` is the stream-rate index of the marker's first sample, ``position`` the same with
    its fraction, ``time`` that sample's arrival time, ``score`` the sync z-score (higher is
    surer) and ``stretch`` how much longer the marker arrived than it was sent (0.01 = 1 %).
    """

    sample: int
    position: float
    time: float
    payload: bytes
    score: float
    stretch: float


def _band_mask() -> npt.NDArray[np.bool_]:
    freqs = np.fft.rfftfreq(_FRAME, 1 / DETECT_RATE)
    return (freqs >= BAND_HZ[0] - 40) & (freqs <= BAND_HZ[1] + 40)


_MASK = _band_mask()
_WINDOW = np.hanning(_FRAME + 1)[:-1].astype(np.float64)
# (position, sample, codeword): each data segment times its position's codewords in one product.
_CODES = np.ascontiguousarray(codebook(DETECT_RATE).astype(np.float64).transpose(0, 2, 1))


def whiten(x: F64) -> F64:
    """Phase-transform whitening of ``x`` (8 kHz), band-limited to the marker's band.

    The output has the input's length; its first and last half frame are less reliable.
    """
    n = len(x)
    frames = max(1, int(np.ceil(max(n - _FRAME, 0) / _HOP)) + 1)
    padded = np.zeros((frames + 1) * _HOP, dtype=np.float64)
    padded[:n] = x
    idx = np.arange(frames)[:, None] * _HOP + np.arange(_FRAME)[None, :]
    spec = np.fft.rfft(padded[idx] * _WINDOW, axis=1)
    mag = np.abs(spec)
    spec = np.where(_MASK, spec / np.maximum(mag, 1e-12), 0.0)
    spec[mag < 1e-9] = 0.0
    out_frames = np.fft.irfft(spec, _FRAME, axis=1)
    out = np.zeros((frames + 1) * _HOP, dtype=np.float64)
    halves = out_frames.reshape(frames, 2, _HOP)
    out[: frames * _HOP] += halves[:, 0, :].reshape(-1)
    out[_HOP : (frames + 1) * _HOP] += halves[:, 1, :].reshape(-1)
    return out[:n]


class _Clock:
    """Maps stream sample indices to arrival times from the blocks' arrival stamps.

    The stamps are two lists (first samples, increasing, and their arrival times) searched by
    bisection; forgotten stamps are skipped by ``_head`` and cut off in bulk now and then, so a
    stamp costs two appends and a look-up is logarithmic in the few seconds of stamps kept."""

    def __init__(self, rate: int) -> None:
        self._rate = rate
        self._samples: list[int] = []
        self._arrivals: list[float] = []
        self._head = 0  # the first stamp not forgotten

    def stamp(self, first_sample: int, arrival: float) -> None:
        self._samples.append(first_sample)
        self._arrivals.append(arrival)

    def stamps(self, first: int, offsets: Sequence[int], arrivals: Sequence[float]) -> None:
        """Several stamps at once: ``first + offsets[i]`` arrived at ``arrivals[i]``."""
        self._samples.extend([first + o for o in offsets])
        self._arrivals.extend(arrivals)

    def time_of(self, sample: float) -> float:
        samples = self._samples
        head = self._head
        if head == len(samples):
            return 0.0 + (sample - 0) / self._rate
        # The last stamp at or before ``sample``; the first one kept when none is.
        k = max(head, bisect.bisect_right(samples, sample, head) - 1)
        return self._arrivals[k] + (sample - samples[k]) / self._rate

    def sample_at(self, arrival: float) -> tuple[int, float] | None:
        """The last stamp (first sample, arrival) whose arrival is at or before ``arrival`` (the
        first one kept when none is); None without stamps."""
        head = self._head
        arrivals = self._arrivals
        if head == len(arrivals):
            return None
        k = max(head, bisect.bisect_right(arrivals, arrival, head) - 1)
        return self._samples[k], arrivals[k]

    def forget_before(self, sample: float) -> None:
        """Forget the stamps before the last one at or before ``sample`` (one is always kept)."""
        samples = self._samples
        head = self._head
        n = len(samples)
        if n - head <= 1 or samples[head + 1] > sample:
            return
        head = min(n - 1, bisect.bisect_right(samples, sample, head + 1) - 1)
        if head >= 256 and 2 * head >= n:
            del samples[:head]
            del self._arrivals[:head]
            head = 0
        self._head = head


class MarkerDetector:
    """Finds markers in one stream, fed block by block (sans-I/O: no clock, no sockets).

    ``feed(samples, arrival)`` takes float samples at ``rate`` and the arrival time of the block's
    first sample (any clock, in seconds; PROTOCOL.md section 4). Detections come out once the
    whole marker and a little context have arrived, about 0.8 s later; ``flush()`` at the end of
    the stream reports what is left.
    """

    def __init__(
        self, rate: int, *, threshold: float = DEFAULT_THRESHOLD, block_s: float = 1.0
    ) -> None:
        if not 8000 <= rate <= 48000:
            raise ValueError(f"sample rate {rate} Hz is outside 8000-48000 Hz")
        self.rate = rate
        self.threshold = threshold
        self._own = max(_N, int(block_s * DETECT_RATE))
        self._window = _PRE + self._own + _POST
        self._nfft = _fast_len(self._window + _N)
        k = np.arange(self._nfft // 2 + 1)
        # The same correlation half a sample later: a marker that sits between 8 kHz samples
        # (any odd offset at 16 kHz) splits its peak over two lags and loses about 4 dB.
        self._half_shift = np.exp(2j * np.pi * k * 0.5 / self._nfft)
        self._sync_spec = np.conj(
            np.fft.rfft(sync_segment(DETECT_RATE).astype(np.float64), self._nfft)
        )
        self._resampler = (
            None
            if rate == DETECT_RATE
            else soxr.ResampleStream(rate, DETECT_RATE, 1, dtype="float32", quality="HQ")
        )
        self._clock = _Clock(rate)
        self._fed = 0
        # Raw blocks not yet resampled: feeding 20 ms frames one by one must stay cheap, so the
        # numeric work waits until there is enough for a search.
        self._pending: list[npt.ArrayLike] = []
        self._pending_n = 0
        self._pending_limit = max(1, int(0.25 * rate))
        # 8 kHz samples kept, the 8 kHz index of _buf[0], and the first index not yet owned.
        self._buf = np.zeros(_PRE, dtype=np.float64)
        self._buf_start = -_PRE
        self._next = 0
        # 8 kHz positions of recent detections: a marker's closing sync must not start another.
        self._recent: deque[int] = deque(maxlen=8)

    @property
    def samples_fed(self) -> int:
        """Stream-rate samples received so far."""
        return self._fed

    def feed(self, samples: npt.ArrayLike, arrival: float | None = None) -> list[Detection]:
        """Add a block; return markers completed by it."""
        n = int(np.size(samples))
        if n == 0:
            return []
        self._clock.stamp(self._fed, float(self._fed / self.rate if arrival is None else arrival))
        self._fed += n
        self._pending.append(samples)
        self._pending_n += n
        if self._pending_n < self._pending_limit:
            return []
        self._drain(last=False)
        out: list[Detection] = []
        while self._buf_start + len(self._buf) >= self._next + self._own + _POST:
            out.extend(self._search(limit=None))
        return out

    def flush(self) -> list[Detection]:
        """End of stream: search what is buffered, padding with silence."""
        self._drain(last=True)
        end = self._buf_start + len(self._buf)
        self._buf = np.concatenate([self._buf, np.zeros(_POST + self._own, dtype=np.float64)])
        out: list[Detection] = []
        while self._next < end:
            out.extend(self._search(limit=end))
        return out

    def _drain(self, *, last: bool) -> None:
        x = _sanitize(self._pending)
        self._pending = []
        self._pending_n = 0
        if self._resampler is not None:
            x = self._resampler.resample_chunk(x, last=last)
        if len(x):
            self._buf = np.concatenate([self._buf, x.astype(np.float64)])

    def _search(self, *, limit: int | None) -> list[Detection]:
        own_start = self._next
        own_end = own_start + self._own if limit is None else min(own_start + self._own, limit)
        lo = own_start - _PRE - self._buf_start
        window = self._buf[lo : lo + self._window]
        self._next = own_start + self._own
        found = self._find(window, own_start - _PRE, own_end - own_start)
        # Keep only what the next block needs.
        drop = self._next - _PRE - self._buf_start
        if drop > 0:
            self._buf = self._buf[drop:]
            self._buf_start += drop
        self._clock.forget_before((self._next - _PRE) * self.rate / DETECT_RATE - self.rate)
        return found

    def _find(self, window: F64, origin: int, owned: int) -> list[Detection]:
        w = whiten(window)
        n = len(w)
        prod = np.fft.rfft(w, self._nfft) * self._sync_spec
        corr = np.fft.irfft(prod, self._nfft)[: n - _N + 1]
        half = np.fft.irfft(prod * self._half_shift, self._nfft)[: n - _N + 1]
        # Interleaved: corr2[2i] is lag i, corr2[2i + 1] lag i + 0.5; each integer lag stands
        # for the better of itself and the half lag after it.
        corr2 = np.empty(2 * len(corr), dtype=np.float64)
        corr2[0::2] = corr
        corr2[1::2] = half
        # The noise scale comes from the integer lags alone: the better-of-two values below
        # would overstate it and sink every on-grid marker's score.
        spread = float(np.sqrt(np.dot(corr, corr) / max(1, len(corr))))
        corr = np.where(np.abs(half) > np.abs(corr), half, corr)
        # The RMS is a fine noise scale here: whitened speech is close to Gaussian and a
        # marker's peak is a handful of samples among thousands.
        if not np.isfinite(spread) or spread <= 1e-12:
            return []
        z = corr / spread
        az = np.abs(z[_PRE - 1 : _PRE + owned + 1])
        mid = az[1:-1]
        cand = np.flatnonzero((mid >= _CANDIDATE_Z) & (mid >= az[:-2]) & (mid > az[2:]))
        az = mid
        if cand.size == 0:
            return []
        # Time order: a marker's opening sync is tried before its closing one, which the
        # detection then suppresses.
        strongest = set(cand[np.argsort(az[cand])[::-1][:_MAX_CANDIDATES]].tolist())
        out: list[Detection] = []
        for c in cand:
            if int(c) not in strongest:
                continue
            # Only the top of a peak: its sidelobes a few samples off must not be tried.
            if az[c] < az[max(0, c - _PEAK_HALF) : c + _PEAK_HALF + 1].max():
                continue
            at = origin + _PRE + int(c)
            if any(abs(at - t) < _MARKER for t in self._recent):
                continue
            det = self._decode(w, z, corr2, _PRE + int(c), origin)
            if det is not None:
                out.append(det)
                self._recent.append(at)
        out.extend(self._from_closing(w, z, corr2, origin, owned))
        return out

    def _from_closing(
        self, w: F64, z: F64, corr2: F64, origin: int, owned: int
    ) -> list[Detection]:
        """Markers whose opening sync drowned in the speech but whose closing sync did not.

        Closing syncs of markers that open in the owned span sit ``_PARTNER`` later; each strong
        one not explained by a detection is tried with its opening assumed exactly ``_PARTNER``
        before it (no stretch: a weak opening cannot be searched for without finding noise).
        """
        lo = _PRE + _PARTNER
        hi = min(len(z) - 1, lo + owned)
        if hi - lo < 3:
            return []
        az = np.abs(z[lo - 1 : hi + 1])
        mid = az[1:-1]
        cand = np.flatnonzero((mid >= _CANDIDATE_Z) & (mid >= az[:-2]) & (mid > az[2:]))
        if cand.size == 0:
            return []
        strongest = cand[np.argsort(mid[cand])[::-1][:_MAX_CANDIDATES]]
        out: list[Detection] = []
        for c in sorted(strongest.tolist()):
            if mid[c] < mid[max(0, c - _PEAK_HALF) : c + _PEAK_HALF + 1].max():
                continue
            q = lo + int(c)
            p = q - _PARTNER
            at = origin + p
            if any(abs(at - t) < _MARKER for t in self._recent):
                continue
            det = self._decode(w, z, corr2, p, origin, closing=q)
            if det is not None:
                out.append(det)
                self._recent.append(at)
        return out

    def _decode(
        self, w: F64, z: F64, corr2: F64, p: int, origin: int, closing: int | None = None
    ) -> Detection | None:
        if closing is None:
            sign = 1.0 if z[p] > 0 else -1.0
            lo = p + _PARTNER - _SLACK
            hi = p + _PARTNER + _SLACK + 1
            if hi > len(z):
                return None
            partner = z[lo:hi] * sign
            q = lo + int(np.argmax(partner))
        else:
            # Found from its closing sync (see _from_closing): the sign comes from there.
            q = closing
            sign = 1.0 if z[q] > 0 else -1.0
        zp = float(z[p]) * sign
        zq = float(z[q]) * sign
        score = (zp + zq) / np.sqrt(2.0)
        if score < self.threshold or zq < _PARTNER_Z:
            return None
        # A weak opening's own peak is mostly noise: time the marker by its closing sync then.
        frac = _vertex(corr2, p) if closing is None else _vertex(corr2, q)
        # A partner a sample or two off is peak-picking noise on a marker that sits between
        # samples, not stretch: reading it as stretch would slide every data segment off its code.
        span = q + _vertex(corr2, q) - (p + frac)
        stretch = 0.0 if abs(q - p - _PARTNER) <= 2 else span / _PARTNER - 1.0
        offsets = np.arange(1, DATA_SEGMENTS + 1) * _N * (1.0 + stretch)
        exact = p + frac + offsets
        starts = np.floor(exact).astype(int)
        if starts[-1] + _N + 1 > len(w):
            return None
        segs = w[starts[:, None] + np.arange(_N)[None, :]] * sign
        # A marker between 8 kHz samples (any odd offset at 16 kHz) leaves each segment a
        # fraction of a sample off its code; shift it back before correlating.
        payload = _decode_symbols(segs, exact - starts)
        if payload is None:
            return None
        pos8 = origin + p + frac
        position = pos8 * self.rate / DETECT_RATE
        sample = int(np.floor(position + 0.5))
        return Detection(
            sample=sample,
            position=float(position),
            time=self._clock.time_of(position),
            payload=payload,
            score=float(score),
            stretch=float(stretch),
        )


_BINS = np.arange(_N // 2 + 1)


def _hypothesis_scores(segs: F64, delay: F64 | None = None) -> F64:
    """Score of each of the 128 symbol values in each data segment, in noise units.

    ``delay`` (samples, per segment) is how far each segment starts before its true start; it is
    removed with a phase ramp. A segment may still be a sample off (timing residue), so each
    value takes the best of three lags.
    """
    if delay is not None:
        spec = np.fft.rfft(segs, axis=1) * np.exp(2j * np.pi * np.outer(delay, _BINS) / _N)
        segs = np.fft.irfft(spec, _N, axis=1)
    lagged = np.stack([np.roll(segs, 1, axis=1), segs, np.roll(segs, -1, axis=1)], axis=1)
    corr = np.matmul(lagged, _CODES)  # (segment, lag, codeword)
    # Noise scale: RMS over the wrong codewords at the central lag (independent codewords
    # correlate with a segment like noise does).
    centre = corr[:, 1, :]
    power = np.einsum("ij,ij->i", centre, centre) - np.max(centre * centre, axis=1)
    noise = np.sqrt(np.maximum(power, 0.0) / (corr.shape[2] - 1))[:, None] + 1e-12
    scores: F64 = np.concatenate([corr.max(axis=1), -corr.min(axis=1)], axis=1) / noise
    return scores


def _decode_symbols(segs: F64, delay: F64 | None = None) -> bytes | None:
    """Best-first list decoding: try symbol choices in order of lost score until one passes the
    check. Most markers pass on the first try; a weak segment is usually right at its second or
    third choice. The cap bounds both the work and the chance of a false pass (_TRIES * 2**-24).
    """
    scores = _hypothesis_scores(segs, delay)
    # Noise gives data segments whose best value scores about 3; real markers score 5 and up.
    if float(np.median(scores.max(axis=1))) < _MIN_DATA_Z:
        return None
    ranked = np.argsort(-scores, axis=1)[:, :_ALTERNATIVES]
    loss = scores[np.arange(len(segs))[:, None], ranked]
    loss = loss[:, :1] - loss
    start = (0.0, (0,) * len(segs))
    heap = [start]
    seen = {start[1]}
    for _ in range(_TRIES):
        if not heap:
            break
        cost, choice = heapq.heappop(heap)
        payload = symbols_to_payload([int(ranked[i, c]) for i, c in enumerate(choice)])
        if payload is not None:
            return payload
        for i in range(len(choice)):
            if choice[i] + 1 < _ALTERNATIVES:
                nxt = choice[:i] + (choice[i] + 1,) + choice[i + 1 :]
                if nxt not in seen:
                    seen.add(nxt)
                    heapq.heappush(heap, (cost + float(loss[i, nxt[i]] - loss[i, choice[i]]), nxt))
    return None


@lru_cache(maxsize=4096)
def _fast_len(n: int) -> int:
    """Smallest 2**a * 3**b * 5**c >= n: FFT sizes pocketfft handles fastest."""
    best = 1 << int(np.ceil(np.log2(max(n, 1))))
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            m = p35
            while m < n:
                m *= 2
            best = min(best, m)
            p35 *= 3
        p5 *= 5
    return best


def _vertex(corr2: F64, i: int) -> float:
    """Sub-sample offset (from lag ``i``) of the peak near lag ``i`` in the half-lag interleaved
    correlation: the better of lags i and i + 0.5, refined by a parabola on its neighbours."""
    m = 2 * i
    if m + 1 < len(corr2) and abs(corr2[m + 1]) > abs(corr2[m]):
        m += 1
    return (m - 2 * i + _parabolic(corr2, m)) / 2.0


def _parabolic(y: F64, i: int) -> float:
    if i <= 0 or i >= len(y) - 1:
        return 0.0
    a, b, c = float(y[i - 1]), float(y[i]), float(y[i + 1])
    den = a - 2 * b + c
    if den == 0.0:
        return 0.0
    off = 0.5 * (a - c) / den
    return float(min(0.5, max(-0.5, off)))


def _sanitize(blocks: list[npt.ArrayLike]) -> Float32Array:
    if not blocks:
        return np.zeros(0, dtype=np.float32)
    x = np.concatenate([np.asarray(b, dtype=np.float32).reshape(-1) for b in blocks])
    if not np.isfinite(x).all():
        x = np.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0)
    np.clip(x, -1e3, 1e3, out=x)
    return x


def detect_all(samples: npt.ArrayLike, rate: int, **kwargs: float) -> list[Detection]:
    """Every marker in a whole signal (a file), by feeding it in one go and flushing."""
    det = MarkerDetector(rate, **kwargs)
    out = det.feed(samples, 0.0)
    out.extend(det.flush())
    return out
