"""One typed settings tree for every Sluiceway process.

Sources, highest priority first:

1. keyword arguments passed to :func:`load_settings` (the CLI's flags),
2. environment variables with the prefix ``SLUICEWAY_`` and ``__`` between levels
   (``SLUICEWAY_KAFKA__BOOTSTRAP_SERVERS``),
3. an optional YAML file named by ``SLUICEWAY_CONFIG`` or ``--config``,
4. the defaults below: endpoints on loopback, and no models (a deployment names the models it
   serves; the demo's come from ``devkit/demo/settings.yaml``).

Only what a running process needs is here: the local stack's own settings (ports, versions,
where it installs) live in the development wing (``devkit/settings.py``).

Secrets are :class:`~pydantic.SecretStr` and :meth:`Settings.as_dict` masks them unless asked
not to, so printing settings never leaks a password.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from pipeline.privacy import decode_key
from schemas.errors import SluicewayError

CONFIG_ENV_VAR = "SLUICEWAY_CONFIG"


class SettingsError(SluicewayError):
    """The settings could not be read; the message names the file or the setting."""


class SettingsSection(BaseModel):
    """One section of the tree: unknown names refused (a typo is an error, not a default),
    values frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


_SASL_PROTOCOLS = frozenset({"SASL_PLAINTEXT", "SASL_SSL"})
_TLS_PROTOCOLS = frozenset({"SSL", "SASL_SSL"})
_PASSWORD_MECHANISMS = frozenset({"PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"})
_LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
# RFC 6749 section 3.3: scope tokens are printable ASCII without space, '"' or '\\'.
_SCOPE = re.compile(r"^[\x21\x23-\x5b\x5d-\x7e]+( [\x21\x23-\x5b\x5d-\x7e]+)*$")
# RFC 6749 appendix A.1: a client id is printable ASCII (space included).
_CLIENT_ID = re.compile(r"^[\x20-\x7e]+$")
_TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class KafkaSettings(SettingsSection):
    """How every Kafka client of the product connects and authenticates.

    One process, one principal: SASL PLAIN/SCRAM (``sasl_username``/``sasl_password``), a
    client certificate over TLS (mTLS: ``ssl_certificate_location``/``ssl_key_location``), or
    OAUTHBEARER, with tokens either from an OIDC token endpoint (client credentials grant) or
    from a file that something else keeps fresh (``oauth_token_file``, such as a projected
    Kubernetes service-account token). An inconsistent combination is refused when the
    settings load, with one line saying what is wrong, rather than by the broker much later.
    """

    bootstrap_servers: str = "127.0.0.1:9092"
    """Comma-separated ``host:port`` list of brokers."""
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_ca_location: Path | None = None
    """CA (PEM) that signed the brokers' certificates; also trusted for an https token endpoint.
    ``None``: the system's trust store."""
    ssl_certificate_location: Path | None = None
    """Client certificate (PEM) for mTLS; the broker maps its subject to the principal."""
    ssl_key_location: Path | None = None
    """Private key (PEM) of ``ssl_certificate_location``."""
    ssl_key_password: SecretStr | None = None
    """Password of ``ssl_key_location`` if the key is encrypted."""
    oauth_token_endpoint_url: str | None = None
    """OIDC token endpoint: OAUTHBEARER tokens come from the client credentials grant."""
    oauth_client_id: str | None = None
    oauth_client_secret: SecretStr | None = None
    oauth_scope: str | None = None
    """Space-separated scopes asked for with each token; ``None``: the endpoint's default."""
    oauth_token_file: Path | None = None
    """OAUTHBEARER without a token endpoint: a JWT read from this file whenever a token is
    needed, so whoever writes the file (a token projector, a test) controls its rotation."""
    client_id: str = "sluiceway"
    replication_factor: int | None = Field(default=None, ge=1)
    """Replicas of each topic the product creates; ``None``: the cluster's default
    replication factor, at least ``min(3, brokers)``."""
    min_insync_replicas: int | None = Field(default=None, ge=1)
    """``min.insync.replicas`` of each topic the product creates; ``None``: a majority of the
    replicas where there are at least 3, else the broker's default."""

    @model_validator(mode="after")
    def _consistent(self) -> KafkaSettings:
        problem = security_problem(self)
        if problem is not None:
            raise ValueError(problem)
        return self

    def uses_tls(self) -> bool:
        return self.security_protocol in _TLS_PROTOCOLS

    def client_config(self) -> dict[str, str | int | float | bool]:
        """Return the librdkafka configuration shared by every producer, consumer and admin.

        With ``oauth_token_file`` the token itself comes from a callback, which
        ``pipeline.kafka.clients`` adds (librdkafka has no setting that reads a token file).
        """
        config: dict[str, str | int | float | bool] = {
            "bootstrap.servers": self.bootstrap_servers,
            "security.protocol": self.security_protocol,
            "client.id": self.client_id,
        }
        if self.sasl_mechanism is not None:
            config["sasl.mechanism"] = self.sasl_mechanism
        if self.sasl_username is not None:
            config["sasl.username"] = self.sasl_username
        if self.sasl_password is not None:
            config["sasl.password"] = self.sasl_password.get_secret_value()
        if self.ssl_ca_location is not None:
            config["ssl.ca.location"] = str(self.ssl_ca_location)
        if self.ssl_certificate_location is not None:
            config["ssl.certificate.location"] = str(self.ssl_certificate_location)
        if self.ssl_key_location is not None:
            config["ssl.key.location"] = str(self.ssl_key_location)
        if self.ssl_key_password is not None:
            config["ssl.key.password"] = self.ssl_key_password.get_secret_value()
        if self.oauth_token_endpoint_url is not None:
            config["sasl.oauthbearer.method"] = "oidc"
            config["sasl.oauthbearer.token.endpoint.url"] = self.oauth_token_endpoint_url
            if self.oauth_client_id is not None:
                config["sasl.oauthbearer.client.id"] = self.oauth_client_id
            if self.oauth_client_secret is not None:
                secret = self.oauth_client_secret.get_secret_value()
                config["sasl.oauthbearer.client.secret"] = secret
            if self.oauth_scope is not None:
                config["sasl.oauthbearer.scope"] = self.oauth_scope
            if self.ssl_ca_location is not None:
                # librdkafka verifies the token endpoint with its own trust setting.
                config["https.ca.location"] = str(self.ssl_ca_location)
        return config


