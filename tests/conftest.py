"""Shared fixtures: the real shipped sample, a model trained once per session."""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import textwrap
import time
from collections import namedtuple
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import shapely
from shapely.geometry import shape

import batch_processor
from periscope import cluster, kafka_local, speed_view, views, zones
from periscope.dashboard import data
from periscope.model import load_model
from periscope.schema import (FIELDS, NOT_RECORDED, REVENUE_FIELDS, RULE_NAMES, ZONE_FIELDS, first_broken_rule,
                              parse_cutoff)
from periscope.sources import read_trips
from periscope.speed_view import SpeedStatus, StatusLatency, StatusTotals

ROOT = Path(__file__).resolve().parent.parent

SAMPLE_CSV = ROOT / "data" / "nyc_taxi_trip_duration_sample.csv.gz"
SHARED_DATA = Path(os.environ.get("PERISCOPE_SHARED_DATA", ROOT.parent / "shared" / "data"))
"""The workspace's real data beside the project (``../shared/data``): the TLC files in every layout."""
TLC_DIR = SHARED_DATA / "tlc"
MASTER_BEFORE_TLC = ROOT / "tests" / "data" / "master_before_tlc"
"""A master file written by the code before the TLC fields existed, and the 300 Kaggle rows it holds."""
CAB_FILES = sorted(p for p in TLC_DIR.glob("*") if not p.name.startswith("fhv"))
"""The shipped TLC yellow- and green-cab files (the for-hire ones are refused)."""

LONGEST_FIRST = ("test_walkthrough.py", "test_cluster.py", "test_airflow_dags.py", "test_spark_streaming.py",
                 "test_sql_catalog.py", "test_tlc_stream.py", "test_kafka_consumer.py", "test_spark_batch.py")
"""The test files that take longest, started first: with `make test`'s two pytest processes
(pytest-xdist, a file at a time), the long files run beside the many short ones, not last."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: place for place, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


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


@pytest.fixture(scope="session")
def unrelated_process():
    """A process that is not ours (``sleep``), whose pid tests write into pid files: nothing may kill it."""
    sleeper = subprocess.Popen(["sleep", "600"])
    yield sleeper
    sleeper.kill()
    sleeper.wait()


# --- the clusters of periscope.cluster, started once per session, shared by the tests that need them ---


@dataclass(frozen=True)
class SharedClusters:
    """Three Kafka brokers and a Spark master with two workers, and how to bring back a part a test killed."""

    state_dir: Path
    layout: cluster.Layout
    libs: Path

    @property
    def bootstrap(self) -> str:
        return self.layout.bootstrap

    def env(self) -> dict[str, str]:
        """The environment that points every script at the clusters."""
        import os

        return {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap, "SPARK_MASTER": self.layout.spark_master,
                "PYTHONUNBUFFERED": "1"}

    def restart(self) -> None:
        """``python -m periscope.cluster up`` again: starts the parts that died, waits until all answer."""

        cluster.up(self.state_dir, libs_dir=self.libs)


@pytest.fixture(scope="session")
def clusters(tmp_path_factory: pytest.TempPathFactory) -> SharedClusters:
    """The clusters, from a temporary state dir on free ports (never 9192 or 7077), sharing the Kafka jars.

    One start per session (about 40 s on two cores): every cluster test shares
    it, and a test that kills a part restarts it before it ends.
    """
    from periscope import daemons

    state_dir = tmp_path_factory.mktemp("cluster-state")
    ports = daemons.free_ports(10)
    layout = cluster.Layout(tuple(ports[0:3]), tuple(ports[3:6]), ports[6], ports[7], tuple(ports[8:10]))
    libs = kafka_local.BrokerFiles.of(kafka_local.default_state_dir()).libs
    started, _ = cluster.up(state_dir, layout, libs_dir=libs)
    yield SharedClusters(state_dir, started.layout, libs)
    cluster.down(state_dir)


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


def read_topic(bootstrap: str, topic: str) -> list:
    """Every message on ``topic`` up to its end offsets at the call, in (partition, offset) order."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    end = consumer.end_offsets(tps)
    found = []
    while any(consumer.position(tp) < end[tp] for tp in tps):
        for tp, messages in consumer.poll(timeout_ms=1000).items():
            found += [message for message in messages if message.offset < end[tp]]
    consumer.close()
    return sorted(found, key=lambda message: (message.partition, message.offset))


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


