"""The ingestion layer, for real: the shipped trips go through a real Kafka broker and back.

Unit tests call the producer's pure functions (order, cutoff, resume positions,
chunk plan, re-timing, schedules, summary) directly, in ``kafka_producer`` and in
the machinery it uses (``periscope.replay``; the partitioner has its own test
module). The tests marked ``kafka`` run
``kafka_producer.main`` against the session's broker (see ``conftest.py``),
each on its own fresh topic, and read every message back with a plain
KafkaConsumer: nothing is mocked.
"""
from __future__ import annotations

import io
import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

import kafka_producer
from periscope import config, kafka_local
from periscope.replay import (ReplayResult, from_cutoff, local_now_ms, planned_total, positions_on_topic,
                              rate_schedule, retime, speedup_schedule, summary_lines)
from periscope.schema import FLOAT_FIELDS, format_time, parse_json, record_to_json
from periscope.send_loop import topic_partitions
from periscope.sources import LoadReport
from periscope.stream import PRODUCER_CONFIG

ROOT = Path(__file__).resolve().parent.parent
PROGRESS = re.compile(r"^\s*\d+\.\d s  sent\s+[\d,]+  delivered\s+[\d,]+  failed \d+\s+[\d,]+ trips/s  in flight",
                      re.MULTILINE)


# --- helpers ------------------------------------------------------------------------------------


