"""The reply bot's sans-I/O core: a loopback voice bot that answers in its own voice. Pure.

The reference pipeline's `reply` hop (`name:DELAY:reply[:stop=DUR][:say=DUR][:talkover]
[:noclear]`, `spec.py`) runs one `ReplyBot` per session. It is fed the caller's audio (the hop's
input: decoded bytes with their arrival times) and says what to send when: reply audio frames
and, in the Twilio dialect, `mark` and `clear` events. It opens no sockets and reads no clock;
the shell (`server.py`) pushes ingress as it arrives, sleeps until `next_due()` and sends what
`pop_due(now)` returns. Times are the session clock's seconds; a sample's arrival time is its
chunk's arrival plus its offset over the rate (PROTOCOL.md 4).

Rules (the ground truth the probe's reply and barge-in figures are checked against):

- Caller speech: the input is cut into 10 ms frames from its first sample; a frame is speech when
  its RMS is above -50 dBFS (full scale = RMS 1.0). An utterance starts at its first speech
  frame and ends one past its last speech frame, once `endpoint` (200 ms) of non-speech follows.
- Reply: starts `delay` after the utterance's end (the arrival of one past its last speech
  sample). The end is only known `endpoint` later, so a `delay` below the endpoint starts the
  reply as soon as the end is known, `endpoint` after it. The reply is `say` seconds of the
  shipped fixture `speech_en_gb` at the output rate with its quiet taken out (every 5 ms piece
  at or below -30 dBFS RMS dropped, the rest joined), so every 10 ms of it, wherever cut, is
  above -33 dBFS: the probe (-40 dBFS, 10 ms frames) hears its onset at the first frame's
  arrival and no pause inside it, so the only silence is the bot's own stop. It is sent in
  20 ms frames paced in real time: frame k is due at reply start + k * 20 ms. In Twilio, a
  `mark` named `reply-N` (N = 1, 2, ... per reply started) follows the reply's last media
  event.
- Barge-in: caller speech starting at `t` while the bot talks (a reply frame covers `t`) stops
  it at `t + stop`: no reply frame due at or after that is sent, and the samples of the frame
  playing then are zeroed from that instant, so the audio falls silent exactly at `t + stop`.
  At that instant, in Twilio, the reply's `mark` (it ends there) and then a `clear` (unless
  `noclear`). With `talkover` (a fault) the rest of the reply resumes 300 ms after the stop,
  whatever the caller does, and its mark follows its last frame. The barge-in speech is an
  utterance like any other: the bot replies after it ends.
- A reply not yet started when the caller speaks again is dropped (the caller was not done); a
  new reply starting while an older one still plays (only after `talkover`) cuts the older one
  off there, with its mark. The ingress is the caller only, so the bot never hears itself.
- At the end of the ingress (`finish`), an utterance in progress ends there; the reply due for
  it, and any reply still playing, are still sent. `done` says when nothing is left to send.

Outputs are sorted by due time; at one instant a reply's last frame comes before its mark, a
mark before a clear, and a cut-off reply's mark before the next reply's first frame.
"""

from __future__ import annotations

import bisect
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, TypeAlias

import numpy as np
import numpy.typing as npt

from probe.audio.fixtures import load_fixture
from probe.audio.formats import decode, encode
from probe.errors import ConfigError
from probe.protocol import AudioFormat

if TYPE_CHECKING:
    from probe.pipeline.spec import HopSpec

__all__ = [
    "ENDPOINT",
    "REPLY_FIXTURE",
    "REPLY_FRAME",
    "RESUME_AFTER",
    "SPEECH_DBFS",
    "VAD_FRAME",
    "BargeIn",
    "BotAudio",
    "BotClear",
    "BotMark",
    "BotOutput",
    "ReplyBot",
    "ReplyConfig",
    "configured_reply",
    "reply_clip",
]

F32 = npt.NDArray[np.float32]

ENDPOINT = 0.200  # seconds of non-speech that end an utterance
SPEECH_DBFS = -50.0  # a 10 ms frame above this RMS is caller speech
VAD_FRAME = 0.010
REPLY_FRAME = 0.020  # the bot speaks in 20 ms frames
RESUME_AFTER = 0.300  # talkover: the reply resumes this long after it stopped
REPLY_FIXTURE = "speech_en_gb"
VOICE_DBFS = -30.0  # the reply keeps only the 5 ms pieces of the fixture louder than this
VOICE_PIECE = 0.005
MAX_SAY = 60.0
MAX_STOP = 10.0
DEFAULT_STOP = 0.100
DEFAULT_SAY = 2.0


