"""Routing SAP events to mappings, their kinds, the connector config, bounded memories, the
webhook handshake answer and the outcome table. Pure: no broker, no HTTP."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from connectors.common.mapping import load_mapping
from connectors.sap.cloudevents import CloudEvent
from connectors.sap.core import ConnectorStats
from connectors.sap.exceptions import SapConfigError
from connectors.sap.odata import EntitySource
from connectors.sap.receiver import handshake_headers
from connectors.sap.routing import (
    EventKind,
    RouteRule,
    event_kind,
    route_for,
    route_subject,
    split_subject,
)
from connectors.sap.systems import parse_connector_config

REPO_ROOT = Path(__file__).resolve().parents[2]
MAPPING = load_mapping(REPO_ROOT / "connectors" / "sap" / "mappings" / "supplier_invoice.yaml")
PREFIX = "sap.s4.beh.supplierinvoice.v1.SupplierInvoice"
S4H = "/default/sap.s4.beh/S4HCLNT100"
S4P = "/default/sap.s4.beh/S4PCLNT200"


def _event(event_type: str, source: str = S4H) -> CloudEvent:
    return CloudEvent(id="1", source=source, type=event_type)


@pytest.mark.parametrize(
    ("event_type", "kind"),
    [
        (f"{PREFIX}.Created.v1", EventKind.SCORE),
        (f"{PREFIX}.Changed.v1", EventKind.SCORE),
        (f"{PREFIX}.Canceled.v1", EventKind.CANCEL),
        (f"{PREFIX}.Cancelled.v1", EventKind.CANCEL),
        ("sap.s4.beh.businesspartner.v1.BusinessPartner.Deleted.v1", EventKind.DELETE),
        ("weird", EventKind.SCORE),
        ("", EventKind.SCORE),
    ],
)
def test_the_kind_of_an_event_is_its_action_segment(event_type: str, kind: EventKind) -> None:
    assert event_kind(event_type) is kind


def _rule(name: str, sources: tuple[str, ...], types: tuple[str, ...]) -> RouteRule:
    source = EntitySource.from_mapping({**MAPPING.source, "event_types": list(types)})
    return RouteRule(name=name, system=name, mapping=MAPPING, source=source, event_sources=sources)


def test_events_go_to_the_route_of_their_source_and_type() -> None:
    created = f"{PREFIX}.Created.v1"
    routes = [
        _rule("S4H/A", (S4H,), (created,)),
        _rule("S4P/A", (S4P,), (created, f"{PREFIX}.Canceled.v1")),
    ]
    assert route_for(routes, _event(created)) is routes[0]
    assert route_for(routes, _event(created, S4P)) is routes[1]
    assert route_for(routes, _event(f"{PREFIX}.Canceled.v1", S4P)) is routes[1]
    # Not listed by the route of its system: no route, even though another system lists it.
    assert route_for(routes, _event(f"{PREFIX}.Canceled.v1")) is None
    assert route_for(routes, _event(created, "/default/sap.s4.beh/OTHER")) is None
    anything = [_rule("", (), ())]
    assert route_for(anything, _event("any.thing.Created.v1", "x")) is anything[0]


def test_a_signed_subject_names_route_and_entity() -> None:
    predicate = "(SupplierInvoice='1',FiscalYear='2024')"
    assert split_subject(route_subject("S4H/A_SupplierInvoice", predicate)) == (
        "S4H/A_SupplierInvoice",
        predicate,
    )
    assert split_subject(route_subject("", predicate)) == ("", predicate)
    assert split_subject("no-predicate") is None
    assert split_subject("S4H(unclosed") is None


def _config(**changes: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "systems": [
            {"name": "S4H", "base_url": "https://s4h", "event_sources": [S4H]},
            {
                "name": "S4P",
                "base_url": "https://s4p",
                "auth": "oauth",
                "token_url": "https://s4p/oauth/token",
                "credentials_env": "SAP_S4P",
                "event_sources": [S4P],
            },
        ],
        "mappings": [
            {"file": "invoice.yaml", "system": "S4H"},
            {"file": "/abs/invoice.yaml", "system": "S4P"},
        ],
    }
    config.update(changes)
    return config


def test_a_connector_config_lists_systems_and_their_mappings(tmp_path: Path) -> None:
    config = parse_connector_config(_config(), base=tmp_path, origin="test")
    assert [ref.file for ref in config.mappings] == [
        tmp_path / "invoice.yaml",
        Path("/abs/invoice.yaml"),
    ]
    s4p = config.system("S4P")
    assert s4p.credential_variables()["client_secret_var"] == "SAP_S4P_CLIENT_SECRET"
    assert config.system("S4H").credential_variables()["username_var"] == "SAP_USERNAME"
    # The file is YAML as an operator writes it.
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(_config()))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {
                "systems": [
                    {"name": "A", "base_url": "u", "event_sources": [S4H]},
                    {"name": "B", "base_url": "u", "event_sources": [S4H]},
                ]
            },
            "belongs to both A and B",
        ),
        (
            {"systems": [{"name": "A", "base_url": "u"}, {"name": "B", "base_url": "u"}]},
            "each needs its event_sources",
        ),
        (
            {
                "systems": [
                    {"name": "A", "base_url": "u", "event_sources": ["x"]},
                    {"name": "A", "base_url": "u", "event_sources": ["y"]},
                ]
            },
            "repeat",
        ),
        ({"mappings": [{"file": "m.yaml", "system": "NOPE"}]}, "unknown system 'NOPE'"),
        ({"mappings": []}, "mappings"),
        ({"extra": 1}, "extra"),
        (
            {"systems": [{"name": "A", "base_url": "u", "credentials_env": "lower"}]},
            "credentials_env",
        ),
    ],
)
def test_an_inconsistent_config_says_why(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(SapConfigError, match=message):
        parse_connector_config(_config(**changes), base=Path("."), origin="test")


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_handshake_echoes_a_plain_origin_only() -> None:
    assert handshake_headers("eventmesh.example.com", 100.0) == {
        "WebHook-Allowed-Origin": "eventmesh.example.com",
        "Allow": "OPTIONS, POST",
        "WebHook-Allowed-Rate": "6000",
    }
    assert handshake_headers("*", None) == {"WebHook-Allowed-Origin": "*", "Allow": "OPTIONS, POST"}
    assert handshake_headers("h", 0.001)["WebHook-Allowed-Rate"] == "1"  # type: ignore[index]
    for hostile in (None, "", " ", "a\r\nSet-Cookie: x", "é.example", "x" * 256, "a b", "<s>"):
        assert handshake_headers(hostile, 1.0) is None


def test_the_outcome_table_sums_each_route_and_the_total() -> None:
    stats = ConnectorStats()
    for route, outcome in [
        ("S4H/A", "request"),
        ("S4H/A", "duplicate"),
        ("S4P/A", "invalidation"),
        ("(unmapped)", "skipped"),
        ("(malformed)", "dead_letter"),
    ]:
        stats.count_outcome(route, outcome)
    lines = stats.outcome_table().splitlines()
    assert lines[0].split() == [
        "route",
        "request",
        "invalidation",
        "duplicate",
        "skipped",
        "dead_letter",
        "events",
    ]
    rows = {line.split()[0]: [int(v) for v in line.split()[1:]] for line in lines[1:]}
    assert rows["S4H/A"] == [1, 0, 1, 0, 0, 2]
    assert rows["total"] == [1, 1, 1, 1, 1, 5]
    assert stats.counters()["outcomes"] == {
        "request": 1,
        "invalidation": 1,
        "duplicate": 1,
        "skipped": 1,
        "dead_letter": 1,
    }
