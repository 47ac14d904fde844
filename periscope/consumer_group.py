"""Kafka machinery of a speed-layer process in a consumer group (``kafka_consumer.py``).

What the process asks of Kafka beside its polls and commits, each behind a
name: a rebalance listener that calls back (``Rebalances``), the group's
committed offsets (``committed_offsets``, with the admin client, as the
rebalance listener may not block on the consumer), how far
behind the log end its partitions are (``assigned_progress``), and how its
dead letters land on the dead-letter topic once each (``DeadLetterSender``,
which ``spark_streaming.py`` uses too), across crashes, rebalances and a
fresh Spark checkpoint, with the topic itself as the record
(``periscope.stream.DeadLetterLedger``).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from kafka import ConsumerRebalanceListener, KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError

from periscope.stream import DeadLetterLedger, dlq_headers

RETRY_PAUSE_S = 1.0
WARNING_INTERVAL_S = 10.0


class Warnings:
    """Log a warning at most every 10 s, so that an outage does not flood the log."""

    def __init__(self, log: logging.Logger, every_s: float = WARNING_INTERVAL_S):
        self.log, self.every_s, self.last = log, every_s, -every_s

    def __call__(self, message: str) -> None:
        if time.monotonic() - self.last >= self.every_s:
            self.last = time.monotonic()
            self.log.warning(message)


class Rebalances(ConsumerRebalanceListener):
    """kafka-python's rebalance listener, calling back with sorted partitions (on its IO thread)."""

    def __init__(self, on_revoked: Callable[[list[TopicPartition]], None],
                 on_assigned: Callable[[list[TopicPartition]], None]):
        self.on_revoked, self.on_assigned = on_revoked, on_assigned

    def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        self.on_revoked(sorted(revoked))

    def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        self.on_assigned(sorted(assigned))


def committed_offsets(admin: KafkaAdminClient, group: str, partitions: list[TopicPartition]
                      ) -> dict[TopicPartition, int]:
    """The group's committed offsets of ``partitions`` (those it has); raises ``KafkaError``."""
    found = admin.list_group_offsets({group: partitions})[group]
    return {tp: meta.offset for tp, meta in found.items() if meta.offset >= 0}


def assigned_progress(consumer: KafkaConsumer) -> tuple[dict[int, int | None], dict[int, int | None]]:
    """Per assigned partition: the next offset to read and the lag behind the log end (None: unknown).

    The log end is asked of the broker every time (raises ``KafkaError`` when it does not answer), so
    a lag is never a stale zero.
    """
    assigned = sorted(consumer.assignment())
    ends = consumer.end_offsets(assigned, timeout_ms=1000) if assigned else {}
    positions = {tp.partition: consumer.position(tp, timeout_ms=1000) for tp in assigned}
    ends = {tp.partition: end for tp, end in ends.items()}
    lag = {p: None if positions[p] is None or p not in ends else max(ends[p] - positions[p], 0) for p in positions}
    return positions, lag


class DeadLetterSender:
    """A speed layer's dead letters: each sent once, acknowledged before its batch's files are written.

    A dead letter goes out only if the ledger (the DLQ topic read back after the last assignment,
    plus what this process sent since) has none for its source offset, sent by either speed
    layer: they are one speed layer over one speed view, so a bad message a restarted or other
    speed layer reads again is dead-lettered once. The producer waits for every replica
    (``acks=all``). A failed send may have landed all the same (only its acknowledgement lost),
    so the topic is read back before anything is sent again.
    """

    def __init__(self, bootstrap: str, dlq_topic: str, source_topic: str, component: str, client_id: str,
                 stopping: Callable[[], bool], log: logging.Logger, warn: Callable[[str], None],
                 **client_config: Any):
        self.dlq_topic, self.component, self.stopping, self.log, self.warn = dlq_topic, component, stopping, log, warn
        self.producer = KafkaProducer(bootstrap_servers=bootstrap, client_id=f"{client_id}-dlq", acks="all",
                                      linger_ms=5, reconnect_backoff_max_ms=client_config["reconnect_backoff_max_ms"])
        self.ledger = DeadLetterLedger(bootstrap, dlq_topic, source_topic, None,
                                       client_id=f"{client_id}-dlq-reader", **client_config)

    def send(self, invalid: Sequence[tuple[Any, str]]) -> list[tuple[Any, str, Any]] | None:
        """Start sending the dead letters not on the ledger: ``(message, reason, future)`` of each one sent.

        After an assignment the ledger is read back first, retried while the topic cannot be read;
        None if told to stop meanwhile (then nothing is sent).
        """
        if invalid and not self.read_back():
            return None
        sent = []
        for message, reason in invalid:
            if not self.ledger.has(message.partition, message.offset):
                self.ledger.add_sent(message.partition, message.offset)
                sent.append((message, reason, self.send_one(message, reason)))
        return sent

    def read_back(self) -> bool:
        while self.ledger.stale:
            started = time.monotonic()
            try:
                known = self.ledger.catch_up()
            except KafkaError as error:
                if self.stopping():
                    return False
                self.warn(f"cannot read the dead-letter topic back ({error!r}); retrying before sending any")
                time.sleep(RETRY_PAUSE_S)
                continue
            self.log.info("dead letters read back from %s in %.2f s: %s at or after the resume offsets, not sent "
                          "again", self.dlq_topic, time.monotonic() - started, f"{known:,}")
        return True

    def send_one(self, message: Any, reason: str) -> Any:
        headers = dlq_headers(reason, message.topic, message.partition, message.offset, self.component)
        return self.producer.send(self.dlq_topic, key=message.key, value=message.value, headers=headers)

    def delivered(self, sent: list[tuple[Any, str, Any]]) -> bool:
        """Block until every dead letter of ``sent`` is acknowledged, re-sending failures; False if told to stop.

        ``sent`` is updated in place: the future of a dead letter found on the topic becomes None.
        """
        while True:
            self.producer.flush()
            failed = [index for index, (_, _, future) in enumerate(sent) if future is not None and future.failed()]
            if not failed:
                return True
            if self.stopping():
                self.log.error("%d dead letters undelivered at shutdown: their batch is neither written nor "
                               "committed, and will be read again on restart", len(failed))
                return False
            self.warn(f"{len(failed)} dead letters not delivered ({sent[failed[0]][2].exception!r}); retrying")
            time.sleep(RETRY_PAUSE_S)
            try:
                self.ledger.catch_up()
            except KafkaError:
                continue
            for index in failed:
                message, reason, _ = sent[index]
                landed = self.ledger.on_topic(message.partition, message.offset)
                sent[index] = (message, reason, None if landed else self.send_one(message, reason))

    def close(self) -> None:
        self.producer.close(timeout=10)
        self.ledger.close()
