"""Locust users that run probe sessions: closed-loop :class:`AudioProbeUser` and open-model
:class:`OpenAudioProbeUser`.

Each user streams real-time audio with markers to ``--host`` (a ``ws://`` URL, ``{session}``
replaced by the session id) through the process's engine (:mod:`probe.locust.engine`): the same
carrier, embedder, registry, detector and join as ``probe run``. Besides the entries of
:mod:`probe.locust.report`, the user fires

- ``session`` / ``connect``: the WebSocket connect time, or a failure (refused, unreachable);
- ``session`` / ``stream``: the session's duration, or a failure with the reason it ended early;
- ``session`` / ``start`` (open model only): a failure for every session that could not start in
  time.

The closed loop runs one session after another per user, which hides overload: a slow target
just gets fewer sessions. The open model starts sessions at a fixed rate whatever happens to the
earlier ones, measures latency from each frame's *intended* send time, and counts the sessions
that could not start within ``start_slack_s`` of their scheduled time (or beyond
``max_in_flight``) instead of quietly starting them later.
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Any, ClassVar

import gevent
from gevent.pool import Group
from locust import User, constant, task
from locust.exception import StopUser

from probe.config import OPTIONS, conversation, count_env, locust_env, positive_env
from probe.errors import ConfigError
from probe.locust.plugin import engine_of
from probe.locust.report import fire
from probe.locust.session import SessionOutcome, run_session
from probe.session.core import SourceConfig
from probe.watermark.design import DEFAULT_LEVEL_DB

__all__ = ["AudioProbeUser", "OpenAudioProbeUser"]


class LateStart(Exception):
    """An open-model session that could not start in time."""


class SessionFailed(Exception):
    """A session that could not connect or ended early."""


class AudioProbeUser(User):
    """Runs probe sessions back to back (closed loop). Subclass it and set the attributes."""

    abstract = True
    wait_time = constant(0)

    dialect: ClassVar[str] = "probe"
    fixture: ClassVar[str] = "speech_en_us"
    sample_rate: ClassVar[int] = 16000
    encoding: ClassVar[str] = "pcm_s16le"
    frame_ms: ClassVar[float] = 20.0
    session_s: ClassVar[float] = 10.0
    every_s: ClassVar[float] = 0.5
    level_db: ClassVar[float] = DEFAULT_LEVEL_DB
    # Reply mode: the system answers in its own voice (see probe run --reply).
    reply: ClassVar[bool] = False
    utterance_s: ClassVar[float] = 3.0
    gap_s: ClassVar[float] = 3.0
    reply_threshold_dbfs: ClassVar[float] = -40.0
    # Barge-in (reply mode): seconds into each reply to speak again (see probe run --barge-in).
    barge_in_s: ClassVar[float | None] = None
    # Text results: the target's JSON result shape (see probe run --results).
    results: ClassVar[str | None] = None
    result_fields: ClassVar[str | None] = None
    meta: ClassVar[dict[str, str]] = {}
    # CA bundle (PEM) a wss:// host is checked against; None: the system's trust store.
    ca_file: ClassVar[str | None] = None
    connect_timeout_s: ClassVar[float] = 5.0
    # Pause after a session that could not connect, so a down target is not hammered.
    retry_pause_s: ClassVar[float] = 1.0

    def __init__(self, environment: Any) -> None:
        super().__init__(environment)
        self._source: SourceConfig | None = None

    def source_config(self) -> SourceConfig:
        """The session template: ``PROBE_*`` variables over this class's attributes
        (:func:`probe.config.locust_env`), the host, and the engine's sink."""
        if self._source is None:
            host = self.host or ""
            if not host.startswith(("ws://", "wss://")):
                raise ConfigError(f"The host must be a ws:// or wss:// URL, got {host!r}.")
            engine = engine_of(self.environment)
            names = {o.locust for o in OPTIONS if o.locust}
            o = locust_env(os.environ, {n: getattr(self, n) for n in names if hasattr(self, n)})
            conversation(o)
            self._source = SourceConfig(
                target=host,
                dialect=o["dialect"],
                fixture=o["fixture"],
                rate=o["rate"],
                encoding=o["encoding"],
                frame_ms=o["frame_ms"],
                duration_s=o["duration"],
                every_s=o["every"],
                level_db=o["level"],
                sink_url=engine.sink_url,
                meta=dict(self.meta),
                connect_timeout_s=self.connect_timeout_s,
                reply=o["reply"],
                utterance_s=o["utterance"],
                gap_s=o["gap"],
                reply_threshold_dbfs=o["reply_threshold"],
                barge_in_s=o.get("barge_in"),
                results=o.get("results"),
                result_fields=o.get("result_fields"),
                settle_s=engine.cfg.marker_timeout_s,
                ca_file=o.get("ca"),
            )
        return self._source

    def _config_or_stop(self) -> SourceConfig:
        try:
            return self.source_config()
        except ConfigError as exc:
            self._fire("session", "connect", 0.0, SessionFailed(str(exc)))
            raise StopUser() from exc

    def _fire(self, kind: str, name: str, ms: float, exc: Exception | None) -> None:
        fire(self.environment.events, kind, name, ms, exc)

    def probe_session(
        self, *, intended_start: float | None = None, from_intended: bool = False
    ) -> SessionOutcome:
        """Run one session and fire its session entries."""
        cfg = self._config_or_stop()
        engine = engine_of(self.environment)
        out = run_session(
            cfg,
            engine,
            session=uuid.uuid4().hex,
            intended_start=intended_start,
            from_intended=from_intended,
            on_connect=self._connected,
        )
        if out.connect_s is not None:
            self._fire(
                "session",
                "stream",
                out.duration_s * 1000.0,
                SessionFailed(out.error) if out.error else None,
            )
        return out

    def _connected(self, out: SessionOutcome) -> None:
        if out.connect_s is None:
            self._fire("session", "connect", 0.0, SessionFailed(out.error or "not connected"))
        else:
            self._fire("session", "connect", out.connect_s * 1000.0, None)

    @task
    def stream(self) -> None:
        out = self.probe_session()
        if out.connect_s is None:
            gevent.sleep(self.retry_pause_s)


