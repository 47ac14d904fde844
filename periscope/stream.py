"""What every Kafka client of the project shares: waiting for the broker, the DLQ envelope.

A dead-letter message keeps the original key and value *bytes* untouched (so
nothing is lost, not even an undecodable value) and says what went wrong in
its headers:

``periscope.reason``
    why the record was rejected, e.g. ``invalid_json: Expecting value: ...``
    or a cleaning-rule name such as ``pickup_outside_nyc``;
``periscope.source``
    ``<topic>/<partition>/<offset>`` of the original record;
``periscope.rejected_by``
    the component that rejected it (``kafka_consumer``, ``spark_streaming``).

Read back (``read_dead_letters``, ``DeadLetterLedger``), the topic itself
records which source offsets have their dead letter already: a process that
asks it before sending sends each one once, across crashes and rebalances.

Also here: the settings every producer of trips uses (``PRODUCER_CONFIG``:
``kafka_producer.py`` and the API-simulation DAG), whether a topic exists,
reading a topic's keys back (the producer's resume), and running a start-up
step again when the broker restarts under it (``through_broker_restarts``).
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import numpy as np
from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError, KafkaTimeoutError, RetriableError, UnknownTopicOrPartitionError

from periscope.kafka_local import is_reachable

REASON_HEADER = "periscope.reason"
SOURCE_HEADER = "periscope.source"
REJECTED_BY_HEADER = "periscope.rejected_by"
MAX_BACKOFF_S = 10.0
KEY_BATCH = 50_000
"""Messages per poll when reading a topic's keys back, and keys compacted at a time."""
DLQ_READ_TIMEOUT_S = 30.0
READER_FETCH_MAX_WAIT_MS = 50
"""A reader's fetch at the end of the topic waits this long for more (default 500 ms): the broker answers
a connection's requests in order, so the next read's first request would wait behind it."""

STARTUP_BOOTSTRAP_TIMEOUT_MS = 5_000
"""How long the producer's start-up clients (the topic check, the key reader) try to connect before they
fail (kafka-python's default: 30 s, silently), so ``through_broker_restarts`` says it waits."""
RETRY_PAUSE_S = 0.5
"""Before a step that failed runs again (``through_broker_restarts``), so a broker that answers but keeps
failing it is not asked in a tight loop."""

DELIVERY_TIMEOUT_MS = 120_000
"""How long a producer retries each batch; a broker restart takes a few seconds."""

PRODUCER_CONFIG: dict[str, Any] = {
    "client_id": "periscope-producer",
    "acks": "all",  # written to every in-sync replica before it counts as delivered
    "enable_idempotence": True,  # retries never duplicate, order within a partition holds
    "delivery_timeout_ms": DELIVERY_TIMEOUT_MS,
    "request_timeout_ms": 30_000,
    # batching, measured with the rest of kafka_producer.py's hot-path tuning (producer_tuning.py):
    "linger_ms": 10,  # wait up to 10 ms to fill a batch: far fewer requests, no visible delay
    "batch_size": 128 * 1024,  # about 400 trips per partition and request
    "reconnect_backoff_max_ms": 1_000,  # a restarted broker is found again within a second
    "max_block_ms": 10_000,  # send() blocks only while topic metadata is missing
    "allow_auto_create_topics": False,
}
"""The producer settings of ``kafka_producer.py`` and the API simulation: acks=all, idempotent."""


class BrokerUnavailable(RuntimeError):
    """The broker did not answer within the allowed time."""


T = TypeVar("T")


def wait_for_broker(bootstrap: str, purpose: str, timeout_s: float | None = None,
                    log: logging.Logger | None = None, since: float | None = None) -> None:
    """Block until a Kafka broker answers at ``bootstrap``, backing off 1, 2, 4 ... 10 s.

    Says clearly what it waits for and how to fix it; raises
    ``BrokerUnavailable`` after ``timeout_s`` (never, if None), counted from
    ``since`` (a ``time.monotonic()`` of when the broker went away) or from now.
    """
    log = log or logging.getLogger(__name__)
    started, delay, attempt = time.monotonic() if since is None else since, 1.0, 1
    while not is_reachable(bootstrap, timeout=2.0):
        waited = time.monotonic() - started
        if timeout_s is not None and waited >= timeout_s:
            raise BrokerUnavailable(
                f"no Kafka broker answered at {bootstrap} within {timeout_s:.0f} s; start the local one with "
                "`make kafka-up` or point KAFKA_BOOTSTRAP_SERVERS at a running broker"
            )
        log.warning("waiting for Kafka at %s to %s (attempt %d, %.0f s so far; start it with `make kafka-up` "
                    "or set KAFKA_BOOTSTRAP_SERVERS); retrying in %.0f s", bootstrap, purpose, attempt, waited, delay)
        time.sleep(delay)
        delay, attempt = min(delay * 2, MAX_BACKOFF_S), attempt + 1