def security_problem(kafka: KafkaSettings) -> str | None:
    """What is inconsistent about the security settings, in one line; ``None`` if nothing.

    Pure apart from checking that the named files exist (a typo surfaces at load, not as a
    handshake failure minutes later in some other process).
    """
    protocol, mechanism = kafka.security_protocol, kafka.sasl_mechanism
    sasl = protocol in _SASL_PROTOCOLS
    if sasl and mechanism is None:
        return f"security_protocol {protocol} needs a sasl_mechanism"
    if not sasl and mechanism is not None:
        return (
            f"sasl_mechanism {mechanism} needs security_protocol SASL_SSL or SASL_PLAINTEXT,"
            f" not {protocol}"
        )
    password_auth = mechanism in _PASSWORD_MECHANISMS
    if password_auth and (kafka.sasl_username is None or kafka.sasl_password is None):
        return f"sasl_mechanism {mechanism} needs sasl_username and sasl_password"
    if not password_auth and (kafka.sasl_username is not None or kafka.sasl_password is not None):
        return "sasl_username/sasl_password are used only by PLAIN and SCRAM sasl_mechanism"
    problem = _oauth_problem(kafka)
    if problem is not None:
        return problem
    return _tls_problem(kafka)


def _oauth_problem(kafka: KafkaSettings) -> str | None:
    oidc = {
        "oauth_token_endpoint_url": kafka.oauth_token_endpoint_url,
        "oauth_client_id": kafka.oauth_client_id,
        "oauth_client_secret": kafka.oauth_client_secret,
        "oauth_scope": kafka.oauth_scope,
    }
    given = [name for name, value in oidc.items() if value is not None]
    if kafka.oauth_token_file is not None:
        given.append("oauth_token_file")
    if kafka.sasl_mechanism != "OAUTHBEARER":
        if given:
            return f"{given[0]} is used only with sasl_mechanism OAUTHBEARER"
        return None
    endpoint = kafka.oauth_token_endpoint_url
    if endpoint is None and kafka.oauth_token_file is None:
        return "sasl_mechanism OAUTHBEARER needs oauth_token_endpoint_url (or oauth_token_file)"
    if endpoint is not None and kafka.oauth_token_file is not None:
        return "oauth_token_endpoint_url and oauth_token_file are alternatives: set one"
    if kafka.oauth_token_file is not None:
        extra = [name for name in given if name != "oauth_token_file"]
        if extra:
            return f"{extra[0]} is used only with oauth_token_endpoint_url, not oauth_token_file"
        return _file_problem("oauth_token_file", kafka.oauth_token_file)
    assert endpoint is not None
    problem = _endpoint_problem(endpoint)
    if problem is not None:
        return problem
    if kafka.oauth_client_id is None or kafka.oauth_client_secret is None:
        return "oauth_token_endpoint_url needs oauth_client_id and oauth_client_secret"
    if not _CLIENT_ID.fullmatch(kafka.oauth_client_id):
        return "oauth_client_id must be printable ASCII"
    if kafka.oauth_scope is not None and not _SCOPE.fullmatch(kafka.oauth_scope):
        return "oauth_scope must be space-separated scope tokens (printable ASCII, no quotes)"
    return None


