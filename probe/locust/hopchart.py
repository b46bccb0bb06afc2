"""The Hops tab's picture: each hop's own latency along the path, and its p95 over time (sans-I/O).

Locust's web UI draws extended tabs as text tables only, so the picture is ours: an SVG document
drawn here from :class:`~probe.locust.hopstats.HopsStats`, served at ``/hops/chart.svg`` and put
above the table by a small same-origin script (:data:`PAGE_SCRIPT`) that the plugin adds to the
UI's page. Nothing is fetched from elsewhere: no CDN, no web font (the browser's sans-serif).

- **Along the path**: two stacked bars, own p50 and own p95, one segment per hop in path order,
  so a bar is about as long as the end-to-end latency and the widest segment is the hop to look
  at. A legend repeats every hop's two values (segments too narrow for their label stay legible).
- **Over time**: each hop's own p95 per 5 s window for the last 30 minutes
  (:class:`~probe.locust.hopstats.OwnP95Series`); a pause leaves a gap in the line.
- The overload warning of the table, when there is one, heads the picture.

The picture has its own light background, so it reads the same in Locust's light and dark
themes. Hop names come from peers: every text is escaped.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from xml.sax.saxutils import escape, quoteattr

from probe.locust.hopstats import HopsStats, overload_note

__all__ = ["PAGE_SCRIPT", "HopBar", "chart_svg", "render_svg", "with_page_script"]

WIDTH = 960
PALETTE = (
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f",
    "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac",
)  # fmt: skip
_PAD = 16
_LEFT = 72  # room for the bars' and the y axis' labels
_CHAR_PX = 7.0  # a generous average advance of 12 px sans-serif
_BAR_H = 26
_PLOT_H = 180
_INK, _MUTED, _GRID, _WARN = "#1f2328", "#57606a", "#e1e4e8", "#b3261e"
_NAME_CHARS = 32


@dataclass(frozen=True)
class HopBar:
    """One hop's segment of the path: its own p50 and p95 (ms; None before its first value)."""

    name: str
    p50_ms: float | None
    p95_ms: float | None


Points = Sequence[tuple[float, Mapping[str, float]]]


def chart_svg(stats: HopsStats) -> str:
    """The picture of ``stats`` now (the time series when ``stats.series`` is kept)."""
    bars = []
    for hop in stats.hops():
        own = stats.own[hop].summary_ms() if hop in stats.own else {}
        bars.append(HopBar(hop, _float(own.get("p50")), _float(own.get("p95"))))
    warning, series = overload_note(stats.summed()), stats.series
    if series is None:
        return render_svg(bars, [], now=0.0, warning=warning)
    now, points = series.snapshot()
    return render_svg(
        bars, points, now=now, every_s=series.every_s, span_s=series.keep_s, warning=warning
    )


def render_svg(
    bars: Sequence[HopBar],
    points: Points,
    *,
    now: float,
    every_s: float = 5.0,
    span_s: float = 1800.0,
    warning: str | None = None,
) -> str:
    """The picture as an SVG document (``points``: (time, {hop: own p95 ms}), oldest first)."""
    colour = {b.name: PALETTE[i % len(PALETTE)] for i, b in enumerate(bars)}
    for _, values in points:
        for hop in values:
            colour.setdefault(hop, PALETTE[len(colour) % len(PALETTE)])
    body: list[str] = []
    y = _PAD + 14
    body.append(_text(_PAD, y, "Own latency of each hop along the path (ms)", weight="bold"))
    if warning:
        for line in textwrap.wrap("WARNING: " + warning, int((WIDTH - 2 * _PAD) / _CHAR_PX)):
            y += 18
            body.append(_text(_PAD, y, line, fill=_WARN, weight="bold"))
    if not bars:
        y += 28
        body.append(_text(_PAD, y, "no markers measured yet", fill=_MUTED, size=14))
    else:
        y = _path_bars(body, bars, colour, y + 14)
        y = _legend(body, bars, colour, y + 8)
        y = _over_time(body, points, colour, y + 28, now, every_s, span_s)
    height = y + _PAD
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12" '
        f'role="img" aria-label="Hops: own latency along the path and own p95 over time" '
        f'style="max-width:100%;height:auto">'
        f'<rect class="background" x="0.5" y="0.5" width="{WIDTH - 1}" height="{height - 1}" '
        f'rx="6" fill="#ffffff" stroke="#d0d7de"/>' + "".join(body) + "</svg>"
    )


