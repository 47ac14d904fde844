"""The Lambda property end to end, with every part real.

A real broker, ``kafka_producer.py`` and ``kafka_consumer.py`` as processes,
``batch_processor`` ingesting, recomputing and publishing while trips keep
flowing. At several moments the combined view (``periscope.serving``) must
equal a from-scratch aggregate of exactly the events it claims to cover: every
valid event up to the batch watermark or the speed layer's progress, whichever
is further, in each partition.
"""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from kafka import KafkaConsumer, TopicPartition

import batch_processor
from periscope import serving, storage, views
from periscope.schema import InvalidTrip, RULE_NAMES, check_rules, parse_json

pytestmark = pytest.mark.kafka

ROOT = Path(__file__).resolve().parent.parent
GROUP = "e2e-speed"


def topic_events(bootstrap: str, topic: str) -> dict[tuple[int, int], dict | None]:
    """Every event in the topic: (partition, offset) -> valid record, or None if rejected."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    end = consumer.end_offsets(tps)
    events: dict[tuple[int, int], dict | None] = {}
    while any(consumer.position(tp) < end[tp] for tp in tps):
        for tp, messages in consumer.poll(timeout_ms=1000).items():
            for message in messages:
                try:
                    record = parse_json(message.value)
                    events[(tp.partition, message.offset)] = None if check_rules(record) else record
                except InvalidTrip:
                    events[(tp.partition, message.offset)] = None
    consumer.close()
    return events


def expected_views(events: dict[tuple[int, int], dict | None], upto: dict[int, int]) -> dict[str, pd.DataFrame]:
    """A full recompute over exactly the valid events at or below ``upto`` per partition."""
    records = [r for (p, o), r in events.items() if r is not None and o <= upto.get(p, -1)]
    frame = pd.DataFrame(records) if records else None
    if frame is None:
        return serving.empty_views()
    return views.aggregate({name: frame[name].to_numpy() for name in frame.columns})


def coverage(combined: serving.Combined) -> dict[int, int]:
    """What a combined view covers: per partition, the batch watermark or the speed rows beyond it."""
    upto = dict(combined.watermark)
    if len(combined.speed_rows):
        for partition, last in combined.speed_rows.groupby("partition")["offset"].max().items():
            upto[int(partition)] = max(int(last), upto.get(int(partition), -1))
    return upto


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
                             "--input", str(csv), "--progress", "0", *extra], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def assert_lambda_property(bootstrap: str, topic: str, views_dir: Path, speed_dir: Path) -> serving.Combined:
    combined = serving.combined_views(views_dir, speed_dir)
    expected = expected_views(topic_events(bootstrap, topic), coverage(combined))
    for name in views.VIEWS:
        pd.testing.assert_frame_equal(combined.views[name].reset_index(drop=True),
                                      expected[name].reset_index(drop=True), obj=name)
    return combined


def test_combined_view_equals_a_full_recompute_while_trips_stream_and_batches_run(
        kafka_bootstrap, topics, trained_model_dir, sample_csv, tmp_path):
    topic, dlq = topics
    raw = pd.read_csv(sample_csv, dtype=str, keep_default_na=False).head(4500)
    chunks = []
    for index in range(3):
        chunks.append(tmp_path / f"chunk{index}.csv")
        raw.iloc[index * 1500:(index + 1) * 1500].to_csv(chunks[-1], index=False)
    master, views_dir, speed_dir = tmp_path / "master", tmp_path / "views", tmp_path / "speed"

    def batch_cycle() -> dict:
        batch_processor.ingest_stream(kafka_bootstrap, topic, "e2e-batch", master)
        return batch_processor.recompute(master, views_dir, workers=1, keep=3, progress=False, speed_dir=speed_dir)

    consumer = subprocess.Popen(
        [sys.executable, "kafka_consumer.py", "--bootstrap", kafka_bootstrap, "--topic", topic, "--dlq-topic", dlq,
         "--group", GROUP, "--speed-dir", str(speed_dir), "--model-dir", str(trained_model_dir)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        # 1. only the speed layer has data
        assert produce(kafka_bootstrap, topic, chunks[0]).wait(timeout=60) == 0
        wait_until_caught_up(kafka_bootstrap, topic, consumer)
        first = assert_lambda_property(kafka_bootstrap, topic, views_dir, speed_dir)
        assert first.batch_version is None and first.speed_trips > 1400

        # 2. a batch run covers it all; the speed view is pruned
        manifest = batch_cycle()
        second = assert_lambda_property(kafka_bootstrap, topic, views_dir, speed_dir)
        assert second.batch_version == manifest["version"] and second.speed_trips == 0
        assert second.batch_trips == first.speed_trips

        # 3. trips keep flowing while batch runs ingest, recompute and publish
        producer = produce(kafka_bootstrap, topic, chunks[1], "--rate", "600")
        checks = 0
        while producer.poll() is None:
            batcher = threading.Thread(target=batch_cycle)
            batcher.start()
            assert_lambda_property(kafka_bootstrap, topic, views_dir, speed_dir)
            batcher.join()
            assert_lambda_property(kafka_bootstrap, topic, views_dir, speed_dir)
            checks += 1
        assert producer.returncode == 0, producer.stdout.read()
        assert checks >= 2, "the producer finished before the batch layer ran during the stream"

        # 4. everything produced so far, after the speed layer catches up: then after the next batch
        assert produce(kafka_bootstrap, topic, chunks[2]).wait(timeout=60) == 0
        wait_until_caught_up(kafka_bootstrap, topic, consumer)
        caught_up = assert_lambda_property(kafka_bootstrap, topic, views_dir, speed_dir)
        events = topic_events(kafka_bootstrap, topic)
        assert len(events) == 4500
        valid = sum(r is not None for r in events.values())
        assert caught_up.batch_trips + caught_up.speed_trips == valid
        batch_cycle()
        final = assert_lambda_property(kafka_bootstrap, topic, views_dir, speed_dir)
        assert final.batch_trips == valid and final.speed_trips == 0
        _, manifest = storage.read_version(views_dir)
        assert sum(manifest["cleaning"][rule] for rule in RULE_NAMES) == 4500 - valid
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
        time.sleep(2.5)
        assert producer.poll() is None, "the producer should still be replaying"
        kafka_bootstrap.stop()
        time.sleep(3)
        kafka_bootstrap.start()
        output, _ = producer.communicate(timeout=120)
        assert producer.returncode == 0, output
        wait_until_caught_up(kafka_bootstrap, topic, consumer, timeout=120)
    finally:
        consumer.terminate()
        consumer.wait(timeout=30)
    events = topic_events(kafka_bootstrap, topic)
    ids = [r["id"] for r in events.values() if r is not None]
    sent = pd.read_csv(sample_csv).sort_values("pickup_datetime", kind="stable").head(3000)
    assert len(events) == 3000, "every trip delivered once: nothing lost, nothing duplicated in the topic"
    rows = serving.speed_view.read_speed(speed_dir)
    assert sorted(rows["id"]) == sorted(ids), "the speed view holds each valid trip exactly once"
    assert set(ids) <= set(sent["id"])
    assert consumer.returncode == 0, consumer.stderr.read()[-3000:]
