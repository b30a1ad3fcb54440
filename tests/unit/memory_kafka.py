"""An in-memory Kafka behind the worker's ports (``pipeline/kafka/ports.py``).

Enough of Kafka's semantics for the worker's policies: partitioned logs with offsets,
consumer groups with generations and round-robin assignment, rebalance callbacks delivered
inside ``fetch`` on the consumer's own thread (as librdkafka does inside ``poll``), pause and
resume, commits refused once the group moved on, and a producer whose acknowledgements are
futures. Not a broker: no replication, no retention, transactions commit offsets only.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import TIMESTAMP_CREATE_TIME

from pipeline.backends.signature import ModelSignature
from pipeline.kafka.exceptions import DeliveryError
from pipeline.kafka.ports import CommitRefused, PartitionKey, RebalanceListener
from pipeline.kafka.producer import OutgoingMessage
from pipeline.storage.segments import Segment


@dataclass(frozen=True)
class MemoryMessage:
    _topic: str
    _partition: int
    _offset: int
    _value: bytes | None
    _key: bytes | str | None = None
    _headers: Any = None
    _timestamp_ms: int = 0

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes | str | None:
        return self._key

    def value(self) -> bytes | None:
        return self._value

    def headers(self) -> Any:
        return self._headers

    def timestamp(self) -> tuple[int, int]:
        return (TIMESTAMP_CREATE_TIME, self._timestamp_ms)

    def error(self) -> None:
        return None


@dataclass
class _Group:
    members: list[MemoryConsumer] = field(default_factory=list)
    generation: int = 0
    committed: dict[PartitionKey, int] = field(default_factory=dict)
    refuse_commits: int = 0


class MemoryBroker:
    """Topics, groups and committed offsets; thread-safe (consumers run on their threads)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._arrived = threading.Condition(self._lock)
        self.topics: dict[str, list[list[MemoryMessage]]] = {}
        self.groups: dict[str, _Group] = {}

    # ---------------------------------------------------------------- topics

    def create_topic(self, name: str, partitions: int = 1) -> None:
        with self._lock:
            self.topics.setdefault(name, [[] for _ in range(partitions)])

    def has_topic(self, name: str) -> bool:
        with self._lock:
            return name in self.topics

    def append(
        self,
        topic: str,
        value: bytes | None,
        *,
        partition: int = 0,
        key: bytes | str | None = None,
        headers: Any = None,
        timestamp_ms: int = 0,
    ) -> int:
        with self._arrived:
            if topic not in self.topics:
                raise KeyError(f"unknown topic {topic!r}")
            log = self.topics[topic][partition]
            log.append(MemoryMessage(topic, partition, len(log), value, key, headers, timestamp_ms))
            self._arrived.notify_all()
            return len(log) - 1

    def messages(self, topic: str) -> list[MemoryMessage]:
        with self._lock:
            return [m for log in self.topics.get(topic, []) for m in log]

    def end_offsets(self, topic: str) -> dict[int, int]:
        with self._lock:
            return {p: len(log) for p, log in enumerate(self.topics[topic])}

    # ---------------------------------------------------------------- groups

    def committed(self, group: str) -> dict[PartitionKey, int]:
        with self._lock:
            return dict(self.groups.get(group, _Group()).committed)

    def refuse_next_commits(self, group: str, count: int = 1) -> None:
        """The next ``count`` commits of ``group`` fail as if its generation moved on."""
        with self._lock:
            self.groups.setdefault(group, _Group()).refuse_commits += count

    def _join(self, consumer: MemoryConsumer) -> None:
        with self._lock:
            group = self.groups.setdefault(consumer.group_id, _Group())
            group.members.append(consumer)
            self._rebalance(group)

    def _leave(self, consumer: MemoryConsumer) -> None:
        with self._lock:
            group = self.groups[consumer.group_id]
            if consumer in group.members:
                group.members.remove(consumer)
                self._rebalance(group)

    def _rebalance(self, group: _Group) -> None:
        """Round-robin the subscribed partitions; each member hears of its changes on fetch."""
        group.generation += 1
        partitions = sorted(
            {
                (topic, p)
                for member in group.members
                for topic in member.subscription
                for p in range(len(self.topics.get(topic, [])))
            }
        )
        target: dict[int, set[PartitionKey]] = {id(m): set() for m in group.members}
        for index, key in enumerate(partitions):
            if group.members:
                target[id(group.members[index % len(group.members)])].add(key)
        for member in group.members:
            member._target(target[id(member)], group.generation)
        self._arrived.notify_all()

    def _commit(self, consumer: MemoryConsumer, offsets: Mapping[PartitionKey, int]) -> None:
        with self._lock:
            group = self.groups[consumer.group_id]
            if group.refuse_commits > 0:
                group.refuse_commits -= 1
                raise CommitRefused("commit refused: ILLEGAL_GENERATION (memory broker)")
            if consumer.generation != group.generation or not set(offsets) <= consumer.owned:
                raise CommitRefused("commit refused: the group moved on (memory broker)")
            group.committed.update(offsets)


