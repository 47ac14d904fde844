"""The README's terminal-by-terminal flow, literally, against a real broker: each trip counted once.

The commands are the README's own (defaults and all, the producer at full
speed instead of --rate 200); only the environment points them at this test's
broker, topics and directories. The shipped sample
is imported as history up to the cutoff and replayed from the cutoff on, then
replayed again whole (`--cutoff none`) and from the start (`--from-start`),
so the same trips reach the system two and three times. After every step the
dashboard's merged view must equal an independent pandas computation over the
distinct clean trips that were imported or sent.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from periscope import config, serving, views
from periscope.schema import FIELDS, first_broken_rule, parse_cutoff
from tests.conftest import read_topic, views_as_the_batch_layer_holds_them

pytestmark = pytest.mark.kafka

ROOT = Path(__file__).resolve().parent.parent


def kaggle_frame(raw: pd.DataFrame) -> pd.DataFrame:
    """Kaggle-layout text columns -> record form, with pandas alone (not the project's loader)."""
    trips = pd.DataFrame({"id": raw["id"].astype(str)})
    for name in ("vendor_id", "passenger_count", "trip_duration"):
        trips[name] = pd.to_numeric(raw[name]).astype("int64")
    for name in ("pickup_datetime", "dropoff_datetime"):
        trips[name] = pd.to_datetime(raw[name], format="%Y-%m-%d %H:%M:%S").astype("int64") // 1_000_000
    for name in ("pickup_longitude", "pickup_latitude", "dropoff_longitude", "dropoff_latitude"):
        trips[name] = pd.to_numeric(raw[name]).astype("float64")
    trips["store_and_fwd_flag"] = raw["store_and_fwd_flag"].astype(str) == "Y"
    return trips[list(FIELDS)]


def topic_trips(bootstrap: str, topic: str) -> pd.DataFrame:
    """Every message on the topic, in (partition, offset) order, parsed with json alone."""
    rows = [json.loads(message.value) for message in read_topic(bootstrap, topic)]
    return kaggle_frame(pd.DataFrame(rows, columns=list(FIELDS), dtype=str))


def distinct_clean_views(*sources: pd.DataFrame) -> tuple[dict[str, pd.DataFrame], int]:
    """The views of the distinct trips (first copy counts) that pass the cleaning rules."""
    trips = pd.concat(sources, ignore_index=True).drop_duplicates("id", keep="first")
    clean = trips[first_broken_rule({name: trips[name].to_numpy() for name in FIELDS}) < 0]
    return views_as_the_batch_layer_holds_them(clean), len(clean)


class Terminal:
    """Runs README commands with this test's broker, topics and directories in the environment."""

    def __init__(self, bootstrap: str, topics: tuple[str, str], model_dir: Path, base: Path):
        self.env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "PERISCOPE_TRIPS_TOPIC": topics[0],
                    "PERISCOPE_DLQ_TOPIC": topics[1], "PERISCOPE_DATA_DIR": str(base / "data"),
                    "PERISCOPE_SAMPLE_CSV": str(config.SAMPLE_CSV), "PERISCOPE_MODEL_DIR": str(model_dir),
                    "PERISCOPE_STATE_DIR": str(base / "var"), "PERISCOPE_SPEED_GROUP": f"speed-{topics[0]}",
                    "PERISCOPE_BATCH_GROUP": f"batch-{topics[0]}", "PYTHONUNBUFFERED": "1"}
        self.views_dir, self.speed_dir = base / "data" / "views", base / "data" / "speed"

    def run(self, command: str, timeout: float = 240) -> str:
        result = subprocess.run([sys.executable, *command.split()], cwd=ROOT, env=self.env, capture_output=True,
                                text=True, timeout=timeout)
        assert result.returncode == 0, f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        return result.stdout + result.stderr

    def merged(self) -> serving.Combined:
        return serving.combined_views(self.views_dir, self.speed_dir)


def assert_counts_each_trip_once(terminal: Terminal, *sources: pd.DataFrame) -> serving.Combined:
    expected, clean = distinct_clean_views(*sources)
    merged = terminal.merged()
    assert merged.batch_trips + merged.speed_trips == clean
    for name in views.VIEWS:
        pd.testing.assert_frame_equal(merged.views[name].reset_index(drop=True),
                                      expected[name].reset_index(drop=True), obj=name)
    return merged


def test_the_readme_flow_counts_every_trip_once(kafka_bootstrap, topics, trained_model_dir, tmp_path):
    terminal = Terminal(kafka_bootstrap, topics, trained_model_dir, tmp_path)
    sample = kaggle_frame(pd.read_csv(config.SAMPLE_CSV, dtype=str, keep_default_na=False))
    cutoff = parse_cutoff(config.CUTOFF)
    history = sample[sample["pickup_datetime"] < cutoff]
    stream_part = sample[sample["pickup_datetime"] >= cutoff]
    assert 0 < len(history) < len(sample)

    # terminal 5: import the history (before the cutoff), ingest the (empty) stream, publish
    output = terminal.run("batch_processor.py run --from-stream")
    assert f"{len(history):,}" in output
    assert_counts_each_trip_once(terminal, history)

    # terminal 4 then 3: replay from the cutoff on; the speed layer drains the topic
    output = terminal.run("kafka_producer.py")
    assert f"{len(stream_part):,}" in output
    terminal.run("kafka_consumer.py --stop-when-idle 3")
    merged = assert_counts_each_trip_once(terminal, history, topic_trips(kafka_bootstrap, topics[0]))
    assert merged.speed_trips > 0, "the speed layer's part is the June stream"
    assert pd.Timestamp(merged.speed_rows["pickup_datetime"].min(), unit="ms") >= pd.Timestamp(config.CUTOFF)

    # the same file again, whole: the history trips reach the stream a second time
    output = terminal.run("kafka_producer.py --cutoff none")
    assert f"resuming after {len(stream_part):,} trips already on {topics[0]}" in output
    terminal.run("kafka_consumer.py --stop-when-idle 3")
    on_topic = topic_trips(kafka_bootstrap, topics[0])
    assert len(on_topic) == len(sample) and on_topic["id"].is_unique, "resuming sends no trip twice"
    assert_counts_each_trip_once(terminal, history, on_topic)

    # the batch layer ingests it all: the stream copies of history trips are duplicates
    terminal.run("batch_processor.py run --from-stream")
    merged = assert_counts_each_trip_once(terminal, history, on_topic)
    assert merged.manifest["rows"]["duplicates"] == len(history)
    assert merged.manifest["rows"]["distinct"] == sample["id"].nunique()

    # replayed from the start: every trip is on the topic twice now, still counted once
    terminal.run("kafka_producer.py --from-start")
    terminal.run("kafka_consumer.py --stop-when-idle 3")
    on_topic = topic_trips(kafka_bootstrap, topics[0])
    assert len(on_topic) == len(sample) + len(stream_part)
    assert_counts_each_trip_once(terminal, history, on_topic)
    terminal.run("batch_processor.py run --from-stream")
    assert_counts_each_trip_once(terminal, history, on_topic)
    assert np.array_equal(np.sort(on_topic["id"].unique()), np.sort(sample["id"].unique()))
