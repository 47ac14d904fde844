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
"""
from __future__ import annotations

import logging
import time

from periscope.kafka_local import is_reachable

REASON_HEADER = "periscope.reason"
SOURCE_HEADER = "periscope.source"
REJECTED_BY_HEADER = "periscope.rejected_by"
MAX_BACKOFF_S = 10.0


class BrokerUnavailable(RuntimeError):
    """The broker did not answer within the allowed time."""


def wait_for_broker(bootstrap: str, purpose: str, timeout_s: float | None = None,
                    log: logging.Logger | None = None) -> None:
    """Block until a Kafka broker answers at ``bootstrap``, backing off 1, 2, 4 ... 10 s.

    Says clearly what it waits for and how to fix it; raises
    ``BrokerUnavailable`` after ``timeout_s`` (never, if None).
    """
    log = log or logging.getLogger(__name__)
    started, delay, attempt = time.monotonic(), 1.0, 1
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