def _endpoint_problem(url: str) -> str | None:
    """A client secret goes to this URL: https, or http only to this machine."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018  (raises on a malformed port)
    except ValueError:
        return f"oauth_token_endpoint_url is not a URL: {url!r}"
    if parts.scheme not in ("https", "http") or not host:
        return f"oauth_token_endpoint_url must be an https:// URL, got {url!r}"
    if parts.username is not None or parts.password is not None:
        return "oauth_token_endpoint_url must not hold credentials (use oauth_client_secret)"
    if any(ord(char) < 0x21 or ord(char) == 0x7F for char in url):
        return "oauth_token_endpoint_url must not contain spaces or control characters"
    if parts.scheme == "http" and host not in _LOOPBACK_HOSTS:
        return (
            "oauth_token_endpoint_url must be https:// (plain http only to localhost):"
            f" the client secret would cross the network in clear, got {url!r}"
        )
    return None


def _tls_problem(kafka: KafkaSettings) -> str | None:
    files = {
        "ssl_ca_location": kafka.ssl_ca_location,
        "ssl_certificate_location": kafka.ssl_certificate_location,
        "ssl_key_location": kafka.ssl_key_location,
    }
    given = [name for name, value in files.items() if value is not None]
    if kafka.ssl_key_password is not None:
        given.append("ssl_key_password")
    # A CA alone still has a use without TLS to the brokers: verifying the token endpoint.
    ca_for_endpoint = given == ["ssl_ca_location"] and kafka.oauth_token_endpoint_url is not None
    if given and not kafka.uses_tls() and not ca_for_endpoint:
        return f"{given[0]} needs security_protocol SSL or SASL_SSL, not {kafka.security_protocol}"
    if (kafka.ssl_certificate_location is None) != (kafka.ssl_key_location is None):
        return "ssl_certificate_location and ssl_key_location go together (mTLS): set both"
    if kafka.ssl_key_password is not None and kafka.ssl_key_location is None:
        return "ssl_key_password needs ssl_key_location"
    for name, path in files.items():
        if path is not None:
            problem = _file_problem(name, path)
            if problem is not None:
                return problem
    return None


def _file_problem(name: str, path: Path) -> str | None:
    if not path.is_file():
        return f"{name} {str(path)!r} is not a file"
    return None


DEVELOPMENT_SECRET = "sluiceway-dev-secret"  # noqa: S105 (public on purpose: refused off loopback)
"""The object store's default secret: known to everyone who read this file, so it is good for
the local stack only (see :func:`development_secret_refusal`)."""


def endpoint_host(endpoint: str) -> str | None:
    """The host an HTTP client would connect to for ``host:port`` (lower-cased, IPv6 without
    brackets), or ``None`` when ``endpoint`` is more than a host and port (user info, a path,
    a query): such a string is never trusted to mean a particular host."""
    text = endpoint.strip()
    parts = urlsplit(f"//{text}")
    if parts.netloc != text or parts.username is not None or parts.password is not None:
        return None
    try:
        parts.port  # noqa: B018 (raises on a port that is not a number)
    except ValueError:
        return None
    return parts.hostname


def is_loopback_host(host: str | None) -> bool:
    """Whether ``host`` names this machine's loopback interface by its text alone.

    Only ``localhost`` and literal loopback addresses count: a name that merely resolves to
    loopback today (``/etc/hosts``, DNS) may resolve elsewhere tomorrow, so it counts as remote.
    """
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def development_secret_refusal(endpoint: str, secret: str) -> str | None:
    """Why these object-store settings must not start a process, or ``None`` when they may.

    The development secret is fine for the local stack, which listens on loopback only; an
    endpoint anywhere else is a shared deployment, where that secret opens every object.
    """
    if secret != DEVELOPMENT_SECRET or is_loopback_host(endpoint_host(endpoint)):
        return None
    return (
        f"object_store.secret_key is the development secret, which is refused for "
        f"{endpoint!r} (not a loopback endpoint): set SLUICEWAY_OBJECT_STORE__SECRET_KEY "
        "to the deployment's credential"
    )


class ObjectStoreSettings(SettingsSection):
    endpoint: str = "127.0.0.1:9000"
    """``host:port`` of the S3 API, without a scheme (``secure`` decides http or https)."""
    access_key: str = "sluiceway"
    secret_key: SecretStr = SecretStr(DEVELOPMENT_SECRET)
    """Refused with any endpoint outside loopback while it is the development secret."""
    secure: bool = False
    ca_location: Path | None = None
    """PEM bundle of the CAs that may sign the store's certificate (the secured local stack's
    ``<state_dir>/secrets/ca.pem``); ``None``: the system's trust store. Needs ``secure``."""
    region: str = "us-east-1"
    bucket: str = "sluiceway-results"

    @model_validator(mode="after")
    def _refuse_unsafe(self) -> ObjectStoreSettings:
        refusal = development_secret_refusal(self.endpoint, self.secret_key.get_secret_value())
        if refusal is not None:
            raise ValueError(refusal)
        if self.ca_location is not None and not self.secure:
            raise ValueError("object_store.ca_location is set but secure is false (plain http)")
        return self


