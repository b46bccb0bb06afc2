"""A session's outgoing frames: one encoded carrier shared by every session, and each marker's
frames made just before they are due.

Marking and encoding a whole session up front would cost a few milliseconds of CPU per session
start (mostly generating its marker waveforms) and keep the session's encoded audio in memory for
as long as it streams: 640 kB for 20 s of 16 kHz pcm16, per session, in every worker. Here the
unmarked carrier (with the reply mode's turn layout, when asked) is encoded once per process
(:func:`shared_carrier`) and a session's frame is a slice of it, except where a marker lies: the
frames a marker touches (with any marker sharing a frame with it: a *group*) are marked and
encoded when the pacing loop gets near them, and only the current group is kept. The bytes are the
same as ``encode(embed(carrier, ...))`` (encoding is per sample), so the receiving side sees
exactly what it would have.

Pure numpy, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from probe.audio.fixtures import fixture_script, load_fixture
from probe.audio.formats import Encoding, bytes_per_sample, encode
from probe.watermark.design import MARKER_S, Float32Array, marker_waveform
from probe.watermark.embed import Placement, active_rms, marker_amplitude

__all__ = [
    "SessionFrames",
    "SharedCarrier",
    "carrier",
    "positions_in",
    "sentence_layout",
    "shared_carrier",
    "turn_layout",
]


@lru_cache(maxsize=16)
def carrier(fixture: str, rate: int, duration_s: float) -> tuple[Float32Array, float]:
    """A fixture looped to ``duration_s`` (read-only, cached) and its active RMS, the level
    markers are set against."""
    x, _ = load_fixture(fixture, rate=rate)
    n = int(round(duration_s * rate))
    reps = int(np.ceil(n / max(1, len(x))))
    looped = np.tile(x, reps)[:n].astype(np.float32)
    looped.setflags(write=False)
    return looped, active_rms(np.asarray(x, dtype=np.float32), rate)


def turn_layout(
    samples: Float32Array, rate: int, utterance_s: float, gap_s: float
) -> tuple[Float32Array, list[int], list[tuple[int, int]]]:
    """Speech cut into utterances of ``utterance_s`` with ``gap_s`` of silence after each.

    Returns the audio, the sample index just after each utterance (its end), and the
    ``(start, stop)`` sample ranges that hold speech."""
    u = max(1, int(round(utterance_s * rate)))
    g = max(0, int(round(gap_s * rate)))
    out = np.zeros(len(samples), dtype=np.float32)
    ends: list[int] = []
    spans: list[tuple[int, int]] = []
    start = 0
    while start < len(samples):
        stop = min(len(samples), start + u)
        out[start:stop] = samples[start:stop]
        ends.append(stop)
        spans.append((start, stop))
        start = stop + g
    return out, ends, spans


def sentence_layout(
    samples: Float32Array, rate: int, sentences: Sequence[tuple[int, int, str]], n: int,
    gap_s: float,
) -> tuple[Float32Array, list[int], list[tuple[int, int]], list[str]]:
    """``n`` samples of whole sentences of ``samples`` (``(start, stop, text)``, in order,
    repeated), each followed by ``gap_s`` of digital silence; a sentence that would not fit
    whole is left out (silence fills the rest).

    Returns the audio, each sentence's end, its ``(start, stop)`` range and its text."""
    g = max(0, int(round(gap_s * rate)))
    out = np.zeros(n, dtype=np.float32)
    ends: list[int] = []
    spans: list[tuple[int, int]] = []
    texts: list[str] = []
    at = 0
    while sentences:
        for a, b, text in sentences:
            if at + (b - a) > n:
                return out, ends, spans, texts
            out[at : at + b - a] = samples[a:b]
            spans.append((at, at + b - a))
            ends.append(at + b - a)
            texts.append(text)
            at += b - a + g
    return out, ends, spans, texts


def positions_in(spans: Sequence[tuple[int, int]], rate: int, every_s: float) -> list[int]:
    """Marker starts every ``every_s`` inside each speech span, wholly inside it."""
    length = int(round(MARKER_S * rate))
    out: list[int] = []
    for start, stop in spans:
        t = start + int(round(0.25 * rate))
        while t + length <= stop:
            out.append(t)
            t += max(length, int(round(every_s * rate)))
    return out


@dataclass(frozen=True, eq=False)
class SharedCarrier:
    """The unmarked carrier of a session template, as samples and as encoded bytes."""

    samples: Float32Array
    pcm: bytes
    rate: int
    encoding: Encoding
    width: int
    amp: np.float32
    # Reply and results modes: where each utterance ends and the spans that hold speech
    # (empty otherwise); results mode: each span's script (None when the fixture has none).
    ends: tuple[int, ...] = ()
    spans: tuple[tuple[int, int], ...] = ()
    texts: tuple[str | None, ...] = ()