def through_broker_restarts(step: Callable[[], T], bootstrap: str, purpose: str, timeout_s: float,
                            log: logging.Logger | None = None) -> T:
    """``step()``, run again from its beginning once the broker answers if the broker went away under it.

    A step that talks to Kafka (making a client, asking for metadata or
    offsets) fails with a retriable ``KafkaError`` (connection refused, a
    timeout, nothing to bootstrap from) when the broker restarts meanwhile: the
    failure is logged, ``wait_for_broker`` waits for the broker with its lines
    and backoff, and the step runs again, so it must be safe to repeat (it
    reads, or makes a client). ``timeout_s`` counts from the step's first
    failure; after it, ``BrokerUnavailable`` (``wait_for_broker``'s message)
    if the broker still does not answer, else the step's own error. Errors that
    are not retriable propagate at once.
    """
    log = log or logging.getLogger(__name__)
    first_failure: float | None = None
    while True:
        try:
            return step()
        except KafkaError as error:
            if not (isinstance(error, RetriableError) or getattr(error, "retriable", False)):
                raise
            first_failure = time.monotonic() if first_failure is None else first_failure
            out_of_time = time.monotonic() - first_failure >= timeout_s
            if not out_of_time:
                log.warning("Kafka at %s went away while starting to %s (%s: %s); waiting for it, then trying "
                            "again", bootstrap, purpose, type(error).__name__, error)
                time.sleep(RETRY_PAUSE_S)
            wait_for_broker(bootstrap, purpose, timeout_s, log, since=first_failure)
            if out_of_time:
                raise


def topic_exists(bootstrap: str, topic: str) -> bool:
    """Whether the cluster at ``bootstrap`` has ``topic`` (one admin call)."""
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="periscope-producer-check",
                             bootstrap_timeout_ms=STARTUP_BOOTSTRAP_TIMEOUT_MS)
    try:
        return topic in admin.list_topics()
    finally:
        admin.close()


def read_topic_keys(bootstrap: str, topic: str, *, max_key_bytes: int | None = None,
                    report: Callable[[int, int], None] | None = None, report_every_s: float = 1.0,
                    stall_timeout_s: float = 60.0) -> tuple[np.ndarray, int]:
    """The distinct keys of the messages on ``topic``, sorted, and how many messages were read.

    A producer that resumes needs to know what is already on the topic, and
    only the keys tell it. "On the topic" is fixed when the call begins: every
    partition is assigned (no consumer group, nothing committed) and read from
    its beginning up to the end offsets taken then, so a topic that keeps
    growing still ends. Memory is that of the distinct keys, not of the
    messages: they are kept as a numpy bytes array (one slot of the longest
    key's length per key), compacted every ``KEY_BATCH`` keys. Messages without
    a key, and keys longer than ``max_key_bytes`` (which cannot be the
    caller's), are left out; numpy drops a key's trailing NUL bytes.

    ``report(read, total)`` is called about every ``report_every_s`` seconds
    while reading. Raises ``BrokerUnavailable`` when nothing arrives for
    ``stall_timeout_s`` seconds while messages are still missing, and a
    retriable ``KafkaError`` when the broker goes away before the read began
    (or shows no partition of the topic): read again, from the start, the keys
    are those of the topic then (``through_broker_restarts``).
    """
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                             auto_offset_reset="earliest", client_id="periscope-key-reader",
                             max_poll_records=KEY_BATCH, max_partition_fetch_bytes=8 << 20,
                             bootstrap_timeout_ms=STARTUP_BOOTSTRAP_TIMEOUT_MS)
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        if not partitions:  # a topic has at least one: its metadata is not known (yet), e.g. just after a restart
            raise UnknownTopicOrPartitionError(f"no partitions of {topic} known at {bootstrap}")
        consumer.assign(partitions)
        begin, end = consumer.beginning_offsets(partitions), consumer.end_offsets(partitions)
        total = sum(end[tp] - begin[tp] for tp in partitions)
        pending = {tp for tp in partitions if end[tp] > begin[tp]}
        consumer.seek_to_beginning(*partitions)
        if set(partitions) - pending:
            consumer.pause(*(set(partitions) - pending))
        longest = max_key_bytes if max_key_bytes is not None else float("inf")
        compacted: list[np.ndarray] = []
        keys: list[bytes] = []
        read = 0
        last_arrival = last_report = time.monotonic()
        while pending:
            for tp, records in consumer.poll(timeout_ms=500).items():
                if tp not in pending:
                    continue
                if records[-1].offset >= end[tp]:
                    records = [record for record in records if record.offset < end[tp]]
                keys.extend([record.key for record in records
                             if record.key is not None and len(record.key) <= longest])
                read += len(records)
                last_arrival = time.monotonic()
            for tp in [tp for tp in pending if consumer.position(tp) >= end[tp]]:
                pending.discard(tp)
                consumer.pause(tp)
            if len(keys) >= KEY_BATCH:
                compacted.append(np.unique(np.array(keys, dtype=bytes)))
                keys = []
            now = time.monotonic()
            if pending and now - last_arrival >= stall_timeout_s:
                raise BrokerUnavailable(f"reading the keys on {topic} at {bootstrap} stalled: nothing arrived "
                                        f"for {stall_timeout_s:.0f} s with {read:,} of {total:,} messages read")
            if report is not None and now - last_report >= report_every_s:
                report(read, total)
                last_report = now
        compacted.append(np.array(keys, dtype=bytes) if keys else np.empty(0, dtype="S1"))
        return np.unique(np.concatenate(compacted)), read
    finally:
        consumer.close()


