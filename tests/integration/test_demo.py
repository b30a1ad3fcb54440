"""The demo job is a real round trip: every request comes back, correct, with its segment."""

from __future__ import annotations

from pipeline.settings import Settings
from pipeline.storage.client import make_client
from workers.demo import render_report, run_demo


def test_round_trip_serves_every_request_in_micro_batches(settings: Settings) -> None:
    report = run_demo(settings, count=200, progress=lambda _line: None)

    assert report.published == report.served == report.results_read == 200
    assert report.results_correct == 200
    assert report.ranged_get_matched
    # 200 requests at 64 rows per batch is at least 4 Triton calls, one segment each.
    assert report.batches == len(report.segments) >= 4
    assert report.triton_inferences == 200
    store = make_client(settings.object_store)
    for key in report.segments:
        assert store.stat_object(settings.object_store.bucket, key).size > 0
    assert render_report(report).startswith("Sluiceway round trip OK")
