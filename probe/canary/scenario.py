"""Scenarios: a probe run and its thresholds, kept in a TOML file (``scenarios/*.toml``).

Every key is optional except that a canary needs a target from somewhere (the file or
``--target``). Keys and their meaning (the ``probe run`` option of the same name)::

    name            text; defaults to the file's stem
    description     text, for people
    target          ws:// or wss:// URL; {session} is replaced by the session id
    dialect         "probe" | "twilio"
    fixture         fixture name, or a WAV path (relative paths are relative to the file)
    sessions        integer >= 1
    concurrency     integer >= 1
    duration        seconds per session, > 0.5
    rate            sample rate, 8000 to 48000
    encoding        "pcm_s16le" | "pcm_f32le" | "mulaw" | "alaw"
    frame_ms        milliseconds per frame, > 0 and <= 1000
    every           seconds between markers, > 0
    hop_order       list of hop names (or one comma-separated string)
    marker_timeout  seconds, > 0
    sink_listen     "HOST:PORT"
    sink_url        ws:// or wss:// URL the hops should fork to
    no_sink         boolean
    reply           boolean: the system answers in its own voice; time the reply
    utterance       seconds per utterance (reply), >= 0.5
    gap             seconds of silence after each utterance (reply), >= 0.2
    reply_threshold dBFS a reply must exceed (reply), -120 to 0
    thresholds      list of threshold strings (see probe.canary.thresholds)

An unknown key, a wrong type or a bad value is a :class:`~probe.errors.ConfigError` whose one
sentence names the file and the key. Loading is pure apart from reading the file.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from probe.canary.thresholds import Threshold, parse_threshold
from probe.errors import ConfigError
from probe.hostport import parse_host_port

__all__ = ["KEYS", "Scenario", "load_scenario", "load_scenario_dir", "parse_scenario"]

KEYS = (
    "name",
    "description",
    "target",
    "dialect",
    "fixture",
    "sessions",
    "concurrency",
    "duration",
    "rate",
    "encoding",
    "frame_ms",
    "every",
    "hop_order",
    "marker_timeout",
    "sink_listen",
    "sink_url",
    "no_sink",
    "reply",
    "utterance",
    "gap",
    "reply_threshold",
    "thresholds",
)
ENCODINGS = ("pcm_s16le", "pcm_f32le", "mulaw", "alaw")
_HOP_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass(frozen=True)
class Scenario:
    """A loaded scenario: ``options`` holds only the keys the file set, under the names of the
    ``probe run`` options (``sink_listen``, ``hop_order`` as a comma-separated string, ...)."""

    name: str
    path: str | None = None
    description: str = ""
    options: Mapping[str, Any] = field(default_factory=dict)
    thresholds: tuple[Threshold, ...] = ()


class _Checker:
    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.where}: key {key!r} {problem}.")

    def text(self, key: str, v: Any) -> str:
        if not isinstance(v, str) or not v.strip():
            raise self.fail(key, f"must be a non-empty string, got {v!r}")
        return v.strip()

    def integer(self, key: str, v: Any, lo: int, hi: int | None = None) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
            span = f"from {lo} to {hi}" if hi is not None else f"of {lo} or more"
            raise self.fail(key, f"must be an integer {span}, got {v!r}")
        return v

    def number(self, key: str, v: Any, *, above: float, at_most: float | None = None) -> float:
        ok = (
            not isinstance(v, bool)
            and isinstance(v, int | float)
            and math.isfinite(v)
            and v > above
            and (at_most is None or v <= at_most)
        )
        if not ok:
            span = f"more than {above:g}" + (
                f" and at most {at_most:g}" if at_most is not None else ""
            )
            raise self.fail(key, f"must be a number {span}, got {v!r}")
        return float(v)

    def url(self, key: str, v: Any) -> str:
        s = self.text(key, v)
        if not s.startswith(("ws://", "wss://")):
            raise self.fail(key, f"must be a ws:// or wss:// URL, got {s!r}")
        return s

    def choice(self, key: str, v: Any, choices: tuple[str, ...]) -> str:
        if v not in choices:
            raise self.fail(key, f"must be one of {', '.join(choices)}, got {v!r}")
        return str(v)


def parse_scenario(
    data: Mapping[str, Any], *, name: str, path: str | None = None, base: Path | None = None
) -> Scenario:
    """Validate a scenario's table (already parsed from TOML)."""
    where = f"Scenario {path or name!r}"
    c = _Checker(where)
    unknown = [k for k in data if k not in KEYS]
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known keys: {', '.join(KEYS)}).")
    opts: dict[str, Any] = {}
    for key, v in data.items():
        if key in ("name", "description", "thresholds"):
            continue
        if key in ("target", "sink_url"):
            opts[key] = c.url(key, v)
        elif key == "dialect":
            opts[key] = c.choice(key, v, ("probe", "twilio"))
        elif key == "encoding":
            opts[key] = c.choice(key, v, ENCODINGS)
        elif key == "fixture":
            fx = c.text(key, v)
            if (
                base is not None
                and ("/" in fx or fx.endswith(".wav"))
                and not Path(fx).is_absolute()
            ):
                fx = os.fspath(base / fx)
            opts[key] = fx
        elif key in ("sessions", "concurrency"):
            opts[key] = c.integer(key, v, 1)
        elif key == "rate":
            opts[key] = c.integer(key, v, 8000, 48000)
        elif key == "duration":
            opts[key] = c.number(key, v, above=0.5)
        elif key == "frame_ms":
            opts[key] = c.number(key, v, above=0.0, at_most=1000.0)
        elif key in ("every", "marker_timeout"):
            opts[key] = c.number(key, v, above=0.0)
        elif key == "sink_listen":
            s = c.text(key, v)
            try:
                parse_host_port(s, key)
            except ConfigError:
                why = f"must be HOST:PORT with a port from 0 to 65535, got {s!r}"
                raise c.fail(key, why) from None
            opts[key] = s
        elif key == "utterance":
            opts[key] = c.number(key, v, above=0.0)
            if opts[key] < 0.5:
                raise c.fail(key, f"must be at least 0.5 seconds, got {v!r}")
        elif key == "gap":
            opts[key] = c.number(key, v, above=0.0)
            if opts[key] < 0.2:
                raise c.fail(key, f"must be at least 0.2 seconds, got {v!r}")
        elif key == "reply_threshold":
            opts[key] = c.number(key, v, above=-120.0, at_most=0.0)
        elif key in ("no_sink", "reply"):
            if not isinstance(v, bool):
                raise c.fail(key, f"must be true or false, got {v!r}")
            opts[key] = v
        elif key == "hop_order":
            items = v.split(",") if isinstance(v, str) else v
            if not isinstance(items, list) or not items:
                raise c.fail(key, f"must be a list of hop names, got {v!r}")
            names = [h.strip() if isinstance(h, str) else h for h in items]
            bad = [h for h in names if not isinstance(h, str) or not _HOP_RE.fullmatch(h)]
            if bad:
                raise c.fail(key, f"holds {bad[0]!r}, not a hop name (1-64 of A-Z a-z 0-9 . _ -)")
            opts[key] = ",".join(names)
    thresholds: list[Threshold] = []
    raw = data.get("thresholds", [])
    if not isinstance(raw, list):
        raise c.fail("thresholds", f"must be a list of strings, got {raw!r}")
    for i, t in enumerate(raw):
        if not isinstance(t, str):
            raise c.fail("thresholds", f"item {i} must be a string, got {t!r}")
        try:
            thresholds.append(parse_threshold(t))
        except ConfigError as exc:
            raise ConfigError(f"{where}: key 'thresholds' item {i}: {exc}") from None
    scenario_name = name
    if "name" in data:
        scenario_name = c.text("name", data["name"])
        if not _NAME_RE.fullmatch(scenario_name):
            raise c.fail(
                "name", f"must be 1-64 characters of A-Z a-z 0-9 . _ -, got {scenario_name!r}"
            )
    description = c.text("description", data["description"]) if "description" in data else ""
    return Scenario(
        name=scenario_name,
        path=path,
        description=description,
        options=opts,
        thresholds=tuple(thresholds),
    )


def load_scenario(path: str | os.PathLike[str]) -> Scenario:
    """Read and validate one scenario file."""
    p = Path(path)
    shown = os.fspath(path)
    if p.suffix != ".toml":
        raise ConfigError(f"Scenario {shown!r} must be a .toml file.")
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"Cannot read scenario {shown!r}: {exc.strerror or exc}.") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"Scenario {shown!r} is not UTF-8 text.") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"Scenario {shown!r} is not valid TOML: {exc}.") from None
    return parse_scenario(data, name=p.stem, path=shown, base=p.parent)


def load_scenario_dir(directory: str | os.PathLike[str]) -> dict[str, Scenario]:
    """Every ``*.toml`` scenario in ``directory``, by name; two with one name is an error."""
    d = Path(directory)
    if not d.is_dir():
        raise ConfigError(f"Scenario directory {os.fspath(directory)!r} does not exist.")
    out: dict[str, Scenario] = {}
    for f in sorted(d.glob("*.toml")):
        s = load_scenario(f)
        if s.name in out:
            raise ConfigError(
                f"Scenarios {out[s.name].path!r} and {os.fspath(f)!r} share the name {s.name!r}."
            )
        out[s.name] = s
    return out