class TritonSettings(SettingsSection):
    grpc_url: str = "127.0.0.1:8001"
    http_url: str = "127.0.0.1:8000"
    protocol: Literal["grpc", "http"] = "grpc"
    timeout_s: float = Field(default=10.0, gt=0)
    """The longest a call may take (a request's nearer deadline shortens it)."""
    timeout_floor_s: float = Field(default=0.05, ge=0)
    """The shortest a call is given, however little of its deadline is left."""


class VllmSettings(SettingsSection):
    base_url: str = "http://127.0.0.1:8080/v1"
    api_key: SecretStr | None = None
    max_concurrency: int = Field(default=32, ge=1)
    timeout_s: float = Field(default=60.0, gt=0)
    """The longest a request may take (a nearer deadline shortens it)."""
    timeout_floor_s: float = Field(default=0.05, ge=0)
    """The shortest a request is given, however little of its deadline is left."""


class BackendSettings(SettingsSection):
    triton: TritonSettings = TritonSettings()
    vllm: VllmSettings = VllmSettings()


class ModelSettings(SettingsSection):
    """How one model is served: which backend, and how a request becomes backend inputs."""

    backend: Literal["triton", "vllm"] = "triton"
    default_version: str | None = None
    """Serving version until a control event says otherwise; ``None`` lets Triton pick."""
    input_name: str = "x"
    """The Triton input tensor that a feature record is packed into (one FP32 row)."""
    feature_order: tuple[str, ...] = ()
    """Feature names in the order of the input tensor's columns."""
    explains: bool = False
    """Triton only: the model has an ``attributions`` output (one value per feature, in
    ``feature_order``). It is asked for only when a request in the batch wants an explanation,
    so the model computes it for whole batches and never for nobody."""
    echo_features: bool = False
    """Copy each request's feature record into its result (``input_features``), so the drift
    monitor sees inputs next to predictions without joining the requests topic."""
    served_names: dict[str, str] = Field(default_factory=dict)
    """vLLM only: version -> the name the server serves it under (``--served-model-name``,
    a LoRA adapter); a version not listed is sent as the model's own name."""
    pii: dict[str, Literal["drop", "hash", "mask"]] = Field(default_factory=dict)
    """Personal data policy: feature name -> what everything leaving the worker carries of
    its value (echoed ``input_features``, attributions, error text; the backend still gets
    the real value). ``drop``: left out; ``hash``: keyed HMAC-SHA256 under
    ``workers.pii_hash_key`` (stable, so joins work); ``mask``: the fixed marker
    ``<masked>``. No PII feature's attribution leaves (it gives the value back). Keys must be
    names in ``feature_order``; a model with a policy needs ``workers.dead_letter_original``
    other than ``keep`` (``docs/worker.md``, "Personal data")."""
    payload_log_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    """Share of served requests whose request/response pair is logged to ``payload_log_sink``
    (``pipeline/payload_log.py``); chosen by a hash of the request id, so the same requests
    are logged on every worker and every retry. 0: none."""
    payload_log_sink: str | None = Field(
        default=None,
        pattern=r"^(topic:[A-Za-z0-9._-]{1,200}|prefix:/*[A-Za-z0-9._-][A-Za-z0-9._/-]{0,199})$",
    )
    """``topic:<name>`` (a topic that exists) or ``prefix:<key prefix>`` (objects in the
    object store's bucket); the pairs carry features as the ``pii`` policy lets them leave."""

    @model_validator(mode="after")
    def _pii_names_declared_features(self) -> ModelSettings:
        # A misspelt name would silently protect nothing.
        unknown = sorted(set(self.pii) - set(self.feature_order))
        if unknown:
            raise ValueError(f"pii names features not in feature_order: {unknown}")
        return self


