"""One hop's audio stream turned into marker detections in the registry (no sockets here).

The sink (forks) and the source (the return direction) both hand each received frame, with its
arrival time, to a :class:`HopStream`; it decodes the frame, feeds a detector and records every
detection. A stream of a session the :class:`~probe.measure.expect.ExpectationBook` knows uses
informed detection (:mod:`probe.watermark.informed`: it looks for the markers that session sent);
a stream that names no session, or one the book does not know, is decoded blind until a blind
detection (or the book) tells its session, and is informed from then on.
:class:`DetectionWorker` runs that work on one thread beside the event
loop, so detection never delays the pacing of outgoing audio; one thread keeps frames in order.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from queue import SimpleQueue

import numpy as np
import numpy.typing as npt

from probe.audio.formats import decode
from probe.measure.expect import ExpectationBook
from probe.measure.sinkwire import RegistryEvents
from probe.protocol import AudioFormat
from probe.watermark.detect import Detection, MarkerDetector
from probe.watermark.informed import Expected, InformedDetector

log = logging.getLogger(__name__)

_REPLAY_S = 3.0
# An informed stream holds its frames and decodes and feeds them together: one decode and one
# feed call per search block of the detector (0.5 s) instead of one per frame. The detector
# searches when a feed brings it a whole block; feeds are offered every _HOLD_FRAMES frames, so
# the searches fall exactly where feeding every _HOLD_FRAMES frames put them.
_HOLD_FRAMES = 5


class HopStream:
    """Detections for one connection of one hop (or the return direction of one session)."""

    def __init__(
        self,
        registry: RegistryEvents,
        hop: str,
        audio: AudioFormat,
        *,
        session_hint: str | None = None,
        on_detection: Callable[[str, Detection], None] | None = None,
        book: ExpectationBook | None = None,
    ) -> None:
        self.registry = registry
        self.hop = hop
        self.audio = audio
        self._width = audio.frame_width
        self._sample_width = audio.sample_width
        self.session_hint = session_hint
        self._on_detection = on_detection
        self._book = book
        self._session: str | None = None  # the session the informed detector follows
        self._informed: InformedDetector | None = None
        self._detector: MarkerDetector | None = None
        self._closed = False
        self.detections = 0
        # Started by the first call on the detection thread: the book is that thread's alone.
        self._started = False
        # While blind, the last few seconds of audio, replayed into the informed detector when
        # the session becomes known (its first marker is in there).
        self._recent: deque[tuple[npt.NDArray[np.float32], float]] = deque()
        self._recent_n = 0
        # Frames of an informed stream not yet decoded: their bytes and arrival times.
        self._held: list[bytes] = []
        self._held_at: list[float] = []
        self._held_n = 0  # samples in _held

    @property
    def informed(self) -> bool:
        """Whether the stream looks for its session's expected markers (else decodes blind)."""
        return self._informed is not None

    def _start_detector(self) -> None:
        self._started = True
        self._informed = None
        self._detector = None
        if self._session is None and self.session_hint is not None:
            self._session = self.session_hint
        if self._book is not None and self._session is not None:
            informed = InformedDetector(self.audio.sample_rate)
            self._informed = informed
            if self._book.subscribe(self._session, self):
                return
            self._informed = None
        self._detector = MarkerDetector(self.audio.sample_rate)

    def expect(self, marker: Expected) -> None:
        """A marker of this stream's session was sent (called by the expectation book)."""
        if self._informed is not None:
            self._informed.expect(marker)

    def set_format(self, audio: AudioFormat) -> None:
        """The peer changed its audio format mid-stream: restart detection at the new rate."""
        if audio == self.audio:
            return
        if self._started:
            self._feed_held()
            self._record(self._flush())
        self.audio = audio
        self._width = audio.frame_width
        self._sample_width = audio.sample_width
        self._start_detector()

    def on_audio(self, data: bytes, arrival: float) -> None:
        """A frame of audio in the stream's format, received at ``arrival`` (seconds)."""
        if self._closed:
            return
        n = len(data)
        usable = n - n % self._width
        if usable <= 0:
            return
        if not self._started:
            self._start_detector()
        informed = self._informed
        if informed is not None:
            held = self._held
            held.append(data if usable == n else data[:usable])
            self._held_at.append(arrival)
            self._held_n += usable // self._sample_width
            if len(held) % _HOLD_FRAMES == 0 and self._held_n >= informed.until_search:
                self._feed_held()
            return
        samples = decode(data[:usable], self.audio.encoding)
        assert self._detector is not None
        found = self._detector.feed(samples, arrival)
        self._record(found)
        if self._book is None:
            return
        self._recent.append((samples, arrival))
        self._recent_n += len(samples)
        while self._recent_n - len(self._recent[0][0]) >= _REPLAY_S * self.audio.sample_rate:
            self._recent_n -= len(self._recent.popleft()[0])
        # The session became known (its first marker was sent after the stream opened), or a
        # blind detection named it: follow its expected markers from now on.
        session = self._session
        if session is None:
            for det in found:
                session = self._book.session_of(det.payload)
                if session is not None:
                    break
        if session is not None and self._book.knows(session):
            self._session = session
            self._start_detector()
            replay, self._recent = self._recent, deque()
            self._recent_n = 0
            if self._informed is not None:
                for block, at in replay:
                    self._record(self._informed.feed(block, at))

    def close(self) -> None:
        """End of stream: report what the detector still holds."""
        if self._closed:
            return
        self._closed = True
        if self._started:
            self._feed_held()
            self._record(self._flush())

    def _feed_held(self) -> None:
        """Decode the held frames of the informed detector together and feed them."""
        if not self._held or self._informed is None:
            return
        width = self.audio.frame_width
        offsets: list[int] = []
        offset = 0
        for data in self._held:
            offsets.append(offset)
            offset += len(data) // width
        samples = decode(b"".join(self._held), self.audio.encoding)
        arrivals = self._held_at
        self._held = []
        self._held_at = []
        self._held_n = 0
        self._record(self._informed.feed_stamped(samples, offsets, arrivals))

    def _flush(self) -> list[Detection]:
        if self._informed is not None:
            if self._book is not None and self._session is not None:
                self._book.unsubscribe(self._session, self)
            return self._informed.flush()
        assert self._detector is not None
        return self._detector.flush()

    def _record(self, found: list[Detection]) -> None:
        for det in found:
            self.detections += 1
            self.registry.record_detection(
                self.hop,
                det.payload,
                det.time,
                score=det.score,
                session_hint=self.session_hint,
            )
            if self._on_detection is not None:
                self._on_detection(self.hop, det)


