"""spark_streaming.py against real Spark (local mode) and the real broker, beside the plain consumer.

One Spark session serves the module (starting one costs 10-20 s); the
streaming layer runs in-process through ``spark_streaming.start``, except in
the kill test, which needs a process to SIGKILL.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import types
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pytest

import kafka_consumer
import spark_streaming
from periscope import kafka_local, schema, spark_session, spark_speed, speed_core, speed_view, stream
from periscope.schema import FIELDS, record_to_json
from periscope.sql_prompt import sql_prompt
from tests.conftest import (assert_exactly_once, consumer_args, produce, read_dlq, read_topic, rule_violations,
                            trip_messages, wait_for)

ROOT = Path(__file__).resolve().parent.parent
MALFORMED = [b"{oops", b"", b'["a", "list"]', b'{"id": "x1"}', b"\xff\xfe not utf-8"]


@pytest.fixture(scope="module")
def spark():
    return spark_session.get_session(app_name="periscope-tests")


def spark_args(bootstrap: str, topics: tuple[str, str], speed_dir: Path, model_dir: Path, checkpoint: Path,
               *extra: str) -> list[str]:
    return ["--bootstrap", bootstrap, "--topic", topics[0], "--dlq-topic", topics[1], "--speed-dir", str(speed_dir),
            "--model-dir", str(model_dir), "--checkpoint-dir", str(checkpoint), "--trigger", "100 milliseconds",
            *extra]


def run_in_process(spark, argv: list[str]) -> spark_speed.SparkSpeedLayer:
    """Start the layer, let it process everything on the broker now, and stop it."""
    layer = spark_streaming.start(spark, spark_streaming.parse_args(argv))
    try:
        layer.process_all_available()
    finally:
        layer.stop()
    return layer


def with_malformed(trips: pd.DataFrame, every: int) -> tuple[list[tuple[bytes, bytes]], set[bytes]]:
    """The trips' messages with a malformed one (a key of its own) after every ``every``, and those keys."""
    messages, bad = [], set()
    for index, message in enumerate(trip_messages(trips)):
        messages.append(message)
        if index % every == every - 1:
            key = b"bad-%d" % index
            messages.append((key, MALFORMED[len(bad) % len(MALFORMED)]))
            bad.add(key)
    return messages, bad


def bad_offsets(bootstrap: str, topic: str, trips: pd.DataFrame,
                malformed_keys: set[bytes]) -> set[tuple[str, int, int]]:
    """(topic, partition, offset) of every message on ``topic`` that must reach the dead-letter topic."""
    violations = rule_violations(trips)
    return {(topic, m.partition, m.offset) for m in read_topic(bootstrap, topic)
            if m.key in malformed_keys or m.key.decode() in violations}


def dead_letter_sources(bootstrap: str, dlq_topic: str, expected: int) -> Counter:
    """How many dead letters name each (topic, partition, offset)."""
    return Counter(stream.parse_source(stream.header_value(m.headers, stream.SOURCE_HEADER))
                   for m in read_dlq(bootstrap, dlq_topic, expected))


def dlq_by_component(bootstrap: str, topic: str, expected: int) -> dict[str, set[tuple[str, str]]]:
    """Component -> {(source topic/partition/offset, reason)} of the dead letters."""
    found: dict[str, set[tuple[str, str]]] = {}
    for message in read_dlq(bootstrap, topic, expected):
        headers = message.headers
        found.setdefault(stream.header_value(headers, stream.REJECTED_BY_HEADER), set()).add(
            (stream.header_value(headers, stream.SOURCE_HEADER), stream.header_value(headers, stream.REASON_HEADER)))
    return found


def retimed(trips: pd.DataFrame, pickups: list[str], vendor: int = 1) -> pd.DataFrame:
    """Copies of valid trips with the given pickup times (dropoff moved along, so every rule still holds)."""
    rows = trips.head(len(pickups)).copy()
    rows["pickup_datetime"] = [schema.parse_time(text, "pickup_datetime") for text in pickups]
    rows["dropoff_datetime"] = rows["pickup_datetime"] + rows["trip_duration"] * 1000
    rows["vendor_id"] = vendor
    return rows


