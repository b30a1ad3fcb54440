"""The demo job is a real round trip: every request comes back, correct, with its segment."""

from __future__ import annotations

from pipeline.settings import Settings
from pipeline.storage.client import make_client
from workers.demo import render_report, run_demo


def test_round_trip_serves_every_request_through_the_worker(settings: Settings) -> None:
    report = run_demo(settings, count=300, progress=lambda _line: None)

    assert report.published == report.results_read == report.results_correct == 300
    assert report.versions == {"1": 300}
    assert report.ranged_get_matched
    assert report.dead_lettered == 0
    assert report.batches >= 300 // settings.workers.max_batch_size
    assert report.triton_inferences == 300
    store = make_client(settings.object_store)
    for key in report.segments:
        assert store.stat_object(settings.object_store.bucket, key).size > 0
    assert render_report(report).startswith("Sluiceway round trip OK")
