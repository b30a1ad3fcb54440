"""The demo job is a real round trip: every invoice scored and explained where asked, every
support case summarised through the vLLM route, everything stored."""

from __future__ import annotations

from devkit.demo.run import (
    EXPLAIN_EVERY,
    FAITHFULNESS_SAMPLE,
    MODEL,
    TEXT_MODEL,
    render_report,
    run_demo,
)
from devkit.settings import LocalSettings
from pipeline.settings import Settings
from pipeline.storage.client import make_client

INVOICES = 300
CASES = 24


def test_round_trip_scores_explains_and_summarises_through_the_worker(
    settings: Settings,
) -> None:
    # The demo is the development wing's: the test's settings plus the local stack's section.
    local = LocalSettings(**settings.as_dict(reveal_secrets=True))
    report = run_demo(
        local, count=INVOICES, progress=lambda _line: None, cases=CASES, rollback_window_s=2.0
    )

    assert report.published == report.results_read == report.results_correct == INVOICES
    assert report.versions == {"1": INVOICES}
    assert report.statuses == {"ok": INVOICES + CASES}
    assert len(report.latencies_ms) == INVOICES
    assert 0 < report.latency_percentile(50) <= report.latency_percentile(99)
    # Explanations exactly on the requests that asked, and the stored vectors are complete.
    assert report.explained == INVOICES // EXPLAIN_EVERY
    assert report.explanations_where_asked == INVOICES
    assert report.faithfulness_checked == FAITHFULNESS_SAMPLE
    assert report.faithful == FAITHFULNESS_SAMPLE
    assert 0 < report.high_risk < INVOICES
    assert report.ranged_get_matched
    assert report.sample["result_event"]["explanation"]["method"] == "attributions"
    # The text route: every case summarised, token log-probs exactly where asked.
    assert report.cases_published == report.cases_summarised == CASES
    assert report.cases_explained_where_asked == CASES
    assert report.text_sample["token_logprobs"]
    assert report.dead_lettered == 0
    assert report.batches >= INVOICES // settings.workers.max_batch_size
    assert report.triton_inferences == INVOICES
    store = make_client(settings.object_store)
    for key in report.segments:
        assert key.startswith(f"{MODEL}/1/")
        assert store.stat_object(settings.object_store.bucket, key).size > 0
    assert report.case_segments
    assert all(key.startswith(f"{TEXT_MODEL}/") for key in report.case_segments)
    # The second part: v2 promoted, judged over windows, rolled back, v1 serving again.
    story = report.story
    assert story is not None
    assert story.ok
    assert story.rollback is not None
    assert (story.rollback.from_version, story.rollback.to_version) == ("2", "1")
    assert story.first_breach is not None
    assert story.promoted_at is not None
    assert story.v1_again_at is not None
    assert story.promoted_at <= story.first_breach.window_end <= story.rollback.issued_at
    assert story.rollback.issued_at <= story.v1_again_at
    assert story.report_url is not None
    assert story.report_url.startswith("http")
    rendered = render_report(report)
    assert rendered.startswith("Sluiceway demo OK")
    assert "top attributions:" in rendered
    assert "Rollback story OK" in rendered
