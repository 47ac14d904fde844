"""Shared fixtures: the real shipped sample, a model trained once per session."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from periscope.sources import read_trips

ROOT = Path(__file__).resolve().parent.parent

SAMPLE_CSV = ROOT / "data" / "nyc_taxi_trip_duration_sample.csv.gz"


@pytest.fixture(scope="session")
def sample_csv() -> Path:
    return SAMPLE_CSV


@pytest.fixture(scope="session")
def sample_raw() -> pd.DataFrame:
    """The shipped sample as plain pandas reads the CSV, no Periscope code involved.

    Tests take the figures they expect from it (``len(sample_raw)`` trips, how
    many break a rule, ...), never typed in, so they hold for any sample.
    Treat it as read-only: it is shared by the whole session.
    """
    return pd.read_csv(SAMPLE_CSV)


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
