"""The text hop's sans-I/O core: a stand-in streaming speech-to-text service with known delays.

`SpeechToTextCore` is fed decoded samples with their arrival times (clock seconds, the time the
chunk holding them reached the hop) and says which JSON text results to send and when; the I/O
shell (`server.py`) only waits until each result's `due` time and sends it as a text frame.

Rules (`TextSpec` holds `every`, `endpoint`, the preset and the faults; `delay` is the hop's):

- Speech is any sample with |x| >= 1e-4 (`SPEECH_LEVEL`). An utterance starts at its first
  speech sample and ends one past its last speech sample once `endpoint` of non-speech follows
  it (or the stream stops).
- Interims: at each `every` of utterance audio, offsets start+every, start+2*every, ... before
  its end, one interim result covering [start, offset], due `delay` after the sample at that
  offset arrived. An offset becomes due only once speech is seen at or past it, so within a
  pause longer than `delay` an interim is late (never in the shipped fixtures' word gaps with
  the default delays).
- Final: covering [start, end], due at arrival(end) + endpoint + delay, so its result latency
  and the finalization delay are `endpoint + delay` (plus the hops before).
- Offsets are in the ingress stream's timeline: sample index since the first audio sample over
  the rate (the pipeline's resamplers are index-aligned, so the hop's rate gives the same
  seconds as the ingress rate).
- Text. A stand-in recogniser that knows only the shipped fixtures' script sentences
  (`SentenceBank.shipped`, from audio_fixtures/scripts.json): it picks the sentence whose audio
  best matches the utterance's by normalized cross-correlation at the hop's rate, lags within
  +-20 ms, among the sentences whose length is within 15 % of the utterance's (for an interim:
  at least the covered audio less 15 %), the best above 0.5. An interim compares the audio
  covered so far with the same length of each sentence's start and says the first
  round(words * covered / sentence length) words of its match (lower case, no punctuation); a
  final says the whole sentence. Anything else (a user's own audio, music) gets empty text.
  The correlation runs incrementally, block by block as results fall due, so each utterance's
  audio is correlated once; from 0.5 s of an utterance on, sentences whose start correlates
  below 0.25 with it are no longer tried (`PRUNE_AFTER`, `PRUNE_BELOW`).
- Shapes (`preset`): `seed`
  `{"type": "result", "final": false, "text": ..., "start_ms": 250, "end_ms": 1750,
  "trace_id": <32 hex of the start's traceparent>}`, `deepgram` `{"type": "Results",
  "is_final": .., "speech_final": .., "start": 0.25, "duration": 1.5, "channel":
  {"alternatives": [{"transcript": ..., "confidence": 0.9}]}}`, `generic` `{"type":
  "partial"|"final", "text": ..., "start": 0.25, "end": 1.75}` (seconds). Offsets are exact
  (sample index over the rate, not rounded), written as integers when whole.
- Faults: `nooffsets` leaves the offset fields out, `nofinal` sends no finals, `badjson` makes
  every third result sent (of a session) invalid JSON (its first half).
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from probe.pipeline.spec import HopSpec, TextSpec

__all__ = [
    "MATCH_LAG",
    "MATCH_LENGTH",
    "MATCH_MIN",
    "SPEECH_LEVEL",
    "SentenceBank",
    "SpeechToTextCore",
    "TextResult",
    "configured_conversation",
]

F64 = npt.NDArray[np.float64]
SPEECH_LEVEL = 1e-4  # |x| at or above this is speech
MATCH_LAG = 0.020  # seconds either way the recogniser searches for the best alignment
MATCH_LENGTH = 0.15  # a sentence is a candidate if its length is within this share
MATCH_MIN = 0.5  # the lowest normalized correlation that counts as a match
# Once this much of an utterance is correlated, sentences whose start matches it below
# PRUNE_BELOW are dropped (shipped sentences score 0.99+ against themselves, at most 0.42 against
# any other's first 0.5 s): the matching then costs about one sentence's correlation.
PRUNE_AFTER = 0.5
PRUNE_BELOW = 0.25
CONFIDENCE = 0.9
_BLOCK = 4096  # utterance samples correlated per FFT
_WORD = re.compile(r"[a-z0-9']+")


@dataclass(frozen=True, slots=True)
class TextResult:
    """A result the hop sends at clock time `due`: `message` is the text frame.

    `final` says its kind, `start`/`end` the stream offsets it covers (seconds, sent or not),
    `text` what it says and `utterance` the utterance's number in the session (from 0).
    """

    due: float
    message: str
    final: bool
    start: float
    end: float
    text: str
    utterance: int


class SentenceBank:
    """The script sentences a text hop can recognise, as audio at one rate."""

    def __init__(self, rate: int, sentences: Sequence[tuple[str, npt.ArrayLike]]) -> None:
        self.rate = rate
        self.lag = max(1, round(MATCH_LAG * rate))
        self.texts = tuple(text for text, _ in sentences)
        self.words = tuple(tuple(_WORD.findall(text.lower())) for text in self.texts)
        audio = [np.asarray(a, dtype=np.float64).ravel() for _, a in sentences]
        self.lengths = np.array([len(a) for a in audio], dtype=np.int64)
        # Zeros around each sentence: `lag` before, and after it room for an utterance 15 %
        # longer plus the lag, so every block's window is a plain slice.
        self._padded: list[F64] = []
        self._cum_energy: list[F64] = []
        for a in audio:
            tail = self.lag + math.ceil(len(a) * MATCH_LENGTH) + _BLOCK + 1
            self._padded.append(np.concatenate([np.zeros(self.lag), a, np.zeros(tail)]))
            self._cum_energy.append(np.concatenate([[0.0], np.cumsum(a * a)]))

    def __len__(self) -> int:
        return len(self.texts)

    @classmethod
    def shipped(cls, rate: int) -> SentenceBank:
        """Every script sentence of the fixture folder's speech fixtures, resampled to `rate`
        (loaded once per folder and rate); empty when the folder has no scripts."""
        from probe.audio.fixtures import fixtures_dir

        return _shipped(fixtures_dir(), rate)

    def energy(self, i: int, m: int) -> float:
        """Energy of sentence `i`'s first `m` samples (all of them if it is shorter)."""
        cum = self._cum_energy[i]
        return float(cum[min(m, len(cum) - 1)])

    def window(self, i: int, a: int, b: int) -> F64:
        """Sentence `i` from sample a - lag to b + lag (zeros outside it)."""
        return self._padded[i][a:b + 2 * self.lag]


