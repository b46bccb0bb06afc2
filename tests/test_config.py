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
    ("sessions", "0", 0, "must be an integer of 1 or more"),
    ("duration", "0.2", 0.2, "must be a number more than 0.5"),
    ("rate", "4000", 4000, "must be an integer from 8000 to 48000"),
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
