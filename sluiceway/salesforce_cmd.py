"""``sluiceway connect-salesforce``: Change Data Capture in, scores written back.

Credentials come from the environment only: ``SALESFORCE_LOGIN_URL``, ``SALESFORCE_CLIENT_ID``
and either ``SALESFORCE_CLIENT_SECRET`` (client-credentials flow) or ``SALESFORCE_USERNAME`` +
``SALESFORCE_PRIVATE_KEY_FILE`` (JWT bearer flow). The connector signs the correlation id of
every request it publishes and writes back only results it signed, with the secret in
``SLUICEWAY_CONNECTOR_SECRET_<NAME>`` or ``SLUICEWAY_CONNECTOR_SECRET`` (comma-separated for a
rotation, the signing one first); without one it refuses to start.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pipeline.settings import Settings

EXIT_REPLAY_REJECTED = 3
"""The stored replay id is expired or corrupt: an operator decides where to resume
(``--reset-checkpoint`` starts at the mapping's ``replay_preset``)."""


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "connect-salesforce",
        help="stream Salesforce change events to a model and write its results back",
    )
    parser.add_argument(
        "--mapping",
        type=Path,
        required=True,
        action="append",
        help="mapping YAML file; repeat for several entities on one channel",
    )
    parser.add_argument("--name", default="default", help="connector name (checkpoints, group)")
    parser.add_argument(
        "--topic", help="Pub/Sub channel, e.g. /data/ChangeEvents or /data/AccountChangeEvent"
    )
    parser.add_argument(
        "--client-tag",
        default=None,
        help="Sforce-Call-Options client tag of the writes, by which the connector knows its "
        "own changes (default: the connector name)",
    )
    parser.add_argument(
        "--rate-limit-floor-s",
        type=float,
        default=60.0,
        help="seconds every REST call waits at least after REQUEST_LIMIT_EXCEEDED (>= 1)",
    )
    parser.add_argument("--pubsub-endpoint", default=None, help="host:port of the Pub/Sub API")
    parser.add_argument(
        "--pubsub-insecure",
        action="store_true",
        help="plaintext gRPC (only for the local protocol test server)",
    )
    parser.add_argument("--api-version", default=None, help="REST API version, e.g. 62.0")
    parser.add_argument("--auth", choices=["client-credentials", "jwt"], default=None)
    parser.add_argument("--no-writeback", action="store_true", help="only publish requests")
    parser.add_argument("--no-ingest", action="store_true", help="only write results back")
    parser.add_argument(
        "--reset-checkpoint",
        action="store_true",
        help="forget the stored replay id and start at the mapping's replay_preset "
        "(after a rejected replay id: an operator's decision)",
    )
    parser.add_argument("--log-level", default="INFO")
    parser.set_defaults(handler=connect_salesforce_command)


def connect_salesforce_command(args: argparse.Namespace, settings: Settings) -> int:
    from connectors.salesforce.exceptions import ConfigurationError, ReplayIdRejectedError
    from connectors.salesforce.rest import DEFAULT_API_VERSION
    from connectors.salesforce.runner import (
        DEFAULT_PUBSUB_ENDPOINT,
        ConnectorOptions,
        run_connector,
    )
    from workers.inference.runner import configure_logging

    configure_logging(args.log_level)
    options = ConnectorOptions(
        mapping=tuple(args.mapping),
        name=args.name,
        topic=args.topic,
        pubsub_endpoint=args.pubsub_endpoint or DEFAULT_PUBSUB_ENDPOINT,
        pubsub_insecure=args.pubsub_insecure,
        api_version=args.api_version or DEFAULT_API_VERSION,
        auth=args.auth,
        writeback=not args.no_writeback,
        ingest=not args.no_ingest,
        reset_checkpoint=args.reset_checkpoint,
        client_tag=args.client_tag,
        rate_limit_floor_s=args.rate_limit_floor_s,
    )
    try:
        stats = run_connector(settings, options)
    except ReplayIdRejectedError as exc:
        print(f"sluiceway: error: {exc}", file=sys.stderr)
        return EXIT_REPLAY_REJECTED
    except ConfigurationError as exc:
        print(f"sluiceway: error: {exc}", file=sys.stderr)
        return 2
    ingest, writeback = stats.ingest, stats.writeback
    if ingest is not None:
        print(
            f"ingest stopped: events={ingest.events} requests={ingest.requests} "
            f"invalidations={ingest.invalidations} duplicates={ingest.duplicates} "
            f"reads={ingest.reads} resyncs={ingest.resyncs} dead_lettered={ingest.dead_lettered} "
            f"skipped={ingest.skipped} by_entity={ingest.by_entity} "
            f"dedupe_memory={ingest.memory_keys} dedupe_evicted={ingest.memory_evicted}"
        )
        print("outcome per event:")
        print(ingest.outcome_table())
    if writeback is not None:
        print(
            f"writeback stopped: results={writeback.results} written={writeback.written} "
            f"not_ok={writeback.not_ok} already_written={writeback.already_written} "
            f"failed={writeback.failed} dead_lettered={writeback.dead_lettered} "
            f"rate_limited={writeback.rate_limited} forged={writeback.forged} "
            f"commits={writeback.commits}"
        )
    return 0
