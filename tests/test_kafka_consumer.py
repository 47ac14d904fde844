"""The plain-Python speed layer (kafka_consumer.py) against a real broker, plus its own pure functions.

What both speed layers share (validation, rows, statistics, the status file, the model watcher) is
tested in ``test_speed_core.py``; helpers shared with other test modules are in ``conftest.py``.

Broker tests produce real trips with a plain KafkaProducer (key = id, value =
``schema.record_to_json``) and run the consumer for real: in-process through
``main([...])`` or as a subprocess when it must be killed or run twice at once.
"""
from __future__ import annotations

import hashlib
import json
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition

import kafka_consumer
from periscope import schema, speed_core, speed_view, stream
from periscope.schema import FIELDS, first_broken_rule
from tests.conftest import (assert_exactly_once, consumer_args, produce, read_dlq, rule_violations, trip_messages,
                            wait_for)

ROOT = Path(__file__).resolve().parent.parent


# --- helpers ------------------------------------------------------------------------------------


def start_consumer(args: list[str], log_path: Path) -> subprocess.Popen:
    with open(log_path, "ab") as log:
        return subprocess.Popen([sys.executable, "kafka_consumer.py", *args], cwd=ROOT,
                                stdout=log, stderr=subprocess.STDOUT)


def dlq_reason(message) -> str:
    return stream.header_value(message.headers, stream.REASON_HEADER)


