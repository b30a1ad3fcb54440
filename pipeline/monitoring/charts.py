"""A small static-SVG chart kit: time-series lines with threshold rules, and grouped bars.

Pure string building with no scripts, fonts or images, so a chart can be inlined into a page that
is stored and opened offline. Every label is HTML-escaped; a missing value (``None``) in a line
breaks it rather than bridging the gap. The monitor's report (``report.py``) is its user.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

__all__ = [
    "BREACH",
    "PALETTE",
    "Bars",
    "Line",
    "Rule",
    "bar_chart",
    "escape",
    "format_number",
    "format_utc",
    "line_chart",
]

# No red in the palette: red is reserved for breaches so it never means two things.
PALETTE = ("#2563eb", "#d97706", "#059669", "#7c3aed", "#0891b2", "#a16207", "#4b5563")
BREACH = "#dc2626"
_AXIS = "#6b7280"
_GRID = "#e5e7eb"

_CHART_W = 760
_LINE_H = 280
_BAR_H = 300
_LEGEND_W = 220
_MARGIN_LEFT = 60
_MARGIN_TOP = 30
_LINE_MARGIN_BOTTOM = 48
_BAR_MARGIN_BOTTOM = 78
_CHAR_PX = 6.5
"""Rough width of one 11 px character, to keep tick labels from overlapping."""
_LABEL_CHARS = 30


# ------------------------------------------------------------------------------------ text
# Shared with the page around the charts, so a tooltip and a table cell read the same.


def escape(text: object) -> str:
    return html.escape(str(text), quote=True)


def format_number(value: float | None) -> str:
    """Four significant digits: enough to compare with a threshold, short enough to scan."""
    if value is None or not math.isfinite(value):
        return "n/a"
    text = f"{value:.4g}"
    return "0" if text == "-0" else text


def format_utc(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _short(label: str) -> str:
    return label if len(label) <= _LABEL_CHARS else label[: _LABEL_CHARS - 1] + "…"


# ---------------------------------------------------------------------------------- SVG pieces


@dataclass(frozen=True)
class Line:
    """One series of a line chart."""

    label: str
    values: tuple[float | None, ...]
    """One per x position; ``None`` where the metric is missing or not finite (a gap)."""
    breached: tuple[bool, ...]
    """One per x position; a breached value gets a larger red marker."""
    colour: str


@dataclass(frozen=True)
class Rule:
    """A dashed horizontal threshold line."""

    label: str
    value: float
    colour: str


@dataclass(frozen=True)
class Bars:
    """One series of a grouped bar chart: a value per category."""

    label: str
    values: tuple[float, ...]
    colour: str


@dataclass(frozen=True)
class _Plot:
    """The plotting rectangle and its data domain; maps data values to SVG coordinates."""

    left: float
    top: float
    width: float
    height: float
    x_lo: float
    x_hi: float
    y_lo: float
    y_hi: float

    @property
    def bottom(self) -> float:
        return self.top + self.height

    @property
    def right(self) -> float:
        return self.left + self.width

    def x(self, value: float) -> float:
        return self.left + (value - self.x_lo) / (self.x_hi - self.x_lo) * self.width

    def y(self, value: float) -> float:
        return self.bottom - (value - self.y_lo) / (self.y_hi - self.y_lo) * self.height


def _f(value: float) -> str:
    return f"{value:.1f}"


def _svg_open(chart_id: str, title: str, height: int) -> list[str]:
    return [
        f'<svg id="{escape(chart_id)}" class="chart" viewBox="0 0 {_CHART_W} {height}" '
        f'width="{_CHART_W}" height="{height}" role="img" font-family="sans-serif" '
        f'font-size="11" '
        f'aria-labelledby="{escape(chart_id)}-title">',
        f'<title id="{escape(chart_id)}-title">{escape(title)}</title>',
        f'<text class="chart-title" x="{_MARGIN_LEFT}" y="18">{escape(title)}</text>',
    ]


def _text(x: float, y: float, text: str, anchor: str = "start", extra: str = "") -> str:
    return f'<text x="{_f(x)}" y="{_f(y)}" text-anchor="{anchor}"{extra}>{escape(text)}</text>'


def _no_data(height: int, message: str = "No data to plot") -> str:
    return _text(_CHART_W / 2, height / 2, message, "middle", ' class="no-data"')


def _nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """Round tick values covering [lo, hi], so the axis reads 0, 0.1, 0.2 and not 0.137."""
    if not hi > lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / target
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1.0, 2.0, 2.5, 5.0, 10.0) if m * magnitude >= raw)
    start = math.floor(lo / step) * step
    count = math.ceil(round((hi - start) / step, 9))
    return [round(start + index * step, 12) for index in range(count + 1)]


def _y_axis(plot: _Plot, ticks: Sequence[float], label: str) -> list[str]:
    parts = [
        f'<line class="axis" stroke="{_AXIS}" x1="{_f(plot.left)}" y1="{_f(plot.top)}" '
        f'x2="{_f(plot.left)}" y2="{_f(plot.bottom)}"/>',
        _text(
            14,
            plot.top + plot.height / 2,
            label,
            "middle",
            f' class="axis-label" transform="rotate(-90 14 {_f(plot.top + plot.height / 2)})"',
        ),
    ]
    for tick in ticks:
        y = plot.y(tick)
        parts.append(
            f'<line class="grid" stroke="{_GRID}" x1="{_f(plot.left)}" y1="{_f(y)}" '
            f'x2="{_f(plot.right)}" y2="{_f(y)}"/>'
        )
        parts.append(_text(plot.left - 6, y + 4, format_number(tick), "end", ' class="tick"'))
    return parts


def _x_axis_line(plot: _Plot, label: str, label_y: float) -> list[str]:
    return [
        f'<line class="axis" stroke="{_AXIS}" x1="{_f(plot.left)}" y1="{_f(plot.bottom)}" '
        f'x2="{_f(plot.right)}" y2="{_f(plot.bottom)}"/>',
        _text(plot.left + plot.width / 2, label_y, label, "middle", ' class="axis-label"'),
    ]


def _legend_entry(x: float, y: float, label: str, swatch: str) -> list[str]:
    return [
        swatch,
        f'<text x="{_f(x + 26)}" y="{_f(y + 4)}">{escape(_short(label))}<title>{escape(label)}'
        "</title></text>",
    ]


def _legend(lines: Sequence[Line], rules: Sequence[Rule], left: float) -> list[str]:
    parts = ['<g class="legend">']
    y = _MARGIN_TOP + 8.0
    for line in lines:
        swatch = (
            f'<line x1="{_f(left)}" y1="{_f(y)}" x2="{_f(left + 20)}" y2="{_f(y)}" '
            f'stroke="{line.colour}" stroke-width="2"/>'
        )
        parts += _legend_entry(left, y, line.label, swatch)
        y += 18
    for rule in rules:
        swatch = (
            f'<line x1="{_f(left)}" y1="{_f(y)}" x2="{_f(left + 20)}" y2="{_f(y)}" '
            f'stroke="{rule.colour}" stroke-width="1.5" stroke-dasharray="5 3"/>'
        )
        parts += _legend_entry(left, y, rule.label, swatch)
        y += 18
    if any(any(line.breached) for line in lines):
        swatch = f'<circle cx="{_f(left + 10)}" cy="{_f(y)}" r="4.5" fill="{BREACH}"/>'
        parts += _legend_entry(left, y, "breach", swatch)
    parts.append("</g>")
    return parts


# ---------------------------------------------------------------------------------- line chart


def _time_format(xs_ms: Sequence[int]) -> str:
    span = max(xs_ms) - min(xs_ms)
    clock = "%H:%M" if all(x % 60_000 == 0 for x in xs_ms) else "%H:%M:%S"
    return f"%m-%d {clock}" if span >= 86_400_000 else clock


def _x_time_axis(plot: _Plot, xs_ms: Sequence[int], label: str) -> list[str]:
    first_day = datetime.fromtimestamp(min(xs_ms) / 1000, tz=UTC).strftime("%Y-%m-%d")
    parts = _x_axis_line(plot, f"{label} (UTC, from {first_day})", plot.bottom + 38)
    time_format = _time_format(xs_ms)
    last_x = -math.inf
    for x_ms in xs_ms:
        x = plot.x(x_ms)
        label = datetime.fromtimestamp(x_ms / 1000, tz=UTC).strftime(time_format)
        # Long or uneven histories would overlap: a time too close to the last label is left
        # unlabelled (its point still has a tooltip).
        if x - last_x < len(label) * _CHAR_PX + 10:
            continue
        last_x = x
        parts.append(
            f'<line class="axis" stroke="{_AXIS}" x1="{_f(x)}" y1="{_f(plot.bottom)}" '
            f'x2="{_f(x)}" y2="{_f(plot.bottom + 4)}"/>'
        )
        parts.append(_text(x, plot.bottom + 17, label, "middle", ' class="tick"'))
    return parts


def _segments(line: Line, plot: _Plot, xs_ms: Sequence[int]) -> list[list[tuple[float, float]]]:
    """Runs of consecutive present values; a missing value breaks the line instead of bridging."""
    runs: list[list[tuple[float, float]]] = [[]]
    for x_ms, value in zip(xs_ms, line.values, strict=True):
        if value is None:
            if runs[-1]:
                runs.append([])
            continue
        runs[-1].append((plot.x(x_ms), plot.y(value)))
    return [run for run in runs if run]


def _series_svg(line: Line, plot: _Plot, xs_ms: Sequence[int]) -> list[str]:
    parts = [f'<g class="series" data-series="{escape(line.label)}">']
    for run in _segments(line, plot, xs_ms):
        points = " ".join(f"{_f(x)},{_f(y)}" for x, y in run)
        parts.append(
            f'<polyline points="{points}" fill="none" stroke="{line.colour}" stroke-width="2"/>'
        )
    for x_ms, value, breached in zip(xs_ms, line.values, line.breached, strict=True):
        if value is None:
            continue
        css, radius, fill = ("point breach", 4.5, BREACH) if breached else ("point", 3, line.colour)
        tip = f"{line.label} at {format_utc(x_ms)}: {format_number(value)}" + (
            " (breach)" if breached else ""
        )
        parts.append(
            f'<circle class="{css}" data-series="{escape(line.label)}" '
            f'cx="{_f(plot.x(x_ms))}" cy="{_f(plot.y(value))}" r="{radius}" fill="{fill}">'
            f"<title>{escape(tip)}</title></circle>"
        )
    parts.append("</g>")
    return parts


def _rule_svg(rule: Rule, plot: _Plot) -> list[str]:
    y = plot.y(rule.value)
    return [
        f'<line class="threshold" data-threshold="{format_number(rule.value)}" '
        f'x1="{_f(plot.left)}" y1="{_f(y)}" x2="{_f(plot.right)}" y2="{_f(y)}" '
        f'stroke="{rule.colour}" '
        f'stroke-width="1.5" stroke-dasharray="5 3"><title>{escape(rule.label)}</title></line>'
    ]


def _time_domain(xs_ms: Sequence[int]) -> tuple[float, float]:
    lo, hi = float(min(xs_ms)), float(max(xs_ms))
    # Pad so the first and last points do not sit on the axes; a lone window gets centred.
    pad = (hi - lo) * 0.04 if hi > lo else 60_000.0
    return lo - pad, hi + pad


def line_chart(
    chart_id: str,
    title: str,
    xs_ms: Sequence[int],
    lines: Sequence[Line],
    rules: Sequence[Rule],
    *,
    x_label: str,
    y_label: str,
) -> str:
    """A time-series chart over ``xs_ms`` (epoch milliseconds, one per value of every line): one
    polyline per line, a marker per present value (red when it breached), dashed threshold rules
    and a legend on the right. The x axis reads ``<x_label> (UTC, from <first day>)``; the y axis
    starts at zero or below and reaches the highest value or rule. With no times or no present
    value the chart says "No data to plot"."""
    parts = _svg_open(chart_id, title, _LINE_H)
    values = [value for line in lines for value in line.values if value is not None]
    if not xs_ms or not values:
        parts += [_no_data(_LINE_H), "</svg>"]
        return "\n".join(parts)
    ticks = _nice_ticks(min(0.0, *values), max([*values, *(rule.value for rule in rules)]))
    x_lo, x_hi = _time_domain(xs_ms)
    plot = _Plot(
        left=_MARGIN_LEFT,
        top=_MARGIN_TOP,
        width=_CHART_W - _MARGIN_LEFT - _LEGEND_W,
        height=_LINE_H - _MARGIN_TOP - _LINE_MARGIN_BOTTOM,
        x_lo=x_lo,
        x_hi=x_hi,
        y_lo=ticks[0],
        y_hi=ticks[-1],
    )
    parts += _y_axis(plot, ticks, y_label)
    parts += _x_time_axis(plot, xs_ms, x_label)
    for rule in rules:
        parts += _rule_svg(rule, plot)
    for line in lines:
        parts += _series_svg(line, plot, xs_ms)
    parts += _legend(lines, rules, plot.right + 16)
    parts.append("</svg>")
    return "\n".join(parts)


# ---------------------------------------------------------------------------- grouped bar chart


def _tilted(plot: _Plot, categories: Sequence[str]) -> bool:
    """Whether upright labels would run into each other."""
    return max(len(label) for label in categories) * _CHAR_PX > plot.width / len(categories)


def _category_labels(plot: _Plot, categories: Sequence[str]) -> list[str]:
    group = plot.width / len(categories)
    tilt = _tilted(plot, categories)
    parts = []
    for index, label in enumerate(categories):
        x = plot.left + group * (index + 0.5)
        y = plot.bottom + 14
        if tilt:
            extra = f' class="tick" transform="rotate(-35 {_f(x)} {_f(y)})"'
            parts.append(_text(x, y, label, "end", extra))
        else:
            parts.append(_text(x, y, label, "middle", ' class="tick"'))
    return parts


def _bars_svg(plot: _Plot, categories: Sequence[str], bars: Sequence[Bars]) -> list[str]:
    group = plot.width / len(categories)
    width = group * 0.8 / len(bars)
    parts = []
    for series_index, series in enumerate(bars):
        parts.append(f'<g class="bars" data-series="{escape(series.label)}">')
        for index, (category, value) in enumerate(zip(categories, series.values, strict=True)):
            x = plot.left + group * (index + 0.1) + width * series_index
            top = plot.y(value)
            tip = f"{series.label}, {category}: {value:.1%}"
            parts.append(
                f'<rect x="{_f(x)}" y="{_f(top)}" width="{_f(width)}" '
                f'height="{_f(plot.bottom - top)}" fill="{series.colour}">'
                f"<title>{escape(tip)}</title></rect>"
            )
        parts.append("</g>")
    return parts


def _bar_legend(bars: Sequence[Bars], left: float) -> list[str]:
    parts = ['<g class="legend">']
    for index, series in enumerate(bars):
        y = _MARGIN_TOP + 8.0 + 18 * index
        swatch = (
            f'<rect x="{_f(left)}" y="{_f(y - 6)}" width="20" height="12" fill="{series.colour}"/>'
        )
        parts += _legend_entry(left, y, series.label, swatch)
    parts.append("</g>")
    return parts


def bar_chart(
    chart_id: str,
    title: str,
    categories: Sequence[str],
    bars: Sequence[Bars],
    *,
    x_label: str,
    y_label: str,
) -> str:
    """Grouped bars: one group per category, one bar per series (each series has a value per
    category, drawn from zero), with a legend on the right. Category labels tilt when upright
    ones would run into each other. With no categories or no series the chart says
    "No data to plot"."""
    parts = _svg_open(chart_id, title, _BAR_H)
    if not categories or not bars:
        parts += [_no_data(_BAR_H), "</svg>"]
        return "\n".join(parts)
    ticks = _nice_ticks(0.0, max(value for series in bars for value in series.values))
    plot = _Plot(
        left=_MARGIN_LEFT,
        top=_MARGIN_TOP,
        width=_CHART_W - _MARGIN_LEFT - _LEGEND_W,
        height=_BAR_H - _MARGIN_TOP - _BAR_MARGIN_BOTTOM,
        x_lo=0.0,
        x_hi=1.0,
        y_lo=ticks[0],
        y_hi=ticks[-1],
    )
    parts += _y_axis(plot, ticks, y_label)
    label_y = _BAR_H - 6 if _tilted(plot, categories) else plot.bottom + 36
    parts += _x_axis_line(plot, x_label, label_y)
    parts += _category_labels(plot, categories)
    parts += _bars_svg(plot, categories, bars)
    parts += _bar_legend(bars, plot.right + 16)
    parts.append("</svg>")
    return "\n".join(parts)
