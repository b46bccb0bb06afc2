"""Run options (probe.config): the one HOST:PORT rule of every listen option, and one rule per
option whatever the source (flag, scenario key, environment variable, Locust attribute)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from probe.canary.scenario import parse_scenario
from probe.config import (
    OPTION,
    OPTIONS,
    EngineConfig,
    RunOptions,
    add_run_options,
    env_options,
    given_options,
    locust_env,
    options_table,
    parse_host_port,
    run_defaults,
    run_options,
)
from probe.errors import ConfigError


@pytest.mark.parametrize("text, want", [
    ("0.0.0.0:8766", ("0.0.0.0", 8766)),
    ("[::1]:0", ("::1", 0)),
    ("localhost:65535", ("localhost", 65535)),
    ("ws://127.0.0.1:9000/", ("127.0.0.1", 9000)),
    (":8766", ("127.0.0.1", 8766)),
    ("8766", ("127.0.0.1", 8766)),
    (" 10.0.0.2:80 ", ("10.0.0.2", 80)),
])
def test_accepted(text: str, want: tuple[str, int]) -> None:
    assert parse_host_port(text, "--listen") == want


@pytest.mark.parametrize("text", [
    "localhost", "host:port", "host:70000", "host:-1", "[::1:80", "", "a b:80", "http://x/y:80",
])
def test_refused_with_one_sentence_naming_the_option(text: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_host_port(text, "--sink-listen")
    msg = str(e.value)
    assert msg.startswith("--sink-listen must be HOST:PORT") and msg.count(".") >= 1
    assert "\n" not in msg


# -- the run options: one table, one rule per option whatever the source.

ROOT = Path(__file__).resolve().parents[1]


def test_every_option_is_a_field_a_flag_and_a_documented_row() -> None:
    assert [f.name for f in fields(RunOptions)] == [o.name for o in OPTIONS]
    envs = [o.env for o in OPTIONS if o.env]
    assert len(envs) == len(set(envs)) and all(e.startswith("PROBE_") for e in envs)
    run_help = subprocess.run([sys.executable, "-m", "probe.cli", "run", "--help"],
                              capture_output=True, text=True, cwd=ROOT).stdout
    assert all(o.flag in run_help for o in OPTIONS)
    docs = (ROOT / "docs" / "commands.md").read_text(encoding="utf-8")
    assert options_table() in docs, "docs/commands.md: paste probe.config.options_table()"
    defaults = RunOptions(target="ws://x/")
    assert {o.name: getattr(defaults, o.name) for o in OPTIONS if o.name != "target"} == {
        k: v for k, v in run_defaults().items()
    }


BAD = [
    ("sessions", "0", 0, "must be an integer from 1 to 100000"),
    ("duration", "0.2", 0.2, "must be a number more than 0.5"),
    ("rate", "4000", 4000, "must be an integer from 8000 to 48000"),
    ("rate", "11025", 11025, "must be one of 8000, 16000, 24000, 32000 or 48000"),
    ("frame_ms", "0", 0.0, "must be a number at least 1 and at most 1000"),
    ("duration", "nan", float("nan"), "must be a number more than 0.5 and at most 3600"),
    ("duration", "inf", float("inf"), "must be a number more than 0.5 and at most 3600"),
    ("duration", "-1", -1.0, "must be a number more than 0.5"),
    ("every", "0.1", 0.1, "must be a number at least 0.24"),
    ("marker_timeout", "601", 601.0, "must be a number more than 0 and at most 600"),
    ("target", "ws://[::1", "ws://[::1", "must be a ws:// or wss:// URL naming a host"),
    ("target", "http://x/", "http://x/", "must be a ws:// or wss:// URL"),
    ("dialect", "sip", "sip", "must be one of probe, twilio"),
    ("sink_listen", "localhost", "localhost", "must be HOST:PORT"),
    ("hop_order", "a,b c", ["a", "b c"], "holds 'b c', not a hop name"),
    ("reply_threshold", "3", 3, "must be a number more than -120 and at most 0"),
    ("utterance", "0.1", 0.1, "must be a number at least 0.5"),
]


@pytest.mark.parametrize("name, text, typed, problem", BAD)
def test_a_bad_value_gets_the_same_sentence_from_every_source(
    name: str, text: str, typed: Any, problem: str
) -> None:
    o = OPTION[name]
    parser = argparse.ArgumentParser()
    add_run_options(parser)
    messages = []
    with pytest.raises(ConfigError) as e:
        given_options(parser.parse_args([o.flag, text]))
    messages.append((o.flag, str(e.value)))
    with pytest.raises(ConfigError) as e:
        parse_scenario({name: typed}, name="t", path="t.toml")
    messages.append(("Scenario 't.toml': key " + repr(name), str(e.value)))
    if o.env:
        with pytest.raises(ConfigError) as e:
            env_options({o.env: text})
        messages.append((o.env, str(e.value)))
    if o.locust and o.locust != "host":
        with pytest.raises(ConfigError) as e:
            locust_env({}, {o.locust: typed})
        messages.append((f"The user class attribute {o.locust}", str(e.value)))
    for label, msg in messages:
        assert msg.startswith(label + " ") and problem in msg, (label, msg)
        assert "\n" not in msg and msg.endswith(".")


def test_text_is_read_only_where_text_is_what_the_user_typed() -> None:
    assert env_options({"PROBE_SESSION_S": "4", "PROBE_NO_SINK": "yes",
                        "PROBE_HOP_ORDER": "a, b", "PROBE_RATE": " 8000 ",
                        "PROBE_REPLY": "", "PROBE_TARGET": ""}) == {
        "duration": 4.0, "no_sink": True, "hop_order": ("a", "b"), "rate": 8000,
    }
    # TOML has numbers and booleans: a string there is a mistake, not text to read.
    for key, value in (("sessions", "2"), ("no_sink", "yes"), ("duration", "3")):
        with pytest.raises(ConfigError, match=f"key '{key}' must be"):
            parse_scenario({key: value}, name="t", path="t.toml")


def test_precedence_flag_then_scenario_then_environment_then_default() -> None:
    from probe.canary.command import _options
    from probe.canary.scenario import Scenario

    parser = argparse.ArgumentParser()
    add_run_options(parser)
    env = {"PROBE_TARGET": "ws://env/", "PROBE_SESSION_S": "4", "PROBE_MARKER_TIMEOUT": "7",
           "PROBE_HOP_ORDER": "x,y"}
    scenario = Scenario(name="s", options={"duration": 3.0, "sessions": 5, "hop_order": ("a",)})
    args = parser.parse_args(["--sessions", "2", "--no-sink"])
    o = run_options(_options(args, env, scenario))
    assert (o.target, o.duration, o.sessions, o.marker_timeout, o.hop_order, o.no_sink) == (
        "ws://env/", 3.0, 2, 7.0, ("a",), True)
    assert (o.rate, o.every, o.reply) == (16000, None, False)  # defaults
    # probe run has no scenario: flag, then environment.
    o = run_options({**env_options(env), **given_options(parser.parse_args(["--duration", "2"]))})
    assert (o.duration, o.target) == (2.0, "ws://env/")
    with pytest.raises(ConfigError, match="give --target URL, or set PROBE_TARGET"):
        run_options({})


def test_locust_users_take_the_environment_over_their_attributes() -> None:
    attrs = {"session_s": 10.0, "sample_rate": 8000, "encoding": "mulaw", "every_s": 0.5,
             "reply": False}
    o = locust_env({"PROBE_SESSION_S": "3", "PROBE_REPLY": "1"}, attrs)
    assert (o["duration"], o["rate"], o["encoding"], o["every"], o["reply"]) == (
        3.0, 8000, "mulaw", 0.5, True)
    cfg = EngineConfig.from_env({"PROBE_SINK_LISTEN": "0.0.0.0:7000", "PROBE_NO_SINK": "true",
                                 "PROBE_MARKER_TIMEOUT": "4", "PROBE_DETECT_NICE": "5"})
    assert (cfg.sink_host, cfg.sink_port, cfg.use_sink, cfg.marker_timeout_s, cfg.detect_nice) == (
        "0.0.0.0", 7000, False, 4.0, 5)
    with pytest.raises(ConfigError, match="PROBE_DETECT_NICE must be an integer from 0 to 19"):
        EngineConfig.from_env({"PROBE_DETECT_NICE": "20"})


# -- every bad class of every numeric and URL option, as the user types it.

NOT_NUMBERS = ("nan", "inf", "-inf", "1e400", "abc", "")


# Values each option's range excludes beyond NOT_NUMBERS: zero and negatives where they mean
# nothing (a level and a threshold are dB under a reference: 0 and -1 are fine there).
OUT_OF_RANGE = {
    "rate": ("0", "-1", "11025", "44100", "96000"),
    "frame_ms": ("0", "-1", "0.5", "1001"),
    "duration": ("0", "-1", "0.5", "3601"),
    "every": ("0", "-1", "0.2"),
    "level": ("-60", "1", "-1000"),
    "sessions": ("0", "-1", "1.5", "100001"),
    "concurrency": ("0", "-1", "2.5"),
    "max_forks": ("0", "-1", "1.5", "1000001"),
    "marker_timeout": ("0", "-1", "601"),
    "utterance": ("0", "-1", "0.4"),
    "gap": ("0", "-1", "0.1"),
    "reply_threshold": ("1", "-120", "-inf"),
}


NUMERIC = [o for o in OPTIONS if o.name in OUT_OF_RANGE]


def test_the_numeric_options_are_all_covered() -> None:
    numbers = {o.name for o in OPTIONS
               if type(o.default) in (int, float) or o.name == "every"}  # every: default None
    assert numbers == set(OUT_OF_RANGE)


@pytest.mark.parametrize(
    "name, text",
    [(o.name, v) for o in NUMERIC for v in (*NOT_NUMBERS, *OUT_OF_RANGE[o.name])],
)
def test_every_numeric_option_refuses_each_bad_class_in_one_sentence(name: str, text: str) -> None:
    o = OPTION[name]
    parser = argparse.ArgumentParser()
    add_run_options(parser)
    with pytest.raises(ConfigError) as e:
        given_options(parser.parse_args([f"{o.flag}={text}"]))  # "-inf" would look like a flag
    msg = str(e.value)
    assert msg.startswith(f"{o.flag} must be ") and msg.endswith(f"got {text!r}.")
    assert "\n" not in msg


BAD_URLS = [
    "ws://[::1", "ws://[::1]:x/", "ws://", "ws:///x", "ws://:80/", "ws://h:99999/", "ws://h:-1/",
    "ws:// h/", "ws://[zz]/", "ws://h:80:90/", "wss://[::1]]/", "ws://h:0/", "ws://h/#frag",
    "ws://h/a b", "ws://h\t/", "http://h/", "h:80", "ws:/h/", "ws://::1/",
]
GOOD_URLS = [
    "ws://h/", "ws://[::1]/", "wss://[::1]:8765/x?q=1", "ws://127.0.0.1:8765/ws/{session}",
    "ws://u:p@h:1/", "WS://H:65535/", "ws://h", "ws://[fe80::1%25eth0]:80/",
]


@pytest.mark.parametrize("url", BAD_URLS)
def test_a_malformed_url_is_one_sentence_for_target_and_sink_url(url: str) -> None:
    for name in ("target", "sink_url"):
        o = OPTION[name]
        with pytest.raises(ConfigError) as e:
            run_options({"target": "ws://h/", name: url})
        msg = str(e.value)
        assert msg.startswith(f"{o.flag} must be a ws:// or wss:// URL naming a host"), msg
        assert msg.endswith(f"got {url!r}.") and "\n" not in msg


@pytest.mark.parametrize("url", GOOD_URLS)
def test_a_url_the_rule_takes_is_one_the_websocket_client_can_open(url: str) -> None:
    from websockets.uri import parse_uri

    assert run_options({"target": url}).target == url.strip()
    parse_uri(url.replace("{session}", "abc"))  # raises if the client could not use it


def test_the_pushgateway_url_has_the_same_rule_with_http() -> None:
    from probe.config import check_url

    assert check_url("http://[::1]:9091/", "--pushgateway", ("http", "https"))
    for bad in ("http://[::1", "http://", "http://h:x/", "ws://h/"):
        with pytest.raises(ConfigError, match="--pushgateway must be an http:// or https:// URL"):
            check_url(bad, "--pushgateway", ("http", "https"))