def speed_snapshot(speed_dir: Path) -> dict[str, tuple[int, str]]:
    """File name -> (mtime in ns, sha256) of every speed file."""
    return {str(path.relative_to(speed_dir)): (path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
            for _, _, _, path in speed_view.batch_files(speed_dir)}


# --- pure functions ------------------------------------------------------------------------------


def test_a_partition_resumes_past_its_commit_and_past_its_speed_files():
    assert kafka_consumer.resume_offset(None, None) is None
    assert kafka_consumer.resume_offset(120, None) == 120
    assert kafka_consumer.resume_offset(None, 99) == 100
    assert kafka_consumer.resume_offset(100, 149) == 150  # written but not committed: skip what is on disk
    assert kafka_consumer.resume_offset(180, 149) == 180  # an all-invalid tail was committed after the file


def test_dead_letter_sources_parse_back():
    headers = stream.dlq_headers("invalid_json: x", "trips-a/b", 2, 41, "kafka_consumer")
    assert stream.parse_source(stream.header_value(headers, stream.SOURCE_HEADER)) == ("trips-a/b", 2, 41)
    for text in (None, "", "trips", "trips/1", "/1/2", "trips/x/2", "trips/1/2.5"):
        assert stream.parse_source(text) is None


def test_bad_arguments_are_explained(capsys):
    for argv, message in ((["--max-records", "0"], "--max-records must be at least 1"),
                          (["--stop-when-idle", "-1"], "--stop-when-idle must be a positive"),
                          (["--consumer-id", "a/b"], "--consumer-id must be a plain file name")):
        with pytest.raises(SystemExit) as exit_info:
            kafka_consumer.parse_args(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


# --- against a real broker -----------------------------------------------------------------------


@pytest.mark.kafka
def test_each_valid_trip_lands_once_and_violators_go_to_the_dlq(kafka_bootstrap, topics, trained_model_dir,
                                                                 sample_trips, tmp_path):
    trips = sample_trips.head(3000)
    violations = rule_violations(trips)
    assert 10 < len(violations) < 200, "the real sample's outliers are part of the test"
    produce(kafka_bootstrap, topics[0], trip_messages(trips))

    speed_dir = tmp_path / "speed"
    args = consumer_args(kafka_bootstrap, topics, speed_dir, trained_model_dir, "--consumer-id", "solo")
    assert kafka_consumer.main(args) == 0

    rows = speed_view.read_speed(speed_dir)
    assert len(rows) == len(trips) - len(violations)
    assert_exactly_once(rows, set(trips["id"]) - set(violations))
    assert np.isfinite(rows["predicted_duration_s"]).all() and (rows["predicted_duration_s"] > 0).all()
    assert (rows["model_version"] == "test-v1").all()
    assert (rows["visible_at_ms"] >= rows["kafka_timestamp_ms"]).all()
    produced = trips.set_index("id").loc[rows["id"]]
    for name in ("pickup_datetime", "trip_duration", "dropoff_longitude", "store_and_fwd_flag"):
        assert (rows[name].to_numpy() == produced[name].to_numpy()).all()

    dead = read_dlq(kafka_bootstrap, topics[1], len(violations))
    assert {m.key.decode(): dlq_reason(m) for m in dead} == violations
    assert len(dead) == len(violations)

    status = speed_view.read_statuses(speed_dir)[0]
    assert status["consumer_id"] == "solo" and status["state"] == "stopped"
    assert status["totals"]["consumed"] == len(trips) and status["totals"]["dlq"] == len(violations)
    assert status["total_lag"] == 0 and status["assigned_partitions"] == [0, 1, 2]
    assert status["live_error"]["cumulative"]["rows"] == len(rows)
    assert 0 < status["live_error"]["cumulative"]["rmsle"] < 1


@pytest.mark.kafka
def test_kill_9_mid_stream_then_restart_loses_and_duplicates_nothing(kafka_bootstrap, topics, trained_model_dir,
                                                                     sample_trips, tmp_path):
    trips = sample_trips.head(15_000)
    expected = set(trips["id"]) - set(rule_violations(trips))
    produce(kafka_bootstrap, topics[0], trip_messages(trips))
    speed_dir = tmp_path / "speed"

    slow = start_consumer(consumer_args(kafka_bootstrap, topics, speed_dir, trained_model_dir,
                                        "--max-records", "100", idle=30), tmp_path / "first.log")
    try:
        wait_for(lambda: len(speed_view.batch_files(speed_dir)) >= 6, 60, "the first speed files")
    finally:
        slow.send_signal(signal.SIGKILL)
        slow.wait()
    written = len(speed_view.read_speed(speed_dir))
    assert 0 < written < len(expected), "the consumer must be killed mid-stream"

    again = start_consumer(consumer_args(kafka_bootstrap, topics, speed_dir, trained_model_dir), tmp_path / "again.log")
    assert again.wait(timeout=90) == 0, (tmp_path / "again.log").read_text()
    assert_exactly_once(speed_view.read_speed(speed_dir), expected)
    assert "resuming at offset" in (tmp_path / "again.log").read_text()


def malformed_messages(good: dict) -> list[tuple[bytes | None, bytes | None, str]]:
    """(key, value, expected reason code) of a dozen ways a message can be broken."""
    message = schema.record_to_message(good)

    def variant(**changes) -> bytes:
        return json.dumps({**message, **changes}).encode()

    def without(name: str) -> bytes:
        return json.dumps({k: v for k, v in message.items() if k != name}).encode()

    return [
        (b"bad-json", b'{"id": "x", "vendor_id": 2', "invalid_json"),
        (b"bad-array", b"[1, 2, 3]", "invalid_json"),
        (b"bad-string", b'"just text"', "invalid_json"),
        (b"bad-utf8", b'{"id": "\xff\xfe"}', "invalid_json"),
        (b"bad-empty", b"", "empty_message"),
        (b"bad-tombstone", None, "empty_message"),
        (b"bad-missing", without("trip_duration"), "missing_field"),
        (b"bad-type", variant(passenger_count="three"), "wrong_type"),
        (b"bad-huge", variant(vendor_id=10**30), "wrong_type"),
        (b"bad-flag", variant(store_and_fwd_flag=7), "wrong_type"),
        (b"bad-date", variant(pickup_datetime="2016-02-30 10:00:00"), "bad_datetime"),
        (b"bad-id", variant(id="  "), "missing_value"),
        (b"bad-ocean", variant(pickup_longitude=-72.5, pickup_latitude=40.2), "pickup_outside_nyc"),
        (b"bad-negative", variant(trip_duration=-300), "duration_too_short"),
        (b"bad-vendor", variant(vendor_id=9), "unknown_vendor"),
        (None, b"\x00\x01\x02", "invalid_json"),
    ]


@pytest.mark.kafka
def test_malformed_messages_go_to_the_dlq_with_their_bytes_and_reason(kafka_bootstrap, topics, trained_model_dir,
                                                                     sample_trips, tmp_path):
    clean = sample_trips[first_broken_rule({n: sample_trips[n].to_numpy() for n in FIELDS}) < 0].head(2400)
    bad = malformed_messages(clean.iloc[0].to_dict()) * 2  # each kind twice: about 1 % of the stream
    mixed = trip_messages(clean) + [(key, value) for key, value, _ in bad]
    produce(kafka_bootstrap, topics[0], [mixed[i] for i in np.random.default_rng(11).permutation(len(mixed))])

    speed_dir = tmp_path / "speed"
    assert kafka_consumer.main(consumer_args(kafka_bootstrap, topics, speed_dir, trained_model_dir)) == 0

    assert_exactly_once(speed_view.read_speed(speed_dir), set(clean["id"]))
    dead = read_dlq(kafka_bootstrap, topics[1], len(bad))
    assert len(dead) == len(bad)
    got = Counter((m.key, m.value, speed_core.reason_code(dlq_reason(m))) for m in dead)
    assert got == Counter(bad)
    for m in dead:
        source = stream.header_value(m.headers, stream.SOURCE_HEADER)
        assert source.startswith(f"{topics[0]}/") and len(source.split("/")) == 3
        assert stream.header_value(m.headers, stream.REJECTED_BY_HEADER) == "kafka_consumer"
    status = speed_view.read_statuses(speed_dir)[0]
    assert status["totals"]["dlq_by_reason"]["invalid_json"] == 10
    assert status["totals"]["valid"] == len(clean)


@pytest.mark.kafka
def test_two_consumers_in_one_group_split_the_partitions(kafka_bootstrap, topics, trained_model_dir,
                                                         sample_trips, tmp_path):
    backlog, live = sample_trips.iloc[20_000:32_000], sample_trips.iloc[32_000:36_000]
    both = pd.concat([backlog, live])
    produce(kafka_bootstrap, topics[0], trip_messages(backlog))  # the first to join is busy when the second joins
    speed_dir = tmp_path / "speed"
    processes = [start_consumer(consumer_args(kafka_bootstrap, topics, speed_dir, trained_model_dir, "--max-records",
                                              "100", "--consumer-id", name, group="pair", idle=5),
                                tmp_path / f"{name}.log") for name in ("left", "right")]
    try:
        def split() -> bool:
            statuses = {s["consumer_id"]: s for s in speed_view.read_statuses(speed_dir)}
            parts = [set(statuses.get(name, {}).get("assigned_partitions", [])) for name in ("left", "right")]
            return all(parts) and not parts[0] & parts[1] and parts[0] | parts[1] == {0, 1, 2}

        wait_for(split, 60, "both consumers to hold partitions")
        produce(kafka_bootstrap, topics[0], trip_messages(live))
        for process, name in zip(processes, ("left", "right")):
            assert process.wait(timeout=90) == 0, (tmp_path / f"{name}.log").read_text()
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert_exactly_once(speed_view.read_speed(speed_dir), set(both["id"]) - set(rule_violations(both)))
    totals = [s["totals"]["consumed"] for s in speed_view.read_statuses(speed_dir)]
    assert len(totals) == 2 and all(totals) and sum(totals) >= len(both)


@pytest.mark.kafka
def test_reprocessing_with_a_new_group_rewrites_nothing(kafka_bootstrap, topics, trained_model_dir,
                                                        sample_trips, tmp_path):
    trips = sample_trips.iloc[30_000:32_000]
    produce(kafka_bootstrap, topics[0], trip_messages(trips))
    speed_dir = tmp_path / "speed"
    assert kafka_consumer.main(consumer_args(kafka_bootstrap, topics, speed_dir, trained_model_dir,
                                             group="first")) == 0
    before, rows_before = speed_snapshot(speed_dir), speed_view.read_speed(speed_dir)
    assert len(rows_before) == len(trips) - len(rule_violations(trips))

    assert kafka_consumer.main(consumer_args(kafka_bootstrap, topics, speed_dir, trained_model_dir,
                                             group="second", idle=1)) == 0
    assert speed_snapshot(speed_dir) == before
    pd.testing.assert_frame_equal(speed_view.read_speed(speed_dir), rows_before)


@pytest.mark.kafka
def test_survives_a_broker_restart_and_stops_cleanly_on_sigterm(kafka_bootstrap, topics, trained_model_dir,
                                                                sample_trips, tmp_path):
    before, after = sample_trips.iloc[40_000:45_000], sample_trips.iloc[45_000:50_000]
    both = pd.concat([before, after])
    expected = set(both["id"]) - set(rule_violations(both))
    produce(kafka_bootstrap, topics[0], trip_messages(before))
    speed_dir, log = tmp_path / "speed", tmp_path / "consumer.log"
    consumer = start_consumer(consumer_args(kafka_bootstrap, topics, speed_dir, trained_model_dir, "--max-records",
                                            "200", "--consumer-id", "survivor", idle=None), log)
    try:
        wait_for(lambda: len(speed_view.batch_files(speed_dir)) >= 3, 60, "the first speed files")
        kafka_bootstrap.stop()
        time.sleep(2)
        assert consumer.poll() is None, "the consumer must outlive the broker"
        kafka_bootstrap.start()
        produce(kafka_bootstrap, topics[0], trip_messages(after))
        wait_for(lambda: len(speed_view.read_speed(speed_dir)) >= len(expected), 90, "every trip in the speed view")
        consumer.send_signal(signal.SIGTERM)
        assert consumer.wait(timeout=30) == 0, log.read_text()
    finally:
        if consumer.poll() is None:
            consumer.kill()
            consumer.wait()
    assert_exactly_once(speed_view.read_speed(speed_dir), expected)
    status = speed_view.read_statuses(speed_dir)[0]
    assert status["state"] == "stopped" and status["totals"]["consumed"] >= len(both)
    assert "SIGTERM received" in log.read_text() and "stopped after" in log.read_text()


@pytest.mark.kafka
def test_a_missing_topic_is_a_clear_error(kafka_bootstrap, trained_model_dir, tmp_path, capsys):
    args = consumer_args(kafka_bootstrap, ("no-such-trips", "no-such-dlq"), tmp_path / "speed", trained_model_dir)
    assert kafka_consumer.main(args) == 2
    assert "no-such-trips, no-such-dlq do not exist" in capsys.readouterr().err


# --- dead letters exactly once across kill -9 --------------------------------------------------------


def produce_located(bootstrap: str, topic: str, messages: list[tuple[bytes | None, bytes | None]]
                    ) -> list[tuple[int, int]]:
    """Send the messages; (partition, offset) where each one landed, in order."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=10)
    futures = [producer.send(topic, key=key, value=value) for key, value in messages]
    producer.flush()
    located = [(meta.partition, meta.offset) for meta in (future.get(timeout=30) for future in futures)]
    producer.close()
    return located


def stream_with_bad_messages(bootstrap: str, topic: str, trips: pd.DataFrame, seed: int
                             ) -> tuple[set[tuple[int, int]], set[str]]:
    """Produce the trips with about 1 % malformed messages mixed in, in random order.

    Returns the bad offsets ((partition, offset) of every malformed message and of every trip
    breaking a cleaning rule, known from how the stream was built) and the ids of the good trips.
    """
    violators = set(rule_violations(trips))
    kinds = malformed_messages(trips[~trips["id"].isin(violators)].iloc[0].to_dict())
    bad = [(None if key is None else key + b"-%d" % i, value)
           for i, (key, value, _) in enumerate(kinds * (len(trips) // 100 // len(kinds) + 1))]
    messages = [(m, False) for m in trip_messages(trips)] + [(m, True) for m in bad]
    messages = [messages[i] for i in np.random.default_rng(seed).permutation(len(messages))]
    located = produce_located(bootstrap, topic, [m for m, _ in messages])
    bad_offsets = {where for where, ((key, _), malformed) in zip(located, messages)
                   if malformed or key.decode() in violators}
    assert 0.01 < len(bad_offsets) / len(messages) < 0.03
    return bad_offsets, set(trips["id"]) - violators


class DeadLetterWatch:
    """The dead-letter topic read as it grows: the source (partition, offset) of each new dead letter."""

    def __init__(self, bootstrap: str, dlq_topic: str):
        self.consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=10)
        partitions = [TopicPartition(dlq_topic, p) for p in self.consumer.partitions_for_topic(dlq_topic)]
        self.consumer.assign(partitions)
        self.consumer.seek_to_beginning(*partitions)
        self.sources: list[tuple[int, int]] = []

    def new(self) -> list[tuple[int, int]]:
        found = [stream.parse_source(stream.header_value(m.headers, stream.SOURCE_HEADER))[1:]
                 for messages in self.consumer.poll(timeout_ms=20).values() for m in messages]
        self.sources += found
        return found

    def distinct(self) -> set[tuple[int, int]]:
        self.new()
        return set(self.sources)

    def close(self) -> None:
        self.consumer.close()


def kill_9(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait()


def read_again_after_restart(bootstrap: str, topic: str, group: str, speed_dir: Path,
                             sources: list[tuple[int, int]]) -> set[tuple[int, int]]:
    """The dead-lettered offsets a restarted consumer reads again: at or after where their partition resumes."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    committed = {tp.partition: meta.offset for tp, meta in admin.list_group_offsets({group: None})[group].items()
                 if tp.topic == topic and meta.offset >= 0}
    admin.close()
    on_disk = speed_view.last_offsets(speed_dir)
    resume = {p: kafka_consumer.resume_offset(committed.get(p), on_disk.get(p)) for p, _ in sources}
    return {(p, o) for p, o in sources if resume[p] is None or o >= resume[p]}


def kill_9_while_dead_letters_outrun_progress(process: subprocess.Popen, watch: DeadLetterWatch, bootstrap: str,
                                              topic: str, group: str, speed_dir: Path,
                                              partitions: set[int] | None = None,
                                              timeout_s: float = 90) -> set[tuple[int, int]]:
    """``kill -9`` when dead letters are on the topic whose messages a restart would read again.

    At each new dead letter the process is frozen (SIGSTOP) while its progress is checked (speed files,
    committed offsets), then killed if some are ahead of it (returned), or let go on. Without the
    freeze the moment is a race the test often loses: a batch's file follows its dead letters by
    milliseconds.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        if not [source for source in watch.new() if partitions is None or source[0] in partitions]:
            continue
        process.send_signal(signal.SIGSTOP)
        time.sleep(0.2)  # what it sent before the freeze (a commit, dead letters) reaches the broker
        mine = [source for source in watch.sources if partitions is None or source[0] in partitions]
        ahead = read_again_after_restart(bootstrap, topic, group, speed_dir, mine)
        if ahead:
            kill_9(process)
            return ahead
        process.send_signal(signal.SIGCONT)
    raise AssertionError("no dead letter was seen ahead of the consumer's progress")


def assert_each_bad_offset_dead_lettered_once(bootstrap: str, topics: tuple[str, str],
                                              bad_offsets: set[tuple[int, int]]) -> None:
    dead = read_dlq(bootstrap, topics[1], len(bad_offsets))
    sources = Counter(stream.parse_source(stream.header_value(m.headers, stream.SOURCE_HEADER)) for m in dead)
    twice = {source: n for source, n in sources.items() if n > 1}
    assert not twice, f"{len(twice)} offsets dead-lettered more than once, e.g. {sorted(twice.items())[:5]}"
    assert set(sources) == {(topics[0], p, o) for p, o in bad_offsets}


def send_dead_letters(bootstrap: str, dlq_topic: str, sources: list[tuple[str, int, int, str]]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    for topic, partition, offset, component in sources:
        producer.send(dlq_topic, value=b"x", headers=stream.dlq_headers("r", topic, partition, offset, component))
    producer.flush()
    producer.close()


@pytest.mark.kafka
def test_the_dead_letter_ledger_reads_the_topic_back(kafka_bootstrap, topics):
    trips, dlq = topics
    send_dead_letters(kafka_bootstrap, dlq, [(trips, 0, 5, "kafka_consumer"), (trips, 0, 9, "kafka_consumer"),
                                             (trips, 1, 3, "kafka_consumer"), (trips, 2, 7, "spark_streaming"),
                                             ("other-trips", 0, 11, "kafka_consumer")])
    reader = KafkaConsumer(bootstrap_servers=kafka_bootstrap)
    found, read_to = stream.read_dead_letters(reader, dlq, "kafka_consumer")
    assert found == {(trips, 0, 5), (trips, 0, 9), (trips, 1, 3), ("other-trips", 0, 11)} and read_to == {0: 5}
    assert stream.read_dead_letters(reader, dlq, since=read_to) == (set(), {0: 5})
    reader.close()

    ledger = stream.DeadLetterLedger(kafka_bootstrap, dlq, trips, "kafka_consumer", client_id="ledger")
    ledger.resume(0, 6)
    ledger.resume(2, None)
    assert ledger.stale and ledger.catch_up() == 1 and not ledger.stale
    assert ledger.has(0, 9) and not ledger.has(0, 5) and not ledger.has(2, 7), "below the resume point; Spark's"
    assert not ledger.has(1, 3), "partition 1 is not assigned here"
    ledger.add_sent(2, 8)
    assert ledger.has(2, 8) and not ledger.on_topic(2, 8)
    send_dead_letters(kafka_bootstrap, dlq, [(trips, 2, 8, "kafka_consumer"), (trips, 0, 12, "kafka_consumer")])
    ledger.resume(0, 8)  # after a rebalance: only what was added is read
    assert ledger.catch_up() == 3 and ledger.on_topic(2, 8) and ledger.has(0, 12) and ledger.read_to == {0: 7}
    ledger.forget_below(0, 10)
    assert not ledger.has(0, 9) and ledger.has(0, 12)
    ledger.release(2)  # revoked: another member may send its dead letters now
    assert not ledger.has(2, 8)
    ledger.resume(0, 10)  # where it forgot up to: nothing to read again
    assert ledger.catch_up() == 1 and ledger.read_to == {0: 7} and ledger.has(0, 12)
    ledger.resume(0, 0)  # behind what was forgotten (the speed files pruned, no commit): a whole read again
    ledger.resume(1, 0)
    ledger.resume(2, 8)  # new here again: a whole read too
    assert ledger.read_to == {} and ledger.catch_up() == 5 and ledger.has(0, 5) and ledger.has(1, 3)
    assert ledger.on_topic(2, 8) and not ledger.has(2, 7), "Spark's dead letter is not this component's"
    ledger.close()


@pytest.mark.kafka
def test_kill_9_at_any_moment_sends_each_dead_letter_once(kafka_bootstrap, topics, trained_model_dir, sample_trips,
                                                          tmp_path):
    bad_offsets, good_ids = stream_with_bad_messages(kafka_bootstrap, topics[0], sample_trips.head(10_000), seed=5)
    speed_dir, watch = tmp_path / "speed", DeadLetterWatch(kafka_bootstrap, topics[1])
    slow = consumer_args(kafka_bootstrap, topics, speed_dir, trained_model_dir, "--max-records", "40", idle=None)
    rng, process = np.random.default_rng(7), None
    moments = ["dead letters ahead", "just assigned", "dead letters ahead", "at random", "dead letters ahead"]
    try:
        for attempt, moment in enumerate(moments):
            log = tmp_path / f"run-{attempt}.log"
            process = start_consumer(slow, log)
            if moment == "dead letters ahead":
                kill_9_while_dead_letters_outrun_progress(process, watch, kafka_bootstrap, topics[0], "speed",
                                                          speed_dir)
                continue
            wait_for(lambda: "assigned: resuming" in log.read_text(), 60, "the assignment", poll_s=0.01)
            if moment == "at random":
                time.sleep(rng.uniform(0.2, 2.0))
            kill_9(process)
    finally:
        watch.close()
        if process is not None and process.poll() is None:
            kill_9(process)
    assert len(speed_view.read_speed(speed_dir)) < len(good_ids), "the kills must come before the end"

    drain = start_consumer(consumer_args(kafka_bootstrap, topics, speed_dir, trained_model_dir, "--consumer-id",
                                         "drain"), tmp_path / "drain.log")
    assert drain.wait(timeout=120) == 0, (tmp_path / "drain.log").read_text()
    assert_each_bad_offset_dead_lettered_once(kafka_bootstrap, topics, bad_offsets)
    assert_exactly_once(speed_view.read_speed(speed_dir), good_ids)
    logs = "".join(path.read_text() for path in tmp_path.glob("*.log"))
    skipped = [int(n.replace(",", "")) for n in re.findall(r"dead letters read back .*: ([\d,]+) at or after", logs)]
    assert max(skipped) > 0, "a restart must have found dead letters of the offsets it read again"


@pytest.mark.kafka
def test_a_partition_taken_over_after_kill_9_gets_no_dead_letter_twice(kafka_bootstrap, topics, trained_model_dir,
                                                                        sample_trips, tmp_path):
    speed_dir, watch = tmp_path / "speed", DeadLetterWatch(kafka_bootstrap, topics[1])

    def start(name: str) -> subprocess.Popen:
        return start_consumer(consumer_args(kafka_bootstrap, topics, speed_dir, trained_model_dir, "--max-records",
                                            "40", "--consumer-id", name, group="pair", idle=None),
                              tmp_path / f"{name}.log")

    def partitions_of(name: str) -> set[int]:
        statuses = {s["consumer_id"]: s for s in speed_view.read_statuses(speed_dir)}
        return set(statuses.get(name, {}).get("assigned_partitions", []))

    def split() -> bool:
        parts = [partitions_of(name) for name in ("victim", "survivor")]
        return all(parts) and not parts[0] & parts[1] and parts[0] | parts[1] == {0, 1, 2}

    survivor, victim = start("survivor"), start("victim")
    try:
        wait_for(split, 60, "both consumers to hold partitions")  # then the trips, so that both are busy
        bad_offsets, good_ids = stream_with_bad_messages(kafka_bootstrap, topics[0],
                                                         sample_trips.iloc[10_000:25_000], seed=6)
        ahead = kill_9_while_dead_letters_outrun_progress(victim, watch, kafka_bootstrap, topics[0], "pair",
                                                          speed_dir, partitions_of("victim"))
        wait_for(lambda: partitions_of("survivor") == {0, 1, 2}, 60, "the survivor to take every partition")
        wait_for(lambda: len(speed_view.read_speed(speed_dir)) >= len(good_ids), 120, "every trip in the speed view")
        wait_for(lambda: len(watch.distinct()) >= len(bad_offsets), 60, "every dead letter")
        survivor.send_signal(signal.SIGTERM)
        assert survivor.wait(timeout=30) == 0, (tmp_path / "survivor.log").read_text()
    finally:
        watch.close()
        for process in (survivor, victim):
            if process.poll() is None:
                kill_9(process)
    assert_each_bad_offset_dead_lettered_once(kafka_bootstrap, topics, bad_offsets)
    assert_exactly_once(speed_view.read_speed(speed_dir), good_ids)
    status = {s["consumer_id"]: s for s in speed_view.read_statuses(speed_dir)}["survivor"]
    assert status["totals"]["dlq_already_sent"] >= len(ahead), "the survivor met the victim's dead letters"