# --- the dashboard's data: a batch version, speed files, status files and Airflow runs ----------------
# (tests/test_app.py and tests/test_app_browser.py: AppTest and the real browser read the same data)

TOPIC = "taxi-trips"
WATERMARK = 399
"""The batch version holds offsets 0..399 of each partition; the speed files hold 300..999."""
SPEED_FIRST, SPEED_LAST = 300, 999
PARTITIONS = 3
DLQ_MINUTES = {"duration_too_short": [4, 1], "invalid_json": [2, 0], "pickup_outside_nyc": [0, 3]}


@dataclass
class Demo:
    """Directories the dashboard reads, and the values it must show, computed from the inputs."""

    views_dir: Path
    speed_dir: Path
    model_dir: Path
    airflow_home: Path
    bootstrap: str
    batch_trips: int
    speed_trips: int
    durations: np.ndarray
    stream: pd.DataFrame
    batch_frame: pd.DataFrame
    sample_clean: pd.DataFrame
    rule_counts: dict[str, int]
    duplicates: int
    dlq_total: int
    lag: int


def clean(trips: pd.DataFrame) -> pd.DataFrame:
    return trips[first_broken_rule({name: trips[name].to_numpy() for name in FIELDS[1:]}) < 0]


def stream_trips(sample_trips: pd.DataFrame, model_dir: Path, now_ms: int) -> pd.DataFrame:
    """3,000 clean real trips as consumed from 3 partitions (offsets 0..999), predicted by the real model;
    new trips (ids of their own), not copies of the history's, with the zones of their coordinates as
    the speed layer gives them (``speed_core.validate_batch``)."""
    trips = clean(sample_trips.iloc[-4000:]).tail(PARTITIONS * (SPEED_LAST + 1)).copy().reset_index(drop=True)
    trips["id"] = trips["id"] + "-stream"  # new facts: the imported history holds the originals
    trips["partition"] = np.arange(len(trips)) % PARTITIONS
    trips["offset"] = np.arange(len(trips)) // PARTITIONS
    trips["kafka_timestamp_ms"] = now_ms - 600_000 + trips["offset"] * 500
    trips["visible_at_ms"] = trips["kafka_timestamp_ms"] + 150 + trips["offset"] % 7 * 40
    model = load_model(model_dir)
    trips["predicted_duration_s"] = model.predict_seconds(trips)
    trips["model_version"] = model.version
    for name in ZONE_FIELDS:  # as the speed layers give a Kaggle trip its zones
        trips[name] = zones.zones_at(trips, name.split("_")[0], zones.zone_grid())
    return trips


def write_master_stream(master_dir: Path, trips: pd.DataFrame) -> None:
    for partition, rows in trips[trips["offset"] <= WATERMARK].groupby("partition"):
        batch = [(int(r["offset"]), {n: r[n] for n in FIELDS}, None) for r in rows.to_dict("records")]
        batch_processor.write_stream_file(master_dir, TOPIC, int(partition), batch)


def write_speed_files(speed_dir: Path, trips: pd.DataFrame) -> None:
    """Files of 130 offsets per partition, so one straddles the watermark (as after a real publish)."""
    seen = trips[trips["offset"] >= SPEED_FIRST]
    for partition, rows in seen.groupby("partition"):
        for start in range(0, len(rows), 130):
            speed_view.write_batch(speed_dir, int(partition), rows.iloc[start:start + 130])