class MemoryConsumer:
    """A :class:`~pipeline.kafka.ports.ConsumerPort` on a :class:`MemoryBroker`."""

    def __init__(self, broker: MemoryBroker, group_id: str) -> None:
        self._broker = broker
        self._group_id = group_id
        self.subscription: list[str] = []
        self.owned: set[PartitionKey] = set()
        self.paused: set[PartitionKey] = set()
        self.positions_: dict[PartitionKey, int] = {}
        self.generation = 0
        self._listener: RebalanceListener | None = None
        self._wanted: set[PartitionKey] | None = None
        self._wanted_generation = 0
        self.closed = False

    @property
    def group_id(self) -> str:
        return self._group_id

    def subscribe(self, topics: Sequence[str], listener: RebalanceListener) -> None:
        self.subscription = list(topics)
        self._listener = listener
        self._broker._join(self)

    def _target(self, partitions: set[PartitionKey], generation: int) -> None:
        self._wanted = set(partitions)
        self._wanted_generation = generation

    def _apply_rebalance(self) -> None:
        """Cooperative handover: revoke what goes (the member has already joined the new
        generation, so its commits there succeed), then take what comes once no other member
        holds it any more; what is still held elsewhere waits for a later fetch."""
        with self._broker._lock:
            wanted, generation = self._wanted, self._wanted_generation
        if wanted is None or self._listener is None:
            return
        self.generation = generation
        revoked = sorted(self.owned - wanted)
        if revoked:
            self._listener.on_revoke(revoked)
            self.owned -= set(revoked)
            self.paused -= set(revoked)
        with self._broker._lock:
            group = self._broker.groups[self._group_id]
            held = {key for m in group.members if m is not self for key in m.owned}
            added = sorted(wanted - self.owned - held)
            if self._wanted is wanted and not (wanted - self.owned - set(added)):
                self._wanted = None
            committed = dict(group.committed)
        if added:
            for key in added:
                self.positions_[key] = committed.get(key, 0)
            self.owned |= set(added)
            self._listener.on_assign(added)

    def fetch(self, max_records: int, timeout_s: float) -> list[Any]:
        self._apply_rebalance()
        with self._broker._arrived:
            found = self._take(max_records)
            if not found:
                self._broker._arrived.wait(timeout_s)
                found = self._take(max_records)
        if not found:
            self._apply_rebalance()
        return found

    def _take(self, max_records: int) -> list[MemoryMessage]:
        found: list[MemoryMessage] = []
        for key in sorted(self.owned - self.paused):
            log = self._broker.topics[key[0]][key[1]]
            position = self.positions_.get(key, 0)
            taken = log[position : position + max_records - len(found)]
            found.extend(taken)
            self.positions_[key] = position + len(taken)
            if len(found) >= max_records:
                break
        return found

    def pause(self, partitions: Collection[PartitionKey]) -> None:
        self.paused |= set(partitions) & self.owned

    def resume(self, partitions: Collection[PartitionKey]) -> None:
        self.paused -= set(partitions)

    def commit(self, offsets: Mapping[PartitionKey, int]) -> None:
        self._broker._commit(self, offsets)

    def positions(self, partitions: Collection[PartitionKey]) -> dict[PartitionKey, int]:
        return {key: self.positions_.get(key, -1) for key in partitions}

    def group_metadata(self) -> Any:
        return (self._group_id, self.generation)

    def close(self) -> None:
        """Leave the group: revoke everything (with the listener) first, as librdkafka does."""
        if self._listener is not None and self.owned:
            self._listener.on_revoke(sorted(self.owned))
        self.owned.clear()
        self.closed = True
        self._broker._leave(self)


class MemoryProducer:
    """A :class:`~pipeline.kafka.ports.ProducerPort`: appends at once, acks on the loop."""

    def __init__(self, broker: MemoryBroker) -> None:
        self._broker = broker
        self.produced = 0

    def submit_all(self, messages: Sequence[OutgoingMessage]) -> Awaitable[int]:
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        try:
            for message in messages:
                self._broker.append(
                    message.topic, message.value, key=message.key, headers=message.headers
                )
        except KeyError as error:
            # The real producer's error type, so callers handle it as they would in service.
            future.set_exception(DeliveryError(str(error), topic=message.topic))
            return future
        self.produced += len(messages)
        future.set_result(len(messages))
        return future

    def init_transactions(self, timeout_s: float) -> None:
        pass

    def begin_transaction(self) -> None:
        pass

    def commit_offsets_in_transaction(
        self, offsets: Sequence[tuple[Mapping[PartitionKey, int], Any]], timeout_s: float
    ) -> None:
        for positions, (group_id, _generation) in offsets:
            with self._broker._lock:
                self._broker.groups[group_id].committed.update(positions)

    def close(self, timeout_s: float) -> int:
        return 0


class MemoryStore:
    """An object store in a dict; ``fail_next`` makes the next puts fail transiently."""

    bucket = "memory"

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.fail_next = 0

    async def put(self, segment: Segment) -> str:
        return await self.put_bytes(segment.key, segment.body, "application/x-ndjson")

    async def put_bytes(self, key: str, body: bytes, content_type: str) -> str:
        from pipeline.storage.exceptions import ObjectStoreError

        if self.fail_next > 0:
            self.fail_next -= 1
            raise ObjectStoreError("memory store unavailable", transient=True)
        self.objects[key] = body
        return f"etag-{len(self.objects)}"


class NoControl:
    """No control topic: the routing table keeps its defaults."""

    def poll(self, timeout_s: float = 0.0) -> int:
        return 0

    def close(self) -> None:
        pass


def scaler_signature() -> ModelSignature:
    from pipeline.backends.signature import TensorSpec

    return ModelSignature(
        inputs=(TensorSpec("x", "FP32", (4,)),), versions=frozenset({"1", "2"}), max_rows=256
    )
