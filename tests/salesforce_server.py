"""A protocol test server for the parts of Salesforce the connector uses. It is not Salesforce.

No Salesforce org is reachable from the development machines, so the connector is verified
against this server, which answers the way Salesforce documents it. Built from Salesforce's
public material: ``pubsub_api.proto`` (github.com/forcedotcom/pub-sub-api), the Pub/Sub API
guide ("Handle Errors", "Event Deserialization Considerations", "Event Message Durability"),
the Change Data Capture Developer Guide ("ChangeEventHeader Fields", "Change Event Message
Structure") and the REST API Developer Guide (sObject Rows, sObject Collections, Query, OAuth
token endpoint, status codes). What it serves:

- **Pub/Sub API (gRPC, ``eventbus.v1.PubSub``)**: ``GetTopic``, ``GetSchema`` and
  ``Subscribe``: the first FetchRequest names topic, ``replay_preset`` and ``replay_id``;
  events are sent only against ``num_requested`` credits, later FetchRequests add credits,
  ``pending_num_requested`` reports what is still owed; when nothing is to be sent an empty
  FetchResponse carries ``latest_replay_id`` (keepalive, every ``keepalive_s``). Replay ids
  are opaque 8-byte values; an unknown or expired one fails the call with INVALID_ARGUMENT and
  the trailer ``error-code: sfdc.platform.eventbus.grpc.subscription.fetch.replayid.corrupted``.
  Calls need the ``accesstoken``/``instanceurl``/``tenantid`` headers (UNAUTHENTICATED
  otherwise). Events are Avro-encoded with a schema shaped like Salesforce's ChangeEvent
  schemas: a ``ChangeEventHeader`` record, then every field of the object as an optional
  value; ``changedFields``/``nulledFields`` are bitmaps.
- **OAuth** ``POST /services/oauth2/token``: ``client_credentials`` and the JWT bearer grant
  (RS256 checked against the connected app's certificate key, ``iss``/``sub``/``aud``/``exp``);
  errors as ``{"error": "invalid_grant", "error_description": ...}``.
- **REST** under ``/services/data/vXX.X``: ``PATCH sobjects/<type>/<id>`` (204, or 404
  ``ENTITY_IS_DELETED``/``NOT_FOUND``); ``PATCH composite/sobjects`` (up to 200 records,
  ``allOrNone``; 200 with one SaveResult per record in order); ``GET composite/sobjects/<type>
  ?ids=&fields=`` (records, ``null`` for missing ones); ``GET query?q=`` for exactly one SOQL
  shape, ``SELECT <fields> FROM <type> WHERE SystemModstamp >= <datetime>``. Errors in
  Salesforce's shape ``[{"message", "errorCode"}]``: 401 ``INVALID_SESSION_ID``, 403
  ``REQUEST_LIMIT_EXCEEDED`` (never 429), 503 ``SERVER_UNAVAILABLE`` on demand.
- A write through REST changes the record and, like Salesforce, emits a change event whose
  ``changeOrigin`` is ``com/salesforce/api/rest/<version>;client=<id>`` when the request sent
  ``Sforce-Call-Options: client=<id>``, and whose ``commitUser`` is the calling user.

Controls for tests: :meth:`SalesforceOrg.change` (a user's change: CREATE, UPDATE, DELETE,
GAP_*, GAP_OVERFLOW), :meth:`SalesforceOrg.fail_next` (REST faults), :meth:`expire_tokens`
(now) and :meth:`expire_tokens_after_writes` (when the N-th record write is applied),
:meth:`expire_replay_ids_before`, :meth:`break_streams` (UNAVAILABLE, as a reset stream);
``writes``, ``rest_requests``, ``token_requests``, ``subscriptions``, ``fetch_requests`` and
``max_outstanding`` record what the client did.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

import fastavro
import grpc
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from connectors.salesforce.cdc import encode_bitmap
from connectors.salesforce.proto import pubsub_api_pb2 as pb

ORG_ID = "00D5g00000SLUICE"
ALL_CHANGES = "/data/ChangeEvents"
"""The standard channel: change events of every entity selected for it, each event with its
own entity's schema (Change Data Capture Developer Guide, "Subscription Channels")."""
INTEGRATION_USER_ID = "005INTEGRATION01"
HUMAN_USER_ID = "005HUMANUSER0001"
REPLAY_CORRUPTED = "sfdc.platform.eventbus.grpc.subscription.fetch.replayid.corrupted"
AUTH_ERROR = "sfdc.platform.eventbus.grpc.service.auth.error"
COLLECTION_LIMIT = 200
CHANGE_TYPES = (
    "CREATE",
    "UPDATE",
    "DELETE",
    "UNDELETE",
    "GAP_CREATE",
    "GAP_UPDATE",
    "GAP_DELETE",
    "GAP_UNDELETE",
    "GAP_OVERFLOW",
)

