"""Who is who: the names of the product's principals, the same for Kafka and the object store.

One process role, one name: a Kafka SCRAM user, a client certificate's CN, a JWT ``sub`` and
a MinIO user at once, so an operator reads one name in the broker's ACLs, the object store's
policies and the stack's secrets folder.
"""

from __future__ import annotations

ADMIN = "admin"
MONITOR = "monitor"
BATCH = "batch"
CLIENT = "client"
WORKER_PREFIX = "worker-"
CONNECTOR_PREFIX = "connector-"


def worker_principal(model: str) -> str:
    """The principal of the workers serving ``model`` (one model per secured worker)."""
    return f"{WORKER_PREFIX}{model}"


def connector_principal(name: str) -> str:
    """The principal of the connector named ``name`` (its ``--name``)."""
    return f"{CONNECTOR_PREFIX}{name}"
