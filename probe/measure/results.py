"""Text results of a streaming speech-to-text target: parse them, place them on the stream, time
them. Pure: fed messages, send times and arrival times; no I/O, no clock of its own.

A :class:`ResultShape` says where a JSON result keeps its kind (interim or final), its text and
the stream offsets it covers; presets cover common services (:data:`PRESETS`) and
:func:`parse_shape` lets a user override any field (``--result-fields``). Offsets are seconds
(``unit=s``), milliseconds (``unit=ms``) or samples (``unit=samples``) of the ingress stream's
audio, counted from its first sample.

A :class:`ResultTracker` follows one session. It knows the utterances the probe sends (each
with its first and one-past-last speech sample and, when the fixture has a script, its text) and
when each frame left. From each result that comes back it makes:

- a :class:`~probe.measure.conversation.ResultTiming`: arrival minus the send time of the
  covered end offset (no latency when the result gives no offsets);
- per utterance, ``first_interim``: the utterance's first sample sent to its first interim;
- per utterance, ``final_delay``: its last speech sample sent to the first final that arrives
  after it (finals before it are the service splitting the utterance);
- at the end, the word error rate of the finals' text against the script of the utterances
  sent whole.

A result is placed on an utterance by its end offset (the last utterance starting before it),
or, without offsets, by arrival: an interim goes to the latest utterance begun, a final to the
earliest begun one not yet finalized. Anything that breaks the shape is returned as a
:class:`Malformed` reason and counted, never raised.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from probe.errors import ConfigError
from probe.measure.conversation import Figure, ResultTiming, WordErrors

__all__ = [
    "PRESETS",
    "Malformed",
    "ResultShape",
    "ResultTracker",
    "Utterance",
    "parse_shape",
    "word_errors",
    "words_of",
]


@dataclass(frozen=True, slots=True)
class ResultShape:
    """Where a JSON text result keeps what the probe needs (module docstring).

    ``kind`` is a path whose value is matched against ``final`` and ``interim`` (strings or
    JSON literals such as ``true``); a message whose kind matches neither is not a result and is
    ignored (keep-alives, metadata). ``duration`` is used when there is no ``end``."""

    name: str
    kind: str
    final: tuple[object, ...]
    interim: tuple[object, ...]
    text: str
    start: str | None = None
    end: str | None = None
    duration: str | None = None
    unit: str = "s"


PRESETS: dict[str, ResultShape] = {
    "seed": ResultShape(
        name="seed", kind="final", final=(True,), interim=(False,), text="text",
        start="start_ms", end="end_ms", unit="ms",
    ),
    "deepgram": ResultShape(
        name="deepgram", kind="is_final", final=(True,), interim=(False,),
        text="channel.alternatives.0.transcript", start="start", duration="duration",
    ),
    "generic": ResultShape(
        name="generic", kind="type", final=("final",), interim=("partial", "interim"),
        text="text", start="start", end="end",
    ),
}

_FIELDS = ("kind", "final", "interim", "text", "start", "end", "duration", "unit")
_UNITS = ("s", "ms", "samples")


def _literal(word: str) -> object:
    try:
        value: object = json.loads(word)
    except ValueError:
        return word
    return value if isinstance(value, (bool, int, float)) or value is None else word


def parse_shape(preset: str, fields: str | None = None) -> ResultShape:
    """The preset named ``preset``, with ``fields`` (``key=value,...``: kind, final, interim
    (``|``-separated values), text, start, end, duration (paths; empty for none), unit) over it.
    Raises ConfigError with one sentence on a mistake."""
    shape = PRESETS.get(preset)
    if shape is None:
        raise ConfigError(
            f"--results must be one of {', '.join(sorted(PRESETS))}, got {preset!r}."
        )
    if not fields:
        return shape
    changes: dict[str, Any] = {}
    for piece in fields.split(","):
        key, eq, value = piece.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or key not in _FIELDS:
            raise ConfigError(
                f"--result-fields takes key=value pairs with keys {', '.join(_FIELDS)}; "
                f"got {piece!r}."
            )
        if key in ("final", "interim"):
            if not value:
                raise ConfigError(f"--result-fields {key}= needs at least one value.")
            changes[key] = tuple(_literal(v) for v in value.split("|"))
        elif key == "unit":
            if value not in _UNITS:
                raise ConfigError(f"--result-fields unit must be s, ms or samples, got {value!r}.")
            changes[key] = value
        elif key in ("kind", "text"):
            if not value:
                raise ConfigError(f"--result-fields {key}= needs a path.")
            changes[key] = value
        else:
            changes[key] = value or None
    return replace(shape, name=f"{shape.name}+fields", **changes)


def _at(obj: object, path: str) -> tuple[bool, object]:
    cur = obj
    for part in path.split("."):
        if isinstance(cur, Mapping) and part in cur:
            cur = cur[part]
        elif isinstance(cur, list) and part.isdigit() and int(part) < len(cur):
            cur = cur[int(part)]
        else:
            return False, None
    return True, cur


def _same(a: object, b: object) -> bool:
    # JSON true must not match 1 (Python's True == 1).
    return type(a) is type(b) and a == b


@dataclass(frozen=True, slots=True)
class Malformed:
    """A message that looked like a result but broke the shape (or was no JSON at all)."""

    reason: str


@dataclass(frozen=True, slots=True)
class _Parsed:
    kind: str
    text: str
    start: float | None
    end: float | None


def _parse(shape: ResultShape, text: str | bytes) -> _Parsed | Malformed | None:
    try:
        obj = json.loads(text)
    except (ValueError, UnicodeDecodeError):
        return Malformed("not JSON")
    if not isinstance(obj, dict):
        return Malformed("not a JSON object")
    found, kind_value = _at(obj, shape.kind)
    if not found:
        return None
    if any(_same(kind_value, v) for v in shape.final):
        kind = "final"
    elif any(_same(kind_value, v) for v in shape.interim):
        kind = "interim"
    else:
        return None
    found, words = _at(obj, shape.text)
    if not found or not isinstance(words, str):
        return Malformed(f"{shape.text} is not a string")
    nums: dict[str, float | None] = {}
    for key in ("start", "end", "duration"):
        path = getattr(shape, key)
        found, value = _at(obj, path) if path else (False, None)
        if not found or value is None:
            nums[key] = None
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(
            value
        ) or value < 0:
            return Malformed(f"{path} is not a non-negative number")
        else:
            nums[key] = float(value)
    end = nums["end"]
    if end is None and nums["start"] is not None and nums["duration"] is not None:
        end = nums["start"] + nums["duration"]
    return _Parsed(kind, words, nums["start"], end)


_WORD = re.compile(r"[a-z0-9']+")


def words_of(text: str) -> list[str]:
    """Words compared for the error rate: lower case, punctuation dropped."""
    return _WORD.findall(text.lower().replace("\u2019", "'"))


def word_errors(hypothesis: Sequence[str], reference: Sequence[str]) -> int:
    """Word-level edit distance (substitutions + deletions + insertions)."""
    prev = list(range(len(hypothesis) + 1))
    for i, r in enumerate(reference, 1):
        cur = [i] + [0] * len(hypothesis)
        for j, h in enumerate(hypothesis, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


@dataclass(frozen=True, slots=True)
class Utterance:
    """One utterance the probe sends: its speech samples [start, end) and its script, if known."""

    start: int
    end: int
    text: str | None = None


@dataclass(slots=True)
class _Utt:
    u: Utterance
    first_interim: bool = False
    finalized: bool = False
    finals: list[str] = field(default_factory=list)


class ResultTracker:
    """One session's text results, timed and placed on its utterances (module docstring)."""

    def __init__(
        self,
        session: str,
        *,
        shape: ResultShape,
        rate: int,
        frame_len: int,
        utterances: Sequence[Utterance],
        timeout_s: float = 10.0,
    ) -> None:
        self.session = session
        self.shape = shape
        self.rate = rate
        self.frame_len = frame_len
        self.timeout_s = timeout_s
        self._utts = [_Utt(u) for u in utterances]
        self._frame_t: list[float] = []
        self.results = 0

    # -- the probe's side -------------------------------------------------------------------

    def frame_sent(self, n: int, t: float) -> None:
        """Frame ``n`` (frames come in order) left at ``t``: its first sample's send time."""
        while len(self._frame_t) < n:
            self._frame_t.append(math.nan)
        if len(self._frame_t) == n:
            self._frame_t.append(t)

    def sent_at(self, sample: int) -> float | None:
        """Send time of stream sample ``sample`` (None when not sent yet)."""
        k = sample // self.frame_len
        if k < 0 or k >= len(self._frame_t) or math.isnan(self._frame_t[k]):
            return None
        return self._frame_t[k] + (sample - k * self.frame_len) / self.rate

    def _sent_whole(self, u: Utterance) -> float | None:
        return self.sent_at(u.end - 1)

    # -- what comes back --------------------------------------------------------------------

    def receive(
        self, message: str | bytes, arrival: float
    ) -> list[ResultTiming | Figure | Malformed]:
        """One text message back: its result timing and the figures it settles (or nothing,
        when it is not a result)."""
        parsed = _parse(self.shape, message)
        if parsed is None or isinstance(parsed, Malformed):
            return [] if parsed is None else [parsed]
        self.results += 1
        out: list[ResultTiming | Figure | Malformed] = []
        end_sample: int | None = None
        covered: float | None = None
        if parsed.end is not None:
            end_sample = self._sample(parsed.end)
            # The covered audio ends just before ``end_sample``: it was all sent once that
            # sample's predecessor left, one sample period before ``end_sample`` would.
            last = self.sent_at(end_sample - 1) if end_sample > 0 else self.sent_at(0)
            if last is None:
                out.append(Malformed("end offset after the audio sent"))
                end_sample = None
            else:
                covered = last + (1.0 / self.rate if end_sample > 0 else 0.0)
        idx = self._place(parsed.kind, end_sample, arrival)
        latency = arrival - covered if covered is not None else None
        out.append(
            ResultTiming(
                session=self.session,
                kind=parsed.kind,
                arrival=arrival,
                covered_end_sent=covered,
                latency_s=latency,
                text=parsed.text,
                utterance=idx,
            )
        )
        if idx is None:
            return out
        st = self._utts[idx]
        if parsed.kind == "interim":
            if not st.first_interim and not st.finalized:
                st.first_interim = True
                begun = self.sent_at(st.u.start)
                if begun is not None:
                    out.append(Figure(self.session, "first_interim", begun, arrival - begun,
                                      utterance=idx))
            return out
        st.finals.append(parsed.text)
        ended = self._sent_whole(st.u)
        if not st.finalized and ended is not None and arrival >= ended:
            st.finalized = True
            ended += 1.0 / self.rate
            if arrival - ended > self.timeout_s:
                why = f"no final within {self.timeout_s:g} s"
                out.append(Figure(self.session, "final_delay", ended, None, why=why,
                                  utterance=idx))
            else:
                out.append(Figure(self.session, "final_delay", ended, arrival - ended,
                                  utterance=idx))
            if not st.first_interim:
                st.first_interim = True
                begun = self.sent_at(st.u.start)
                out.append(Figure(self.session, "first_interim", begun or ended, None,
                                  why="no interim before the final", utterance=idx))
        return out

    def _sample(self, offset: float) -> int:
        unit = self.shape.unit
        if unit == "ms":
            return int(round(offset * self.rate / 1000.0))
        if unit == "samples":
            return int(round(offset))
        return int(round(offset * self.rate))

    def _begun(self, arrival: float) -> list[int]:
        out = []
        for i, st in enumerate(self._utts):
            t = self.sent_at(st.u.start)
            if t is None or t > arrival:
                break
            out.append(i)
        return out

    def _place(self, kind: str, end_sample: int | None, arrival: float) -> int | None:
        if end_sample is not None:
            best = None
            for i, st in enumerate(self._utts):
                if st.u.start < end_sample:
                    best = i
            return best
        begun = self._begun(arrival)
        if not begun:
            return None
        if kind == "interim":
            return begun[-1]
        for i in begun:
            if not self._utts[i].finalized:
                return i
        return begun[-1]

    # -- settling -----------------------------------------------------------------------------

    def settled(self) -> bool:
        """Every utterance sent whole has its final."""
        return all(st.finalized for st in self._utts if self._sent_whole(st.u) is not None)

    def close(self, *, cut: bool = False) -> tuple[list[Figure], WordErrors | None]:
        """The stream is over: utterances sent whole and never finalized are missed; the
        session's word errors (None when no utterance sent whole has a script). ``cut``: the
        probe ended the stream early, so an utterance not yet finalized is not owed (no miss,
        and not scored)."""
        figures: list[Figure] = []
        hyp: list[str] = []
        ref: list[str] = []
        scripted = False
        for i, st in enumerate(self._utts):
            ended = self._sent_whole(st.u)
            if ended is None:
                continue
            ended += 1.0 / self.rate
            if cut and not st.finalized:
                continue
            if not st.finalized:
                why = "no final before the stream ended"
                figures.append(Figure(self.session, "final_delay", ended, None, why=why,
                                      utterance=i))
                if not st.first_interim:
                    begun = self.sent_at(st.u.start)
                    figures.append(Figure(self.session, "first_interim", begun or ended, None,
                                          why="no interim", utterance=i))
            if st.u.text is not None:
                scripted = True
                ref.extend(words_of(st.u.text))
                for t in st.finals:
                    hyp.extend(words_of(t))
        if not scripted:
            return figures, None
        return figures, WordErrors(
            self.session, word_errors(hyp, ref), len(ref), " ".join(hyp), " ".join(ref)
        )
