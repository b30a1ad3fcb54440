"""Render one monitor decision as a JSON document and as a self-contained HTML page.

The page is for the person who has to decide whether a rollback was right: the headline and the
evidence come first, then the charts that show how the drift built up, then every number. All of
it is inline (CSS and SVG drawn here, no scripts, fonts or images) so the page can be stored next
to the JSON in the object store and opened offline or attached to a ticket as one file.

Everything taken from the data (model, feature names, explanation) is HTML-escaped. NaN and
infinite values read "n/a", a metric a window lacks reads as a dash, and neither is plotted: the
chart line breaks there rather than bridging the gap.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import pairwise
from typing import Any

from pipeline.monitoring.evidence import ReportData, WindowSummary

__all__ = ["render_html", "report_json"]

_FEATURE_TESTS = ("psi", "ks", "chi2")
_SCORE = "score"
_PSI_SCORE = "psi:score"
_QUALITY_METRICS = ("log_loss", "error_rate", "low_confidence_rate")
_METRIC_ORDER = (
    "log_loss",
    "error_rate",
    "low_confidence_rate",
    "expired_rate",
    "latency_p99_ms",
)
_DECISION_LABELS = {"rollback": "ROLLBACK", "alert": "ALERT", "none": "NO ACTION"}

# No red in the palette: red is reserved for breaches so it never means two things.
_PALETTE = ("#2563eb", "#d97706", "#059669", "#7c3aed", "#0891b2", "#a16207", "#4b5563")
_BREACH = "#dc2626"
_REFERENCE = "#9ca3af"
_CURRENT = "#2563eb"
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
_DASH = "\u2013"
_MINUS = "\u2212"
_SAFE_ID = re.compile(r"[^A-Za-z0-9_.-]")


# --------------------------------------------------------------------------------------- JSON


def report_json(data: ReportData) -> dict[str, Any]:
    """Every field of ``data`` as plain JSON types, with ISO-8601 UTC times beside the ms values.

    Non-finite floats become ``null`` so the document is strict JSON
    (``json.dumps(..., allow_nan=False)`` works); an open-ended histogram edge therefore reads as
    ``null`` at either end of its edge list.
    """
    return {
        "report_id": data.report_id,
        "model": data.model,
        "version": data.version,
        "baseline_version": data.baseline_version,
        "decision": data.decision,
        "explanation": data.explanation,
        "created_at_ms": data.created_at_ms,
        "created_at": _iso(data.created_at_ms),
        "thresholds": {name: _json_float(value) for name, value in data.thresholds.items()},
        "score_edges": _json_floats(data.score_edges),
        "reference_score_counts": _json_counts(data.reference_score_counts),
        "feature_edges": {name: _json_floats(e) for name, e in data.feature_edges.items()},
        "reference_feature_counts": {
            name: _json_counts(c) for name, c in data.reference_feature_counts.items()
        },
        "windows": [_window_json(window) for window in data.windows],
    }


def _window_json(window: WindowSummary) -> dict[str, Any]:
    return {
        "model": window.model,
        "version": window.version,
        "start_ms": window.start_ms,
        "start": _iso(window.start_ms),
        "end_ms": window.end_ms,
        "end": _iso(window.end_ms),
        "count": window.count,
        "breached": window.breached,
        "metrics": {name: _json_float(value) for name, value in window.metrics.items()},
        "breaches": [
            {
                "metric": breach.metric,
                "value": _json_float(breach.value),
                "threshold": _json_float(breach.threshold),
            }
            for breach in window.breaches
        ],
        "score_counts": _json_counts(window.score_counts),
        "feature_counts": {name: _json_counts(c) for name, c in window.feature_counts.items()},
    }


def _json_float(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _json_floats(values: Sequence[float]) -> list[float | None]:
    return [_json_float(value) for value in values]


def _json_counts(counts: Sequence[int]) -> list[int]:
    # int() because counts may arrive as numpy integers, which json cannot encode.
    return [int(count) for count in counts]


def _iso(ms: int) -> str:
    moment = datetime.fromtimestamp(ms / 1000, tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


# ------------------------------------------------------------------------------------- facts


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _threshold(data: ReportData, metric: str) -> float | None:
    """Per-metric thresholds win over per-test ones (``psi`` covers every ``psi:*``); a breach's
    own threshold is the last resort, for metrics the configured thresholds do not name."""
    prefix = metric.partition(":")[0]
    for key in (metric, prefix):
        if key in data.thresholds:
            return _finite(data.thresholds[key])
    for window in reversed(data.windows):
        for breach in window.breaches:
            if breach.metric == metric:
                return _finite(breach.threshold)
    return None


def _feature_of(metric: str) -> str | None:
    test, sep, name = metric.partition(":")
    if sep and test in _FEATURE_TESTS and name and name != _SCORE:
        return name
    return None


def _breached_features(windows: Sequence[WindowSummary]) -> list[str]:
    """Features named by any breach of ``windows``, in order of first breach."""
    features: dict[str, None] = {}
    for window in windows:
        for breach in window.breaches:
            feature = _feature_of(breach.metric)
            if feature is not None:
                features.setdefault(feature)
    return list(features)


def _breaching_windows(windows: Sequence[WindowSummary]) -> list[WindowSummary]:
    """The trailing run of breaching windows: what the decision rests on. An older breach that
    later recovered is still visible in the charts and the window table."""
    run: list[WindowSummary] = []
    for window in reversed(windows):
        if not window.breached:
            break
        run.append(window)
    return run[::-1]


def _has_metric(windows: Sequence[WindowSummary], metric: str) -> bool:
    return any(metric in window.metrics for window in windows)


def _metric_sort_key(metric: str) -> tuple[int, str]:
    test, sep, _ = metric.partition(":")
    if sep and test in _FEATURE_TESTS:
        return _FEATURE_TESTS.index(test), metric
    if metric in _METRIC_ORDER:
        return len(_FEATURE_TESTS) + _METRIC_ORDER.index(metric), metric
    return len(_FEATURE_TESTS) + len(_METRIC_ORDER), metric


# ---------------------------------------------------------------------------------- formatting


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def _num(value: float | None) -> str:
    """Four significant digits: enough to compare with a threshold, short enough to scan."""
    if value is None or not math.isfinite(value):
        return "n/a"
    text = f"{value:.4g}"
    return "0" if text == "-0" else text


def _edge(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    if math.isinf(value):
        return "∞" if value > 0 else _MINUS + "∞"
    # Amounts read better as 1,000 than as 1e+03; small values keep three significant digits.
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"


def _when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _window_range(window: WindowSummary) -> str:
    start = datetime.fromtimestamp(window.start_ms / 1000, tz=UTC)
    end = datetime.fromtimestamp(window.end_ms / 1000, tz=UTC)
    end_format = "%H:%M:%S" if start.date() == end.date() else "%Y-%m-%d %H:%M:%S"
    return f"{start:%Y-%m-%d %H:%M:%S} {_DASH} {end.strftime(end_format)} UTC"


def _short(label: str) -> str:
    return label if len(label) <= _LABEL_CHARS else label[: _LABEL_CHARS - 1] + "…"


def _bin_labels(edges: Sequence[float], bins: int) -> list[str]:
    """Labels for ``bins`` bins whether ``edges`` bound every bin (bins + 1 edges) or only cut
    between them with open ends (bins - 1 edges); anything else falls back to numbering."""
    if len(edges) == bins + 1:
        return [f"{_edge(lo)}{_DASH}{_edge(hi)}" for lo, hi in pairwise(edges)]
    if bins >= 2 and len(edges) == bins - 1:
        inner = [f"{_edge(lo)}{_DASH}{_edge(hi)}" for lo, hi in pairwise(edges)]
        return [f"< {_edge(edges[0])}", *inner, f"≥ {_edge(edges[-1])}"]
    return [f"bin {index + 1}" for index in range(bins)]


def _proportions(counts: Sequence[int], bins: int) -> tuple[float, ...]:
    padded = [max(int(count), 0) for count in counts] + [0] * (bins - len(counts))
    total = sum(padded)
    # An empty histogram is drawn flat rather than divided by zero.
    return tuple(count / total if total else 0.0 for count in padded)


# ---------------------------------------------------------------------------------- SVG pieces


@dataclass(frozen=True)
class _Line:
    label: str
    values: tuple[float | None, ...]
    """One per x position; ``None`` where the metric is missing or not finite (a gap)."""
    breached: tuple[bool, ...]
    colour: str


@dataclass(frozen=True)
class _Rule:
    """A dashed horizontal threshold line."""

    label: str
    value: float
    colour: str


@dataclass(frozen=True)
class _Bars:
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
        f'<svg id="{_esc(chart_id)}" class="chart" viewBox="0 0 {_CHART_W} {height}" '
        f'width="{_CHART_W}" height="{height}" role="img" font-family="sans-serif" '
        f'font-size="11" '
        f'aria-labelledby="{_esc(chart_id)}-title">',
        f'<title id="{_esc(chart_id)}-title">{_esc(title)}</title>',
        f'<text class="chart-title" x="{_MARGIN_LEFT}" y="18">{_esc(title)}</text>',
    ]


def _text(x: float, y: float, text: str, anchor: str = "start", extra: str = "") -> str:
    return f'<text x="{_f(x)}" y="{_f(y)}" text-anchor="{anchor}"{extra}>{_esc(text)}</text>'


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
        parts.append(_text(plot.left - 6, y + 4, _num(tick), "end", ' class="tick"'))
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
        f'<text x="{_f(x + 26)}" y="{_f(y + 4)}">{_esc(_short(label))}<title>{_esc(label)}'
        "</title></text>",
    ]


def _legend(lines: Sequence[_Line], rules: Sequence[_Rule], left: float) -> list[str]:
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
        swatch = f'<circle cx="{_f(left + 10)}" cy="{_f(y)}" r="4.5" fill="{_BREACH}"/>'
        parts += _legend_entry(left, y, "breach", swatch)
    parts.append("</g>")
    return parts


# ---------------------------------------------------------------------------------- line chart


def _time_format(xs_ms: Sequence[int]) -> str:
    span = max(xs_ms) - min(xs_ms)
    clock = "%H:%M" if all(x % 60_000 == 0 for x in xs_ms) else "%H:%M:%S"
    return f"%m-%d {clock}" if span >= 86_400_000 else clock


def _x_time_axis(plot: _Plot, xs_ms: Sequence[int]) -> list[str]:
    first_day = datetime.fromtimestamp(min(xs_ms) / 1000, tz=UTC).strftime("%Y-%m-%d")
    parts = _x_axis_line(plot, f"window end (UTC, from {first_day})", plot.bottom + 38)
    time_format = _time_format(xs_ms)
    last_x = -math.inf
    for x_ms in xs_ms:
        x = plot.x(x_ms)
        label = datetime.fromtimestamp(x_ms / 1000, tz=UTC).strftime(time_format)
        # Long or uneven histories would overlap: a window end too close to the last label is
        # left unlabelled (its point still has a tooltip).
        if x - last_x < len(label) * _CHAR_PX + 10:
            continue
        last_x = x
        parts.append(
            f'<line class="axis" stroke="{_AXIS}" x1="{_f(x)}" y1="{_f(plot.bottom)}" '
            f'x2="{_f(x)}" y2="{_f(plot.bottom + 4)}"/>'
        )
        parts.append(_text(x, plot.bottom + 17, label, "middle", ' class="tick"'))
    return parts


def _segments(line: _Line, plot: _Plot, xs_ms: Sequence[int]) -> list[list[tuple[float, float]]]:
    """Runs of consecutive present values; a missing value breaks the line instead of bridging."""
    runs: list[list[tuple[float, float]]] = [[]]
    for x_ms, value in zip(xs_ms, line.values, strict=True):
        if value is None:
            if runs[-1]:
                runs.append([])
            continue
        runs[-1].append((plot.x(x_ms), plot.y(value)))
    return [run for run in runs if run]


def _series_svg(line: _Line, plot: _Plot, xs_ms: Sequence[int]) -> list[str]:
    parts = [f'<g class="series" data-series="{_esc(line.label)}">']
    for run in _segments(line, plot, xs_ms):
        points = " ".join(f"{_f(x)},{_f(y)}" for x, y in run)
        parts.append(
            f'<polyline points="{points}" fill="none" stroke="{line.colour}" stroke-width="2"/>'
        )
    for x_ms, value, breached in zip(xs_ms, line.values, line.breached, strict=True):
        if value is None:
            continue
        css, radius, fill = (
            ("point breach", 4.5, _BREACH) if breached else ("point", 3, line.colour)
        )
        tip = f"{line.label} at {_when(x_ms)}: {_num(value)}" + (" (breach)" if breached else "")
        parts.append(
            f'<circle class="{css}" data-series="{_esc(line.label)}" '
            f'cx="{_f(plot.x(x_ms))}" cy="{_f(plot.y(value))}" r="{radius}" fill="{fill}">'
            f"<title>{_esc(tip)}</title></circle>"
        )
    parts.append("</g>")
    return parts


def _rule_svg(rule: _Rule, plot: _Plot) -> list[str]:
    y = plot.y(rule.value)
    return [
        f'<line class="threshold" data-threshold="{_num(rule.value)}" x1="{_f(plot.left)}" '
        f'y1="{_f(y)}" x2="{_f(plot.right)}" y2="{_f(y)}" stroke="{rule.colour}" '
        f'stroke-width="1.5" stroke-dasharray="5 3"><title>{_esc(rule.label)}</title></line>'
    ]


def _time_domain(xs_ms: Sequence[int]) -> tuple[float, float]:
    lo, hi = float(min(xs_ms)), float(max(xs_ms))
    # Pad so the first and last points do not sit on the axes; a lone window gets centred.
    pad = (hi - lo) * 0.04 if hi > lo else 60_000.0
    return lo - pad, hi + pad


def _line_chart(
    chart_id: str,
    title: str,
    xs_ms: Sequence[int],
    lines: Sequence[_Line],
    rules: Sequence[_Rule],
    y_label: str,
) -> str:
    """A time-series chart: one polyline per line, a marker per present value (red when it
    breached), dashed threshold rules and a legend on the right."""
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
    parts += _x_time_axis(plot, xs_ms)
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


def _bars_svg(plot: _Plot, categories: Sequence[str], bars: Sequence[_Bars]) -> list[str]:
    group = plot.width / len(categories)
    width = group * 0.8 / len(bars)
    parts = []
    for series_index, series in enumerate(bars):
        parts.append(f'<g class="bars" data-series="{_esc(series.label)}">')
        for index, (category, value) in enumerate(zip(categories, series.values, strict=True)):
            x = plot.left + group * (index + 0.1) + width * series_index
            top = plot.y(value)
            tip = f"{series.label}, {category}: {value:.1%}"
            parts.append(
                f'<rect x="{_f(x)}" y="{_f(top)}" width="{_f(width)}" '
                f'height="{_f(plot.bottom - top)}" fill="{series.colour}">'
                f"<title>{_esc(tip)}</title></rect>"
            )
        parts.append("</g>")
    return parts


def _bar_legend(bars: Sequence[_Bars], left: float) -> list[str]:
    parts = ['<g class="legend">']
    for index, series in enumerate(bars):
        y = _MARGIN_TOP + 8.0 + 18 * index
        swatch = (
            f'<rect x="{_f(left)}" y="{_f(y - 6)}" width="20" height="12" fill="{series.colour}"/>'
        )
        parts += _legend_entry(left, y, series.label, swatch)
    parts.append("</g>")
    return parts


def _bar_chart(
    chart_id: str,
    title: str,
    categories: Sequence[str],
    bars: Sequence[_Bars],
    x_label: str,
    y_label: str,
) -> str:
    """Grouped bars: one group per category, one bar per series, with a legend on the right."""
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


# -------------------------------------------------------------------------------- the charts


def _metric_line(data: ReportData, metric: str, colour: str) -> _Line:
    return _Line(
        label=metric,
        values=tuple(_finite(window.metrics.get(metric)) for window in data.windows),
        breached=tuple(
            any(breach.metric == metric for breach in window.breaches) for window in data.windows
        ),
        colour=colour,
    )


def _end_times(data: ReportData) -> list[int]:
    return [window.end_ms for window in data.windows]


def _psi_chart(data: ReportData) -> str:
    metrics = [f"psi:{feature}" for feature in _breached_features(data.windows)]
    if _has_metric(data.windows, _PSI_SCORE):
        metrics.append(_PSI_SCORE)
    lines = [
        _metric_line(data, metric, _PALETTE[index % len(_PALETTE)])
        for index, metric in enumerate(metrics)
    ]
    # Usually one ``psi`` threshold covers every line; distinct ones each get a rule.
    limits = {limit for metric in metrics if (limit := _threshold(data, metric)) is not None}
    rules = [_Rule(f"threshold {_num(limit)}", limit, _BREACH) for limit in sorted(limits)]
    return _line_chart(
        "chart-psi", "PSI over windows", _end_times(data), lines, rules, "PSI (vs reference)"
    )


def _quality_chart(data: ReportData) -> str:
    metrics = [metric for metric in _QUALITY_METRICS if _has_metric(data.windows, metric)]
    lines = [_metric_line(data, metric, _PALETTE[index]) for index, metric in enumerate(metrics)]
    rules = [
        _Rule(f"{line.label} threshold {_num(limit)}", limit, line.colour)
        for line in lines
        if (limit := _threshold(data, line.label)) is not None
    ]
    return _line_chart(
        "chart-quality", "Quality over windows", _end_times(data), lines, rules, "value"
    )


def _distribution_chart(
    chart_id: str,
    title: str,
    edges: Sequence[float],
    reference: Sequence[int],
    current: Sequence[int] | None,
    drifted: bool,
    x_label: str,
) -> str:
    bins = max(len(reference), len(current or ()))
    bars = [_Bars(f"reference (n={sum(reference)})", _proportions(reference, bins), _REFERENCE)]
    if current is not None:
        colour = _BREACH if drifted else _CURRENT
        label = f"last window (n={sum(current)})"
        bars.append(_Bars(label, _proportions(current, bins), colour))
    return _bar_chart(
        chart_id, title, _bin_labels(edges, bins), bars, x_label, "share of observations"
    )


def _feature_chart(data: ReportData, feature: str) -> str:
    last = data.windows[-1]
    return _distribution_chart(
        chart_id=f"chart-feature-{_SAFE_ID.sub('_', feature)}",
        title=f"{feature}: reference vs last window",
        edges=data.feature_edges.get(feature, ()),
        reference=data.reference_feature_counts.get(feature, ()),
        current=last.feature_counts.get(feature, ()),
        drifted=True,
        x_label=f"{feature} (bins)",
    )


def _score_chart(data: ReportData) -> str:
    last = data.windows[-1] if data.windows else None
    drifted = last is not None and any(b.metric == _PSI_SCORE for b in last.breaches)
    return _distribution_chart(
        chart_id="chart-scores",
        title="Prediction (score) distribution: reference vs last window",
        edges=data.score_edges,
        reference=data.reference_score_counts,
        current=last.score_counts if last is not None else None,
        drifted=drifted,
        x_label="score (bins)",
    )


# -------------------------------------------------------------------------------- HTML blocks


def _headline(data: ReportData) -> str:
    decision = data.decision.lower()
    css = decision if decision in _DECISION_LABELS else "other"
    label = _DECISION_LABELS.get(decision, data.decision.upper())
    baseline = data.baseline_version if data.baseline_version is not None else "none"
    return (
        f'<header class="headline decision-{css}">\n'
        f'<div class="decision">{_esc(label)}</div>\n'
        f'<h1><span class="model">{_esc(data.model)}</span> '
        f'version <span class="version">{_esc(data.version)}</span></h1>\n'
        f'<p class="meta">baseline version {_esc(baseline)} · decided '
        f"{_esc(_when(data.created_at_ms))} · report {_esc(data.report_id)}</p>\n"
        f'<p class="explanation">{_esc(data.explanation)}</p>\n'
        "</header>"
    )


def _evidence(data: ReportData) -> str:
    windows = _breaching_windows(data.windows)
    if not windows:
        return '<p class="note">No threshold was breached in the latest window.</p>'
    rows = [
        "<tr>"
        f"<td>{_esc(breach.metric)}</td>"
        f'<td class="num breach">{_num(breach.value)}</td>'
        f'<td class="num">{_num(breach.threshold)}</td>'
        f"<td>{_esc(_window_range(window))}</td>"
        f'<td class="num">{window.count}</td>'
        "</tr>"
        for window in windows
        for breach in window.breaches
    ]
    return (
        '<table id="evidence" class="data">\n'
        "<thead><tr><th>metric</th><th>value</th><th>threshold</th><th>window</th>"
        "<th>count</th></tr></thead>\n<tbody>\n" + "\n".join(rows) + "\n</tbody></table>"
    )


def _metric_cell(window: WindowSummary, metric: str) -> str:
    if metric not in window.metrics:
        return f'<td class="num missing">{_DASH}</td>'
    breached = any(breach.metric == metric for breach in window.breaches)
    return f'<td class="num {"breach" if breached else "ok"}">{_num(window.metrics[metric])}</td>'


def _windows_table(data: ReportData) -> str:
    if not data.windows:
        return '<p class="note">No windows closed for this version yet.</p>'
    metrics = sorted({m for w in data.windows for m in w.metrics}, key=_metric_sort_key)
    header = "".join(f"<th>{_esc(metric)}</th>" for metric in metrics)
    rows = [
        f'<tr class="{"breached" if window.breached else "fine"}">'
        f'<td class="num">{index}</td><td>{_esc(_window_range(window))}</td>'
        f'<td class="num">{window.count}</td>'
        + "".join(_metric_cell(window, metric) for metric in metrics)
        + "</tr>"
        for index, window in enumerate(data.windows, start=1)
    ]
    return (
        '<div class="scroll"><table id="windows" class="data">\n'
        f"<thead><tr><th>#</th><th>window</th><th>count</th>{header}</tr></thead>\n"
        "<tbody>\n" + "\n".join(rows) + "\n</tbody></table></div>"
    )


def _feature_charts(data: ReportData) -> str:
    if not data.windows:
        return '<p class="note">No windows, so no feature distributions to compare.</p>'
    features = _breached_features(data.windows[-1:])
    if not features:
        return '<p class="note">No feature breached a threshold in the last window.</p>'
    return "\n".join(_feature_chart(data, feature) for feature in features)


def _section(section_id: str, heading: str, body: str) -> str:
    return f'<section id="{section_id}">\n<h2>{_esc(heading)}</h2>\n{body}\n</section>'


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
  color: #111827; background: #f9fafb; margin: 0; font-size: 14px; line-height: 1.45; }
main { max-width: 960px; margin: 0 auto; padding: 16px 20px 40px; }
h1 { font-size: 22px; margin: 4px 0; } h2 { font-size: 16px; margin: 0 0 8px; }
section, .headline { background: #fff; border: 1px solid #e5e7eb; border-radius: 8px;
  padding: 14px 16px; margin: 12px 0; }
.headline { border-left: 6px solid #9ca3af; }
.decision { display: inline-block; font-weight: 700; letter-spacing: .05em; padding: 2px 10px;
  border-radius: 4px; color: #fff; background: #6b7280; }
.decision-rollback { border-left-color: #dc2626; background: #fef2f2; }
.decision-rollback .decision { background: #dc2626; font-size: 20px; padding: 4px 14px; }
.decision-alert { border-left-color: #d97706; } .decision-alert .decision { background: #d97706; }
.decision-none { border-left-color: #059669; } .decision-none .decision { background: #059669; }
.meta { color: #6b7280; margin: 2px 0 8px; }
.explanation { margin: 0; white-space: pre-line; }
.note { color: #6b7280; margin: 0; }
.scroll { overflow-x: auto; }
table.data { border-collapse: collapse; font-size: 13px; }
table.data th, table.data td { padding: 3px 8px; border-bottom: 1px solid #e5e7eb;
  text-align: left; white-space: nowrap; }
table.data th { color: #374151; font-weight: 600; background: #f3f4f6; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.breach { color: #dc2626; font-weight: 700; } td.ok { color: #047857; }
td.missing { color: #9ca3af; }
svg.chart { display: block; max-width: 100%; height: auto; margin: 8px 0; }
svg.chart text { font-family: inherit; font-size: 11px; fill: #374151; }
svg.chart .chart-title { font-size: 13px; font-weight: 600; fill: #111827; }
svg.chart .tick { fill: #6b7280; } svg.chart .no-data { fill: #9ca3af; font-size: 13px; }
"""


def render_html(data: ReportData) -> str:
    """One self-contained HTML page: headline, evidence, PSI, drifting features, scores,
    quality, then a table of every window. Chart ids: ``chart-psi``,
    ``chart-feature-<feature>`` (characters outside ``[A-Za-z0-9_.-]`` become ``_``),
    ``chart-scores``, ``chart-quality``."""
    title = f"{data.model} v{data.version}: {data.decision}"
    sections = [
        _section("evidence-section", "Evidence", _evidence(data)),
        _section("psi-section", "PSI over windows", _psi_chart(data)),
        _section("features-section", "Drifting features", _feature_charts(data)),
        _section("scores-section", "Prediction distribution", _score_chart(data)),
        _section("quality-section", "Quality over windows", _quality_chart(data)),
        _section("windows-section", "All windows", _windows_table(data)),
    ]
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<main>\n"
        + _headline(data)
        + "\n"
        + "\n".join(sections)
        + "\n</main>\n</body>\n</html>\n"
    )