def dlq_headers(reason: str, topic: str, partition: int, offset: int, rejected_by: str) -> list[tuple[str, bytes]]:
    """Headers of a dead-letter message (see the module docstring)."""
    return [
        (REASON_HEADER, reason.encode()),
        (SOURCE_HEADER, f"{topic}/{partition}/{offset}".encode()),
        (REJECTED_BY_HEADER, rejected_by.encode()),
    ]


def header_value(headers: list[tuple[str, bytes]] | None, name: str) -> str | None:
    """One header of a consumed message, decoded, or None."""
    for key, value in headers or []:
        if key == name:
            return value.decode(errors="replace") if value is not None else None
    return None


# --- the dead-letter topic read back --------------------------------------------------------------


def parse_source(text: str | None) -> tuple[str, int, int] | None:
    """A ``periscope.source`` header as (topic, partition, offset); None if it is not one."""
    parts = (text or "").rsplit("/", 2)
    if len(parts) != 3 or not parts[0]:
        return None
    try:
        return parts[0], int(parts[1]), int(parts[2])
    except ValueError:
        return None


def read_dead_letters(reader: KafkaConsumer, dlq_topic: str, rejected_by: str | None = None,
                      since: Mapping[int, int] | None = None, timeout_s: float = DLQ_READ_TIMEOUT_S
                      ) -> tuple[set[tuple[str, int, int]], dict[int, int]]:
    """(source topic, partition, offset) of the dead letters on ``dlq_topic``, and where reading stopped.

    It reads from ``since`` (the next offset per DLQ partition, as an earlier call returned it;
    default: the beginning) to at least the end each partition had when the call started, so a
    caller can keep what it learnt and later read only what was added. ``reader`` is a consumer
    without a group, the caller's (its assignment is replaced); ``rejected_by`` keeps one
    component's dead letters. An incomplete answer could make a caller send a dead letter twice,
    so running out of ``timeout_s`` raises ``KafkaTimeoutError`` instead of returning one.
    """
    deadline = time.monotonic() + timeout_s
    partitions = [TopicPartition(dlq_topic, p) for p in sorted(reader.partitions_for_topic(dlq_topic))]
    if not partitions:
        return set(), {}
    ends = reader.end_offsets(partitions, timeout_ms=int(timeout_s * 1000))
    starts = reader.beginning_offsets(partitions, timeout_ms=int(timeout_s * 1000))
    reader.assign(partitions)
    position = {tp: max(starts[tp], (since or {}).get(tp.partition, 0)) for tp in partitions}
    for tp, offset in position.items():
        reader.seek(tp, offset)
    found: set[tuple[str, int, int]] = set()
    while any(position[tp] < ends[tp] for tp in partitions):
        if time.monotonic() > deadline:
            raise KafkaTimeoutError(f"could not read {dlq_topic} to its end within {timeout_s:.0f} s")
        for records in reader.poll(timeout_ms=200).values():
            for record in records:
                if rejected_by is None or header_value(record.headers, REJECTED_BY_HEADER) == rejected_by:
                    source = parse_source(header_value(record.headers, SOURCE_HEADER))
                    if source is not None:
                        found.add(source)
        position = {tp: reader.position(tp) for tp in partitions}  # past control records and gaps too
    return found, {tp.partition: offset for tp, offset in position.items()}