def consume_all(bootstrap: str, topic: str, timeout_s: float = 30.0) -> list:
    """Every message of the topic, read from the start until the end offsets at call time."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None)
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        end = consumer.end_offsets(partitions)
        messages, deadline = [], time.monotonic() + timeout_s
        while any(consumer.position(tp) < end[tp] for tp in partitions):
            assert time.monotonic() < deadline, f"read {len(messages)} of {sum(end.values())} messages in time"
            for batch in consumer.poll(timeout_ms=500).values():
                messages.extend(batch)
        return messages
    finally:
        consumer.close()


def write_csv(trips: pd.DataFrame, path: Path) -> Path:
    """Record-form trips back in the Kaggle CSV layout."""
    out = trips.copy()
    for name in ("pickup_datetime", "dropoff_datetime"):
        out[name] = [format_time(ms) for ms in out[name]]
    out["store_and_fwd_flag"] = np.where(out["store_and_fwd_flag"], "Y", "N")
    out.to_csv(path, index=False, float_format="%.17g")
    return path


def assert_same_frames(got: pd.DataFrame, expected: pd.DataFrame) -> None:
    """Equal trip frames; coordinates to the last bit or two.

    Parquet numbers are parsed from their shortest text, like CSV text, and the
    loader's text-to-float conversion (``pd.to_numeric``) is not always
    correctly rounded, so a coordinate can come back one unit in the last place off.
    """
    pd.testing.assert_frame_equal(got.reset_index(drop=True), expected.reset_index(drop=True),
                                  check_exact=False, rtol=1e-15, atol=0)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = kafka_producer.main([*argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def replayed(sample_trips) -> pd.DataFrame:
    """The sample in replay order, as the producer sends it."""
    return kafka_producer.replay_order(sample_trips)


# --- pure functions -----------------------------------------------------------------------------


def test_replay_order_sorts_by_pickup_and_keeps_file_order_for_ties():
    trips = pd.DataFrame({"id": ["a", "b", "c", "d", "e"], "pickup_datetime": [30, 10, 20, 10, 30]})
    assert kafka_producer.replay_order(trips)["id"].tolist() == ["b", "d", "c", "a", "e"]


def test_retime_moves_the_trip_to_now_and_keeps_the_original_times(sample_trips):
    record = sample_trips.iloc[0].to_dict()
    now_ms = 1_790_000_000_123  # a fraction of a second: the pickup becomes the whole second
    moved, original = retime(record, now_ms)
    assert moved["pickup_datetime"] == 1_790_000_000_000
    assert moved["dropoff_datetime"] == 1_790_000_000_000 + record["trip_duration"] * 1000
    assert {k: v for k, v in moved.items() if not k.endswith("_datetime")} == \
           {k: v for k, v in record.items() if not k.endswith("_datetime")}
    assert original == {"original_pickup_datetime": format_time(record["pickup_datetime"]),
                        "original_dropoff_datetime": format_time(record["dropoff_datetime"])}
    assert parse_json(record_to_json(moved, **original)) == moved  # consumers ignore the extra fields


def test_schedules_space_trips_by_rate_or_by_real_time_over_speedup():
    assert rate_schedule(4, 3, 2.0).tolist() == [2.0, 2.5, 3.0]
    event_s = np.array([0.0, 60.0, 3600.0])
    assert speedup_schedule(event_s, 1, 3600.0, 60.0).tolist() == [0.0, 1.0, 60.0]
    assert speedup_schedule(event_s, 2, 3600.0, 60.0).tolist() == [60.0, 61.0, 120.0]


def test_plan_with_loop_and_limit_makes_unique_ids_per_pass(replayed):
    trips = replayed.iloc[:2500]
    chunks = list(kafka_producer.plan_chunks(trips, [0, 1, 2], rate=100.0, limit=6000, loop=True))
    keys = [key.decode() for chunk in chunks for key in chunk.keys]
    ids = trips["id"].tolist()
    assert keys == ids + [i + "-2" for i in ids] + [i + "-3" for i in ids[:1000]]
    assert [chunk.first_index for chunk in chunks] == [0, 1000, 2000, 2500, 3500, 4500, 5000]
    assert [chunk.pass_number for chunk in chunks] == [1, 1, 1, 2, 2, 2, 3]
    due = [d for chunk in chunks for d in chunk.due_s]
    assert due == pytest.approx([i / 100.0 for i in range(6000)])
    assert all(chunk.values is not None and chunk.records is None for chunk in chunks)


def test_plan_without_pacing_sends_at_once_and_stops_at_the_end_of_the_file(replayed):
    trips = replayed.iloc[:1500]
    chunks = list(kafka_producer.plan_chunks(trips, [0, 1, 2], limit=10_000))
    assert [len(chunk.keys) for chunk in chunks] == [1000, 500]
    assert all(chunk.due_s is None for chunk in chunks)
    assert chunks[-1].pickup_ms[-1] == trips["pickup_datetime"].iloc[-1]


def test_the_cutoff_keeps_the_trips_picked_up_at_or_after_it():
    trips = pd.DataFrame({"id": list("abcde"), "pickup_datetime": [10, 20, 20, 30, 40]})
    kept, history = from_cutoff(trips, 20)
    assert kept["id"].tolist() == ["b", "c", "d", "e"] and history == 1
    kept, history = from_cutoff(trips, None)
    assert kept["id"].tolist() == list("abcde") and history == 0
    kept, history = from_cutoff(trips, 41)
    assert len(kept) == 0 and history == 5


def test_positions_on_topic_are_the_planned_trips_whose_key_is_there():
    ids = pd.Series(["a", "b", "c"])
    keys = np.array(sorted([b"a", b"c-2", b"b-3", b"zz-2", b"x", b"c-99", b"-4", b"a-"]))
    # position (pass - 1) * 3 + row: a = 0, c-2 = 3 + 2, b-3 = 6 + 1, c-99 = 98 * 3 + 2
    assert positions_on_topic(ids, keys, planned=None, loop=True).tolist() == [0, 5, 7, 296]
    assert positions_on_topic(ids, keys, planned=8, loop=True).tolist() == [0, 5, 7]
    assert positions_on_topic(ids, keys, planned=7, loop=True).tolist() == [0, 5]
    assert positions_on_topic(ids, keys, planned=3, loop=False).tolist() == [0]
    assert positions_on_topic(ids, np.array([], dtype="S1"), planned=3, loop=False).tolist() == []
    assert planned_total(3, None, False) == 3 and planned_total(3, 2, False) == 2
    assert planned_total(3, 7, False) == 3 and planned_total(3, 7, True) == 7
    assert planned_total(3, None, True) is None


def test_a_resumed_plan_leaves_out_the_skipped_positions_and_paces_what_it_sends(replayed):
    trips = replayed.iloc[:2500]
    skip = np.array([0, 1, 5, *range(1000, 2000), 2499, 2500, 4000])  # all of chunk 2, the ends of passes 1 and 2
    chunks = list(kafka_producer.plan_chunks(trips, [0, 1, 2], rate=100.0, limit=4001, loop=True, skip=skip))
    ids = trips["id"].tolist()
    planned = ids + [i + "-2" for i in ids]
    expected = [key for position, key in enumerate(planned[:4001]) if position not in set(skip.tolist())]
    assert [key.decode() for chunk in chunks for key in chunk.keys] == expected
    assert [chunk.first_index for chunk in chunks] == [0, 997, 1496, 2495]
    due = [d for chunk in chunks for d in chunk.due_s]
    assert due == pytest.approx([i / 100.0 for i in range(len(expected))])  # the pace starts with what is sent
    by_speedup = list(kafka_producer.plan_chunks(trips, [0], speedup=60.0, skip=np.arange(1200)))
    pickups = trips["pickup_datetime"].to_numpy()
    assert by_speedup[0].due_s[0] == 0.0
    assert by_speedup[0].due_s[-1] == pytest.approx((pickups[1999] - pickups[1200]) / 1000 / 60)


def test_summary_names_failures_and_malformed_rows():
    result = ReplayResult(sent=10, delivered=8, failed=2, elapsed_s=2.0, bytes=3300,
                          per_partition={0: 5, 1: 3}, errors=["id1: KafkaTimeoutError: expired"],
                          passes=1, stopped=None)
    report = LoadReport(source="trips.csv", rows_read=11)
    report.malformed["bad_datetime"] += 1
    text = "\n".join(summary_lines(result, "taxi-trips", "127.0.0.1:9092", report))
    assert "sent 10 trips to taxi-trips at 127.0.0.1:9092 in 2.00 s" in text
    assert "delivered 8, failed 2; 4 trips/s" in text
    assert "per partition: 0: 5  1: 3" in text
    assert "failed e.g. id1: KafkaTimeoutError: expired" in text
    assert "not sent: 1 malformed rows of trips.csv (bad_datetime 1)" in text
    assert not result.ok


def test_parquet_input_reads_like_the_csv(sample_trips, tmp_path):
    typed = sample_trips.iloc[:400].copy()
    for name in ("pickup_datetime", "dropoff_datetime"):
        typed[name] = pd.to_datetime(typed[name], unit="ms")
    typed.to_parquet(tmp_path / "typed.parquet")
    text = sample_trips.iloc[:400].copy()
    for name in ("pickup_datetime", "dropoff_datetime"):
        text[name] = [format_time(ms) for ms in text[name]]
    text["store_and_fwd_flag"] = np.where(text["store_and_fwd_flag"], "Y", "N")
    text.loc[3, "pickup_datetime"] = "2016-02-30 10:00:00"
    text.loc[5, "passenger_count"] = None
    text.to_parquet(tmp_path / "text.parquet")

    trips, report = kafka_producer.load_trips(tmp_path / "typed.parquet", io.StringIO())
    assert_same_frames(trips, sample_trips.iloc[:400])
    assert report.rows_malformed == 0
    trips, report = kafka_producer.load_trips(tmp_path / "text.parquet", io.StringIO())
    assert dict(report.malformed) == {"bad_datetime": 1, "missing_value": 1}
    assert report.examples == ["line 4: bad_datetime in pickup_datetime", "line 6: missing_value in passenger_count"]
    assert_same_frames(trips, sample_trips.iloc[:400].drop(index=[3, 5]))


@pytest.mark.parametrize("argv, message", [
    (["--rate", "0"], "--rate must be a positive number of trips per second, e.g. --rate 500; got 0"),
    (["--rate", "10", "--speedup", "60"], "--rate and --speedup are alternatives"),
    (["--speedup", "-1"], "--speedup must be a positive factor"),
    (["--limit", "0"], "--limit must be at least 1 trip"),
    (["--input", "no/such/trips.csv"], "--input no/such/trips.csv: no such file"),
    (["--cutoff", "June"], "argument --cutoff: 'June' is not a cutoff: give a pickup time like 2016-06-01"),
    (["--cutoff", "2016-06-31"], "'2016-06-31' is not a cutoff: give a pickup time like 2016-06-01 or "
                                 "'2016-06-01 12:00:00' (New York wall clock), or none"),
])
def test_bad_flags_are_clear_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        kafka_producer.main(argv)
    assert stop.value.code == 2
    assert message in capsys.readouterr().err


def test_help_explains_every_flag_and_its_default_once():
    result = subprocess.run([sys.executable, "kafka_producer.py", "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0
    entries = {match.group(1): match.group(2) for match in
               re.finditer(r"^  (--[a-z-]+)(.*?)(?=^  -|^\S|\Z)", result.stdout, re.MULTILINE | re.DOTALL)}
    flags = ("--input", "--cutoff", "--topic", "--bootstrap", "--rate", "--speedup", "--limit", "--loop", "--retime",
             "--from-start", "--wait", "--max-in-flight", "--progress")
    assert sorted(entries) == sorted(flags)
    for flag, entry in entries.items():
        assert " ".join(entry.split()).count("(default: ") == 1, (flag, entry)
    assert "(default: None)" not in result.stdout and "(default: False)" not in result.stdout
    assert f"(default: {config.CUTOFF}, env PERISCOPE_CUTOFF)" in " ".join(result.stdout.split())


def test_an_unreachable_broker_fails_fast_naming_the_address(capsys):
    address = f"127.0.0.1:{kafka_local.free_ports(1)[0]}"
    started = time.monotonic()
    code, out, err = run(capsys, "--bootstrap", address, "--wait", "0", "--limit", "5")
    assert code == 1
    assert address in err and "make kafka-up" in err
    assert time.monotonic() - started < 20


# --- against the real broker --------------------------------------------------------------------


@pytest.mark.kafka
def test_replays_real_trips_in_pickup_order_with_production_timestamps(kafka_bootstrap, topics, replayed, capsys):
    topic, _ = topics
    before_ms = time.time() * 1000
    code, out, _ = run(capsys, "--bootstrap", kafka_bootstrap, "--topic", topic, "--limit", "2000",
                       "--cutoff", "none")
    after_ms = time.time() * 1000
    assert code == 0, out
    assert "summary: sent 2,000 trips to " + topic in out
    assert "delivered 2,000, failed 0" in out

    messages = consume_all(kafka_bootstrap, topic)
    assert len(messages) == 2000
    expected = {record["id"]: record for record in replayed.iloc[:2000].to_dict("records")}
    assert sorted(m.key.decode() for m in messages) == sorted(expected)
    for message in messages:
        assert parse_json(message.value) == expected[message.key.decode()]
        assert message.timestamp_type == 0  # CreateTime, set by the producer
        assert before_ms - 1000 <= message.timestamp <= after_ms + 1000  # now, not 2016
    for partition in {m.partition for m in messages}:
        pickups = [parse_json(m.value)["pickup_datetime"] for m in messages if m.partition == partition]
        assert pickups == sorted(pickups)
    counts = re.search(r"per partition: (.*)", out).group(1)
    assert sum(int(n.replace(",", "")) for n in re.findall(r"\d+: ([\d,]+)", counts)) == 2000


@pytest.mark.kafka
def test_retime_sends_trips_as_happening_now_with_their_original_times(kafka_bootstrap, topics, replayed, capsys):
    topic, _ = topics
    before = local_now_ms()
    code, out, _ = run(capsys, "--bootstrap", kafka_bootstrap, "--topic", topic, "--limit", "300", "--retime",
                       "--cutoff", "none")
    after = local_now_ms()
    assert code == 0, out
    expected = {record["id"]: record for record in replayed.iloc[:300].to_dict("records")}
    messages = consume_all(kafka_bootstrap, topic)
    assert len(messages) == 300
    for message in messages:
        record, original = parse_json(message.value), expected[message.key.decode()]
        assert before <= record["pickup_datetime"] <= after and record["pickup_datetime"] % 1000 == 0
        assert record["dropoff_datetime"] == record["pickup_datetime"] + original["trip_duration"] * 1000
        fields = json.loads(message.value)
        assert fields["original_pickup_datetime"] == format_time(original["pickup_datetime"])
        assert fields["original_dropoff_datetime"] == format_time(original["dropoff_datetime"])
        assert {k: v for k, v in record.items() if not k.endswith("_datetime")} == \
               {k: v for k, v in original.items() if not k.endswith("_datetime")}


@pytest.mark.kafka
def test_rate_paces_the_replay_and_progress_is_printed_every_second(kafka_bootstrap, topics, capsys):
    topic, _ = topics
    args = kafka_producer.parse_args(["--bootstrap", kafka_bootstrap, "--topic", topic,
                                      "--rate", "500", "--limit", "1000"])
    result, code = kafka_producer.replay(args)
    out = capsys.readouterr().out
    assert code == 0 and result.delivered == 1000
    assert 1.5 <= result.elapsed_s <= 6.0, result.elapsed_s  # 1000 trips at 500/s: about 2 s
    assert len(PROGRESS.findall(out)) >= 1
    assert "at 500 trips/s" in out
    stamps = [m.timestamp for m in consume_all(kafka_bootstrap, topic)]
    assert max(stamps) - min(stamps) >= 1500  # really spread over time, not sent in a burst


@pytest.mark.kafka
def test_loop_starts_over_with_unique_ids(kafka_bootstrap, topics, sample_trips, tmp_path, capsys):
    topic, _ = topics
    small = write_csv(sample_trips.iloc[:300], tmp_path / "small.csv")
    code, out, _ = run(capsys, "--bootstrap", kafka_bootstrap, "--topic", topic, "--input", str(small),
                       "--loop", "--limit", "700", "--cutoff", "none")
    assert code == 0, out
    assert "in 3 passes" in out
    messages = consume_all(kafka_bootstrap, topic)
    keys = [m.key.decode() for m in messages]
    ids = kafka_producer.replay_order(sample_trips.iloc[:300])["id"].tolist()
    assert len(keys) == len(set(keys)) == 700
    assert set(keys) == set(ids) | {i + "-2" for i in ids} | {i + "-3" for i in ids[:100]}
    assert all(parse_json(m.value)["id"] == m.key.decode() for m in messages)


@pytest.mark.kafka
def test_parquet_input_and_malformed_rows_are_reported(kafka_bootstrap, topics, sample_trips, tmp_path, capsys):
    topic, _ = topics
    trips = sample_trips.iloc[:500].copy()
    typed = trips.copy()
    for name in ("pickup_datetime", "dropoff_datetime"):
        typed[name] = pd.to_datetime(typed[name], unit="ms")
    typed["pickup_datetime"] = typed["pickup_datetime"].astype(object)
    typed.loc[7, "pickup_datetime"] = None  # a missing value: counted, not sent
    typed.to_parquet(tmp_path / "trips.parquet")
    code, out, _ = run(capsys, "--bootstrap", kafka_bootstrap, "--topic", topic,
                       "--input", str(tmp_path / "trips.parquet"), "--cutoff", "none")
    assert code == 0, out
    assert "1 malformed" in out and "not sent: 1 malformed rows" in out and "missing_value 1" in out
    messages = consume_all(kafka_bootstrap, topic)
    expected = {r["id"]: r for r in trips.drop(index=7).to_dict("records")}
    got = {m.key.decode(): parse_json(m.value) for m in messages}
    assert got.keys() == expected.keys()
    for trip_id, record in got.items():
        want = expected[trip_id]
        assert {k: v for k, v in record.items() if k not in FLOAT_FIELDS} == \
               {k: v for k, v in want.items() if k not in FLOAT_FIELDS}
        assert [record[k] for k in FLOAT_FIELDS] == \
               pytest.approx([want[k] for k in FLOAT_FIELDS], rel=1e-15, abs=0)  # see assert_same_frames


@pytest.mark.kafka
def test_a_missing_topic_is_a_clear_error(kafka_bootstrap, capsys):
    code, _, err = run(capsys, "--bootstrap", kafka_bootstrap, "--topic", "no-such-topic", "--limit", "5")
    assert code == 1
    assert "topic no-such-topic does not exist" in err and "create-topics" in err


@pytest.mark.kafka
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_flushes_what_is_in_flight_and_exits_130(kafka_bootstrap, topics, stop):
    """Ctrl-C, and SIGTERM (``kill``, a scheduler) the same way."""
    topic, _ = topics
    producer = subprocess.Popen(
        [sys.executable, "kafka_producer.py", "--bootstrap", kafka_bootstrap, "--topic", topic,
         "--rate", "500", "--limit", "50000"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in producer.stdout:
            if PROGRESS.match(line):
                break
        producer.send_signal(stop)
        rest, err = producer.communicate(timeout=60)
    finally:
        if producer.poll() is None:
            producer.kill()
    assert producer.returncode == 130, err
    assert "interrupted" in rest and "stopped early: interrupted" in rest
    delivered = int(re.search(r"delivered ([\d,]+), failed 0", rest).group(1).replace(",", ""))
    assert 400 <= delivered < 50000
    assert len(consume_all(kafka_bootstrap, topic)) == delivered


@pytest.mark.kafka
def test_the_partitions_are_asked_again_while_the_broker_restarts(kafka_bootstrap, topics):
    """The broker goes away between the topic check and the first send: the producer waits for it."""
    topic, _ = topics
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, **{**PRODUCER_CONFIG, "max_block_ms": 1000})
    try:
        kafka_bootstrap.stop()
        restart = threading.Timer(3.0, kafka_bootstrap.start)
        restart.start()
        began = time.monotonic()
        assert topic_partitions(producer, topic, wait_s=60) == [0, 1, 2]
        assert time.monotonic() - began >= 2.5, "answered only once the broker was back"
        restart.join()
    finally:
        producer.close(timeout=5)


@pytest.mark.kafka
def test_a_broker_restart_mid_stream_loses_and_duplicates_nothing(kafka_bootstrap, topics):
    """acks=all + retries lose nothing; idempotence drops the retried batches the broker already had."""
    topic, _ = topics
    producer = subprocess.Popen(
        [sys.executable, "kafka_producer.py", "--bootstrap", kafka_bootstrap, "--topic", topic,
         "--rate", "2000", "--limit", "12000", "--cutoff", "none"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in producer.stdout:
            if PROGRESS.match(line):
                break
        kafka_bootstrap.stop()
        time.sleep(1)
        kafka_bootstrap.start()
        out, err = producer.communicate(timeout=180)
    finally:
        if producer.poll() is None:
            producer.kill()
    assert producer.returncode == 0, err
    assert "delivered 12,000, failed 0" in out
    messages = consume_all(kafka_bootstrap, topic)
    keys = [m.key for m in messages]
    assert len(keys) == len(set(keys)) == 12000
    for partition in {m.partition for m in messages}:
        pickups = [parse_json(m.value)["pickup_datetime"] for m in messages if m.partition == partition]
        assert pickups == sorted(pickups)


# --- the cutoff and the resume, against the real broker -------------------------------------------


def stream_ids(sample_csv: Path, cutoff: str = config.CUTOFF) -> pd.Series:
    """The ids of the shipped file picked up at or after the cutoff, in pickup order: pandas over the raw CSV."""
    raw = pd.read_csv(sample_csv, usecols=["id", "pickup_datetime"])
    pickups = pd.to_datetime(raw["pickup_datetime"], format="%Y-%m-%d %H:%M:%S")
    raw = raw[pickups >= pd.Timestamp(cutoff)]
    return raw.iloc[np.argsort(pd.to_datetime(raw["pickup_datetime"]).to_numpy(), kind="stable")]["id"]


def start_producer(bootstrap: str, topic: str, *argv: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "kafka_producer.py", "--bootstrap", bootstrap, "--topic", topic, *argv],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def kill_mid_replay(producer: subprocess.Popen, planned: int) -> None:
    """SIGKILL the producer once its progress line shows some trips delivered, well before the end."""
    try:
        for line in producer.stdout:
            match = PROGRESS.match(line) and re.search(r"delivered\s+([\d,]+)", line)
            if match and int(match.group(1).replace(",", "")) >= planned // 10:
                break
        producer.send_signal(signal.SIGKILL)
        producer.communicate(timeout=30)
    finally:
        if producer.poll() is None:
            producer.kill()
    assert producer.returncode == -signal.SIGKILL


def finish(producer: subprocess.Popen, timeout_s: float = 120) -> str:
    try:
        out, err = producer.communicate(timeout=timeout_s)
    finally:
        if producer.poll() is None:
            producer.kill()
    assert producer.returncode == 0, out + err
    assert "Traceback" not in err
    return out


def topic_keys(bootstrap: str, topic: str) -> Counter:
    return Counter(m.key.decode() for m in consume_all(bootstrap, topic))


def read_until(process: subprocess.Popen, text: str) -> str:
    """The process's output up to and including the first line containing ``text`` (AssertionError at EOF)."""
    seen = []
    for line in process.stdout:
        seen.append(line)
        if text in line:
            return "".join(seen)
    raise AssertionError(f"the output ended without {text!r}:\n{''.join(seen)}")


