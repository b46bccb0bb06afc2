"""Scenarios: a probe run and its thresholds, kept in a TOML file (``scenarios/*.toml``).

Every key is optional except that a canary needs a target from somewhere (the file, ``--target``
or ``PROBE_TARGET``). Besides the run options (:data:`probe.config.OPTIONS`, by name: ``target``,
``sessions``, ``hop_order``..., all but ``json``; a relative fixture path is relative to the file)
a scenario has ``name`` (default: the file's stem), ``description`` (text, for people) and
``thresholds`` (a list of threshold strings, see :mod:`probe.canary.thresholds`).

The run options are checked by the same rules as the flags and
``PROBE_*`` variables. An unknown key, a wrong type or a bad value is a
:class:`~probe.errors.ConfigError` whose one sentence names the file and the key. Loading is pure
apart from reading the file.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from probe.canary.thresholds import Threshold, parse_threshold
from probe.config import OPTION, OPTIONS
from probe.errors import ConfigError

__all__ = ["KEYS", "Scenario", "load_scenario", "load_scenario_dir", "parse_scenario"]

KEYS = ("name", "description", *(o.name for o in OPTIONS if o.scenario), "thresholds")
_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass(frozen=True)
class Scenario:
    """A loaded scenario: ``options`` holds only the keys the file set, checked, under the names
    of the run options (``sink_listen``, ``hop_order`` as a tuple, ...)."""

    name: str
    path: str | None = None
    description: str = ""
    options: Mapping[str, Any] = field(default_factory=dict)
    thresholds: tuple[Threshold, ...] = ()


def parse_scenario(
    data: Mapping[str, Any], *, name: str, path: str | None = None, base: Path | None = None
) -> Scenario:
    """Validate a scenario's table (already parsed from TOML)."""
    where = f"Scenario {path or name!r}"
    unknown = [k for k in data if k not in KEYS]
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known keys: {', '.join(KEYS)}).")
    opts: dict[str, Any] = {}
    for key, v in data.items():
        if key in ("name", "description", "thresholds"):
            continue
        opts[key] = OPTION[key].check(v, f"{where}: key {key!r}")
        if key == "fixture":
            fx = opts[key]
            is_path = "/" in fx or fx.endswith(".wav")
            if base is not None and is_path and not Path(fx).is_absolute():
                opts[key] = os.fspath(base / fx)
    thresholds: list[Threshold] = []
    raw = data.get("thresholds", [])
    if not isinstance(raw, list):
        raise ConfigError(f"{where}: key 'thresholds' must be a list of strings, got {raw!r}.")
    for i, t in enumerate(raw):
        if not isinstance(t, str):
            raise ConfigError(f"{where}: key 'thresholds' item {i} must be a string, got {t!r}.")
        try:
            thresholds.append(parse_threshold(t))
        except ConfigError as exc:
            raise ConfigError(f"{where}: key 'thresholds' item {i}: {exc}") from None
    scenario_name = name
    if "name" in data:
        scenario_name = data["name"]
        if not isinstance(scenario_name, str) or not _NAME_RE.fullmatch(scenario_name):
            raise ConfigError(
                f"{where}: key 'name' must be 1-64 characters of A-Z a-z 0-9 . _ -, "
                f"got {scenario_name!r}."
            )
    description = ""
    if "description" in data:
        description = data["description"]
        if not isinstance(description, str):
            raise ConfigError(f"{where}: key 'description' must be text, got {description!r}.")
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
