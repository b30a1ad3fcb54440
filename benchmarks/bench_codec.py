"""Codec throughput: decode + validate + re-encode one realistic feature-record request.

Run: ``.venv/bin/python benchmarks/bench_codec.py [--seconds 2] [--rounds 3]``

The message is an ``InferenceRequest`` with a 20-feature record (doubles, longs, strings,
booleans, a missing value), a deadline, tenant, correlation id, source, attributes and a
trace context: what an SAP or Salesforce connector publishes. One "message" of work is:

* **avro**: ``AvroCodec.decode(bytes, InferenceRequest)`` (single-object header, fastavro
  schemaless read, pydantic validation) then ``AvroCodec.encode(model)``;
* **json (pydantic)**: ``model_validate_json`` then ``model_dump_json`` (pydantic-core's
  own JSON parser and serializer; the fastest JSON path for validated models);
* **json (orjson)**: ``orjson.loads`` + ``model_validate`` then ``orjson.dumps`` of
  ``model_dump(mode="json")``.

Each figure is the best of ``--rounds`` timed rounds, measured in the same process on one
pinned CPU; absolute numbers drift on shared machines, the ratios are the result. The target
for the Avro path is 50,000 messages/s on one core.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

# Run as a script from any folder: make the repository importable ahead of the installed
# (editable) metadata, which may predate the schemas package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import orjson
from fastavro import schemaless_reader, schemaless_writer

from schemas import AvroCodec, InferenceRequest
from schemas.models import Inputs, Source, TraceContext

TARGET = 50_000


def realistic_request() -> InferenceRequest:
    features: dict[str, bool | int | float | str | None] = {}
    for i in range(20):
        kind = i % 5
        if kind == 0:
            features[f"amount_{i}"] = 1234.5 + i
        elif kind == 1:
            features[f"count_{i}"] = 17 * i
        elif kind == 2:
            features[f"category_{i}"] = f"cat-{i:03d}"
        elif kind == 3:
            features[f"flag_{i}"] = i % 2 == 0
        else:
            features[f"ratio_{i}"] = None if i == 4 else 0.25 * i
    return InferenceRequest(
        request_id=uuid.uuid4(),
        model="fraud-detector",
        model_version="7",
        inputs=Inputs(features=features),
        reply_to="inference.fraud-detector.replies",
        correlation_id="c-8f2d1e",
        tenant="acme",
        priority=5,
        deadline=datetime(2030, 1, 1, tzinfo=UTC) + timedelta(milliseconds=123),
        source=Source(system="sap-s4", entity_type="SupplierInvoice", entity_id="5100000123"),
        attributes={"company_code": "1000", "channel": "api"},
        trace=TraceContext(traceparent="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
    )


def measure(name: str, work: Callable[[], object], seconds: float, rounds: int) -> float:
    """Best messages/s over ``rounds`` rounds of about ``seconds`` each."""
    for _ in range(2000):  # warm caches and pydantic's lazily built validators
        work()
    batch, best = 1000, 0.0
    for r in range(1, rounds + 1):
        done, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            for _ in range(batch):
                work()
            done += batch
        rate = done / elapsed
        best = max(best, rate)
        print(f"  {name:<16} round {r}/{rounds}: {rate:>10,.0f} msg/s", flush=True)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="length of one round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    if hasattr(os, "sched_setaffinity"):
        cpu = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})
        print(f"pinned to CPU {cpu}")

    codec = AvroCodec()
    request = realistic_request()
    avro_bytes = codec.encode(request)
    json_bytes = request.model_dump_json().encode()
    assert codec.decode(avro_bytes, InferenceRequest) == request
    assert InferenceRequest.model_validate_json(json_bytes) == request
    assert InferenceRequest.model_validate(orjson.loads(json_bytes)) == request
    print(
        f"message: InferenceRequest, 20 features; "
        f"avro {len(avro_bytes)} B, json {len(json_bytes)} B"
    )

    def avro() -> bytes:
        return codec.encode(codec.decode(avro_bytes, InferenceRequest))

    def json_pydantic() -> str:
        return InferenceRequest.model_validate_json(json_bytes).model_dump_json()

    def json_orjson() -> bytes:
        model = InferenceRequest.model_validate(orjson.loads(json_bytes))
        return orjson.dumps(model.model_dump(mode="json"))

    print("measuring (decode + validate + encode per message):", flush=True)
    results = {
        "avro": measure("avro", avro, args.seconds, args.rounds),
        "json (pydantic)": measure("json (pydantic)", json_pydantic, args.seconds, args.rounds),
        "json (orjson)": measure("json (orjson)", json_orjson, args.seconds, args.rounds),
    }
    baseline = max(results["json (pydantic)"], results["json (orjson)"])
    print()
    print(f"{'format':<18}{'msg/s':>12}{'us/msg':>10}{'vs best json':>15}")
    for name, rate in results.items():
        print(f"{name:<18}{rate:>12,.0f}{1e6 / rate:>10.1f}{rate / baseline:>14.2f}x")
    avro_rate = results["avro"]
    print()
    print("where the avro time goes (us/msg, best of the same rounds):")
    entry = codec.catalog.current(InferenceRequest.AVRO_NAME)
    body, record, dumped = (
        avro_bytes[10:],
        codec._read_body(avro_bytes, 10, codec._resolve(avro_bytes)[0]),
        request.model_dump(),
    )
    stages: dict[str, Callable[[], object]] = {
        "fastavro read": lambda: schemaless_reader(io.BytesIO(body), entry.parsed, None),
        "pydantic validate": lambda: InferenceRequest.model_validate(record),
        "pydantic dump": request.model_dump,
        "fastavro write": lambda: schemaless_writer(io.BytesIO(), entry.parsed, dumped),
    }
    for name, work in stages.items():
        rate = measure(name, work, args.seconds / 2, 1)
        print(f"  {name:<18}{1e6 / rate:>8.1f} us")
    print()
    print(
        f"avro / best json = {avro_rate / baseline:.2f}x; "
        f"target {TARGET:,} msg/s: {'met' if avro_rate >= TARGET else 'NOT met'} "
        f"({avro_rate / TARGET:.2f}x of target)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