SUPPLIER_INVOICE_FIELDS: dict[str, str] = {
    "Name": "string",
    "Amount_EUR__c": "double",
    "Vendor_Tenure_Days__c": "double",
    "Payment_Terms_Days__c": "double",
    "Days_To_Due__c": "double",
    "Past_Late_Payments__c": "double",
    "New_Bank_Account__c": "boolean",
    "Foreign_Vendor__c": "boolean",
    "Manual_Entry__c": "boolean",
    "Risk_Score__c": "double",
    "Risk_Model_Version__c": "string",
    "Risk_Request_Id__c": "string",
    "LastModifiedDate": "long",
    "SystemModstamp": "long",
}
"""The custom object of the example mapping (dates are epoch ms, as Pub/Sub API sends them)."""


# ---------------------------------------------------------------------------- schemas


def change_event_schema(entity: str, fields: dict[str, Any]) -> dict[str, Any]:
    """An Avro schema shaped like Salesforce's ``<Entity>ChangeEvent``: the header record,
    then every object field as ``["null", type]`` (a compound field as a nested record)."""
    event_name = entity.removesuffix("__c") + (
        "__ChangeEvent" if entity.endswith("__c") else "ChangeEvent"
    )
    header = {
        "name": "ChangeEventHeader",
        "type": {
            "type": "record",
            "name": "ChangeEventHeader",
            "namespace": "com.salesforce.eventbus",
            "fields": [
                {"name": "entityName", "type": "string"},
                {"name": "recordIds", "type": {"type": "array", "items": "string"}},
                {
                    "name": "changeType",
                    "type": {
                        "type": "enum",
                        "name": "ChangeType",
                        "namespace": "com.salesforce.eventbus",
                        "symbols": list(CHANGE_TYPES),
                    },
                },
                {"name": "changeOrigin", "type": "string"},
                {"name": "transactionKey", "type": "string"},
                {"name": "sequenceNumber", "type": "int"},
                {"name": "commitTimestamp", "type": "long"},
                {"name": "commitNumber", "type": "long"},
                {"name": "commitUser", "type": "string"},
                {"name": "nulledFields", "type": {"type": "array", "items": "string"}},
                {"name": "diffFields", "type": {"type": "array", "items": "string"}},
                {"name": "changedFields", "type": {"type": "array", "items": "string"}},
            ],
        },
    }
    avro_fields: list[dict[str, Any]] = [header]
    for name, kind in fields.items():
        if isinstance(kind, dict):  # a compound field: {"FirstName": "string", ...}
            record = {
                "type": "record",
                "name": name,
                "fields": [
                    {"name": child, "type": ["null", child_kind], "default": None}
                    for child, child_kind in kind.items()
                ],
            }
            avro_fields.append({"name": name, "type": ["null", record], "default": None})
        else:
            avro_fields.append({"name": name, "type": ["null", kind], "default": None})
    return {
        "type": "record",
        "name": event_name,
        "namespace": "com.sforce.eventbus",
        "fields": avro_fields,
    }


def schema_fingerprint(schema: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(schema, sort_keys=True).encode()).digest()
    return base64.urlsafe_b64encode(digest[:16]).rstrip(b"=").decode()


# ---------------------------------------------------------------------------- the org


@dataclass
class _Topic:
    name: str
    entity: str
    fields: dict[str, Any]
    schema: dict[str, Any]
    schema_id: str
    parsed: Any
    events: list[tuple[bytes, str, bytes, str]] = field(default_factory=list)
    """(replay id, event id, Avro payload, schema id), in stream order. A single-entity
    channel's events all have its schema; ``/data/ChangeEvents`` carries every entity's."""
    retention_start: int = 0
    """Index of the oldest event still stored: older replay ids are rejected."""


@dataclass(frozen=True)
class Write:
    """One record written through REST: what the connector did."""

    sobject: str
    record_id: str
    fields: dict[str, Any]
    client: str | None
    user: str


@dataclass
class _Fault:
    remaining: int
    status: int
    error_code: str
    message: str


def _replay_id(position: int) -> bytes:
    return position.to_bytes(8, "big")


