"""The Locust web UI with the Hops tab, in a real headless browser (Debian's chromium).

A run is started from the UI's form against the reference pipeline; the Hops tab must list the
pipeline's hops with their numbers, show the picture above the table (drawn, not blank, in the
screenshot), and offer the CSV download. The screenshot is kept under ``test-artifacts/``
(gitignored) and the test's tmp dir.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import struct
import subprocess
import sys
import time
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from conftest import SLOW, free_port, wait_port

from probe.locust.hopchart import PALETTE

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


def _png_rows(data: bytes, rows: int) -> npt.NDArray[np.uint8]:
    """The first ``rows`` rows of a screenshot's pixels (8-bit RGB or RGBA PNG), as RGB."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat = 8, b""
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos : pos + 8])
        if kind == b"IHDR":
            w, h, depth, ctype, _, _, interlace = struct.unpack(
                ">IIBBBBB", data[pos + 8 : pos + 21]
            )
        elif kind == b"IDAT":
            idat += data[pos + 8 : pos + 8 + n]
        pos += 12 + n
    assert depth == 8 and ctype in (2, 6) and interlace == 0
    bpp, raw = (3 if ctype == 2 else 4), zlib.decompress(idat)
    stride = w * bpp
    out = np.zeros((min(rows, h), stride), np.uint8)
    prev = np.zeros(stride, np.uint8)
    for y in range(len(out)):
        at = y * (stride + 1)
        kind, line = raw[at], np.frombuffer(raw, np.uint8, stride, at + 1)
        if kind in (0, 2):  # None, Up
            cur = line + prev * (kind == 2)
        elif kind == 1:  # Sub: a running sum per channel
            cur = np.cumsum(line.reshape(w, bpp), axis=0, dtype=np.uint8).reshape(-1)
        else:  # Average, Paeth: byte by byte
            b, up, cur_l = line.tolist(), prev.tolist(), [0] * stride
            for i in range(stride):
                a = cur_l[i - bpp] if i >= bpp else 0
                c = up[i - bpp] if i >= bpp else 0
                if kind == 3:
                    pred = (a + up[i]) // 2
                else:
                    pa, pb, pc = abs(up[i] - c), abs(a - c), abs(a + up[i] - 2 * c)
                    pred = a if pa <= pb and pa <= pc else up[i] if pb <= pc else c
                cur_l[i] = (b[i] + pred) & 255
            cur = np.array(cur_l, np.uint8)
        out[y] = prev = cur
    return out.reshape(len(out), w, bpp)[..., :3]


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
                # The picture above the table: both hops' segments drawn (refreshed every 5 s).
                page.wait_for_function(
                    """() => ["a", "b"].every(h => [...document.querySelectorAll(
                        '#probe-hops-chart svg rect.segment')].some(
                        r => r.getAttribute('data-hop') === h && r.getBBox().width > 0))""",
                    timeout=15_000 * SLOW,
                )
                page.screenshot(path=str(shot), full_page=True)
                svg = page.locator("#probe-hops-chart svg")
                assert svg.is_visible()
                box = svg.bounding_box()
                table = page.locator("table").bounding_box()
                assert box and table and box["width"] > 400 and box["height"] > 100
                assert box["y"] + box["height"] <= table["y"]
                texts = svg.locator("text").all_text_contents()
                for hop in ("a", "b"):
                    assert any(t.startswith(f"{hop}  p50 ") for t in texts), texts
                assert svg.locator('.p95[data-hop="a"]').count() >= 1
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
    # In the screenshot, the picture's area is drawn: many colours, among them both hops' own.
    x, y, w, h = (int(box[k]) for k in ("x", "y", "width", "height"))
    area = _png_rows(shot.read_bytes(), y + h)[y:, x : x + w].reshape(-1, 3)
    colours = {tuple(int(v) for v in c) for c in np.unique(area, axis=0)}
    assert len(colours) > 20
    for fill in PALETTE[:2]:
        assert tuple(int(fill[i : i + 2], 16) for i in (1, 3, 5)) in colours, fill
