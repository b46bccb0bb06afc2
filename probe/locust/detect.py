"""Detection beside a gevent hub: numeric work on a native OS thread, bookkeeping on the hub.

Detection is bursty CPU work (a 1 s block costs several milliseconds); run in a greenlet it would
hold the hub and delay every paced send behind it. Under gevent's monkey patching a
``ThreadPoolExecutor`` (and so :class:`probe.hopstream.DetectionWorker`) runs greenlets, not
threads, so this module starts a *native* thread (gevent's saved original) fed by a C
``SimpleQueue``.

gevent's maintainers advise doing only computation in a native thread and touching no shared
gevent objects (patched locks, events) from it. So the thread runs :class:`HopStream` work only,
and the detections it makes do not go to the registry from there: each :class:`HopStream` is given
a :class:`DetectionOutbox` as its registry, which queues ``record_detection`` calls; the hub drains
the outbox (:meth:`DetectionOutbox.deliver`) into the real :class:`SessionRegistry`, so the
registry, its observers and Locust's event hooks only ever run on the hub's thread. Arrival times
are stamped when frames are received, so the short hand-over delay changes no latency.
"""

from __future__ import annotations

import _thread
import contextlib
import logging
import os
from _queue import SimpleQueue
from collections import deque
from collections.abc import Callable
from typing import cast

from probe.hopstream import HopStream
from probe.measure.registry import SessionRegistry
from probe.protocol import AudioFormat

log = logging.getLogger(__name__)

__all__ = ["DetectionOutbox", "NativeDetectionWorker", "start_native_thread"]


def start_native_thread(fn: Callable[[], None]) -> None:
    """Run ``fn`` on a new OS thread, even under gevent's monkey patching.

    Not ``threading.Thread``: gevent patches the threading module in place, so even the saved
    original class waits for its start on a patched (greenlet) event, set from the other thread,
    which hangs. ``_thread.start_new_thread`` as it was before patching has no such wait."""
    try:
        from gevent import monkey

        start = monkey.get_original("_thread", "start_new_thread")
    except ImportError:  # pragma: no cover - gevent is a dependency of locust
        import _thread

        start = _thread.start_new_thread
    start(fn, ())


class DetectionOutbox:
    """Stands in for the registry inside :class:`HopStream` s run on the detection thread.

    ``record_detection`` calls are queued (``deque.append`` is atomic) and replayed on the hub's
    thread by :meth:`deliver`."""

    def __init__(self) -> None:
        self._queue: deque[tuple[str, bytes, float, float, str | None]] = deque()

    def record_detection(
        self,
        hop: str,
        payload: bytes,
        arrival_time: float,
        *,
        score: float,
        session_hint: str | None = None,
    ) -> None:
        self._queue.append((hop, payload, arrival_time, score, session_hint))

    def deliver(self, registry: SessionRegistry) -> int:
        """Hand every queued detection to ``registry``; returns how many."""
        n = 0
        while True:
            try:
                hop, payload, at, score, hint = self._queue.popleft()
            except IndexError:
                return n
            registry.record_detection(hop, payload, at, score=score, session_hint=hint)
            n += 1

    def stream(self, hop: str, audio: AudioFormat, *, session_hint: str | None) -> HopStream:
        """A :class:`HopStream` whose detections land in this outbox."""
        # HopStream only calls record_detection on its registry; this outbox has that method.
        return HopStream(cast(SessionRegistry, self), hop, audio, session_hint=session_hint)


class NativeDetectionWorker:
    """One native thread running submitted work in order (the interface of DetectionWorker)."""

    def __init__(self, name: str = "probe-detect", *, nice: int = 0) -> None:
        self.nice = nice
        self._queue: SimpleQueue[tuple[Callable[..., None], tuple[object, ...]] | None] = (
            SimpleQueue()
        )
        self.submitted = 0
        self.done = 0
        self.failures = 0
        self.finished = False
        self.native_id: int | None = None
        self._errors: deque[str] = deque(maxlen=100)
        self.name = name
        start_native_thread(self._run)

    def submit(self, fn: Callable[..., None], *args: object) -> None:
        """Queue ``fn(*args)``; never blocks. Failures are logged and counted, never raised."""
        self.submitted += 1
        self._queue.put((fn, args))

    def backlog(self) -> int:
        """Work items queued and not yet finished."""
        return self.submitted - self.done

    def _run(self) -> None:
        self.native_id = _thread.get_native_id()
        if self.nice:
            # Below the hub in the OS scheduler: pacing first, detection with what is left.
            with contextlib.suppress(OSError, AttributeError):
                os.setpriority(os.PRIO_PROCESS, self.native_id, self.nice)
        while True:
            item = self._queue.get()
            if item is None:
                self.finished = True
                return
            fn, args = item
            try:
                fn(*args)
            except Exception as exc:
                # Logged later on the hub (report_failures): logging's locks are patched ones.
                self.failures += 1
                self._errors.append(f"{type(exc).__name__}: {exc}")
            finally:
                self.done += 1

    def report_failures(self) -> None:
        """Log the detection failures collected since the last call (call it on the hub)."""
        while self._errors:
            log.error("detection failed: %s", self._errors.popleft())

    def drained(self, upto: int | None = None) -> bool:
        """Whether every item submitted (or the first ``upto``) has run. Poll it from the hub
        with ``gevent.sleep`` between calls: waiting on a native primitive would block the hub."""
        return self.done >= (self.submitted if upto is None else upto)

    def close(self) -> None:
        """Stop the thread once the queued work has run (the work is not waited for: poll
        :meth:`drained` first for that)."""
        self._queue.put(None)