class WorkerSettings(SettingsSection):
    max_batch_size: int = Field(default=64, ge=1)
    max_wait_ms: float = Field(default=5.0, ge=0)
    max_in_flight_batches: int = Field(default=4, ge=1)
    """Concurrent backend calls per backend endpoint."""
    max_in_flight_partial_batches: int | None = Field(default=None, ge=1)
    """Of those, how many may hold a real-time batch that is not full (sent because its oldest
    record waited ``max_wait_ms``); ``None``: no separate limit. A lower limit makes records
    gather into fuller batches under rising load, which saves the worker CPU per record but
    makes each record wait for the call before it: on this 2-core machine 1 raised p99 at
    4,300 req/s (``benchmarks/bench_worker_latency.py``), so it is off by default. It may pay
    off where the worker's CPU, not latency, is what runs out."""
    max_in_flight_records: int = Field(default=4096, ge=1)
    """Consumed records without an acknowledged outcome; above it, partitions pause."""
    max_in_flight_bulk_records: int = Field(default=512, ge=1)
    """Of those, how many may come from batch-job topics: enough to keep the backend busy,
    few enough that real-time requests never queue behind a batch job's backlog."""
    realtime_reserved_batches: int = Field(default=1, ge=0)
    """Backend call slots (of ``max_in_flight_batches``) that batches holding only batch-job
    records may not take while no real-time traffic flows, so the first real-time request
    after a quiet spell never waits for a bulk call to finish (0 gives a batch job alone every
    slot, and the real-time p99 beside a batch job suffers: ``docs/worker.md``); while
    real-time traffic flows, ``bulk_batches_beside_realtime`` applies instead."""
    realtime_latency_target_ms: float = Field(default=30.0, gt=0)
    """While real-time requests keep arriving, batch-job work is paced so that about 99 % of
    them take no longer than this from publish to outcome (``pipeline/batching/governor.py``).
    Set it above what real-time requests take with no batch job running (a large GPU model
    may need 100 ms or more), or batch jobs barely move while real-time traffic flows."""
    bulk_batches_beside_realtime: int = Field(default=1, ge=1)
    """While real-time requests keep arriving, batches holding only batch-job records get at
    most this many backend calls in flight: the worker's CPU, not only the backend, then
    goes to real-time traffic first, and a batch job runs on what is left."""
    max_message_bytes: int = Field(default=1_000_000, ge=1024)
    processes: int | None = Field(default=None, ge=1)
    """Worker processes ``sluiceway worker`` runs under one supervisor, each a member of every
    served model's consumer group (``--processes`` overrides it); ``None``: one per core. One
    process runs one event loop, so it uses about one core."""
    commit_interval_ms: float = Field(default=500.0, gt=0)
    drain_timeout_s: float = Field(default=30.0, gt=0)
    exactly_once: bool = False
    """Transactional producer and offsets sent in the transaction (read-committed results)."""
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    """``/metrics``, ``/healthz`` and ``/readyz`` on this port; ``None``: not served."""
    metrics_address: str = "127.0.0.1"
    """Address the metrics port binds; ``0.0.0.0`` in a pod, so Prometheus and the kubelet's
    probes reach it."""
    worker_id: str | None = None
    group_instance_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._-]{1,249}$")
    """Static group membership (``group.instance.id``): a member that restarts under the same
    id within ``session.timeout.ms`` gets its partitions back without a rebalance. Unique per
    process among a group's members (the Helm chart gives each pod its own name)."""
    reply_to_patterns: tuple[str, ...] = ("{namespace}.replies.*",)
    """Topics a request's ``reply_to`` may name: ``*`` stands for one or more of Kafka's topic
    characters, ``{namespace}`` for the namespace. Anything else is answered ``rejected`` on
    the results topic and nothing is written where it points (the SDK's reply topics are
    ``<ns>.replies.<client>``)."""
    version_pattern: str = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
    """A pinned ``model_version`` the backend cannot confirm must at least match this; one the
    backend lists as unknown is refused either way."""
    dead_letter_inline_bytes: int = Field(default=256 * 1024, ge=1024)
    """An original value larger than this is stored in the object store and the dead letter
    points at it (``original_ref``), so a letter always fits the broker's message limit."""
    signature_refresh_s: float = Field(default=30.0, gt=0)
    """How often the worker asks each backend again what its models take and which versions
    it has (a newly loaded version is accepted after at most this long)."""
    pii_hash_key: SecretStr | None = None
    """Key of the HMAC-SHA256 that ``models.<m>.pii: hash`` features are hashed with (any
    long random text, e.g. ``openssl rand -base64 32``); required when a model hashes."""
    dead_letter_original: Literal["keep", "encrypt", "drop"] = "keep"
    """What a dead letter carries of the original value (inline or offloaded to the object
    store): ``keep`` the bytes, ``encrypt`` them (AES-GCM under ``dead_letter_key``, key id
    recorded; ``sluiceway dlq open`` decrypts), or ``drop`` them. A worker serving a model
    with a ``pii`` policy refuses to start with ``keep``."""
    dead_letter_key: SecretStr | None = None
    """Base64 AES key (16, 24 or 32 bytes: ``openssl rand -base64 32``) that encrypts dead
    letters' originals; required by ``dead_letter_original: encrypt``."""
    dead_letter_retired_keys: tuple[SecretStr, ...] = ()
    """Earlier ``dead_letter_key`` values, kept only so ``sluiceway dlq open`` can still
    decrypt letters sealed before a key rotation."""

    @model_validator(mode="after")
    def _dead_letter_keys_are_aes_keys(self) -> WorkerSettings:
        # Checked on the whole section, so a bad key is never quoted back in the error.
        named = [("dead_letter_key", self.dead_letter_key)] if self.dead_letter_key else []
        named += [("dead_letter_retired_keys", key) for key in self.dead_letter_retired_keys]
        for name, key in named:
            try:
                decode_key(key.get_secret_value())
            except ValueError as problem:
                raise ValueError(f"{name} {problem}") from None
        if self.dead_letter_original == "encrypt" and self.dead_letter_key is None:
            raise ValueError("dead_letter_original 'encrypt' needs dead_letter_key")
        return self