@lru_cache(maxsize=16)
def shared_carrier(
    fixture: str,
    rate: int,
    duration_s: float,
    encoding: Encoding,
    level_db: float,
    turns: tuple[float, float] | None = None,
    sentences_gap: float | None = None,
) -> SharedCarrier:
    """The carrier for sessions of this fixture, length, encoding and marker level, cut into
    (utterance, gap) seconds turns when ``turns`` is given, or into the fixture script's whole
    sentences with ``sentences_gap`` seconds of silence after each when that is given and the
    fixture has a script (cached)."""
    samples, ref_rms = carrier(fixture, rate, duration_s)
    ends: list[int] = []
    spans: list[tuple[int, int]] = []
    texts: list[str | None] = []
    script = fixture_script(fixture) if sentences_gap is not None else None
    if script:
        clip, _ = load_fixture(fixture, rate=rate)
        cuts = [
            (int(round(s.start_s * rate)), min(len(clip), int(round(s.end_s * rate))), s.text)
            for s in script
        ]
        samples, ends, spans, said = sentence_layout(
            np.asarray(clip, dtype=np.float32), rate, cuts, len(samples), sentences_gap or 0.0
        )
        texts = list(said)
        samples.setflags(write=False)
    elif turns is not None or sentences_gap is not None:
        utterance, gap = turns if turns is not None else (3.0, sentences_gap or 0.0)
        samples, ends, spans = turn_layout(samples, rate, utterance, gap)
        texts = [None] * len(spans)
        samples.setflags(write=False)
    return SharedCarrier(
        samples=samples,
        pcm=encode(samples, encoding),
        rate=rate,
        encoding=encoding,
        width=bytes_per_sample(encoding),
        # As embed() computes it, so the marked samples are bit-identical.
        amp=np.float32(marker_amplitude(ref_rms, level_db)),
        ends=tuple(ends),
        spans=tuple(spans),
        texts=tuple(texts),
    )


@lru_cache(maxsize=8)
def _marker_len(rate: int) -> int:
    return len(marker_waveform(bytes(4), rate))


class SessionFrames:
    """Frame ``n`` of one session, for ``n`` increasing (module docstring)."""

    def __init__(
        self,
        shared: SharedCarrier,
        frame_len: int,
        positions: Sequence[int],
        payloads: Sequence[bytes],
    ) -> None:
        self.shared = shared
        self.frame_len = frame_len
        n_samples = len(shared.samples)
        self.n_frames = -(-n_samples // frame_len)
        self._step = frame_len * shared.width
        length = _marker_len(shared.rate)
        self.placements: list[Placement] = []
        # Groups of markers whose frames overlap: first frame, last frame, (start, payload)s.
        self._k0: list[int] = []
        self._k1: list[int] = []
        self._members: list[list[tuple[int, bytes]]] = []
        for i, start in enumerate(positions):
            end = min(n_samples, start + length)
            if start < 0 or end <= start:
                continue
            self.placements.append(Placement(index=i, sample=start, payload=payloads[i]))
            k0, k1 = start // frame_len, (end - 1) // frame_len
            if self._k1 and k0 <= self._k1[-1]:
                self._k1[-1] = max(self._k1[-1], k1)
                self._members[-1].append((start, payloads[i]))
            else:
                self._k0.append(k0)
                self._k1.append(k1)
                self._members.append([(start, payloads[i])])
        self._g = 0  # the first group not wholly before the frames asked for
        self._built = -1  # the group whose bytes are in _pcm
        self._pcm = b""

    def frame(self, n: int) -> bytes:
        """The encoded bytes of frame ``n`` (marked where markers lie)."""
        g = self._seek(n)
        if g is None:
            return self.shared.pcm[n * self._step : (n + 1) * self._step]
        if self._built != g:
            self._build(g)
        at = (n - self._k0[g]) * self._step
        return self._pcm[at : at + self._step]

    def prepare(self, n: int) -> None:
        """Mark and encode ahead of time the group frame ``n`` is in, if any (call it right
        after a send, so the work is not between a frame's due time and its send)."""
        g = self._seek(n)
        if g is not None and self._built != g:
            self._build(g)

    def _seek(self, n: int) -> int | None:
        k1 = self._k1
        while self._g < len(k1) and k1[self._g] < n:
            self._g += 1
        if self._g < len(k1) and self._k0[self._g] <= n:
            return self._g
        return None

    def _build(self, g: int) -> None:
        s = self.shared
        a = self._k0[g] * self.frame_len
        b = min(len(s.samples), (self._k1[g] + 1) * self.frame_len)
        seg = np.array(s.samples[a:b], dtype=np.float32, copy=True)
        for start, payload in self._members[g]:
            wave = marker_waveform(payload, s.rate)
            end = min(b, start + len(wave))
            seg[start - a : end - a] += s.amp * wave[: end - start]
        self._pcm = encode(seg, s.encoding)
        self._built = g
