"""Reading a Kafka topic up to a point: the Kafka machinery of the batch layer's ingest.

``batch_processor.ingest_stream`` drains every event published so far into
master files. What it needs from Kafka is here: a consumer of the batch
layer's group that commits only when told to (``drain_consumer``), every
partition of the topic assigned to it, with an error naming the fix when the
topic is missing (``assign_all``), the messages below the end offsets seen at
the start, however the polls cut them (``messages_until``), each message as
an event, a trip or the reason it is none (``as_event``), and the commit.

kafka-python is imported only when a drain starts, so a recompute, which
never talks to Kafka, does not pay for it.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from periscope.schema import InvalidTrip, parse_json

if TYPE_CHECKING:
    from kafka import KafkaConsumer, TopicPartition
    from kafka.consumer.fetcher import ConsumerRecord

POLL_TIMEOUT_MS = 1000
MAX_POLL_RECORDS = 5000

Event = tuple[int, dict[str, Any] | None, str | None]
"""``(offset, trip record, None)``, or ``(offset, None, why)`` for a message that holds no trip."""


@contextmanager
def drain_consumer(bootstrap: str, group: str, purpose: str, wait_s: float) -> Iterator[KafkaConsumer]:
    """A consumer of ``group`` that never commits by itself, once a broker answers (``wait_s`` at most)."""
    from kafka import KafkaConsumer

    from periscope.stream import wait_for_broker

    wait_for_broker(bootstrap, purpose, timeout_s=wait_s)
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
                             auto_offset_reset="earliest", max_poll_records=MAX_POLL_RECORDS)
    try:
        yield consumer
    finally:
        consumer.close()


def assign_all(consumer: KafkaConsumer, topic: str, bootstrap: str) -> list[TopicPartition]:
    """Assign every partition of ``topic`` to ``consumer`` (no group rebalancing: one drain at a time)."""
    from kafka import TopicPartition

    partitions = consumer.partitions_for_topic(topic)
    if not partitions:
        raise FileNotFoundError(f"topic {topic!r} does not exist at {bootstrap}: "
                                "create it with `python -m periscope.kafka_local create-topics`")
    assigned = [TopicPartition(topic, partition) for partition in sorted(partitions)]
    consumer.assign(assigned)
    return assigned


def messages_until(consumer: KafkaConsumer, end: Mapping[TopicPartition, int]) -> Iterator[ConsumerRecord]:
    """Every message below ``end`` of the assigned partitions, in offset order within a partition.

    Stops once every partition's position has reached its end offset; messages
    at or past it (published while the drain runs) are left for the next one.
    """
    while any(consumer.position(partition) < end[partition] for partition in end):
        for partition, messages in consumer.poll(timeout_ms=POLL_TIMEOUT_MS).items():
            yield from (message for message in messages if message.offset < end[partition])


def as_event(message: ConsumerRecord, malformed: Counter) -> Event:
    """A message as an event; one that holds no trip is counted in ``malformed``, by reason."""
    try:
        return message.offset, parse_json(message.value), None
    except InvalidTrip as error:
        malformed[error.reason] += 1
        return message.offset, None, str(error)


def commit(consumer: KafkaConsumer, next_offsets: Mapping[TopicPartition, int]) -> None:
    """Commit, per partition, the offset of the next message the group has to read."""
    from kafka.structs import OffsetAndMetadata

    consumer.commit({partition: OffsetAndMetadata(offset, "", -1) for partition, offset in next_offsets.items()})
