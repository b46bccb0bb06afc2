"""``probe mark`` and ``probe detect`` over files of any length, read and written in blocks.

Memory follows the block and window sizes, not the file's length: a 1-hour file is marked or
searched in well under 200 MB. The watermark core does the work, unchanged:

- marking reads the file twice: once for the speech level the markers are set against
  (:class:`~probe.watermark.embed.ActiveLevel`), once to add them block by block
  (:func:`~probe.watermark.embed.mark_block`); the result equals :func:`embed` on the whole file
  to the bit. It goes to a temporary file beside the output, renamed over it at the end, so a
  failure leaves no half-written output (and the output may be the input);
- the blind pass feeds the streaming :class:`~probe.watermark.detect.MarkerDetector` block by
  block;
- the informed searches (:func:`~probe.watermark.informed.recover_missing` for the series a
  blind pass found, :func:`~probe.watermark.informed.follow_markers` for a known list of sent
  markers) are whole-signal functions, so they run on one window of the file at a time: each
  window owns a stretch of the file (a minute by default) and reads seconds of context either
  side, enough that every search of a marker it owns sees exactly the audio a whole-file run
  would. A series' missing markers are predicted once for the whole file, and a window owns
  those predicted in its stretch (owned by where a window found them, a marker on a window's
  edge was listed twice or not at all). ``follow_markers`` also carries state from marker to
  marker (the last delay, whether the stream drifts): each window replays the 16 sent markers
  before its own to rebuild it, and lists the next send of each payload after them, which
  bounds their search as in a whole run.
  Memory then grows with ``--max-delay`` (the window reaches that far past its last marker).
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import soundfile as sf

from probe.audio.fixtures import F32, open_audio
from probe.errors import ConfigError
from probe.outfiles import check_output
from probe.watermark.design import DETECT_RATE, MARKER_S
from probe.watermark.detect import Detection, MarkerDetector
from probe.watermark.embed import (
    ActiveLevel,
    Placement,
    mark_block,
    marker_amplitude,
    marker_positions,
)
from probe.watermark.informed import Sent, follow_markers, search_gaps, series_gaps

__all__ = ["BLOCK_S", "WINDOW_S", "detect_file", "follow_file", "mark_file", "sent_in_file"]

# Seconds read at once (marking, the blind pass) and owned by one window (informed searches).
BLOCK_S = 10
WINDOW_S = 60
# Context read either side of a window's own stretch: a search reaches +-60 ms around a marker
# (and a marker's length past it); whitening and resampling need a few ms more.
_CONTEXT_S = 2
_ALIGN_S = 2
# Sent markers replayed before a window's own, to rebuild follow_markers' state (its drift
# memory lasts 8 hits).
_WARM_MARKERS = 16


def _read(f: sf.SoundFile, start: int, frames: int) -> F32:
    f.seek(start)
    data = f.read(frames, dtype="float32", always_2d=True)
    out: F32 = np.ascontiguousarray(data[:, 0])
    return out


def _blocks(f: sf.SoundFile, frames: int) -> Iterator[tuple[int, F32]]:
    f.seek(0)
    start = 0
    while True:
        data = f.read(frames, dtype="float32", always_2d=True)
        if len(data) == 0:
            return
        yield start, np.ascontiguousarray(data[:, 0])
        start += len(data)


def _window_start(t: float, rate: int) -> int:
    """The first sample of a window reaching back to ``t`` s: a whole number of 2 s, so the
    window's 8 kHz samples (one-shot resampling) and whitening frames (128 samples at 8 kHz)
    fall where a whole-file run puts them, and the searches see the same numbers."""
    return max(0, math.floor(t / _ALIGN_S) * _ALIGN_S) * rate


def _shifted(d: Detection, by: int, rate: int) -> Detection:
    position = d.position + by
    return replace(d, sample=d.sample + by, position=position, time=position / rate)


def mark_file(
    src: str,
    dst: str,
    payload: bytes,
    fmt: str,
    *,
    every_s: float,
    level_db: float,
    block_s: float = BLOCK_S,
) -> tuple[int, list[Placement], float]:
    """Write ``src`` with markers carrying ``payload`` to ``dst`` (format ``fmt``, 16-bit PCM),
    as :func:`~probe.watermark.embed.embed` would mark the whole file. Returns the rate, the
    markers placed and the marked audio's peak (above 1.0 it was clipped)."""
    check_output("The output", dst)
    with open_audio(src, min_seconds=0.3) as f:
        rate, total = int(f.samplerate), int(f.frames)
        frame = max(1, int(0.02 * rate))  # whole level frames per block keep the level exact
        block = frame * max(1, int(block_s * rate) // frame)
        placed = [
            Placement(index=i, sample=start, payload=payload)
            for i, start in enumerate(marker_positions(total, rate, every_s=every_s))
        ]
        if not placed:
            raise ConfigError(f"{src} is too short to hold one marker")
        level = ActiveLevel(rate)
        for _, x in _blocks(f, block):
            level.feed(x)
        amplitude = marker_amplitude(level.value(), level_db)
        target = Path(dst)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        peak = 0.0
        try:
            with sf.SoundFile(tmp, "w", rate, 1, subtype="PCM_16", format=fmt) as out:
                for first, x in _blocks(f, block):
                    marked = mark_block(x, first, rate, placed, amplitude)
                    if len(marked):
                        peak = max(peak, float(np.max(np.abs(marked))))
                    out.write(np.clip(marked, -1.0, 1.0))
            os.replace(tmp, target)
        except (OSError, RuntimeError) as exc:
            raise ConfigError(f"cannot write {dst}: {exc}") from exc
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    return rate, placed, peak


def sent_in_file(path: str, *, block_s: float = BLOCK_S) -> list[Sent]:
    """The markers a blind pass finds in ``path`` (the sent audio), as sent markers."""
    rate, found = _blind(path, block_s)
    return [Sent(d.payload, d.position / rate) for d in found]


def _blind(path: str, block_s: float) -> tuple[int, list[Detection]]:
    with open_audio(path) as f:
        rate = int(f.samplerate)
        det = MarkerDetector(rate)
        found: list[Detection] = []
        for first, x in _blocks(f, max(1, int(block_s * rate))):
            found += det.feed(x, first / rate)
        found += det.flush()
    return rate, found


def detect_file(
    path: str, *, block_s: float = BLOCK_S, window_s: int = WINDOW_S
) -> tuple[int, list[tuple[Detection, str]]]:
    """``probe detect`` with nothing known: the blind pass over the whole file, then the markers
    of each series it found looked for where the series puts them; each detection with how it
    was found (``blind`` or ``series``), in file order, and the file's rate."""
    rate, blind = _blind(path, block_s)
    out = [(d, "blind") for d in blind]
    if len(blind) >= 2:  # a series needs two
        with open_audio(path) as f:
            total = int(f.frames)
            # Predicted once for the whole file: a window owns the markers predicted in its own
            # stretch, so each is searched once. (Owned by where a window found it, a marker on
            # a window's edge, searched by both, could be kept by both or by neither.)
            gaps = series_gaps(blind, rate, total)
            own = window_s * DETECT_RATE
            for c0 in range(0, total, window_s * rate):
                c1 = min(total, c0 + window_s * rate)
                lo = c0 * DETECT_RATE // rate
                mine = [g for g in gaps if lo <= g.centre < lo + own]
                if not mine:
                    continue
                a = _window_start(c0 / rate - _CONTEXT_S, rate)
                b = min(total, c1 + _CONTEXT_S * rate)  # a marker at the stretch's end, whole
                for d in search_gaps(_read(f, a, b - a), rate, mine, first=a):
                    out.append((_shifted(d, a, rate), "series"))
    return rate, sorted(out, key=lambda f: f[0].position)


def follow_file(
    path: str, sent: list[Sent], *, max_delay: float, window_s: int = WINDOW_S
) -> tuple[int, list[Detection | None]]:
    """:func:`~probe.watermark.informed.follow_markers` over a file of any length, one window
    of sent markers at a time (module docstring): for each sent marker, in the order given, its
    detection (``time`` in seconds from the file's start) or None; and the file's rate."""
    order = sorted(range(len(sent)), key=lambda i: sent[i].time)
    rank = {i: r for r, i in enumerate(order)}
    next_same: dict[int, int] = {}
    last_seen: dict[bytes, int] = {}
    for i in reversed(order):
        if sent[i].payload in last_seen:
            next_same[i] = last_seen[sent[i].payload]
        last_seen[sent[i].payload] = i
    out: list[Detection | None] = [None] * len(sent)
    with open_audio(path) as f:
        rate, total = int(f.samplerate), int(f.frames)
        r = 0
        while r < len(order):
            window = math.floor(sent[order[r]].time / window_s)
            mine = [order[r]]
            r += 1
            while r < len(order) and math.floor(sent[order[r]].time / window_s) == window:
                mine.append(order[r])
                r += 1
            first = rank[mine[0]]
            warm = order[max(0, first - _WARM_MARKERS) : first]
            later = sorted({next_same[i] for i in mine if i in next_same} - set(mine),
                           key=rank.__getitem__)
            ask, own = [*warm, *mine, *later], set(mine)
            t0 = sent[ask[0]].time - 0.05 - _CONTEXT_S
            t1 = sent[mine[-1]].time + max_delay + MARKER_S + _CONTEXT_S
            a, b = _window_start(t0, rate), min(total, math.ceil(t1) * rate)
            if b <= a:
                continue  # no audio there: nothing found, as in a whole-file run
            shift = a / rate
            found = follow_markers(
                _read(f, a, b - a), rate, [Sent(sent[i].payload, sent[i].time - shift)
                                           for i in ask], max_delay=max_delay
            )
            for i, d in zip(ask, found, strict=True):
                if d is not None and i in own:
                    out[i] = _shifted(d, a, rate)
    return rate, out
