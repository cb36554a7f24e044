"""Server-side SVG line charts of a run's samples (no JavaScript, no CDN): one function that
draws a series against time, with optional reference lines (85 °C limit, VRAM budget).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from html import escape
from typing import Any, Callable, Sequence

from jobs.contract.units import format_size
from lab_attendant.store.samples import formatter

WIDTH, HEIGHT = 640, 190
LEFT, RIGHT, TOP, BOTTOM = 70, 12, 24, 28       # margins, px
MARKERS_UP_TO = 240                             # points drawn as dots too (beyond: the line only)


@dataclass(frozen=True)
class Line:
    value: float
    label: str
    color: str = "#c0392b"


def chart(title: str, points: Sequence[tuple[float, float]], *, unit: str = "",
          lines: Sequence[Line] = (), css_id: str = "") -> str:
    """An <svg> of (unix time, value) points; an empty figure says that nothing was recorded."""
    fmt = formatter(unit)
    head = (f'<svg class="plot" id="{escape(css_id)}" xmlns="http://www.w3.org/2000/svg" '
            f'viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" role="img" '
            f'aria-label="{escape(title)}" data-points="{len(points)}">'
            f'<text x="{LEFT}" y="15" class="plot-title">{escape(title)}</text>')
    if not points:
        return head + (f'<text x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle" '
                       'class="plot-empty">no readings recorded</text></svg>')
    ts = [t for t, _ in points]
    vs = [v for _, v in points] + [ln.value for ln in lines]
    t0, t1 = min(ts), max(ts)
    lo, hi = min(vs), max(vs)
    if hi == lo:
        lo, hi = lo - 1, hi + 1
    pad = (hi - lo) * 0.08
    lo, hi = (0.0 if lo >= 0 and lo - pad < 0 else lo - pad), hi + pad
    span_t = (t1 - t0) or 1.0
    w, h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(t: float) -> float:
        return LEFT + (t - t0) / span_t * w

    def y(v: float) -> float:
        return TOP + (hi - v) / (hi - lo) * h

    parts = [head, f'<rect x="{LEFT}" y="{TOP}" width="{w}" height="{h}" class="plot-frame"/>']
    for i in range(5):   # horizontal grid with value labels
        v = lo + (hi - lo) * i / 4
        parts.append(f'<line x1="{LEFT}" x2="{LEFT + w}" y1="{y(v):.1f}" y2="{y(v):.1f}" '
                     f'class="plot-grid"/><text x="{LEFT - 4}" y="{y(v) + 4:.1f}" '
                     f'text-anchor="end" class="plot-tick">{escape(fmt(v))}</text>')
    for frac, anchor in ((0.0, "start"), (0.5, "middle"), (1.0, "end")):
        t = t0 + span_t * frac
        parts.append(f'<text x="{x(t):.1f}" y="{HEIGHT - 8}" text-anchor="{anchor}" '
                     f'class="plot-tick">{time.strftime("%H:%M:%S", time.localtime(t))}</text>')
    for ln in lines:
        parts.append(f'<line x1="{LEFT}" x2="{LEFT + w}" y1="{y(ln.value):.1f}" '
                     f'y2="{y(ln.value):.1f}" stroke="{ln.color}" stroke-dasharray="6 4" '
                     f'class="plot-ref"/><text x="{LEFT + w - 4}" y="{y(ln.value) - 4:.1f}" '
                     f'text-anchor="end" fill="{ln.color}" class="plot-tick">'
                     f'{escape(ln.label)}</text>')
    coords = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in points)
    parts.append(f'<polyline points="{coords}" class="plot-line" fill="none"/>')
    if len(points) <= MARKERS_UP_TO:
        parts += [f'<circle cx="{x(t):.1f}" cy="{y(v):.1f}" r="2.2" class="plot-dot">'
                  f'<title>{escape(fmt(v))} at {time.strftime("%H:%M:%S", time.localtime(t))}'
                  f'</title></circle>' for t, v in points]
    parts.append("</svg>")
    return "".join(parts)


def series(samples: Sequence[dict[str, Any]], key: str,
           scale: Callable[[dict[str, Any]], float | None] | None = None) -> list[tuple[float, float]]:
    out = []
    for s in samples:
        v = scale(s) if scale else s.get(key)
        if v is not None:
            out.append((s["at"], float(v)))
    return out


def run_charts(samples: Sequence[dict[str, Any]], *, thermal_limit_c: float,
               resume_below_c: float, vram_budget_bytes: int) -> list[str]:
    """The run page's figures, in the order a person checks them."""
    def pct(s: dict[str, Any]) -> float | None:
        done, total = s.get("progress_done"), s.get("progress_total")
        return 100.0 * done / total if done is not None and total else None

    vram_lines = [Line(vram_budget_bytes, f"budget {format_size(vram_budget_bytes)}",
                       "#8e44ad")] if vram_budget_bytes else []
    figures = [
        ("plot-temperature", "GPU temperature", series(samples, "gpu_temperature_c"), "°C",
         [Line(thermal_limit_c, f"{thermal_limit_c:g} °C limit"),
          Line(resume_below_c, f"{resume_below_c:g} °C resume", "#e67e22")]),
        ("plot-vram", "GPU memory of the worker vs budget", series(samples, "gpu_memory_bytes"),
         "bytes", vram_lines),
        ("plot-rss", "Worker tree RSS", series(samples, "rss_bytes"), "bytes", []),
        ("plot-progress", "Progress", series(samples, "", pct), "%", []),
        ("plot-tokens", "Tokens/s", series(samples, "tokens_per_s"), "tok/s", []),
        ("plot-power", "GPU power", series(samples, "gpu_power_w"), "W", []),
        ("plot-clock", "SM clock", series(samples, "gpu_sm_clock_mhz"), "MHz", []),
        ("plot-read", "Bytes read/s", series(samples, "read_bytes_per_s"), "bytes/s", []),
    ]
    return [chart(title, pts, unit=unit, lines=lines, css_id=cid)
            for cid, title, pts, unit, lines in figures]