# --- pure parts ---------------------------------------------------------------------------------------


def test_the_spark_schema_is_derived_from_the_trip_schema():
    struct = spark_session.trip_struct()
    assert struct.fieldNames() == list(FIELDS)
    kinds = {field.name: field.dataType.simpleString() for field in struct.fields}
    assert {kinds[name] for name in schema.INT_FIELDS + schema.TIME_FIELDS} == {"bigint"}
    assert {kinds[name] for name in schema.FLOAT_FIELDS} == {"double"}
    assert kinds["id"] == "string" and kinds["store_and_fwd_flag"] == "boolean"
    assert spark_speed.VALIDATED_SCHEMA.fieldNames() == list(speed_core.VALIDATED_COLUMNS)
    trip = speed_core.TRIP_COLUMNS
    assert spark_speed.VALIDATED_SCHEMA.fieldNames()[-len(trip):] == list(trip) and trip[:len(FIELDS)] == FIELDS


def test_validation_gives_the_plain_consumers_verdicts(sample_trips):
    records = sample_trips.head(4).to_dict("records")
    short = {**records[1], "trip_duration": 5, "dropoff_datetime": records[1]["pickup_datetime"] + 5000}
    values = [record_to_json(records[0]), b"{oops", record_to_json(short), None, record_to_json(records[2])]
    messages = pd.DataFrame({"key": [b"k"] * 5, "value": values, "topic": ["t"] * 5, "partition": [1] * 5,
                             "offset": range(10, 15), "timestamp_ms": [1_700_000_000_000] * 5})
    frame = speed_core.validate_frame(messages)
    assert list(frame.columns) == spark_speed.VALIDATED_SCHEMA.fieldNames()
    valid, invalid = frame[frame["reason"].isna()], frame[frame["reason"].notna()]
    assert list(valid["id"]) == [records[0]["id"], records[2]["id"]] and list(valid["offset"]) == [10, 14]
    assert [speed_core.reason_code(r) for r in invalid["reason"]] == ["invalid_json", "duration_too_short",
                                                                       "empty_message"]
    assert list(invalid["value"])[0] == b"{oops" and valid["key"].isna().all()


EXECUTOR = """
import importlib.util, json, pickle, sys
speed_rows, messages = pickle.loads(open(sys.argv[1], "rb").read())
rows = next(speed_rows(iter(messages.to_batches())))
print(json.dumps({"reasons": rows["reason"].to_pylist(), "predicted": rows["predicted_duration_s"].to_pylist(),
                  "scripts": [name for name in ("spark_streaming", "kafka_consumer", "batch_processor")
                              if name in sys.modules or importlib.util.find_spec(name)]}))
"""