def status(consumer: str, state: str, updated_ms: int, lag: dict[int, int], dlq: dict[str, list[int]],
           now_ms: int) -> SpeedStatus:
    """A status file as the speed layers write it: ``speed_view.SpeedStatus``, the format's one definition."""
    history = speed_view.MinuteCounts()
    for reason, per_minute in dlq.items():
        for minutes_ago, count in enumerate(reversed(per_minute)):
            history.add([reason] * count, now_ms - minutes_ago * 60_000)
    totals = {reason: sum(counts) for reason, counts in dlq.items() if sum(counts)}
    return SpeedStatus(consumer_id=consumer, group="periscope-speed", topic=TOPIC, pid=4242, host="test",
                       state=state, member_state="<stable>", updated_at_ms=updated_ms, uptime_s=600.0,
                       assigned_partitions=sorted(lag), positions={p: 1000 for p in lag}, lag=dict(lag),
                       totals=StatusTotals(consumed=3000, valid=3000 - sum(totals.values()), dlq=sum(totals.values()),
                                           dlq_by_reason=totals),
                       dlq_history=history.as_status(), rate_per_s=180.0,
                       latency_ms=StatusLatency(p50=210.0, p99=480.0), model_version="test-v1")


def heartbeat(speed_dir: Path, now_ms: int | None = None) -> None:
    """The running consumer's status, as fresh as its once-a-second write would be."""
    now_ms = now_ms or data.now_ms()
    speed_view.write_status(speed_dir, status("alive", "running", now_ms, {0: 5, 1: 0, 2: 12}, DLQ_MINUTES, now_ms))


AIRFLOW_TABLE = textwrap.dedent("""
    import json, sys
    from datetime import datetime
    from sqlalchemy import create_engine
    from airflow.models.dagrun import DagRun
    engine = create_engine("sqlite:///" + sys.argv[1])
    DagRun.__table__.create(engine)
    rows = json.loads(sys.argv[2])
    for row in rows:
        for key in ("logical_date", "start_date", "end_date", "run_after"):
            row[key] = datetime.fromisoformat(row[key])
    with engine.begin() as connection:
        connection.execute(DagRun.__table__.insert(), rows)
""")


def airflow_database(airflow_home: Path, now: datetime) -> None:
    """Airflow's own ``dag_run`` table (from its SQLAlchemy model, in a child process with its own
    AIRFLOW_HOME, so this test session never configures Airflow) holding four runs."""
    runs = []
    planned = [("periscope_batch", "success", 3), ("periscope_batch", "failed", 1),
               ("periscope_retrain", "success", 5), ("periscope_retrain", "success", 2)]
    for index, (dag, state, hours_ago) in enumerate(planned):
        start = now - timedelta(hours=hours_ago)
        runs.append({"dag_id": dag, "run_id": f"scheduled__{index}", "state": state, "run_type": "scheduled",
                     "log_template_id": None,
                     "logical_date": start.isoformat(), "start_date": start.isoformat(), "run_after": start.isoformat(),
                     "end_date": (start + timedelta(seconds=40 + index)).isoformat()})
    airflow_home.mkdir(parents=True)
    env = {"PATH": "/usr/bin:/bin", "AIRFLOW_HOME": str(airflow_home), "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    subprocess.run([sys.executable, "-c", AIRFLOW_TABLE, str(airflow_home / "airflow.db"), json.dumps(runs)],
                   check=True, env=env, cwd=airflow_home, timeout=120)