ACTION_COLORS = {"kill": "#c0392b", "hold": "#e67e22", "resume": "#27ae60", "stop": "#8e44ad",
                 "suspended": "#8e44ad", "start": "#2980b9", "restored": "#2980b9"}


def guard_strip(events: Sequence[dict[str, Any]]) -> str:
    """Guard and co-tenant events on one time axis, one lane per guard: a mark per event."""
    if not events:
        return chart("Guard and co-tenant events", [])
    lanes = sorted({e["guard"] for e in events})
    lane_h = 26
    height = TOP + lane_h * len(lanes) + BOTTOM
    t0, t1 = min(e["at"] for e in events), max(e["at"] for e in events)
    span = (t1 - t0) or 1.0
    w = WIDTH - 130 - RIGHT
    parts = [f'<svg class="plot" id="plot-guards" xmlns="http://www.w3.org/2000/svg" '
             f'viewBox="0 0 {WIDTH} {height}" width="{WIDTH}" height="{height}" role="img" '
             f'aria-label="guard timeline" data-points="{len(events)}">'
             f'<text x="130" y="15" class="plot-title">Guard and co-tenant events</text>']
    for i, lane in enumerate(lanes):
        y = TOP + lane_h * i + lane_h / 2
        parts.append(f'<text x="124" y="{y + 4:.1f}" text-anchor="end" class="plot-tick">'
                     f'{escape(lane)}</text><line x1="130" x2="{130 + w}" y1="{y:.1f}" '
                     f'y2="{y:.1f}" class="plot-grid"/>')
    for e in events:
        x = 130 + (e["at"] - t0) / span * w
        y = TOP + lane_h * lanes.index(e["guard"]) + lane_h / 2
        color = ACTION_COLORS.get(e["action"], "#555")
        parts.append(f'<rect x="{x - 4:.1f}" y="{y - 7:.1f}" width="8" height="14" fill="{color}" '
                     f'class="plot-mark"><title>{escape(e["action"])}: {escape(e["reason"])}'
                     f'</title></rect>')
    for frac, anchor in ((0.0, "start"), (1.0, "end")):
        t = t0 + span * frac
        parts.append(f'<text x="{130 + w * frac:.1f}" y="{height - 8}" text-anchor="{anchor}" '
                     f'class="plot-tick">{time.strftime("%m-%d %H:%M:%S", time.localtime(t))}'
                     '</text>')
    parts.append("</svg>")
    return "".join(parts)
