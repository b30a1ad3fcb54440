"""Every Kafka client of the product is built from the shared settings, so none of them can
forget the security settings (as the faust monitor once did)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("pipeline", "workers", "connectors", "schemas")

# Where a client may be constructed from a configuration: the factory itself, and the two
# wrappers that take the factory's configurations (pipeline.kafka.clients.*_config).
ALLOWED = {
    "pipeline/settings.py",
    "pipeline/kafka/clients.py",
    "pipeline/kafka/consumer.py",
    "pipeline/kafka/producer.py",
}
CONSTRUCTORS = re.compile(
    r"\b(?:Producer|Consumer|AdminClient|AIOKafkaProducer|AIOKafkaConsumer|AIOKafkaAdminClient)\("
    r"|\bfaust\.App\("
    # A hand-made librdkafka configuration (KafkaSettings.client_config() writes the only one).
    r"|[\"']bootstrap\.servers[\"']"
)


def test_no_product_module_builds_a_kafka_client_of_its_own() -> None:
    offenders = []
    for package in PRODUCT:
        for path in sorted((ROOT / package).rglob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            if relative in ALLOWED:
                continue
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                code = line.split("#", 1)[0]
                if CONSTRUCTORS.search(code):
                    offenders.append(f"{relative}:{number}: {line.strip()}")
    # The faust app is the one exception by name: it is given faust_credentials() (checked
    # below), because faust builds its aiokafka clients itself.
    assert [o for o in offenders if "faust.App(" not in o] == []


def test_the_faust_app_gets_the_shared_security() -> None:
    source = (ROOT / "workers/monitor/app.py").read_text(encoding="utf-8")
    apps = source.count("faust.App(")
    assert apps == 1
    assert "broker_credentials=clients.faust_credentials(settings.kafka)" in source
