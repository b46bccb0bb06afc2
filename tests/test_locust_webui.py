"""The Locust web UI with the Hops tab, in a real headless browser (Debian's chromium).

A run is started from the UI's form against the reference pipeline; the Hops tab must list the
pipeline's hops with their numbers, and offer the CSV download. The screenshot is kept under
``test-artifacts/`` (gitignored) and the test's tmp dir.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import SLOW, free_port, wait_port

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = str(ROOT / "scenarios" / "locust_reference.py")
CHROMIUM = "/usr/bin/chromium"


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_hops_tab_in_a_real_browser(tmp_path: Path) -> None:
    if not Path(CHROMIUM).exists() or shutil.which("chromium") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is required under CI")
        pytest.skip("chromium is not installed")
    from playwright.sync_api import sync_playwright

    pipe_port, web_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PROBE_", "OTEL_"))}
    env.update({"PROBE_SESSION_S": "3", "PROBE_MARKER_TIMEOUT": "3", "PROBE_HOP_ORDER": "a,b"})
    pipe = subprocess.Popen(
        [sys.executable, "-m", "probe.cli", "pipeline", "--listen", f"127.0.0.1:{pipe_port}",
         "--hops", "a:20ms,b:35ms"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    ui = subprocess.Popen(
        [sys.executable, "-m", "locust", "-f", REFERENCE, "--web-host", "127.0.0.1",
         "--web-port", str(web_port)],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    shot = tmp_path / "locust-hops-tab.png"
    try:
        wait_port(pipe_port)
        wait_port(web_port)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
            try:
                page = browser.new_page(viewport={"width": 1600, "height": 900})
                page.goto(f"http://127.0.0.1:{web_port}/")
                page.fill("input[name=userCount]", "2")
                page.fill("input[name=spawnRate]", "2")
                page.fill("input[name=host]", f"ws://127.0.0.1:{pipe_port}/")
                page.click('button:has-text("Start")')
                page.click('[role=tab]:has-text("Hops")', timeout=10_000 * SLOW)
                # Wait until both hops have a dozen latencies (a 3 s session has 6 markers; the
                # table refreshes every 2 s). Chromium shares the 2 cores, so bounds are loose.
                deadline = time.monotonic() + 25 * SLOW
                cells: dict[str, list[str]] = {}
                while time.monotonic() < deadline:
                    cells = {}
                    for row in page.query_selector_all("table tbody tr"):
                        texts = [c.inner_text().strip() for c in row.query_selector_all("td")]
                        if texts:
                            cells[texts[0]] = texts
                    if all(h in cells and int(cells[h][2] or 0) >= 12 for h in ("a", "b")):
                        break
                    page.wait_for_timeout(500)
                page.screenshot(path=str(shot), full_page=True)
                headers = [h.inner_text().strip() for h in page.query_selector_all("table th")]
                assert headers[:3] == ["Hop", "Markers sent", "Detected"]
                p50, own_p50 = headers.index("p50 ms"), headers.index("own p50 ms")
                assert list(cells)[:2] == ["a", "b"], cells
                assert abs(float(cells["a"][p50]) - 20.0) < 8.0, cells["a"]
                assert abs(float(cells["b"][p50]) - 55.0) < 8.0, cells["b"]
                assert abs(float(cells["b"][own_p50]) - 35.0) < 8.0, cells["b"]
                assert int(cells["a"][2]) >= 12
                assert "send lag" in cells and "sessions" in cells
                # The download tab offers the Hops CSV.
                page.click('[role=tab]:has-text("Download Data")')
                link = page.get_by_text("Download hops CSV")
                assert link.count() == 1
            finally:
                browser.close()
        with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/hops/csv", timeout=5) as r:
            rows = list(csv.reader(io.StringIO(r.read().decode())))
        assert [r[0] for r in rows[1:3]] == ["a", "b"]
    finally:
        _stop(ui)
        _stop(pipe)
        if shot.exists():
            keep = ROOT / "test-artifacts"
            keep.mkdir(exist_ok=True)
            shutil.copy(shot, keep / shot.name)
    assert shot.stat().st_size > 10_000
