"""A self-contained HTML report of a canary run: no scripts, no external CSS, fonts or images.

Sans-I/O: :func:`render_html` turns a ``probe.report/v1`` dict and its verdict into one HTML
string with inline SVG:

- the checks and the per-hop table;
- two waterfalls, for a *typical* marker (end-to-end latency nearest the median) and the
  *worst* one (the largest): for one marker, each hop's own latency as a bar stacked along the
  cumulative time axis, so the hop that took the time stands out;
- latency over time per hop: the cumulative latency of each marker by its send time, one
  polyline per hop; missed markers are red ticks on the time axis.

A marker's end-to-end latency is the largest cumulative latency among the hops that saw it.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from html import escape
from typing import Any

from probe.canary.thresholds import Verdict

__all__ = ["Bar", "Waterfall", "render_html", "waterfalls"]

_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;max-width:980px}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0}td,th{padding:2px 10px;border-bottom:1px solid #ddd}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
.ok{color:#18794e}.fail{color:#c62828;font-weight:600}
.verdict{display:inline-block;padding:2px 10px;border-radius:4px;color:#fff}
.pass-bg{background:#18794e}.fail-bg{background:#c62828}
svg text{font:11px system-ui,sans-serif;fill:#333}
"""


@dataclass(frozen=True)
class Bar:
    """One hop's bar in a waterfall: from ``start_ms`` (the previous hop's cumulative latency)
    to ``end_ms`` (this hop's); both None when the hop missed the marker."""

    hop: str
    start_ms: float | None
    end_ms: float | None


@dataclass(frozen=True)
class Waterfall:
    session: str
    marker: int
    send_time: float
    end_to_end_ms: float
    bars: tuple[Bar, ...]


def _markers(report: Mapping[str, Any]) -> dict[tuple[str, int], dict[str, Any]]:
    out: dict[tuple[str, int], dict[str, Any]] = {}
    for row in report.get("series", []):
        key = (str(row["session"]), int(row["marker"]))
        entry = out.setdefault(key, {"send_time": float(row["send_time"]), "hops": {}})
        entry["hops"][str(row["hop"])] = row.get("latency_ms")
    return out


def _waterfall(key: tuple[str, int], entry: Mapping[str, Any], order: Sequence[str]) -> Waterfall:
    hops: Mapping[str, float | None] = entry["hops"]
    bars: list[Bar] = []
    prev = 0.0
    for hop in [*order, *sorted(h for h in hops if h not in order)]:
        if hop not in hops:
            continue
        lat = hops[hop]
        if lat is None:
            bars.append(Bar(hop, None, None))
            continue
        bars.append(Bar(hop, prev, float(lat)))
        prev = float(lat)
    e2e = max(float(v) for v in hops.values() if v is not None)
    return Waterfall(key[0], key[1], float(entry["send_time"]), e2e, tuple(bars))


def waterfalls(report: Mapping[str, Any]) -> tuple[Waterfall, Waterfall] | None:
    """(typical, worst) from the report's series; None when no marker was detected anywhere."""
    order = [str(h["name"]) for h in report.get("hops", [])]
    candidates = [
        (k, v)
        for k, v in _markers(report).items()
        if any(x is not None for x in v["hops"].values())
    ]
    if not candidates:
        return None
    falls = [_waterfall(k, v, order) for k, v in candidates]
    median = statistics.median(w.end_to_end_ms for w in falls)
    typical = min(falls, key=lambda w: (abs(w.end_to_end_ms - median), w.send_time))
    worst = max(falls, key=lambda w: (w.end_to_end_ms, -w.send_time))
    return typical, worst


def _n(v: Any, digits: int = 1) -> str:
    return "-" if v is None else f"{float(v):.{digits}f}"


