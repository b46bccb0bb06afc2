"""Run options: one table says what each option means, its default, its rule, and where it can
be given (``probe`` flag, scenario key, environment variable, Locust user attribute).

Where an option comes from, in order of precedence:

- ``probe run`` / ``probe canary``: the command-line flag, then (canary, exporter) the scenario
  file's key, then the ``PROBE_*`` environment variable, then the default;
- Locust: the ``PROBE_*`` environment variable, then the user class's attribute (or the engine's
  default for the sink options).

Every value, whatever its source, passes the same rule, and a bad one is a
:class:`~probe.errors.ConfigError` whose one sentence names it as the user wrote it (``--sessions``,
``Scenario 'x.toml': key 'sessions'``, ``PROBE_MARKER_TIMEOUT``). This module also holds the one
``HOST:PORT`` rule of every listen option. Pure: it reads no file and no environment itself.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from probe.errors import ConfigError
from probe.measure.admission import MAX_FORKS
from probe.watermark.design import DEFAULT_LEVEL_DB, MARKER_S, SUPPORTED_RATES

if TYPE_CHECKING:
    from probe.audio.formats import Encoding

__all__ = [
    "ENCODINGS",
    "LOOPBACK",
    "OPTIONS",
    "EngineConfig",
    "Option",
    "RunOptions",
    "add_run_options",
    "check_url",
    "env_options",
    "flag_type",
    "given_options",
    "integer_rule",
    "locust_env",
    "number_rule",
    "parse_host_port",
    "run_defaults",
    "run_options",
]

LOOPBACK = "127.0.0.1"
ENCODINGS = ("pcm_s16le", "pcm_f32le", "mulaw", "alaw")
DIALECTS = ("probe", "twilio")
RESULT_PRESETS = ("seed", "deepgram", "generic")
_HOP_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")


def parse_host_port(text: str, what: str) -> tuple[str, int]:
    """``text`` as (host, port); ``what`` names the option in the error.

    ``HOST:PORT`` or ``[v6]:PORT`` with a port from 0 to 65535 (0: any free port); a ``ws://``
    prefix and a trailing ``/`` are tolerated (a URL pasted where an address was asked); a bare
    ``PORT`` or ``:PORT`` listens on loopback (127.0.0.1), never on every interface by accident.
    """
    raw = text.strip()
    body = raw.removeprefix("ws://").rstrip("/")
    host, sep, port = body.rpartition(":")
    if not sep:
        host, port = "", body
    if host.startswith("[") != host.endswith("]"):
        port = ""  # an unclosed IPv6 bracket is no address
    host = host.strip("[]") or LOOPBACK
    if not port.isdigit() or int(port) > 65535 or "/" in host or " " in host:
        raise ConfigError(
            f"{what} must be HOST:PORT with a port from 0 to 65535 (e.g. 127.0.0.1:8766), "
            f"got {text!r}."
        )
    return host, int(port)


# -- the rules. Each takes the value, the option's name as the user wrote it, and whether the
# value is text to read (a flag's or a variable's) rather than typed (a TOML value, a default),
# and returns the checked value or raises. Typed values are not read from text: a scenario's
# `sessions = "2"` is refused, as TOML has integers.

Rule = Callable[[Any, str, bool], Any]


def _fail(label: str, problem: str, value: Any) -> ConfigError:
    return ConfigError(f"{label} must be {problem}, got {value!r}.")


def _text(v: Any, label: str, text: bool = False) -> str:
    if not isinstance(v, str) or not v.strip():
        raise _fail(label, "a non-empty string", v)
    return v.strip()


def _secret(v: Any, label: str, text: bool = False) -> str:
    from probe.measure.admission import check_secret

    if not isinstance(v, str):
        raise _fail(label, "a string", v)
    return check_secret(v.strip(), label)


def check_url(text: str, label: str, schemes: tuple[str, ...] = ("ws", "wss")) -> str:
    """``text`` (stripped) when it is a URL of one of ``schemes`` that a client can connect to:
    a host (a name, an IPv4 address or a bracketed IPv6 one), an optional port from 1 to 65535,
    no spaces or control characters, no fragment. ``{session}`` (replaced per session in a
    target) counts as an ordinary path or host part. Else a ConfigError naming ``label``."""
    s = text.strip()
    kinds = " or ".join(f"{k}://" for k in schemes)
    article = "an" if kinds[0] in "aehiosu" else "a"
    problem = (
        f"{article} {kinds} URL naming a host, with a port from 1 to 65535 if any "
        f"(e.g. {schemes[0]}://127.0.0.1:8765/ or {schemes[0]}://[::1]:8765/)"
    )
    try:
        parts = urlsplit(s.replace("{session}", "0" * 32))
        port = parts.port
    except ValueError:  # an unclosed or invalid IPv6 bracket, a port that is no number
        raise _fail(label, problem, text) from None
    netloc = parts.netloc.rpartition("@")[2]
    if (
        parts.scheme not in schemes
        or not s.lower().startswith(f"{parts.scheme}://")
        or not parts.hostname
        or port == 0
        or parts.fragment
        or netloc.count("[") != netloc.count("]")
        or netloc.count("[") > 1
        or any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in s)
    ):
        raise _fail(label, problem, text)
    return s


def _url(v: Any, label: str, text: bool = False) -> str:
    return check_url(_text(v, label), label)


def _choice(choices: tuple[str, ...]) -> Rule:
    def rule(v: Any, label: str, text: bool = False) -> str:
        if isinstance(v, str) and v.strip() in choices:
            return v.strip()
        raise _fail(label, f"one of {', '.join(choices)}", v)

    return rule


def _integer(lo: int, hi: int | None = None) -> Rule:
    def rule(v: Any, label: str, text: bool = False) -> int:
        n = v
        if text and isinstance(v, str) and re.fullmatch(r"\s*-?\d+\s*", v):
            n = int(v)
        if isinstance(n, bool) or not isinstance(n, int) or n < lo or (hi is not None and n > hi):
            span = f"from {lo} to {hi}" if hi is not None else f"of {lo} or more"
            raise _fail(label, f"an integer {span}", v)
        return n

    return rule


def _number(*, above: float, at_most: float | None = None, least: float | None = None) -> Rule:
    def rule(v: Any, label: str, text: bool = False) -> float:
        x = v
        if text and isinstance(v, str):
            try:
                x = float(v)
            except ValueError:
                x = None
        ok = (
            not isinstance(x, bool)
            and isinstance(x, int | float)
            and math.isfinite(x)
            and x > above
            and (at_most is None or x <= at_most)
            and (least is None or x >= least)
        )
        if not ok:
            span = f"at least {least:g}" if least is not None else f"more than {above:g}"
            if at_most is not None:
                span += f" and at most {at_most:g}"
            raise _fail(label, f"a number {span}", v)
        return float(x)

    return rule


def _rate(v: Any, label: str, text: bool = False) -> int:
    n: int = _integer(8000, 48000)(v, label, text)
    if n not in SUPPORTED_RATES:
        rates = ", ".join(str(r) for r in SUPPORTED_RATES[:-1])
        raise _fail(label, f"one of {rates} or {SUPPORTED_RATES[-1]} (Hz, the marker's rates)", v)
    return n


def _flag(v: Any, label: str, text: bool = False) -> bool:
    if isinstance(v, bool):
        return v
    word = v.strip().lower() if text and isinstance(v, str) else None
    if word in ("", "0", "false", "no", "off"):
        return False
    if word in ("1", "true", "yes", "on"):
        return True
    raise _fail(label, "true or false", v)


def _listen(v: Any, label: str, text: bool = False) -> str:
    s = _text(v, label)
    parse_host_port(s, label)
    return s


def _hops(v: Any, label: str, text: bool = False) -> tuple[str, ...]:
    items = v.split(",") if isinstance(v, str) else v
    if not isinstance(items, list | tuple) or not items:
        raise _fail(label, "a list of hop names", v)
    names = [h.strip() if isinstance(h, str) else h for h in items]
    bad = [h for h in names if not isinstance(h, str) or not _HOP_RE.fullmatch(h)]
    if bad:
        raise ConfigError(
            f"{label} holds {bad[0]!r}, not a hop name (1-64 of A-Z a-z 0-9 . _ -)."
        )
    return tuple(names)


def number_rule(*, above: float, at_most: float | None = None, least: float | None = None) -> Rule:
    """A finite number in a range, for the flags of other commands (:func:`flag_type`)."""
    return _number(above=above, at_most=at_most, least=least)


def integer_rule(lo: int, hi: int | None = None) -> Rule:
    """The rule of an integer from ``lo`` (to ``hi``), for :func:`flag_type`."""
    return _integer(lo, hi)


def flag_type(flag: str, rule: Rule) -> Callable[[str], Any]:
    """An argparse ``type=`` reading a flag's text by ``rule``: a bad value is the rule's one
    sentence naming the flag (``--every must be a number at least 0.24, got 'nan'.``), a
    ConfigError that argparse lets through (where ``type=float`` would take nan and inf)."""

    def read(text: str) -> Any:
        return rule(text, flag, True)

    return read


@dataclass(frozen=True)
class Option:
    """One run option. ``name`` is its scenario key and field of :class:`RunOptions`; its flag
    is ``--`` + ``name`` with dashes. ``env`` and ``locust`` (the user class attribute) say
    where else it may be given; ``scenario``/``cli`` false keep it out of those."""

    name: str
    rule: Rule
    default: Any
    help: str
    env: str | None = None
    locust: str | None = None
    scenario: bool = True
    cli: bool = True
    metavar: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def check(self, value: Any, label: str, *, text: bool = False) -> Any:
        """The value by the option's rule (None stays None for options without a default);
        ``text``: the value was typed as text (a flag, an environment variable) and is read."""
        if value is None and self.default is None:
            return None
        return self.rule(value, label, text)


OPTIONS: tuple[Option, ...] = (
    Option("target", _url, None,
           "ws:// or wss:// URL of the system; {session} is replaced by the session id",
           env="PROBE_TARGET", locust="host"),
    Option("dialect", _choice(DIALECTS), "probe", "wire dialect: probe or twilio",
           env="PROBE_DIALECT", locust="dialect"),
    Option("fixture", _text, "speech_en_us", "fixture name or WAV path", env="PROBE_FIXTURE",
           locust="fixture"),
    Option("rate", _rate, 16000, "sample rate on the wire, Hz: 8000, 16000, 24000, 32000 or 48000",
           env="PROBE_RATE", locust="sample_rate"),
    Option("encoding", _choice(ENCODINGS), "pcm_s16le",
           "sample encoding on the wire: pcm_s16le, pcm_f32le, mulaw or alaw",
           env="PROBE_ENCODING", locust="encoding"),
    Option("frame_ms", _number(above=0.0, least=1.0, at_most=1000.0), 20.0,
           "milliseconds per frame, 1 to 1000",
           env="PROBE_FRAME_MS", locust="frame_ms"),
    Option("duration", _number(above=0.5, at_most=3600.0), 10.0,
           "seconds per session, at most 3600",
           env="PROBE_SESSION_S", locust="session_s"),
    Option("every", _number(above=0.0, least=MARKER_S), None,
           f"seconds between markers, at least {MARKER_S:g} (default 0.5)",
           env="PROBE_EVERY", locust="every_s"),
    Option("level", _number(above=-60.0, at_most=0.0), DEFAULT_LEVEL_DB,
           "marker level, dB relative to the speech's active level", env="PROBE_LEVEL_DB",
           locust="level_db"),
    Option("sessions", _integer(1, 100_000), 1, "sessions in the run"),
    Option("concurrency", _integer(1), 1, "sessions at once"),
    Option("sink_listen", _listen, "127.0.0.1:0", "HOST:PORT for the sink",
           env="PROBE_SINK_LISTEN"),
    Option("sink_url", _url, None,
           "sink URL the hops should use when not the bound one (the capability is appended)",
           env="PROBE_SINK_URL"),
    Option("sink_tls_cert", _text, None,
           "PEM certificate (chain) for a wss:// sink; with --sink-tls-key",
           env="PROBE_SINK_TLS_CERT"),
    Option("sink_tls_key", _text, None, "PEM private key of --sink-tls-cert",
           env="PROBE_SINK_TLS_KEY"),
    Option("ca", _text, None,
           "CA bundle (PEM) that wss:// targets are checked against (default: the system's)",
           env="PROBE_CA", locust="ca_file"),
    Option("sink_secret", _secret, None,
           "fixed capability forks must present, for hops configured with a static sink URL "
           "(default: a random one per run)", env="PROBE_SINK_SECRET"),
    Option("max_forks", _integer(1, 1_000_000), MAX_FORKS,
           "fork connections the sink holds at once; more are refused with 1013 and counted "
           "in rejected_forks", env="PROBE_MAX_FORKS"),
    Option("no_sink", _flag, False, "measure only the return direction", env="PROBE_NO_SINK"),
    Option("hop_order", _hops, None, "comma-separated hop names", env="PROBE_HOP_ORDER"),
    Option("marker_timeout", _number(above=0.0, at_most=600.0), 10.0,
           "seconds after which a marker not found is missed, at most 600",
           env="PROBE_MARKER_TIMEOUT"),
    Option("reply", _flag, False,
           "the system answers in its own voice: send utterances with gaps and time the reply",
           env="PROBE_REPLY", locust="reply"),
    Option("utterance", _number(above=0.0, least=0.5), 3.0, "seconds per utterance (reply)",
           env="PROBE_UTTERANCE_S", locust="utterance_s"),
    Option("gap", _number(above=0.0, least=0.2), 3.0,
           "seconds of silence after each (reply, results)",
           env="PROBE_GAP_S", locust="gap_s"),
    Option("reply_threshold", _number(above=-120.0, at_most=0.0), -40.0,
           "dBFS a reply must exceed (reply)", env="PROBE_REPLY_THRESHOLD",
           locust="reply_threshold_dbfs"),
    Option("barge_in", _number(above=0.0, at_most=60.0), None,
           "seconds into each reply to start speaking again, timing how fast the system "
           "stops (reply)", env="PROBE_BARGE_IN", locust="barge_in_s"),
    Option("results", _choice(RESULT_PRESETS), None,
           "the target answers with JSON text results of this shape (seed, deepgram or "
           "generic): send the fixture's sentences with gaps and time the results",
           env="PROBE_RESULTS", locust="results"),
    Option("result_fields", _text, None,
           "key=value,... over the --results shape: kind, final, interim (values joined by a "
           "vertical bar), "
           "text, start, end, duration (dotted paths) and unit (s, ms or samples)",
           env="PROBE_RESULT_FIELDS", locust="result_fields"),
    Option("json", _text, None, "write the JSON report here", scenario=False),
)
OPTION: Mapping[str, Option] = {o.name: o for o in OPTIONS}


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """Checked run options (see :data:`OPTIONS` for each one's meaning and default)."""

    target: str
    dialect: str = "probe"
    fixture: str = "speech_en_us"
    rate: int = 16000
    encoding: Encoding = "pcm_s16le"
    frame_ms: float = 20.0
    duration: float = 10.0
    every: float | None = None
    level: float = DEFAULT_LEVEL_DB
    sessions: int = 1
    concurrency: int = 1
    sink_listen: str = "127.0.0.1:0"
    sink_url: str | None = None
    sink_tls_cert: str | None = None
    sink_tls_key: str | None = None
    ca: str | None = None
    sink_secret: str | None = None
    max_forks: int = MAX_FORKS
    no_sink: bool = False
    hop_order: tuple[str, ...] | None = None
    marker_timeout: float = 10.0
    reply: bool = False
    utterance: float = 3.0
    gap: float = 3.0
    reply_threshold: float = -40.0
    barge_in: float | None = None
    results: str | None = None
    result_fields: str | None = None
    json: str | None = None

    @property
    def sink_address(self) -> tuple[str, int]:
        return parse_host_port(self.sink_listen, "sink_listen")


def run_defaults() -> dict[str, Any]:
    """Every option's default by name (``target`` has none)."""
    return {o.name: o.default for o in OPTIONS if o.name != "target"}


def env_options(env: Mapping[str, str]) -> dict[str, Any]:
    """The options the environment sets (``PROBE_*``), checked, by option name. An empty
    variable counts as unset."""
    out: dict[str, Any] = {}
    for o in OPTIONS:
        if o.env and env.get(o.env, "").strip():
            out[o.name] = o.check(env[o.env], o.env, text=True)
    return out


def run_options(options: Mapping[str, Any]) -> RunOptions:
    """Checked :class:`RunOptions` from typed options by name (defaults fill the gaps); a bad
    value is named by its flag (``--sessions``). Options from text (flags, variables) are read
    and checked first, by :func:`given_options` and :func:`env_options`."""
    unknown = [k for k in options if k not in OPTION]
    if unknown:
        raise ConfigError(f"Unknown option {unknown[0]!r}.")
    merged = {**run_defaults(), **options}
    if not merged.get("target"):
        raise ConfigError("A target is needed: give --target URL, or set PROBE_TARGET.")
    checked = {}
    for o in OPTIONS:
        checked[o.name] = o.check(merged.get(o.name), o.flag)
    sink_tls(checked, "--sink-tls-cert", "--sink-tls-key")
    conversation(checked)
    if checked.get("ca"):
        from probe.tls import client_context

        client_context(checked["ca"])
    return RunOptions(**checked)


def conversation(opts: Mapping[str, Any]) -> None:
    """One sentence when the conversation options do not fit together: ``barge_in`` needs
    ``reply``; ``result_fields`` needs ``results`` and must parse over it."""
    if opts.get("barge_in") is not None and not opts.get("reply"):
        raise ConfigError("--barge-in times how a reply stops, so it needs --reply.")
    if opts.get("result_fields") and not opts.get("results"):
        raise ConfigError("--result-fields changes a --results shape, so it needs --results.")
    if opts.get("results"):
        from probe.measure.results import parse_shape

        parse_shape(opts["results"], opts.get("result_fields"))


def sink_tls(opts: Mapping[str, Any], cert_label: str, key_label: str) -> tuple[str, str] | None:
    """The sink's (certificate, key) files, loaded once to check them, or None for ws://;
    one sentence when only one is given or they cannot be loaded."""
    cert, key = opts.get("sink_tls_cert"), opts.get("sink_tls_key")
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise ConfigError(f"{cert_label} and {key_label} go together: give both or neither.")
    from probe.tls import server_context

    server_context(cert, key)
    return (cert, key)


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """The run options as flags. A flag not given is left out of the namespace, so a scenario,
    the environment or the default can supply it; :func:`run_options` checks the values."""
    for o in OPTIONS:
        if not o.cli:
            continue
        kw: dict[str, Any] = {"help": o.help, "default": argparse.SUPPRESS}
        if o.rule is _flag:
            kw["action"] = "store_true"
        else:
            kw["metavar"] = o.metavar or o.name.upper()
        parser.add_argument(o.flag, dest=o.name, **kw)


def given_options(namespace: argparse.Namespace) -> dict[str, Any]:
    """The run options a command line gave, read and checked, by name."""
    return {
        o.name: o.check(getattr(namespace, o.name), o.flag, text=True)
        for o in OPTIONS
        if hasattr(namespace, o.name)
    }


def locust_env(env: Mapping[str, str], attributes: Mapping[str, Any]) -> dict[str, Any]:
    """A Locust user's session options by option name: each ``PROBE_*`` variable set in ``env``
    wins over the user class's attribute (``attributes``, by attribute name)."""
    from_env = env_options(env)
    out: dict[str, Any] = {}
    for o in OPTIONS:
        if o.locust is None or o.locust == "host":
            continue
        if o.name in from_env:
            out[o.name] = from_env[o.name]
        elif o.locust in attributes:
            value = attributes[o.locust]
            out[o.name] = o.check(value, f"The user class attribute {o.locust}")
    return out


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """A Locust process's sink and settling: where the sink listens and what it advertises."""

    sink_host: str = LOOPBACK
    sink_port: int = 0
    # The URL hops should fork to, when it differs from the bound one (another host, NAT, k8s).
    sink_url: str | None = None
    # The capability forks must present (a fixed secret), or None for a random one per process.
    sink_secret: str | None = None
    # Certificate and key of a wss:// sink (None: ws://).
    sink_tls: tuple[str, str] | None = None
    # Fork connections the sink holds at once (more are refused with 1013).
    max_forks: int = MAX_FORKS
    # The host name or address other hosts reach this worker by; the bound port is added.
    advertise_host: str | None = None
    use_sink: bool = True
    marker_timeout_s: float = 10.0
    hop_order: Sequence[str] = field(default_factory=tuple)
    # OS niceness of the sink child's detection thread. Detection works on frames already
    # stamped, so under CPU contention it yields to the paced sessions, the child's socket reads
    # and the target (benchmarks/locust_capacity.py, 40 streams on 2 shared cores, 4 runs each:
    # send lag p99 4.0-8.3 ms at 10 against 7.5-16.8 ms at 0).
    detect_nice: int = 10
    # When this process counts as overloaded (probe.measure.health.Bounds): a frame send lag p99,
    # a detection backlog, a process's share of a core.
    overload_lag_ms: float = 20.0
    overload_delay_s: float = 2.0
    overload_cpu: float = 0.95

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> EngineConfig:
        """The run options ``PROBE_SINK_LISTEN`` (default 127.0.0.1:0, or 0.0.0.0:0 when
        ``PROBE_SINK_HOST`` is set), ``PROBE_SINK_URL``, ``PROBE_NO_SINK``,
        ``PROBE_MARKER_TIMEOUT``, ``PROBE_HOP_ORDER``, ``PROBE_MAX_FORKS``, and the Locust-only
        ``PROBE_SINK_HOST`` (the address other hosts reach this worker by), ``PROBE_DETECT_NICE``
        (0-19) and the overload bounds ``PROBE_OVERLOAD_LAG_MS`` (send lag p99, default 20),
        ``PROBE_OVERLOAD_DELAY_S`` (detection backlog, default 2) and ``PROBE_OVERLOAD_CPU``
        (share of a core, default 0.95)."""
        opts = env_options(env)
        advertise = env.get("PROBE_SINK_HOST", "").strip() or None
        listen = opts.get("sink_listen") or ("0.0.0.0:0" if advertise else "127.0.0.1:0")
        host, port = parse_host_port(listen, "PROBE_SINK_LISTEN")
        raw_nice = env.get("PROBE_DETECT_NICE", "").strip() or "10"
        nice = _integer(0, 19)(raw_nice, "PROBE_DETECT_NICE", True)
        return cls(
            sink_host=host,
            sink_port=port,
            sink_url=opts.get("sink_url"),
            sink_secret=opts.get("sink_secret"),
            sink_tls=sink_tls(opts, "PROBE_SINK_TLS_CERT", "PROBE_SINK_TLS_KEY"),
            max_forks=opts.get("max_forks", MAX_FORKS),
            advertise_host=advertise,
            use_sink=not opts.get("no_sink", False),
            marker_timeout_s=opts.get("marker_timeout", OPTION["marker_timeout"].default),
            hop_order=opts.get("hop_order") or (),
            detect_nice=nice,
            overload_lag_ms=positive_env(env, "PROBE_OVERLOAD_LAG_MS", cls.overload_lag_ms),
            overload_delay_s=positive_env(env, "PROBE_OVERLOAD_DELAY_S", cls.overload_delay_s),
            overload_cpu=positive_env(env, "PROBE_OVERLOAD_CPU", cls.overload_cpu),
        )


def positive_env(env: Mapping[str, str], name: str, fallback: float) -> float:
    """A Locust-only positive number from the environment (``PROBE_SESSION_RATE``)."""
    raw = env.get(name, "").strip()
    return fallback if not raw else float(_number(above=0.0)(raw, name, True))


def count_env(env: Mapping[str, str], name: str, fallback: int) -> int:
    """A Locust-only positive integer from the environment (``PROBE_MAX_IN_FLIGHT``)."""
    raw = env.get(name, "").strip()
    return fallback if not raw else int(_integer(1)(raw, name, True))



def options_table() -> str:
    """The run options as a Markdown table (docs/commands.md holds it verbatim)."""
    rows = [
        "| flag | scenario key | environment | Locust attribute | default | meaning |",
        "|---|---|---|---|---|---|",
    ]
    for o in OPTIONS:
        default = "" if o.default is None or o.rule is _flag else repr(o.default).strip("'")
        rows.append(
            f"| `{o.flag}` | {f'`{o.name}`' if o.scenario else ''} "
            f"| {f'`{o.env}`' if o.env else ''} "
            f"| {f'`{o.locust}`' if o.locust else ''} "
            f"| {f'`{default}`' if default else ''} | {o.help} |"
        )
    return "\n".join(rows) + "\n"
