"""The secured stack's Kafka: broker listener properties, and what each client needs to connect.

Pure apart from reading (and, on first use, generating) the secrets under ``<state>/secrets``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

from pydantic import SecretStr

from devkit.settings import LocalSettings
from devkit.stack.exceptions import StackError
from devkit.stack.oauth import AUDIENCE, ISSUER, ensure_issuer
from devkit.stack.secrets import KafkaSecrets, check_principal
from devkit.stack.services import resolve
from pipeline.kafka import acl_admin, acls
from pipeline.kafka.acl_admin import ApplyReport
from pipeline.principals import ADMIN
from pipeline.settings import KafkaSettings

Mechanism = Literal["scram", "mtls", "oauth"]
MECHANISMS: tuple[Mechanism, ...] = ("scram", "mtls", "oauth")

PRINCIPAL_MAPPING_RULES = "RULE:^CN=([A-Za-z0-9][A-Za-z0-9._-]*)$/$1/,DEFAULT"
"""A certificate whose subject is exactly ``CN=<principal name>`` is that principal (as the
stack CA issues them); any other subject stays its whole DN, which no ACL names."""


def _jaas(module: str, **options: str) -> str:
    rendered = " ".join(f'{key}="{value}"' for key, value in options.items())
    return f"{module} required {rendered};"


def secured_listener_properties(settings: LocalSettings) -> dict[str, str]:
    """The ``server.properties`` entries that secure the local broker (they replace the
    plaintext listeners)."""
    stack = settings.stack
    state_dir = _state_dir(settings)
    secrets = KafkaSecrets(state_dir)
    password = secrets.admin_password()
    keystore = secrets.keystore()
    trusted = secrets.authority().certificate
    jwks = ensure_issuer(state_dir).jwks_file
    scram_login = _jaas(
        "org.apache.kafka.common.security.scram.ScramLoginModule",
        username=ADMIN,
        password=password,
    )
    plain_login = _jaas(
        "org.apache.kafka.common.security.plain.PlainLoginModule",
        username=ADMIN,
        password=password,
        **{f"user_{ADMIN}": password},
    )
    return {
        "listeners": ",".join(
            [
                f"SCRAM://127.0.0.1:{stack.kafka_port}",
                f"MTLS://127.0.0.1:{stack.kafka_mtls_port}",
                f"OAUTH://127.0.0.1:{stack.kafka_oauth_port}",
                f"CONTROLLER://127.0.0.1:{stack.kafka_controller_port}",
            ]
        ),
        "advertised.listeners": ",".join(
            [
                f"SCRAM://127.0.0.1:{stack.kafka_port}",
                f"MTLS://127.0.0.1:{stack.kafka_mtls_port}",
                f"OAUTH://127.0.0.1:{stack.kafka_oauth_port}",
            ]
        ),
        "listener.security.protocol.map": (
            "SCRAM:SASL_SSL,MTLS:SSL,OAUTH:SASL_SSL,CONTROLLER:SASL_SSL"
        ),
        "inter.broker.listener.name": "SCRAM",
        "sasl.mechanism.inter.broker.protocol": "SCRAM-SHA-512",
        "sasl.mechanism.controller.protocol": "PLAIN",
        # TLS everywhere, from the stack CA (PEM: key and chain in one file).
        "ssl.keystore.type": "PEM",
        "ssl.keystore.location": str(keystore),
        "ssl.truststore.type": "PEM",
        "ssl.truststore.location": str(trusted),
        "ssl.endpoint.identification.algorithm": "https",
        # SCRAM (clients, and the broker to itself).
        "listener.name.scram.sasl.enabled.mechanisms": "SCRAM-SHA-512",
        "listener.name.scram.scram-sha-512.sasl.jaas.config": scram_login,
        # mTLS: a client certificate is required, its CN is the principal.
        "listener.name.mtls.ssl.client.auth": "required",
        "listener.name.mtls.ssl.principal.mapping.rules": PRINCIPAL_MAPPING_RULES,
        # OAUTHBEARER: signed JWTs from the stack's issuer; ``sub`` is the principal.
        "listener.name.oauth.sasl.enabled.mechanisms": "OAUTHBEARER",
        "listener.name.oauth.oauthbearer.sasl.jaas.config": (
            "org.apache.kafka.common.security.oauthbearer.OAuthBearerLoginModule required;"
        ),
        "listener.name.oauth.oauthbearer.sasl.server.callback.handler.class": (
            "org.apache.kafka.common.security.oauthbearer.OAuthBearerValidatorCallbackHandler"
        ),
        # Named explicitly: Kafka 4.1.1's default validator, as the listener configures it,
        # accepted a token signed by any key (tests/integration/test_secured_kafka.py).
        "sasl.oauthbearer.jwt.validator.class": (
            "org.apache.kafka.common.security.oauthbearer.BrokerJwtValidator"
        ),
        "sasl.oauthbearer.jwks.endpoint.url": jwks.as_uri(),
        "sasl.oauthbearer.expected.audience": AUDIENCE,
        "sasl.oauthbearer.expected.issuer": ISSUER,
        "sasl.oauthbearer.sub.claim.name": "sub",
        # The controller: only the node itself, as admin, over TLS on loopback.
        "listener.name.controller.sasl.enabled.mechanisms": "PLAIN",
        "listener.name.controller.plain.sasl.jaas.config": plain_login,
        # Nothing is allowed that no ACL allows; admin is the only super user.
        "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
        "allow.everyone.if.no.acl.found": "false",
        "super.users": f"User:{ADMIN}",
    }


def _state_dir(settings: LocalSettings) -> Path:
    return resolve(settings.stack.state_dir)


def admin_kafka_settings(settings: LocalSettings) -> KafkaSettings:
    """The secured stack's ``admin`` over SCRAM: what the stack's own admin calls use."""
    secrets = KafkaSecrets(_state_dir(settings))
    return KafkaSettings(
        bootstrap_servers=f"127.0.0.1:{settings.stack.kafka_port}",
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username=ADMIN,
        sasl_password=SecretStr(secrets.admin_password()),
        ssl_ca_location=secrets.authority().certificate,
        client_id="sluiceway-stack",
    )


def credential_environment(
    settings: LocalSettings, principal: str, mechanism: Mechanism
) -> dict[str, str]:
    """``SLUICEWAY_KAFKA__*`` variables that make a process connect as ``principal``.

    ``oauth`` is refused: the local stack has no token endpoint for librdkafka to ask; a
    client that can sign in with a callback gets a token from ``sluiceway stack token``.
    """
    if not settings.stack.secured:
        raise StackError("the stack is not secured (stack.secured): no credentials to hand out")
    check_principal(principal)
    stack = settings.stack
    secrets = KafkaSecrets(_state_dir(settings))
    ca = str(secrets.authority().certificate)
    prefix = "SLUICEWAY_KAFKA__"
    if mechanism == "scram":
        return {
            f"{prefix}BOOTSTRAP_SERVERS": f"127.0.0.1:{stack.kafka_port}",
            f"{prefix}SECURITY_PROTOCOL": "SASL_SSL",
            f"{prefix}SASL_MECHANISM": "SCRAM-SHA-512",
            f"{prefix}SASL_USERNAME": principal,
            f"{prefix}SASL_PASSWORD": secrets.password(principal),
            f"{prefix}SSL_CA_LOCATION": ca,
        }
    if mechanism == "mtls":
        pair = secrets.client_pair(principal)
        return {
            f"{prefix}BOOTSTRAP_SERVERS": f"127.0.0.1:{stack.kafka_mtls_port}",
            f"{prefix}SECURITY_PROTOCOL": "SSL",
            f"{prefix}SSL_CA_LOCATION": ca,
            f"{prefix}SSL_CERTIFICATE_LOCATION": str(pair.certificate),
            f"{prefix}SSL_KEY_LOCATION": str(pair.key),
        }
    raise StackError(
        "the local stack has no OAuth token endpoint for SLUICEWAY_KAFKA__OAUTH_* settings; "
        f"`sluiceway stack token {principal}` prints a signed token for a client's oauth_cb "
        f"(listener 127.0.0.1:{stack.kafka_oauth_port})"
    )


def principal_kafka_settings(
    settings: LocalSettings, principal: str, mechanism: Mechanism = "scram"
) -> KafkaSettings:
    """The Kafka settings that connect a process of the secured local stack as ``principal``
    (what ``credential_environment`` prints, as settings)."""
    environment = credential_environment(settings, principal, mechanism)
    return KafkaSettings(
        **{
            name.removeprefix("SLUICEWAY_KAFKA__").lower(): value
            for name, value in environment.items()
        },
        client_id=principal,
    )


def apply_stack_acls(
    settings: LocalSettings,
    connectors: Mapping[str, Sequence[str]] | None = None,
    *,
    prune: bool = False,
) -> ApplyReport:
    """Create the planned principals' SCRAM users and ACLs on the secured local broker, as
    ``admin``; ``connectors`` defaults to ``stack.kafka_connectors``."""
    served = settings.stack.kafka_connectors if connectors is None else connectors
    grants = acls.plan(settings, served)
    secrets = KafkaSecrets(_state_dir(settings))
    return acl_admin.apply(
        admin_kafka_settings(settings),
        grants,
        prune=prune,
        namespace=settings.namespace,
        scram_users=acls.principals(settings, served),
        password_of=secrets.password,
    )
