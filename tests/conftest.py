"""Shared fixtures: the real shipped sample, a model trained once per session."""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from periscope.sources import read_trips  # noqa: E402

SAMPLE_CSV = ROOT / "data" / "nyc_taxi_trip_duration_sample.csv.gz"


@pytest.fixture(scope="session")
def sample_csv() -> Path:
    return SAMPLE_CSV


@pytest.fixture(scope="session")
def sample_trips() -> pd.DataFrame:
    """Every well-formed trip of the real sample, in record form."""
    trips, report = read_trips(SAMPLE_CSV)
    assert report.rows_malformed == 0
    return trips


@pytest.fixture(scope="session")
def trained_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model trained for real on the shipped sample, once per test session."""
    import train_model

    model_dir = tmp_path_factory.mktemp("model")
    assert train_model.main(["--model-dir", str(model_dir), "--version", "test-v1"]) == 0
    return model_dir


# --- a real Kafka broker, started once per test session ---------------------------


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory):
    """Bootstrap address of a real single-node Kafka broker the fixture starts itself.

    It runs from a temporary state dir on free ports (never the developer's
    broker on 9092) and shares the project's Maven-fetched jars.
    """
    from periscope import kafka_local

    state_dir = tmp_path_factory.mktemp("kafka-state")
    port, controller_port = kafka_local.free_ports(2)
    libs = kafka_local.BrokerFiles.of(kafka_local.default_state_dir()).libs
    info = kafka_local.start_broker(state_dir, port, controller_port, libs_dir=libs)
    yield KafkaTestBroker(info.bootstrap, state_dir, port, controller_port, libs)
    kafka_local.stop_broker(state_dir)


class KafkaTestBroker(str):
    """The bootstrap string, plus what a test needs to stop and restart the broker."""

    def __new__(cls, bootstrap, state_dir, port, controller_port, libs):
        self = super().__new__(cls, bootstrap)
        self.state_dir, self.port, self.controller_port, self.libs = state_dir, port, controller_port, libs
        return self

    def stop(self) -> None:
        from periscope import kafka_local

        kafka_local.stop_broker(self.state_dir)

    def start(self) -> None:
        from periscope import kafka_local

        kafka_local.start_broker(self.state_dir, self.port, self.controller_port, libs_dir=self.libs)


@pytest.fixture
def topics(kafka_bootstrap, request):
    """A fresh ``(trips topic, dlq topic)`` pair for one test: tests never see each other's data."""
    import re
    import uuid

    from periscope import kafka_local

    stem = re.sub(r"[^a-zA-Z0-9]+", "-", request.node.name)[:60] + "-" + uuid.uuid4().hex[:6]
    trips, dlq = f"trips-{stem}", f"dlq-{stem}"
    kafka_local.ensure_topics(kafka_bootstrap, {trips: 3, dlq: 1})
    return trips, dlq


# --- speed-layer test helpers: plain functions, shared by the speed-layer and dashboard tests ---------
# (imported as ``from tests.conftest import ...``, so that no test module imports another)

import time  # noqa: E402
from collections import namedtuple  # noqa: E402

Message = namedtuple("Message", "topic partition offset timestamp key value")
"""A Kafka message as the speed layers read one (the fields of kafka-python's ``ConsumerRecord``)."""


def trip_messages(trips: pd.DataFrame) -> list[tuple[bytes, bytes]]:
    """(key, value) of each trip as the producer sends it: key = id, value = ``schema.record_to_json``."""
    from periscope.schema import record_to_json

    return [(record["id"].encode(), record_to_json(record)) for record in trips.to_dict("records")]


def produce(bootstrap: str, topic: str, messages: list[tuple[bytes | None, bytes | None]]) -> None:
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=10)
    for key, value in messages:
        producer.send(topic, key=key, value=value)
    producer.flush()
    producer.close()


def rule_violations(trips: pd.DataFrame) -> dict[str, str]:
    """id -> name of the first cleaning rule it breaks, for the trips that break one."""
    from periscope.schema import FIELDS, RULE_NAMES, first_broken_rule

    broken = first_broken_rule({name: trips[name].to_numpy() for name in FIELDS})
    return {trip_id: RULE_NAMES[rule] for trip_id, rule in zip(trips["id"], broken) if rule >= 0}


def consumer_args(bootstrap: str, topics: tuple[str, str], speed_dir: Path, model_dir: Path,
                  *extra: str, group: str = "speed", idle: float | None = 2.0) -> list[str]:
    """``kafka_consumer.py`` arguments for a test's topics, speed dir and model."""
    trips_topic, dlq_topic = topics
    idle_args = [] if idle is None else ["--stop-when-idle", str(idle)]
    return ["--bootstrap", bootstrap, "--topic", trips_topic, "--dlq-topic", dlq_topic, "--group", group,
            "--speed-dir", str(speed_dir), "--model-dir", str(model_dir), *idle_args, *extra]


def read_dlq(bootstrap: str, topic: str, expected: int, timeout_s: float = 20.0) -> list:
    """Every message of the dead-letter topic (stops once ``expected`` arrived and a poll adds none)."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False)
    partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
    consumer.assign(partitions)
    consumer.seek_to_beginning(*partitions)
    found, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        batch = [m for messages in consumer.poll(timeout_ms=500).values() for m in messages]
        found += batch
        if len(found) >= expected and not batch:
            break
    consumer.close()
    return found


def assert_exactly_once(rows: pd.DataFrame, expected_ids: set[str]) -> None:
    """Speed rows: one per (partition, offset), one per trip id, and exactly the expected trips."""
    assert not rows.duplicated(["partition", "offset"]).any()
    assert rows["id"].is_unique
    assert set(rows["id"]) == expected_ids


def wait_for(condition, timeout_s: float, what: str, poll_s: float = 0.2):
    """``condition()``'s first true value, asked every ``poll_s``; AssertionError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
