"""The three servers of the native stack: how each is installed, configured, started and probed.

Each service is a small object over the settings; :mod:`devkit.stack.manager` drives them.
Every service's command line contains the absolute state folder, which is how a pidfile's
process is recognised as ours (see :class:`~devkit.stack.process.ManagedProcess`).
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import subprocess
import urllib.error
import urllib.request
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from devkit.settings import PROJECT_ROOT, LocalSettings
from devkit.stack.exceptions import StackError
from devkit.stack.installers import (
    Progress,
    install_kafka,
    install_minio,
    install_triton,
    triton_paths,
)
from devkit.stack.minio_security import ensure_kms_key, prepare_certs_dir
from devkit.stack.process import ManagedProcess, port_open
from pipeline.settings import KafkaSettings, ObjectStoreSettings


@dataclass(frozen=True)
class Port:
    number: int
    setting: str
    """The environment variable that moves this port, named in errors."""


@dataclass(frozen=True)
class Launch:
    argv: list[str]
    env: dict[str, str]


def resolve(path: Path) -> Path:
    """Resolve a settings path: relative paths are relative to the project root."""
    return path if path.is_absolute() else (PROJECT_ROOT / path).resolve()


def _http_get(
    url: str, timeout_s: float = 2.0, context: ssl.SSLContext | None = None
) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s, context=context) as response:  # noqa: S310 (loopback URL built from settings)
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, b""
    except OSError:
        return 0, b""


class Service(ABC):
    """One server of the local stack."""

    name: str

    def __init__(self, settings: LocalSettings) -> None:
        self.settings = settings
        self.stack = settings.stack
        self.state_dir = resolve(self.stack.state_dir)
        self.cache_dir = self.stack.cache_dir.expanduser()
        self.process = ManagedProcess(
            name=self.name,
            pidfile=self.state_dir / "run" / f"{self.name}.pid",
            logfile=self.state_dir / "logs" / f"{self.name}.log",
            marker=str(self.state_dir),
        )

    @property
    def home(self) -> Path:
        """This service's data and generated configuration inside the state folder."""
        return self.state_dir / self.name

    @property
    def secrets_dir(self) -> Path:
        """The secured stack's CA, certificates, keys and credentials (``stack.secured``)."""
        return self.state_dir / "secrets"

    @abstractmethod
    def ports(self) -> list[Port]: ...

    @abstractmethod
    def install(self, progress: Progress) -> None:
        """Make sure the server's binaries are in the cache (no-op when they are)."""

    @abstractmethod
    def prepare(self) -> Launch:
        """Write configuration and initialise storage; return how to start the server."""

    @abstractmethod
    def healthy(self) -> bool: ...

    def configure(self, progress: Progress) -> None:
        """Once every service is healthy: set up what the server's own API must create (no-op
        unless a service needs it). Runs at every ``up``, so it must be idempotent."""
        return

    @abstractmethod
    def version(self) -> str: ...

    @abstractmethod
    def endpoint(self) -> str: ...


def new_cluster_id(draw: Callable[[], bytes] = lambda: uuid.uuid4().bytes) -> str:
    """A KRaft cluster id: 16 random bytes in unpadded URL-safe base64, as Kafka makes them.

    About one id in 64 would begin with ``-``, which the storage tool's command line reads as an
    option (a CI run failed on one); like Kafka's own ``Uuid.randomUuid`` we draw again.
    """
    while True:
        cluster_id = base64.urlsafe_b64encode(draw()).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