def format_duration(seconds: float) -> str:
    """``20ms``, ``1.5s`` style, as hop specs write durations."""
    ms = seconds * 1000.0
    if ms >= 1000.0 and float(ms).is_integer() and int(ms) % 1000 == 0:
        return f"{int(ms) // 1000}s"
    return f"{ms:g}ms"


@dataclass(frozen=True, slots=True)
class ReplyConfig:
    """What a reply hop does (times in seconds); validated on construction."""

    stop: float = DEFAULT_STOP
    say: float = DEFAULT_SAY
    talkover: bool = False
    clear: bool = True

    def __post_init__(self) -> None:
        if not math.isfinite(self.stop) or not 0.0 <= self.stop <= MAX_STOP:
            raise ConfigError(
                f"The reply's stop delay (stop=) must be from 0 to {MAX_STOP:g} s, got "
                f"{self.stop!r}."
            )
        if not math.isfinite(self.say) or not REPLY_FRAME <= self.say <= MAX_SAY:
            raise ConfigError(
                f"The reply's length (say=) must be from 20 ms to {MAX_SAY:g} s, got {self.say!r}."
            )

    def options(self) -> list[str]:
        """This config's `--hops` options after `reply` (defaults left out)."""
        out: list[str] = []
        if self.stop != DEFAULT_STOP:
            out.append(f"stop={format_duration(self.stop)}")
        if self.say != DEFAULT_SAY:
            out.append(f"say={format_duration(self.say)}")
        if self.talkover:
            out.append("talkover")
        if not self.clear:
            out.append("noclear")
        return out


@dataclass(frozen=True, slots=True)
class BotAudio:
    """A reply frame due at `due`: `data` in the output format; frame `frame` of reply `reply`."""

    due: float
    data: bytes
    reply: int
    frame: int


@dataclass(frozen=True, slots=True)
class BotMark:
    """A Twilio `mark` event named `name` due at `due`."""

    due: float
    name: str


@dataclass(frozen=True, slots=True)
class BotClear:
    """A Twilio `clear` event due at `due`."""

    due: float


BotOutput: TypeAlias = BotAudio | BotMark | BotClear


@dataclass(frozen=True, slots=True)
class BargeIn:
    """The caller spoke at `t` while reply `reply` played; the bot fell silent at `stop_at`."""

    t: float
    stop_at: float
    reply: int


def configured_reply(hops: Sequence[HopSpec]) -> dict[str, float] | None:
    """What a reply-mode run through `hops` ending in a reply hop should measure, in seconds:
    `reply` (utterance end to reply onset, for utterances whose last 10 ms frame is speech),
    `barge_in` (first barge-in sample sent to the bot falling silent, before the probe's 10 ms
    framing) and `clear` (to the Twilio clear), the delays of the hops before included, the
    network's not. None when the last hop is no reply hop."""
    reply = hops[-1].reply if hops else None
    if reply is None:
        return None
    last = hops[-1]
    before = sum(h.delay for h in hops[:-1])
    stop = reply.stop
    return {"reply": before + max(last.delay, ENDPOINT), "barge_in": before + stop,
            "clear": before + stop}


@functools.lru_cache(maxsize=16)
def _voice(rate: int) -> F32:
    x, _ = load_fixture(REPLY_FIXTURE, rate=rate)
    w = max(1, round(rate * VOICE_PIECE))
    pieces = np.asarray(x[:len(x) - len(x) % w], dtype=np.float32).reshape(-1, w)
    # Any 10 ms window holds a whole 5 ms piece, so it keeps at least half that piece's energy.
    loud = np.mean(pieces.astype(np.float64) ** 2, axis=1) > 10.0 ** (VOICE_DBFS / 10.0)
    if not loud.any():
        raise ConfigError(f"The reply fixture {REPLY_FIXTURE!r} has no loud speech.")
    return np.ascontiguousarray(pieces[loud].ravel())


