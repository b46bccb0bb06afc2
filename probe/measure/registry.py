"""The session registry: which marker was sent when, and what each hop's sink saw of it.

The source side opens a session (getting the 24-bit token its markers carry), asks for each
marker's payload and records its send time; the sink side reports detections (hop, payload,
arrival time). The registry joins the two into :class:`Measurement` s and, once a marker has waited
``marker_timeout`` seconds on a hop that should have seen it, into :class:`Missed` records.

Every marker sent in a session is owed to every hop the session expects: the configured
``expected_hops`` plus any hop that connected or was detected for that session (a hop that joins
late is owed the markers sent before it joined too). Per hop, at any time::

    sent == detected + missed + pending

A detection after its marker was declared missed is counted as ``late`` and changes nothing else.
Payloads that resolve to no session or no sent marker are counted per hop as ``unmatched``, never
raised: a sink sees other runs' and corrupted audio.

Time comes from the injected ``clock`` (seconds, the same clock as the send times) and nowhere else.
One lock, given by the shell that runs the source and the sink on different threads, guards all
state (without one, calls must come from one thread).
"""

from __future__ import annotations

import bisect
import hashlib
import hmac
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from probe.errors import ConfigError
from probe.measure.conversation import ConversationLog, Figure, ResultTiming, WordErrors
from probe.measure.spool import SERIES_DTYPE, Spool
from probe.measure.stats import LatencyStats
from probe.watermark.design import PAYLOAD_BYTES, session_payload, split_session_payload

if TYPE_CHECKING:
    from probe.measure.health import GeneratorHealth
    from probe.measure.observe import RunObserver
    from probe.protocol import TraceContext

# Without history, the latest this many session errors and this many per hop are kept.
MAX_ERRORS = 1000

__all__ = [
    "NEGATIVE_TOLERANCE_S",
    "TOKEN_BITS",
    "ErrorNote",
    "HopCounts",
    "MAX_ERRORS",
    "Measurement",
    "Missed",
    "SessionCounts",
    "SeriesRecords",
    "SessionRegistry",
    "token_for",
]

TOKEN_BITS = 24
MARKER_BITS = 8
_MARKER_MASK = (1 << MARKER_BITS) - 1
# A detection may arrive slightly "before" its send when send and arrival times are stamped at
# frame granularity on different threads; beyond this it belongs to no send.
NEGATIVE_TOLERANCE_S = 0.05


def token_for(session_id: str, attempt: int = 0, key: bytes | None = None) -> int:
    """Candidate number ``attempt`` of a session's 24-bit token: sha256 of the session id, or,
    with a (per-run, secret) ``key``, its HMAC-SHA256, so that a session id alone does not give
    away the markers a run will look for."""
    data = session_id.encode("utf-8")
    if attempt:
        data += b"\x00" + str(attempt).encode("ascii")
    digest = (
        hmac.new(key, data, hashlib.sha256).digest() if key else hashlib.sha256(data).digest()
    )
    return int.from_bytes(digest[:3], "big")


@dataclass(frozen=True, slots=True)
class Measurement:
    """One marker seen on one hop: cumulative latency = arrival_time - send_time (seconds)."""

    hop: str
    session: str
    seq: int
    send_time: float
    arrival_time: float
    latency_s: float
    score: float


@dataclass(frozen=True, slots=True)
class Missed:
    """A marker a hop owed and did not deliver within the marker timeout (or by the run's end)."""

    hop: str
    session: str
    seq: int
    send_time: float
    # The generator was overloaded while the marker was owed (probe.measure.health): whether the
    # target lost it is unknown, so it is counted as unmeasured, not missed.
    unmeasured: bool = False


@dataclass(frozen=True, slots=True)
class ErrorNote:
    """A failure with its reason; ``session`` is None for a hop failure outside any session.

    Failures outside any session with the same reason are one note, ``count`` of them (hundreds
    of idle connections that never said which session they serve are one line, not hundreds).
    """

    session: str | None
    error: str
    count: int = 1

    def as_dict(self) -> dict[str, str | int | None]:
        out: dict[str, str | int | None] = {"session": self.session, "error": self.error}
        if self.count > 1:
            out["count"] = self.count
        return out


