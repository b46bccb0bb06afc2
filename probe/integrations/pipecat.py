"""Fork the audio passing any point of a Pipecat pipeline to the probe's sink.

:class:`ProbeTapProcessor` is a Pipecat ``FrameProcessor``: put one wherever the audio should be
measured (after ``transport.input()``, after a denoiser, before the TTS audio reaches
``transport.output()``). It passes every frame on, unchanged, in Pipecat's direct mode (no queue
or task hop of its own), and only then hands an audio frame's bytes to a :class:`probe.tap.Tap`,
which queues them for a writer task that sends them to the sink: the audio path never waits for
the fork (handed over first, a frame could wait for the fork's send whenever the push yields to
the event loop; measured, benchmarks/pipecat_tap_cost.py)::

    from pipecat.runner.utils import parse_telephony_websocket
    from probe.integrations.pipecat import ProbeTapProcessor

    _, call_data = await parse_telephony_websocket(websocket)   # Twilio's connected + start
    pipeline = Pipeline([
        transport.input(),
        ProbeTapProcessor(hop="bot.in", frames="input", context=call_data),
        stt, llm, tts,
        ProbeTapProcessor(hop="bot.tts", context=call_data),   # frames="output"
        transport.output(),
    ])

The session, trace context and sink come from ``context``: Pipecat's ``CallData`` (its ``body`` is
the Twilio start's ``customParameters``, where ``probe run --dialect twilio`` puts ``session``,
``traceparent`` and ``sink``), the start message itself (Twilio or probe dialect, text or
parsed), a ``customParameters`` mapping, or a :class:`probe.tap.ForkContext`. What it does not
name is taken from the current OpenTelemetry span (:func:`probe.tap.from_otel`) when the fork
opens. The start's ``sink`` wins over ``sink_url``, which is used when the start names none, so
that a probe's markers come back to the sink of the probe that sent them.

Each fork states the frames' own format (PROTOCOL.md 2): ``pcm_s16le`` at ``frame.sample_rate``
with ``frame.num_channels``; a frame in another format starts a new fork stream. The fork opens at
the first audio frame and ends (``stop``, normal close) when an ``EndFrame`` or ``CancelFrame``
passes, or at the processor's cleanup.

Which frames are forked: ``frames="output"`` (the default) forks ``OutputAudioRawFrame`` and its
kinds (``TTSAudioRawFrame``, ...), ``frames="input"`` forks ``InputAudioRawFrame`` (what the
transport received, after its filters and VAD). Only frames travelling downstream are forked.
Both kinds can pass one point (speech-to-text passes the input audio on), so the choice is
explicit; a tap that forked nothing while the other kind passed says so in a warning at the end.

Nothing is raised into the pipeline: a missing sink or a format the contract does not allow is
logged once (``probe.tap`` logger) and that stream is not forked.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal

from probe.tap import DEFAULT_MAX_LAG_S, DEFAULT_QUEUE_S, ForkContext, Tap, TapStats, from_otel
from probe.tap.context import from_start
from probe.tap.core import check_sink_url

try:
    from pipecat.frames.frames import (
        CancelFrame,
        EndFrame,
        Frame,
        InputAudioRawFrame,
        OutputAudioRawFrame,
    )
    from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
except ImportError as exc:  # pragma: no cover - the message is the point
    raise ImportError(
        "probe.integrations.pipecat needs Pipecat: pip install 'probe[pipecat]' "
        f"(pipecat-ai) ({exc})"
    ) from exc

__all__ = ["ProbeTapProcessor", "fork_context"]

log = logging.getLogger("probe.tap")

FrameKind = Literal["input", "output"]


def fork_context(source: object) -> ForkContext:
    """What ``source`` says of the stream: session, trace context and sink.

    ``source`` may be Pipecat's ``CallData`` (or the dict older Pipecat returned from
    ``parse_telephony_websocket``, with ``stream_id`` and ``body``), a start message (Twilio
    ``{"event": "start", ...}`` or probe ``{"type": "start", ...}``, as text, bytes or a
    mapping), the ``customParameters`` mapping alone, a :class:`ForkContext`, or None (nothing
    known). Values that are not valid are left out (see ``notes``); a ``source`` of none of these
    kinds raises ValueError, since that is the bot's setup, not its audio path."""
    if source is None:
        return ForkContext()
    if isinstance(source, ForkContext):
        return source
    if isinstance(source, str | bytes | bytearray | memoryview):
        ctx = from_start(bytes(source) if not isinstance(source, str) else source)
        if ctx is None:
            raise ValueError(
                "context text is not a start message (Twilio {'event': 'start'} or probe "
                "{'type': 'start'})."
            )
        return ctx
    stream_sid: object = None
    if isinstance(source, Mapping):
        if "event" in source or "type" in source:
            ctx = from_start(source)
            if ctx is None:
                raise ValueError(
                    "context mapping is not a start message (Twilio {'event': 'start'} or "
                    "probe {'type': 'start'})."
                )
            return ctx
        body = source.get("body")
        if isinstance(body, Mapping):  # the dict form of Pipecat's call data
            stream_sid = source.get("stream_id")
        else:
            body = source  # customParameters themselves
    else:
        body = getattr(source, "body", None)  # Pipecat's CallData
        if not isinstance(body, Mapping):
            raise ValueError(
                "context must be Pipecat's CallData, a start message, its customParameters or "
                f"a probe.tap.ForkContext, not {type(source).__name__}."
            )
        stream_sid = getattr(source, "stream_id", None)
    start: dict[str, object] = {"customParameters": dict(body)}
    if isinstance(stream_sid, str):
        start["streamSid"] = stream_sid
    ctx = from_start({"event": "start", "start": start})
    return ctx if ctx is not None else ForkContext()


