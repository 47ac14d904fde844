"""The Lambda property end to end, with every part real, duplicates included.

A real broker, ``kafka_producer.py`` and ``kafka_consumer.py`` as processes,
``batch_processor`` ingesting, recomputing and publishing while trips keep
flowing, and trips sent again (the same key and value, to the same partition,
as a restarted producer would): copies of trips the batch version holds,
copies of trips only the speed layer has seen, copies across a publish. At
several moments the combined view (``periscope.serving``) must equal a
from-scratch aggregate of exactly the distinct trips it claims to cover: the
first copy of each id among the events up to the batch watermark or the speed
layer's progress, whichever is further, in each partition, then the cleaning
rules.
"""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

import batch_processor
from periscope import serving, storage, views
from periscope.schema import FIELDS, InvalidTrip, RULE_NAMES, check_rules, parse_json
from tests.conftest import read_topic, views_as_the_batch_layer_holds_them

pytestmark = pytest.mark.kafka

ROOT = Path(__file__).resolve().parent.parent
GROUP = "e2e-speed"


@dataclass(frozen=True)
class Event:
    """One message of the topic, and the trip it holds (None if it cannot be parsed)."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    record: dict | None

    @property
    def valid(self) -> bool:
        return self.record is not None and check_rules(self.record) is None


def topic_events(bootstrap: str, topic: str) -> list[Event]:
    """Every event in the topic, in (partition, offset) order: the source order of stream facts."""
    events = []
    for message in read_topic(bootstrap, topic):
        try:
            record = parse_json(message.value)
        except InvalidTrip:
            record = None
        events.append(Event(message.partition, message.offset, message.key, message.value, record))
    return events


def distinct_trips(events: list[Event], upto: dict[int, int] | None = None) -> pd.DataFrame:
    """The first copy of each trip id among the events at or below ``upto`` per partition (all without),
    with a ``valid`` column: does that first copy pass the cleaning rules."""
    chosen = [e for e in events if e.record is not None and (upto is None or e.offset <= upto.get(e.partition, -1))]
    frame = pd.DataFrame([e.record for e in chosen], columns=list(FIELDS))
    frame["valid"] = [e.valid for e in chosen]
    return frame.drop_duplicates("id", keep="first")


def expected_views(events: list[Event], upto: dict[int, int]) -> dict[str, pd.DataFrame]:
    """A full recompute over exactly the distinct trips among the events at or below ``upto`` per partition."""
    trips = distinct_trips(events, upto)
    trips = trips[trips["valid"]]
    if trips.empty:
        return serving.empty_views()
    return views_as_the_batch_layer_holds_them(trips)


def coverage(combined: serving.Combined) -> dict[int, int]:
    """What a combined view covers: per partition, the batch watermark or the counted speed rows beyond it.

    Speed rows left out as copies, or sent to the dead-letter topic, after the last counted one change
    nothing: they are copies of trips counted before them, or trips that count for nothing.
    """
    upto = dict(combined.watermark)
    if len(combined.speed_rows):
        for partition, last in combined.speed_rows.groupby("partition")["offset"].max().items():
            upto[int(partition)] = max(int(last), upto.get(int(partition), -1))
    return upto


def send_again(bootstrap: str, topic: str, events: list[Event]) -> int:
    """Send these events again, same key and value, to the partition they were in: as a producer that
    restarted would. Returns how many were sent."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    for event in events:
        producer.send(topic, key=event.key, value=event.value, partition=event.partition)
    producer.flush()
    producer.close()
    return len(events)


def committed(bootstrap: str, topic: str, group: str) -> dict[int, int]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
    result = {tp.partition: consumer.committed(tp) or 0 for tp in tps}
    end = consumer.end_offsets(tps)
    consumer.close()
    return {p: end[TopicPartition(topic, p)] - result[p] for p in result}