@dataclass(frozen=True, slots=True)
class HopCounts:
    """Marker accounting of one hop; ``sent == detected + missed + unmeasured + pending``
    always (unmeasured: owed while the generator was overloaded, see probe.measure.health)."""

    sent: int
    detected: int
    missed: int
    pending: int
    duplicates: int
    unmatched: int
    late: int = 0
    unmeasured: int = 0


@dataclass(frozen=True, slots=True)
class SessionCounts:
    """Session accounting: ``started == completed + failed + open``."""

    started: int
    completed: int
    failed: int
    open: int
    errors: tuple[ErrorNote, ...]


@dataclass(slots=True)
class _HopTally:
    sent: int = 0
    detected: int = 0
    missed: int = 0
    duplicates: int = 0
    unmatched: int = 0
    late: int = 0
    unmeasured: int = 0


class _Session:
    __slots__ = (
        "closed_at",
        "failed",
        "hops",
        "id",
        "last_activity",
        "number",
        "opened",
        "seen",
        "pending",
        "sends",
        "times_by_marker",
        "seqs_by_marker",
        "silent",
        "stalled",
        "token",
    )

    def __init__(self, session_id: str, token: int, now: float, number: int) -> None:
        self.id = session_id
        self.number = number  # its index in the registry's session names (series records)
        self.token = token
        self.last_activity = now
        self.opened = now
        self.closed_at: float | None = None
        self.failed = False
        self.sends: dict[int, float] = {}
        # Per 8-bit marker number, the seqs sharing it, sorted by send time (parallel lists).
        self.times_by_marker: dict[int, list[float]] = {}
        self.seqs_by_marker: dict[int, list[int]] = {}
        self.hops: list[str] = []
        # hop -> arrival of the last frame of its fork before it went silent (while it is)
        self.silent: dict[str, float] = {}
        self.stalled: set[str] = set()  # hops named stalled in their current silence
        # hop -> seq -> send time, for markers owed and not yet settled (insertion = send order).
        self.pending: dict[str, dict[int, float]] = {}
        # hop -> seqs detected (in time or late), to tell repeats.
        self.seen: dict[str, set[int]] = {}

    def settled(self) -> bool:
        return not any(self.pending.values())


