"""The `--hops SPEC` language of the reference pipeline: parse, validate, print. Pure.

A spec is comma-separated hops, each `name:delay[:option]...`:

    asr:20ms,codec:35ms~5ms:mulaw8k:loss=2,tts:50ms->2s@3s:gain=-6:noise=30

- `name`: 1-64 characters of `[A-Za-z0-9._-]`, unique in the spec (it names the hop's fork).
- `delay`: `20ms`, `1.5s` or `0`; `20ms~5ms` adds uniform jitter of +-5 ms (seeded); `50ms->2s@3s`
  steps the delay from 50 ms to 2 s at 3 s into the session (each side may carry its own `~jitter`).
- options: `mulaw8k` / `alaw8k` (the hop emits 8 kHz G.711), `rate=HZ` (the hop resamples),
  `gain=DB`, `noise=SNR_DB` (white noise at that SNR below the signal's running power),
  `loss=PCT` (zero-fill that percentage of 20 ms frames, seeded), `stall@S` (emit nothing after S
  seconds of the session), `close@S` (close the ingress connection with 1011 after S seconds),
  `garbage` (the hop's fork sends a non-JSON first message and random bytes), `nofork` (no fork),
  `refuse` (ingress closes with 1008 at start; first hop only). `S` takes `ms` or `s`, seconds if
  bare.

A text hop (last hop only) stands in for a streaming speech-to-text service: it consumes the
audio that reaches it and sends JSON text results on the client connection (see `stt.py`):

    name:DELAY:text[=seed|deepgram|generic][:every=DUR][:endpoint=DUR][:nooffsets][:nofinal][:badjson]

- `text=PRESET`: the JSON shape of its results (default `seed`); `every=DUR` (default 250ms): an
  interim result per that much of an utterance's audio; `endpoint=DUR` (default 250ms): the
  non-speech that ends an utterance. An interim is sent DELAY after the audio it covers up to
  arrived, a final DELAY after the endpoint. `DELAY` is a plain delay (no jitter or step).
- faults: `nooffsets` (results carry no offsets), `nofinal` (no final results), `badjson` (every
  third result is not valid JSON).
- a text hop takes no audio options (it emits no audio, so it has no fork either).

A reply hop (last hop only) is a loopback voice bot that answers in its own voice (see `bot.py`
for its exact rules): it consumes the audio that reaches it and sends its reply on the client
connection (binary audio frames in the ingress format, or Twilio `media`, `mark` and `clear`
events):

    name:DELAY:reply[:stop=DUR][:say=DUR][:talkover][:noclear]

- `DELAY`: from the end of the caller's utterance (one past its last 10 ms frame above -50
  dBFS, once 200 ms of non-speech follow) to the first reply frame; below 200 ms the reply
  starts when the end is known, 200 ms after it. A plain delay (no jitter or step).
- `say=DUR` (default 2s): how long each reply is (speech from the `speech_en_gb` fixture, in
  20 ms frames paced in real time; in Twilio a `mark` named `reply-N` after its last media).
- `stop=DUR` (default 100ms): barge-in, caller speech starting while the bot talks makes it fall
  silent that long after (in Twilio a `clear` at that instant, unless `noclear`).
- `talkover` (a fault): the bot resumes the rest of its reply 300 ms after stopping.
- a reply hop takes no audio options and has no fork.

Every mistake raises `ConfigError` with one sentence naming the piece that is wrong.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from probe.errors import ConfigError
from probe.pipeline.bot import ENDPOINT, RESUME_AFTER, ReplyConfig
from probe.pipeline.bot import format_duration as _fmt

__all__ = [
    "MAX_DELAY",
    "TEXT_PRESETS",
    "Codec",
    "HopSpec",
    "ReplyConfig",
    "TextPreset",
    "TextSpec",
    "check_hops",
    "format_hops",
    "parse_hops",
]

Codec = Literal["mulaw", "alaw"]
TextPreset = Literal["seed", "deepgram", "generic"]
TEXT_PRESETS: tuple[TextPreset, ...] = ("seed", "deepgram", "generic")
_TEXT_DEFAULT_EVERY = 0.25
_TEXT_DEFAULT_ENDPOINT = 0.25
_TEXT_MIN_DUR = 0.01

MAX_DELAY = 60.0  # seconds; bounds the audio a hop holds per session
_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_NUMBER = r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+"
_DURATION = re.compile(rf"({_NUMBER})(ms|s)?")
_RATE_MIN, _RATE_MAX = 8000, 48000


@dataclass(frozen=True, slots=True)
class TextSpec:
    """What a text hop does besides its delay (module docstring). Times are in seconds."""

    preset: TextPreset = "seed"
    every: float = _TEXT_DEFAULT_EVERY
    endpoint: float = _TEXT_DEFAULT_ENDPOINT
    offsets: bool = True
    final: bool = True
    badjson: bool = False

    def __post_init__(self) -> None:
        if self.preset not in TEXT_PRESETS:
            raise ConfigError(
                f"The text preset must be one of {', '.join(TEXT_PRESETS)}, got {self.preset!r}."
            )
        for label, value in (("every", self.every), ("endpoint", self.endpoint)):
            if not math.isfinite(value) or not _TEXT_MIN_DUR <= value <= MAX_DELAY:
                raise ConfigError(
                    f"The text option {label}= must be from {_fmt(_TEXT_MIN_DUR)} to "
                    f"{MAX_DELAY:g} s, got {value!r}."
                )

    def options(self) -> list[str]:
        """This text hop's options in `--hops` syntax (after `name:DELAY`)."""
        parts = ["text" if self.preset == "seed" else f"text={self.preset}"]
        if self.every != _TEXT_DEFAULT_EVERY:
            parts.append(f"every={_fmt(self.every)}")
        if self.endpoint != _TEXT_DEFAULT_ENDPOINT:
            parts.append(f"endpoint={_fmt(self.endpoint)}")
        return parts + [flag for flag, on in (("nooffsets", not self.offsets),
                                              ("nofinal", not self.final),
                                              ("badjson", self.badjson)) if on]


