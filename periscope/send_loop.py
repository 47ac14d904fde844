"""The send loop under ``kafka_producer.py``'s send step: every trip queued when due, every outcome counted.

``send()`` only queues a message; the producer's I/O thread sends it in a
batch, and once every in-sync replica has it (acks=all) its callback runs:
``Deliveries`` counts what the broker answered. The loop does nothing per
trip but ``send()`` and its callbacks (``periscope/producer_tuning.py``);
the ``Pacer`` (``periscope.replay``) holds it back until each trip is due and
until a chunk fits under ``--max-in-flight``.
"""
from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from kafka import KafkaProducer
from kafka.errors import KafkaError, KafkaTimeoutError

from periscope.replay import Chunk, Pacer, value_maker

MAX_ERROR_EXAMPLES = 5
"""Delivery errors kept for the summary; the rest are only counted."""


@dataclass
class Deliveries:
    """What the broker answered for each sent trip, counted by the send's callbacks.

    The callbacks run on kafka-python's I/O thread, or on the sending thread
    when a send has completed before its callback was added: hence the lock.
    """

    delivered: int = 0
    failed: int = 0
    bytes: int = 0
    per_partition: Counter = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def on_delivered(self, metadata: Any) -> None:
        with self.lock:
            self.delivered += 1
            self.bytes += metadata.serialized_key_size + metadata.serialized_value_size
            self.per_partition[metadata.partition] += 1

    def on_failed(self, key: bytes, error: BaseException) -> None:
        with self.lock:
            self.failed += 1
            if len(self.errors) < MAX_ERROR_EXAMPLES:
                self.errors.append(f"{key.decode(errors='replace')}: {type(error).__name__}: {error}")


def topic_partitions(producer: KafkaProducer, topic: str, wait_s: float) -> list[int]:
    """The topic's partitions, asked again while the broker is away (it may restart just now), for up
    to ``wait_s`` seconds; then the ``KafkaTimeoutError`` is raised."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return sorted(producer.partitions_for(topic))
        except KafkaTimeoutError:
            if time.monotonic() >= deadline:
                raise


def send_chunks(producer: KafkaProducer, topic: str, chunks: Iterator[Chunk], deliveries: Deliveries,
                pacer: Pacer) -> str | None:
    """Send every trip, with callbacks counting its delivery; return why sending stopped early, or None.

    A send error (``KafkaError``) stops the loop and is returned; Ctrl-C
    propagates. ``pacer.sent`` is up to date either way.
    """
    send, on_delivered, on_failed = producer.send, deliveries.on_delivered, deliveries.on_failed
    pacer.begin()
    elapsed = 0.0
    for chunk in chunks:
        pacer.wait_for_room(chunk)  # backpressure
        value_of, due, partitions, sent = value_maker(chunk), chunk.due_s, chunk.partitions, chunk.first_index
        try:
            for i, key in enumerate(chunk.keys):
                if due is not None and due[i] > elapsed:  # pacing
                    elapsed = pacer.wait_until(due[i], sent, chunk.pickup_ms[i - 1] if i else None)
                future = send(topic, value=value_of(i), key=key, partition=partitions[i])
                future.add_callback(on_delivered).add_errback(on_failed, key)
                sent += 1
        except KafkaError as error:
            return f"sending {key.decode(errors='replace')} failed: {type(error).__name__}: {error}"
        finally:
            pacer.sent = sent
        pacer.chunk_sent(chunk)  # a progress line once per --progress seconds
    return None