class SessionRegistry:
    """Sessions, marker sends and per-hop detections joined into latencies (module docstring)."""

    def __init__(
        self,
        *,
        clock: Callable[[], float],
        marker_timeout: float = 10.0,
        session_ttl: float = 60.0,
        expected_hops: Sequence[str] = (),
        observer: RunObserver | None = None,
        lock: AbstractContextManager[Any] | None = None,
        history: bool = True,
        health: GeneratorHealth | None = None,
        key: bytes | None = None,
    ) -> None:
        """``lock`` guards every method: a shell that calls the registry from several threads
        (the event loop and a detection thread) passes one (``threading.Lock()``).

        ``history`` keeps what a finished run's report lists (every measurement and miss, every
        send lag and reply latency, every error). A long-running load test (Locust) passes
        False: observers still hear everything as it happens and the counts stay exact, but
        nothing grows with the run's length (errors keep the latest ``MAX_ERRORS``).

        ``health`` watches the generator itself: it hears every frame's send lag (and what the
        shell reports of detection delay and CPU), is judged at every :meth:`expire`, and a
        marker owed while it said "overloaded" is counted unmeasured instead of missed.

        ``key`` (a run's own random secret) keys the sessions' marker tokens (HMAC, see
        :func:`token_for`): without it a token is the session id's hash."""
        if not marker_timeout > 0:
            raise ConfigError(f"marker_timeout must be positive seconds, got {marker_timeout}.")
        if not session_ttl > 0:
            raise ConfigError(f"session_ttl must be positive seconds, got {session_ttl}.")
        if isinstance(expected_hops, str):
            raise ConfigError("expected_hops is a sequence of hop names, not one string.")
        for hop in expected_hops:
            _check_hop(hop)
        self._clock = clock
        # Told of every change after the lock is released (see probe.measure.observe).
        self.observer = observer
        self.marker_timeout = float(marker_timeout)
        self.session_ttl = float(session_ttl)
        self.expected_hops: tuple[str, ...] = tuple(dict.fromkeys(expected_hops))
        self._lock: AbstractContextManager[Any] = lock if lock is not None else nullcontext()
        self._sessions: dict[str, _Session] = {}
        self._by_token: dict[int, _Session] = {}
        self._tally: dict[str, _HopTally] = {h: _HopTally() for h in self.expected_hops}
        # Per hop, in order of first occurrence: a session's failure under a running number, a
        # failure outside any session under its reason (so repeats add to its count).
        self._hop_errors: dict[str, dict[int | str, ErrorNote]] = {}
        self._error_seq = 0
        self._started = 0
        self._completed = 0
        self._failed = 0
        self.history = history
        self._session_errors: deque[ErrorNote] = deque(maxlen=None if history else MAX_ERRORS)
        # With history, what the report lists is spooled as compact records (probe.measure.spool):
        # memory stays flat however long the run.
        self._send_lag = Spool(np.float64)
        self._reply: list[float] = []
        self._reply_missed = 0
        self.conversation = ConversationLog(history=history)
        self._series = Spool(SERIES_DTYPE)
        self._hop_names: list[str] = []
        self._hop_numbers: dict[str, int] = {}
        self._session_names: list[str] = []
        self._send_listeners: list[Callable[[str, bytes, float, float], None]] = []
        self.health = health
        self._key = key
        self._rejected: dict[str, int] = {}

    # -- sessions -------------------------------------------------------------------------------

    def open_session(self, session_id: str) -> int:
        """Start a session; returns its 24-bit token, unique among the sessions held."""
        if not session_id:
            raise ConfigError("A session id must be a non-empty string.")
        with self._lock:
            now = self._clock()
            if session_id in self._sessions:
                raise ConfigError(
                    f"Session {session_id!r} is already open (or recently closed); "
                    "session ids must be unique within a run."
                )
            attempt = 0
            token = token_for(session_id, 0, self._key)
            while token in self._by_token:
                attempt += 1
                token = token_for(session_id, attempt, self._key)
            s = _Session(session_id, token, now, len(self._session_names))
            if self.history:
                self._session_names.append(session_id)
            self._sessions[session_id] = s
            self._by_token[token] = s
            self._started += 1
            for hop in self.expected_hops:
                self._expect(s, hop)
            return token

    def token_of(self, session_id: str) -> int:
        """The token of a session held by the registry."""
        with self._lock:
            return self._get(session_id).token

    def close_session(self, session_id: str, *, error: str | None = None) -> None:
        """End a session: completed, or failed with ``error``. Its pending markers still settle."""
        with self._lock:
            s = self._get(session_id)
            now = self._clock()
            first = s.closed_at is None
            if first:
                s.closed_at = now
                s.last_activity = now
                if error is None:
                    self._completed += 1
                else:
                    self._fail(s, error, newly=True)
            elif error is not None:
                self._fail(s, error, newly=False)
        if self.observer is not None and (first or error is not None):
            self.observer.session_ended(session_id, now, error)

    def session_failed(self, session_id: str, error: str) -> None:
        """Record a failed session, opened or not (e.g. the connection was refused)."""
        with self._lock:
            now = self._clock()
            s = self._sessions.get(session_id)
            if s is None:
                self._started += 1
                self._failed += 1
                self._session_errors.append(ErrorNote(session_id, error))
            elif s.closed_at is None:
                s.closed_at = now
                s.last_activity = now
                self._fail(s, error, newly=True)
            else:
                self._fail(s, error, newly=False)
        if self.observer is not None:
            self.observer.session_ended(session_id, now, error)

    def _fail(self, s: _Session, error: str, *, newly: bool) -> None:
        self._session_errors.append(ErrorNote(s.id, error))
        if newly:
            self._failed += 1
        elif not s.failed:
            # A session that closed cleanly and then reported a failure counts as failed.
            self._completed -= 1
            self._failed += 1
        s.failed = True

    def _get(self, session_id: str) -> _Session:
        s = self._sessions.get(session_id)
        if s is None:
            raise ConfigError(f"Unknown session {session_id!r}: open it first.")
        return s

    # -- the source side ------------------------------------------------------------------------

    def payload_for(self, session_id: str, seq: int) -> bytes:
        """The 4-byte marker payload of marker ``seq`` of a session (token + low 8 bits of seq)."""
        _check_seq(seq)
        with self._lock:
            return session_payload(self._get(session_id).token, seq & _MARKER_MASK)

    def add_send_listener(self, listener: Callable[[str, bytes, float, float], None]) -> None:
        """Call ``listener(session, payload, send_time, deadline)`` after every marker send (the
        deadline is the send time plus the marker timeout): what informed detection looks for."""
        self._send_listeners.append(listener)

    def record_send(self, session_id: str, seq: int, send_time: float) -> None:
        """Marker ``seq`` left the probe: ``send_time`` is the send time of its first sample."""
        _check_seq(seq)
        with self._lock:
            s = self._get(session_id)
            if seq in s.sends:
                raise ConfigError(f"Marker {seq} of session {session_id!r} was already sent.")
            s.sends[seq] = send_time
            m8 = seq & _MARKER_MASK
            times = s.times_by_marker.setdefault(m8, [])
            seqs = s.seqs_by_marker.setdefault(m8, [])
            i = bisect.bisect_right(times, send_time)
            times.insert(i, send_time)
            seqs.insert(i, seq)
            s.last_activity = self._clock()
            for hop in s.hops:
                s.pending[hop][seq] = send_time
                self._tally[hop].sent += 1
            payload = session_payload(s.token, m8)
        for listener in self._send_listeners:
            listener(session_id, payload, send_time, send_time + self.marker_timeout)

    def record_send_lag(self, session_id: str, lag_s: float) -> None:
        """How late a frame was handed to the socket (actual minus due send time, seconds)."""
        with self._lock:
            s = self._sessions.get(session_id)
            if s is not None:
                s.last_activity = self._clock()
            if self.history:
                self._send_lag.append(lag_s)
            if self.health is not None:
                self.health.frame_lag(self._clock(), lag_s)
        if self.observer is not None:
            self.observer.send_lag(session_id, lag_s)

    def record_detection_delay(self, delay_s: float) -> None:
        """The sink searched audio that had waited ``delay_s`` since it arrived."""
        if self.health is not None:
            with self._lock:
                self.health.detection_delay(self._clock(), delay_s)

    def record_backlog(self, queued_bytes: int, bound_bytes: int) -> None:
        """Audio queued for the sink child reached its bound: the child is not keeping up."""
        if self.health is not None:
            with self._lock:
                self.health.backlog(self._clock(), queued_bytes, bound_bytes)

    def record_heard(self, who: str | None = None, *, gone: str | None = None) -> None:
        """Process ``who`` (``sink``) reported its health; ``gone``: it was stopped as asked."""
        if self.health is not None:
            with self._lock:
                self.health.heard(self._clock(), who, gone=gone)

    def record_dead(self, who: str) -> None:
        """Process ``who`` (``sink``) died: the generator is overloaded for the rest of the
        run, so markers owed from now on are unmeasured, not missed."""
        if self.health is not None:
            with self._lock:
                now = self._clock()
                self.health.dead(now, who)
                self.health.update(now)

    def record_shed(self, frames: int) -> None:
        """The sink dropped ``frames`` frames unsearched, past the marker timeout (overload)."""
        if self.health is not None and frames:
            with self._lock:
                self.health.shed(frames)

    def record_cpu(self, who: str, share: float) -> None:
        """Process ``who`` (``worker``, ``sink``) used ``share`` of a core lately."""
        if self.health is not None:
            with self._lock:
                self.health.cpu(self._clock(), who, share)

    def generator(self) -> dict[str, Any] | None:
        """What :class:`~probe.measure.health.GeneratorHealth` says of the run, or None when
        nothing watched the generator."""
        with self._lock:
            return None if self.health is None else self.health.summary()

    def record_reply(self, session_id: str, utterance_end: float, latency_s: float | None) -> None:
        """An utterance of a session got a reply after ``latency_s`` (onset minus utterance end),
        or none (``None``): voice-to-voice latency of a system that answers in its own voice."""
        with self._lock:
            if latency_s is None:
                self._reply_missed += 1
            elif self.history:
                self._reply.append(latency_s)
        if self.observer is not None:
            self.observer.reply(session_id, utterance_end, latency_s)

    def record_result(self, r: ResultTiming) -> None:
        """A text result came back (conversation timing, :mod:`probe.measure.conversation`)."""
        with self._lock:
            self.conversation.result(r)
        if self.observer is not None:
            self.observer.result(r)

    def record_figure(self, f: Figure) -> None:
        """A conversation figure was measured or missed."""
        with self._lock:
            self.conversation.figure(f)
        if self.observer is not None:
            self.observer.figure(f)

    def record_malformed_result(self, session_id: str, reason: str) -> None:
        """A message back looked like a text result but broke the configured shape."""
        with self._lock:
            self.conversation.malformed[reason] += 1

    def record_word_errors(self, w: WordErrors) -> None:
        """A session's finals scored against its script."""
        with self._lock:
            self.conversation.word_errors(w)

    def record_barge_in(self, session_id: str, *, talked_over: bool) -> None:
        """A barge-in was made (its figures come through :meth:`record_figure`)."""
        with self._lock:
            self.conversation.barge_ins += 1
            self.conversation.talked_over += int(talked_over)

    def record_bot_mark(self, session_id: str) -> None:
        """The system sent a Twilio ``mark`` (answered as Twilio does)."""
        with self._lock:
            self.conversation.bot_marks += 1

    def conversation_report(self) -> dict[str, Any] | None:
        """The report's ``conversation`` section, or None when the run measured none."""
        with self._lock:
            return self.conversation.report() if self.conversation.active else None

    def replies(self) -> tuple[list[float], int]:
        """Reply latencies (seconds) and the number of utterances that got no reply."""
        with self._lock:
            return list(self._reply), self._reply_missed

    # -- the sink side --------------------------------------------------------------------------

    def hop_connected(
        self, hop: str, session_id: str | None, trace: TraceContext | None = None
    ) -> None:
        """A hop reports (for a session, or in general): it is owed that session's markers.
        ``trace`` is the hop's own span context from its fork ``start``, if any."""
        _check_hop(hop)
        with self._lock:
            self._tally.setdefault(hop, _HopTally())
            s = self._sessions.get(session_id) if session_id is not None else None
            if s is not None:
                self._expect(s, hop)
        if self.observer is not None:
            self.observer.hop_joined(hop, session_id, trace)

    def hop_error(self, hop: str, session_id: str | None, error: str) -> None:
        """A hop failed (garbage on its fork, a stall, a dropped connection), with the reason."""
        _check_hop(hop)
        with self._lock:
            self._tally.setdefault(hop, _HopTally())
            notes = self._hop_errors.setdefault(hop, {})
            key: int | str
            if session_id is None:
                key = error
                old = notes.get(key)
                if old is not None:
                    notes[key] = ErrorNote(None, error, old.count + 1)
                else:
                    notes[key] = ErrorNote(None, error)
            else:
                self._error_seq += 1
                key = self._error_seq
                notes[key] = ErrorNote(session_id, error)
            if not self.history and len(notes) > MAX_ERRORS:
                del notes[next(iter(notes))]
        if self.observer is not None:
            self.observer.hop_failed(hop, session_id, error)

    def fork_rejected(self, reason: str) -> None:
        """The sink refused a fork (it did not present the run's capability): counted by
        reason, never a hop."""
        with self._lock:
            self._rejected[reason] = self._rejected.get(reason, 0) + 1
        if self.observer is not None:
            self.observer.fork_rejected(reason)

    def rejected_forks(self) -> dict[str, int]:
        """Fork connections refused, by reason."""
        with self._lock:
            return dict(self._rejected)

    def hop_silent(self, hop: str, session_id: str, since: float | None) -> None:
        """The session's fork of ``hop`` sent nothing after ``since`` (None: it sends again).
        Markers sent after ``since`` and then missed make it a hop error ``stalled``, once per
        silence: the hop stopped while the session kept sending."""
        with self._lock:
            s = self._sessions.get(session_id)
            if s is None:
                return
            if since is None:
                s.silent.pop(hop, None)
                s.stalled.discard(hop)
            else:
                s.silent[hop] = since

    def _expect(self, s: _Session, hop: str) -> None:
        if hop in s.pending:
            return
        tally = self._tally.setdefault(hop, _HopTally())
        s.hops.append(hop)
        s.pending[hop] = dict(sorted(s.sends.items(), key=lambda kv: kv[1]))
        s.seen[hop] = set()
        tally.sent += len(s.sends)

    def record_detection(
        self,
        hop: str,
        payload: bytes,
        arrival_time: float,
        *,
        score: float,
        session_hint: str | None = None,
    ) -> Measurement | None:
        """Join a detection with its send; returns the Measurement of a first detection, else None.

        The payload decides the session (``session_hint`` is not trusted). The marker is the sent
        seq with the payload's low 8 bits whose send time is the latest not after the arrival
        (allowing :data:`NEGATIVE_TOLERANCE_S`). Repeats count as duplicates, detections after the
        marker was declared missed as late, and anything that resolves to no send as unmatched.
        """
        del session_hint  # the payload is authoritative; the hint only names the fork it came on
        _check_hop(hop)
        m = self._detect(hop, payload, arrival_time, score)
        if m is not None and self.observer is not None:
            self.observer.detected(m, None)
        return m

    def _detect(
        self, hop: str, payload: bytes, arrival_time: float, score: float
    ) -> Measurement | None:
        with self._lock:
            tally = self._tally.setdefault(hop, _HopTally())
            if len(payload) != PAYLOAD_BYTES:
                tally.unmatched += 1
                return None
            token, m8 = split_session_payload(payload)
            s = self._by_token.get(token)
            if s is None:
                tally.unmatched += 1
                return None
            seq = self._resolve(s, m8, arrival_time)
            if seq is None:
                tally.unmatched += 1
                return None
            s.last_activity = self._clock()
            self._expect(s, hop)
            seen = s.seen[hop]
            if seq in seen:
                tally.duplicates += 1
                return None
            seen.add(seq)
            pending = s.pending[hop]
            if seq not in pending:
                tally.late += 1
                return None
            send_time = pending.pop(seq)
            tally.detected += 1
            m = Measurement(
                hop=hop,
                session=s.id,
                seq=seq,
                send_time=send_time,
                arrival_time=arrival_time,
                latency_s=arrival_time - send_time,
                score=score,
            )
            if self.history:
                self._series.append(
                    (self._hop_number(hop), 0, s.number, seq, send_time, arrival_time,
                     m.latency_s, score)
                )
            return m

    def _hop_number(self, hop: str) -> int:
        n = self._hop_numbers.get(hop)
        if n is None:
            n = self._hop_numbers[hop] = len(self._hop_names)
            self._hop_names.append(hop)
        return n

    @staticmethod
    def _resolve(s: _Session, m8: int, arrival_time: float) -> int | None:
        times = s.times_by_marker.get(m8)
        if not times:
            return None
        i = bisect.bisect_right(times, arrival_time + NEGATIVE_TOLERANCE_S)
        if i == 0:
            return None
        return s.seqs_by_marker[m8][i - 1]

    # -- settling -------------------------------------------------------------------------------

    def expire(self) -> list[Missed]:
        """Declare missed every owed marker sent more than ``marker_timeout`` ago; drop sessions
        closed (or idle) longer than ``session_ttl`` once settled. Returns the new misses."""
        with self._lock:
            now = self._clock()
            if self.health is not None:
                self.health.update(now)
            cutoff = now - self.marker_timeout
            out: list[Missed] = []
            for s in self._sessions.values():
                for hop, pending in s.pending.items():
                    due: list[int] = []
                    # Sends are recorded in time order, so the first fresh one ends the scan; an
                    # out-of-order send can only be settled later, never early.
                    for seq, t in pending.items():
                        if t >= cutoff:
                            break
                        due.append(seq)
                    for seq in due:
                        out.append(self._miss(s, hop, seq, pending.pop(seq), now))
            stalls = self._stalls(out)
            self._drop_stale(now)
        self._tell_missed(out)
        self._tell_stalls(stalls)
        return out

    def settle_all(self, *, unmeasured: bool = False) -> list[Missed]:
        """The run is over and the timeout was waited out: every pending marker is missed. With
        ``unmeasured`` the run was cut short (interrupted) before the timeout: every pending
        marker is unmeasured instead, as nobody waited to see whether the target lost it."""
        with self._lock:
            now = self._clock()
            if self.health is not None:
                self.health.update(now)
            out: list[Missed] = []
            for s in self._sessions.values():
                for hop, pending in s.pending.items():
                    for seq, t in pending.items():
                        out.append(self._miss(s, hop, seq, t, now, unmeasured=unmeasured))
                    pending.clear()
            stalls = self._stalls(out)
        self._tell_missed(out)
        self._tell_stalls(stalls)
        return out

    def _stalls(self, misses: list[Missed]) -> list[tuple[str, str, str]]:
        """Hop errors for misses of a silent fork: sent after its last frame (under the lock)."""
        notes: list[tuple[str, str, str]] = []
        for m in misses:
            s = self._sessions.get(m.session)
            if m.unmeasured or s is None or m.hop in s.stalled:
                continue
            since = s.silent.get(m.hop)
            if since is None or m.send_time < since:
                continue
            s.stalled.add(m.hop)
            error = (
                f"stalled: the hop's fork sent no audio after {max(0.0, since - s.opened):.2f} s "
                "of the session while the session kept sending; its markers since are missed"
            )
            notes.append((m.hop, m.session, error))
        return notes

    def _tell_stalls(self, notes: list[tuple[str, str, str]]) -> None:
        for hop, session, error in notes:
            self.hop_error(hop, session, error)

    def _tell_missed(self, misses: list[Missed]) -> None:
        if self.observer is not None:
            for m in misses:
                self.observer.missed(m)

    def _miss(
        self, s: _Session, hop: str, seq: int, send_time: float, now: float,
        *, unmeasured: bool = False,
    ) -> Missed:
        unmeasured = unmeasured or (
            self.health is not None and self.health.overlapped(send_time, now)
        )
        if unmeasured:
            self._tally[hop].unmeasured += 1
        else:
            self._tally[hop].missed += 1
        m = Missed(hop=hop, session=s.id, seq=seq, send_time=send_time, unmeasured=unmeasured)
        if self.history:
            self._series.append(
                (self._hop_number(hop), 2 if unmeasured else 1, s.number, seq, send_time,
                 0.0, 0.0, 0.0)
            )
        return m

    def _drop_stale(self, now: float) -> None:
        stale: list[_Session] = []
        for s in self._sessions.values():
            if s.closed_at is not None:
                old = now - s.closed_at >= self.session_ttl
            else:
                old = now - s.last_activity >= self.session_ttl
            if old and s.settled():
                stale.append(s)
        for s in stale:
            if s.closed_at is None:
                self._failed += 1
                s.failed = True
                self._session_errors.append(
                    ErrorNote(s.id, f"idle for {self.session_ttl:g} s without being closed")
                )
            del self._sessions[s.id]
            del self._by_token[s.token]

    # -- accounting -----------------------------------------------------------------------------

    def hop_counts(self) -> dict[str, HopCounts]:
        """Per hop (in the order hops became known), marker accounting."""
        with self._lock:
            pending: dict[str, int] = dict.fromkeys(self._tally, 0)
            for s in self._sessions.values():
                for hop, p in s.pending.items():
                    pending[hop] += len(p)
            out: dict[str, HopCounts] = {}
            for hop, t in self._tally.items():
                c = HopCounts(
                    sent=t.sent,
                    detected=t.detected,
                    missed=t.missed,
                    pending=pending[hop],
                    duplicates=t.duplicates,
                    unmatched=t.unmatched,
                    late=t.late,
                    unmeasured=t.unmeasured,
                )
                if c.sent != c.detected + c.missed + c.unmeasured + c.pending:
                    raise AssertionError(f"marker accounting broken for hop {hop!r}: {c}")
                out[hop] = c
            return out

    def hops(self) -> list[str]:
        """Every hop known: expected, connected, errored or detected."""
        with self._lock:
            return list(self._tally)

    def hop_errors(self) -> dict[str, list[ErrorNote]]:
        """Hop failures with their reasons, per hop, in order of first occurrence; failures
        outside any session with the same reason are one note with their ``count``."""
        with self._lock:
            return {hop: list(notes.values()) for hop, notes in self._hop_errors.items()}

    def session_counts(self) -> SessionCounts:
        """Sessions started, completed, failed and still open, with the failures' reasons."""
        with self._lock:
            return SessionCounts(
                started=self._started,
                completed=self._completed,
                failed=self._failed,
                open=sum(1 for s in self._sessions.values() if s.closed_at is None),
                errors=tuple(self._session_errors),
            )

    def live_sessions(self) -> list[str]:
        """Ids of the sessions held (open, or closed and not yet dropped)."""
        with self._lock:
            return list(self._sessions)

    def send_lag(self) -> LatencyStats:
        """A copy of the frame send lags recorded (seconds)."""
        with self._lock:
            return LatencyStats(self._send_lag.view())

    def series_records(self) -> SeriesRecords:
        """Every measurement and miss so far as compact records (in the order they were settled),
        read from the spool: what the report is built from without a Python object per row."""
        with self._lock:
            return SeriesRecords(
                self._series.view(), tuple(self._hop_names), tuple(self._session_names)
            )

    def series(self) -> list[Measurement | Missed]:
        """Every measurement and miss so far, in the order they were settled."""
        return self.series_records().items()

    def measurements(self) -> list[Measurement]:
        """Every measurement so far."""
        return [m for m in self.series() if isinstance(m, Measurement)]

    def misses(self) -> list[Missed]:
        """Every miss so far."""
        return [m for m in self.series() if isinstance(m, Missed)]

    def close(self) -> None:
        """Release the spooled history (its temporary files); reports already built keep theirs."""
        with self._lock:
            self._series.close()
            self._send_lag.close()


