"""Shared fixtures: the real shipped sample, a model trained once per session."""
from __future__ import annotations

import time
from collections import namedtuple
from collections.abc import Callable
from dataclasses import dataclass
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


# --- trips as CSV lines, and the batch views computed without Periscope code ---------------------
# (tests/test_sources.py, tests/test_batch_processor.py, tests/test_spark_batch.py)


@dataclass(frozen=True)
class CsvLines:
    """Kaggle-layout CSV lines: the header, a well-formed trip, and one malformed trip per reason."""

    header: str
    good: str
    bad: dict[str, str]


@pytest.fixture(scope="session")
def csv_lines() -> CsvLines:
    from periscope.schema import FIELDS

    good = "id1,1,2016-02-28 02:23:02,2016-02-28 02:31:08,1,-73.98,40.74,-73.96,40.76,N,486"
    return CsvLines(header=",".join(FIELDS), good=good, bad={
        "bad_datetime": "id2,1,2016-02-30 02:23:02,2016-02-28 02:31:08,1,-73.98,40.74,-73.96,40.76,N,486",
        "wrong_type": "id3,x,2016-02-28 02:23:02,2016-02-28 02:31:08,1,-73.98,40.74,-73.96,40.76,N,486",
        "missing_value": "id4,1,2016-02-28 02:23:02,2016-02-28 02:31:08,,-73.98,40.74,-73.96,40.76,N,486",
    })


def _independent_clean_mask(raw: pd.DataFrame) -> pd.Series:
    """The cleaning rules re-derived with plain pandas, not with periscope code."""
    import numpy as np

    pickup = pd.to_datetime(raw["pickup_datetime"])
    dropoff = pd.to_datetime(raw["dropoff_datetime"])
    d = raw["trip_duration"]
    lat1, lon1, lat2, lon2 = (np.radians(raw[c]) for c in
                              ("pickup_latitude", "pickup_longitude", "dropoff_latitude", "dropoff_longitude"))
    h = np.sin((lat2 - lat1) / 2) ** 2 + np.cos(lat1) * np.cos(lat2) * np.sin((lon2 - lon1) / 2) ** 2
    km = 2 * 6371.0088 * np.arcsin(np.sqrt(h))
    return (
        raw["vendor_id"].isin([1, 2])
        & d.between(60, 6 * 3600)
        & (((dropoff - pickup).dt.total_seconds() - d).abs() <= 1)
        & raw["passenger_count"].between(1, 6)
        & raw["pickup_longitude"].between(-74.3, -73.7) & raw["pickup_latitude"].between(40.5, 41.0)
        & raw["dropoff_longitude"].between(-74.3, -73.7) & raw["dropoff_latitude"].between(40.5, 41.0)
        & (km / (d.clip(lower=1) / 3600) <= 120)
    )


@pytest.fixture(scope="session")
def independent_clean_mask() -> Callable[[pd.DataFrame], pd.Series]:
    """``mask = independent_clean_mask(raw)``: which CSV rows pass the cleaning rules, by plain pandas."""
    return _independent_clean_mask


def _assert_views_match_pandas(batch: dict[str, pd.DataFrame], rows: pd.DataFrame) -> pd.DataFrame:
    """``batch`` holds exactly what plain pandas computes over ``rows`` (CSV rows in source order):
    the first row of each trip id, the cleaning rules re-derived in pandas. Returns the clean trips."""
    import numpy as np

    distinct = rows.drop_duplicates("id", keep="first")
    clean = distinct[_independent_clean_mask(distinct)].copy()
    pickup = pd.to_datetime(clean["pickup_datetime"])
    clean["date"], clean["hour"] = pickup.dt.normalize(), pickup.dt.hour

    hourly = clean.groupby(["date", "hour"])["trip_duration"].agg(["count", "sum", "min", "max"]).reset_index()
    got = batch["hourly_stats"]
    np.testing.assert_array_equal(got["pickup_date"].to_numpy(), hourly["date"].to_numpy())
    np.testing.assert_array_equal(got["pickup_hour"], hourly["hour"])
    for ours, theirs in [("trips", "count"), ("duration_s_sum", "sum"), ("duration_s_min", "min"),
                         ("duration_s_max", "max")]:
        np.testing.assert_array_equal(got[ours], hourly[theirs])
    np.testing.assert_array_equal(got["duration_s_sumsq"], clean.groupby(["date", "hour"])["trip_duration"]
                                  .apply(lambda s: int((s.astype(np.int64) ** 2).sum())).to_numpy())

    vendor = clean.groupby("vendor_id")["trip_duration"].agg(["count", "sum"]).reset_index()
    np.testing.assert_array_equal(batch["vendor_stats"]["trips"], vendor["count"])
    np.testing.assert_array_equal(batch["vendor_stats"]["duration_s_sum"], vendor["sum"])
    daily = clean.groupby("date").size()
    np.testing.assert_array_equal(batch["daily_summary"]["trips"], daily.to_numpy())
    return clean


@pytest.fixture(scope="session")
def assert_views_match_pandas() -> Callable[[dict[str, pd.DataFrame], pd.DataFrame], pd.DataFrame]:
    """``clean = assert_views_match_pandas(batch_views, csv_rows)``: the views against plain pandas."""
    return _assert_views_match_pandas


def _as_csv_rows(trips: pd.DataFrame) -> pd.DataFrame:
    """Record-form trips (times in ms) as the CSV reads them with pandas (times as text)."""
    import numpy as np

    from periscope.schema import FIELDS

    rows = trips[list(FIELDS)].copy()
    for column in ("pickup_datetime", "dropoff_datetime"):
        rows[column] = pd.to_datetime(rows[column], unit="ms").dt.strftime("%Y-%m-%d %H:%M:%S")
    rows["store_and_fwd_flag"] = np.where(trips["store_and_fwd_flag"], "Y", "N")
    return rows


@pytest.fixture(scope="session")
def as_csv_rows() -> Callable[[pd.DataFrame], pd.DataFrame]:
    """``rows = as_csv_rows(trips)``: record-form trips as pandas reads them from a CSV file."""
    return _as_csv_rows


# --- speed-layer test helpers: plain functions, shared by the speed-layer and dashboard tests ---------
# (imported as ``from tests.conftest import ...``, so that no test module imports another)


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
