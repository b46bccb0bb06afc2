"""Conversation timing: what a speech-to-text service's text results and a voice bot's barge-in
behaviour measure, kept per run. Pure: no I/O, no clock of its own.

Two kinds of records reach the :class:`ConversationLog` (from the sessions' trackers, through
the registry, which also tells the run's observers):

- :class:`ResultTiming`: one text result (``interim`` or ``final``) that came back. Its
  **result latency** is its arrival minus the send time of the last audio sample it covers
  (its end offset); a result without offsets has no latency, only an arrival.
- :class:`Figure`: one conversation figure of a session, measured from ``start`` (run clock):

  ============== ===================================================================
  figure         measured from -> to
  ============== ===================================================================
  first_interim  an utterance's first speech sample sent -> its first interim result
  final_delay    an utterance's last speech sample sent -> its final result
  barge_in       the first barge-in sample sent -> the bot's returned audio silent
  clear          the first barge-in sample sent -> the bot's Twilio ``clear`` event
  mark           a bot's Twilio ``mark`` arrived -> the audio before it had played (the
                 probe answers it then, as Twilio does)
  ============== ===================================================================

  ``latency_s`` None means the figure never happened within the marker timeout (an utterance
  never finalized, a bot that never fell silent); ``why`` then says so in one phrase.

Per session it also keeps the word error rate of the finals' text against the fixture's script
(:class:`WordErrors`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from probe.measure.stats import LatencyStats

__all__ = [
    "FIGURES",
    "RESULT_KINDS",
    "ConversationLog",
    "Figure",
    "ResultTiming",
    "WordErrors",
]

RESULT_KINDS = ("interim", "final")
FIGURES = ("first_interim", "final_delay", "barge_in", "clear", "mark")


@dataclass(frozen=True, slots=True)
class ResultTiming:
    """One text result that came back on a session's connection (module docstring)."""

    session: str
    kind: str
    arrival: float
    covered_end_sent: float | None
    latency_s: float | None
    text: str
    utterance: int | None = None


@dataclass(frozen=True, slots=True)
class Figure:
    """One conversation figure of a session (module docstring)."""

    session: str
    name: str
    start: float
    latency_s: float | None
    why: str | None = None
    utterance: int | None = None


@dataclass(frozen=True, slots=True)
class WordErrors:
    """A session's finals against its script: word edits needed and words in the script."""

    session: str
    errors: int
    words: int
    hypothesis: str = ""
    reference: str = ""

    @property
    def rate(self) -> float | None:
        return self.errors / self.words if self.words else None


@dataclass
class ConversationLog:
    """Everything conversation timing measured in a run, for its report.

    ``history`` False (a long load test) keeps only counts and the latest values' summaries
    are left to the observers: nothing grows with the run's length."""

    history: bool = True
    # Latencies in seconds, 8 bytes each (a long run's results stay compact).
    results: dict[str, LatencyStats] = field(
        default_factory=lambda: {k: LatencyStats() for k in RESULT_KINDS}
    )
    results_count: Counter[str] = field(default_factory=Counter)
    # Results that came back without offsets (no latency can be measured for them).
    results_unplaced: Counter[str] = field(default_factory=Counter)
    # Messages that looked like results but broke the configured shape, per reason.
    malformed: Counter[str] = field(default_factory=Counter)
    figures: dict[str, LatencyStats] = field(
        default_factory=lambda: {k: LatencyStats() for k in FIGURES}
    )
    figures_missed: dict[str, Counter[str]] = field(
        default_factory=lambda: {k: Counter() for k in FIGURES}
    )
    talked_over: int = 0
    barge_ins: int = 0
    bot_marks: int = 0
    words: list[WordErrors] = field(default_factory=list)
    _errors: int = 0
    _ref_words: int = 0

    def result(self, r: ResultTiming) -> None:
        self.results_count[r.kind] += 1
        if r.latency_s is None:
            self.results_unplaced[r.kind] += 1
        elif self.history:
            self.results.setdefault(r.kind, LatencyStats()).add(r.latency_s)

    def figure(self, f: Figure) -> None:
        if f.latency_s is None:
            self.figures_missed.setdefault(f.name, Counter())[f.why or "missed"] += 1
        elif self.history:
            self.figures.setdefault(f.name, LatencyStats()).add(f.latency_s)

    def word_errors(self, w: WordErrors) -> None:
        self._errors += w.errors
        self._ref_words += w.words
        if self.history:
            self.words.append(w)

    @property
    def active(self) -> bool:
        return bool(
            sum(self.results_count.values())
            or sum(self.malformed.values())
            or any(len(v) for v in self.figures.values())
            or any(sum(c.values()) for c in self.figures_missed.values())
            or self._ref_words
            or self.barge_ins
            or self.bot_marks
        )

    def report(self) -> dict[str, Any]:
        """The report's ``conversation`` section (docs/report.md)."""
        results: dict[str, Any] = {
            kind: {
                "count": self.results_count[kind],
                "without_offsets": self.results_unplaced[kind],
                "latency_ms": self.results.get(kind, LatencyStats()).summary_ms(),
            }
            for kind in RESULT_KINDS
        }
        results["all"] = {
            "count": sum(self.results_count.values()),
            "without_offsets": sum(self.results_unplaced.values()),
            "latency_ms": LatencyStats(
                np.concatenate([self.results.get(k, LatencyStats()).values() for k in RESULT_KINDS])
            ).summary_ms(),
        }
        out: dict[str, Any] = {
            "results": results,
            "malformed_results": dict(sorted(self.malformed.items())),
        }
        for name in FIGURES:
            missed = self.figures_missed.get(name, Counter())
            out[name] = {
                "latency_ms": self.figures.get(name, LatencyStats()).summary_ms(),
                "missed": sum(missed.values()),
                "missed_why": dict(sorted(missed.items())),
            }
        out["barge_in"]["attempts"] = self.barge_ins
        out["barge_in"]["talked_over"] = self.talked_over
        out["bot_marks"] = self.bot_marks
        out["wer"] = {
            "rate": round(self._errors / self._ref_words, 4) if self._ref_words else None,
            "errors": self._errors,
            "words": self._ref_words,
            "sessions": [
                {
                    "session": w.session,
                    "rate": round(w.rate, 4) if w.rate is not None else None,
                    "errors": w.errors,
                    "words": w.words,
                    "heard": w.hypothesis,
                    "script": w.reference,
                }
                for w in self.words
            ],
        }
        return out