def start_resuming_while_the_broker_stops(bootstrap, topic: str, *argv: str) -> tuple[subprocess.Popen, str]:
    """A producer resuming on ``topic``, paused (SIGSTOP) on the line it prints just before the key reader
    connects while the broker stops, then continued: the broker is away during its start-up."""
    producer = subprocess.Popen(
        [sys.executable, "kafka_producer.py", "--bootstrap", bootstrap, "--topic", topic, *argv],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out = read_until(producer, f"resume: reading back the keys already on {topic}")
        producer.send_signal(signal.SIGSTOP)
        try:
            bootstrap.stop()
        finally:
            producer.send_signal(signal.SIGCONT)
    except BaseException:
        producer.kill()
        raise
    return producer, out


@pytest.mark.kafka
def test_a_broker_restart_during_start_up_is_waited_for_and_the_resume_stays_exact(kafka_bootstrap, topics,
                                                                                   sample_csv, capsys):
    """The broker restarts while the producer starts reading the topic's keys back: it says it waits,
    reads them again once the broker is back, and sends each trip of the replay once."""
    topic, _ = topics
    expected = list(stream_ids(sample_csv))
    code, out, _ = run(capsys, "--bootstrap", kafka_bootstrap, "--topic", topic, "--limit", "5000", "--progress", "0")
    assert code == 0, out
    producer, out = start_resuming_while_the_broker_stops(kafka_bootstrap, topic, "--wait", "120")
    watchdog = threading.Timer(240, producer.kill)
    watchdog.start()
    try:
        try:
            out += read_until(producer, f"waiting for Kafka at {kafka_bootstrap} to replay trips")
        finally:
            kafka_bootstrap.start()  # only once the producer waits for it, or whatever happened
        out += producer.communicate(timeout=180)[0]
    finally:
        watchdog.cancel()
        if producer.poll() is None:
            producer.kill()
    assert producer.returncode == 0, out
    assert "Traceback" not in out
    assert f"Kafka at {kafka_bootstrap} went away while starting to replay trips" in out
    assert f"resuming after 5,000 trips already on {topic}" in out
    assert f"replaying {len(expected) - 5000:,} trips to {topic}" in out
    keys = topic_keys(kafka_bootstrap, topic)
    assert set(keys) == set(expected) and sum(keys.values()) == len(expected)  # each trip once


@pytest.mark.kafka
def test_a_broker_gone_for_longer_than_wait_during_start_up_is_the_one_line_error(kafka_bootstrap, topics, capsys):
    topic, _ = topics
    code, out, _ = run(capsys, "--bootstrap", kafka_bootstrap, "--topic", topic, "--limit", "100", "--progress", "0")
    assert code == 0, out
    producer, out = start_resuming_while_the_broker_stops(kafka_bootstrap, topic, "--wait", "3")
    try:
        out += producer.communicate(timeout=60)[0]
    finally:
        if producer.poll() is None:
            producer.kill()
        kafka_bootstrap.start()
    assert producer.returncode == 1, out
    assert "Traceback" not in out
    assert f"waiting for Kafka at {kafka_bootstrap} to replay trips" in out
    assert out.rstrip().splitlines()[-1] == (
        f"error: no Kafka broker answered at {kafka_bootstrap} within 3 s; start the local one with "
        "`make kafka-up` or point KAFKA_BOOTSTRAP_SERVERS at a running broker")


def test_nothing_after_the_cutoff_is_a_clear_error(capsys, sample_csv):
    pickups = pd.read_csv(sample_csv, usecols=["pickup_datetime"])["pickup_datetime"]
    code, out, err = run(capsys, "--input", str(sample_csv), "--cutoff", "2016-07-01", "--wait", "0")
    assert code == 1 and "Traceback" not in err
    assert (f"no trip of {sample_csv} was picked up at or after the cutoff 2016-07-01 00:00:00 "
            f"(its pickups run {pickups.min()} .. {pickups.max()})") in err
    assert "--cutoff none" in err


@pytest.mark.kafka
def test_the_cutoff_splits_the_shipped_sample_exactly(kafka_bootstrap, topics, sample_csv, capsys):
    topic, _ = topics
    expected = stream_ids(sample_csv)
    history = len(pd.read_csv(sample_csv, usecols=["id"])) - len(expected)
    code, out, _ = run(capsys, "--bootstrap", kafka_bootstrap, "--topic", topic, "--progress", "0")
    assert code == 0, out
    cutoff = str(pd.Timestamp(config.CUTOFF))
    assert (f"cutoff {cutoff}: replaying the {len(expected):,} trips picked up at or after it; "
            f"the {history:,} before it are history") in out
    assert f"left out {history:,} trips picked up before the cutoff {cutoff}" in out
    assert "resuming" not in out
    keys = topic_keys(kafka_bootstrap, topic)
    assert sum(keys.values()) == len(expected) and set(keys) == set(expected)


@pytest.mark.kafka
def test_killed_mid_replay_it_resumes_and_the_topic_holds_every_trip_once(kafka_bootstrap, topics, sample_csv):
    topic, _ = topics
    expected = set(stream_ids(sample_csv))
    argv = ("--rate", "1500", "--progress", "0.5")
    kill_mid_replay(start_producer(kafka_bootstrap, topic, *argv), len(expected))
    before = topic_keys(kafka_bootstrap, topic)
    assert 0 < sum(before.values()) < len(expected) and max(before.values()) == 1

    out = finish(start_producer(kafka_bootstrap, topic, *argv))
    resumed = rf"^resuming after {len(before):,} trips already on {re.escape(topic)}\b"
    assert re.search(resumed, out, re.MULTILINE), out
    assert f"replaying {len(expected) - len(before):,} trips to {topic}" in out
    after = topic_keys(kafka_bootstrap, topic)
    assert set(after) == expected
    assert sum(after.values()) == len(expected)  # no trip twice

    out = finish(start_producer(kafka_bootstrap, topic, *argv))  # a third run: everything is there already
    assert f"nothing left to send: all {len(expected):,} trips of the replay are already on {topic}" in out
    assert topic_keys(kafka_bootstrap, topic) == after


@pytest.mark.kafka
def test_from_start_sends_everything_again_after_a_kill(kafka_bootstrap, topics, sample_csv):
    topic, _ = topics
    expected = set(stream_ids(sample_csv))
    kill_mid_replay(start_producer(kafka_bootstrap, topic, "--rate", "1500", "--progress", "0.5"), len(expected))
    before = topic_keys(kafka_bootstrap, topic)
    out = finish(start_producer(kafka_bootstrap, topic, "--from-start", "--progress", "0"))
    assert "resuming" not in out and f"replaying {len(expected):,} trips" in out
    after = topic_keys(kafka_bootstrap, topic)
    assert set(after) == expected
    assert sum(after.values()) == len(expected) + sum(before.values())
    twice = {key for key, count in after.items() if count == 2}
    assert twice == set(before) and max(after.values()) == 2  # the duplicates are what was there before


@pytest.mark.kafka
def test_resume_with_limit_completes_the_same_replay(kafka_bootstrap, topics, sample_csv, capsys):
    topic, _ = topics
    planned = list(stream_ids(sample_csv))
    code, out, _ = run(capsys, "--bootstrap", kafka_bootstrap, "--topic", topic, "--limit", "1000")
    assert code == 0 and "resuming" not in out
    code, out, _ = run(capsys, "--bootstrap", kafka_bootstrap, "--topic", topic, "--limit", "3000")
    assert code == 0, out
    assert f"resuming after 1,000 trips already on {topic}" in out and "replaying 2,000 trips" in out
    assert "summary: sent 2,000 trips" in out and f"skipped 1,000 trips already on {topic}" in out
    keys = topic_keys(kafka_bootstrap, topic)
    assert sorted(keys) == sorted(planned[:3000]) and max(keys.values()) == 1

    code, out, _ = run(capsys, "--bootstrap", kafka_bootstrap, "--topic", topic, "--limit", "3000")
    assert code == 0 and "nothing left to send: all 3,000 trips" in out
    code, out, _ = run(capsys, "--bootstrap", kafka_bootstrap, "--topic", topic, "--limit", "500", "--from-start")
    assert code == 0 and "resuming" not in out and "summary: sent 500 trips" in out
    keys = topic_keys(kafka_bootstrap, topic)
    assert sum(keys.values()) == 3500 and {k for k, n in keys.items() if n == 2} == set(planned[:500])


@pytest.mark.kafka
def test_resume_works_across_loop_passes_and_with_retime(kafka_bootstrap, topics, sample_trips, tmp_path, capsys):
    topic, _ = topics
    small = write_csv(sample_trips.iloc[:300], tmp_path / "small.csv")
    common = ("--bootstrap", kafka_bootstrap, "--topic", topic, "--input", str(small), "--cutoff", "none", "--loop")
    code, out, _ = run(capsys, *common, "--limit", "500")
    assert code == 0, out
    code, out, _ = run(capsys, *common, "--limit", "800", "--retime")
    assert code == 0, out
    assert f"resuming after 500 trips already on {topic}" in out and "summary: sent 300 trips in 3 passes" in out
    ids = kafka_producer.replay_order(sample_trips.iloc[:300])["id"].tolist()
    messages = consume_all(kafka_bootstrap, topic)
    keys = Counter(m.key.decode() for m in messages)
    assert set(keys) == set(ids) | {i + "-2" for i in ids} | {i + "-3" for i in ids[:200]}
    assert max(keys.values()) == 1 and sum(keys.values()) == 800
    retimed = {m.key.decode() for m in messages if b"original_pickup_datetime" in m.value}
    assert retimed == {i + "-2" for i in ids[200:]} | {i + "-3" for i in ids[:200]}