@dataclass(frozen=True, slots=True)
class HopSpec:
    """One hop of the reference pipeline. Times are in seconds; validated on construction."""

    name: str
    delay: float = 0.0
    jitter: float = 0.0
    step_delay: float | None = None
    step_jitter: float = 0.0
    step_at: float | None = None
    codec: Codec | None = None
    rate: int | None = None
    gain_db: float | None = None
    noise_snr_db: float | None = None
    loss_pct: float = 0.0
    stall_at: float | None = None
    close_at: float | None = None
    garbage: bool = False
    fork: bool = True
    refuse: bool = False
    text: TextSpec | None = None
    reply: ReplyConfig | None = None

    def __post_init__(self) -> None:
        where = f"hop {self.name!r}"
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise ConfigError(
                f"Hop name {self.name!r} must be 1-64 characters of A-Z a-z 0-9 . _ -."
            )
        for label, value in (("delay", self.delay), ("jitter", self.jitter),
                             ("step delay", self.step_delay), ("step jitter", self.step_jitter)):
            if value is None:
                continue
            if not math.isfinite(value) or not 0.0 <= value <= MAX_DELAY:
                raise ConfigError(
                    f"The {label} of {where} must be from 0 to {MAX_DELAY:g} s, got {value!r}."
                )
        if self.jitter > self.delay:
            raise ConfigError(
                f"The jitter of {where} ({_fmt(self.jitter)}) exceeds its delay "
                f"({_fmt(self.delay)}); a delay cannot go below zero."
            )
        if (self.step_delay is None) != (self.step_at is None):
            raise ConfigError(f"A delay step of {where} needs both a new delay and a time.")
        if self.step_delay is not None and self.step_jitter > self.step_delay:
            raise ConfigError(
                f"The jitter after the delay step of {where} ({_fmt(self.step_jitter)}) exceeds "
                f"its delay ({_fmt(self.step_delay)})."
            )
        for label, at in (("step time", self.step_at), ("stall time", self.stall_at),
                          ("close time", self.close_at)):
            if at is not None and (not math.isfinite(at) or at < 0.0):
                raise ConfigError(f"The {label} of {where} must be a time >= 0, got {at!r}.")
        if self.codec not in (None, "mulaw", "alaw"):
            raise ConfigError(f"The codec of {where} must be mulaw or alaw, got {self.codec!r}.")
        if self.rate is not None and (
            isinstance(self.rate, bool) or not isinstance(self.rate, int)
            or not _RATE_MIN <= self.rate <= _RATE_MAX
        ):
            raise ConfigError(
                f"The rate of {where} must be a whole number of Hz from {_RATE_MIN} to "
                f"{_RATE_MAX}, got {self.rate!r}."
            )
        if self.codec is not None and self.rate not in (None, 8000):
            raise ConfigError(
                f"{where.capitalize()} emits 8 kHz {self.codec} and cannot also set rate="
                f"{self.rate}; drop one of them."
            )
        if self.gain_db is not None and not -120.0 <= self.gain_db <= 60.0:
            raise ConfigError(
                f"The gain of {where} must be from -120 to 60 dB, got {self.gain_db}."
            )
        if self.noise_snr_db is not None and not -60.0 <= self.noise_snr_db <= 120.0:
            raise ConfigError(
                f"The noise SNR of {where} must be from -60 to 120 dB, got {self.noise_snr_db}."
            )
        if not 0.0 <= self.loss_pct <= 100.0:
            raise ConfigError(f"The loss of {where} must be from 0 to 100 %, got {self.loss_pct}.")
        if self.text is not None:
            self._check_text(where)
        if self.reply is not None:
            self._check_reply(where)

    def _check_text(self, where: str) -> None:
        if not isinstance(self.text, TextSpec):
            raise ConfigError(f"The text of {where} must be a TextSpec, not {self.text!r}.")
        audio = self._audio_options()
        if audio:
            raise ConfigError(
                f"{where.capitalize()} is a text hop and takes only text options (text=, every=, "
                f"endpoint=, nooffsets, nofinal, badjson), not {', '.join(audio)}."
            )

    def _audio_options(self) -> list[str]:
        """The options given that only a hop passing audio on can take."""
        return [label for label, on in (
            ("jitter", self.jitter > 0.0), ("a delay step", self.step_delay is not None),
            ("mulaw8k/alaw8k", self.codec is not None), ("rate=", self.rate is not None),
            ("gain=", self.gain_db is not None), ("noise=", self.noise_snr_db is not None),
            ("loss=", self.loss_pct > 0.0), ("stall@", self.stall_at is not None),
            ("close@", self.close_at is not None), ("garbage", self.garbage),
            ("nofork", not self.fork), ("refuse", self.refuse),
        ) if on]

    def _check_reply(self, where: str) -> None:
        if not isinstance(self.reply, ReplyConfig):
            raise ConfigError(f"The reply of {where} must be a ReplyConfig, not {self.reply!r}.")
        audio = (["text"] if self.text is not None else []) + self._audio_options()
        if audio:
            raise ConfigError(
                f"{where.capitalize()} is a reply hop and takes only reply options (stop=, say=, "
                f"talkover, noclear), not {', '.join(audio)}."
            )

    def delay_at(self, session_time: float) -> tuple[float, float]:
        """(delay, jitter) in force at `session_time` seconds into the session."""
        if self.step_at is not None and self.step_delay is not None and (
            session_time >= self.step_at
        ):
            return self.step_delay, self.step_jitter
        return self.delay, self.jitter

    @property
    def max_delay(self) -> float:
        """The largest delay this hop can apply, jitter included."""
        step = 0.0 if self.step_delay is None else self.step_delay + self.step_jitter
        endpoint = 0.0 if self.text is None else self.text.endpoint
        if self.reply is not None:  # the bot may still be talking this long after the input
            r = self.reply
            endpoint += ENDPOINT + r.say + (r.stop + RESUME_AFTER if r.talkover else 0.0)
        return max(self.delay + self.jitter, step) + endpoint

    def to_spec(self) -> str:
        """This hop in `--hops` syntax; `parse_hops(h.to_spec()) == [h]`."""
        delay = _fmt(self.delay) + (f"~{_fmt(self.jitter)}" if self.jitter else "")
        if self.step_delay is not None and self.step_at is not None:
            delay += "->" + _fmt(self.step_delay)
            delay += f"~{_fmt(self.step_jitter)}" if self.step_jitter else ""
            delay += "@" + _fmt(self.step_at)
        parts = [self.name, delay]
        if self.text is not None:
            return ":".join(parts + self.text.options())
        if self.reply is not None:
            return ":".join([*parts, "reply", *self.reply.options()])
        if self.codec is not None:
            parts.append(f"{self.codec}8k")
        if self.rate is not None and self.codec is None:
            parts.append(f"rate={self.rate}")
        if self.gain_db is not None:
            parts.append(f"gain={self.gain_db:g}")
        if self.noise_snr_db is not None:
            parts.append(f"noise={self.noise_snr_db:g}")
        if self.loss_pct:
            parts.append(f"loss={self.loss_pct:g}")
        if self.stall_at is not None:
            parts.append(f"stall@{_fmt(self.stall_at)}")
        if self.close_at is not None:
            parts.append(f"close@{_fmt(self.close_at)}")
        parts += [flag for flag, on in (("garbage", self.garbage), ("nofork", not self.fork),
                                         ("refuse", self.refuse)) if on]
        return ":".join(parts)