class SalesforceOrg:
    """One org: records, CDC topics, sessions; shared by the gRPC and the HTTP face."""

    def __init__(
        self,
        *,
        client_id: str = "sluiceway-connected-app",
        client_secret: str = "connected-app-secret",  # noqa: S107 - a test server's
        jwt_username: str = "integration@example.com",
        jwt_public_key: rsa.RSAPublicKey | None = None,
        keepalive_s: float = 0.5,
        api_version: str = "62.0",
    ) -> None:
        self.client_id = client_id
        self.client_secret = client_secret
        self.jwt_username = jwt_username
        self.jwt_public_key = jwt_public_key
        self.keepalive_s = keepalive_s
        self.api_version = api_version
        self.instance_url = ""
        self.login_url = ""
        self._lock = threading.Condition()
        self.records: dict[str, dict[str, dict[str, Any]]] = {}
        self.deleted: set[tuple[str, str]] = set()
        self.topics: dict[str, _Topic] = {}
        self._schemas: dict[str, _Topic] = {}
        self._tokens: dict[str, str] = {}  # token -> user id
        self._faults: list[_Fault] = []
        self._replay_base = 7_000_000
        self._next_position = 0
        self._commit_number = 0
        self.writes: list[Write] = []
        self.rest_requests: list[tuple[str, str, int]] = []
        """(method, path, status) of every REST request."""
        self.token_requests: list[str] = []
        """``grant_type`` of every token request."""
        self.fetch_requests: list[int] = []
        """``num_requested`` of every FetchRequest received."""
        self.max_outstanding = 0
        """The most credits a subscriber held at once."""
        self.subscriptions: list[tuple[str, str, bytes]] = []
        """(topic, replay preset, replay id) of every Subscribe call."""
        self._stream_generation = 0
        self._expire_tokens_after: int | None = None
        self.tokens_expired_at_write: int | None = None
        """The number of record writes when :meth:`expire_tokens_after_writes` fired."""
        self.standard_channel_entities: set[str] = set()
        self.rest_request_times: list[float] = []
        """``time.monotonic()`` of every REST answer, in the order of ``rest_requests``."""
        self._refusals: dict[str, tuple[str, tuple[str, ...]]] = {}

    # ------------------------------------------------------------------ setup

    def enable_cdc(
        self, entity: str, fields: dict[str, Any], *, standard_channel: bool = False
    ) -> str:
        """Select ``entity`` for Change Data Capture; returns its channel name. With
        ``standard_channel`` its changes also go to ``/data/ChangeEvents``."""
        schema = change_event_schema(entity, fields)
        name = f"/data/{schema['name']}"
        topic = _Topic(
            name, entity, fields, schema, schema_fingerprint(schema), fastavro.parse_schema(schema)
        )
        with self._lock:
            self.topics[name] = topic
            self._schemas[topic.schema_id] = topic
            self.records.setdefault(entity, {})
            if standard_channel:
                self.standard_channel_entities.add(entity)
                if ALL_CHANGES not in self.topics:
                    self.topics[ALL_CHANGES] = _Topic(
                        ALL_CHANGES, "", {}, schema, topic.schema_id, topic.parsed
                    )
        return name

    def _topic_of(self, entity: str) -> _Topic | None:
        return next((t for t in self.topics.values() if t.entity == entity), None)

    # ------------------------------------------------------------------ changes

    def change(
        self,
        entity: str,
        change_type: str,
        record_ids: Sequence[str],
        values: dict[str, Any] | None = None,
        *,
        user: str = HUMAN_USER_ID,
        origin: str = "",
        transaction_key: str | None = None,
        sequence_number: int = 1,
    ) -> bytes:
        """Apply a change to the records and publish its change event; returns its replay id.

        ``values`` are the fields the change set (the same for every record named); a
        ``GAP_*`` event changes the records but carries no values, ``GAP_OVERFLOW`` names no
        record.
        """
        values = dict(values or {})
        with self._lock:
            now_ms = int(time.time() * 1000)
            store = self.records.setdefault(entity, {})
            if change_type == "UNDELETE" and not values and len(record_ids) == 1:
                # Like a create, an undelete carries the restored record's fields.
                values = {
                    name: value
                    for name, value in store.get(record_ids[0], {}).items()
                    if name not in ("LastModifiedDate", "SystemModstamp") and value is not None
                }
            for record_id in record_ids:
                key = (entity, record_id)
                if change_type in ("DELETE", "GAP_DELETE"):
                    self.deleted.add(key)
                    continue
                if change_type in ("UNDELETE", "GAP_UNDELETE"):
                    self.deleted.discard(key)
                record = store.setdefault(record_id, {})
                record.update(values)
                record["LastModifiedDate"] = now_ms
                record["SystemModstamp"] = now_ms
            topic = self._topic_of(entity)
            if topic is None:
                return b""
            return self._publish(
                topic,
                change_type,
                [] if change_type == "GAP_OVERFLOW" else list(record_ids),
                {} if change_type.startswith("GAP_") else values,
                user=user,
                origin=origin,
                transaction_key=transaction_key or uuid.uuid4().hex,
                sequence_number=sequence_number,
                now_ms=now_ms,
            )

    def _publish(
        self,
        topic: _Topic,
        change_type: str,
        record_ids: list[str],
        values: dict[str, Any],
        *,
        user: str,
        origin: str,
        transaction_key: str,
        sequence_number: int,
        now_ms: int,
    ) -> bytes:
        record: dict[str, Any] = {name: None for name in topic.fields}
        changed: list[str] = []
        nulled: list[str] = []
        for name, value in values.items():
            if "." in name:
                parent, child = name.split(".", 1)
                nested = record.get(parent) or {c: None for c in topic.fields[parent]}
                nested[child] = value
                record[parent] = nested
            else:
                record[name] = value
            (nulled if value is None else changed).append(name)
        if change_type == "UPDATE":
            record["LastModifiedDate"] = now_ms
            changed.append("LastModifiedDate")
        elif change_type != "CREATE":
            changed = []
        self._commit_number += 1
        record["ChangeEventHeader"] = {
            "entityName": topic.entity,
            "recordIds": record_ids,
            "changeType": change_type,
            "changeOrigin": origin,
            "transactionKey": transaction_key,
            "sequenceNumber": sequence_number,
            "commitTimestamp": now_ms,
            "commitNumber": self._commit_number,
            "commitUser": user,
            "nulledFields": encode_bitmap(nulled, topic.schema) if change_type == "UPDATE" else [],
            "diffFields": [],
            "changedFields": encode_bitmap(changed, topic.schema) if changed else [],
        }
        buffer = io.BytesIO()
        fastavro.schemaless_writer(buffer, topic.parsed, record)
        replay = _replay_id(self._replay_base + self._next_position)
        self._next_position += 1
        event_id = str(uuid.uuid4())
        topic.events.append((replay, event_id, buffer.getvalue(), topic.schema_id))
        shared = self.topics.get(ALL_CHANGES)
        if shared is not None and topic.entity in self.standard_channel_entities:
            # The standard channel has its own replay ids; the event keeps its schema.
            shared_replay = _replay_id(self._replay_base + self._next_position)
            self._next_position += 1
            shared.events.append((shared_replay, event_id, buffer.getvalue(), topic.schema_id))
        self._lock.notify_all()
        return replay

    def expire_replay_ids_before(self, topic_name: str, replay_id: bytes) -> None:
        """Purge events older than ``replay_id`` (the 72-hour retention, compressed)."""
        with self._lock:
            topic = self.topics[topic_name]
            for index, (replay, _, _, _) in enumerate(topic.events):
                if replay == replay_id:
                    topic.retention_start = index
                    return
            raise KeyError(replay_id.hex())

    def redeliver(self, topic_name: str, replay_id: bytes) -> None:
        """Send a stored event again, same replay id and event uuid (Pub/Sub API delivers
        at least once: after a broken stream or a retry an event may come twice)."""
        with self._lock:
            topic = self.topics[topic_name]
            stored = next(e for e in topic.events if e[0] == replay_id)
            topic.events.append(stored)
            self._lock.notify_all()

    def merge(
        self, entity: str, master_id: str, merged_ids: Sequence[str], values: dict[str, Any]
    ) -> list[bytes]:
        """A merge as Change Data Capture reports it: an UPDATE of the surviving record and
        a DELETE of each merged-away record, in one transaction."""
        transaction = uuid.uuid4().hex
        replays = [
            self.change(
                entity,
                "UPDATE",
                [master_id],
                values,
                transaction_key=transaction,
                sequence_number=1,
            )
        ]
        replays.extend(
            self.change(
                entity, "DELETE", [merged], transaction_key=transaction, sequence_number=index
            )
            for index, merged in enumerate(merged_ids, start=2)
        )
        return replays

    def refuse_writes(self, record_id: str, error_code: str, fields: Sequence[str]) -> None:
        """Every write of ``record_id`` fails for good with this SaveResult error (e.g. a
        validation rule: ``FIELD_CUSTOM_VALIDATION_EXCEPTION`` naming its fields)."""
        with self._lock:
            self._refusals[record_id] = (error_code, tuple(fields))

    def latest_replay_id(self, topic_name: str) -> bytes:
        with self._lock:
            events = self.topics[topic_name].events
            return events[-1][0] if events else b""

    # ------------------------------------------------------------------ sessions

    def issue_token(self, user: str) -> str:
        token = f"00D!{uuid.uuid4().hex}"
        with self._lock:
            self._tokens[token] = user
        return token

    def user_of(self, token: str | None) -> str | None:
        with self._lock:
            return self._tokens.get(token or "")

    def break_streams(self) -> None:
        """End every open Subscribe stream with UNAVAILABLE (a load balancer's reset)."""
        with self._lock:
            self._stream_generation += 1
            self._lock.notify_all()

    def expire_tokens(self) -> None:
        """Every session ends (as after a timeout or a password reset)."""
        with self._lock:
            self._tokens.clear()

    def expire_tokens_after_writes(self, count: int) -> None:
        """End every session at the moment the ``count``-th record write (in all) is applied,
        once: the REST calls after it meet 401 ``INVALID_SESSION_ID``."""
        with self._lock:
            self._expire_tokens_after = count
            self._expire_tokens_if_due()

    def _expire_tokens_if_due(self) -> None:  # with self._lock held
        if self._expire_tokens_after is not None and len(self.writes) >= self._expire_tokens_after:
            self._expire_tokens_after = None
            self._tokens.clear()
            self.tokens_expired_at_write = len(self.writes)

    def fail_next(
        self, count: int, status: int, error_code: str, message: str | None = None
    ) -> None:
        """Answer the next ``count`` REST data requests with this error."""
        text = message or {
            "REQUEST_LIMIT_EXCEEDED": "TotalRequests Limit exceeded.",
            "SERVER_UNAVAILABLE": "Server temporarily unavailable.",
            "INVALID_SESSION_ID": "Session expired or invalid",
        }.get(error_code, error_code)
        with self._lock:
            self._faults.append(_Fault(count, status, error_code, text))

    def _take_fault(self) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.remaining > 0:
                    fault.remaining -= 1
                    return fault
        return None

    # ------------------------------------------------------------------ REST writes

    def write(
        self, sobject: str, record_id: str, fields: dict[str, Any], *, client: str | None, user: str
    ) -> str | None:
        """Apply one REST update; returns an error code, or ``None`` on success."""
        with self._lock:
            if record_id in self._refusals:
                return self._refusals[record_id][0]
            if (sobject, record_id) in self.deleted:
                return "ENTITY_IS_DELETED"
            store = self.records.get(sobject)
            if store is None or record_id not in store:
                return "INVALID_CROSS_REFERENCE_KEY"
            topic = self._topic_of(sobject)
            unknown = [n for n in fields if topic is not None and n not in topic.fields]
            if unknown:
                return "INVALID_FIELD"
            now_ms = int(time.time() * 1000)
            store[record_id].update(fields)
            store[record_id]["LastModifiedDate"] = now_ms
            store[record_id]["SystemModstamp"] = now_ms
            self.writes.append(Write(sobject, record_id, dict(fields), client, user))
            self._expire_tokens_if_due()
            if topic is not None:
                origin = f"com/salesforce/api/rest/{self.api_version}"
                if client:
                    origin += f";client={client}"
                self._publish(
                    topic,
                    "UPDATE",
                    [record_id],
                    dict(fields),
                    user=user,
                    origin=origin,
                    transaction_key=uuid.uuid4().hex,
                    sequence_number=1,
                    now_ms=now_ms,
                )
            return None

    def read(self, sobject: str, record_id: str, fields: Sequence[str]) -> dict[str, Any] | None:
        with self._lock:
            if (sobject, record_id) in self.deleted:
                return None
            record = self.records.get(sobject, {}).get(record_id)
            if record is None:
                return None
            return _rest_record(sobject, record_id, record, fields, self._compounds(sobject))

    def changed_since(
        self, sobject: str, since_ms: int, fields: Sequence[str]
    ) -> list[dict[str, Any]]:
        with self._lock:
            return [
                _rest_record(sobject, record_id, record, fields, self._compounds(sobject))
                for record_id, record in sorted(self.records.get(sobject, {}).items())
                if (sobject, record_id) not in self.deleted
                and int(record.get("SystemModstamp") or 0) >= since_ms
            ]

    def _compounds(self, sobject: str) -> dict[str, list[str]]:  # with self._lock held
        topic = self._topic_of(sobject)
        if topic is None:
            return {}
        return {name: list(kind) for name, kind in topic.fields.items() if isinstance(kind, dict)}

    def refused_fields(self, record_id: str) -> tuple[str, ...]:
        with self._lock:
            return self._refusals.get(record_id, ("", ()))[1]

    def writes_of(self, record_id: str) -> list[Write]:
        with self._lock:
            return [w for w in self.writes if w.record_id == record_id]


