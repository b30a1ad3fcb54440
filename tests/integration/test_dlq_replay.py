"""Dead-letter triage on the real stack: letters for three reasons, counted, shown, the cause
removed, one reason replayed with its request ids, a second replay sending nothing.

The causes are worker settings, so removing them is a restart with the right ones:
``feature_order`` names a fifth feature ``f4`` that some requests lack (``missing_feature``)
and that the Triton model does not take (``backend_bad_request``), and the message limit is
below the size of some requests (``too_large``; their originals, over half the limit, are
offloaded to the object store and fetched back by the replay).
"""

from __future__ import annotations

import json
import signal
import subprocess
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.kafka.admin import control_topic_spec, ensure_topics, model_topic_specs
from pipeline.settings import Settings
from pipeline.storage.client import ensure_bucket, make_client
from pipeline.topics import ModelTopics
from schemas.models import InferenceRequest, Inputs, ResultStatus
from sluiceway import build_parser
from tests.integration import traffic

PER_REASON = 6
BROKEN = {
    "SLUICEWAY_WORKERS__MAX_MESSAGE_BYTES": "1024",
    "SLUICEWAY_MODELS__SCALER__FEATURE_ORDER": '["f0","f1","f2","f3","f4"]',
}


def _request(features: int, padding: int = 0) -> InferenceRequest:
    values = {f"f{i}": float(i) for i in range(features)}
    values.update({f"pad{i:03d}": float(i) for i in range(padding)})
    return InferenceRequest(request_id=uuid.uuid4(), model="scaler", inputs=Inputs(features=values))


@pytest.fixture
def topics(settings: Settings) -> ModelTopics:
    model_topics = ModelTopics(settings.namespace, "scaler")
    ensure_topics(
        settings.kafka, [control_topic_spec(settings.namespace), *model_topic_specs(model_topics)]
    )
    ensure_bucket(make_client(settings.object_store), settings.object_store.bucket)
    return model_topics


@pytest.fixture
def worker(settings: Settings, tmp_path: Path) -> Iterator[Any]:
    started: list[subprocess.Popen[bytes]] = []

    def start(**env: str) -> subprocess.Popen[bytes]:
        log = tmp_path / f"worker-{len(started)}.log"
        started.append(traffic.start_worker(settings, log, ("scaler",), **env))
        return started[-1]

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait(30)


def _dlq(settings: Settings, capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    args = build_parser().parse_args(["dlq", *argv, "--model", "scaler", "--json"])
    capsys.readouterr()
    code = args.handler(args, settings)
    out = capsys.readouterr().out
    report: dict[str, Any] = json.loads(out)
    report["exit_code"] = code
    return report


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == 0


def test_letters_are_counted_replayed_once_by_reason_and_served_with_their_ids(
    settings: Settings,
    topics: ModelTopics,
    worker: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    missing = [_request(4) for _ in range(PER_REASON)]  # no f4
    oversized = [_request(5, padding=120) for _ in range(PER_REASON)]
    refused = [_request(5) for _ in range(PER_REASON)]  # five columns for a four-column model
    everything = missing + oversized + refused
    traffic.publish_requests(settings, topics.requests, everything)

    broken = worker(**BROKEN)
    got = traffic.collect(settings, topics.results, topics.dlq, len(everything), timeout_s=60)
    _stop(broken)
    assert len(got.dead_letters) == len(everything), "every request is dead-lettered"

    listed = _dlq(settings, capsys, "list", "--letters")
    assert listed["by_reason"] == {
        "missing_feature": PER_REASON,
        "too_large": PER_REASON,
        "backend_bad_request": PER_REASON,
    }
    first = next(row for row in listed["letters"] if row["reason"] == "too_large")
    shown = _dlq(settings, capsys, "show", "--letter", first["letter"])
    assert first["request_id"] is None  # refused before it was decoded: the letter cannot say
    assert shown["original_request"]["request_id"] in {str(r.request_id) for r in oversized}
    assert shown["letter_fields"]["original_ref"].startswith("s3://")  # offloaded, fetched back
    assert shown["headers"]["__connect.errors.topic"] == topics.requests
    assert shown["headers"]["__connect.errors.exception.class.name"] == "DecodeError"

    fixed = worker()  # the cause removed: the model's own settings
    requests_before = traffic.end_offsets(settings, topics.requests)
    dry = _dlq(settings, capsys, "replay", "--reason", "missing_feature", "--dry-run")
    assert dry["would_replay"] == PER_REASON
    assert traffic.end_offsets(settings, topics.requests) == requests_before

    replayed = _dlq(settings, capsys, "replay", "--reason", "missing_feature")
    assert replayed["replayed"] == PER_REASON
    assert set(replayed["request_ids"]) == {str(r.request_id) for r in missing}
    # Outcomes are counted as distinct letters plus distinct results.
    outcomes = len(everything) + PER_REASON
    served = traffic.collect(settings, topics.results, topics.dlq, outcomes, timeout_s=60)
    ids = Counter(str(r.request_id) for r in served.results)
    assert ids == Counter(str(r.request_id) for r in missing), "exactly those, once each"
    assert {r.status for r in served.results} == {ResultStatus.OK}

    after_first = traffic.end_offsets(settings, topics.requests)
    again = _dlq(settings, capsys, "replay", "--reason", "missing_feature")
    assert again["replayed"] == 0
    assert traffic.end_offsets(settings, topics.requests) == after_first
    forced = _dlq(settings, capsys, "replay", "--reason", "missing_feature", "--force", "--dry-run")
    assert forced["would_replay"] == PER_REASON

    pinned = _dlq(settings, capsys, "replay", "--reason", "too_large", "--version", "1")
    assert pinned["replayed"] == PER_REASON
    assert set(pinned["request_ids"]) == {str(r.request_id) for r in oversized}
    purged = _dlq(settings, capsys, "purge", "--reason", "backend_bad_request")
    assert purged["purged"] == PER_REASON
    assert _dlq(settings, capsys, "list")["by_reason"] == {}

    expected = missing + oversized
    outcomes = len(everything) + len(expected)
    final = traffic.collect(settings, topics.results, topics.dlq, outcomes, timeout_s=60)
    by_id = {str(r.request_id): r for r in final.results}
    assert Counter(str(r.request_id) for r in final.results) == Counter(
        str(r.request_id) for r in expected
    )
    assert {by_id[str(r.request_id)].model_version for r in oversized} == {"1"}
    _stop(fixed)

    # Anyone may write to the DLQ: a record that is no letter is counted, never a crash.
    traffic.publish(settings, topics.dlq, [(b"junk", b"\x00not a letter")])
    assert _dlq(settings, capsys, "list")["by_reason"] == {"<malformed>": 1}
    malformed = _dlq(settings, capsys, "replay", "--reason", "<malformed>")
    assert malformed["exit_code"] == 1
    assert malformed["replayed"] == 0
    assert len(malformed["skipped"]) == 1