@dataclass(frozen=True, slots=True)
class SeriesRecords:
    """A registry's series as records (:data:`probe.measure.spool.SERIES_DTYPE`, read-only) with
    the names their ``hop`` and ``session`` fields index; ``outcome`` is 0 detected, 1 missed,
    2 unmeasured."""

    records: npt.NDArray[np.void]
    hops: tuple[str, ...]
    sessions: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.records)

    def items(self) -> list[Measurement | Missed]:
        """Every record as the registry's object (a Python object per row: for tests and small
        runs; the report reads the records)."""
        out: list[Measurement | Missed] = []
        for hop, outcome, session, seq, send, arrival, latency, score in self.records.tolist():
            if outcome == 0:
                out.append(Measurement(
                    hop=self.hops[hop], session=self.sessions[session], seq=seq, send_time=send,
                    arrival_time=arrival, latency_s=latency, score=score,
                ))
            else:
                out.append(Missed(
                    hop=self.hops[hop], session=self.sessions[session], seq=seq, send_time=send,
                    unmeasured=outcome == 2,
                ))
        return out


def _check_seq(seq: int) -> None:
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
        raise ConfigError(f"A marker sequence number is a non-negative integer, got {seq!r}.")


def _check_hop(hop: str) -> None:
    if not isinstance(hop, str) or not hop:
        raise ConfigError(f"A hop name is a non-empty string, got {hop!r}.")
