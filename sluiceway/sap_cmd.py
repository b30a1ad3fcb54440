"""``sluiceway connect-sap --mapping FILE --base-url URL``: the SAP connector.

Or ``--connector-config FILE``: one connector for several SAP systems and mappings (each
system with its base URL, credentials from its own environment variables, and the CloudEvents
sources of its events; see :mod:`connectors.sap.systems`). Events are routed to the mapping of their
``source`` and ``type``; the summary at the end is a table of input events by route and
outcome (request, invalidation, duplicate, skipped, dead letter).

Receives SAP business events (CloudEvents) on ``--listen``, and/or polls OData for changes
every ``--poll-interval`` seconds, publishes mapped requests, and writes results back.
Credentials come from environment variables only (``--auth basic``: ``SAP_USERNAME`` and
``SAP_PASSWORD``; ``--auth oauth``: ``SAP_CLIENT_ID`` and ``SAP_CLIENT_SECRET`` with
``--token-url``); they are never printed or logged. The connector signs the correlation id of
every request it publishes and writes back only results it signed: its secret comes from
``SLUICEWAY_CONNECTOR_SECRET_<NAME>`` or ``SLUICEWAY_CONNECTOR_SECRET`` (comma-separated for a
rotation, the signing one first); without one it refuses to start.

The receiver itself needs ``--webhook-auth basic|jwt|hmac`` (``none`` only on a loopback
address), takes TLS with ``--tls-cert``/``--tls-key``, and limits deliveries per second and
events per delivery; its shared secret comes from ``SAP_WEBHOOK_SECRET``. See
docs/connectors.md, "Securing the webhook".
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.settings import Settings
from schemas.errors import SluicewayError

if TYPE_CHECKING:
    from connectors.common.mapping import Mapping
    from connectors.sap.client import Credentials
    from connectors.sap.odata import EntitySource
    from connectors.sap.systems import SystemConfig
    from connectors.sap.webhook import WebhookSecurity


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "connect-sap",
        help="run the SAP connector: business events / OData polling in, scores written back",
    )
    parser.add_argument("--mapping", type=Path, help="mapping file (YAML), with --base-url")
    parser.add_argument("--base-url", help="SAP system, e.g. https://host:443")
    parser.add_argument(
        "--connector-config",
        type=Path,
        help="connector config (YAML): several systems and mappings, instead of "
        "--mapping/--base-url/--auth",
    )
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
    _register_webhook_options(parser)
    parser.add_argument("--log-level", default="INFO")
    parser.set_defaults(handler=connect_sap_command)


def _register_webhook_options(parser: argparse.ArgumentParser) -> None:
    hook = parser.add_argument_group(
        "webhook security", "who may post events, over what, how fast (secret: SAP_WEBHOOK_SECRET)"
    )
    hook.add_argument(
        "--webhook-auth",
        choices=("basic", "jwt", "hmac", "none"),
        default=None,
        help="required with --listen: how senders authenticate ('none': loopback only)",
    )
    hook.add_argument("--webhook-username", help="basic: the user name senders present")
    hook.add_argument("--webhook-jwt-issuer", help="jwt: the required iss claim")
    hook.add_argument("--webhook-jwt-audience", help="jwt: the required aud claim")
    hook.add_argument("--webhook-jwks", help="jwt: the issuer's key set, a file or https URL")
    hook.add_argument(
        "--webhook-jwks-refresh",
        type=float,
        default=60.0,
        help="jwt: refetch the key set for an unknown kid at most every N seconds (60)",
    )
    hook.add_argument(
        "--webhook-jwt-leeway", type=float, default=30.0, help="jwt: clock skew allowed (30 s)"
    )
    hook.add_argument(
        "--webhook-hmac-tolerance",
        type=float,
        default=300.0,
        help="hmac: how old (or early) a signed timestamp may be (300 s)",
    )
    hook.add_argument("--tls-cert", type=Path, help="serve HTTPS: certificate chain (PEM)")
    hook.add_argument("--tls-key", type=Path, help="serve HTTPS: private key (PEM)")
    hook.add_argument(
        "--webhook-rate", type=float, default=100.0, help="deliveries/s per client address"
    )
    hook.add_argument("--webhook-burst", type=float, default=200.0, help="burst per client address")
    hook.add_argument("--webhook-total-rate", type=float, default=400.0, help="deliveries/s in all")
    hook.add_argument("--webhook-total-burst", type=float, default=800.0, help="burst in all")
    hook.add_argument(
        "--max-events-per-delivery",
        type=int,
        default=100,
        help="a batch with more events is refused with 413 (100)",
    )


def _webhook_security(args: argparse.Namespace) -> WebhookSecurity:
    from connectors.sap.webhook import WebhookLimits, security_from_options

    return security_from_options(
        auth=args.webhook_auth,
        environment=os.environ,
        username=args.webhook_username,
        jwt_issuer=args.webhook_jwt_issuer,
        jwt_audience=args.webhook_jwt_audience,
        jwks=args.webhook_jwks,
        jwks_refresh_s=args.webhook_jwks_refresh,
        jwt_leeway_s=args.webhook_jwt_leeway,
        hmac_tolerance_s=args.webhook_hmac_tolerance,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        limits=WebhookLimits(
            per_client_rate=args.webhook_rate,
            per_client_burst=args.webhook_burst,
            total_rate=args.webhook_total_rate,
            total_burst=args.webhook_total_burst,
            max_events_per_delivery=args.max_events_per_delivery,
        ),
    )


def _listen(text: str) -> tuple[str, int | None]:
    if text == "off":
        return "", None
    host, _, port = text.rpartition(":")
    if not port.isdigit():
        raise SluicewayError(f"--listen {text!r}: expected HOST:PORT or off")
    # "[::1]:8089" names an IPv6 address; aiohttp wants it without the brackets.
    return host.removeprefix("[").removesuffix("]") or "127.0.0.1", int(port)


@dataclass(frozen=True)
class _RoutePlan:
    """One mapping bound to its system, checked, before anything connects."""

    name: str
    system: SystemConfig
    mapping: Mapping
    source: EntitySource
    credentials: Credentials


def _route_plans(args: argparse.Namespace, settings: Settings) -> list[_RoutePlan]:
    from connectors.common.mapping import load_mapping
    from connectors.sap.client import credentials_from_environment
    from connectors.sap.odata import EntitySource
    from connectors.sap.systems import load_connector_config, single_system

    if args.connector_config is not None:
        if args.mapping is not None or args.base_url is not None:
            raise SluicewayError(
                "--connector-config names the systems and mappings: no --mapping/--base-url"
            )
        config = load_connector_config(args.connector_config)
        pairs = [(config.system(ref.system), ref.file) for ref in config.mappings]
        named = True
    else:
        if args.mapping is None or args.base_url is None:
            raise SluicewayError(
                "either --connector-config FILE, or --mapping FILE with --base-url URL"
            )
        pairs = [(single_system(args.base_url, args.auth, args.token_url), args.mapping)]
        named = False
    plans = []
    for system, file in pairs:
        mapping = load_mapping(file)
        model = settings.models.get(mapping.model)
        if model is None:
            raise SluicewayError(
                f"mapping {file} names model {mapping.model!r}, which settings lack"
            )
        missing = mapping.missing_features(model.feature_order)
        if missing:
            raise SluicewayError(f"mapping {file} does not fill features {missing}")
        source = EntitySource.from_mapping(mapping.source)
        credentials = credentials_from_environment(
            system.auth,
            os.environ,
            token_url=system.token_url,
            **system.credential_variables(),
        )
        name = f"{system.name}/{source.entity_set}" if named else ""
        plans.append(_RoutePlan(name, system, mapping, source, credentials))
    names = [plan.name for plan in plans]
    if len(set(names)) != len(names):
        raise SluicewayError(f"two mappings read the same entity set of one system: {names}")
    return plans


def connect_sap_command(args: argparse.Namespace, settings: Settings) -> int:
    from connectors.common.correlation import MissingSecretError, secrets_from_env
    from connectors.sap.client import ODataClient
    from connectors.sap.connector import SapConnector, build_route, serve
    from workers.inference.runner import configure_logging

    configure_logging(args.log_level)
    # One line per HTTP call drowns the connector's own lines; failures are logged by it.
    logging.getLogger("httpx2").setLevel(logging.WARNING)
    plans = _route_plans(args, settings)
    host, port = _listen(args.listen)
    if port is None and args.poll_interval is None:
        raise SluicewayError("nothing to do: --listen off and no --poll-interval")
    security = None
    if port is not None:
        from connectors.sap.webhook import check_listen

        security = _webhook_security(args)
        check_listen(host, security)  # before anything starts: a one-line refusal
    try:
        secrets = secrets_from_env(os.environ, args.name)
    except MissingSecretError as no_secret:
        raise SluicewayError(str(no_secret)) from None

    async def run() -> None:
        routes = [
            build_route(
                settings.namespace,
                plan.mapping,
                ODataClient(plan.system.base_url, plan.source, plan.credentials),
                name=plan.name,
                system=plan.system.name,
                event_sources=plan.system.event_sources,
            )
            for plan in plans
        ]
        connector = SapConnector(
            settings,
            routes=routes,
            secrets=secrets,
            name=args.name,
            dedupe_window=timedelta(hours=args.dedupe_window_hours),
        )

        def ready(bound: int | None) -> None:
            if bound is not None:
                scheme = "https" if security is not None and security.tls else "http"
                print(f"listening on {scheme}://{host}:{bound}{args.path}", flush=True)

        stats = await serve(
            connector,
            host=host,
            port=port,
            path=args.path,
            poll_interval_s=args.poll_interval,
            writeback=not args.no_writeback,
            ready=ready,
            security=security,
        )
        print(
            f"connector stopped: events={stats.events} published={stats.published} "
            f"duplicates={stats.duplicates} dead_lettered={stats.dead_lettered} "
            f"written={stats.written} already_written={stats.already_written} "
            f"skipped={stats.skipped} auth_failures={stats.auth_failures} "
            f"rate_limited={stats.rate_limited} too_many_events={stats.too_many_events} "
            f"forged={stats.forged} invalidations={stats.invalidations}",
            flush=True,
        )
        print(stats.outcome_table(), flush=True)

    asyncio.run(run())
    return 0