class MonitorSettings(SettingsSection):
    """The drift and quality monitor: windows, thresholds, and when to roll back."""

    window_s: float = Field(default=30.0, gt=0)
    """Tumbling window length (event time of the results)."""
    min_window_count: int = Field(default=200, ge=1)
    """A window with fewer results is reported but neither breaches nor counts as clean."""
    consecutive_windows: int = Field(default=2, ge=1)
    recovery_windows: int = Field(default=2, ge=1)
    """Clean windows in a row before an alerting version is healthy again (hysteresis)."""
    cooldown_s: float = Field(default=300.0, ge=0)
    psi_threshold: float = Field(default=0.2, gt=0)
    ks_threshold: float = Field(default=0.2, gt=0, le=1)
    chi2_alpha: float = Field(default=1e-4, gt=0, lt=1)
    cramers_v_threshold: float = Field(default=0.1, gt=0, le=1)
    error_rate_threshold: float = Field(default=0.05, ge=0, le=1)
    expired_rate_threshold: float = Field(default=0.05, ge=0, le=1)
    low_confidence_margin: float = Field(default=0.1, ge=0, le=0.5)
    low_confidence_rate_threshold: float = Field(default=0.5, ge=0, le=1)
    latency_p99_ms_threshold: float = Field(default=2000.0, gt=0)
    log_loss_threshold: float = Field(default=0.45, gt=0)
    min_labels: int = Field(default=50, ge=1)
    label_ttl_s: float = Field(default=3600.0, gt=0)
    """How long a result's score is kept waiting for its ground-truth label."""
    score_output: str = "score"
    """The output tensor holding the predicted probability."""
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    """``/metrics``, ``/healthz`` and ``/readyz`` on this port; ``None``: not served."""
    metrics_address: str = "127.0.0.1"
    """Address the metrics port binds (``0.0.0.0`` in a pod)."""
    reference_dir: Path | None = None
    """A folder holding ``<model>/reference_sample.npz`` (``sluiceway model train`` writes them
    into the model repository): a model's reference is published from it to the object store
    when the store has none. ``None``: the store must have it."""
    state_dir: Path = Path(".sluiceway/faust")
    """Where the monitor's faust app keeps its local table state."""


class BatchSettings(SettingsSection):
    """Bulk batch jobs: how the runner publishes a file and gathers its results."""

    completion_window_s: float = Field(default=86_400.0, gt=0)
    """A job not finished this long after submission expires; its open records say so."""
    chunk_records: int = Field(default=2_000, ge=1)
    """Records published per Kafka transaction (one progress checkpoint each)."""
    max_outstanding: int = Field(default=20_000, ge=1)
    """Records published but not yet answered; the runner waits before publishing more, so
    cancelling or expiring a job stops work within about this many records."""
    max_records: int = Field(default=10_000_000, ge=1)
    max_record_bytes: int = Field(default=256 * 1024, ge=256)
    """Largest input record (a JSONL/CSV line, or a Parquet/Avro row as JSON)."""
    max_input_bytes: int = Field(default=20 * 1024**3, ge=1024)
    finish_grace_s: float = Field(default=30.0, ge=0)
    """After a cancel or the deadline, how long in-flight records may still answer."""
    progress_interval_s: float = Field(default=2.0, gt=0)
    """How often the runner writes its counts to the manifest (what ``batch status`` shows)."""
    runner_niceness: int = Field(default=10, ge=0, le=19)
    """``sluiceway batch run`` lowers its own CPU priority by this much (``nice``)."""
    poll_interval_s: float = Field(default=2.0, gt=0)
    """How often ``batch run --follow`` looks for newly submitted jobs."""
    prefix: str = Field(default="batch", pattern=r"^[A-Za-z0-9._-]+$")
    """Object-store folder holding one sub-folder per job (input, manifest, outputs)."""


