"""The reference pipeline's I/O shell: a WebSocket server that plays a multi-hop audio system.

Each ingress connection is one session. Its frames are judged by the protocol receivers
(`IngressReceiver`, or `TwilioReceiver` in the Twilio dialect); a bad first message closes the
connection with the violation's code and reason (logged at INFO: a misbehaving client is normal
business for a server). Audio then runs through one `HopCore` per hop (`hop.py` holds the timing
rule), each hop with one loop timer armed for its next emission, whose callback emits what is
due: to its fork (a WebSocket to the session's sink, PROTOCOL.md 2) and to the next hop. After the
last hop a zero-delay return stage converts the audio back to the ingress format and sends it on
the ingress connection (binary frames, or Twilio `media` events of 20 ms) in the same call.

Cost. A stage has no task of its own, and a frame is written by the sans-I/O protocol straight
to the transport (`_write_now`) while the socket keeps up; only a fork still opening, or a peer
that falls behind, has frames queued for a writer task that awaits `send`. A hop whose samples
come out as they went in takes its table path (`hop.py`). Measured with
benchmarks/pipeline_cost.py (100 streams of 16 kHz pcm16, `a:20ms`, `spin=0`, fork to a sink
that only reads), the pipeline's CPU per stream-second went from 5.4 ms (a task per stage, float
round trip, awaited sends) to 4.05 ms with the table path and 3.5 ms with timers and direct writes.

Waiting. A stage waits for an absolute due time (the injected clock only stamps arrivals and sets
the due times; the timer is armed for the time left on it), so delays never accumulate. asyncio's
own timers wake up to ~1 ms late on Linux (epoll rounds timeouts up to whole milliseconds; measured
median 0.72 ms, p90 1.15 ms), so the last `spin` seconds (default 1 ms) of each wait are spent
yielding to the loop in a busy loop (`call_soon` until due; a bare timer wait then lands a median 3
us late, p99 10 us). Measured with the 3-hop test chain (when each stage was a task), a hop emits
(fork frame written) a median 0.13 ms after its due time, p95 0.5 ms, against 0.9-1.1 ms / 1.5-1.6
ms with `spin=0`; the CPU cost was lost in the noise (0.32-0.39 s of process CPU for a 3 s session,
test client and sink included, either way). Pass `spin=0` for load runs with very many sessions. On
loopback, in one process on a shared 2-core box, forked frames reach a websockets sink a median
0.3-0.6 ms after their due time (p95 0.5-1.6 ms), and a hop's own delay seen at the sink (arrival
after it minus arrival after the hop before) is off by a median 0.02-0.2 ms (p95 0.3-1.0 ms).

Faults on purpose (`spec.py`): `stall@S` (a hop stops emitting, its fork is closed without a
stop), `close@S` (the session is torn down, ingress closed with 1011), `garbage` (a fork that
sends non-JSON and random bytes), `nofork`, `refuse` (1008 at start). A sink that cannot be
reached, or drops a fork, costs only that fork: one warning per sink URL, and the session goes on.

A text hop (`name:DELAY:text...`, last hop only; `stt.py` holds its rules) takes the place of
the return: it consumes the audio that reaches it (no fork, no audio back) and sends its JSON
results as text frames on the ingress connection at their due times, in either dialect; when
the stream ends and its last result is out, it sends `stop` (probe dialect) and closes.

A reply hop (`name:DELAY:reply...`, last hop only; `bot.py` holds its rules) takes the place of
the return too: a loopback voice bot that hears the audio reaching it (no fork) and sends its
own reply on the ingress connection, binary frames in the ingress format or Twilio `media`,
`mark` and `clear` events, nothing between replies. Its task sleeps until the bot's next output
is due, or until new input arrives (a barge-in changes what is due); after the stream ends and
the last reply is out, it sends `stop` (probe dialect) and closes.

Memory per session is bounded: each stage holds at most `MAX_PENDING` chunks (more means the
client sends faster than real time; the excess is dropped with one warning).

Idle connections are closed: one that sends no `start` within `idle_timeout` seconds (default
10) of connecting, or no frame for that long while its session streams, is closed with 1008 and a
reason saying which, and one INFO log line. After `stop` the session's drain time is added (the
client waits for the audio still in the hops). One watchdog task does this for every connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import time
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI
from websockets.protocol import State

from probe.aio.wsstamp import StampedServerConnection, server_factory
from probe.audio.formats import decode
from probe.config import parse_host_port
from probe.errors import ConfigError, ProtocolError
from probe.heap import TRIM_EVERY_S, collect_and_trim
from probe.pipeline.bot import BotAudio, BotMark, BotOutput, ReplyBot, reply_clip
from probe.pipeline.hop import Emission, HopCore, output_format
from probe.pipeline.spec import HopSpec, check_hops, parse_hops
from probe.pipeline.stt import SentenceBank, SpeechToTextCore, TextResult
from probe.protocol import (
    CLOSE_NORMAL,
    CLOSE_POLICY,
    CLOSE_UNSUPPORTED,
    Audio,
    AudioFormat,
    ForkStart,
    IngressReceiver,
    IngressStart,
    ProtocolViolation,
    Started,
    Stop,
    Stopped,
    TraceContext,
    TwilioReceiver,
    TwilioResponder,
    to_json,
)

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer, TracerProvider

__all__ = [
    "CLOSE_INTERNAL",
    "IDLE_TIMEOUT",
    "MAX_PENDING",
    "Dialect",
    "ReferencePipeline",
    "SpanRecord",
    "child_context",
    "run_pipeline",
]

log = logging.getLogger("probe.pipeline")

Dialect = Literal["probe", "twilio"]
CLOSE_INTERNAL = 1011
MAX_PENDING = 2000  # chunks per stage: 40 s of 20 ms frames
MAX_SPANS = 10_000
TWILIO_FRAME = 160  # 20 ms of 8 kHz mu-law
_FORK_OPEN_TIMEOUT = 5.0
_CLOSE_TIMEOUT = 2.0
_DIRECT_WRITE_LIMIT = 4096  # bytes buffered on a fork's socket beyond which frames queue
_DRAIN_SLACK = 5.0  # seconds past the largest delay a session may take to drain at its end
IDLE_TIMEOUT = 10.0  # seconds a connection may stay silent (before start, or while streaming)


class _Conn:
    """What the idle watchdog knows of one ingress connection."""

    __slots__ = ("last", "session", "ws")

    def __init__(self, ws: ServerConnection, last: float) -> None:
        self.ws = ws
        self.last = last  # when its last frame arrived (or it connected)
        self.session: _Session | None = None


@dataclass(frozen=True, slots=True)
class SpanRecord:
    """One hop's span of one session (ids as lowercase hex): the context its fork sends, and,
    with a tracer provider, the ids of the OTel span exported for it."""

    session: str
    hop: str
    trace_id: str
    span_id: str
    parent_span_id: str


def child_context(parent: TraceContext) -> TraceContext:
    """A child span context of `parent`: same trace id and flags, a new random span id."""
    span_id = secrets.token_hex(8)
    while span_id == "0" * 16:
        span_id = secrets.token_hex(8)
    return TraceContext(parent.trace_id, span_id, parent.flags)


async def _sleep_until(due: float, clock: Callable[[], float], spin: float) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + (due - clock())
    coarse = end - spin - loop.time()
    if coarse > 0:
        await asyncio.sleep(coarse)
    while loop.time() < end:
        await asyncio.sleep(0)


def _write_now(ws: ClientConnection | ServerConnection, message: bytes | str) -> bool:
    """Send one message without awaiting, if websockets would not wait for it either: the
    connection is open and the socket keeps up. Returns False (nothing sent) otherwise, and the
    caller queues the message for a task that awaits `send` (which also raises ConnectionClosed).

    This is what `send` does for a single frame (the sans-I/O protocol frames the message, the
    bytes go to the transport), minus the coroutine and its context manager: measured with 100
    streams, those were about a fifth of the pipeline's CPU.
    """
    transport = ws.transport
    if (ws.protocol.state is not State.OPEN or transport.is_closing()
            or transport.get_write_buffer_size() >= _DIRECT_WRITE_LIMIT):
        return False
    if isinstance(message, str):
        ws.protocol.send_text(message.encode())
    else:
        ws.protocol.send_binary(message)
    for data in ws.protocol.data_to_send():
        transport.write(data)
    return True


class _End:
    __slots__ = ("t",)

    def __init__(self, t: float) -> None:
        self.t = t


_CLOSE = object()


class _Fork:
    """One hop's fork connection.

    A frame is written the moment the hop emits it (`_write_now`); only while the connection is
    still opening, or the sink falls behind, do frames wait in a bounded queue for the writer task.
    """

    def __init__(self, session: _Session, hop: str, hello: str, garbage: random.Random | None):
        self._session = session
        self._hop = hop
        self._hello = hello
        self._garbage = garbage
        self._items: deque[bytes | object] = deque()
        self._wake = asyncio.Event()
        self._ws: ClientConnection | None = None
        self._url = ""
        self._busy = False
        self._dead = False
        self._stop = True
        self._code = CLOSE_NORMAL

    def send(self, data: bytes) -> None:
        if self._dead:
            return
        if self._garbage is not None:
            data = self._garbage.randbytes(len(data))
        ws = self._ws
        if ws is not None and not self._items and not self._busy and _write_now(ws, data):
            return
        if len(self._items) >= MAX_PENDING:
            self._session.warn_once(f"fork of hop {self._hop!r} fell behind; frames dropped.")
            return
        self._items.append(data)
        self._wake.set()

    def finish(self, *, stop: bool, code: int = CLOSE_NORMAL) -> None:
        self._stop = stop
        self._code = code
        self._items.append(_CLOSE)
        self._wake.set()

    def _lost(self, exc: ConnectionClosed) -> None:
        if not self._dead:
            self._dead = True
            self._session.pipeline.warn_sink(self._url, f"the sink {self._url} closed the fork "
                                             f"of hop {self._hop!r} ({exc}); the session goes on.")

    async def run(self, url: str) -> None:
        self._url = url
        try:
            ws = await asyncio.wait_for(
                connect(url, compression=None, proxy=None, open_timeout=None,
                        close_timeout=_CLOSE_TIMEOUT, max_queue=4),
                _FORK_OPEN_TIMEOUT,
            )
        except (OSError, TimeoutError, InvalidURI, InvalidHandshake) as exc:
            self._dead = True
            self._session.pipeline.warn_sink(url, f"hop {self._hop!r} could not open its fork "
                                             f"to {url} ({exc or type(exc).__name__}); "
                                             "the session goes on without it.")
            return
        try:
            await self._pump(ws)
        except ConnectionClosed as exc:
            self._lost(exc)
        finally:
            self._ws = None
            # Cancelled (pipeline stopped, session aborted) or failed: drop the TCP connection.
            if ws.state is not State.CLOSED:
                ws.transport.abort()

    async def _pump(self, ws: ClientConnection) -> None:
        await ws.send(self._hello)
        self._ws = ws
        while True:
            while not self._items:
                self._wake.clear()
                await self._wake.wait()
            item = self._items.popleft()
            if item is _CLOSE:
                break
            assert isinstance(item, bytes)
            if self._dead:
                continue
            self._busy = True
            try:
                await ws.send(item)
            finally:
                self._busy = False
        self._ws = None
        if not self._dead:
            if self._stop and self._garbage is None:
                await ws.send(to_json(Stop()))
            await ws.close(self._code)


class _Stage:
    """A hop (or the return) of one session: a `HopCore` whose emissions go out when due.

    No task per stage: feeding it emits what is due already (a zero-delay stage emits at once,
    in its feeder's call) and arms one loop timer for the next chunk (emissions are in due order),
    whose callback emits every chunk then due and arms the next. With `spin`, the timer fires
    `spin` early and the callback then yields to the loop until the due time (as `_sleep_until`).
    """

    def __init__(self, session: _Session, name: str, core: HopCore) -> None:
        self.session = session
        self.name = name
        self.core = core
        self._items: deque[Emission | _End] = deque()
        self._last_due = session.t0
        self._timer: asyncio.Handle | None = None
        self._done = False

    def feed(self, data: bytes, t: float) -> None:
        self._enqueue(self.core.push(data, t))

    def end(self, t: float) -> None:
        self._enqueue(self.core.finish(t))
        self._items.append(_End(t))
        self._release()

    def cancel(self) -> None:
        """Emit nothing more (the session is torn down)."""
        self._done = True
        self._items.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _enqueue(self, emissions: list[Emission]) -> None:
        for e in emissions:
            if len(self._items) >= MAX_PENDING:
                self.session.warn_once(
                    f"hop {self.name!r} holds {MAX_PENDING} chunks (is the client sending "
                    "faster than real time?); chunks dropped."
                )
                break
            self._items.append(e)
        if emissions:
            self._release()

    def _release(self) -> None:
        if self._timer is None and not self._done:
            self._run_due()

    def _run_due(self) -> None:
        self._timer = None
        pipeline = self.session.pipeline
        items = self._items
        try:
            while items and not self._done:
                item = items[0]
                if isinstance(item, _End):
                    items.popleft()
                    self._done = True
                    self._ended(max(item.t, self._last_due))
                    return
                wait = item.due - pipeline.clock()
                if wait > 0.0:
                    loop = asyncio.get_running_loop()
                    self._timer = (loop.call_later(wait - pipeline.spin, self._run_due)
                                   if wait > pipeline.spin else loop.call_soon(self._run_due))
                    return
                items.popleft()
                self._last_due = item.due
                self._emit(item)
        except Exception:
            log.error("session %s: hop %r failed", self.session.start.session, self.name,
                      exc_info=True)
            self.cancel()

    def _emit(self, item: Emission) -> None:
        raise NotImplementedError

    def _ended(self, t: float) -> None:
        raise NotImplementedError


class _Hop(_Stage):
    def __init__(self, session: _Session, spec: HopSpec, core: HopCore,
                 nxt: _Stage | _Text | _Bot,
                 fork: _Fork | None) -> None:
        super().__init__(session, spec.name, core)
        self.next = nxt
        self.fork = fork

    def _emit(self, item: Emission) -> None:
        if self.fork is not None:
            self.fork.send(item.data)
        observer = self.session.pipeline.observer
        if observer is not None:
            observer(self.session.start.session, self.name, item)
        self.next.feed(item.data, item.due)

    def _ended(self, t: float) -> None:
        if self.fork is not None:
            self.fork.finish(stop=not self.core.stalled)
        self.session.end_span(self.name, t, "the hop stalled" if self.core.stalled else None)
        self.next.end(t)


class _Return(_Stage):
    """The zero-delay stage that sends the audio back on the ingress connection: written at once
    while the socket keeps up (`_write_now`), else queued for its writer task (`run`), which
    also ends the connection after the last chunk."""

    def __init__(self, session: _Session, core: HopCore, ws: ServerConnection,
                 responder: TwilioResponder | None) -> None:
        super().__init__(session, "return", core)
        self.ws = ws
        self.responder = responder
        self._open = True
        self._out: deque[bytes | str | object] = deque()
        self._wake = asyncio.Event()
        self._busy = False

    def _emit(self, item: Emission) -> None:
        if not self._open:
            return
        message = item.data if self.responder is None else self.responder.media(item.data)
        if not self._out and not self._busy and _write_now(self.ws, message):
            return
        if len(self._out) >= MAX_PENDING:
            self.session.warn_once(f"the return holds {MAX_PENDING} chunks (is the client "
                                   "reading?); chunks dropped.")
            return
        self._out.append(message)
        self._wake.set()

    def _ended(self, t: float) -> None:
        self._out.append(_CLOSE)
        self._wake.set()

    async def run(self) -> None:
        while True:
            while not self._out:
                self._wake.clear()
                await self._wake.wait()
            item = self._out.popleft()
            if item is _CLOSE:
                with contextlib.suppress(ConnectionClosed):
                    if self._open and self.responder is None:
                        await self.ws.send(to_json(Stop()))
                    await self.ws.close(CLOSE_NORMAL)
                return
            assert isinstance(item, (bytes, str))
            if not self._open:
                continue
            self._busy = True
            try:
                await self.ws.send(item)
            except ConnectionClosed:
                self._open = False
            finally:
                self._busy = False


class _Text:
    """The text hop of one session: a `SpeechToTextCore` fed the audio that reaches it, and the
    task that sends its results on the ingress connection when due, then ends the connection."""

    def __init__(self, session: _Session, spec: HopSpec, in_format: AudioFormat,
                 ws: ServerConnection, twilio: bool) -> None:
        assert spec.text is not None
        self.session = session
        self.name = spec.name
        self.encoding = in_format.encoding
        self.core = SpeechToTextCore(
            spec.text, delay=spec.delay, rate=in_format.sample_rate,
            bank=SentenceBank.shipped(in_format.sample_rate),
            trace_id=session.start.traceparent.trace_id,
        )
        self.ws = ws
        self.twilio = twilio
        self._items: deque[TextResult | _End] = deque()
        self._wake = asyncio.Event()
        self._open = True

    def feed(self, data: bytes, t: float) -> None:
        self._enqueue(self.core.push(decode(data, self.encoding), t))

    def end(self, t: float) -> None:
        self._enqueue(self.core.finish(t))
        self._items.append(_End(t))
        self._wake.set()

    def _enqueue(self, results: list[TextResult]) -> None:
        if len(self._items) + len(results) > MAX_PENDING:
            self.session.warn_once(f"text hop {self.name!r} holds {MAX_PENDING} results; "
                                   "results dropped.")
            results = results[: max(0, MAX_PENDING - len(self._items))]
        self._items.extend(results)
        if results:
            self._wake.set()

    async def run(self) -> None:
        pipeline = self.session.pipeline
        while True:
            while not self._items:
                self._wake.clear()
                await self._wake.wait()
            item = self._items.popleft()
            if isinstance(item, _End):
                self.session.end_span(self.name, item.t, None)
                with contextlib.suppress(ConnectionClosed):
                    if self._open and not self.twilio:
                        await self.ws.send(to_json(Stop()))
                    await self.ws.close(CLOSE_NORMAL)
                return
            await _sleep_until(item.due, pipeline.clock, pipeline.spin)
            if self._open:
                try:
                    await self.ws.send(item.message)
                except ConnectionClosed:
                    self._open = False


class _Bot:
    """The reply hop of one session: a `ReplyBot` fed the audio that reaches it, and the task
    that sends the bot's frames (and Twilio marks and clears) on the ingress connection when
    due, then, once the stream ended and the last reply is out, ends the connection."""

    def __init__(self, session: _Session, spec: HopSpec, in_format: AudioFormat,
                 ws: ServerConnection, responder: TwilioResponder | None) -> None:
        assert spec.reply is not None
        self.session = session
        self.name = spec.name
        self.bot = ReplyBot(spec.reply, spec.delay, in_format, session.start.audio,
                            marks=responder is not None)
        self.ws = ws
        self.responder = responder
        self._wake = asyncio.Event()
        self._open = True
        self._end: float | None = None

    def feed(self, data: bytes, t: float) -> None:
        self.bot.push(data, t)
        self._wake.set()

    def end(self, t: float) -> None:
        self.bot.finish(t)
        self._end = t
        self._wake.set()

    async def run(self) -> None:
        pipeline = self.session.pipeline
        bot = self.bot
        loop = asyncio.get_running_loop()
        while not bot.done and self._open:  # a caller that hung up hears nothing more
            due = bot.next_due()
            if due is None or due - pipeline.clock() > pipeline.spin:
                # Sleep until the next output is due, or until new input may change what is.
                self._wake.clear()
                timeout = None if due is None else due - pipeline.clock() - pipeline.spin
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
                continue
            end = loop.time() + (due - pipeline.clock())
            while loop.time() < end:
                await asyncio.sleep(0)
            for out in bot.pop_due(max(due, pipeline.clock())):
                await self._send(out)
        ended = pipeline.clock() if self._end is None else max(self._end, pipeline.clock())
        self.session.end_span(self.name, ended, None)
        with contextlib.suppress(ConnectionClosed):
            if self._open and self.responder is None:
                await self.ws.send(to_json(Stop()))
            await self.ws.close(CLOSE_NORMAL)

    async def _send(self, out: BotOutput) -> None:
        if not self._open:
            return
        responder = self.responder
        try:
            if isinstance(out, BotAudio):
                await self.ws.send(out.data if responder is None else responder.media(out.data))
            elif responder is not None:
                await self.ws.send(responder.mark(out.name) if isinstance(out, BotMark)
                                   else responder.clear())
        except ConnectionClosed:
            self._open = False


class _Session:
    """One ingress stream through every hop."""

    def __init__(self, pipeline: ReferencePipeline, ws: ServerConnection, start: IngressStart,
                 t0: float, responder: TwilioResponder | None) -> None:
        self.pipeline = pipeline
        self.ws = ws
        self.start = start
        self.t0 = t0
        self.ended = False
        self.text: _Text | None = None
        self.bot: _Bot | None = None
        self._warned: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []
        sink = start.sink or pipeline.sink
        base = f"{pipeline.seed}/{start.session}"

        formats = [start.audio]
        for spec in pipeline.hops:
            formats.append(output_format(spec, formats[-1]))
        self.ret = _Return(
            self,
            HopCore(formats[-1], start.audio, t0=t0, seed=f"{base}/return",
                    frame_samples=None if responder is None else TWILIO_FRAME),
            ws, responder,
        )
        parent = start.traceparent
        contexts: list[TraceContext] = []
        # hop name -> its OTel span, while open (only with a tracer provider).
        self.otel_spans: dict[str, Span] = {}
        for spec in pipeline.hops:
            if pipeline.tracer is not None:
                from probe.telemetry.traces import start_child_span

                span, ctx = start_child_span(
                    pipeline.tracer, f"hop {spec.name}", parent, t0,
                    {"probe.session": start.session, "probe.hop": spec.name,
                     "probe.hop.delay_ms": round(spec.delay * 1000.0, 3)},
                )
                self.otel_spans[spec.name] = span
            else:
                ctx = child_context(parent)
            pipeline.spans.append(SpanRecord(start.session, spec.name, ctx.trace_id, ctx.span_id,
                                             parent.span_id))
            contexts.append(ctx)
            parent = ctx
        stages: list[_Hop] = []
        nxt: _Stage | _Text | _Bot = self.ret
        for i in reversed(range(len(pipeline.hops))):
            spec = pipeline.hops[i]
            seed = f"{base}/{i}/{spec.name}"
            if spec.text is not None:  # the last hop (check_hops): results replace the return
                nxt = self.text = _Text(self, spec, formats[i], ws, responder is not None)
                continue
            if spec.reply is not None:  # the last hop (check_hops): the bot replaces the return
                nxt = self.bot = _Bot(self, spec, formats[i], ws, responder)
                continue
            fork = None
            if sink is not None and spec.fork:
                if spec.garbage:
                    hello = "this is not JSON {"
                else:
                    hello = to_json(ForkStart(hop=spec.name, audio=formats[i + 1],
                                              session=start.session, traceparent=contexts[i],
                                              tracestate=start.tracestate))
                fork = _Fork(self, spec.name, hello,
                             random.Random(f"{seed}/garbage") if spec.garbage else None)
                self._spawn(fork.run(sink))
            core = HopCore(formats[i], formats[i + 1], t0=t0, seed=seed, spec=spec)
            nxt = _Hop(self, spec, core, nxt, fork)
            stages.append(nxt)
        self.hops = stages[::-1]
        self.first: _Stage | _Text | _Bot = nxt
        self.forks = [h.fork for h in self.hops if h.fork is not None]
        self._fork_tasks = list(self._tasks)
        self._spawn(self.bot.run() if self.bot is not None
                    else self.ret.run() if self.text is None else self.text.run())
        closers = [h for h in pipeline.hops if h.close_at is not None]
        if closers:
            first = min(closers, key=lambda h: h.close_at or 0.0)
            self._spawn(self._close_at(first))

    def _spawn(self, coro: Coroutine[object, object, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        self._tasks.append(task)
        return task

    def end_span(self, hop: str, t: float, error: str | None) -> None:
        """End hop's OTel span (if any, once) at `t` seconds, with ERROR status if `error`."""
        span = self.otel_spans.pop(hop, None)
        if span is None:
            return
        from opentelemetry.trace import Status, StatusCode

        from probe.telemetry.traces import to_ns

        if error is not None:
            span.set_status(Status(StatusCode.ERROR, error))
        span.end(end_time=to_ns(t))

    def warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            log.warning("session %s: %s", self.start.session, message)

    def feed(self, data: bytes, t: float) -> None:
        if not self.ended:
            self.first.feed(data, t)

    def end(self, t: float) -> None:
        if not self.ended:
            self.ended = True
            self.first.end(t)

    async def _close_at(self, spec: HopSpec) -> None:
        assert spec.close_at is not None
        await _sleep_until(self.t0 + spec.close_at, self.pipeline.clock, 0.0)
        log.info("session %s: hop %r closes the stream (close@%gs).", self.start.session,
                 spec.name, spec.close_at)
        self.ended = True
        for fork in self.forks:
            fork.finish(stop=False, code=CLOSE_INTERNAL)
        with contextlib.suppress(ConnectionClosed):
            await self.ws.close(CLOSE_INTERNAL,
                                f"hop {spec.name} failed (close@{spec.close_at:g}s)")
        for stage in (*self.hops, self.ret):
            stage.cancel()
        for task in self._tasks:
            if task is not asyncio.current_task() and task not in self._fork_tasks:
                task.cancel()

    async def wait(self, timeout: float) -> None:
        """Wait for the session to drain (every stage and fork done), then cancel leftovers."""
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            results = await asyncio.wait_for(
                asyncio.gather(*self._tasks, return_exceptions=True), timeout
            )
            for result in results:
                if isinstance(result, Exception):
                    log.error("session %s: a pipeline task failed", self.start.session,
                              exc_info=result)
        self.cancel()

    def cancel(self) -> None:
        for stage in (*self.hops, self.ret):
            stage.cancel()
        for task in self._tasks:
            task.cancel()
        if self.otel_spans:
            now = self.pipeline.clock()
            for hop in list(self.otel_spans):
                self.end_span(hop, now, "the session ended before this hop finished")


class ReferencePipeline:
    """A multi-hop real-time audio system under test, served on WebSockets.

    `hops` is a list of `HopSpec` or `--hops` text. `clock` stamps arrivals (seconds, the clock
    the probe's sink uses); `seed` makes jitter, loss, noise and garbage reproducible; `sink` is
    a fallback fork URL for sessions whose start names none; `spin` is explained in the module
    docstring. `spans` records each hop's span of each session (the latest `MAX_SPANS`).
    `observer(session, hop, emission)` is called as each hop emits a chunk: the ground truth
    (ideal due time, input time of its first sample) to hold measurements against. With a
    `tracer_provider`, each hop's span of each session is a real OTel span ("hop NAME", from the
    session's start to the hop's end, on `clock`), whose ids are the ones in `spans` and in the
    hop's fork `start`: a child of the ingress `traceparent` for the first hop, of the previous
    hop's span after that. Without one, no OTel code runs.
    """

    def __init__(
        self,
        hops: Sequence[HopSpec] | str,
        *,
        dialect: Dialect = "probe",
        clock: Callable[[], float] = time.time,
        seed: int | str = 0,
        sink: str | None = None,
        spin: float = 0.001,
        observer: Callable[[str, str, Emission], None] | None = None,
        tracer_provider: TracerProvider | None = None,
        idle_timeout: float | None = IDLE_TIMEOUT,
    ) -> None:
        self.hops: tuple[HopSpec, ...] = tuple(parse_hops(hops) if isinstance(hops, str) else hops)
        check_hops(self.hops)
        if dialect not in ("probe", "twilio"):
            raise ConfigError(f"The dialect must be 'probe' or 'twilio', got {dialect!r}.")
        if not 0.0 <= spin <= 0.01:
            raise ConfigError(f"spin must be from 0 to 0.01 seconds, got {spin!r}.")
        if idle_timeout is not None and not 0.0 < idle_timeout <= 86400.0:
            raise ConfigError(
                f"The idle timeout must be above 0 and at most 86400 seconds, got {idle_timeout!r}."
            )
        self.idle_timeout = idle_timeout
        self.dialect: Dialect = dialect
        self.clock = clock
        self.seed = str(seed)
        self.sink = sink
        self.spin = spin
        self.observer = observer
        self.tracer: Tracer | None = (
            tracer_provider.get_tracer("probe.pipeline") if tracer_provider is not None else None
        )
        self.spans: deque[SpanRecord] = deque(maxlen=MAX_SPANS)
        self.url: str | None = None
        self._server: Server | None = None
        self._sessions: set[_Session] = set()
        self._warned_sinks: set[str] = set()
        self._max_delay = sum(h.max_delay for h in self.hops)
        self._conns: set[_Conn] = set()
        self._watchdog: asyncio.Task[None] | None = None
        self.idle_closed = 0  # connections closed by the idle watchdog
        self._closing: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> ReferencePipeline:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on `host:port` (0: any free port); returns the ws:// URL actually bound."""
        if self._server is not None:
            raise ConfigError("This pipeline is already started; stop it first.")
        if self.hops and self.hops[-1].text is not None:
            for rate in (8000, 16000):  # load the text hop's sentences before any session waits
                SentenceBank.shipped(rate)
        last = self.hops[-1] if self.hops else None
        if last is not None and last.reply is not None:
            for rate in (8000, 16000):  # load and trim the reply before any session waits
                reply_clip(last.reply.say, rate)
        try:
            self._server = await serve(self._handler, host, port, compression=None,
                                       create_connection=server_factory(self.clock),
                                       close_timeout=_CLOSE_TIMEOUT)
        except OSError as exc:
            raise ConfigError(f"The pipeline cannot listen on {host}:{port} ({exc}).") from None
        bound = self._server.sockets[0].getsockname()
        shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        self.url = f"ws://{shown}:{bound[1]}/"
        if self.idle_timeout is not None:
            self._watchdog = asyncio.create_task(self._watch_idle(self.idle_timeout))
        log.info("reference pipeline (%s dialect, %d hops) listening on %s", self.dialect,
                 len(self.hops), self.url)
        return self.url

    async def stop(self) -> None:
        """Stop listening, cancel every session's tasks and close every connection."""
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        for session in list(self._sessions):
            session.cancel()
        server, self._server = self._server, None
        if server is not None:
            server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), _CLOSE_TIMEOUT + 1.0)

    def warn_sink(self, url: str, message: str) -> None:
        """Log `message` as a warning the first time `url` fails, at DEBUG after that."""
        level = logging.DEBUG if url in self._warned_sinks else logging.WARNING
        self._warned_sinks.add(url)
        log.log(level, "%s", message)

    async def _watch_idle(self, timeout: float) -> None:
        """Close connections silent for `timeout` (after stop: plus the session's drain time)."""
        drain = self._max_delay + _DRAIN_SLACK
        while True:
            await asyncio.sleep(min(0.5, timeout / 4))
            now = self.clock()
            for conn in list(self._conns):
                session = conn.session
                allowed = timeout + (drain if session is not None and session.ended else 0.0)
                if now - conn.last < allowed:
                    continue
                self._conns.discard(conn)
                self.idle_closed += 1
                if session is None:
                    reason = f"no start message within {timeout:g} s; send start first."
                else:
                    reason = f"nothing received for {timeout:g} s; the session is closed as idle."
                log.info("closing ingress from %s with %d: %s", conn.ws.remote_address,
                         CLOSE_POLICY, reason)
                task = asyncio.create_task(conn.ws.close(CLOSE_POLICY, reason))
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)

    async def _handler(self, ws: ServerConnection) -> None:
        receiver: IngressReceiver | TwilioReceiver = (
            TwilioReceiver() if self.dialect == "twilio" else IngressReceiver()
        )
        session: _Session | None = None
        conn = _Conn(ws, self.clock())
        self._conns.add(conn)
        try:
            async for message in ws:
                # Stamped when the bytes were read off the socket, not when this task resumed.
                t = ws.arrival() if isinstance(ws, StampedServerConnection) else self.clock()
                conn.last = max(conn.last, t)
                try:
                    if isinstance(message, str):
                        events = receiver.receive_text(message)
                    else:
                        events = receiver.receive_binary(message)
                    for event in events:
                        if isinstance(event, Started):
                            if session is None and self.hops and self.hops[0].refuse:
                                log.info("hop %r refuses session %s (refuse option).",
                                         self.hops[0].name, event.msg.session)
                                await ws.close(CLOSE_POLICY, f"hop {self.hops[0].name} "
                                               "refuses this stream (refuse option).")
                                return
                            if session is None:
                                session = conn.session = self._open(ws, receiver, event.msg, t)
                            elif event.msg.audio != session.start.audio:
                                raise ProtocolViolation(
                                    "the reference pipeline cannot change the audio format "
                                    "mid-stream; open a new connection.",
                                    close_code=CLOSE_UNSUPPORTED,
                                )
                        elif isinstance(event, Audio) and session is not None:
                            session.feed(event.data, t)
                        elif isinstance(event, Stopped) and session is not None:
                            session.end(t)
                except ProtocolError as exc:
                    violation = exc if isinstance(exc, ProtocolViolation) else ProtocolViolation(
                        str(exc))
                    log.info("closing ingress from %s with %d: %s", ws.remote_address,
                             violation.close_code, violation)
                    if session is not None:
                        session.end(self.clock())
                    await ws.close(violation.close_code, violation.reason)
                    return
        except ConnectionClosed:
            pass
        finally:
            self._conns.discard(conn)
            if session is not None:
                session.end(self.clock())
                try:
                    await session.wait(self._max_delay + _DRAIN_SLACK)
                finally:
                    session.cancel()
                    self._sessions.discard(session)

    def _open(self, ws: ServerConnection, receiver: IngressReceiver | TwilioReceiver,
              start: IngressStart, t: float) -> _Session:
        responder = None
        if isinstance(receiver, TwilioReceiver):
            assert receiver.stream_sid is not None
            responder = TwilioResponder(receiver.stream_sid)
        session = _Session(self, ws, start, t, responder)
        self._sessions.add(session)
        return session


