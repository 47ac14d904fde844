"""Hot-path tuning of ``kafka_producer.py``, in one place: what each choice does and what it buys.

None of it changes what the producer sends; all of it is about how fast
(measured: ``bench/bench_producer.py``, docs/BENCHMARKS.md "Producer").
kafka-python is pure Python, so one core's interpreter sets the ceiling, not
Kafka: the send loop does nothing per trip but ``send()`` and its callbacks,
the rest is done a chunk at a time, and the producer keeps up 30,000-40,000
trips/s.

* **Chunks** of ``CHUNK_TRIPS`` trips: encoding, partitioning, the room check
  and the progress check run once per chunk, not once per trip.
* **Pre-encoded values** (``schema.trips_to_messages``, one string template,
  byte-identical to ``record_to_json``, a test checks it): 4x faster. With
  ``--retime`` each value is made at send time by ``record_to_json`` instead
  (``replay.value_maker``): 13,000-21,000 trips/s.
* **Precomputed partitions** (``partitioner.key_partitions``: the partition
  Kafka's default partitioner picks, murmur2 vectorised), passed to
  ``send()``: about a third less CPU per trip.
* **Batching** (``stream.PRODUCER_CONFIG``, shared with the API-simulation
  DAG): ``linger_ms=10`` and ``batch_size`` 128 KiB, about 400 trips per
  partition and request, no visible delay.
* **The C crc32c package**: without it kafka-python checksums every batch in
  pure Python, 2-3x slower (about 9,500 trips/s against 30,000-40,000);
  ``warn_without_crc32c`` says so at the start.
* **At most** ``DEFAULT_MAX_IN_FLIGHT`` trips unacknowledged (kafka-python 3
  has no ``buffer_memory`` bound): memory stays bounded while the broker
  keeps up.
"""
from __future__ import annotations

import importlib.util
import logging

CHUNK_TRIPS = 1_000
"""Trips encoded, checked for room and checked for progress at a time."""

DEFAULT_MAX_IN_FLIGHT = 20_000
"""``--max-in-flight``: trips sent but not yet acknowledged, at most: about 7 MB of JSON."""


def warn_without_crc32c(log: logging.Logger) -> None:
    """Warn once, at the start, when kafka-python would checksum in pure Python."""
    if importlib.util.find_spec("crc32c") is None:
        log.warning("the crc32c package is not installed, so kafka-python checksums every batch in pure "
                    "Python (2-3x slower): pip install 'kafka-python[crc32c]'")