def test_the_executors_need_the_shipped_periscope_package_only(sample_trips, trained_model_dir, tmp_path):
    """What Spark runs on executors, pickled as Spark does, runs where only the shipped zip is importable."""
    from pyspark import cloudpickle

    from periscope.model import load_model

    model = load_model(trained_model_dir)
    values = [record_to_json(r) for r in sample_trips.head(30).to_dict("records")] + [b"{oops"]
    messages = pd.DataFrame({"key": [b"k"] * len(values), "value": values, "topic": "t", "partition": 0,
                             "offset": range(len(values)), "timestamp_ms": 1_700_000_000_000})
    speed_rows = spark_speed.validate_and_predict_batches(types.SimpleNamespace(value=model))  # has ``.value``
    shipped = tmp_path / "job.pickle"
    shipped.write_bytes(cloudpickle.dumps((speed_rows, pa.Table.from_pandas(messages, preserve_index=False))))
    elsewhere = tmp_path / "executor"
    elsewhere.mkdir()
    # -S: no .pth files, so not even an editable install of the project puts the scripts in reach
    libraries = os.pathsep.join([str(spark_session.project_zip(tmp_path)), sysconfig.get_paths()["purelib"]])
    result = subprocess.run([sys.executable, "-S", "-c", EXECUTOR, str(shipped)],
                            cwd=elsewhere, capture_output=True, text=True, timeout=120,
                            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": libraries})
    assert result.returncode == 0, result.stderr[-3000:]
    ran = json.loads(result.stdout)
    assert ran["scripts"] == [], "no script is importable there, and none was needed"
    validated = speed_core.validate_frame(messages)
    assert ran["reasons"] == [None if pd.isna(r) else r for r in validated["reason"]]
    expected = speed_core.predict_frame(model, validated[list(speed_core.TRIP_COLUMNS)])
    np.testing.assert_allclose(np.array(ran["predicted"], dtype=float), expected.to_numpy(), rtol=1e-12)
    assert np.isnan(expected.to_numpy()[-1]) and ran["predicted"][-1] is None, "no prediction for the bad one"


def test_a_fresh_checkpoint_resumes_after_the_speed_files_within_what_kafka_holds():
    begin, end = {0: 0, 1: 50, 2: 0}, {0: 100, 1: 100, 2: 10}
    assert spark_speed.resume_offsets({0: 41, 1: 10, 2: 30}, begin, end) == {0: 42, 1: 50, 2: 10}
    assert spark_speed.resume_offsets({0: 41}, begin, end) == {0: 42, 1: 50, 2: 0}, "every partition named"
    assert json.loads(spark_speed.offsets_json("t", {1: 5, 0: 7})) == {"t": {"0": 7, "1": 5}}


def test_the_arrow_speed_files_are_the_plain_speed_layers_files(sample_trips, trained_model_dir, tmp_path):
    """The driver writes the executors' Arrow rows without pandas; the files read back as the core's do."""
    from periscope.model import load_model

    model = load_model(trained_model_dir)
    trips = sample_trips.head(500)
    values = [record_to_json(r) for r in trips.to_dict("records")] + [b"{oops"]
    messages = pd.DataFrame({"key": [b"k"] * len(values), "value": values, "topic": "t",
                             "partition": [i % 3 for i in range(len(values))],
                             "offset": [100 + i // 3 for i in range(len(values))], "timestamp_ms": 1_700_000_000_000})
    speed_rows = spark_speed.validate_and_predict_batches(types.SimpleNamespace(value=model))
    rows = pa.Table.from_batches(list(speed_rows(iter(pa.Table.from_pandas(messages).to_batches(max_chunksize=200)))))
    assert spark_speed.batch_offsets(rows) == {p: (messages.loc[messages["partition"] == p, "offset"].min(),
                                                   messages.loc[messages["partition"] == p, "offset"].max())
                                               for p in range(3)}
    written = spark_speed.write_speed_tables(tmp_path / "arrow", rows.filter(pc.is_null(rows["reason"])),
                                             model.version)

    validated = speed_core.validate_frame(messages)
    valid = validated[validated["reason"].isna()].sort_values(["partition", "offset"])
    columns = speed_core.frame_columns(valid, speed_core.POSITION_COLUMNS + speed_core.TRIP_COLUMNS)
    speed_core.write_speed_files(tmp_path / "core", columns, model.predict_seconds(columns), model.version)
    ours, core = speed_view.read_speed(tmp_path / "arrow"), speed_view.read_speed(tmp_path / "core")
    assert len(ours) == len(trips) - len(rule_violations(trips)) == written.num_rows
    assert [p.name for *_, p in speed_view.batch_files(tmp_path / "arrow")] == \
        [p.name for *_, p in speed_view.batch_files(tmp_path / "core")]
    pd.testing.assert_frame_equal(ours.drop(columns="visible_at_ms"), core.drop(columns="visible_at_ms"))
    assert (ours["visible_at_ms"] > 0).all()


def test_the_lag_comes_from_the_progress_of_sparks_kafka_source():
    progress = {"batchId": 4, "sources": [{"description": "KafkaV2[Subscribe[t]]",
                                           "endOffset": '{"t": {"0": 45, "1": 33, "2": 22}}',
                                           "latestOffset": '{"t": {"0": 90, "1": 33, "2": 30}}'}]}
    assert spark_speed.progress_offsets(progress, "t") == ({0: 45, 1: 33, 2: 22}, {0: 90, 1: 33, 2: 30})
    assert spark_speed.progress_offsets(progress, "other") is None
    assert spark_speed.progress_offsets(None, "t") is None, "no batch has run yet"


def test_the_next_batch_is_expected_as_big_as_the_last_one_or_the_backlog_behind_it():
    def progress(rows: int, end: str, latest: str) -> dict:
        return {"numInputRows": rows, "sources": [{"endOffset": end, "latestOffset": latest}]}

    assert spark_speed.expected_rows(progress(500, '{"t": {"0": 45, "1": 33}}', '{"t": {"0": 45, "1": 33}}'),
                                     "t") == 500, "a steady rate"
    assert spark_speed.expected_rows(progress(700, '{"t": {"0": 45, "1": 33}}', '{"t": {"0": 9045, "1": 133}}'),
                                     "t") == 9100, "a catch-up: the backlog"
    assert spark_speed.expected_rows({"numInputRows": 0, "sources": []}, "t") == 0, "idle"


def test_kafka_data_loss_is_explained_and_other_failures_left_alone():
    lost = "Some data may have been lost because they are not available in Kafka any more ... failOnDataLoss ..."
    assert "delete the checkpoint" in spark_speed.explain_failure(lost)
    assert spark_speed.explain_failure("boom") == "boom"


def test_bad_arguments_are_explained(capsys):
    for argv, expected in ((["--lateness", "ten minutes"], "--lateness must be a number and a unit"),
                           (["--max-batches", "0"], "--max-batches must be at least 1"),
                           (["--stop-when-idle", "-1"], "--stop-when-idle must be a positive")):
        with pytest.raises(SystemExit):
            spark_streaming.parse_args(argv)
        assert expected in capsys.readouterr().err


# --- with the broker ------------------------------------------------------------------------------------


@pytest.mark.kafka
def test_spark_speed_view_equals_the_plain_consumers_and_malformed_messages_reach_the_dlq(
        spark, kafka_bootstrap, topics, trained_model_dir, sample_trips, tmp_path):
    trips = sample_trips.head(3000)
    violations = rule_violations(trips)
    produce(kafka_bootstrap, topics[0], trip_messages(trips) + [(b"bad", value) for value in MALFORMED])

    plain_dir, spark_dir = tmp_path / "speed-plain", tmp_path / "speed-spark"
    spark_topics = (topics[0], topics[1] + "-spark")  # a layer does not re-send what the other sent
    kafka_local.ensure_topics(kafka_bootstrap, {spark_topics[1]: 1})
    assert kafka_consumer.main(consumer_args(kafka_bootstrap, topics, plain_dir, trained_model_dir)) == 0
    layer = run_in_process(spark, spark_args(kafka_bootstrap, spark_topics, spark_dir, trained_model_dir,
                                             tmp_path / "checkpoint", "--max-offsets-per-trigger", "1000"))

    plain, ours = speed_view.read_speed(plain_dir), speed_view.read_speed(spark_dir)
    assert list(ours.columns) == list(speed_view.COLUMNS) and (ours.dtypes == plain.dtypes).all()
    assert_exactly_once(ours, set(trips["id"]) - set(violations))
    keys = ["partition", "offset"]
    pd.testing.assert_frame_equal(ours.drop(columns=["visible_at_ms", "predicted_duration_s"]),
                                  plain.drop(columns=["visible_at_ms", "predicted_duration_s"]))
    np.testing.assert_allclose(ours.sort_values(keys)["predicted_duration_s"],
                               plain.sort_values(keys)["predicted_duration_s"], rtol=1e-9)
    assert layer.batches >= 3, "1000 messages per trigger make several micro-batches"

    dead = {**dlq_by_component(kafka_bootstrap, topics[1], len(violations) + len(MALFORMED)),
            **dlq_by_component(kafka_bootstrap, spark_topics[1], len(violations) + len(MALFORMED))}
    assert dead["spark_streaming"] == dead["kafka_consumer"]
    assert len(dead["spark_streaming"]) == len(violations) + len(MALFORMED)
    reasons = {speed_core.reason_code(reason) for _, reason in dead["spark_streaming"]}
    assert {"invalid_json", "empty_message", "missing_field"} | set(violations.values()) == reasons

    status = speed_view.read_statuses(spark_dir)[0]
    assert status["consumer_id"] == "spark" and status["state"] == "stopped" and status["total_lag"] == 0
    assert status["totals"]["consumed"] == len(trips) + len(MALFORMED)
    assert status["totals"]["dlq"] == len(violations) + len(MALFORMED)
    assert sum(status["totals"]["dlq_by_reason"].values()) == status["totals"]["dlq"]
    assert status["live_error"]["cumulative"]["rows"] == len(ours)
    assert (ours["visible_at_ms"] > ours["kafka_timestamp_ms"]).all()
    # over the last 10 s: none if the windows query, which follows the speed files, took longer than that
    assert status["latency_ms"]["p50"] is None or status["latency_ms"]["p50"] > 0
    assert status["assigned_partitions"] == [0, 1, 2] and status["model_version"] == "test-v1"


def test_a_small_batch_on_the_driver_gives_the_rows_the_executors_give(spark, trained_model_dir, sample_trips):
    trips = sample_trips.head(100)
    messages = pd.DataFrame({"key": [t.encode() for t in trips["id"]] + [b"bad"],
                             "value": [record_to_json(r) for r in trips.to_dict("records")] + [b"{oops"],
                             "topic": "t", "partition": [i % 3 for i in range(len(trips) + 1)],
                             "offset": [i // 3 for i in range(len(trips) + 1)],
                             "timestamp": pd.Timestamp("2023-11-14 22:13:20"), "timestampType": 0})
    batch = spark_streaming.kafka_messages(spark.createDataFrame(messages, schema=spark_speed.KAFKA_SOURCE_SCHEMA))
    models = spark_speed.BroadcastModel(spark, trained_model_dir, spark_streaming.log)
    assert models.warm_up() > 0
    on_executors = spark_streaming.validate_and_predict(batch, models, None).sort_by([("partition", "ascending"),
                                                                                     ("offset", "ascending")])
    on_driver = spark_streaming.validate_and_predict(batch, models, len(messages)).sort_by(
        [("partition", "ascending"), ("offset", "ascending")])
    assert on_driver.equals(on_executors) and on_driver.num_rows == len(messages)


@pytest.mark.kafka
def test_a_replayed_batch_id_rewrites_the_same_files_and_sends_no_dead_letter_twice(
        spark, kafka_bootstrap, topics, trained_model_dir, sample_trips, tmp_path):
    trips = sample_trips.head(200)
    messages = pd.DataFrame({"key": [t.encode() for t in trips["id"]] + [b"bad"],
                             "value": [record_to_json(r) for r in trips.to_dict("records")] + [b"{oops"],
                             "topic": topics[0], "partition": [i % 3 for i in range(len(trips) + 1)],
                             "offset": [i // 3 for i in range(len(trips) + 1)],
                             "timestamp": pd.Timestamp("2023-11-14 22:13:20"), "timestampType": 0})
    batch = spark_streaming.kafka_messages(spark.createDataFrame(messages, schema=spark_speed.KAFKA_SOURCE_SCHEMA))
    args = spark_streaming.parse_args(spark_args(kafka_bootstrap, topics, tmp_path / "speed", trained_model_dir,
                                                 tmp_path / "checkpoint"))
    args.checkpoint_dir.mkdir(parents=True)
    layer = spark_speed.SparkSpeedLayer(spark, args, spark_streaming.COMPONENT, spark_streaming.log)
    try:
        spark_streaming.write_speed_batch(layer, batch, 0)
        first = [path.name for *_, path in speed_view.batch_files(args.speed_dir)]
        spark_streaming.write_speed_batch(layer, batch, 0)
        again = [path.name for *_, path in speed_view.batch_files(args.speed_dir)]
    finally:
        layer.stop()
    assert first == again and len(first) == 3
    assert layer.stats.totals["dlq_already_sent"] == 1 + len(rule_violations(trips)), "the replay sent none again"
    rows = speed_view.read_speed(args.speed_dir)
    assert len(rows) == len(trips) - len(rule_violations(trips)) and not rows.duplicated(["partition", "offset"]).any()
    assert len(read_dlq(kafka_bootstrap, topics[1], 1 + len(rule_violations(trips)), timeout_s=5)) == \
        1 + len(rule_violations(trips))


@pytest.mark.kafka
def test_each_bad_message_reaches_the_dlq_once_across_a_fresh_checkpoint_and_the_other_speed_layer(
        spark, kafka_bootstrap, topics, trained_model_dir, sample_trips, tmp_path):
    """Dead letters exactly once where the checkpoint cannot help: it is deleted, and the speed view pruned
    (as a batch run prunes it), so the next start reads every message again; then the plain consumer
    reads them all too. The semantics are in ``spark_streaming.dead_letter`` (and the plain
    consumer's ``validate_and_dead_letter``): ``DeadLetterSender`` asks the ``DeadLetterLedger`` - the
    dead-letter topic read back - before each dead letter, whichever speed layer sent it.
    """
    trips = sample_trips.iloc[6000:6600]
    messages, malformed = with_malformed(trips, every=40)
    produce(kafka_bootstrap, topics[0], messages)
    expected = bad_offsets(kafka_bootstrap, topics[0], trips, malformed)
    speed_dir, checkpoint = tmp_path / "speed", tmp_path / "checkpoint"
    argv = spark_args(kafka_bootstrap, topics, speed_dir, trained_model_dir, checkpoint, "--no-windows",
                      "--max-offsets-per-trigger", "250")

    def prune_everything() -> None:
        assert speed_view.prune(speed_dir, speed_view.last_offsets(speed_dir)) > 0
        assert speed_view.last_offsets(speed_dir) == {}

    first = run_in_process(spark, argv)
    assert first.stats.totals["dlq"] == len(expected) and first.stats.totals["dlq_already_sent"] == 0
    shutil.rmtree(checkpoint)
    prune_everything()
    again = run_in_process(spark, argv)
    assert again.stats.totals["consumed"] == len(messages), "the fresh checkpoint read every message again"
    assert again.stats.totals["dlq_already_sent"] == len(expected), "and sent none of their dead letters again"
    prune_everything()
    assert kafka_consumer.main(consumer_args(kafka_bootstrap, topics, speed_dir, trained_model_dir)) == 0
    plain = [status["totals"] for status in speed_view.read_statuses(speed_dir) if status["consumer_id"] != "spark"]
    assert plain[0]["consumed"] == len(messages) and plain[0]["dlq_already_sent"] == len(expected)

    sources = dead_letter_sources(kafka_bootstrap, topics[1], len(expected))
    assert set(sources) == expected and set(sources.values()) == {1}, "each bad message on the DLQ once"


@pytest.mark.kafka
def test_trips_later_than_the_watermark_leave_the_windows_but_stay_in_the_speed_view(
        spark, kafka_bootstrap, topics, trained_model_dir, sample_trips, tmp_path):
    valid = sample_trips[sample_trips["id"].isin(set(sample_trips["id"].head(200)) -
                                                 set(rule_violations(sample_trips.head(200))))]
    on_time = retimed(valid, [f"2016-01-01 10:0{i % 5}:00" for i in range(20)])
    ahead = retimed(valid.iloc[20:], ["2016-01-01 12:00:00"])            # watermark -> 11:50
    late = retimed(valid.iloc[21:], ["2016-01-01 10:02:30"])             # older than 11:50: too late
    in_time = retimed(valid.iloc[22:], ["2016-01-01 11:56:00"])          # within the 10 minutes: counted
    closing = retimed(valid.iloc[23:], ["2016-01-01 14:00:00"])          # closes every window above
    args = spark_streaming.parse_args(spark_args(kafka_bootstrap, topics, tmp_path / "speed", trained_model_dir,
                                                 tmp_path / "checkpoint", "--lateness", "10 minutes"))
    layer = spark_streaming.start(spark, args)
    try:
        for step in (on_time, ahead, late, in_time, closing):
            produce(kafka_bootstrap, topics[0], trip_messages(step))
            layer.process_all_available()
            time.sleep(0.5)  # a no-data batch moves the watermark on
        table = f"SELECT date_format(window_start, 'HH:mm') AS start, trips FROM {spark_streaming.WINDOWS_VIEW}"
        windows = wait_for(lambda: dict(spark.sql(table).collect()) if len(spark.sql(table).collect()) >= 3
                           else None, 60, "three closed windows")
    finally:
        layer.stop()
    assert windows == {"10:00": 20, "11:55": 1, "12:00": 1}, "the late trip is not in the 10:00 window"
    rows = speed_view.read_speed(args.speed_dir)
    assert late["id"].iloc[0] in set(rows["id"]), "but it is in the speed view"
    assert len(rows) == 24

    # Restarted, the windows are the speed view's (read in one go, so the late trip is in), not the topic's
    again = spark_streaming.start(spark, args)
    try:
        again.process_all_available()
        restarted = wait_for(lambda: dict(spark.sql(table).collect()) if len(spark.sql(table).collect()) >= 3
                             else None, 60, "the windows of the speed view")
    finally:
        again.stop()
    assert again.stats.totals["consumed"] == 0, "the topic is not read again"
    pickup = pd.to_datetime(rows["pickup_datetime"], unit="ms")
    start = pickup.dt.floor("5min")
    closed = start + pd.Timedelta("5min") <= pickup.max() - pd.Timedelta("10min")
    assert restarted == start[closed].dt.strftime("%H:%M").value_counts().to_dict()


@pytest.mark.kafka
def test_kill_9_mid_stream_then_restart_from_the_checkpoint_loses_and_duplicates_nothing(
        kafka_bootstrap, topics, trained_model_dir, sample_trips, tmp_path):
    """Trips once in the speed view (files named by offset range, rewritten by the re-run batch) and bad
    messages once on the DLQ (``spark_streaming.dead_letter`` asks the topic first)."""
    trips = sample_trips.head(4000)
    expected = set(trips["id"]) - set(rule_violations(trips))
    messages, malformed = with_malformed(trips, every=50)
    produce(kafka_bootstrap, topics[0], messages)
    dead_letters = bad_offsets(kafka_bootstrap, topics[0], trips, malformed)
    speed_dir, checkpoint = tmp_path / "speed", tmp_path / "checkpoint"
    argv = spark_args(kafka_bootstrap, topics, speed_dir, trained_model_dir, checkpoint,
                      "--no-windows", "--max-offsets-per-trigger", "300")

    with open(tmp_path / "first.log", "wb") as log:
        first = subprocess.Popen([sys.executable, "spark_streaming.py", *argv, "--stop-when-idle", "60"], cwd=ROOT,
                                 stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: len(speed_view.batch_files(speed_dir)) >= 6, 240, "the first speed files", poll_s=0.05)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    written = len(speed_view.read_speed(speed_dir))
    assert 0 < written < len(expected), "killed mid-stream"
    assert (checkpoint / "speed" / "offsets").is_dir()

    result = subprocess.run([sys.executable, "spark_streaming.py", *argv, "--stop-when-idle", "3"], cwd=ROOT,
                            capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = speed_view.read_speed(speed_dir)
    assert_exactly_once(rows, expected)
    status = json.loads((speed_dir / "_status" / "spark.json").read_text())
    assert status["total_lag"] == 0 and status["state"] == "stopped"
    sources = dead_letter_sources(kafka_bootstrap, topics[1], len(dead_letters))
    assert set(sources) == dead_letters and set(sources.values()) == {1}, "each bad message on the DLQ once"


def test_the_sql_prompt_skips_empty_lines_and_ends_on_quit(spark, monkeypatch, capsys):
    import io
    import re

    typed = "\nSELECT 41 + 1 AS answer;\n\nnot sql at all\nquit\nSELECT 7 AS late\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(typed))
    sql_prompt(spark, "SELECT 1")
    shown = capsys.readouterr().out
    assert re.search(r"\|answer\|\n\+-+\+\n\|42\s*\|", shown), shown
    assert "error: " in shown, "a bad line is reported and the prompt goes on"
    assert "late" not in shown, "quit ends the prompt; nothing after it runs"