def _path_bars(body: list[str], bars: Sequence[HopBar], colour: dict[str, str], y: int) -> int:
    """The p50 and p95 bars, a segment per hop; returns the y below them."""
    totals = {q: sum(max(0.0, _ms(b, q)) for b in bars) for q in ("p50", "p95")}
    room = WIDTH - _LEFT - _PAD - 110  # the sum's label after the longer bar
    scale = room / max(totals.values()) if max(totals.values()) > 0 else 0.0
    for q in ("p50", "p95"):
        body.append(_text(_PAD, y + 17, f"own {q}", fill=_MUTED))
        x = float(_LEFT)
        for b in bars:
            ms = _ms(b, q)
            w = max(0.0, ms) * scale
            fill, tip = colour[b.name], f"{b.name}: own {q} {ms:.1f} ms"
            body.append(
                f'<rect class="segment" data-hop={quoteattr(b.name)} data-q="{q}" '
                f'data-ms="{ms:.3f}" x="{x:.2f}" y="{y}" width="{w:.2f}" height="{_BAR_H}" '
                f'fill="{fill}" stroke="#ffffff"><title>{escape(tip)}</title></rect>'
            )
            label = f"{_short(b.name, 16)} {ms:.1f}"
            if w >= len(label) * _CHAR_PX + 8:
                body.append(_text(x + 4, y + 17, label, fill=_on(fill)))
            x += w
        body.append(_text(x + 6, y + 17, f"sum {totals[q]:.1f} ms", fill=_INK))
        y += _BAR_H + 8
    return y


def _legend(body: list[str], bars: Sequence[HopBar], colour: dict[str, str], y: int) -> int:
    """A swatch and both values per hop, flowing over as many lines as needed."""
    x, y = float(_PAD), y + 12
    for b in bars:
        item = f"{_short(b.name, _NAME_CHARS)}  p50 {_fmt(b.p50_ms)}  p95 {_fmt(b.p95_ms)} ms"
        w = 16 + len(item) * _CHAR_PX + 18
        if x > _PAD and x + w > WIDTH - _PAD:
            x, y = float(_PAD), y + 18
        body.append(
            f'<rect x="{x:.1f}" y="{y - 10}" width="11" height="11" fill="{colour[b.name]}"/>'
        )
        body.append(_text(x + 16, y, item, fill=_INK))
        x += w
    return y


def _over_time(
    body: list[str],
    points: Points,
    colour: dict[str, str],
    y: int,
    now: float,
    every_s: float,
    span_s: float,
) -> int:
    """The own p95 of every hop per window, a line each; returns the y below the plot."""
    body.append(
        _text(_PAD, y, f"Own p95 per hop over time ({every_s:g} s windows, ms)", weight="bold")
    )
    top = y + 12
    if not points:
        body.append(
            _text(_PAD, top + 20, f"a point appears after each {every_s:g} s of markers", _MUTED)
        )
        return top + 28
    x0, x1, bottom = _LEFT, WIDTH - _PAD, top + _PLOT_H
    start = max(now - span_s, min(t for t, _ in points))
    start = min(start, now - 60.0)  # at least a minute across
    peak = max(max(v.values(), default=0.0) for _, v in points)
    step = _nice_step(max(peak, 1.0) / 4)
    ymax = step * max(1, math.ceil(max(peak, 1e-9) / step))

    def px(t: float) -> float:
        return x0 + (t - start) / (now - start) * (x1 - x0)

    def py(v: float) -> float:
        return bottom - max(0.0, v) / ymax * _PLOT_H

    for i in range(round(ymax / step) + 1):
        v = i * step
        body.append(f'<line x1="{x0}" x2="{x1}" y1="{py(v):.1f}" y2="{py(v):.1f}" '
                    f'stroke="{_GRID}"/>')
        body.append(_text(x0 - 6, py(v) + 4, f"{v:g}", _MUTED, anchor="end"))
    tick = next((s for s in (10, 30, 60, 120, 300, 600) if (now - start) / s <= 6), 900)
    j = 0
    while now - j * tick >= start:
        t = now - j * tick
        label = "now" if j == 0 else f"-{int(j * tick) // 60}:{int(j * tick) % 60:02d}"
        body.append(_text(px(t), bottom + 16, label, _MUTED, anchor="middle"))
        j += 1
    body.append(f'<line x1="{x0}" x2="{x1}" y1="{bottom}" y2="{bottom}" stroke="{_MUTED}"/>')
    for hop, c in colour.items():
        for run in _runs(points, hop, 2.5 * every_s):
            xy = [(px(t), py(v)) for t, v in run]
            mark = f'class="p95" data-hop={quoteattr(hop)}'
            if len(xy) == 1:
                body.append(f'<circle {mark} cx="{xy[0][0]:.1f}" cy="{xy[0][1]:.1f}" r="2.5" '
                            f'fill="{c}"/>')
            else:
                pts = " ".join(f"{a:.1f},{b:.1f}" for a, b in xy)
                body.append(f'<polyline {mark} points="{pts}" fill="none" stroke="{c}" '
                            'stroke-width="2"/>')
    return bottom + 22