class DeadLetterLedger:
    """Which records of one source topic have a dead letter (from ``rejected_by``, None: from any
    component): the DLQ read back.

    A process that sends a dead letter and dies before its progress is durable reads that record
    again after the restart; asking the ledger first makes the dead letter exactly once. What is
    on the DLQ topic was sent, by this process before a crash or by the group member that held
    the partition before a rebalance, so the topic is the ledger and nothing else needs to be
    written. It is read only after an assignment (``resume`` marks it stale), as partitions move
    between members only then: whole when a partition comes that it does not hold yet (at start,
    and after every rebalance with kafka-python's default, eager assignors), otherwise only what
    was added since the last read (``catch_up``).

    It tracks the partitions assigned to this process (``release`` one when it is revoked) and
    keeps, per partition, the offsets at or above a floor: where the partition resumes, raised as
    progress becomes durable (``forget_below``), so it holds about one batch's dead letters, not
    the topic's. Offsets this process sent and has not read back yet are kept apart (``sent``),
    so that after a failed send ``on_topic`` tells whether the record landed all the same (only
    its acknowledgement lost) before it is sent again.

    Thread-safe: the group consumer's IO thread calls ``resume`` and ``release``, the others the rest.
    """

    def __init__(self, bootstrap: str, dlq_topic: str, source_topic: str, rejected_by: str | None, client_id: str,
                 **consumer_config: object):
        self.dlq_topic, self.source_topic, self.rejected_by = dlq_topic, source_topic, rejected_by
        self.reader = KafkaConsumer(**{"fetch_max_wait_ms": READER_FETCH_MAX_WAIT_MS, **consumer_config},
                                    bootstrap_servers=bootstrap, client_id=client_id, group_id=None,
                                    enable_auto_commit=False, auto_offset_reset="earliest")
        self.read_to: dict[int, int] = {}
        self.seen: dict[int, set[int]] = {}
        self.sent: dict[int, set[int]] = {}
        self.floor: dict[int, int] = {}
        self.stale = True
        self.lock = threading.Lock()

    def resume(self, partition: int, offset: int | None) -> None:
        """The partition (newly assigned) resumes at ``offset`` (None: at its earliest)."""
        with self.lock:
            self.stale = True
            if partition in self.floor and (offset or 0) >= self.floor[partition]:
                self._drop_below(partition, offset or 0)
            else:  # new here, or behind what was forgotten: only a whole read finds its dead letters
                self.floor[partition], self.read_to = offset or 0, {}

    def release(self, partition: int) -> None:
        """The partition is revoked: forget it (another member may send its dead letters now)."""
        with self.lock:
            for offsets in (self.floor, self.seen, self.sent):
                offsets.pop(partition, None)

    def catch_up(self, timeout_s: float = DLQ_READ_TIMEOUT_S) -> int:
        """Read what the DLQ topic received since the last read; how many are kept (at or after the floors).

        Raises ``KafkaTimeoutError`` (the ledger stays stale) if the topic cannot be read.
        """
        with self.lock:
            found, self.read_to = read_dead_letters(self.reader, self.dlq_topic, self.rejected_by, self.read_to,
                                                    timeout_s)
            for topic, partition, offset in found:
                if topic == self.source_topic and partition in self.floor and offset >= self.floor[partition]:
                    self.seen.setdefault(partition, set()).add(offset)
                    self.sent.get(partition, set()).discard(offset)
            self.stale = False
            return sum(len(offsets) for offsets in self.seen.values())

    def has(self, partition: int, offset: int) -> bool:
        """A dead letter for this record is on the topic or on its way there."""
        with self.lock:
            return offset in self.seen.get(partition, ()) or offset in self.sent.get(partition, ())

    def on_topic(self, partition: int, offset: int) -> bool:
        """A dead letter for this record was read back (as of the last ``catch_up``)."""
        with self.lock:
            return offset in self.seen.get(partition, ())

    def add_sent(self, partition: int, offset: int) -> None:
        with self.lock:
            if offset >= self.floor.get(partition, 0):
                self.sent.setdefault(partition, set()).add(offset)

    def advance(self, partition: int, offset: int) -> None:
        """A batch reads the partition from ``offset`` on, and nothing below it is read again.

        A partition new here resumes there (the topic is read back before the next dead letter);
        a known one forgets below it. The Spark speed layer calls it per micro-batch: Spark runs
        a batch only once the one before is committed in its checkpoint.
        """
        with self.lock:
            known = partition in self.floor
        if known:
            self.forget_below(partition, offset)
        else:
            self.resume(partition, offset)

    def forget_below(self, partition: int, offset: int) -> None:
        """Progress up to ``offset`` is durable: those records are never read again."""
        with self.lock:
            if partition in self.floor and offset > self.floor[partition]:
                self._drop_below(partition, offset)

    def _drop_below(self, partition: int, offset: int) -> None:
        self.floor[partition] = offset
        for offsets in (self.seen, self.sent):
            if partition in offsets:
                offsets[partition] = {o for o in offsets[partition] if o >= offset}

    def close(self) -> None:
        self.reader.close()