@functools.lru_cache(maxsize=8)
def _shipped(folder: Path, rate: int) -> SentenceBank:
    from probe.audio.fixtures import SPEECH_FIXTURES, fixture_script, load_fixture

    sentences: list[tuple[str, npt.ArrayLike]] = []
    for name in SPEECH_FIXTURES:
        if not (folder / f"{name}.wav").is_file():
            continue
        script = fixture_script(name)
        if script is None:
            continue
        x, _ = load_fixture(name, rate=rate)
        for s in script:
            sentences.append((s.text, x[round(s.start_s * rate):round(s.end_s * rate)]))
    return SentenceBank(rate, sentences)


class _Matcher:
    """One utterance's running correlation with every sentence still a candidate."""

    def __init__(self, bank: SentenceBank) -> None:
        self.bank = bank
        self.alive = np.arange(len(bank))
        self.acc = np.zeros((len(bank), 2 * bank.lag + 1))
        self.done = 0
        self.energy = 0.0

    def advance(self, u: F64, m: int) -> None:
        """Correlate the utterance's samples up to `m` (`u` holds at least that many)."""
        bank = self.bank
        self.alive = self.alive[bank.lengths[self.alive] * (1.0 + MATCH_LENGTH) >= m]
        m_have = min(m, len(u))
        while self.done < m_have and len(self.alive):
            a, b = self.done, min(m_have, self.done + _BLOCK)
            block = u[a:b]
            self.energy += float(np.dot(block, block))
            n = 1 << (b - a + 2 * bank.lag - 1).bit_length()
            windows = np.stack([bank.window(int(i), a, b) for i in self.alive])
            spectra = np.fft.rfft(windows, n, axis=1) * np.conj(np.fft.rfft(block, n))
            self.acc[self.alive] += np.fft.irfft(spectra, n, axis=1)[:, : 2 * bank.lag + 1]
            self.done = b
        if self.done >= PRUNE_AFTER * bank.rate and len(self.alive) > 1 and self.energy > 0.0:
            scores = np.array([float(self.acc[i].max()) / math.sqrt(
                self.energy * max(bank.energy(int(i), self.done), 1e-30)) for i in self.alive])
            self.alive = self.alive[scores >= PRUNE_BELOW]

    def best(self, m: int, *, final: bool) -> int | None:
        """The sentence the first `m` samples are (None: no match); `final` judges the whole
        utterance against whole sentences, else the prefix against sentences' starts."""
        bank = self.bank
        best, score = None, MATCH_MIN
        if self.energy <= 0.0:
            return None
        for i in self.alive:
            length = int(bank.lengths[i])
            if final and abs(m - length) > MATCH_LENGTH * length:
                continue
            energy = bank.energy(int(i), length if final else m)
            if energy <= 0.0:
                continue
            value = float(self.acc[i].max()) / math.sqrt(self.energy * energy)
            if value > score:
                best, score = int(i), value
        return best


