"""``sluiceway connect-sap --mapping FILE --base-url URL``: the SAP connector.

Receives SAP business events (CloudEvents) on ``--listen``, and/or polls OData for changes
every ``--poll-interval`` seconds, publishes mapped requests, and writes results back.
Credentials come from environment variables only (``--auth basic``: ``SAP_USERNAME`` and
``SAP_PASSWORD``; ``--auth oauth``: ``SAP_CLIENT_ID`` and ``SAP_CLIENT_SECRET`` with
``--token-url``); they are never printed or logged.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

from pipeline.errors import SluicewayError
from pipeline.settings import Settings


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "connect-sap",
        help="run the SAP connector: business events / OData polling in, scores written back",
    )
    parser.add_argument("--mapping", type=Path, required=True, help="mapping file (YAML)")
    parser.add_argument("--base-url", required=True, help="SAP system, e.g. https://host:443")
    parser.add_argument("--name", default="sap", help="connector name (checkpoints, group)")
    parser.add_argument(
        "--listen",
        default="127.0.0.1:8089",
        help="HOST:PORT of the CloudEvents receiver; 'off' for none (port 0: any free port)",
    )
    parser.add_argument("--path", default="/events", help="path SAP posts events to")
    parser.add_argument(
        "--poll-interval", type=float, default=None, help="poll OData every N seconds"
    )
    parser.add_argument("--no-writeback", action="store_true", help="publish only")
    parser.add_argument("--auth", choices=("basic", "oauth", "none"), default="basic")
    parser.add_argument("--token-url", help="OAuth token endpoint (client credentials)")
    parser.add_argument("--dedupe-window-hours", type=float, default=24.0)
    parser.add_argument("--log-level", default="INFO")
    parser.set_defaults(handler=connect_sap_command)


def _listen(text: str) -> tuple[str, int | None]:
    if text == "off":
        return "", None
    host, _, port = text.rpartition(":")
    if not port.isdigit():
        raise SluicewayError(f"--listen {text!r}: expected HOST:PORT or off")
    return host or "127.0.0.1", int(port)


def connect_sap_command(args: argparse.Namespace, settings: Settings) -> int:
    from connectors.common.mapping import load_mapping
    from connectors.sap.client import ODataClient, credentials_from_environment
    from connectors.sap.connector import SapConnector, serve
    from connectors.sap.odata import EntitySource
    from workers.inference.runner import configure_logging

    configure_logging(args.log_level)
    # One line per HTTP call drowns the connector's own lines; failures are logged by it.
    logging.getLogger("httpx2").setLevel(logging.WARNING)
    mapping = load_mapping(args.mapping)
    model = settings.models.get(mapping.model)
    if model is None:
        raise SluicewayError(f"mapping names model {mapping.model!r}, which settings lack")
    missing = mapping.missing_features(model.feature_order)
    if missing:
        raise SluicewayError(f"mapping {args.mapping} does not fill features {missing}")
    source = EntitySource.from_mapping(mapping.source)
    credentials = credentials_from_environment(args.auth, os.environ, token_url=args.token_url)
    host, port = _listen(args.listen)
    if port is None and args.poll_interval is None:
        raise SluicewayError("nothing to do: --listen off and no --poll-interval")

    async def run() -> None:
        odata = ODataClient(args.base_url, source, credentials)
        connector = SapConnector(
            settings,
            mapping,
            odata,
            name=args.name,
            dedupe_window=timedelta(hours=args.dedupe_window_hours),
        )

        def ready(bound: int | None) -> None:
            if bound is not None:
                print(f"listening on http://{host}:{bound}{args.path}", flush=True)

        stats = await serve(
            connector,
            host=host,
            port=port,
            path=args.path,
            poll_interval_s=args.poll_interval,
            writeback=not args.no_writeback,
            ready=ready,
        )
        print(
            f"connector stopped: events={stats.events} published={stats.published} "
            f"duplicates={stats.duplicates} dead_lettered={stats.dead_lettered} "
            f"written={stats.written} already_written={stats.already_written} "
            f"skipped={stats.skipped}",
            flush=True,
        )

    asyncio.run(run())
    return 0