def build_demo(root: Path, sample_csv: Path, sample_trips: pd.DataFrame, model_dir: Path) -> Demo:
    """Two batch versions (CSV history, then + stream up to the watermark), speed files, statuses, Airflow runs."""
    now = datetime.now(timezone.utc)
    now_ms = int(now.timestamp() * 1000)
    master, views_dir, speed_dir = root / "master", root / "views", root / "speed"
    history = pd.to_datetime(sample_trips["pickup_datetime"], unit="ms") < pd.Timestamp("2016-06-01")
    batch_processor.import_csv(sample_csv, master, cutoff_ms=parse_cutoff("2016-06-01"))
    batch_processor.import_csv(sample_csv, master)  # the whole file again: its history trips twice
    batch_processor.recompute(master, views_dir, workers=1, keep=3, progress=False)
    trips = stream_trips(sample_trips, model_dir, now_ms)
    write_master_stream(master, trips)
    write_speed_files(speed_dir, trips)
    batch_processor.recompute(master, views_dir, workers=1, keep=3, progress=False)
    heartbeat(speed_dir, now_ms)
    speed_view.write_status(speed_dir, status("gone", "stopped", now_ms - 3_600_000, {0: 7}, {"invalid_json": [1]},
                                              now_ms - 3_600_000))
    airflow_database(root / "airflow", now)

    sample_clean = clean(sample_trips)
    in_batch = trips[trips["offset"] <= WATERMARK]
    above = trips[trips["offset"] > WATERMARK]
    broken = first_broken_rule({name: sample_trips[name].to_numpy() for name in FIELDS[1:]})
    rule_counts = {name: int((broken == index).sum()) for index, name in enumerate(RULE_NAMES)}
    durations = np.concatenate([sample_clean["trip_duration"], in_batch["trip_duration"], above["trip_duration"]])
    return Demo(views_dir, speed_dir, model_dir, root / "airflow", f"127.0.0.1:{kafka_local.free_ports(1)[0]}",
                batch_trips=len(sample_clean) + len(in_batch), speed_trips=len(above), durations=durations,
                stream=above.reset_index(drop=True), batch_frame=pd.concat([sample_clean, in_batch[list(FIELDS)]]),
                sample_clean=sample_clean, rule_counts=rule_counts, duplicates=int(history.sum()),
                dlq_total=sum(map(sum, DLQ_MINUTES.values())) + 1, lag=17)


@pytest.fixture(scope="session")
def demo(tmp_path_factory, sample_csv, sample_trips, trained_model_dir) -> Demo:
    return build_demo(tmp_path_factory.mktemp("dashboard"), sample_csv, sample_trips, trained_model_dir)


# --- TLC files read without Periscope code (tests/test_tlc.py, tests/test_tlc_stream.py) --------------

TLC_MEANING = {
    "vendor_name": "vendor", "vendor_id": "vendor", "vendorid": "vendor",
    "trip_pickup_datetime": "pickup", "pickup_datetime": "pickup", "tpep_pickup_datetime": "pickup",
    "lpep_pickup_datetime": "pickup",
    "trip_dropoff_datetime": "dropoff", "dropoff_datetime": "dropoff", "tpep_dropoff_datetime": "dropoff",
    "lpep_dropoff_datetime": "dropoff",
    "passenger_count": "passengers",
    "start_lon": "plon", "pickup_longitude": "plon", "start_lat": "plat", "pickup_latitude": "plat",
    "end_lon": "dlon", "dropoff_longitude": "dlon", "end_lat": "dlat", "dropoff_latitude": "dlat",
    "pulocationid": "pzone", "pickup_location_id": "pzone", "dolocationid": "dzone", "dropoff_location_id": "dzone",
    "fare_amt": "fare", "fare_amount": "fare", "tip_amt": "tip", "tip_amount": "tip",
    "total_amt": "total", "total_amount": "total", "trip_distance": "distance",
}
RULE_ORDER = ("unknown_vendor", "duration_too_short", "duration_too_long", "duration_mismatch",
              "passenger_count_out_of_range", "pickup_outside_nyc", "dropoff_outside_nyc", "implausible_speed")


def file_text(path: Path) -> bytes:
    return gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()


