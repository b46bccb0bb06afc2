"""The Hops tab's picture: the SVG drawn from the Hops statistics, and own p95 over time."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from probe.locust.hopchart import PALETTE, HopBar, chart_svg, render_svg, with_page_script
from probe.locust.hopstats import HopsStats, Totals

SVG = "{http://www.w3.org/2000/svg}"


def _texts(root: ET.Element) -> list[str]:
    return ["".join(t.itertext()) for t in root.iter(SVG + "text")]


def _segments(root: ET.Element, q: str) -> list[ET.Element]:
    rects = root.iter(SVG + "rect")
    return [r for r in rects if r.get("class") == "segment" and r.get("data-q") == q]


def test_segments_follow_the_path_in_proportion_to_each_hops_own_latency() -> None:
    bars = [HopBar("a", 20.0, 22.0), HopBar("b", 35.0, 50.0), HopBar("return", 5.0, None)]
    root = ET.fromstring(render_svg(bars, [], now=0.0))
    widths = {}
    for q in ("p50", "p95"):
        segs = _segments(root, q)
        assert [s.get("data-hop") for s in segs] == ["a", "b", "return"]
        xs = [float(s.get("x", "")) for s in segs]
        ws = [float(s.get("width", "")) for s in segs]
        # Stacked: each segment starts where the one before it ends.
        assert xs[1:] == pytest.approx([x + w for x, w in zip(xs, ws, strict=False)][:-1], abs=0.02)
        widths[q] = ws
    scale = widths["p95"][0] / 22.0
    assert widths["p50"] == pytest.approx([20 * scale, 35 * scale, 5 * scale], abs=0.02)
    assert widths["p95"] == pytest.approx([22 * scale, 50 * scale, 0.0], abs=0.02)
    assert [r.get("fill") for r in _segments(root, "p50")] == list(PALETTE[:3])
    texts = _texts(root)
    assert "sum 60.0 ms" in texts and "sum 72.0 ms" in texts
    assert "b  p50 35.0  p95 50.0 ms" in texts and "return  p50 5.0  p95 - ms" in texts


def test_hop_names_from_peers_are_escaped() -> None:
    name = '<script>alert("x")</script> & co'
    svg = render_svg([HopBar(name, 300.0, 400.0)], [(995.0, {name: 410.0})], now=1000.0)
    assert "<script>" not in svg
    root = ET.fromstring(svg)  # well-formed whatever the name
    assert _segments(root, "p50")[0].get("data-hop") == name
    assert any(t.startswith(name[:10]) for t in _texts(root))
    assert "".join(_segments(root, "p95")[0].itertext()) == f"{name}: own p95 400.0 ms"


def test_no_hops_yet_says_so() -> None:
    root = ET.fromstring(render_svg([], [], now=0.0))
    assert "no markers measured yet" in _texts(root)
    assert not _segments(root, "p50")
    assert root.find(SVG + "rect") is not None  # its own background, for either UI theme


def test_the_overload_warning_heads_the_picture() -> None:
    s = HopsStats(["a"])
    s.add_detection("a", 0.020, 0.020)
    s.set_totals("w1", Totals({"a": {"sent": 3, "detected": 1, "unmeasured": 2}},
                              {"overloaded": 1}))
    texts = _texts(ET.fromstring(chart_svg(s)))
    warning = " ".join(t for t in texts if t.startswith("WARNING") or "unmeasured" in t)
    assert warning.startswith("WARNING: the probe is overloaded now on 1 process")
    assert "2 markers owed meanwhile are unmeasured" in warning


def test_the_lines_break_where_a_hop_has_no_point() -> None:
    pts = [(1000.0 + 5 * i, {"a": 20.0, "b": 30.0} if i != 3 else {"a": 21.0}) for i in range(8)]
    pts += [(1100.0, {"a": 22.0, "b": 31.0})]  # after a pause
    root = ET.fromstring(
        render_svg([HopBar("a", 20.0, 21.0), HopBar("b", 30.0, 31.0)], pts, now=1100.0)
    )
    marks = [(e.tag.removeprefix(SVG), e.get("data-hop")) for e in root.iter()
             if e.get("class") == "p95"]
    assert marks.count(("polyline", "a")) == 1 and marks.count(("circle", "a")) == 1
    assert marks.count(("polyline", "b")) == 2 and marks.count(("circle", "b")) == 1


def test_the_page_script_goes_before_the_end_of_the_body() -> None:
    page = with_page_script("<html><body><div id=root></div></body></html>")
    assert page.endswith("</script></body></html>")
    assert "./hops/chart.svg" in page and "http" not in page.split("<script>")[1]