async def run_pipeline(
    listen: str,
    hops: Sequence[HopSpec] | str,
    dialect: Dialect = "probe",
    *,
    seed: int | str = 0,
    sink: str | None = None,
    on_ready: Callable[[str], None] | None = None,
    tracer_provider: TracerProvider | None = None,
    observer: Callable[[str, str, Emission], None] | None = None,
    idle_timeout: float | None = IDLE_TIMEOUT,
) -> None:
    """Serve a reference pipeline on `listen` (HOST:PORT) until cancelled (the CLI's entry).

    `on_ready` gets the bound ws:// URL once the server listens; `tracer_provider` exports the
    hops' spans, `observer` hears every hop emission and `idle_timeout` closes silent
    connections (see `ReferencePipeline`).
    """
    host, port = parse_host_port(listen, "--listen")
    pipeline = ReferencePipeline(hops, dialect=dialect, seed=seed, sink=sink,
                                 tracer_provider=tracer_provider, observer=observer,
                                 idle_timeout=idle_timeout)
    url = await pipeline.start(host, port)
    if on_ready is not None:
        on_ready(url)
    try:
        while True:  # a long-running server: freed heap pages go back to the OS once a minute
            await asyncio.sleep(TRIM_EVERY_S)
            collect_and_trim()
    finally:
        await pipeline.stop()