def _iso(epoch_ms: Any) -> Any:
    if not isinstance(epoch_ms, int):
        return epoch_ms
    return datetime.fromtimestamp(epoch_ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.000+0000")


def _rest_record(
    sobject: str,
    record_id: str,
    record: dict[str, Any],
    fields: Sequence[str],
    compounds: dict[str, list[str]],
) -> dict[str, Any]:
    """A record as REST returns it: ``attributes``, then the asked fields (dates as ISO). A
    compound field (``BillingAddress``) is one value whose members are lower camel case
    (``city``, ``postalCode``), unlike CDC's ``BillingAddress.City``."""
    answer: dict[str, Any] = {
        "attributes": {
            "type": sobject,
            "url": f"/services/data/v62.0/sobjects/{sobject}/{record_id}",
        }
    }
    for name in fields:
        if name == "Id":
            answer["Id"] = record_id
        elif name in ("LastModifiedDate", "SystemModstamp"):
            answer[name] = _iso(record.get(name))
        elif name in compounds:
            members = {
                child[0].lower() + child[1:]: record.get(f"{name}.{child}")
                for child in compounds[name]
            }
            answer[name] = members if any(v is not None for v in members.values()) else None
        else:
            answer[name] = record.get(name)
    return answer


# ---------------------------------------------------------------------------- gRPC face


class _PubSubService:
    def __init__(self, org: SalesforceOrg) -> None:
        self.org = org

    def _authenticate(self, context: grpc.ServicerContext) -> None:
        metadata = dict(context.invocation_metadata())
        token = metadata.get("accesstoken")
        if (
            self.org.user_of(token if isinstance(token, str) else None) is None
            or metadata.get("tenantid") != ORG_ID
            or not metadata.get("instanceurl")
        ):
            self._abort(
                context, grpc.StatusCode.UNAUTHENTICATED, AUTH_ERROR, "authentication failed"
            )

    @staticmethod
    def _abort(
        context: grpc.ServicerContext, code: grpc.StatusCode, error_code: str, message: str
    ) -> None:
        rpc_id = str(uuid.uuid4())
        context.set_trailing_metadata((("error-code", error_code), ("rpc-id", rpc_id)))
        context.abort(code, f"{message} rpcId: {rpc_id}")

    def get_topic(self, request: pb.TopicRequest, context: grpc.ServicerContext) -> pb.TopicInfo:
        self._authenticate(context)
        topic = self.org.topics.get(request.topic_name)
        if topic is None:
            self._abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                "sfdc.platform.eventbus.grpc.service.topic.not.found",
                f"topic {request.topic_name} not found",
            )
            raise AssertionError("unreachable")
        return pb.TopicInfo(
            topic_name=topic.name,
            tenant_guid=ORG_ID,
            can_publish=False,
            can_subscribe=True,
            schema_id=topic.schema_id,
            rpc_id=str(uuid.uuid4()),
        )

    def get_schema(self, request: pb.SchemaRequest, context: grpc.ServicerContext) -> pb.SchemaInfo:
        self._authenticate(context)
        topic = self.org._schemas.get(request.schema_id)
        if topic is None:
            self._abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                "sfdc.platform.eventbus.grpc.schema.not.found",
                f"schema {request.schema_id} not found",
            )
            raise AssertionError("unreachable")
        return pb.SchemaInfo(
            schema_json=json.dumps(topic.schema),
            schema_id=topic.schema_id,
            rpc_id=str(uuid.uuid4()),
        )

    def subscribe(
        self, requests: Iterator[pb.FetchRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.FetchResponse]:
        self._authenticate(context)
        org = self.org
        first = next(requests, None)
        if first is None:
            return
        topic = org.topics.get(first.topic_name)
        if topic is None:
            self._abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                "sfdc.platform.eventbus.grpc.service.topic.not.found",
                f"topic {first.topic_name} not found",
            )
            return
        preset = pb.ReplayPreset.Name(first.replay_preset)
        with org._lock:
            org.subscriptions.append((topic.name, preset, bytes(first.replay_id)))
            if preset == "EARLIEST":
                position = topic.retention_start
            elif preset == "LATEST":
                position = len(topic.events)
            else:
                known = [r for r, _, _, _ in topic.events]
                replay = bytes(first.replay_id)
                if replay not in known or known.index(replay) < topic.retention_start:
                    position = -1
                else:
                    position = known.index(replay) + 1
        if position < 0:
            self._abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                REPLAY_CORRUPTED,
                "The Replay ID validation failed. Ensure that the Replay ID is valid.",
            )
            return
        credits = [max(0, first.num_requested)]
        generation = org._stream_generation
        with org._lock:
            org.fetch_requests.append(first.num_requested)
            org.max_outstanding = max(org.max_outstanding, credits[0])

        def read_more() -> None:
            try:
                for request in requests:
                    if request.topic_name and request.topic_name != topic.name:
                        continue
                    with org._lock:
                        credits[0] += max(0, request.num_requested)
                        org.fetch_requests.append(request.num_requested)
                        org.max_outstanding = max(org.max_outstanding, credits[0])
                        org._lock.notify_all()
            except grpc.RpcError:
                pass

        reader = threading.Thread(target=read_more, daemon=True)
        reader.start()
        last_sent = time.monotonic()
        while context.is_active():
            if org._stream_generation != generation:
                context.abort(grpc.StatusCode.UNAVAILABLE, "The HTTP/2 server reset the stream.")
            with org._lock:
                ready = position < len(topic.events) and credits[0] > 0
                if not ready:
                    org._lock.wait(0.05)
                    ready = position < len(topic.events) and credits[0] > 0
                if ready:
                    count = min(credits[0], len(topic.events) - position, 100)
                    batch = topic.events[position : position + count]
                    position += count
                    credits[0] -= count
                    response = pb.FetchResponse(
                        events=[
                            pb.ConsumerEvent(
                                event=pb.ProducerEvent(
                                    id=event_id, schema_id=schema_id, payload=payload
                                ),
                                replay_id=replay,
                            )
                            for replay, event_id, payload, schema_id in batch
                        ],
                        latest_replay_id=batch[-1][0],
                        rpc_id=str(uuid.uuid4()),
                        pending_num_requested=credits[0],
                    )
                elif time.monotonic() - last_sent >= org.keepalive_s:
                    latest = topic.events[position - 1][0] if position > 0 else b""
                    response = pb.FetchResponse(
                        latest_replay_id=latest,
                        rpc_id=str(uuid.uuid4()),
                        pending_num_requested=credits[0],
                    )
                else:
                    continue
            last_sent = time.monotonic()
            yield response