class _Buffer:
    """A growable float64 array: the current utterance's audio."""

    def __init__(self) -> None:
        self.data = np.zeros(0)
        self.n = 0

    def reset(self, x: F64) -> None:
        self.data = x.copy()
        self.n = len(x)

    def extend(self, x: F64) -> None:
        if self.n + len(x) > len(self.data):
            grown = np.zeros(max(2 * len(self.data), self.n + len(x)))
            grown[: self.n] = self.data[: self.n]
            self.data = grown
        self.data[self.n:self.n + len(x)] = x
        self.n += len(x)


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


class SpeechToTextCore:
    """The text hop of one session (module docstring): `push` audio, `finish` at the end.

    `delay` is the hop's delay (seconds), `rate` the rate of the samples it is fed, `bank` the
    sentences it recognises (None: none, every text is empty) and `trace_id` what the `seed`
    preset echoes.
    """

    def __init__(
        self,
        spec: TextSpec,
        *,
        delay: float,
        rate: int,
        bank: SentenceBank | None = None,
        trace_id: str = "",
    ) -> None:
        if bank is not None and bank.rate != rate:
            raise ValueError(f"the sentence bank is at {bank.rate} Hz, the audio at {rate} Hz")
        self.spec = spec
        self.delay = delay
        self.rate = rate
        self.bank = bank
        self.trace_id = trace_id
        self._every = max(1, round(spec.every * rate))
        self._endpoint = max(1, round(spec.endpoint * rate))
        self._chunks: deque[tuple[int, float]] = deque()
        self._n = 0  # samples received
        self._in = False  # inside an utterance
        self._start = 0  # its first speech sample
        self._end = 0  # one past its last speech sample seen so far
        self._next = 0  # its next interim offset
        self._audio = _Buffer()
        self._matcher: _Matcher | None = None
        self._utterance = -1
        self._sent = 0  # results made (for badjson)
        self._finished = False

    @property
    def utterances(self) -> int:
        """Utterances started so far."""
        return self._utterance + 1

    def push(self, samples: npt.ArrayLike, t_in: float) -> list[TextResult]:
        """Feed decoded samples (floats in [-1, 1]) whose chunk arrived at clock time `t_in`."""
        x = np.asarray(samples, dtype=np.float64).ravel()
        if not len(x) or self._finished:
            return []
        base = self._n
        self._chunks.append((base, t_in))
        self._n += len(x)
        out: list[TextResult] = []
        speech = np.flatnonzero(np.abs(x) >= SPEECH_LEVEL) + base
        if self._in:
            self._take(x)  # the utterance goes on (at least until its endpoint is known)
        if len(speech):
            before = np.empty(len(speech), dtype=np.float64)
            before[0] = self._end if self._in else -math.inf
            before[1:] = speech[:-1] + 1
            # Speech samples that start an utterance: the first after `endpoint` of non-speech.
            for j in np.flatnonzero(speech - before >= self._endpoint):
                if self._in:
                    out += self._close(int(before[j]))
                self._open(int(speech[j]), x[int(speech[j]) - base:])
            self._end = int(speech[-1]) + 1
        if self._in:
            out += self._interims(self._end)
            if self._n - self._end >= self._endpoint:
                out += self._close(self._end)
        self._trim()
        return out

    def finish(self, t_end: float) -> list[TextResult]:
        """The stream stopped at clock time `t_end`: an utterance still open ends here."""
        if self._finished:
            return []
        self._finished = True
        return self._close(self._end) if self._in else []

    # --- internals -----------------------------------------------------------------------------

    def _take(self, x: F64) -> None:
        if self._matcher is not None and len(self._matcher.alive):
            self._audio.extend(x)

    def _open(self, start: int, x: F64) -> None:
        self._in = True
        self._utterance += 1
        self._start = self._end = start
        self._next = start + self._every
        self._matcher = _Matcher(self.bank) if self.bank is not None and len(self.bank) else None
        self._audio.reset(x if self._matcher is not None else np.zeros(0))

    def _close(self, end: int) -> list[TextResult]:
        out = self._interims(end)
        self._in = False
        if self.spec.final:
            i = self._match(end - self._start, final=True)
            text = "" if i is None or self.bank is None else self.bank.texts[i]
            due = self._arrival(end) + self.spec.endpoint + self.delay
            out.append(self._result(due, True, end, text))
        self._matcher = None
        self._audio.reset(np.zeros(0))
        return out

    def _interims(self, limit: int) -> list[TextResult]:
        out: list[TextResult] = []
        while self._next < limit:
            o = self._next
            self._next += self._every
            covered = o - self._start
            i = self._match(covered, final=False)
            text = ""
            if i is not None and self.bank is not None:
                words = self.bank.words[i]
                count = math.floor(len(words) * covered / int(self.bank.lengths[i]) + 0.5)
                text = " ".join(words[: min(len(words), count)])
            out.append(self._result(self._arrival(o) + self.delay, False, o, text))
        return out

    def _match(self, m: int, *, final: bool) -> int | None:
        matcher = self._matcher
        if matcher is None:
            return None
        matcher.advance(self._audio.data[: self._audio.n], m)
        return matcher.best(m, final=final)

    def _arrival(self, pos: int) -> float:
        """When sample `pos` arrived: its chunk's arrival plus its place in the chunk (past the
        last sample received, extrapolated from the last chunk)."""
        start, t = self._chunks[0]
        for s, ts in self._chunks:
            if s > pos:
                break
            start, t = s, ts
        return t + (pos - start) / self.rate

    def _trim(self) -> None:
        keep = min(self._next, self._end) if self._in else self._n
        chunks = self._chunks
        while len(chunks) > 1 and chunks[1][0] <= keep:
            chunks.popleft()

    def _result(self, due: float, final: bool, end: int, text: str) -> TextResult:
        start_s, end_s = self._start / self.rate, end / self.rate
        message = json.dumps(self._shape(final, text, self._start, end))
        self._sent += 1
        if self.spec.badjson and self._sent % 3 == 0:
            message = message[: len(message) // 2]
        return TextResult(due, message, final, start_s, end_s, text, self._utterance)

    def _shape(self, final: bool, text: str, start: int, end: int) -> dict[str, Any]:
        preset, offsets, rate = self.spec.preset, self.spec.offsets, self.rate
        s, e = _number(start / rate), _number(end / rate)
        msg: dict[str, Any]
        if preset == "deepgram":
            msg = {"type": "Results", "is_final": final, "speech_final": final}
            if offsets:
                msg["start"] = s
                msg["duration"] = _number((end - start) / rate)
            confidence = CONFIDENCE if text else 0.0
            msg["channel"] = {"alternatives": [{"transcript": text, "confidence": confidence}]}
        elif preset == "generic":
            msg = {"type": "final" if final else "partial", "text": text}
            if offsets:
                msg["start"], msg["end"] = s, e
        else:
            msg = {"type": "result", "final": final, "text": text}
            if offsets:
                msg["start_ms"] = _number(start * 1000 / rate)
                msg["end_ms"] = _number(end * 1000 / rate)
            msg["trace_id"] = self.trace_id
        return msg


def configured_conversation(hops: Sequence[HopSpec]) -> dict[str, float] | None:
    """What a run through `hops` ending in a text hop should measure, in seconds, keyed like the
    report's conversation section: result latency per kind (`interim`, `final`), `first_interim`
    and `final_delay` (the delays of the hops before included, the network's not; first_interim
    for utterances longer than `every`). None when the last hop is no text hop."""
    if not hops or hops[-1].text is None:
        return None
    text = hops[-1].text
    before = sum(h.delay for h in hops)
    return {
        "interim": before,
        "final": before + text.endpoint,
        "first_interim": before + text.every,
        "final_delay": before + text.endpoint,
    }