def _svg_waterfall(w: Waterfall, scale_ms: float, colors: Mapping[str, str]) -> str:
    label_w, plot_w, row_h = 130, 560, 22
    height = row_h * len(w.bars) + 30
    span = max(scale_ms, 1e-9)
    parts = [f'<svg width="{label_w + plot_w + 80}" height="{height}" role="img">']
    for i, b in enumerate(w.bars):
        y = 6 + i * row_h
        parts.append(
            f'<text x="{label_w - 6}" y="{y + 14}" text-anchor="end">{escape(b.hop)}</text>'
        )
        if b.start_ms is None or b.end_ms is None:
            parts.append(f'<text x="{label_w + 4}" y="{y + 14}" fill="#c62828">missed</text>')
            continue
        lo, hi = sorted((b.start_ms, b.end_ms))
        x = label_w + plot_w * lo / span
        width = max(plot_w * (hi - lo) / span, 1.0)
        own = b.end_ms - b.start_ms
        parts.append(
            f'<rect x="{x:.1f}" y="{y}" width="{width:.1f}" height="{row_h - 6}" '
            f'fill="{colors.get(b.hop, "#555")}"><title>{escape(b.hop)}: own {own:.1f} ms, '
            f"cumulative {b.end_ms:.1f} ms</title></rect>"
        )
        parts.append(f'<text x="{x + width + 4:.1f}" y="{y + 14}">{own:.1f} ms</text>')
    axis_y = 6 + len(w.bars) * row_h + 4
    parts.append(
        f'<line x1="{label_w}" y1="{axis_y}" x2="{label_w + plot_w}" y2="{axis_y}" stroke="#999"/>'
    )
    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
        x = label_w + plot_w * frac
        parts.append(
            f'<text x="{x:.1f}" y="{axis_y + 14}" text-anchor="middle">{span * frac:.0f} ms</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _svg_series(
    hop: str, rows: Sequence[Mapping[str, Any]], t0: float, t_span: float, color: str
) -> str:
    left, plot_w, plot_h, top = 60, 640, 120, 10
    pts = sorted(
        (float(r["send_time"]) - t0, float(r["latency_ms"]))
        for r in rows
        if r.get("latency_ms") is not None
    )
    misses = sorted(float(r["send_time"]) - t0 for r in rows if r.get("latency_ms") is None)
    y_max = max((p[1] for p in pts), default=1.0) * 1.1 or 1.0
    y_min = 0.0
    span_t = max(t_span, 1e-9)

    def xy(t: float, v: float) -> str:
        x = left + plot_w * t / span_t
        y = top + plot_h * (1.0 - (v - y_min) / (y_max - y_min))
        return f"{x:.1f},{y:.1f}"

    parts = [
        f'<svg width="{left + plot_w + 20}" height="{top + plot_h + 30}" role="img">',
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" '
        'stroke="#ccc"/>',
        f'<text x="{left - 6}" y="{top + 10}" text-anchor="end">{y_max:.0f} ms</text>',
        f'<text x="{left - 6}" y="{top + plot_h}" text-anchor="end">0</text>',
        f'<text x="{left}" y="{top + plot_h + 16}">0 s</text>',
        f'<text x="{left + plot_w}" y="{top + plot_h + 16}" text-anchor="end">'
        f"{span_t:.1f} s</text>",
    ]
    if pts:
        parts.append(
            f'<polyline fill="none" stroke="{color}" stroke-width="1.5" '
            f'points="{" ".join(xy(t, v) for t, v in pts)}"><title>{escape(hop)}</title></polyline>'
        )
    for t in misses:
        x = left + plot_w * t / span_t
        parts.append(
            f'<line x1="{x:.1f}" y1="{top + plot_h - 8}" x2="{x:.1f}" y2="{top + plot_h}" '
            'stroke="#c62828" stroke-width="2"><title>missed</title></line>'
        )
    parts.append("</svg>")
    return "".join(parts)