class DetectionWorker:
    """A single thread that runs detection work in submission order.

    A C ``SimpleQueue`` of ``(fn, args)`` feeds it: a submit is one ``put`` (under a microsecond),
    where a ``ThreadPoolExecutor`` made a ``Future`` with a lock and a done callback per frame
    (about 30 us, paid by the event loop for every received frame)."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        *,
        after: Callable[[], None] | None = None,
    ) -> None:
        """``after`` runs on the worker's thread after each piece of work (e.g. to send what it
        found in one message)."""
        self._queue: SimpleQueue[
            tuple[Callable[..., None], tuple[object, ...], float] | None
        ] = SimpleQueue()
        self._clock = clock
        self._after = after
        self._max_wait = 0.0
        # When each piece of work not yet started was queued, oldest first (deque appends and
        # pops are atomic): a backlog is seen while it builds, not only once its work runs.
        self._queued_at: deque[float] = deque()
        # How long the work running now waited in the queue; audio that waited longer than
        # shed_after_s is not searched (see stale()).
        self.waited = 0.0
        self.shed_after_s: float | None = None
        self.shed = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="probe-detect", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., None], *args: object) -> None:
        """Queue ``fn(*args)``; failures are logged, never raised into the I/O loop."""
        if self._closed:
            raise RuntimeError("the detection worker is closed")
        now = self._clock()
        self._queued_at.append(now)
        self._queue.put((fn, args, now))

    def note_wait(self, wait_s: float) -> None:
        """Audio in the work running now had waited ``wait_s`` since it arrived (more than its
        time in this queue when it came from another process)."""
        if wait_s > self._max_wait:
            self._max_wait = wait_s

    def stale(self) -> bool:
        """Whether the audio of the work running now should be dropped unsearched: it waited
        longer than ``shed_after_s`` (set it to the marker timeout: nothing found in it could
        count any more); the caller counts each frame it drops in ``shed``. An overloaded sink
        so catches up instead of falling further behind (and holding ever more audio)."""
        return self.shed_after_s is not None and self.waited > self.shed_after_s

    def take_shed(self) -> int:
        """Frames shed since the last call."""
        out, self.shed = self.shed, 0
        return out

    def take_max_wait(self) -> float:
        """The longest any work waited since the last call (seconds), counting the work still
        queued as waiting until now: how far detection lags behind the audio handed to it."""
        out, self._max_wait = self._max_wait, 0.0
        queued = self._queued_at
        if queued:
            with contextlib.suppress(IndexError):  # emptied meanwhile by the worker's thread
                out = max(out, self._clock() - queued[0])
        return out

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fn, args, queued = item
            with contextlib.suppress(IndexError):
                self._queued_at.popleft()
            wait = self._clock() - queued
            self.waited = wait
            if wait > self._max_wait:
                self._max_wait = wait
            try:
                fn(*args)
            except Exception as exc:
                log.error("detection failed: %s", exc, exc_info=exc)
            if self._after is not None:
                try:
                    self._after()
                except Exception as exc:
                    log.error("after detection work: %s", exc, exc_info=exc)

    def drain(self, timeout: float | None = None) -> None:
        """Wait until all queued work has run (TimeoutError after ``timeout`` seconds)."""
        if self._closed:
            self._thread.join(timeout)
            return
        done = threading.Event()
        now = self._clock()
        self._queued_at.append(now)
        self._queue.put((done.set, (), now))
        if not done.wait(timeout):
            raise TimeoutError(f"detection work not drained within {timeout} s")

    def close(self) -> None:
        """Run what is queued, then stop the thread."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)
        self._thread.join()