def independent_tlc(path: Path) -> tuple[pd.DataFrame, np.ndarray]:
    """(every row of a TLC file as pandas reads it, with the tests' own names; which rows are trips)."""
    raw = pd.read_parquet(path) if path.suffix == ".parquet" else \
        pd.read_csv(path, low_memory=False, float_precision="round_trip")  # exact, as a border point needs
    raw.columns = [c.strip().lower() for c in raw.columns]
    raw = raw[[c for c in raw.columns if c in TLC_MEANING]].rename(columns=TLC_MEANING)
    for end in ("pickup", "dropoff"):
        raw[end] = pd.to_datetime(raw[end], format="ISO8601", errors="coerce")
    for name in ("plon", "plat", "dlon", "dlat", "pzone", "dzone"):
        if name not in raw:
            raw[name] = np.nan
    raw["vendor"] = pd.to_numeric(raw["vendor"].map(lambda v: {"CMT": 1, "VTS": 2, "DDS": 3}.get(v, v)))
    placed = [(raw[f"{e}lon"].notna() & raw[f"{e}lat"].notna()) | raw[f"{e}zone"].notna() for e in "pd"]
    ok = (raw["pickup"].notna() & raw["dropoff"].notna() & placed[0] & placed[1]).to_numpy()
    if path.suffix != ".parquet":
        lines = file_text(path).split(b"\n")
        if lines[-1] and lines[-1].count(b",") < lines[0].count(b","):
            ok[-1] = False  # the last line is cut part-way
    return raw, ok


def independent_tlc_rules(trips: pd.DataFrame) -> pd.Series:
    """Name of the first cleaning rule each trip breaks ('' if none), by plain pandas."""
    duration = (trips["dropoff"] - trips["pickup"]).dt.total_seconds() // 1
    lat1, lon1, lat2, lon2 = (np.radians(trips[c]) for c in ("plat", "plon", "dlat", "dlon"))
    h = np.sin((lat2 - lat1) / 2) ** 2 + np.cos(lat1) * np.cos(lat2) * np.sin((lon2 - lon1) / 2) ** 2
    km = 2 * 6371.0088 * np.arcsin(np.sqrt(h))

    def where(end: str) -> pd.Series:
        box = trips[f"{end}lon"].between(-74.3, -73.7) & trips[f"{end}lat"].between(40.5, 41.0)
        no_coordinates = trips[f"{end}lon"].isna() | trips[f"{end}lat"].isna()
        return box | (no_coordinates & trips[f"{end}zone"].between(1, 263))

    keeps = [trips["vendor"].isin([1, 2]), duration >= 60, duration <= 6 * 3600, pd.Series(True, trips.index),
             trips["passengers"].between(1, 6), where("p"), where("d"), ~(km / (duration.clip(lower=1) / 3600) > 120)]
    broken = pd.Series("", index=trips.index)
    for name, keep in zip(RULE_ORDER, keeps):
        broken[(broken == "") & ~keep.to_numpy()] = name
    return broken


def shapely_zones(lon: pd.Series, lat: pd.Series) -> list[int]:
    """The tests' own zone of each point: the lowest id of the shipped polygons holding it, 0 for none
    (each polygon in turn, lowest id first, tested against every point; no spatial index)."""
    with gzip.open(SHARED_DATA / "zones" / "taxi_zones.geojson.gz", "rt", encoding="utf-8") as handle:
        features = json.load(handle)["features"]
    polygons = sorted(((f["properties"]["location_id"], shape(f["geometry"])) for f in features),
                      key=lambda pair: pair[0])
    x, y = np.asarray(lon, dtype=np.float64), np.asarray(lat, dtype=np.float64)
    found = np.zeros(len(x), dtype=np.int64)
    for zone, polygon in polygons:
        found[(found == 0) & shapely.intersects_xy(polygon, x, y)] = zone
    return found.tolist()


def views_as_the_batch_layer_holds_them(trips: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """``views.aggregate`` of clean record-form trips (the Kaggle fields; zones and revenue where they
    have them), each zone its trip did not record being the one ``shapely_zones`` finds for its
    coordinates, as the batch layer gives it on import and ingest."""
    columns = {name: trips[name].to_numpy() for name in FIELDS + REVENUE_FIELDS if name in trips}
    for end in ("pickup", "dropoff"):
        name = f"{end}_location_id"
        found = np.asarray(shapely_zones(trips[f"{end}_longitude"], trips[f"{end}_latitude"]), dtype=np.int64)
        recorded = trips[name].fillna(NOT_RECORDED).to_numpy(np.int64) if name in trips else found
        columns[name] = np.where(recorded == NOT_RECORDED, found, recorded)
    return views.aggregate(columns)
