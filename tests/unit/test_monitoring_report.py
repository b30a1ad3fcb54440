"""The monitor's JSON and HTML reports: structure found by parsing the page, not by eyeballing."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator
from html.parser import HTMLParser

import pytest

from pipeline.monitoring.evidence import Breach, ReportData, WindowSummary
from pipeline.monitoring.report import render_html, report_json

T0_MS = 1_714_557_600_000  # 2024-05-01T10:00:00Z
WINDOW_MS = 300_000
DASH = "\u2013"  # between bin edges
THRESHOLDS = {"psi": 0.2, "ks": 0.15, "chi2": 0.01, "log_loss": 0.6, "error_rate": 0.12}
EXPLANATION = (
    "Rolled back invoice_risk version 2 to 1: psi:amount_eur 0.412 > 0.2, psi:score 0.318 > 0.2 "
    "and log_loss 0.7421 > 0.6 in the last 2 windows."
)
AMOUNT_EDGES = (0.0, 100.0, 500.0, 1000.0, 5000.0, math.inf)
SCORE_EDGES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)

PSI_AMOUNT = (0.02, 0.03, 0.05, 0.08, 0.35, 0.412)
PSI_SCORE = (0.01, 0.02, 0.02, 0.04, 0.25, 0.318)
LOG_LOSS = (0.41, 0.43, 0.42, 0.45, 0.69, 0.7421)


# ------------------------------------------------------------------------------------ builders


def _window(index: int, **metric_overrides: float) -> WindowSummary:
    metrics = {
        "psi:amount_eur": PSI_AMOUNT[index],
        "ks:amount_eur": PSI_AMOUNT[index] / 3,
        "chi2:foreign_vendor": 0.4,
        "psi:score": PSI_SCORE[index],
        "log_loss": LOG_LOSS[index],
        "error_rate": 0.05 + index * 0.005,
        "expired_rate": 0.0,
        "latency_p99_ms": 41.5,
    }
    metrics.update(metric_overrides)
    breaches = tuple(
        Breach(metric, metrics[metric], THRESHOLDS[metric.partition(":")[0]])
        for metric in ("psi:amount_eur", "psi:score", "log_loss")
        if metrics[metric] > THRESHOLDS[metric.partition(":")[0]]
    )
    shifted = index >= 4
    return WindowSummary(
        model="invoice_risk",
        version="2",
        start_ms=T0_MS + index * WINDOW_MS,
        end_ms=T0_MS + (index + 1) * WINDOW_MS,
        count=1200 + index,
        metrics=metrics,
        breaches=breaches,
        score_counts=(100, 150, 300, 400, 250) if shifted else (400, 350, 250, 120, 80),
        feature_counts={
            "amount_eur": (50, 100, 200, 450, 400) if shifted else (300, 400, 300, 150, 50),
            "foreign_vendor": (1000, 200),
        },
    )


def _report(windows: tuple[WindowSummary, ...] | None = None, **changes: object) -> ReportData:
    data = ReportData(
        report_id="rpt-invoice_risk-2-0001",
        model="invoice_risk",
        version="2",
        baseline_version="1",
        decision="rollback",
        explanation=EXPLANATION,
        windows=windows if windows is not None else tuple(_window(i) for i in range(6)),
        thresholds=dict(THRESHOLDS),
        score_edges=SCORE_EDGES,
        reference_score_counts=(420, 330, 260, 110, 80),
        feature_edges={"amount_eur": AMOUNT_EDGES, "foreign_vendor": (0.0, 0.5, 1.0)},
        reference_feature_counts={
            "amount_eur": (310, 390, 300, 150, 50),
            "foreign_vendor": (1000, 180),
        },
        created_at_ms=T0_MS + 6 * WINDOW_MS + 1_500,
    )
    return dataclasses.replace(data, **changes)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------- parsing


@dataclasses.dataclass
class Node:
    tag: str
    attrs: dict[str, str]
    children: list[Node] = dataclasses.field(default_factory=list)
    text: list[str] = dataclasses.field(default_factory=list)

    def walk(self) -> Iterator[Node]:
        yield self
        for child in self.children:
            yield from child.walk()

    def find_all(self, tag: str, **attrs: str) -> list[Node]:
        return [
            node
            for node in self.walk()
            if node.tag == tag and all(node.attrs.get(k) == v for k, v in attrs.items())
        ]

    def by_id(self, element_id: str) -> Node:
        (node,) = [node for node in self.walk() if node.attrs.get("id") == element_id]
        return node

    def all_text(self) -> str:
        return "".join(self.text) + "".join(child.all_text() for child in self.children)

    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())


class TreeBuilder(HTMLParser):
    """Enough of a DOM for these tests; fails loudly on mismatched tags, which is itself a check
    that the page is well formed."""

    VOID = frozenset({"meta", "br", "hr", "img", "input", "link"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#root", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(node)
        if tag not in self.VOID:
            self.stack.append(node)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.stack[-1].children.append(Node(tag, {k: v or "" for k, v in attrs}))

    def handle_endtag(self, tag: str) -> None:
        assert self.stack[-1].tag == tag, f"</{tag}> closes <{self.stack[-1].tag}>"
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.stack[-1].text.append(data)


def parse(page: str) -> Node:
    builder = TreeBuilder()
    builder.feed(page)
    builder.close()
    assert builder.stack == [builder.root], "unclosed elements"
    return builder.root


def svg_ids(root: Node) -> list[str]:
    return [svg.attrs["id"] for svg in root.find_all("svg")]


def points(chart: Node, series: str) -> list[Node]:
    return [c for c in chart.find_all("circle") if c.attrs.get("data-series") == series]


def table_rows(table: Node) -> list[list[str]]:
    return [[cell.all_text() for cell in row.find_all("td")] for row in table.find_all("tr")[1:]]


# ----------------------------------------------------------------------------------- the page


def test_page_has_every_chart_with_a_title_in_reading_order() -> None:
    page = render_html(_report())
    root = parse(page)
    assert svg_ids(root) == [
        "chart-psi",
        "chart-feature-amount_eur",
        "chart-scores",
        "chart-quality",
    ]
    for svg in root.find_all("svg"):
        (title,) = [child for child in svg.children if child.tag == "title"]
        assert title.all_text().strip()
    order = ["evidence", "chart-psi", "chart-feature-amount_eur", "chart-scores"]
    order += ["chart-quality", "windows"]
    positions = [page.index(f'id="{element_id}"') for element_id in order]
    assert positions == sorted(positions)


def test_page_is_self_contained() -> None:
    page = render_html(_report()).lower()
    for external in ("<script", "<link", "<img", "src=", "href=", "url(", "@import", "http"):
        assert external not in page


def test_headline_shows_model_version_decision_and_explanation_verbatim() -> None:
    root = parse(render_html(_report()))
    (header,) = root.find_all("header")
    assert "decision-rollback" in header.classes()
    text = header.all_text()
    assert "invoice_risk" in text
    assert "version 2" in text
    assert "ROLLBACK" in text
    assert "baseline version 1" in text
    assert "2024-05-01 10:30:01 UTC" in text
    (paragraph,) = [p for p in header.find_all("p") if "explanation" in p.classes()]
    assert paragraph.all_text() == EXPLANATION


def test_explanation_and_names_from_data_are_escaped() -> None:
    explanation = 'score <b>shifted</b> & "amount" > 0.2'
    page = render_html(_report(explanation=explanation, model="risk<&>"))
    assert "<b>shifted</b>" not in page
    assert "score &lt;b&gt;shifted&lt;/b&gt; &amp; &quot;amount&quot; &gt; 0.2" in page
    assert "risk&lt;&amp;&gt;" in page
    root = parse(page)
    (paragraph,) = [p for p in root.find_all("p") if "explanation" in p.classes()]
    assert paragraph.all_text() == explanation


def test_evidence_table_lists_every_breach_of_the_breaching_windows() -> None:
    data = _report()
    table = parse(render_html(data)).by_id("evidence")
    rows = table_rows(table)
    expected = [
        (breach.metric, breach, window) for window in data.windows[4:] for breach in window.breaches
    ]
    assert len(expected) == 6  # three metrics in each of the last two windows
    assert len(rows) == len(expected)
    for row, (metric, breach, window) in zip(rows, expected, strict=True):
        assert row[0] == metric
        assert float(row[1]) == pytest.approx(breach.value, rel=1e-3)
        assert float(row[2]) == pytest.approx(breach.threshold)
        assert row[3].startswith("2024-05-01 10:2")
        assert row[4] == str(window.count)
    assert {"0.412", "0.318", "0.7421"} <= {row[1] for row in rows}


def test_evidence_values_are_marked_as_breached() -> None:
    table = parse(render_html(_report())).by_id("evidence")
    value_cells = [row.find_all("td")[1] for row in table.find_all("tr")[1:]]
    assert all("breach" in cell.classes() for cell in value_cells)


def test_evidence_says_so_when_nothing_breached() -> None:
    quiet = tuple(_window(i) for i in range(4))
    page = render_html(_report(windows=quiet, decision="none", explanation="All quiet."))
    assert 'id="evidence"' not in page
    assert "No threshold was breached" in page
    assert "NO ACTION" in page


def test_psi_chart_has_a_point_per_window_and_marks_breaches() -> None:
    chart = parse(render_html(_report())).by_id("chart-psi")
    for series in ("psi:amount_eur", "psi:score"):
        marks = points(chart, series)
        assert len(marks) == 6
        assert sum("breach" in mark.classes() for mark in marks) == 2
    assert len(chart.find_all("polyline")) == 2
    (rule,) = [line for line in chart.find_all("line") if "threshold" in line.classes()]
    assert rule.attrs["stroke-dasharray"]
    assert rule.attrs["data-threshold"] == "0.2"
    text = chart.all_text()
    assert "PSI (vs reference)" in text
    assert "window end (UTC, from 2024-05-01)" in text
    assert "10:30" in text
    legend = chart.find_all("g", **{"class": "legend"})[0].all_text()
    assert "psi:amount_eur" in legend
    assert "breach" in legend


def test_psi_chart_leaves_a_gap_where_a_window_lacks_the_metric() -> None:
    windows = [_window(i) for i in range(6)]
    del windows[2].metrics["psi:amount_eur"]
    chart = parse(render_html(_report(windows=tuple(windows)))).by_id("chart-psi")
    assert len(points(chart, "psi:amount_eur")) == 5
    series = chart.find_all("g", **{"data-series": "psi:amount_eur"})[0]
    assert len(series.find_all("polyline")) == 2  # windows 1-2 and 4-6, not bridged


def test_psi_chart_includes_features_that_breached_earlier_only() -> None:
    windows = [_window(i) for i in range(6)]
    old = windows[1]
    windows[1] = dataclasses.replace(
        old,
        metrics={**old.metrics, "psi:vendor_age_days": 0.3},
        breaches=(Breach("psi:vendor_age_days", 0.3, 0.2),),
    )
    root = parse(render_html(_report(windows=tuple(windows))))
    assert len(points(root.by_id("chart-psi"), "psi:vendor_age_days")) == 1
    # Only a breach in the last window makes a feature "drifting".
    assert "chart-feature-vendor_age_days" not in svg_ids(root)


def test_one_feature_chart_per_drifting_feature() -> None:
    windows = [_window(i) for i in range(6)]
    last = windows[-1]
    windows[-1] = dataclasses.replace(
        last,
        metrics={**last.metrics, "chi2:foreign_vendor": 0.001},
        breaches=(*last.breaches, Breach("chi2:foreign_vendor", 0.001, 0.01)),
    )
    root = parse(render_html(_report(windows=tuple(windows))))
    feature_charts = [i for i in svg_ids(root) if i.startswith("chart-feature-")]
    assert feature_charts == ["chart-feature-amount_eur", "chart-feature-foreign_vendor"]


def test_feature_chart_compares_proportions_over_labelled_bins() -> None:
    chart = parse(render_html(_report())).by_id("chart-feature-amount_eur")
    groups = chart.find_all("g", **{"class": "bars"})
    assert [len(group.find_all("rect")) for group in groups] == [5, 5]
    text = chart.all_text()
    for label in (f"0{DASH}100", f"100{DASH}500", f"5,000{DASH}∞", "reference (n=1200)"):
        assert label in text
    tips = [rect.all_text() for rect in groups[1].find_all("rect")]
    assert tips[0] == f"last window (n=1200), 0{DASH}100: 4.2%"  # 50 of 1200


def test_score_chart_compares_reference_and_last_window() -> None:
    chart = parse(render_html(_report())).by_id("chart-scores")
    groups = chart.find_all("g", **{"class": "bars"})
    assert [group.attrs["data-series"] for group in groups] == [
        "reference (n=1200)",
        "last window (n=1200)",
    ]
    assert f"0.8{DASH}1" in chart.all_text()


def test_quality_chart_shows_loss_and_error_rate_with_thresholds() -> None:
    chart = parse(render_html(_report())).by_id("chart-quality")
    assert len(points(chart, "log_loss")) == 6
    assert len(points(chart, "error_rate")) == 6
    assert not points(chart, "low_confidence_rate")
    rules = [line for line in chart.find_all("line") if "threshold" in line.classes()]
    assert sorted(rule.attrs["data-threshold"] for rule in rules) == ["0.12", "0.6"]


def test_quality_chart_adds_low_confidence_rate_when_present() -> None:
    windows = tuple(_window(i, low_confidence_rate=0.1) for i in range(6))
    chart = parse(render_html(_report(windows=windows))).by_id("chart-quality")
    assert len(points(chart, "low_confidence_rate")) == 6


def test_windows_table_has_every_metric_of_every_window() -> None:
    data = _report()
    table = parse(render_html(data)).by_id("windows")
    header = [cell.all_text() for cell in table.find_all("th")]
    assert set(data.windows[0].metrics) <= set(header)
    rows = table_rows(table)
    assert len(rows) == 6
    log_loss = header.index("log_loss")
    assert [row[log_loss] for row in rows] == ["0.41", "0.43", "0.42", "0.45", "0.69", "0.7421"]
    cells = table.find_all("tr")[-1].find_all("td")
    assert "breach" in cells[log_loss].classes()
    assert "ok" in cells[header.index("error_rate")].classes()


# ------------------------------------------------------------------------------------- edges


def test_no_windows_still_renders_the_headline_and_empty_charts() -> None:
    page = render_html(_report(windows=(), decision="none", explanation="No data yet."))
    root = parse(page)
    (header,) = root.find_all("header")
    assert "NO ACTION" in header.all_text()
    assert "No data yet." in header.all_text()
    assert svg_ids(root) == ["chart-psi", "chart-scores", "chart-quality"]
    assert "No data to plot" in root.by_id("chart-psi").all_text()
    assert "No windows closed" in page


def test_single_window_renders_one_point_per_series() -> None:
    root = parse(render_html(_report(windows=(_window(5),))))
    chart = root.by_id("chart-psi")
    (mark,) = points(chart, "psi:amount_eur")
    assert "breach" in mark.classes()
    assert not chart.find_all("polyline", **{"points": ""})
    assert "10:30" in chart.all_text()


def test_nan_and_inf_metrics_show_as_na_and_are_not_plotted() -> None:
    windows = [_window(i) for i in range(6)]
    windows[1] = _window(1, **{"psi:amount_eur": math.nan, "log_loss": math.inf})
    page = render_html(_report(windows=tuple(windows)))
    root = parse(page)
    assert len(points(root.by_id("chart-psi"), "psi:amount_eur")) == 5
    assert len(points(root.by_id("chart-quality"), "log_loss")) == 5
    cells = table_rows(root.by_id("windows"))[1]
    assert cells.count("n/a") == 2
    for svg in root.find_all("svg"):
        for node in svg.walk():
            assert not any(
                word in value for value in node.attrs.values() for word in ("nan", "inf")
            )


def test_all_zero_counts_render_flat_bars() -> None:
    windows = [_window(i) for i in range(6)]
    windows[-1] = dataclasses.replace(
        windows[-1], score_counts=(0, 0, 0, 0, 0), feature_counts={"amount_eur": (0,) * 5}
    )
    data = _report(windows=tuple(windows), reference_score_counts=(0, 0, 0, 0, 0))
    root = parse(render_html(data))
    heights = {rect.attrs["height"] for rect in root.by_id("chart-scores").find_all("rect")}
    assert heights - {"12"} == {"0.0"}  # the legend swatches are 12 high


def test_edges_that_only_cut_between_bins_give_open_ended_labels() -> None:
    windows = [_window(i) for i in range(6)]
    windows[-1] = dataclasses.replace(windows[-1], score_counts=(4, 6))
    data = _report(windows=tuple(windows), score_edges=(0.5,), reference_score_counts=(3, 7))
    scores = parse(render_html(data)).by_id("chart-scores").all_text()
    assert "< 0.5" in scores
    assert "≥ 0.5" in scores


def test_missing_histograms_and_mismatched_edges_do_not_crash() -> None:
    # Five bins in the last window, two in the reference, edges fitting neither: numbered bins.
    data = _report(
        score_edges=(0.5,),
        reference_score_counts=(3, 7),
        feature_edges={},
        reference_feature_counts={},
    )
    root = parse(render_html(data))
    assert "bin 5" in root.by_id("chart-scores").all_text()
    feature = root.by_id("chart-feature-amount_eur").all_text()
    assert "bin 1" in feature
    assert "reference (n=0)" in feature


def test_unknown_decision_and_odd_feature_names_are_handled() -> None:
    windows = [_window(i) for i in range(6)]
    last = windows[-1]
    windows[-1] = dataclasses.replace(
        last, breaches=(*last.breaches, Breach("ks:<net amount>", 0.5, 0.15))
    )
    page = render_html(_report(windows=tuple(windows), decision="hold"))
    root = parse(page)
    assert "chart-feature-_net_amount_" in svg_ids(root)
    assert "&lt;net amount&gt;" in page
    assert "HOLD" in page


# --------------------------------------------------------------------------------------- JSON


def test_report_json_round_trips_with_breaches_intact() -> None:
    data = _report()
    document = json.loads(json.dumps(report_json(data), allow_nan=False))
    assert document["model"] == "invoice_risk"
    assert document["decision"] == "rollback"
    assert document["explanation"] == EXPLANATION
    assert document["baseline_version"] == "1"
    assert document["created_at"] == "2024-05-01T10:30:01.500Z"
    assert document["thresholds"] == THRESHOLDS
    assert document["feature_edges"]["amount_eur"][-1] is None  # +inf is not JSON
    assert len(document["windows"]) == 6
    last = document["windows"][-1]
    assert last["start"] == "2024-05-01T10:25:00.000Z"
    assert last["end_ms"] == T0_MS + 6 * WINDOW_MS
    assert last["breached"] is True
    assert last["metrics"]["psi:amount_eur"] == pytest.approx(0.412)
    restored = [Breach(**breach) for breach in last["breaches"]]
    assert restored == list(data.windows[-1].breaches)
    assert last["feature_counts"]["amount_eur"] == [50, 100, 200, 450, 400]


def test_report_json_turns_non_finite_values_into_null() -> None:
    windows = (_window(0, **{"psi:amount_eur": math.nan}),)
    document = report_json(_report(windows=windows))
    assert document["windows"][0]["metrics"]["psi:amount_eur"] is None
    json.dumps(document, allow_nan=False)


def test_report_json_without_windows() -> None:
    document = json.loads(json.dumps(report_json(_report(windows=(), baseline_version=None))))
    assert document["windows"] == []
    assert document["baseline_version"] is None