def wait_until_caught_up(bootstrap: str, topic: str, consumer: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert consumer.poll() is None, "the speed layer died"
        if all(lag == 0 for lag in committed(bootstrap, topic, GROUP).values()):
            return
        time.sleep(0.5)
    raise AssertionError(f"speed layer still lagging after {timeout} s: {committed(bootstrap, topic, GROUP)}")


def produce(bootstrap: str, topic: str, csv: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "kafka_producer.py", "--bootstrap", bootstrap, "--topic", topic,
                             "--input", str(csv), "--progress", "0", "--cutoff", "none", *extra], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def assert_lambda_property(bootstrap: str, topic: str, views_dir: Path, speed_dir: Path) -> serving.Combined:
    combined = serving.combined_views(views_dir, speed_dir)
    expected = expected_views(topic_events(bootstrap, topic), coverage(combined))
    for name in views.VIEWS:
        pd.testing.assert_frame_equal(combined.views[name].reset_index(drop=True),
                                      expected[name].reset_index(drop=True), obj=name)
    assert combined.speed_rows["id"].is_unique and not combined.index_missing
    return combined


def assert_rows_accounted_for(combined: serving.Combined, speed_dir: Path) -> None:
    """Every speed row above the watermark is counted or left out as a copy (none lost, none twice)."""
    above = serving.speed_view.read_speed(speed_dir, combined.watermark)
    assert combined.speed_trips + combined.speed_duplicates == len(above)


def trips_of(bootstrap: str, topic: str, csvs: list[Path]) -> list[Event]:
    """The events on the topic holding trips of these CSV files."""
    ids = set(pd.concat([pd.read_csv(csv, dtype=str, keep_default_na=False) for csv in csvs])["id"])
    return [event for event in topic_events(bootstrap, topic) if event.record and event.record["id"] in ids]


def test_combined_view_equals_a_recompute_over_the_distinct_trips_while_trips_stream_repeat_and_batches_run(
        kafka_bootstrap, topics, trained_model_dir, sample_csv, tmp_path):
    topic, dlq = topics
    raw = pd.read_csv(sample_csv, dtype=str, keep_default_na=False).head(4500)
    chunks = []
    for index in range(3):
        chunks.append(tmp_path / f"chunk{index}.csv")
        raw.iloc[index * 1500:(index + 1) * 1500].to_csv(chunks[-1], index=False)
    master, views_dir, speed_dir = tmp_path / "master", tmp_path / "views", tmp_path / "speed"
    sent_again = 0

    def batch_cycle() -> dict:
        batch_processor.ingest_stream(kafka_bootstrap, topic, "e2e-batch", master)
        return batch_processor.recompute(master, views_dir, workers=1, keep=3, progress=False, speed_dir=speed_dir)

    consumer = subprocess.Popen(
        [sys.executable, "kafka_consumer.py", "--bootstrap", kafka_bootstrap, "--topic", topic, "--dlq-topic", dlq,
         "--group", GROUP, "--speed-dir", str(speed_dir), "--model-dir", str(trained_model_dir)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        # 1. only the speed layer has data; every tenth trip arrives twice
        assert produce(kafka_bootstrap, topic, chunks[0]).wait(timeout=60) == 0
        sent_again += send_again(kafka_bootstrap, topic, topic_events(kafka_bootstrap, topic)[::10])
        wait_until_caught_up(kafka_bootstrap, topic, consumer)
        first = assert_lambda_property(kafka_bootstrap, topic, views_dir, speed_dir)
        assert first.batch_version is None and first.speed_trips > 1400
        assert first.speed_trips == distinct_trips(topic_events(kafka_bootstrap, topic))["valid"].sum()
        assert_rows_accounted_for(first, speed_dir)

        # 2. a batch run covers it all, copies in its master data, each trip once; the speed view is pruned
        manifest = batch_cycle()
        second = assert_lambda_property(kafka_bootstrap, topic, views_dir, speed_dir)
        assert second.batch_version == manifest["version"] and second.speed_trips == 0
        assert second.batch_trips == first.speed_trips
        assert manifest["rows"]["duplicates"] == sent_again

        # 3. trips keep flowing while batch runs ingest, recompute and publish; copies of trips the batch
        #    version holds arrive meanwhile (across a publish)
        producer = produce(kafka_bootstrap, topic, chunks[1], "--rate", "300")  # 5 s: two batch cycles, loaded
        checks = 0
        while producer.poll() is None:
            batcher = threading.Thread(target=batch_cycle)
            batcher.start()
            if checks == 0:
                sent_again += send_again(kafka_bootstrap, topic, trips_of(kafka_bootstrap, topic, chunks[:1])[5::10])
            assert_lambda_property(kafka_bootstrap, topic, views_dir, speed_dir)
            batcher.join()
            assert_lambda_property(kafka_bootstrap, topic, views_dir, speed_dir)
            checks += 1
        assert producer.returncode == 0, producer.stdout.read()
        assert checks >= 2, "the producer finished before the batch layer ran during the stream"

        # 4. the rest, then copies of trips in the batch version, in the speed view only, and not yet
        #    processed; after the speed layer catches up, then after the next batch
        assert produce(kafka_bootstrap, topic, chunks[2]).wait(timeout=60) == 0
        sent_again += send_again(kafka_bootstrap, topic, trips_of(kafka_bootstrap, topic, chunks[1:])[::20])
        wait_until_caught_up(kafka_bootstrap, topic, consumer)
        caught_up = assert_lambda_property(kafka_bootstrap, topic, views_dir, speed_dir)
        assert_rows_accounted_for(caught_up, speed_dir)
        events = topic_events(kafka_bootstrap, topic)
        assert len(events) == 4500 + sent_again
        trips = distinct_trips(events)
        valid = int(trips["valid"].sum())
        assert len(trips) == 4500 and caught_up.batch_trips + caught_up.speed_trips == valid
        batch_cycle()
        final = assert_lambda_property(kafka_bootstrap, topic, views_dir, speed_dir)
        assert final.batch_trips == valid and final.speed_trips == 0
        _, manifest = storage.read_version(views_dir)
        assert sum(manifest["cleaning"][rule] for rule in RULE_NAMES) == 4500 - valid
        assert manifest["rows"]["distinct"] == 4500 and manifest["rows"]["duplicates"] == sent_again
    finally:
        consumer.terminate()
        try:
            consumer.wait(timeout=30)
        except subprocess.TimeoutExpired:
            consumer.kill()
    assert consumer.returncode == 0, consumer.stderr.read()[-3000:]


def test_producer_and_speed_layer_recover_from_a_broker_restart(kafka_bootstrap, topics, trained_model_dir,
                                                                sample_csv, tmp_path):
    topic, dlq = topics
    speed_dir = tmp_path / "speed"
    consumer = subprocess.Popen(
        [sys.executable, "kafka_consumer.py", "--bootstrap", kafka_bootstrap, "--topic", topic, "--dlq-topic", dlq,
         "--group", GROUP, "--speed-dir", str(speed_dir), "--model-dir", str(trained_model_dir)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    producer = produce(kafka_bootstrap, topic, sample_csv, "--rate", "400", "--limit", "3000")
    try:
        started = []
        for line in producer.stdout:  # mid-stream: once the replay has begun to send
            started.append(line)
            if line.startswith("replaying "):
                break
        time.sleep(1.0)
        assert producer.poll() is None, "the producer should still be replaying"
        kafka_bootstrap.stop()
        time.sleep(3)
        kafka_bootstrap.start()
        output, _ = producer.communicate(timeout=120)
        assert producer.returncode == 0, "".join(started) + output
        wait_until_caught_up(kafka_bootstrap, topic, consumer, timeout=120)
    finally:
        consumer.terminate()
        consumer.wait(timeout=30)
    events = topic_events(kafka_bootstrap, topic)
    ids = [event.record["id"] for event in events if event.valid]
    sent = pd.read_csv(sample_csv).sort_values("pickup_datetime", kind="stable").head(3000)
    assert len(events) == 3000, "every trip delivered once: nothing lost, nothing duplicated in the topic"
    rows = serving.speed_view.read_speed(speed_dir)
    assert sorted(rows["id"]) == sorted(ids), "the speed view holds each valid trip exactly once"
    assert set(ids) <= set(sent["id"])
    assert consumer.returncode == 0, consumer.stderr.read()[-3000:]
