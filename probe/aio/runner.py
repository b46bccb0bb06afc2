"""A probe run: a sink, N sessions at a given concurrency, settling, and the report.

Shared by ``probe run``, ``probe demo`` and the tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from probe.aio.hopstream import DetectionWorker
from probe.aio.sink import Sink
from probe.aio.sinkproc import SinkProcess
from probe.aio.source import SourceConfig, run_session
from probe.config import RunOptions, run_options
from probe.cpushare import CpuShare
from probe.errors import GeneratorFailed, Interrupted
from probe.measure.admission import MAX_FORKS, Admission, new_capability, with_capability
from probe.measure.expect import ExpectationBook
from probe.measure.health import GeneratorHealth, bounds_for
from probe.measure.observe import RunObserver
from probe.measure.registry import SessionRegistry
from probe.measure.report import build_report
from probe.tls import server_context


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """A whole run: the session template plus how many, how many at once, and the sink."""

    source: SourceConfig
    sessions: int = 1
    concurrency: int = 1
    sink_host: str = "127.0.0.1"
    sink_port: int = 0
    sink_url: str | None = None
    # What forks must present as the sink URL's last path segment: a fixed secret for hops
    # configured statically, or None for a fresh random capability per run.
    sink_secret: str | None = None
    # Certificate and key files of a wss:// sink (None: ws://).
    sink_tls: tuple[str, str] | None = None
    # Fork connections the sink holds at once; more are refused with 1013 (try again later).
    max_forks: int = MAX_FORKS
    use_sink: bool = True
    marker_timeout_s: float = 10.0
    hop_order: Sequence[str] | None = None
    configured_ms: Mapping[str, float] = field(default_factory=dict)
    # Run the sink (fork traffic and its detection) in a child process, away from the pacing
    # loop's interpreter; only with the wall clock (see probe.aio.sinkproc).
    sink_process: bool = True


def run_config(options: RunOptions | Mapping[str, Any]) -> RunConfig:
    """The :class:`RunConfig` of checked run options (or of options by name, checked here by
    :func:`probe.config.run_options`); a fixture that cannot be loaded is a ConfigError."""
    from probe.audio.fixtures import load_fixture
    from probe.watermark.design import DEFAULT_EVERY_S, segment_samples

    o = options if isinstance(options, RunOptions) else run_options(options)
    segment_samples(o.rate)
    load_fixture(o.fixture, rate=o.rate, min_seconds=0.5)
    host, port = o.sink_address
    src = SourceConfig(
        target=o.target,
        dialect=o.dialect,
        fixture=o.fixture,
        rate=o.rate,
        encoding=o.encoding,
        frame_ms=o.frame_ms,
        duration_s=o.duration,
        reply=o.reply,
        utterance_s=o.utterance,
        gap_s=o.gap,
        reply_threshold_dbfs=o.reply_threshold,
        barge_in_s=o.barge_in,
        results=o.results,
        result_fields=o.result_fields,
        settle_s=o.marker_timeout,
        every_s=o.every or DEFAULT_EVERY_S,
        level_db=o.level,
        ca_file=o.ca,
    )
    return RunConfig(
        source=src,
        sessions=o.sessions,
        concurrency=o.concurrency,
        sink_host=host,
        sink_port=port,
        sink_url=o.sink_url,
        sink_secret=o.sink_secret,
        sink_tls=(o.sink_tls_cert, o.sink_tls_key) if o.sink_tls_cert and o.sink_tls_key else None,
        max_forks=o.max_forks,
        use_sink=not o.no_sink,
        marker_timeout_s=o.marker_timeout,
        hop_order=list(o.hop_order) if o.hop_order else None,
    )


class Progress:
    """A one-line live status on a terminal; silent otherwise."""

    def __init__(self, stream: TextIO | None) -> None:
        self.stream = stream if stream is not None and stream.isatty() else None

    def show(self, text: str) -> None:
        if self.stream is not None:
            self.stream.write("\r\x1b[2K" + text)
            self.stream.flush()

    def done(self) -> None:
        if self.stream is not None:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()


# What ends a command's run early with a partial report (probe run, demo, canary).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# After a stop signal: how long the sessions get to close their connections, and detection to
# finish the audio already received, before the partial report is built.
_STOP_CLOSE_S = 2.0
_STOP_DRAIN_S = 3.0


class _Stop:
    """The stop signals of a run, while it lasts: the first one received cancels the run's work
    (later ones are noted and ignored while the partial report is made). Handlers go through
    the event loop (its wakeup fd), so a signal is seen wherever it lands; the previous
    handlers come back at the end."""

    def __init__(self, signals: Sequence[int]) -> None:
        self.signals = tuple(signals)
        self.received: int | None = None
        self.at = 0.0
        # Why the probe itself failed (its sink child died), ending the run early; None if not.
        self.failed: str | None = None
        self._work: asyncio.Task[None] | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Stop:
        loop = asyncio.get_running_loop()
        for sig in self.signals:
            previous = signal.getsignal(sig)
            if previous == signal.SIG_IGN:
                continue  # ignored by whoever started us (a script's background job): leave it
            self._previous[sig] = previous
            loop.add_signal_handler(sig, self._on_signal, sig)
        return self

    def __exit__(self, *exc: object) -> None:
        loop = asyncio.get_running_loop()
        for sig, previous in self._previous.items():
            loop.remove_signal_handler(sig)
            signal.signal(sig, previous)

    def watch(self, work: asyncio.Task[None]) -> None:
        self._work = work
        if self.received is not None:
            work.cancel()

    def fail(self, reason: str) -> None:
        """The probe cannot measure any more: end the run's work as a signal would."""
        if self.received is not None or self.failed is not None:
            return
        self.failed = reason
        self.at = time.monotonic()
        if self._work is not None:
            self._work.cancel()

    def _on_signal(self, sig: int) -> None:
        if self.received is not None:
            return
        self.received = sig
        self.at = time.monotonic()
        if self._work is not None:
            self._work.cancel()

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Hold the stop signals back from this thread (they stay pending, never lost) while a
        child process is started: it inherits the mask and so outlives a Ctrl-C or ``timeout``
        sent to the whole process group, for this process to drain and stop it."""
        if not self.signals:
            yield
            return
        old = signal.pthread_sigmask(signal.SIG_BLOCK, self.signals)
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


async def run_probe(
    cfg: RunConfig,
    *,
    clock: Callable[[], float] = time.time,
    progress: Progress | None = None,
    observer: RunObserver | None = None,
    stop_on: Sequence[int] = (),
) -> dict[str, Any]:
    """Run every session, wait for the markers to settle, return the ``probe.report/v1`` dict.

    ``observer`` (see :mod:`probe.measure.observe`) hears every session, detection, miss and send
    lag as it happens, and the finished report; closing it is the caller's business.

    ``stop_on`` (signal numbers, e.g. SIGINT and SIGTERM; main thread only) end the run early:
    the sessions are cancelled, detection finishes what it has received (a few seconds at
    most), markers already past their timeout are missed and every other pending one is
    unmeasured, and the report says ``interrupted`` (which signal, when, how many unmeasured).
    No KeyboardInterrupt is raised; the caller picks the exit code."""
    with _Stop(stop_on) as stop:
        return await _run(cfg, clock, progress or Progress(None), observer, stop)


async def _run(
    cfg: RunConfig,
    clock: Callable[[], float],
    progress: Progress,
    observer: RunObserver | None,
    stop: _Stop,
) -> dict[str, Any]:
    # The detection thread holds the GIL in bursts; by default Python lets a thread keep it for
    # 5 ms, which shows up directly as send lag. 1 ms keeps the pacing loop responsive.
    if sys.getswitchinterval() > 0.001:
        sys.setswitchinterval(0.001)
    registry = SessionRegistry(
        clock=clock,
        marker_timeout=cfg.marker_timeout_s,
        expected_hops=tuple(cfg.hop_order or ()),
        observer=observer,
        lock=threading.Lock(),  # the event loop and the detection thread both record
        health=GeneratorHealth(bounds_for(cfg.marker_timeout_s)),
        key=secrets.token_bytes(16),  # this run's marker tokens: not guessable from session ids
    )
    worker = DetectionWorker()
    # Informed detection: every marker sent is expected on every stream of its session. The
    # book lives where detection runs (the sink child, or this process's detection thread).
    book = ExpectationBook()
    sink: Sink | SinkProcess | None = None
    interrupted = 0  # markers settled as unmeasured when a stop signal cut the run short
    started_at = clock()
    t0 = time.monotonic()
    try:
        source = cfg.source
        if cfg.use_sink:
            capability = cfg.sink_secret or new_capability()
            if cfg.sink_process and clock is time.time:
                sink = SinkProcess(registry, capability=capability, tls=cfg.sink_tls,
                                   max_forks=cfg.max_forks)
            else:
                sink = Sink(registry, worker, clock=clock, book=book,
                            admission=Admission(capability), max_forks=cfg.max_forks,
                            tls=server_context(*cfg.sink_tls) if cfg.sink_tls else None)
            with stop.held():
                url = await sink.start(cfg.sink_host, cfg.sink_port)
            advertised = with_capability(cfg.sink_url, capability) if cfg.sink_url else url
            source = SourceConfig(**{**source.__dict__, "sink_url": advertised})
        if isinstance(sink, SinkProcess):
            registry.add_send_listener(sink.expect)
        else:
            registry.add_send_listener(lambda *sent: worker.submit(book.add, *sent))
        gate = asyncio.Semaphore(max(1, cfg.concurrency))
        done = 0

        async def one(i: int) -> None:
            nonlocal done
            async with gate:
                await run_session(
                    source,
                    registry,
                    worker,
                    session=uuid.uuid4().hex,
                    clock=clock,
                    open_stream=sink.open_stream if isinstance(sink, SinkProcess) else None,
                    book=book,
                )
            done += 1
            counts = registry.session_counts()
            progress.show(
                f"sessions {done}/{cfg.sessions} (failed {counts.failed}), "
                f"{time.monotonic() - t0:.0f} s"
            )

        async def work() -> None:
            await asyncio.gather(*(one(i) for i in range(cfg.sessions)))
            await _settle(registry, worker, cfg.marker_timeout_s, sink)

        watch = asyncio.create_task(_watch(registry, worker, sink, stop))
        task = asyncio.create_task(work())
        stop.watch(task)
        try:
            await asyncio.wait({task})
            if (stop.received is None and stop.failed is None) or not task.cancelled():
                task.result()  # a failure of the run itself
            else:
                interrupted = await _cut_short(task, registry, worker, sink)
        finally:
            watch.cancel()
            if not task.done():  # this coroutine itself was cancelled: close the sessions
                task.cancel()
                await asyncio.wait({task}, timeout=_STOP_CLOSE_S)
    finally:
        if sink is not None:
            await sink.stop()  # a second stop (after a stop signal) does nothing
        await asyncio.to_thread(worker.close)
        progress.done()
    report = build_report(
        registry,
        target=cfg.source.target,
        started_at=started_at,
        duration_s=time.monotonic() - t0,
        hop_order=cfg.hop_order,
        configured={k: v / 1000.0 for k, v in cfg.configured_ms.items()} or None,
        invalid=(
            None
            if stop.failed is None
            else {"reason": stop.failed, "after_s": round(stop.at - t0, 3)}
        ),
        interrupted=(
            None
            if stop.received is None
            else {
                "signal": signal.Signals(stop.received).name,
                "after_s": round(stop.at - t0, 3),
                "unmeasured": interrupted,
            }
        ),
    )
    registry.close()  # the spooled history's file: the report's series keeps its own map of it
    if observer is not None:
        observer.run_finished(report)
    return report


async def _cut_short(
    task: asyncio.Task[None],
    registry: SessionRegistry,
    worker: DetectionWorker,
    sink: Sink | SinkProcess | None,
) -> int:
    """After a stop signal cancelled the run's work: give the sessions a moment to close their
    connections (cancelled again past it), stop the sink (its streams end, and what they still
    hold is searched) and let detection finish, then settle. Markers past their timeout are
    missed as always; the rest are unmeasured. Returns how many were unmeasured."""
    if not task.done():
        await asyncio.wait({task}, timeout=_STOP_CLOSE_S)
    if not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=_STOP_CLOSE_S)
    if sink is not None:
        await sink.stop()  # the child's last detections are applied when it has stopped
    with contextlib.suppress(TimeoutError):
        await asyncio.to_thread(worker.drain, _STOP_DRAIN_S)
    registry.expire()
    return len(registry.settle_all(unmeasured=True))


async def _watch(
    registry: SessionRegistry,
    worker: DetectionWorker,
    sink: Sink | SinkProcess | None,
    stop: _Stop,
) -> None:
    """Every second: this process's CPU and its detection thread's backlog to the generator's
    health, and markers past their timeout declared (the health is judged then); a dead sink
    child ends the run (nothing would be detected any more)."""
    meter = CpuShare()
    while True:
        await asyncio.sleep(1.0)
        if isinstance(sink, SinkProcess) and sink.died is not None:
            stop.fail(sink.died)
        registry.record_cpu("worker", meter.read())
        registry.record_detection_delay(worker.take_max_wait())
        registry.expire()


async def _settle(
    registry: SessionRegistry,
    worker: DetectionWorker,
    timeout_s: float,
    sink: Sink | SinkProcess | None = None,
) -> None:
    """Wait until every marker is detected or past its timeout, then settle the rest."""
    deadline = time.monotonic() + timeout_s + 1.0
    while time.monotonic() < deadline:
        if isinstance(sink, Sink):
            sink.flush()  # fork frames waiting for their batch
        await asyncio.to_thread(worker.drain)
        if isinstance(sink, SinkProcess):
            await asyncio.to_thread(sink.drain)
        registry.expire()
        if sum(c.pending for c in registry.hop_counts().values()) == 0:
            return
        await asyncio.sleep(0.2)
    if isinstance(sink, Sink):
        sink.flush()
    await asyncio.to_thread(worker.drain)
    if isinstance(sink, SinkProcess):
        await asyncio.to_thread(sink.drain)
    registry.settle_all()


def interruption(report: Mapping[str, Any], written: Sequence[str] = ()) -> Interrupted | None:
    """The :class:`~probe.errors.Interrupted` to raise for a report a stop signal cut short (its
    one sentence names the files ``written``), or None for a whole run."""
    cut = report.get("interrupted")
    if not cut:
        return None
    where = f"; written to {', '.join(written)}" if written else ""
    return Interrupted(
        f"interrupted by {cut['signal']} after {float(cut['after_s']):.1f} s: the report is "
        f"partial ({cut['unmeasured']} markers still pending counted unmeasured){where}.",
        int(signal.Signals[cut["signal"]]),
    )


def generator_failure(
    report: Mapping[str, Any], written: Sequence[str] = ()
) -> GeneratorFailed | None:
    """The :class:`~probe.errors.GeneratorFailed` to raise for a report the probe's own failure
    made invalid (its one sentence names the files ``written``), or None."""
    bad = report.get("invalid")
    if not bad:
        return None
    where = f"; the partial report is written to {', '.join(written)}" if written else ""
    return GeneratorFailed(
        f"the run is invalid after {float(bad['after_s']):.1f} s: {bad['reason']}{where}."
    )


def default_progress() -> Progress:
    return Progress(sys.stderr)