class TenantSettings(SettingsSection):
    """One tenant of ``sluiceway api``: its bearer keys and its limits."""

    api_keys: tuple[SecretStr, ...] = ()
    """Bearer keys that act as this tenant (several, so a key can be rotated)."""
    max_enqueued_records: int = Field(default=1_000_000, ge=1)
    """Records of the tenant's unfinished batches together; a batch beyond it gets 429."""
    max_file_bytes: int = Field(default=200 * 1024**2, ge=1024)
    """Largest file the tenant may upload; a larger one gets 429."""


class ApiSettings(SettingsSection):
    """``sluiceway api``: the OpenAI-compatible Batch and Files API (docs/api.md)."""

    host: str = "127.0.0.1"
    port: int = Field(default=8090, ge=1, le=65535)
    tenants: dict[str, TenantSettings] = Field(default_factory=dict)
    """Tenant name (a path segment: letters, digits, ``._-``) -> its keys and limits."""
    prefix: str = Field(default="api", pattern=r"^[A-Za-z0-9._-]+$")
    """Object-store folder holding the uploaded files and idempotency records."""
    max_files_listed: int = Field(default=10_000, ge=1)
    """``GET /v1/files`` reads at most this many of a tenant's files (in id order, so a tenant
    with more sees an arbitrary part of them) before sorting and paging."""

    @field_validator("tenants")
    @classmethod
    def _tenant_names_are_path_segments(
        cls, tenants: dict[str, TenantSettings]
    ) -> dict[str, TenantSettings]:
        keys: set[str] = set()
        for name, tenant in tenants.items():
            if not _TENANT_NAME.fullmatch(name):
                raise ValueError(f"tenant name {name!r}: use letters, digits, '.', '_' or '-'")
            for key in tenant.api_keys:
                value = key.get_secret_value()
                if len(value) < 16:
                    raise ValueError(f"tenant {name!r}: an API key needs 16 characters or more")
                if value in keys:
                    raise ValueError(f"tenant {name!r}: an API key is given to two tenants")
                keys.add(value)
        return tenants


class TracingSettings(SettingsSection):
    """OpenTelemetry spans of requests (``docs/tracing.md``); off unless an endpoint is set."""

    otlp_endpoint: str | None = None
    """An OTLP/gRPC collector (``host:4317`` or ``http://host:4317``); ``None``: no spans."""
    otlp_insecure: bool = True
    """Plain gRPC to the collector; ``false`` uses TLS with the system's trusted CAs."""
    sample_ratio: float = Field(default=1.0, ge=0.0, le=1.0)
    """Share of new traces recorded; a request whose publisher sampled it stays sampled."""
    service_name: str | None = None
    """``service.name`` of the spans; ``None``: the process's role (``sluiceway-worker``...)."""
    export_timeout_s: float = Field(default=10.0, gt=0)
    """How long one export to the collector may take before its spans are dropped."""


