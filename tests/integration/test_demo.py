"""The demo job is a real round trip: every invoice is scored, explained where asked, stored."""

from __future__ import annotations

from pipeline.settings import Settings
from pipeline.storage.client import make_client
from workers.demo import EXPLAIN_EVERY, FAITHFULNESS_SAMPLE, MODEL, render_report, run_demo


def test_round_trip_scores_and_explains_every_invoice_through_the_worker(
    settings: Settings,
) -> None:
    report = run_demo(settings, count=300, progress=lambda _line: None)

    assert report.published == report.results_read == report.results_correct == 300
    assert report.versions == {"1": 300}
    # Explanations exactly on the requests that asked, and the stored vectors are complete.
    assert report.explained == 300 // EXPLAIN_EVERY
    assert report.explanations_where_asked == 300
    assert report.faithfulness_checked == FAITHFULNESS_SAMPLE
    assert report.faithful == FAITHFULNESS_SAMPLE
    assert 0 < report.high_risk < 300
    assert report.ranged_get_matched
    assert report.dead_lettered == 0
    assert report.batches >= 300 // settings.workers.max_batch_size
    assert report.triton_inferences == 300
    store = make_client(settings.object_store)
    for key in report.segments:
        assert key.startswith(f"{MODEL}/1/")
        assert store.stat_object(settings.object_store.bucket, key).size > 0
    assert render_report(report).startswith("Sluiceway round trip OK")