def reply_clip(say: float, rate: int) -> F32:
    """The bot's reply: `say` seconds at `rate` of the fixture with its quiet taken out (module
    docstring), looped if that is shorter."""
    clip = _voice(rate)
    n = max(1, round(say * rate))
    if n > len(clip):
        clip = np.tile(clip, -(-n // len(clip)))
    return clip[:n]


@dataclass(order=True, slots=True)
class _Item:
    due: float
    rank: int  # at one instant: a cut-off mark (-1), audio (0), mark (1), clear (2)
    seq: int
    kind: Literal["audio", "mark", "clear"] = field(compare=False)
    reply: int = field(compare=False)
    frame: int = field(compare=False, default=0)


@dataclass(slots=True)
class _Reply:
    number: int
    start: float
    # Spans of time the reply is (or will be) heard, as [start, end) pairs.
    on_air: list[tuple[float, float]]
    cut_at: float | None = None


class ReplyBot:
    """One session's reply bot (module docstring).

    `in_format` is what the bot hears, `out_format` what it says (the client connection's
    format); `marks` turns on Twilio's `mark`/`clear` events. `delay` is the reply delay.
    """

    def __init__(
        self,
        config: ReplyConfig,
        delay: float,
        in_format: AudioFormat,
        out_format: AudioFormat,
        *,
        marks: bool = False,
        endpoint: float = ENDPOINT,
    ) -> None:
        if not math.isfinite(delay) or delay < 0.0:
            raise ConfigError(f"The reply delay must be a time >= 0, got {delay!r}.")
        if not math.isfinite(endpoint) or endpoint <= 0.0:
            raise ConfigError(f"The endpoint must be a positive time, got {endpoint!r}.")
        self.config = config
        self.delay = float(delay)
        self.in_format = in_format
        self.out_format = out_format
        self.marks = marks
        self._in_rate = in_format.sample_rate
        self._vad = max(1, round(self._in_rate * VAD_FRAME))
        self._endpoint_frames = max(1, math.ceil(round(endpoint * self._in_rate) / self._vad))
        self._speech_ms = 10.0 ** (SPEECH_DBFS / 10.0)
        out_rate = out_format.sample_rate
        self._frame_n = max(1, round(out_rate * REPLY_FRAME))
        self._frame_s = self._frame_n / out_rate
        clip = reply_clip(config.say, out_rate)
        pad = -len(clip) % self._frame_n
        self._clip = np.concatenate([clip, np.zeros(pad, np.float32)]) if pad else clip
        self._frames = len(self._clip) // self._frame_n
        # Input bookkeeping: (first sample index, arrival time) per chunk, and the partial frame.
        self._chunks: list[tuple[int, float]] = []
        self._in_index = 0
        self._rest = np.zeros(0, np.float32)
        self._rest_index = 0
        # Caller state.
        self._speaking = False
        self._onset = 0.0
        self._speech_end = 0.0
        self._silent_frames = 0
        # Bot state.
        self._timeline: list[_Item] = []
        self._seq = 0
        self._replies: dict[int, _Reply] = {}
        self._count = 0
        self._finished = False
        # Records, for tests and logs.
        self.utterances: list[tuple[float, float]] = []
        self.reply_starts: list[tuple[int, float]] = []
        self.barge_ins: list[BargeIn] = []

    # --- input ---------------------------------------------------------------------------------

    def push(self, data: bytes, t_in: float) -> None:
        """Feed one input chunk (in `in_format`) that arrived at `t_in`."""
        if self._finished:
            return
        x = decode(data, self.in_format.encoding)
        if not len(x):
            return
        self._chunks.append((self._in_index, t_in))
        self._in_index += len(x)
        buf = np.concatenate([self._rest, x]) if len(self._rest) else x
        whole = len(buf) - len(buf) % self._vad
        self._rest = buf[whole:].copy()
        if not whole:
            return
        power = np.mean(buf[:whole].astype(np.float64).reshape(-1, self._vad) ** 2, axis=1)
        first = self._rest_index
        self._rest_index += whole
        frame_s = self._vad / self._in_rate
        for k, ms in enumerate(power.tolist()):
            t = self._input_time(first + k * self._vad)
            self._frame(t, t + frame_s, ms > self._speech_ms)

    def finish(self, t_end: float) -> None:
        """End of input at `t_end`: an utterance in progress ends; what is scheduled stays."""
        if self._finished:
            return
        self._finished = True
        if self._speaking:
            self._speaking = False
            self._utterance_end(max(t_end, self._speech_end))

    @property
    def done(self) -> bool:
        """True once the input ended and nothing is left to send."""
        return self._finished and not self._timeline

    # --- output --------------------------------------------------------------------------------

    def next_due(self) -> float | None:
        """When the next output is due (None: nothing scheduled)."""
        return self._timeline[0].due if self._timeline else None

    def pop_due(self, now: float) -> list[BotOutput]:
        """Every output due at or before `now`, in order."""
        out: list[BotOutput] = []
        timeline = self._timeline
        while timeline and timeline[0].due <= now:
            item = timeline.pop(0)
            if item.kind == "audio":
                out.append(BotAudio(item.due, self._audio(item), item.reply, item.frame))
            elif item.kind == "mark":
                out.append(BotMark(item.due, f"reply-{item.reply}"))
            else:
                out.append(BotClear(item.due))
        for number in [n for n, r in self._replies.items()
                       if not any(i.reply == n for i in timeline) and n != self._count]:
            del self._replies[number]
        return out

    # --- internals -----------------------------------------------------------------------------

    def _input_time(self, index: int) -> float:
        chunks = self._chunks
        while len(chunks) > 1 and chunks[1][0] <= index:
            chunks.pop(0)
        start, t = chunks[0]
        return t + (index - start) / self._in_rate

    def _frame(self, t: float, t_after: float, speech: bool) -> None:
        if speech:
            if not self._speaking:
                self._speaking = True
                self._onset = t
                self._caller_starts(t)
            self._speech_end = t_after
            self._silent_frames = 0
        elif self._speaking:
            self._silent_frames += 1
            if self._silent_frames >= self._endpoint_frames:
                self._speaking = False
                self._utterance_end(t_after)

    def _caller_starts(self, t: float) -> None:
        for reply in list(self._replies.values()):
            if reply.start > t:
                self._drop(reply)
            elif any(a <= t < b for a, b in reply.on_air):
                self._barge_in(reply, t)

    def _utterance_end(self, known: float) -> None:
        end = self._speech_end
        self.utterances.append((self._onset, end))
        start = max(end + self.delay, known)
        for reply in self._replies.values():
            if reply.on_air and reply.on_air[-1][1] > start:
                self._cut(reply, start, rank=-1)
        self._count += 1
        n = self._count
        self._replies[n] = _Reply(n, start, [(start, start + self._frames * self._frame_s)])
        self.reply_starts.append((n, start))
        for j in range(self._frames):
            self._add(start + j * self._frame_s, 0, "audio", n, j)
        if self.marks:
            self._add(start + (self._frames - 1) * self._frame_s, 1, "mark", n)

    def _drop(self, reply: _Reply) -> None:
        self._timeline = [i for i in self._timeline if i.reply != reply.number]
        del self._replies[reply.number]
        self.reply_starts = [r for r in self.reply_starts if r[0] != reply.number]
        if reply.number == self._count:
            self._count -= 1

    def _barge_in(self, reply: _Reply, t: float) -> None:
        stop_at = t + self.config.stop
        self.barge_ins.append(BargeIn(t, stop_at, reply.number))
        removed = self._cut(reply, stop_at, rank=1)
        if self.config.talkover and removed:
            resume = stop_at + RESUME_AFTER
            for k, j in enumerate(removed):
                self._add(resume + k * self._frame_s, 0, "audio", reply.number, j)
            end = resume + len(removed) * self._frame_s
            reply.on_air.append((resume, end))
            if self.marks and self._remove_mark(reply):
                self._add(end - self._frame_s, 1, "mark", reply.number)
        if self.marks and self.config.clear:
            self._add(stop_at, 2, "clear", reply.number)

    def _cut(self, reply: _Reply, at: float, *, rank: int) -> list[int]:
        """Silence `reply` from `at` on; returns the frames not yet sent that were dropped."""
        removed = [i.frame for i in self._timeline
                   if i.reply == reply.number and i.kind == "audio" and i.due >= at]
        if not removed and not any(a <= at < b for a, b in reply.on_air):
            return []
        self._timeline = [i for i in self._timeline if not (
            i.reply == reply.number and i.kind == "audio" and i.due >= at)]
        reply.on_air = [(a, min(b, at)) for a, b in reply.on_air if a < at]
        reply.cut_at = at
        if self.marks and self._remove_mark(reply):
            self._add(at, rank, "mark", reply.number)
        return removed

    def _remove_mark(self, reply: _Reply) -> bool:
        """Take `reply`'s mark off the timeline; False if it was sent already."""
        before = len(self._timeline)
        self._timeline = [i for i in self._timeline
                          if not (i.reply == reply.number and i.kind == "mark")]
        return len(self._timeline) < before

    def _add(self, due: float, rank: int, kind: Literal["audio", "mark", "clear"], reply: int,
             frame: int = 0) -> None:
        self._seq += 1
        bisect.insort(self._timeline, _Item(due, rank, self._seq, kind, reply, frame))

    def _audio(self, item: _Item) -> bytes:
        n = self._frame_n
        y = self._clip[item.frame * n:(item.frame + 1) * n]
        reply = self._replies.get(item.reply)
        cut = None if reply is None else reply.cut_at
        if cut is not None and item.due < cut < item.due + self._frame_s:
            y = y.copy()
            y[int(round((cut - item.due) * self.out_format.sample_rate)):] = 0.0
        return encode(y, self.out_format.encoding)
