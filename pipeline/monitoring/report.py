"""Render one monitor decision as a JSON document and as a self-contained HTML page.

The page is for the person who has to decide whether a rollback was right: the headline and the
evidence come first, then the charts that show how the drift built up, then every number. All of
it is inline (CSS here, SVG from ``charts.py``, no scripts, fonts or images) so the page can be
stored next to the JSON in the object store and opened offline or attached to a ticket as one file.

Everything taken from the data (model, feature names, explanation) is HTML-escaped. NaN and
infinite values read "n/a", a metric a window lacks reads as a dash, and neither is plotted: the
chart line breaks there rather than bridging the gap.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from itertools import pairwise
from typing import Any

from pipeline.monitoring.charts import (
    BREACH,
    PALETTE,
    Bars,
    Line,
    Rule,
    bar_chart,
    escape,
    format_number,
    format_utc,
    line_chart,
)
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

_REFERENCE = "#9ca3af"
_CURRENT = "#2563eb"
_WINDOW_END = "window end"
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


def _edge(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    if math.isinf(value):
        return "∞" if value > 0 else _MINUS + "∞"
    # Amounts read better as 1,000 than as 1e+03; small values keep three significant digits.
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"


def _window_range(window: WindowSummary) -> str:
    start = datetime.fromtimestamp(window.start_ms / 1000, tz=UTC)
    end = datetime.fromtimestamp(window.end_ms / 1000, tz=UTC)
    end_format = "%H:%M:%S" if start.date() == end.date() else "%Y-%m-%d %H:%M:%S"
    return f"{start:%Y-%m-%d %H:%M:%S} {_DASH} {end.strftime(end_format)} UTC"


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


# -------------------------------------------------------------------------------- the charts


def _metric_line(data: ReportData, metric: str, colour: str) -> Line:
    return Line(
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
        _metric_line(data, metric, PALETTE[index % len(PALETTE)])
        for index, metric in enumerate(metrics)
    ]
    # Usually one ``psi`` threshold covers every line; distinct ones each get a rule.
    limits = {limit for metric in metrics if (limit := _threshold(data, metric)) is not None}
    rules = [Rule(f"threshold {format_number(limit)}", limit, BREACH) for limit in sorted(limits)]
    return line_chart(
        "chart-psi",
        "PSI over windows",
        _end_times(data),
        lines,
        rules,
        x_label=_WINDOW_END,
        y_label="PSI (vs reference)",
    )


def _quality_chart(data: ReportData) -> str:
    metrics = [metric for metric in _QUALITY_METRICS if _has_metric(data.windows, metric)]
    lines = [_metric_line(data, metric, PALETTE[index]) for index, metric in enumerate(metrics)]
    rules = [
        Rule(f"{line.label} threshold {format_number(limit)}", limit, line.colour)
        for line in lines
        if (limit := _threshold(data, line.label)) is not None
    ]
    return line_chart(
        "chart-quality",
        "Quality over windows",
        _end_times(data),
        lines,
        rules,
        x_label=_WINDOW_END,
        y_label="value",
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
    bars = [Bars(f"reference (n={sum(reference)})", _proportions(reference, bins), _REFERENCE)]
    if current is not None:
        colour = BREACH if drifted else _CURRENT
        label = f"last window (n={sum(current)})"
        bars.append(Bars(label, _proportions(current, bins), colour))
    return bar_chart(
        chart_id,
        title,
        _bin_labels(edges, bins),
        bars,
        x_label=x_label,
        y_label="share of observations",
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
        f'<div class="decision">{escape(label)}</div>\n'
        f'<h1><span class="model">{escape(data.model)}</span> '
        f'version <span class="version">{escape(data.version)}</span></h1>\n'
        f'<p class="meta">baseline version {escape(baseline)} · decided '
        f"{escape(format_utc(data.created_at_ms))} · report {escape(data.report_id)}</p>\n"
        f'<p class="explanation">{escape(data.explanation)}</p>\n'
        "</header>"
    )


def _evidence(data: ReportData) -> str:
    windows = _breaching_windows(data.windows)
    if not windows:
        return '<p class="note">No threshold was breached in the latest window.</p>'
    rows = [
        "<tr>"
        f"<td>{escape(breach.metric)}</td>"
        f'<td class="num breach">{format_number(breach.value)}</td>'
        f'<td class="num">{format_number(breach.threshold)}</td>'
        f"<td>{escape(_window_range(window))}</td>"
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
    value = format_number(window.metrics[metric])
    return f'<td class="num {"breach" if breached else "ok"}">{value}</td>'


def _windows_table(data: ReportData) -> str:
    if not data.windows:
        return '<p class="note">No windows closed for this version yet.</p>'
    metrics = sorted({m for w in data.windows for m in w.metrics}, key=_metric_sort_key)
    header = "".join(f"<th>{escape(metric)}</th>" for metric in metrics)
    rows = [
        f'<tr class="{"breached" if window.breached else "fine"}">'
        f'<td class="num">{index}</td><td>{escape(_window_range(window))}</td>'
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
    return f'<section id="{section_id}">\n<h2>{escape(heading)}</h2>\n{body}\n</section>'


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
        f"<title>{escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<main>\n"
        + _headline(data)
        + "\n"
        + "\n".join(sections)
        + "\n</main>\n</body>\n</html>\n"
    )
