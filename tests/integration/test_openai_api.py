"""``sluiceway api`` with the official ``openai`` SDK as its client, on the real stack.

One API process, one worker process (``invoice_risk`` on the real Triton, ``case_summary`` on
the vLLM protocol server, devkit/servers/openai_server.py) and one protocol server serve the module;
each test runs its batch with the batch-job runner (``JobRunner``, what ``sluiceway batch run``
runs) in a thread, while the SDK polls, as a user's code would.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx2
import openai
import pytest

from devkit.servers.openai_server import OpenAIProtocolServer
from devkit.stack.process import port_open
from pipeline.settings import BatchSettings, Settings
from schemas.models import BatchJob
from sluiceway import main as cli_main
from tests.integration.endpoints import Endpoints
from tests.integration.waiting import wait_until
from workers.batch.runner import JobRunner
from workers.inference.runner import prepare_topics_and_bucket
from workers.processes import ServiceProcess

# Below the ephemeral range, and used by no other test module.
API_PORT = 27110
VLLM_PORT = 27111
ACME_KEY = "sk-acme-" + "a" * 24
GLOBEX_KEY = "sk-globex-" + "b" * 24
TINY_KEY = "sk-tiny-" + "c" * 24
TINY_MAX_RECORDS = 6
TINY_MAX_FILE_BYTES = 4096
FINAL = ("completed", "failed", "expired", "cancelled")


@dataclass
class Api:
    settings: Settings
    url: str
    vllm: OpenAIProtocolServer
    worker: ServiceProcess
    service: ServiceProcess

    def client(self, key: str = ACME_KEY) -> openai.OpenAI:
        # No retries: a 429 or 404 must reach the test as it was answered.
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0)

    def logs(self) -> str:
        return f"worker:\n{self.worker.tail()}\napi:\n{self.service.tail()}"


@pytest.fixture(scope="module")
def api(endpoints: Endpoints, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    for port in (API_PORT, VLLM_PORT):
        assert not port_open(port), f"port {port} is taken; this module needs it"
    namespace = f"test-api-{uuid.uuid4().hex[:8]}"
    base = endpoints.settings(namespace=namespace, workers={"processes": 1})
    tenants = {
        "acme": {"api_keys": [ACME_KEY]},
        "globex": {"api_keys": [GLOBEX_KEY]},
        "tiny": {
            "api_keys": [TINY_KEY],
            "max_enqueued_records": TINY_MAX_RECORDS,
            "max_file_bytes": TINY_MAX_FILE_BYTES,
        },
    }
    vllm = OpenAIProtocolServer(("case_summary",), port=VLLM_PORT, max_model_len=64)
    settings = Settings(
        **{
            **base.as_dict(reveal_secrets=True),
            "backends": {
                **base.backends.model_dump(mode="json"),
                "vllm": {"base_url": vllm.base_url, "max_concurrency": 4, "timeout_s": 10.0},
            },
            "batch": BatchSettings(
                prefix=f"batch-{namespace}",
                chunk_records=4,
                max_outstanding=4,
                progress_interval_s=0.2,
                finish_grace_s=5.0,
            ).model_dump(mode="json"),
            "api": {"prefix": f"api-{namespace}", "tenants": tenants},
        }
    )
    prepare_topics_and_bucket(settings, ["invoice_risk", "case_summary"])
    logs = tmp_path_factory.mktemp("openai-api")
    worker = ServiceProcess(
        settings, ["worker", "--model", "invoice_risk", "--model", "case_summary"], logs / "w.log"
    )
    service = ServiceProcess(
        settings, ["api", "--host", "127.0.0.1", "--port", str(API_PORT)], logs / "api.log"
    )
    with vllm, worker, service:
        wait_until(lambda: port_open(API_PORT) or service.exited(), 30, "the API to listen")
        assert not service.exited(), service.tail()
        yield Api(settings, f"http://127.0.0.1:{API_PORT}", vllm, worker, service)


# ---------------------------------------------------------------------------- helpers


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def chat_lines(count: int) -> list[dict[str, Any]]:
    return [
        {
            "custom_id": f"chat-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "case_summary",
                "messages": [{"role": "user", "content": f"case {i} printer jammed again"}],
                "max_tokens": 8,
            },
        }
        for i in range(count)
    ]


def invoice_lines(count: int) -> list[dict[str, Any]]:
    features = {
        "amount_eur": 1200.5,
        "vendor_tenure_days": 400,
        "payment_terms_days": 30,
        "days_to_due": 30,
        "past_late_payments": 1,
        "new_bank_account": 0,
        "foreign_vendor": 0,
        "manual_entry": 1,
    }
    return [
        {
            "custom_id": f"inv-{i}",
            "method": "POST",
            "url": "/v1/predictions",
            "body": {
                "model": "invoice_risk",
                "features": {**features, "amount_eur": 100.0 * (i + 1)},
                "explain": i % 5 == 0,
            },
        }
        for i in range(count)
    ]


def run_in_background(
    api: Api, batch_id: str, now: Callable[[], datetime] | None = None
) -> Callable[[], BatchJob]:
    """The batch-job runner on ``batch_id`` in a thread (on the clock ``now`` when given);
    the returned call joins it."""
    outcome: dict[str, BatchJob | BaseException] = {}
    runner = JobRunner(api.settings) if now is None else JobRunner(api.settings, now=now)

    def run() -> None:
        try:
            outcome["job"] = runner.run(batch_id)
        except BaseException as exc:  # handed to the test thread
            outcome["job"] = exc

    thread = threading.Thread(target=run, name=f"runner-{batch_id}", daemon=True)
    thread.start()

    def join() -> BatchJob:
        thread.join(120)
        assert not thread.is_alive(), "the runner did not finish"
        found = outcome["job"]
        if isinstance(found, BaseException):
            raise found
        return found

    return join


def poll_until_final(client: openai.OpenAI, batch_id: str) -> Any:
    seen: list[Any] = []

    def final() -> bool:
        seen.append(client.batches.retrieve(batch_id))
        return seen[-1].status in FINAL

    wait_until(final, 90, f"batch {batch_id} to end", poll_s=0.2)
    return seen[-1]


def file_lines(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    body = client.files.content(file_id).content
    return [json.loads(line) for line in body.splitlines() if line.strip()]


def ids_of(lines: list[dict[str, Any]]) -> list[str]:
    return [str(line["custom_id"]) for line in lines]


def submit(client: openai.OpenAI, lines: list[dict[str, Any]], endpoint: str) -> Any:
    uploaded = client.files.create(file=("requests.jsonl", jsonl(lines)), purpose="batch")
    return client.batches.create(
        input_file_id=uploaded.id,
        endpoint=endpoint,  # type: ignore[arg-type]
        completion_window="24h",
        metadata={"suite": "openai-api"},
    )


# ------------------------------------------------------------------------------ tests


def test_chat_batch_round_trip_through_the_sdk(
    api: Api, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    client = api.client()
    lines = chat_lines(18)
    # Longer than the protocol server's 64-token context: vLLM answers 400 for this one.
    words = " ".join(f"word{n}" for n in range(120))
    lines[7]["body"]["messages"] = [{"role": "user", "content": words}]
    batch = submit(client, lines, "/v1/chat/completions")
    assert batch.status == "validating"
    assert batch.request_counts.total == 18
    join = run_in_background(api, batch.id)

    done = poll_until_final(client, batch.id)
    join()

    assert done.status == "completed", api.logs()
    assert (done.request_counts.completed, done.request_counts.failed) == (17, 1)
    outputs = file_lines(client, done.output_file_id)
    errors = file_lines(client, done.error_file_id)
    assert sorted(ids_of(outputs) + ids_of(errors)) == sorted(ids_of(lines))
    assert ids_of(errors) == ["chat-7"]
    assert errors[0]["response"]["status_code"] in (400, 500)
    first = outputs[0]["response"]
    assert first["status_code"] == 200
    assert first["body"]["object"] == "chat.completion"
    assert first["body"]["choices"][0]["message"]["content"].startswith("Summary:")
    prompt_tokens = sum(line["response"]["body"]["usage"]["prompt_tokens"] for line in outputs)
    assert prompt_tokens > 0
    assert done.usage is not None
    assert done.usage.input_tokens == prompt_tokens
    assert done.metadata == {"suite": "openai-api"}
    for name, value in api.settings.as_environment().items():
        monkeypatch.setenv(name, value)
    capsys.readouterr()
    assert cli_main(["batch", "status", batch.id, "--json"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert (manifest["status"], manifest["tenant"]) == ("completed", "acme")


def test_feature_model_batch_round_trip_through_triton(api: Api) -> None:
    client = api.client()
    lines = invoice_lines(20)
    lines[3]["body"]["features"].pop("days_to_due")  # refused at validation: the batch fails
    refused = submit(client, lines, "/v1/predictions")
    assert refused.status == "failed"
    assert refused.errors is not None
    assert refused.errors.data[0].line == 4

    lines = invoice_lines(20)
    batch = submit(client, lines, "/v1/predictions")
    join = run_in_background(api, batch.id)
    done = poll_until_final(client, batch.id)
    join()

    assert done.status == "completed", api.logs()
    outputs = file_lines(client, done.output_file_id)
    assert ids_of(outputs) == ids_of(lines)
    assert done.error_file_id is None
    for line in outputs:
        score = line["response"]["body"]["outputs"]["score"]
        assert 0.0 <= float(score[0][0] if isinstance(score[0], list) else score[0]) <= 1.0
    explained = [line for line in outputs if "explanation" in line["response"]["body"]]
    assert ids_of(explained) == [f"inv-{i}" for i in range(0, 20, 5)]


def test_cancel_mid_run_keeps_finished_lines_and_cancels_the_rest(api: Api) -> None:
    client = api.client()
    lines = chat_lines(40)
    answered = 3
    # The backend answers three lines and holds the rest until the batch has ended: the cancel
    # provably comes mid-run, however fast or slow the machine is.
    api.vllm.hold_after(answered)
    try:
        batch = submit(client, lines, "/v1/chat/completions")
        join = run_in_background(api, batch.id)
        wait_until(
            lambda: client.batches.retrieve(batch.id).request_counts.completed == answered,
            60,
            "the answered lines",
        )
        cancelling = client.batches.cancel(batch.id)
        assert cancelling.status == "cancelling"
        assert cancelling.cancelling_at is not None
        done = poll_until_final(client, batch.id)
    finally:
        api.vllm.release()
    join()

    assert done.status == "cancelled", api.logs()
    outputs = file_lines(client, done.output_file_id)
    errors = file_lines(client, done.error_file_id)
    assert len(outputs) == answered
    assert sorted(ids_of(outputs) + ids_of(errors)) == sorted(ids_of(lines))
    assert {line["error"]["code"] for line in errors} == {"batch_cancelled"}
    assert all(line["response"] is None for line in errors)
    assert done.request_counts.completed == answered


def test_completion_window_expiry_keeps_finished_lines_and_expires_the_rest(api: Api) -> None:
    client = api.client()
    lines = chat_lines(40)
    window_ended = threading.Event()

    def runner_clock() -> datetime:
        # The runner's clock jumps past the 24 h window once the test says so.
        return datetime.now(UTC) + (timedelta(hours=25) if window_ended.is_set() else timedelta())

    answered = 3
    api.vllm.hold_after(answered)  # the rest are held until the batch has ended
    try:
        batch = submit(client, lines, "/v1/chat/completions")
        join = run_in_background(api, batch.id, now=runner_clock)
        wait_until(
            lambda: client.batches.retrieve(batch.id).request_counts.completed == answered,
            60,
            "the answered lines",
        )
        window_ended.set()
        done = poll_until_final(client, batch.id)
    finally:
        api.vllm.release()
    join()

    assert done.status == "expired", api.logs()
    assert done.expired_at is not None
    outputs = file_lines(client, done.output_file_id)
    errors = file_lines(client, done.error_file_id)
    assert len(outputs) == answered
    assert sorted(ids_of(outputs) + ids_of(errors)) == sorted(ids_of(lines))
    assert {line["error"]["code"] for line in errors} == {"batch_expired"}
    assert all(line["response"]["status_code"] == 200 for line in outputs)


def test_second_key_sees_404_and_tenant_over_its_limit_gets_429(api: Api) -> None:
    acme, globex, tiny = api.client(), api.client(GLOBEX_KEY), api.client(TINY_KEY)
    batch = submit(acme, invoice_lines(3), "/v1/predictions")
    for attempt in (
        lambda: globex.batches.retrieve(batch.id),
        lambda: globex.batches.cancel(batch.id),
        lambda: globex.files.retrieve(batch.input_file_id),
        lambda: globex.files.content(batch.input_file_id),
        lambda: globex.files.delete(batch.input_file_id),
    ):
        with pytest.raises(openai.NotFoundError) as found:
            attempt()
        assert found.value.body["code"] == "not_found"  # type: ignore[index]
    assert [b.id for b in globex.batches.list()] == []
    assert batch.id in [b.id for b in acme.batches.list()]

    first = submit(tiny, invoice_lines(4), "/v1/predictions")  # never run: stays enqueued
    assert first.status == "validating"
    with pytest.raises(openai.RateLimitError) as limited:
        submit(tiny, invoice_lines(3), "/v1/predictions")
    assert limited.value.status_code == 429
    error = limited.value.response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "enqueued_records_limit_exceeded"
    assert [b.id for b in tiny.batches.list()] == [first.id]

    with pytest.raises(openai.RateLimitError) as too_big:
        tiny.files.create(file=("big.jsonl", jsonl(invoice_lines(40))), purpose="batch")
    assert too_big.value.response.json()["error"]["code"] == "file_size_limit_exceeded"
    # Sent chunked, without a Content-Length to refuse it by: counted as it streams in.
    form = (
        b'--zz\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        b'--zz\r\nContent-Disposition: form-data; name="file"; filename="f.jsonl"\r\n\r\n'
    )
    chunks = [form, *(jsonl(invoice_lines(40)) for _ in range(8)), b"\r\n--zz--\r\n"]
    with httpx2.Client(base_url=f"{api.url}/v1", timeout=10) as http:
        streamed = http.post(
            "/files",
            headers={
                "Authorization": f"Bearer {TINY_KEY}",
                "Content-Type": "multipart/form-data; boundary=zz",
            },
            content=iter(chunks),
        )
    assert streamed.status_code == 429
    assert streamed.json()["error"]["code"] == "file_size_limit_exceeded"
    assert len(tiny.files.list().data) == 2  # the two accepted uploads above, no third


def test_idempotency_key_replay_returns_the_same_batch(api: Api) -> None:
    client = api.client()
    uploaded = client.files.create(file=("r.jsonl", jsonl(invoice_lines(2))), purpose="batch")
    key = {"Idempotency-Key": f"retry-{uuid.uuid4().hex}"}
    made = [
        client.batches.create(
            input_file_id=uploaded.id,
            endpoint="/v1/predictions",  # type: ignore[arg-type]
            completion_window="24h",
            extra_headers=key,
        )
        for _ in range(2)
    ]
    assert made[0].id == made[1].id
    assert [b.id for b in client.batches.list()].count(made[0].id) == 1
    with pytest.raises(openai.BadRequestError) as reused:
        client.batches.create(
            input_file_id=uploaded.id,
            endpoint="/v1/predictions",  # type: ignore[arg-type]
            completion_window="48h",
            extra_headers=key,
        )
    assert reused.value.body["code"] == "idempotency_key_reused"  # type: ignore[index]


def test_hostile_requests_get_typed_errors(api: Api) -> None:
    auth = {"Authorization": f"Bearer {ACME_KEY}"}
    with httpx2.Client(base_url=f"{api.url}/v1", timeout=10) as http:
        expected: list[tuple[str, str, dict[str, Any], int, str | None]] = [
            ("GET", "/batches", {}, 401, "missing_api_key"),
            ("GET", "/batches", {"headers": {"Authorization": "Bearer nope"}}, 401, None),
            ("GET", "/batches", {"headers": {"Authorization": "Basic x"}}, 401, None),
            ("GET", "/batches/..%2F..%2Fmanifest.json", {"headers": auth}, 404, "not_found"),
            ("GET", "/batches/job-20260101-../x", {"headers": auth}, 404, None),
            ("GET", "/files/file-..%2F..%2Facme", {"headers": auth}, 404, "not_found"),
            ("GET", "/files/file-job-1-output/content", {"headers": auth}, 404, "not_found"),
            ("GET", "/nothing-here", {"headers": auth}, 404, "unknown_url"),
            ("PUT", "/batches", {"headers": auth}, 405, "method_not_allowed"),
            ("GET", "/batches?limit=0", {"headers": auth}, 400, None),
            ("GET", "/batches?limit=abc", {"headers": auth}, 400, None),
            ("GET", "/batches?limit=1000", {"headers": auth}, 400, None),
            ("GET", "/batches?after=job-20990101-ffffffffffff", {"headers": auth}, 400, None),
            ("GET", "/files?order=sideways", {"headers": auth}, 400, None),
            ("POST", "/batches", {"headers": auth, "content": b"{not json"}, 400, None),
            ("POST", "/batches", {"headers": auth, "content": b"[1]"}, 400, None),
            ("POST", "/batches", {"headers": auth, "content": b"x" * 100_000}, 413, None),
            ("POST", "/files", {"headers": auth, "content": b"plain"}, 400, None),
            (
                "POST",
                "/files",
                {
                    "headers": {**auth, "Content-Type": "multipart/form-data; boundary=zz"},
                    "content": b"--zz\r\nbroken",
                },
                400,
                None,
            ),
        ]
        for method, path, options, status, code in expected:
            answer = http.request(method, path, **options)
            assert answer.status_code == status, (method, path, answer.text)
            error = answer.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}, (path, error)
            if code is not None:
                assert error["code"] == code, (path, error)

        def upload(content: bytes, purpose: str = "batch", name: str = "r.jsonl") -> Any:
            return http.post(
                "/files", headers=auth, data={"purpose": purpose}, files={"file": (name, content)}
            )

        bad_lines = b'{"custom_id": "a"}\nnot json\n[1,2]\n' + jsonl(invoice_lines(1))
        refused = upload(bad_lines)
        assert refused.status_code == 400
        assert "line 1" in refused.json()["error"]["message"]
        assert "line 2" in refused.json()["error"]["message"]
        assert upload(jsonl(invoice_lines(1)), purpose="fine-tune").status_code == 400
        assert upload(jsonl(invoice_lines(1)), purpose="b" * 5000).status_code == 400
        two_files = http.post(
            "/files",
            headers=auth,
            data={"purpose": "batch"},
            files=[("file", ("a.jsonl", b"{}")), ("file", ("b.jsonl", b"{}"))],
        )
        assert two_files.status_code == 400
        no_file = http.post("/files", headers=auth, files={"purpose": (None, "batch")})
        assert no_file.status_code == 400
        assert upload(b"\n\n").status_code == 400
        stored = upload(jsonl(invoice_lines(2)), name="../../etc/passwd")
        assert stored.status_code == 200, stored.text
        assert stored.json()["filename"] == "passwd"
        file_id = stored.json()["id"]
        creates: list[tuple[dict[str, Any], int]] = [
            ({"input_file_id": file_id, "endpoint": "/v1/embeddings"}, 400),
            ({"input_file_id": file_id, "endpoint": "/v1/predictions"}, 400),  # no window
            (
                {
                    "input_file_id": file_id,
                    "endpoint": "/v1/predictions",
                    "completion_window": "1d",
                },
                400,
            ),
            (
                {
                    "input_file_id": "file-" + "0" * 32,
                    "endpoint": "/v1/predictions",
                    "completion_window": "24h",
                },
                404,
            ),
            (
                {
                    "input_file_id": file_id,
                    "endpoint": "/v1/chat/completions",  # the lines name a feature model
                    "completion_window": "24h",
                },
                400,
            ),
            (
                {
                    "input_file_id": file_id,
                    "endpoint": "/v1/predictions",
                    "completion_window": "24h",
                    "metadata": {"k": "v" * 600},
                },
                400,
            ),
        ]
        for body, status in creates:
            answer = http.post("/batches", headers=auth, json=body)
            assert answer.status_code == status, (body, answer.text)
        long_key = {**auth, "Idempotency-Key": "k" * 300}
        answer = http.post(
            "/batches",
            headers=long_key,
            json={
                "input_file_id": file_id,
                "endpoint": "/v1/predictions",
                "completion_window": "24h",
            },
        )
        assert answer.status_code == 400
        assert http.delete(f"/files/{file_id}", headers=auth).json()["deleted"] is True
        assert http.get(f"/files/{file_id}", headers=auth).status_code == 404
