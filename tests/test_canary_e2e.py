"""`probe canary` end to end: a reference pipeline on loopback, Debian's real Pushgateway, the
CLI's exit codes, and every output file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import BackgroundPipeline, free_port
from prometheus_client.parser import text_string_to_metric_families

from probe.cli import main

SCENARIOS = Path(__file__).resolve().parent.parent / "scenarios"
PUSHGATEWAY = "/usr/bin/prometheus-pushgateway"
HOPS = "a:20ms,b:35ms:mulaw8k,c:60ms"
SHORT = ["--sessions", "2", "--concurrency", "2", "--duration", "3", "--marker-timeout", "2",
         "--hop-order", "a,b,c,return"]


@pytest.fixture(scope="module")
def pipeline() -> Iterator[BackgroundPipeline]:
    p = BackgroundPipeline(HOPS)
    try:
        yield p
    finally:
        p.close()


@pytest.fixture(scope="module")
def pushgateway() -> Iterator[str]:
    if shutil.which(PUSHGATEWAY) is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{PUSHGATEWAY} is missing (CI installs prometheus-pushgateway)")
        pytest.skip("prometheus-pushgateway is not installed")
    port = free_port()
    proc = subprocess.Popen(
        [PUSHGATEWAY, f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read().decode() if proc.stderr else ""
                pytest.fail(f"the Pushgateway did not start: {err[-500:]}")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _pushed(gateway: str, job: str, target: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Metric name -> [(labels without job/target/instance, value)] for one group."""
    with urllib.request.urlopen(f"{gateway}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.labels.get("job") == job and s.labels.get("target") == target:
                rest = {k: v for k, v in s.labels.items() if k not in ("job", "target", "instance")}
                out.setdefault(s.name, []).append((rest, s.value))
    return out


def test_canary_pass_then_breach_through_the_pushgateway(
    pipeline: BackgroundPipeline, pushgateway: str, tmp_path: Path, capsys: Any
) -> None:
    target = pipeline.url + "ws/v2/{session}"
    out = {k: tmp_path / f"r.{k}" for k in ("json", "xml", "html")}
    common = ["--scenario", str(SCENARIOS / "session_in_path.toml"), "--target", target,
              *SHORT, "--pushgateway", pushgateway, "--job", "canary_test"]
    before = time.time()
    rc = main(["canary", *common, "--threshold", "hop=c p95<250ms",
               "--threshold", "hop=b own.p95<80ms", "--json", str(out["json"]),
               "--junit", str(out["xml"]), "--html", str(out["html"])])
    printed = capsys.readouterr()
    assert rc == 0, printed.out + printed.err
    assert "canary: PASS" in printed.out and "hop=c p95<250ms" in printed.out
    report = json.loads(out["json"].read_text())
    assert report["target"] == target and report["sessions"]["completed"] == 2
    suite = ET.parse(out["xml"]).getroot().find("testsuite")
    assert suite is not None and suite.get("failures") == "0"
    assert suite.get("tests") == "5"  # implicit sessions + 2 from the scenario + 2 given here
    page = out["html"].read_text()
    assert "PASS" in page and "Worst marker" in page and "http" not in page.replace(target, "")

    pushed = _pushed(pushgateway, "canary_test", target)
    assert pushed["probe_success"] == [({}, 1.0)]
    (_, first_success), = pushed["probe_last_success_timestamp_seconds"]
    assert before <= first_success <= time.time()
    lat = {(lb["hop"], lb["quantile"]): v for lb, v in pushed["probe_hop_latency_seconds"]}
    assert abs(lat[("c", "0.5")] - 0.115) < 0.01  # 20 + 35 + 60 ms configured
    allowed = {"hop", "quantile", "threshold"}
    assert all(set(lb) <= allowed for rows in pushed.values() for lb, _ in rows)

    # The same canary with a threshold it cannot meet: exit 1, probe_success 0, and the last
    # success time stays that of the passing run.
    rc = main(["canary", *common, "--threshold", "hop=c p95<50ms", "--junit", str(out["xml"])])
    printed = capsys.readouterr()
    assert rc == 1
    assert "FAIL hop=c p95<50ms" in printed.out and "canary: FAIL (1 breached)" in printed.out
    pushed = _pushed(pushgateway, "canary_test", target)
    assert pushed["probe_success"] == [({}, 0.0)]
    assert pushed["probe_last_success_timestamp_seconds"] == [({}, first_success)]
    assert ({"threshold": "hop=c p95<50ms"}, 0.0) in pushed["probe_threshold_ok"]
    messages = [f.get("message", "") for f in ET.parse(out["xml"]).getroot().iter("failure")]
    assert len(messages) == 1 and "breaches < 50.0 ms" in messages[0]


def test_down_target_fails_the_canary_and_pushes_zero(pushgateway: str, tmp_path: Path,
                                                      capsys: Any) -> None:
    target = f"ws://127.0.0.1:{free_port()}/"
    junit = tmp_path / "j.xml"
    rc = main(["canary", "--target", target, "--duration", "1", "--marker-timeout", "1",
               "--threshold", "p95<1s", "--junit", str(junit), "--pushgateway", pushgateway])
    printed = capsys.readouterr()
    assert rc == 1
    assert "cannot connect" in printed.out and "canary: FAIL" in printed.out
    assert "Traceback" not in printed.err
    cases = ET.parse(junit).getroot().iter("testcase")
    assert all(c.find("failure") is not None for c in cases)
    pushed = _pushed(pushgateway, "probe_canary", target)
    assert pushed["probe_success"] == [({}, 0.0)]
    assert "probe_last_success_timestamp_seconds" not in pushed


def test_unreachable_pushgateway_is_a_warning_not_a_failure(
    pipeline: BackgroundPipeline, tmp_path: Path, capsys: Any
) -> None:
    report = tmp_path / "r.json"
    dead = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    rc = main(["canary", "--target", pipeline.url, *SHORT, "--threshold", "hop=c p95<250ms",
               "--pushgateway", dead, "--json", str(report)])
    printed = capsys.readouterr()
    assert rc == 0, printed.out + printed.err
    assert f"probe: warning: could not push to the Pushgateway at {dead}" in printed.err
    assert json.loads(report.read_text())["sessions"]["completed"] == 2
    assert time.monotonic() - t0 < 30