class Settings(BaseSettings):
    """The whole configuration tree of a Sluiceway process."""

    model_config = SettingsConfigDict(
        env_prefix="SLUICEWAY_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    namespace: str = Field(default="inference", pattern=r"^[A-Za-z0-9._-]+$")
    """Prefix of every topic: ``<namespace>.<model>.requests`` and so on."""
    kafka: KafkaSettings = KafkaSettings()
    object_store: ObjectStoreSettings = ObjectStoreSettings()
    backends: BackendSettings = BackendSettings()
    workers: WorkerSettings = WorkerSettings()
    models: dict[str, ModelSettings] = Field(default_factory=dict)
    """Models this deployment serves, by name (the ``<model>`` in topic names)."""
    monitor: MonitorSettings = MonitorSettings()
    batch: BatchSettings = BatchSettings()
    api: ApiSettings = ApiSettings()
    tracing: TracingSettings = TracingSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The YAML file is merged in by load_settings() as init data below the explicit
        # overrides, so only explicit values and the environment are read here.
        return (init_settings, env_settings)

    def as_dict(self, *, reveal_secrets: bool = False) -> dict[str, Any]:
        """Return the settings as plain data; secrets are masked unless ``reveal_secrets``."""
        data: dict[str, Any] = self.model_dump(mode="json")
        if reveal_secrets:
            return _reveal(self, data)
        return data

    def as_environment(self) -> dict[str, str]:
        """``SLUICEWAY_*`` variables that rebuild exactly these settings in a child process
        (one JSON value per section, secrets included: for the child's environment only)."""
        data = self.as_dict(reveal_secrets=True)
        return {
            f"SLUICEWAY_{name.upper()}": value if isinstance(value, str) else json.dumps(value)
            for name, value in data.items()
        }


AnySettings = TypeVar("AnySettings", bound=Settings)


def _reveal(model: BaseModel, data: dict[str, Any]) -> dict[str, Any]:
    for name, value in model:
        if isinstance(value, SecretStr):
            data[name] = value.get_secret_value()
        elif isinstance(value, tuple) and value and isinstance(value[0], SecretStr):
            data[name] = [secret.get_secret_value() for secret in value]
        elif isinstance(value, BaseModel):
            data[name] = _reveal(value, data[name])
        elif isinstance(value, dict):
            for key, item in value.items():
                if isinstance(item, BaseModel):
                    data[name][key] = _reveal(item, data[name][key])
    return data


def read_settings_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SettingsError(f"settings file {path}: cannot be read ({exc.strerror})") from exc
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}:" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise SettingsError(f"settings file {path}:{where} invalid YAML ({problem})") from exc
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise SettingsError(f"settings file {path}: the top level must be a mapping of sections")
    return loaded


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _env_paths() -> set[str]:
    """Return the dotted setting paths the environment sets, so YAML values yield to them."""
    return {
        name.removeprefix("SLUICEWAY_").lower().replace("__", ".")
        for name in os.environ
        if name.startswith("SLUICEWAY_") and name != CONFIG_ENV_VAR
    }


def _drop_paths(data: dict[str, Any], paths: set[str], prefix: str = "") -> dict[str, Any]:
    kept: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if path in paths:
            continue
        kept[key] = _drop_paths(value, paths, f"{path}.") if isinstance(value, dict) else value
    return kept


def check_models_defined(settings: Settings, names: Iterable[str]) -> None:
    """Refuse model names the settings do not define, in one line naming those they do (a
    service started for an unknown model would otherwise fail the same way at every restart)."""
    unknown = sorted(set(names) - set(settings.models))
    if unknown:
        defined = ", ".join(sorted(settings.models)) or "none"
        raise SettingsError(
            f"model {', '.join(map(repr, unknown))} is not in the settings (models: {defined}); "
            "name it under `models:` in the configuration file (the demo's models are in "
            "devkit/demo/settings.yaml)"
        )


def describe_validation_error(exc: ValidationError, source: str) -> str:
    """Render the first problem of a validation error as one line naming the setting."""
    first = exc.errors()[0]
    setting = ".".join(str(part) for part in first["loc"]) or "(top level)"
    more = len(exc.errors()) - 1
    suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    given = first.get("input")
    shown = "" if isinstance(given, dict) or first["type"] == "missing" else f", got {given!r}"
    return f"setting {setting} from {source}: {first['msg']}{shown}{suffix}"


def load_settings(config_file: Path | str | None = None, **overrides: Any) -> Settings:
    """Build the settings tree from overrides, the environment and an optional YAML file.

    Raises :class:`SettingsError` with one line that names the file or setting at fault.
    """
    return load_settings_as(Settings, config_file, **overrides)


def load_settings_as(
    settings_class: type[AnySettings],
    config_file: Path | str | None = None,
    *,
    base_layers: Sequence[tuple[str, dict[str, Any]]] = (),
    **overrides: Any,
) -> AnySettings:
    """:func:`load_settings` for a settings class that extends :class:`Settings` (the
    development wing's adds the local stack), with ``base_layers``: ``(source, data)`` pairs
    below the configuration file, in rising priority (the demo's models)."""
    path_text = config_file if config_file is not None else os.environ.get(CONFIG_ENV_VAR)
    env_paths = _env_paths()
    file_data: dict[str, Any] = {}
    sources = [source for source, _ in base_layers]
    for _, data in base_layers:
        file_data = _deep_merge(file_data, _drop_paths(data, env_paths))
    if path_text:
        path = Path(path_text)
        file_data = _deep_merge(file_data, _drop_paths(read_settings_file(path), env_paths))
        sources.append(str(path))
    source = f"{' or '.join(sources)} or the environment" if sources else "the environment"
    try:
        return settings_class(**_deep_merge(file_data, overrides))
    except ValidationError as exc:
        raise SettingsError(describe_validation_error(exc, source)) from None