def _duration(text: str, what: str, *, bare_seconds: bool) -> float:
    m = _DURATION.fullmatch(text)
    if m is None:
        raise ConfigError(f"{what} {text!r} is not a duration; write it like 20ms or 1.5s.")
    value = float(m.group(1))
    unit = m.group(2)
    if unit is None and value != 0.0 and not bare_seconds:
        raise ConfigError(f"{what} {text!r} needs a unit; write it like 20ms or 1.5s.")
    return value / 1000.0 if unit == "ms" else value


def _delay_part(text: str, where: str) -> tuple[float, float]:
    base, sep, jitter = text.partition("~")
    delay = _duration(base, f"The delay of {where}", bare_seconds=False)
    if not sep:
        return delay, 0.0
    return delay, _duration(jitter, f"The jitter of {where}", bare_seconds=False)


def _number(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{what} {text!r} is not a number.") from None
    if not math.isfinite(value):
        raise ConfigError(f"{what} {text!r} must be a finite number.")
    return value


def _hop(piece: str) -> HopSpec:
    fields = piece.split(":")
    name = fields[0]
    if not _NAME.fullmatch(name):
        raise ConfigError(
            f"Hop name {name!r} in {piece!r} must be 1-64 characters of A-Z a-z 0-9 . _ -."
        )
    where = f"hop {name!r}"
    if len(fields) < 2 or not fields[1]:
        raise ConfigError(f"Hop {piece!r} has no delay; write it as name:delay, like {name}:20ms.")
    args: dict[str, object] = {"name": name}
    first, arrow, rest = fields[1].partition("->")
    args["delay"], args["jitter"] = _delay_part(first, where)
    if arrow:
        after, at_sign, at = rest.partition("@")
        if not at_sign:
            raise ConfigError(
                f"The delay step {fields[1]!r} of {where} needs a time; write it like 50ms->2s@3s."
            )
        args["step_delay"], args["step_jitter"] = _delay_part(after, where)
        args["step_at"] = _duration(at, f"The step time of {where}", bare_seconds=True)
    seen: set[str] = set()
    text: dict[str, object] | None = None
    text_options: list[str] = []
    reply = False
    reply_options: list[str] = []
    for option in fields[2:]:
        key = re.split(r"[=@]", option, maxsplit=1)[0]
        if key in seen:
            raise ConfigError(f"Option {key!r} is given twice for {where}.")
        seen.add(key)
        value = option[len(key) + 1:]
        if option in ("mulaw8k", "alaw8k"):
            if "codec" in args:
                raise ConfigError(f"{where.capitalize()} can take only one of mulaw8k and alaw8k.")
            args["codec"] = option[:-2]
        elif option in ("garbage", "refuse"):
            args[option] = True
        elif option == "nofork":
            args["fork"] = False
        elif option.startswith("rate="):
            rate = _number(value, f"The rate of {where}")
            if not rate.is_integer():
                raise ConfigError(
                    f"The rate of {where} must be a whole number of Hz, got {value!r}."
                )
            args["rate"] = int(rate)
        elif option.startswith("gain="):
            args["gain_db"] = _number(value, f"The gain of {where}")
        elif option.startswith("noise="):
            args["noise_snr_db"] = _number(value, f"The noise SNR of {where}")
        elif option.startswith("loss="):
            args["loss_pct"] = _number(value.removesuffix("%"), f"The loss of {where}")
        elif option.startswith("stall@"):
            args["stall_at"] = _duration(value, f"The stall time of {where}", bare_seconds=True)
        elif option.startswith("close@"):
            args["close_at"] = _duration(value, f"The close time of {where}", bare_seconds=True)
        elif option == "text" or option.startswith("text="):
            text = {} if option == "text" else {"preset": _text_preset(value, where)}
        elif key in ("every", "endpoint", "nooffsets", "nofinal", "badjson"):
            text_options.append(option)
        elif option == "reply":
            reply = True
        elif key in ("stop", "say", "talkover", "noclear"):
            reply_options.append(option)
        else:
            raise ConfigError(
                f"Unknown option {option!r} for {where}; use mulaw8k, alaw8k, rate=HZ, gain=DB, "
                "noise=SNR_DB, loss=PCT, stall@S, close@S, garbage, nofork, refuse, text "
                "(with every=DUR, endpoint=DUR, nooffsets, nofinal, badjson) or reply (with "
                "stop=DUR, say=DUR, talkover, noclear)."
            )
    if text_options and text is None:
        raise ConfigError(
            f"Option {text_options[0]!r} of {where} belongs to a text hop; add the text option, "
            f"like {name}:150ms:text:{text_options[0]}."
        )
    if text is not None:
        args["text"] = TextSpec(**_text_args(text, text_options, where))  # type: ignore[arg-type]
    if reply_options and not reply:
        raise ConfigError(
            f"Option {reply_options[0]!r} of {where} belongs to a reply hop; add the reply "
            f"option, like {name}:800ms:reply:{reply_options[0]}."
        )
    if reply:
        args["reply"] = _reply_config(reply_options, where)
    return HopSpec(**args)  # type: ignore[arg-type]


def _text_preset(value: str, where: str) -> str:
    if value not in TEXT_PRESETS:
        raise ConfigError(
            f"The text preset {value!r} of {where} is unknown; use {', '.join(TEXT_PRESETS)}."
        )
    return value


def _text_args(args: dict[str, object], options: list[str], where: str) -> dict[str, object]:
    for option in options:
        key, _, value = option.partition("=")
        if key in ("every", "endpoint"):
            if not value:
                raise ConfigError(f"The text option {key}= of {where} needs a duration, like "
                                  f"{key}=250ms.")
            args[key] = _duration(value, f"The text option {key}= of {where}", bare_seconds=False)
        elif value or option != key:
            raise ConfigError(f"The text option {key!r} of {where} takes no value.")
        else:
            args[{"nooffsets": "offsets", "nofinal": "final", "badjson": "badjson"}[key]] = (
                key == "badjson"
            )
    return args


def _reply_config(options: list[str], where: str) -> ReplyConfig:
    args: dict[str, float | bool] = {}
    for option in options:
        key, _, value = option.partition("=")
        if key in ("stop", "say"):
            if not value:
                raise ConfigError(f"The reply option {key}= of {where} needs a duration, like "
                                  f"{key}=100ms.")
            args[key] = _duration(value, f"The reply option {key}= of {where}",
                                  bare_seconds=False)
        elif option != key:
            raise ConfigError(f"The reply option {key!r} of {where} takes no value.")
        else:
            args["talkover" if key == "talkover" else "clear"] = key == "talkover"
    try:
        return ReplyConfig(**args)  # type: ignore[arg-type]
    except ConfigError as exc:
        text = str(exc)
        raise ConfigError(f"In {where}, {text[:1].lower()}{text[1:]}") from None


def parse_hops(text: str) -> list[HopSpec]:
    """Parse a `--hops` spec into hops, in pipeline order."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError("The hop spec is empty; give at least one hop, like asr:20ms.")
    hops: list[HopSpec] = []
    for raw in text.split(","):
        piece = raw.strip()
        if not piece:
            raise ConfigError(f"The hop spec {text!r} has an empty hop between commas.")
        hops.append(_hop(piece))
        check_hops(hops)
    return hops


def check_hops(hops: Sequence[HopSpec]) -> None:
    """Check what no single hop can: unique names, and `refuse` only on the first hop."""
    seen: set[str] = set()
    for i, hop in enumerate(hops):
        if not isinstance(hop, HopSpec):
            raise ConfigError(f"Hop {i + 1} is not a HopSpec but {type(hop).__name__}.")
        if hop.name in seen:
            raise ConfigError(f"Hop name {hop.name!r} is used twice; hop names must be unique.")
        seen.add(hop.name)
        if hop.refuse and i:
            raise ConfigError(f"Only the first hop can refuse streams, not hop {hop.name!r}.")
        if hop.text is not None and i != len(hops) - 1:
            raise ConfigError(
                f"Text hop {hop.name!r} must be the last hop; it turns audio into text, so no "
                "hop can follow it."
            )
        if hop.reply is not None and i != len(hops) - 1:
            raise ConfigError(
                f"Reply hop {hop.name!r} must be the last hop; it answers in its own voice, so "
                "no hop can follow it."
            )


def format_hops(hops: Iterable[HopSpec]) -> str:
    """The `--hops` text of `hops` (the inverse of `parse_hops`)."""
    return ",".join(h.to_spec() for h in hops)
