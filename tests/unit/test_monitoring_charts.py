"""The static-SVG chart kit on its own: what a caller hands in is what the chart shows, placed
where the numbers say, with every label escaped. (The report's tests check the charts it builds.)
"""

from __future__ import annotations

import pytest

from pipeline.monitoring.charts import BREACH, Bars, Line, Rule, bar_chart, line_chart
from tests.unit.test_monitoring_report import parse, points

T0_MS = 1_714_557_600_000  # 2024-05-01T10:00:00Z
MINUTE_MS = 60_000
HOSTILE = '<script>alert("x")</script> & more'


def _line(label: str, values: tuple[float | None, ...], breached_at: int | None = None) -> Line:
    breached = tuple(index == breached_at for index in range(len(values)))
    return Line(label=label, values=values, breached=breached, colour="#2563eb")


def _times(count: int) -> list[int]:
    return [T0_MS + index * 5 * MINUTE_MS for index in range(count)]


def test_line_chart_places_higher_values_higher_and_marks_the_breach() -> None:
    svg = line_chart(
        "chart-a",
        "A over time",
        _times(3),
        [_line("a", (0.1, 0.2, 0.4), breached_at=2)],
        [Rule("limit 0.3", 0.3, BREACH)],
        x_label="window end",
        y_label="value",
    )
    chart = parse(svg).by_id("chart-a")
    marks = points(chart, "a")
    heights = [float(mark.attrs["cy"]) for mark in marks]
    assert heights == sorted(heights, reverse=True)  # SVG y grows downwards
    assert [mark.attrs["fill"] for mark in marks] == ["#2563eb", "#2563eb", BREACH]
    (rule,) = [line for line in chart.find_all("line") if "threshold" in line.classes()]
    assert heights[1] > float(rule.attrs["y1"]) > heights[2]
    text = chart.all_text()
    assert "window end (UTC, from 2024-05-01)" in text
    assert "A over time" in text


def test_line_chart_breaks_at_a_missing_value_instead_of_bridging() -> None:
    svg = line_chart(
        "chart-gap",
        "gap",
        _times(5),
        [_line("a", (0.1, 0.2, None, 0.3, 0.2))],
        [],
        x_label="t",
        y_label="v",
    )
    chart = parse(svg).by_id("chart-gap")
    assert len(points(chart, "a")) == 4
    assert [len(p.attrs["points"].split()) for p in chart.find_all("polyline")] == [2, 2]


@pytest.mark.parametrize(
    ("xs_ms", "values"),
    [([], ()), (_times(2), (None, None))],
    ids=["no-times", "no-present-value"],
)
def test_a_chart_with_nothing_to_plot_says_so(xs_ms: list[int], values: tuple[None, ...]) -> None:
    line_svg = line_chart("chart-l", "l", xs_ms, [_line("a", values)], [], x_label="t", y_label="v")
    bar_svg = bar_chart("chart-b", "b", [], [], x_label="x", y_label="y")
    for svg in (line_svg, bar_svg):
        chart = parse(svg).find_all("svg")[0]
        assert chart.find_all("text", **{"class": "no-data"})[0].all_text() == "No data to plot"
        assert not chart.find_all("polyline")
        assert not chart.find_all("rect")


def test_bar_heights_are_proportional_to_values_from_zero() -> None:
    svg = bar_chart(
        "chart-bars",
        "shares",
        ["low", "high"],
        [Bars("ref", (0.25, 0.75), "#9ca3af"), Bars("now", (0.5, 0.5), "#2563eb")],
        x_label="bins",
        y_label="share",
    )
    chart = parse(svg).by_id("chart-bars")
    rects = chart.find_all("rect")
    assert len(rects) == 2 * 2 + 2  # two bars per category, one legend swatch per series
    ref, now = (chart.find_all("g", **{"data-series": name})[0] for name in ("ref", "now"))
    ref_heights = [float(rect.attrs["height"]) for rect in ref.find_all("rect")]
    now_heights = [float(rect.attrs["height"]) for rect in now.find_all("rect")]
    assert ref_heights[1] == pytest.approx(3 * ref_heights[0], abs=0.2)
    assert now_heights[0] == pytest.approx(now_heights[1])
    assert now_heights[0] == pytest.approx(2 * ref_heights[0], abs=0.2)
    assert "ref, high: 75.0%" in ref.all_text()


def test_hostile_labels_are_escaped_and_long_ones_shortened_in_the_legend() -> None:
    svg = line_chart(
        f"chart-{HOSTILE}",
        HOSTILE,
        _times(2),
        [_line(HOSTILE * 3, (0.1, 0.2))],
        [Rule(HOSTILE, 0.15, BREACH)],
        x_label=HOSTILE,
        y_label=HOSTILE,
    )
    assert "<script" not in svg
    root = parse(svg)  # well formed: every tag the data could have opened is text
    legend = root.find_all("g", **{"class": "legend"})[0]
    entry = legend.find_all("text")[0]
    assert entry.text[0] == HOSTILE[:29] + "…"
    assert entry.find_all("title")[0].all_text() == HOSTILE * 3
    assert HOSTILE in root.all_text()
