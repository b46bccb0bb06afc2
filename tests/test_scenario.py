"""Scenario files: the shipped ones load, and bad ones fail with one sentence naming the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from probe.canary.scenario import load_scenario, load_scenario_dir, parse_scenario
from probe.cli import main
from probe.errors import ConfigError

SCENARIOS = Path(__file__).resolve().parent.parent / "scenarios"


def test_shipped_scenarios_load() -> None:
    found = load_scenario_dir(SCENARIOS)
    assert {"reference_pipeline", "twilio_voicebot", "slo_p99_250ms_100_sessions",
            "session_in_path"} <= set(found)
    for s in found.values():
        assert s.description and s.thresholds and s.options["target"].startswith(("ws", "wss"))
    slo = found["slo_p99_250ms_100_sessions"]
    assert slo.options["sessions"] == 100 and slo.options["concurrency"] == 100
    p99 = [t for t in slo.thresholds if t.kind == "latency"]
    assert [(t.stat, t.op, t.limit, t.hop) for t in p99] == [("p99", "<", 250.0, None)]
    assert slo.options["hop_order"][-1] == "return"  # end to end = last hop
    bot = found["twilio_voicebot"]
    assert bot.options["dialect"] == "twilio" and bot.options["reply"] is True
    assert any(t.kind == "reply" for t in bot.thresholds)
    assert "{session}" in found["session_in_path"].options["target"]
    ref = found["reference_pipeline"]
    assert ref.options["hop_order"] == ("ingest", "telephony", "model", "return")


def test_shipped_scenarios_build_run_configs() -> None:
    from probe.aio.runner import run_config
    from probe.config import run_defaults

    for s in load_scenario_dir(SCENARIOS).values():
        cfg = run_config({**run_defaults(), **s.options})
        assert cfg.sessions == s.options["sessions"]
        assert cfg.source.target == s.options["target"]


def _parse(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as e:
        parse_scenario(data, name="t", path="t.toml")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("Scenario 't.toml'")
    return msg


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"sesions": 2}, "unknown key 'sesions'"),
        ({"sessions": "two"}, "key 'sessions' must be an integer from 1 to 100000, got 'two'"),
        ({"sessions": 0}, "key 'sessions'"),
        ({"sessions": True}, "key 'sessions'"),
        ({"duration": 0.2}, "key 'duration' must be a number more than 0.5"),
        ({"duration": "3s"}, "key 'duration'"),
        ({"rate": 4000}, "key 'rate' must be an integer from 8000 to 48000"),
        ({"target": "http://x/"}, "key 'target' must be a ws:// or wss:// URL"),
        ({"dialect": "sip"}, "key 'dialect' must be one of probe, twilio"),
        ({"encoding": "opus"}, "key 'encoding'"),
        ({"hop_order": ["a", "b c"]}, "key 'hop_order' holds 'b c'"),
        ({"hop_order": 3}, "key 'hop_order'"),
        ({"no_sink": "yes"}, "key 'no_sink' must be true or false"),
        ({"sink_listen": "localhost"}, "key 'sink_listen' must be HOST:PORT"),
        ({"thresholds": "p95<1ms"}, "key 'thresholds' must be a list"),
        ({"thresholds": ["p95<1ms", 3]}, "key 'thresholds' item 1 must be a string"),
        ({"thresholds": ["p95<1ms", "p95<1"]}, "key 'thresholds' item 1: Threshold 'p95<1'"),
        ({"name": "a b"}, "key 'name'"),
        ({"utterance": 0.1}, "key 'utterance'"),
        ({"reply_threshold": 3}, "key 'reply_threshold'"),
    ],
)
def test_bad_scenarios_name_the_key(data: dict[str, Any], needle: str) -> None:
    msg = _parse(data)
    assert needle in msg, msg


def test_files(tmp_path: Path) -> None:
    ok = tmp_path / "mine.toml"
    ok.write_text('target = "ws://h/{session}"\nhop_order = "a, b"\nfixture = "x/y.wav"\n')
    s = load_scenario(ok)
    assert s.name == "mine" and s.options["hop_order"] == ("a", "b")
    assert s.options["fixture"] == str(tmp_path / "x" / "y.wav")  # relative to the file
    bad = tmp_path / "bad.toml"
    bad.write_text("sessions = [\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_scenario(bad)
    with pytest.raises(ConfigError, match="must be a .toml file"):
        load_scenario(tmp_path / "x.yaml")
    with pytest.raises(ConfigError, match="Cannot read scenario"):
        load_scenario(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_scenario_dir(tmp_path)
    bad.unlink()
    (tmp_path / "other.toml").write_text('name = "mine"\n')
    with pytest.raises(ConfigError, match="share the name 'mine'"):
        load_scenario_dir(tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_scenario_dir(tmp_path / "nope")


@pytest.mark.parametrize(
    ("content", "extra", "needle"),
    [
        ("sessions = 2\ncolour = 'red'\n", [], "unknown key 'colour'"),
        ("target = 'ws://h/'\nthresholds = ['hop=model p95 < 250']\n", [], "needs a unit"),
        ("target = 'ws://h/'\nduration = -1\n", [], "key 'duration'"),
        ("target = 'ws://h/'\n", ["--threshold", "markers>=99.9"], "percentage"),
        ("target = 'ws://h/'\n", ["--threshold", "hop=x own.p101<3ms"], "unknown statistic"),
        ("sessions = 1\n", [], "needs a target"),
        ("target = 'ws://h/'\n", ["--sessions", "0"], "--sessions must be an integer from 1"),
        ("target = 'ws://h/'\n", ["--pushgateway", "gw:9091"], "http://"),
        ("target = 'ws://h/'\n", ["--junit", "/nonexistent/dir/j.xml"], "does not exist"),
    ],
)
def test_cli_canary_bad_input_exits_2_with_one_sentence(
    tmp_path: Path, capsys: Any, content: str, extra: list[str], needle: str
) -> None:
    f = tmp_path / "s.toml"
    f.write_text(content)
    assert main(["canary", "--scenario", str(f), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("probe: ") and needle in err[-1], err
    assert "Traceback" not in "\n".join(err)


def test_cli_exporter_bad_scenarios_exit_2(tmp_path: Path, capsys: Any) -> None:
    (tmp_path / "s.toml").write_text("sessions = 'many'\n")
    assert main(["exporter", "--listen", "127.0.0.1:0", "--scenarios", str(tmp_path)]) == 2
    assert "key 'sessions'" in capsys.readouterr().err
    assert main(["exporter", "--listen", "nowhere", "--scenarios", str(SCENARIOS)]) == 2
    assert main(["exporter", "--listen", "127.0.0.1:0", "--duration", "0"]) == 2