def render_html(report: Mapping[str, Any], verdict: Verdict | None, *, title: str) -> str:
    """The whole page. ``verdict`` None leaves out the checks (a plain run)."""
    hops = [str(h["name"]) for h in report.get("hops", [])]
    colors = {h: _COLORS[i % len(_COLORS)] for i, h in enumerate(hops)}
    out: list[str] = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
    ]
    if verdict is not None:
        cls, word = ("pass-bg", "PASS") if verdict.ok else ("fail-bg", "FAIL")
        out.append(f'<p><span class="verdict {cls}">{word}</span></p>')
    s = report.get("sessions", {})
    out.append(
        "<p>target <code>{}</code>, started {}, {} s; sessions: {} started, {} completed, "
        "{} failed</p>".format(
            escape(str(report.get("target", ""))),
            escape(str(report.get("started_at", ""))),
            _n(report.get("duration_s")),
            s.get("started", 0),
            s.get("completed", 0),
            s.get("failed", 0),
        )
    )
    if verdict is not None:
        out.append(
            "<h2>Checks</h2><table><tr><th>threshold</th><th>result</th><th>detail</th></tr>"
        )
        for c in verdict.checks:
            res = '<td class="ok">ok</td>' if c.ok else '<td class="fail">breached</td>'
            name = escape(c.threshold) + (" (implicit)" if c.implicit else "")
            out.append(f"<tr><td><code>{name}</code></td>{res}<td>{escape(c.detail)}</td></tr>")
        out.append("</table>")
    out.append(
        '<h2>Hops</h2><table><tr><th>hop</th><th class="n">p50 ms</th><th class="n">p95</th>'
        '<th class="n">p99</th><th class="n">max</th><th class="n">own p50</th>'
        '<th class="n">own p99</th><th class="n">detected / sent</th></tr>'
    )
    for h in report.get("hops", []):
        lat, own, mk = h["latency_ms"], h["own_latency_ms"], h["markers"]
        cells = [_n(lat.get(k)) for k in ("p50", "p95", "p99", "max")]
        cells += [_n(own.get(k)) for k in ("p50", "p99")]
        cells.append(f"{mk['detected']} / {mk['sent']}")
        out.append(
            f'<tr><td><span style="color:{colors[str(h["name"])]}">&#9632;</span> '
            f"{escape(str(h['name']))}</td>"
            + "".join(f'<td class="n">{c}</td>' for c in cells)
            + "</tr>"
        )
    out.append("</table>")
    for e in s.get("errors", [])[:10]:
        out.append(
            f'<p class="fail">{escape(str(e.get("session")))}: {escape(str(e.get("error")))}</p>'
        )
    pair = waterfalls(report)
    out.append("<h2>Waterfalls</h2>")
    if pair is None:
        out.append("<p>No marker was detected, so there is no waterfall.</p>")
    else:
        scale = pair[1].end_to_end_ms
        for label, w in (("Typical marker", pair[0]), ("Worst marker", pair[1])):
            out.append(
                f"<h3>{label}: {w.end_to_end_ms:.1f} ms end to end</h3>"
                f"<p>session <code>{escape(w.session)}</code>, marker {w.marker}</p>"
            )
            out.append(_svg_waterfall(w, scale, colors))
    out.append("<h2>Latency over time</h2>")
    series = report.get("series", [])
    if not series:
        out.append("<p>No markers were sent.</p>")
    else:
        times = [float(r["send_time"]) for r in series]
        t0, t_span = min(times), max(times) - min(times)
        by_hop: dict[str, list[Mapping[str, Any]]] = {}
        for r in series:
            by_hop.setdefault(str(r["hop"]), []).append(r)
        for hop in [*hops, *sorted(h for h in by_hop if h not in colors)]:
            rows = by_hop.get(hop, [])
            if not rows:
                continue
            out.append(f"<h3>{escape(hop)}</h3>")
            out.append(_svg_series(hop, rows, t0, t_span, colors.get(hop, "#555")))
    out.append("</body></html>")
    return "\n".join(out) + "\n"
