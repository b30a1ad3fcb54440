"""``sluiceway publish | infer | subscribe``: the client SDK from the shell."""

from __future__ import annotations

import argparse
import getpass
import json
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from pipeline.settings import Settings


def register(subparsers: Any) -> None:
    publish = subparsers.add_parser(
        "publish", help="publish InferenceRequests from JSON/JSONL (a file or stdin)"
    )
    publish.add_argument("file", nargs="?", type=Path, help="JSON or JSONL; stdin when absent")
    publish.add_argument("--model", help="model for records that do not name one")
    publish.add_argument(
        "--example", action="store_true", help="publish one example SAP invoice for invoice_risk"
    )
    publish.set_defaults(handler=publish_command)

    infer = subparsers.add_parser("infer", help="send one request and print its result")
    infer.add_argument("--model", help="required unless --example")
    inputs = infer.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--features", help="a JSON object, e.g. '{\"f0\": 1.5}'")
    inputs.add_argument("--prompt", help="text for a text model")
    inputs.add_argument(
        "--example",
        action="store_true",
        help="one example SAP invoice for invoice_risk, with an explanation",
    )
    infer.add_argument("--explain", action="store_true")
    infer.add_argument("--timeout", type=float, default=30.0)
    infer.set_defaults(handler=infer_command)

    subscribe = subparsers.add_parser("subscribe", help="print a model's results as they come")
    subscribe.add_argument("--model", required=True)
    subscribe.add_argument("--group", help="consumer group: resume where it stopped")
    subscribe.add_argument("--from-beginning", action="store_true")
    subscribe.add_argument("--jsonl", action="store_true", help="one JSON object per line")
    subscribe.add_argument("--max", type=int, default=None, help="stop after N results")
    subscribe.add_argument("--idle-timeout", type=float, default=None, help="stop when idle")
    subscribe.set_defaults(handler=subscribe_command)


def _records(stream: TextIO) -> Iterator[dict[str, Any]]:
    text = stream.read().strip()
    if text.startswith("["):
        yield from json.loads(text)
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                yield json.loads(line)
            except json.JSONDecodeError as error:
                raise SystemExit(f"sluiceway: error: line {number}: {error.msg}") from None


def publish_command(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.client import SluicewayClient
    from schemas.models import InferenceRequest

    if args.example:
        records: list[dict[str, Any]] = [_example_invoice()]
    elif args.file is not None:
        with args.file.open() as stream:
            records = list(_records(stream))
    else:
        records = list(_records(sys.stdin))
    requests = []
    for number, record in enumerate(records, start=1):
        record.setdefault("request_id", str(uuid.uuid4()))
        if args.model:
            record.setdefault("model", args.model)
        try:
            requests.append(InferenceRequest.model_validate(record))
        except ValueError as error:
            first = str(error).splitlines()[1:3]
            raise SystemExit(f"sluiceway: error: record {number}: {' '.join(first)}") from None
    with SluicewayClient(settings) as client:
        for receipt in client.publish_many(requests):
            print(f"{receipt.request_id} -> {receipt.topic}[{receipt.partition}]@{receipt.offset}")
    return 0


def _example_invoice() -> dict[str, Any]:
    from devkit.modeling.invoices import FEATURES, generate

    row = generate(1, seed=42).x[0]
    return {
        "model": "invoice_risk",
        "inputs": {"features": {n: round(float(v), 2) for n, v in zip(FEATURES, row, strict=True)}},
        "explain": True,
        "source": {
            "system": "SAP S/4HANA",
            "entity_type": "SupplierInvoice",
            "entity_id": "5105600042",
        },
    }


def infer_command(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.client import ClientError, RequestFailedError, SluicewayClient
    from schemas.models import InferenceRequest, Inputs, TextInput
    from schemas.rendering import readable

    if args.example:
        request = InferenceRequest.model_validate(
            {**_example_invoice(), "request_id": uuid.uuid4()}
        )
    elif args.model is None:
        print("sluiceway infer: error: --model is required (or use --example)", file=sys.stderr)
        return 2
    else:
        inputs = (
            Inputs(features=json.loads(args.features))
            if args.features
            else Inputs(text=TextInput(prompt=args.prompt))
        )
        request = InferenceRequest(
            request_id=uuid.uuid4(), model=args.model, inputs=inputs, explain=args.explain
        )
    # One reply topic per user and host, kept between runs: creating a topic for every
    # one-shot call would cost more than the inference itself.
    client_id = f"cli-{getpass.getuser()}-{socket.gethostname()}"
    with SluicewayClient(settings, client_id=_safe_name(client_id)) as client:
        try:
            started = time.monotonic()
            result = client.infer(request, timeout_s=args.timeout)
            took_ms = (time.monotonic() - started) * 1000
            print(f"answered in {took_ms:.0f} ms", file=sys.stderr)
        except RequestFailedError as failure:
            print(json.dumps(readable(failure.result), indent=2))
            return 1
        except ClientError as error:
            print(f"sluiceway: error: {error}", file=sys.stderr)
            return 2
    print(json.dumps(readable(result), indent=2))
    return 0


def _safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in text)[:100]


def subscribe_command(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.client import SluicewayClient
    from schemas.rendering import readable

    shown = 0
    with SluicewayClient(settings) as client:
        for result in client.subscribe(
            args.model,
            group=args.group,
            from_beginning=args.from_beginning,
            idle_timeout_s=args.idle_timeout,
        ):
            shown_result = readable(result)
            indent = None if args.jsonl else 2
            print(json.dumps(shown_result, indent=indent), flush=True)
            shown += 1
            if args.max is not None and shown >= args.max:
                break
    return 0