class KafkaService(Service):
    """Apache Kafka in KRaft mode: one combined broker and controller.

    Plain (``stack.secured`` false): one PLAINTEXT listener. Secured: every listener is TLS
    with the stack CA's server certificate, and

    * ``kafka_port``: SASL_SSL, SCRAM-SHA-512 users (``admin`` added at format time, the
      others by ``acl apply``); also the inter-broker listener, as ``admin``;
    * ``kafka_mtls_port``: SSL with ``ssl.client.auth=required``, the principal being the
      certificate's CN;
    * ``kafka_oauth_port``: SASL_SSL, OAUTHBEARER, JWTs checked against the stack issuer's
      JWKS file, the principal being the token's ``sub``;
    * the controller listener: SASL_SSL with PLAIN, the one user ``admin`` (KRaft does not
      take SCRAM on a controller listener), on loopback.

    Authorisation is the ``StandardAuthorizer`` with nothing allowed without an ACL; ``admin``
    is the only super user, and the stack itself (health probe, topic admin, ACLs) uses it.
    """

    name = "kafka"

    @property
    def secured(self) -> bool:
        return self.stack.secured

    def ports(self) -> list[Port]:
        ports = [
            Port(self.stack.kafka_port, "SLUICEWAY_STACK__KAFKA_PORT"),
            Port(self.stack.kafka_controller_port, "SLUICEWAY_STACK__KAFKA_CONTROLLER_PORT"),
        ]
        if self.secured:
            ports += [
                Port(self.stack.kafka_mtls_port, "SLUICEWAY_STACK__KAFKA_MTLS_PORT"),
                Port(self.stack.kafka_oauth_port, "SLUICEWAY_STACK__KAFKA_OAUTH_PORT"),
            ]
        return ports

    def install(self, progress: Progress) -> None:
        self._libs = install_kafka(self.cache_dir, self.stack.kafka_version, progress)

    def _server_properties(self) -> dict[str, str]:
        port, controller = self.stack.kafka_port, self.stack.kafka_controller_port
        return {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{controller}",
            "listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(self.home / "data"),
            "num.partitions": "3",
            "auto.create.topics.enable": "true",
            # One broker: every internal topic must live with a single replica.
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "10",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "5",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            # Tests and the demo form groups often; waiting 3 s for more members helps nobody.
            "group.initial.rebalance.delay.ms": "0",
            "log.retention.hours": "24",
            "log.segment.bytes": str(64 * 1024 * 1024),
        }

    def _secured_properties(self) -> dict[str, str]:
        from devkit.stack.kafka_security import secured_listener_properties

        return secured_listener_properties(self.settings)

    def prepare(self) -> Launch:
        self.home.mkdir(parents=True, exist_ok=True)
        lines = self._server_properties()
        if self.secured:
            lines.update(self._secured_properties())
        self._check_mode()
        properties = self.home / "server.properties"
        # Secured, the file holds the admin password (JAAS): owner only, like the secrets.
        properties.unlink(missing_ok=True)
        descriptor = os.open(properties, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write("".join(f"{key}={value}\n" for key, value in lines.items()))
        log4j = self.home / "log4j2.properties"
        log4j.write_text(_KAFKA_LOG4J, encoding="utf-8")
        classpath = f"{self._libs}/*"
        java = ["java", f"-Dlog4j2.configurationFile={log4j}", "-cp", classpath]
        if self.secured:
            from devkit.stack.oauth import ensure_issuer

            # Kafka 4 reads an OAuth URL only when this system property allows it.
            jwks_url = ensure_issuer(self.state_dir).jwks_file.as_uri()
            java.insert(1, f"-Dorg.apache.kafka.sasl.oauthbearer.allowed.urls={jwks_url}")
        if not (self.home / "data" / "meta.properties").is_file():
            self._format(java, properties)
        heap = self.stack.kafka_heap
        argv = [
            java[0],
            f"-Xmx{heap}",
            f"-Xms{heap}",
            "-XX:+UseG1GC",
            "-Djava.awt.headless=true",
            *java[1:],
            "kafka.Kafka",
            str(properties),
        ]
        return Launch(argv, dict(os.environ))

    def _mode_file(self) -> Path:
        return self.home / "mode"

    def _check_mode(self) -> None:
        """A data folder formatted plain has no SCRAM admin, one formatted secured has no
        open listener: refuse to start either in the other mode rather than fail obscurely."""
        wanted = "secured" if self.secured else "plain"
        if not (self.home / "data" / "meta.properties").is_file():
            return
        try:
            formatted = self._mode_file().read_text(encoding="ascii").strip()
        except OSError:
            formatted = "plain"
        if formatted != wanted:
            raise StackError(
                f"kafka: {self.home / 'data'} was formatted for the {formatted} stack, and "
                f"stack.secured asks for {wanted}: use another stack.state_dir, or remove "
                "that folder to start from empty"
            )

    def _format(self, java: list[str], properties: Path) -> None:
        command = [*java, "kafka.tools.StorageTool", "format", f"--cluster-id={new_cluster_id()}"]
        command += ["-c", str(properties)]
        secret: str | None = None
        if self.secured:
            from devkit.stack.secrets import KafkaSecrets
            from pipeline.principals import ADMIN

            # Only the admin at format time (its password is on this command line for the
            # second it runs); every other user is added through the admin client.
            secret = KafkaSecrets(self.state_dir).admin_password()
            command += ["--add-scram", f"SCRAM-SHA-512=[name={ADMIN},password={secret}]"]
        try:
            subprocess.run(command, check=True, capture_output=True)
        except subprocess.CalledProcessError as exc:
            # The error names the command; never with the password in it.
            def hide(data: bytes) -> bytes:
                return data if secret is None else data.replace(secret.encode(), b"***")

            shown = [part if secret is None else part.replace(secret, "***") for part in command]
            raise subprocess.CalledProcessError(
                exc.returncode, shown, hide(exc.output or b""), hide(exc.stderr or b"")
            ) from None
        self._mode_file().write_text("secured\n" if self.secured else "plain\n", encoding="ascii")

    def configure(self, progress: Progress) -> None:
        """Secured: create the planned principals' SCRAM users and ACLs (``acl apply``);
        stale bindings are reported, not removed."""
        if not self.secured:
            return
        from devkit.stack.kafka_security import apply_stack_acls

        report = apply_stack_acls(self.settings)
        added = report.users_created
        users = f", users added: {', '.join(added)}" if added else ""
        stale = (
            f", {len(report.stale)} stale (`sluiceway acl apply --prune` removes them)"
            if report.stale
            else ""
        )
        progress(
            f"kafka: ACLs {len(report.created)} created, {report.unchanged} in place{stale}{users}"
        )

    def admin_settings(self) -> KafkaSettings:
        """How the stack itself reaches this broker: plaintext, or as ``admin`` when secured."""
        if not self.secured:
            # The local broker listens in plaintext whatever the deployment's security settings.
            return KafkaSettings(bootstrap_servers=self.endpoint())
        from devkit.stack.kafka_security import admin_kafka_settings

        return admin_kafka_settings(self.settings)

    def healthy(self) -> bool:
        if not port_open(self.stack.kafka_port):
            return False
        from pipeline.kafka import clients

        admin = clients.admin(
            self.admin_settings(),
            # A health probe answers within the status command's patience, not librdkafka's.
            overrides={"socket.timeout.ms": 2000},
        )
        try:
            metadata = admin.list_topics(timeout=2)
        except Exception:
            return False
        return len(metadata.brokers) > 0

    def version(self) -> str:
        return f"Apache Kafka {self.stack.kafka_version} (KRaft)"

    def endpoint(self) -> str:
        return f"127.0.0.1:{self.stack.kafka_port}"


class MinioService(Service):
    """MinIO, built from source, serving the S3 API and its console on loopback."""

    name = "minio"

    def ports(self) -> list[Port]:
        return [
            Port(self.stack.minio_port, "SLUICEWAY_STACK__MINIO_PORT"),
            Port(self.stack.minio_console_port, "SLUICEWAY_STACK__MINIO_CONSOLE_PORT"),
        ]

    def install(self, progress: Progress) -> None:
        self._binary = install_minio(self.cache_dir, self.stack.minio_version, progress)

    def prepare(self) -> Launch:
        data = self.home / "data"
        data.mkdir(parents=True, exist_ok=True)
        store = self.settings.object_store
        env = dict(
            os.environ,
            MINIO_ROOT_USER=store.access_key,
            MINIO_ROOT_PASSWORD=store.secret_key.get_secret_value(),
            MINIO_UPDATE="off",
            MINIO_BROWSER_LOGIN_ANIMATION="off",
        )
        argv = [
            str(self._binary),
            "server",
            str(data),
            "--quiet",
            "--address",
            f"127.0.0.1:{self.stack.minio_port}",
            "--console-address",
            f"127.0.0.1:{self.stack.minio_console_port}",
        ]
        if self.stack.secured:
            # TLS on both ports, and a static KMS key that SSE-S3 (the bucket's default
            # encryption, set by configure()) derives each object's key from.
            argv += ["--certs-dir", str(prepare_certs_dir(self.secrets_dir))]
            env["MINIO_KMS_SECRET_KEY"] = ensure_kms_key(self.secrets_dir)
        return Launch(argv, env)

    def healthy(self) -> bool:
        if not self.stack.secured:
            status, _ = _http_get(f"http://{self.endpoint()}/minio/health/ready")
            return status == 200
        ca = self.secrets_dir / "ca.pem"
        if not ca.is_file():
            return False
        context = ssl.create_default_context(cafile=str(ca))
        status, _ = _http_get(f"https://{self.endpoint()}/minio/health/ready", context=context)
        return status == 200

    def client_settings(self) -> ObjectStoreSettings:
        """The object-store settings that reach this server with its root credentials: over
        https trusting the stack CA when secured."""
        update: dict[str, object] = {"endpoint": self.endpoint()}
        if self.stack.secured:
            update |= {"secure": True, "ca_location": self.secrets_dir / "ca.pem"}
        return self.settings.object_store.model_copy(update=update)

    @property
    def credentials_dir(self) -> Path:
        """One ``<principal>.env`` per scoped credential (secured stack)."""
        return self.secrets_dir / "objectstore"

    def configure(self, progress: Progress) -> None:
        if not self.stack.secured:
            return
        from pipeline.storage.client import ensure_encrypted_bucket, make_client
        from pipeline.storage.grants import apply_grants
        from pipeline.storage.policies import plan_grants

        store = self.client_settings()
        ensure_encrypted_bucket(make_client(store), store.bucket)
        files = apply_grants(store, plan_grants(self.settings), self.credentials_dir)
        progress(
            f"minio: bucket {store.bucket} encrypted by default; "
            f"{len(files)} scoped credentials in {self.credentials_dir}"
        )

    def version(self) -> str:
        return f"MinIO {self.stack.minio_version} (built from source)"

    def endpoint(self) -> str:
        return f"127.0.0.1:{self.stack.minio_port}"


class TritonService(Service):
    """NVIDIA Triton Inference Server from the nvidia-pytriton wheel, python backend."""

    name = "triton"

    def ports(self) -> list[Port]:
        return [
            Port(self.stack.triton_http_port, "SLUICEWAY_STACK__TRITON_HTTP_PORT"),
            Port(self.stack.triton_grpc_port, "SLUICEWAY_STACK__TRITON_GRPC_PORT"),
            Port(self.stack.triton_metrics_port, "SLUICEWAY_STACK__TRITON_METRICS_PORT"),
        ]

    def install(self, progress: Progress) -> None:
        self._root = install_triton(
            self.cache_dir, self.stack.pytriton_version, self.stack.triton_python, progress
        )
        # The demo model's weights are build outputs, not committed: train them before Triton
        # loads the repository (deterministic, a few seconds).
        from devkit.modeling.training import ensure_trained

        ensure_trained(resolve(self.stack.model_repository), progress)

    def prepare(self) -> Launch:
        binary, backends, libs, venv_bin = triton_paths(self._root)
        self.home.mkdir(parents=True, exist_ok=True)
        library_path = os.pathsep.join(filter(None, [str(libs), os.environ.get("LD_LIBRARY_PATH")]))
        env = dict(
            os.environ,
            # The python backend stub runs `python3` models with the venv's numpy: its bin/
            # must come first on PATH (PYTHONPATH alone did not let the stub import numpy).
            PATH=f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
            LD_LIBRARY_PATH=library_path,
        )
        argv = [
            str(binary),
            f"--id=sluiceway:{self.state_dir}",
            f"--model-repository={resolve(self.stack.model_repository)}",
            f"--backend-directory={backends}",
            "--http-address=127.0.0.1",
            f"--http-port={self.stack.triton_http_port}",
            "--grpc-address=127.0.0.1",
            f"--grpc-port={self.stack.triton_grpc_port}",
            "--metrics-address=127.0.0.1",
            f"--metrics-port={self.stack.triton_metrics_port}",
            "--strict-readiness=true",
            "--exit-on-error=true",
        ]
        return Launch(argv, env)

    def healthy(self) -> bool:
        status, _ = _http_get(f"http://{self.endpoint()}/v2/health/ready")
        return status == 200

    def version(self) -> str:
        status, body = _http_get(f"http://{self.endpoint()}/v2")
        if status != 200:
            return f"Triton (nvidia-pytriton {self.stack.pytriton_version})"
        server = json.loads(body)
        return (
            f"Triton {server.get('version', '?')} (nvidia-pytriton {self.stack.pytriton_version})"
        )

    def endpoint(self) -> str:
        return f"127.0.0.1:{self.stack.triton_http_port}"

    def grpc_endpoint(self) -> str:
        return f"127.0.0.1:{self.stack.triton_grpc_port}"


def all_services(settings: LocalSettings) -> list[Service]:
    return [KafkaService(settings), MinioService(settings), TritonService(settings)]


_KAFKA_LOG4J = """\
status = warn
appender.console.type = Console
appender.console.name = STDOUT
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.stdout.ref = STDOUT
logger.statechange.name = state.change.logger
logger.statechange.level = WARN
"""