def _runs(points: Points, hop: str, max_gap_s: float) -> list[list[tuple[float, float]]]:
    """The hop's points split where it has none or the windows are further apart than a gap."""
    runs: list[list[tuple[float, float]]] = []
    last = -math.inf
    for t, values in points:
        v = values.get(hop)
        if v is None:
            last = -math.inf
            continue
        if t - last > max_gap_s:
            runs.append([])
        runs[-1].append((t, v))
        last = t
    return runs


def _nice_step(raw: float) -> float:
    """The smallest 1, 2 or 5 times a power of ten that is at least ``raw``."""
    mag = 10.0 ** math.floor(math.log10(raw))
    return next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)


def _ms(b: HopBar, q: str) -> float:
    v = b.p50_ms if q == "p50" else b.p95_ms
    return 0.0 if v is None else v


def _float(v: object) -> float | None:
    return float(v) if isinstance(v, int | float) else None


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def _short(name: str, n: int) -> str:
    return name if len(name) <= n else name[: n - 1] + "\u2026"


def _on(fill: str) -> str:
    """Black or white text, whichever reads on ``fill`` (#rrggbb)."""
    r, g, b = (int(fill[i : i + 2], 16) for i in (1, 3, 5))
    return "#000000" if 0.299 * r + 0.587 * g + 0.114 * b > 150 else "#ffffff"


def _text(
    x: float,
    y: float,
    text: str,
    fill: str = _INK,
    *,
    anchor: str = "start",
    weight: str = "normal",
    size: int = 12,
) -> str:
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" fill="{fill}" text-anchor="{anchor}" '
        f'font-weight="{weight}" font-size="{size}">{escape(text)}</text>'
    )


# The page half: on the Hops tab (Locust keeps the tab in the URL's ``tab`` parameter), put a box
# above the table and fill it with /hops/chart.svg, fetched from the same origin every 5 s.
# React owns the page, so the box is put back whenever a render has dropped or moved it.
PAGE_SCRIPT = """<script>
(function () {
  var box = null, fetched = 0, busy = false;
  function onHops() { return new URLSearchParams(location.search).get("tab") === "hops"; }
  function load() {
    busy = true; fetched = Date.now();
    fetch("./hops/chart.svg", {cache: "no-store", credentials: "same-origin"})
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (text) {
        var svg = text && new DOMParser().parseFromString(text, "image/svg+xml").documentElement;
        if (svg && svg.nodeName === "svg") { box.replaceChildren(document.importNode(svg, true)); }
      })
      .catch(function () {})
      .then(function () { busy = false; });
  }
  function tick() {
    var table = onHops() && document.querySelector("table");
    if (!table) { if (box && box.parentNode) { box.parentNode.removeChild(box); } return; }
    var anchor = table.closest(".MuiTableContainer-root") || table;
    if (!box) { box = document.createElement("div"); box.id = "probe-hops-chart"; }
    if (box.nextSibling !== anchor) {
      box.style.margin = "8px 0 16px";
      anchor.parentNode.insertBefore(box, anchor);
      fetched = 0;
    }
    if (!busy && Date.now() - fetched >= 5000) { load(); }
  }
  setInterval(tick, 500);
})();
</script>"""


def with_page_script(html: str) -> str:
    """The web UI's page with :data:`PAGE_SCRIPT` added before ``</body>``."""
    at = html.rfind("</body>")
    return html + PAGE_SCRIPT if at < 0 else html[:at] + PAGE_SCRIPT + html[at:]