class OpenAudioProbeUser(AudioProbeUser):
    """Starts sessions at ``sessions_per_s`` (per user; ``PROBE_SESSION_RATE`` overrides)
    whatever happened to the earlier ones (open model), at most ``max_in_flight`` at once
    (``PROBE_MAX_IN_FLIGHT``)."""

    abstract = True
    sessions_per_s: ClassVar[float] = 1.0
    max_in_flight: ClassVar[int] = 1000
    start_slack_s: ClassVar[float] = 0.5

    def __init__(self, environment: Any) -> None:
        super().__init__(environment)
        self._sessions = Group()

    def rate(self) -> float:
        return positive_env(os.environ, "PROBE_SESSION_RATE", float(self.sessions_per_s))

    def in_flight_limit(self) -> int:
        return count_env(os.environ, "PROBE_MAX_IN_FLIGHT", int(self.max_in_flight))

    def on_stop(self) -> None:
        self._sessions.kill(block=False)

    def _one(self, due: float) -> None:
        self.probe_session(intended_start=due, from_intended=True)

    @task
    def stream(self) -> None:
        self._config_or_stop()
        try:
            rate = self.rate()
            limit = self.in_flight_limit()
        except ConfigError as exc:
            self._fire("session", "start", 0.0, LateStart(str(exc)))
            raise StopUser() from exc
        engine = engine_of(self.environment)
        t0 = time.monotonic()
        k = 0
        while True:
            due = t0 + k / rate
            k += 1
            delay = due - time.monotonic()
            if delay > 0:
                gevent.sleep(delay)
            late = time.monotonic() - due
            if late > self.start_slack_s:
                engine.late_starts += 1
                self._fire(
                    "session",
                    "start",
                    late * 1000.0,
                    LateStart(f"could not start within {self.start_slack_s:g} s of schedule"),
                )
                continue
            if len(self._sessions) >= limit:
                engine.late_starts += 1
                self._fire(
                    "session",
                    "start",
                    late * 1000.0,
                    LateStart(f"{limit} sessions already in flight"),
                )
                continue
            self._sessions.spawn(self._one, due)


# Locust adds a base class's @task methods to a subclass's even when overridden, so without this
# an open-model user would run the closed loop's task half the time.
OpenAudioProbeUser.tasks = [OpenAudioProbeUser.stream]