class ProbeTapProcessor(FrameProcessor):
    """A Pipecat frame processor that forks the audio frames passing it to the probe's sink as
    hop ``hop`` and passes every frame on unchanged (module docstring).

    ``sink_url``: the sink to use when the context names none. ``context``: where the session,
    trace context and sink come from (:func:`fork_context`; :meth:`set_context` gives it later).
    ``frames``: ``"output"`` or ``"input"`` audio frames. ``queue_s`` and ``max_lag_s`` are the
    tap's (:class:`probe.tap.Tap`): at most that much audio waits for the socket, and a frame
    that waited longer than ``max_lag_s`` is dropped rather than sent late. Other keyword
    arguments go to ``FrameProcessor``. A bad hop name, URL or option raises ValueError here.
    """

    def __init__(
        self,
        *,
        hop: str,
        sink_url: str | None = None,
        context: object = None,
        frames: FrameKind = "output",
        queue_s: float = DEFAULT_QUEUE_S,
        max_lag_s: float = DEFAULT_MAX_LAG_S,
        clock: Callable[[], float] = time.monotonic,
        logger: logging.Logger | None = None,
        rng: random.Random | None = None,
        **kwargs: Any,
    ) -> None:
        if frames not in ("input", "output"):
            raise ValueError(f"frames must be 'input' or 'output', got {frames!r}.")
        tap = Tap(
            None,
            hop=hop,
            queue_s=queue_s,
            max_lag_s=max_lag_s,
            clock=clock,
            logger=logger,
            rng=rng,
        )
        sink = None if sink_url is None else check_sink_url(sink_url)
        ctx = fork_context(context)
        kwargs.setdefault("enable_direct_mode", True)
        super().__init__(**kwargs)
        self._tap = tap
        self._log = logger or log
        self._sink_url = sink
        self._context = ctx
        self._frames: FrameKind = frames
        self._kind: type[Any] = InputAudioRawFrame if frames == "input" else OutputAudioRawFrame
        self._other: type[Any] = OutputAudioRawFrame if frames == "input" else InputAudioRawFrame
        self._format: tuple[int, int] | None = None
        self._others_seen = 0
        self._warned: set[str] = set()

    @property
    def hop(self) -> str:
        return self._tap.hop

    @property
    def context(self) -> ForkContext:
        """What the processor was told of the stream (before any OpenTelemetry fallback)."""
        return self._context

    @property
    def stats(self) -> TapStats:
        """The tap's counts so far: frames written, sent and dropped (and why)."""
        return self._tap.stats

    def set_context(self, context: object) -> None:
        """Name the stream now (anything :func:`fork_context` takes); the current fork stream,
        if any, ends and the next audio frame opens one with this context."""
        self._context = fork_context(context)
        self._format = None
        self._tap.close()

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        await self.push_frame(frame, direction)  # first: the fork never holds the frame up
        if isinstance(frame, self._kind):
            if direction is FrameDirection.DOWNSTREAM:
                fmt = (frame.sample_rate, frame.num_channels)
                if fmt != self._format:
                    self._format = fmt
                    self._open(fmt)
                self._tap.write(frame.audio)
        elif isinstance(frame, EndFrame | CancelFrame):
            self._end()
        elif isinstance(frame, self._other):
            self._others_seen += 1

    async def cleanup(self) -> None:
        await super().cleanup()
        self._end()
        await self._tap.wait_closed(timeout=1.0)

    def _open(self, fmt: tuple[int, int]) -> None:
        ctx = self._context
        if ctx.session is None or ctx.traceparent is None:
            ctx = ctx.merged(from_otel())
        for note in ctx.notes:
            self._warn_once(f"note:{note}", f"tap of hop {self.hop!r}: {note}.")
        sink = ctx.sink if ctx.sink is not None else self._sink_url
        if sink is None:
            self._warn_once(
                "sink",
                f"tap of hop {self.hop!r} forks nothing: no sink URL in its context (the start's "
                "customParameters.sink) and none given as sink_url.",
            )
            self._tap.close()
            return
        rate, channels = fmt
        try:
            self._tap.open(
                ctx.session,
                ctx.hop_traceparent(),
                {"encoding": "pcm_s16le", "sample_rate": rate, "channels": channels},
                tracestate=ctx.tracestate,
                sink=sink,
            )
        except ValueError as exc:
            self._tap.close()
            self._warn_once(
                f"format:{fmt}", f"tap of hop {self.hop!r} cannot fork this stream: {exc}"
            )

    def _end(self) -> None:
        if self._tap.is_open:
            self._tap.close()
        if self._others_seen and not self._tap.stats.frames_written:
            other = "output" if self._frames == "input" else "input"
            self._warn_once(
                "kind",
                f"tap of hop {self.hop!r} forked no audio: it forks {self._frames} audio frames, "
                f"and {self._others_seen} {other} audio frames passed it (frames={other!r} "
                "forks those).",
            )

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            self._log.warning("%s", message)
