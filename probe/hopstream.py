"""One hop's audio stream turned into marker detections in the registry (no sockets here).

The sink (forks) and the source (the return direction) both hand each received frame, with its
arrival time, to a :class:`HopStream`; it decodes the frame, feeds the streaming detector and
records every detection. :class:`DetectionWorker` runs that work on one thread beside the event
loop, so detection never delays the pacing of outgoing audio; one thread keeps frames in order.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from queue import SimpleQueue

from probe.audio.formats import decode
from probe.measure.registry import SessionRegistry
from probe.protocol import AudioFormat
from probe.watermark.detect import Detection, MarkerDetector

log = logging.getLogger(__name__)


class HopStream:
    """Detections for one connection of one hop (or the return direction of one session)."""

    def __init__(
        self,
        registry: SessionRegistry,
        hop: str,
        audio: AudioFormat,
        *,
        session_hint: str | None = None,
        on_detection: Callable[[str, Detection], None] | None = None,
    ) -> None:
        self.registry = registry
        self.hop = hop
        self.audio = audio
        self.session_hint = session_hint
        self._on_detection = on_detection
        self._detector = MarkerDetector(audio.sample_rate)
        self._closed = False
        self.detections = 0

    def set_format(self, audio: AudioFormat) -> None:
        """The peer changed its audio format mid-stream: restart detection at the new rate."""
        if audio == self.audio:
            return
        self._record(self._detector.flush())
        self.audio = audio
        self._detector = MarkerDetector(audio.sample_rate)

    def on_audio(self, data: bytes, arrival: float) -> None:
        """A frame of audio in the stream's format, received at ``arrival`` (seconds)."""
        if self._closed:
            return
        usable = len(data) - len(data) % self.audio.frame_width
        if usable <= 0:
            return
        samples = decode(data[:usable], self.audio.encoding)
        self._record(self._detector.feed(samples, arrival))

    def close(self) -> None:
        """End of stream: report what the detector still holds."""
        if self._closed:
            return
        self._closed = True
        self._record(self._detector.flush())

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

    def __init__(self) -> None:
        self._queue: SimpleQueue[tuple[Callable[..., None], tuple[object, ...]] | None] = (
            SimpleQueue()
        )
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="probe-detect", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., None], *args: object) -> None:
        """Queue ``fn(*args)``; failures are logged, never raised into the I/O loop."""
        if self._closed:
            raise RuntimeError("the detection worker is closed")
        self._queue.put((fn, args))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fn, args = item
            try:
                fn(*args)
            except Exception as exc:
                log.error("detection failed: %s", exc, exc_info=exc)

    def drain(self, timeout: float | None = None) -> None:
        """Wait until all queued work has run (TimeoutError after ``timeout`` seconds)."""
        if self._closed:
            self._thread.join(timeout)
            return
        done = threading.Event()
        self._queue.put((done.set, ()))
        if not done.wait(timeout):
            raise TimeoutError(f"detection work not drained within {timeout} s")

    def close(self) -> None:
        """Run what is queued, then stop the thread."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)
        self._thread.join()