# ---------------------------------------------------------------------------- HTTP face


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


_DATA_PATH = re.compile(r"^/services/data/v(\d+\.\d)(/.*)$")
_SOQL = re.compile(
    r"^SELECT (?P<fields>[\w, .]+) FROM (?P<sobject>\w+) "
    r"WHERE SystemModstamp >= (?P<since>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ)$"
)


class _Handler(BaseHTTPRequestHandler):
    server: _HttpServer

    def log_message(self, format: str, *args: Any) -> None:
        return

    def _send(self, status: int, body: Any = None) -> None:
        data = b"" if body is None else json.dumps(body).encode()
        # Recorded before the client can see the answer, so the record keeps the order in
        # which the client saw its answers (a retry is always recorded after its refusal).
        path = urlsplit(self.path).path
        self.server.org.rest_requests.append((self.command, path, status))
        self.server.org.rest_request_times.append(time.monotonic())
        self.send_response(status)
        if data:
            self.send_header("Content-Type", "application/json;charset=UTF-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        return raw

    def do_POST(self) -> None:
        if urlsplit(self.path).path != "/services/oauth2/token":
            self._send(
                404,
                [{"message": "The requested resource does not exist", "errorCode": "NOT_FOUND"}],
            )
            return
        form = {k: v[0] for k, v in parse_qs(self._body().decode()).items()}
        self._token(form)

    def _token(self, form: dict[str, str]) -> None:
        org = self.server.org
        grant = form.get("grant_type", "")
        org.token_requests.append(grant)
        if grant == "client_credentials":
            if (
                form.get("client_id") != org.client_id
                or form.get("client_secret") != org.client_secret
            ):
                self._send(
                    400,
                    {"error": "invalid_client", "error_description": "invalid client credentials"},
                )
                return
        elif grant == "urn:ietf:params:oauth:grant-type:jwt-bearer":
            problem = self._check_jwt(form.get("assertion", ""))
            if problem is not None:
                self._send(400, {"error": "invalid_grant", "error_description": problem})
                return
        else:
            self._send(
                400,
                {
                    "error": "unsupported_grant_type",
                    "error_description": "grant type not supported",
                },
            )
            return
        token = org.issue_token(INTEGRATION_USER_ID)
        self._send(
            200,
            {
                "access_token": token,
                "instance_url": org.instance_url,
                "id": f"{org.login_url}/id/{ORG_ID}/{INTEGRATION_USER_ID}",
                "token_type": "Bearer",
                "issued_at": str(int(time.time() * 1000)),
                "signature": base64.b64encode(hashlib.sha256(token.encode()).digest()).decode(),
            },
        )

    def _check_jwt(self, assertion: str) -> str | None:
        org = self.server.org
        parts = assertion.split(".")
        if len(parts) != 3 or org.jwt_public_key is None:
            return "invalid assertion"
        try:
            header = json.loads(_b64url_decode(parts[0]))
            claims = json.loads(_b64url_decode(parts[1]))
            org.jwt_public_key.verify(
                _b64url_decode(parts[2]),
                f"{parts[0]}.{parts[1]}".encode(),
                padding.PKCS1v15(),
                hashes.SHA256(),
            )
        except (ValueError, InvalidSignature):
            return "invalid assertion"
        if header.get("alg") != "RS256":
            return "invalid assertion"
        if claims.get("iss") != org.client_id:
            return "invalid client_id"
        if claims.get("sub") != org.jwt_username:
            return "user hasn't approved this consumer"
        if claims.get("aud") != org.login_url:
            return "audience is invalid"
        exp = claims.get("exp")
        if not isinstance(exp, int) or exp < time.time() or exp > time.time() + 300:
            return "expired authorization code"
        return None

    def _session_user(self) -> str | None:
        header = self.headers.get("Authorization", "")
        token = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else None
        return self.server.org.user_of(token)

    def _data_request(self) -> tuple[str, str] | None:
        """``(api version, rest of path)``, after the session and fault checks."""
        org = self.server.org
        match = _DATA_PATH.match(urlsplit(self.path).path)
        if match is None:
            self._send(
                404,
                [{"message": "The requested resource does not exist", "errorCode": "NOT_FOUND"}],
            )
            return None
        if self._session_user() is None:
            self._send(
                401, [{"message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID"}]
            )
            return None
        fault = org._take_fault()
        if fault is not None:
            self._send(fault.status, [{"message": fault.message, "errorCode": fault.error_code}])
            return None
        return match.group(1), match.group(2)

    def _client_option(self) -> str | None:
        options = self.headers.get("Sforce-Call-Options", "")
        for part in options.split(","):
            name, _, value = part.strip().partition("=")
            if name == "client" and value:
                return value
        return None

    def do_PATCH(self) -> None:
        found = self._data_request()
        if found is None:
            return
        _, rest = found
        org = self.server.org
        user = self._session_user() or ""
        try:
            body = json.loads(self._body() or b"null")
        except ValueError:
            self._send(400, [{"message": "malformed JSON", "errorCode": "JSON_PARSER_ERROR"}])
            return
        client = self._client_option()
        if rest == "/composite/sobjects":
            records = body.get("records") if isinstance(body, dict) else None
            if not isinstance(records, list) or not records or len(records) > COLLECTION_LIMIT:
                self._send(
                    400,
                    [
                        {
                            "message": "records: between 1 and 200 expected",
                            "errorCode": "INVALID_API_INPUT",
                        }
                    ],
                )
                return
            results = []
            for item in records:
                fields = {k: v for k, v in item.items() if k not in ("attributes", "id")}
                sobject = (item.get("attributes") or {}).get("type", "")
                error = org.write(sobject, str(item.get("id")), fields, client=client, user=user)
                if error is None:
                    results.append({"id": item.get("id"), "success": True, "errors": []})
                else:
                    results.append(
                        {
                            "success": False,
                            "errors": [
                                {
                                    "statusCode": error,
                                    "message": _record_message(error),
                                    "fields": list(org.refused_fields(str(item.get("id")))),
                                }
                            ],
                        }
                    )
            self._send(200, results)
            return
        match = re.match(r"^/sobjects/(\w+)/(\w+)$", rest)
        if match is None or not isinstance(body, dict):
            self._send(
                404,
                [{"message": "The requested resource does not exist", "errorCode": "NOT_FOUND"}],
            )
            return
        error = org.write(match.group(1), match.group(2), body, client=client, user=user)
        if error is None:
            self._send(204)
        elif error in ("ENTITY_IS_DELETED", "INVALID_CROSS_REFERENCE_KEY"):
            code = "ENTITY_IS_DELETED" if error == "ENTITY_IS_DELETED" else "NOT_FOUND"
            self._send(404, [{"message": _record_message(code), "errorCode": code}])
        else:
            self._send(400, [{"message": _record_message(error), "errorCode": error}])

    def do_GET(self) -> None:
        found = self._data_request()
        if found is None:
            return
        _, rest = found
        org = self.server.org
        query = {k: v[0] for k, v in parse_qs(urlsplit(self.path).query).items()}
        match = re.match(r"^/composite/sobjects/(\w+)$", rest)
        if match is not None:
            ids = [i for i in query.get("ids", "").split(",") if i]
            fields = [f for f in query.get("fields", "").split(",") if f]
            if not ids or not fields or len(ids) > 2000:
                self._send(
                    400,
                    [{"message": "ids and fields are required", "errorCode": "INVALID_API_INPUT"}],
                )
                return
            self._send(200, [org.read(match.group(1), record_id, fields) for record_id in ids])
            return
        if rest == "/query":
            soql = _SOQL.match(query.get("q", ""))
            if soql is None:
                self._send(400, [{"message": "unsupported query", "errorCode": "MALFORMED_QUERY"}])
                return
            since = datetime.strptime(soql.group("since"), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
            fields = [f.strip() for f in soql.group("fields").split(",")]
            records = org.changed_since(
                soql.group("sobject"), int(since.timestamp() * 1000), fields
            )
            self._send(200, {"totalSize": len(records), "done": True, "records": records})
            return
        self._send(
            404, [{"message": "The requested resource does not exist", "errorCode": "NOT_FOUND"}]
        )


def _record_message(code: str) -> str:
    return {
        "ENTITY_IS_DELETED": "entity is deleted",
        "NOT_FOUND": "The requested resource does not exist",
        "INVALID_CROSS_REFERENCE_KEY": "invalid cross reference id",
        "INVALID_FIELD": "No such column on entity",
    }.get(code, code)


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, org: SalesforceOrg) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.org = org


# ---------------------------------------------------------------------------- the server


class SalesforceProtocolServer:
    """The org behind a local HTTP port (OAuth + REST) and a local gRPC port (Pub/Sub API)."""

    def __init__(self, org: SalesforceOrg | None = None) -> None:
        self.org = org or SalesforceOrg()
        self._http = _HttpServer(self.org)
        self._http_thread = threading.Thread(target=self._http.serve_forever, daemon=True)
        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        service = _PubSubService(self.org)
        handler = grpc.method_handlers_generic_handler(
            "eventbus.v1.PubSub",
            {
                "GetTopic": grpc.unary_unary_rpc_method_handler(
                    service.get_topic,
                    request_deserializer=pb.TopicRequest.FromString,
                    response_serializer=pb.TopicInfo.SerializeToString,
                ),
                "GetSchema": grpc.unary_unary_rpc_method_handler(
                    service.get_schema,
                    request_deserializer=pb.SchemaRequest.FromString,
                    response_serializer=pb.SchemaInfo.SerializeToString,
                ),
                "Subscribe": grpc.stream_stream_rpc_method_handler(
                    service.subscribe,
                    request_deserializer=pb.FetchRequest.FromString,
                    response_serializer=pb.FetchResponse.SerializeToString,
                ),
            },
        )
        self._grpc.add_generic_rpc_handlers((handler,))
        self.grpc_port = self._grpc.add_insecure_port("127.0.0.1:0")
        self.url = f"http://127.0.0.1:{self._http.server_address[1]}"
        self.org.instance_url = self.url
        self.org.login_url = self.url

    @property
    def pubsub_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self) -> SalesforceProtocolServer:
        self._http_thread.start()
        self._grpc.start()
        return self

    def stop(self) -> None:
        self._grpc.stop(grace=0.5).wait(5)
        self._http.shutdown()
        self._http.server_close()

    def __enter__(self) -> SalesforceProtocolServer:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
