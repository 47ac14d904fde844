"""The speed-layer core (periscope/speed_core.py) and the status file's format (speed_view.SpeedStatus).

Both speed layers run this code, so what is checked here holds for each: the
verdicts and reasons of validation, the rows and files, the live statistics,
the status file and the summary, the model watcher, the shared options. No
broker, no Spark.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time

import numpy as np
import pandas as pd
import pytest

from periscope import schema, speed_core, speed_view
from periscope.model import load_model, metrics, promote
from periscope.schema import record_to_json
from periscope.speed_view import SpeedStatus
from tests.conftest import Message


# --- validate ----------------------------------------------------------------------------------------


def test_validate_batch_gives_reasons_in_stream_order(sample_trips):
    records = sample_trips.head(6).to_dict("records")
    ocean = {**records[3], "pickup_longitude": -72.0}
    short = {**records[4], "trip_duration": 5, "dropoff_datetime": records[4]["pickup_datetime"] + 5000}
    values = [record_to_json(records[0]), b"{oops", record_to_json(short), None, record_to_json(records[1]),
              record_to_json(ocean), b'["a", "list"]', record_to_json(records[2]),
              json.dumps({k: v for k, v in schema.record_to_message(records[5]).items() if k != "vendor_id"}).encode(),
              b"\xff\xfe not utf-8", json.dumps({**schema.record_to_message(records[5]), "vendor_id": 10**30}).encode()]
    messages = [Message("trips", 1, 100 + i, 1_700_000_000_000 + i, b"k", value) for i, value in enumerate(values)]
    columns, invalid = speed_core.validate_batch(messages)

    assert [m.offset for m, _ in invalid] == [101, 102, 103, 105, 106, 108, 109, 110]
    assert [speed_core.reason_code(reason) for _, reason in invalid] == [
        "invalid_json", "duration_too_short", "empty_message", "pickup_outside_nyc", "invalid_json",
        "missing_field", "invalid_json", "wrong_type"]
    assert invalid[5][1] == "missing_field: missing vendor_id"
    assert list(columns["id"]) == [records[0]["id"], records[1]["id"], records[2]["id"]]
    assert list(columns["offset"]) == [100, 104, 107]
    assert list(columns["kafka_timestamp_ms"]) == [1_700_000_000_000, 1_700_000_000_004, 1_700_000_000_007]
    for name in ("vendor_id", "pickup_datetime", "trip_duration", "pickup_latitude", "store_and_fwd_flag"):
        assert list(columns[name]) == [r[name] for r in records[:3]]


def test_validate_batch_of_nothing_valid():
    messages = [Message("t", 0, i, 1, None, value) for i, value in enumerate([b"", b"null", b"{}"])]
    columns, invalid = speed_core.validate_batch(messages)
    assert len(columns["id"]) == 0 and len(invalid) == 3
    assert [speed_core.reason_code(r) for _, r in invalid] == ["empty_message", "invalid_json", "missing_field"]


def test_reason_codes_and_the_offsets_to_commit():
    assert speed_core.reason_code("invalid_json: Expecting value: line 1") == "invalid_json"
    assert speed_core.reason_code("pickup_outside_nyc") == "pickup_outside_nyc"
    assert speed_core.next_offsets([(0, 5), (1, 9), (0, 7), (0, 6)]) == {0: 8, 1: 10}
    assert speed_core.next_offsets([]) == {}


def test_the_frame_form_gives_the_same_verdicts_columns_and_predictions(sample_trips, trained_model_dir):
    """What Spark's executors run (``validate_frame`` per batch, ``predict_frame``) agrees with the plain path."""
    records = sample_trips.head(40).to_dict("records")
    values = [record_to_json(r) for r in records] + [b"{oops", None]
    messages = [Message("t", i % 3, 10 + i, 1_700_000_000_000 + i, b"k", v) for i, v in enumerate(values)]
    columns, invalid = speed_core.validate_batch(messages)
    frame = pd.DataFrame({"key": [m.key for m in messages], "value": values, "topic": "t",
                          "partition": [m.partition for m in messages], "offset": [m.offset for m in messages],
                          "timestamp_ms": [m.timestamp for m in messages]})
    validated = pd.concat([speed_core.validate_frame(part) for part in (frame.iloc[:20], frame.iloc[20:])],
                          ignore_index=True)
    assert list(validated.columns) == list(speed_core.VALIDATED_COLUMNS)
    rejected = validated[validated["reason"].notna()]
    assert sorted(zip(rejected["offset"], rejected["reason"])) == sorted((m.offset, r) for m, r in invalid)
    valid = validated[validated["reason"].isna()].sort_values("offset")
    typed = speed_core.frame_columns(valid, speed_core.POSITION_COLUMNS + speed_core.TRIP_COLUMNS)
    for name, values in columns.items():
        np.testing.assert_array_equal(typed[name], values)
        assert typed[name].dtype == values.dtype, name

    model = load_model(trained_model_dir)
    predicted = speed_core.predict_frame(model, validated[list(speed_core.TRIP_COLUMNS)])
    assert predicted[validated["reason"].notna().to_numpy()].isna().all()
    order = np.argsort(validated["offset"].to_numpy()[validated["reason"].isna().to_numpy()])
    np.testing.assert_allclose(predicted.dropna().to_numpy()[order], model.predict_seconds(columns), rtol=1e-12)


# --- the speed rows and files ------------------------------------------------------------------------


def test_speed_rows_have_the_speed_view_columns_and_dtypes(sample_trips):
    messages = [Message("t", 2, 10 + i, 5, None, record_to_json(r))
                for i, r in enumerate(sample_trips.head(50).to_dict("records"))]
    columns, invalid = speed_core.validate_batch(messages)
    predicted = np.linspace(100, 200, len(columns["id"]))
    rows = speed_core.speed_rows(columns, predicted, "v7")
    assert list(rows.columns) == list(speed_view.COLUMNS)
    expected = speed_view.empty_speed_frame().dtypes
    assert (rows.dtypes == expected).all(), rows.dtypes[rows.dtypes != expected]
    assert (rows["model_version"] == "v7").all() and (rows["partition"] == 2).all()
    assert len(rows) + len(invalid) == 50


def test_speed_files_one_per_partition_stamped_and_rewritten_in_place(sample_trips, tmp_path):
    records = sample_trips.head(30).to_dict("records")
    messages = [Message("t", i % 3, 100 + i // 3, 7, None, record_to_json(r)) for i, r in enumerate(records)]
    columns, _ = speed_core.validate_batch(messages)
    predicted = np.arange(len(columns["id"]), dtype=float) + 60
    before = speed_core.wall_clock_ms()
    rows = speed_core.write_speed_files(tmp_path, columns, predicted, "v1")
    files = speed_view.batch_files(tmp_path)
    expected = {(p, int(columns["offset"][columns["partition"] == p].min()),
                 int(columns["offset"][columns["partition"] == p].max())) for p in np.unique(columns["partition"])}
    assert {(p, first, last) for p, first, last, _ in files} == expected
    assert (rows["visible_at_ms"] >= before).all() and (rows["visible_at_ms"] <= speed_core.wall_clock_ms()).all()
    first = speed_view.read_speed(tmp_path)

    speed_core.write_speed_files(tmp_path, columns, predicted, "v1")  # a replayed batch
    assert [path for *_, path in speed_view.batch_files(tmp_path)] == [path for *_, path in files]
    pd.testing.assert_frame_equal(speed_view.read_speed(tmp_path).drop(columns="visible_at_ms"),
                                  first.drop(columns="visible_at_ms"))


# --- live statistics ---------------------------------------------------------------------------------


def test_live_error_matches_model_metrics(sample_trips):
    rng = np.random.default_rng(3)
    actual = sample_trips["trip_duration"].to_numpy()[:5000]
    predicted = actual * rng.lognormal(0, 0.4, len(actual))
    live = speed_core.LiveError(window_s=60)
    for start, stop in ((0, 1000), (1000, 3500), (3500, 5000)):
        live.add(actual[start:stop], predicted[start:stop], now=100.0 + start / 1000)
    expected = metrics(actual, predicted)
    for name in ("rmsle", "mae", "rmse"):
        assert live.cumulative()[name] == pytest.approx(expected[name], rel=1e-9)
        assert live.recent(now=103.0)[name] == pytest.approx(expected[name], rel=1e-9)
    assert live.cumulative()["rows"] == 5000
    recent = live.recent(now=161.2)  # the first two batches are older than 60 s by then
    assert recent["rows"] == 1500
    assert recent["rmsle"] == pytest.approx(metrics(actual[3500:], predicted[3500:])["rmsle"], rel=1e-9)
    assert speed_core.LiveError().cumulative() == {"rmsle": None, "mae": None, "rmse": None, "rows": 0}


def test_latency_percentiles_over_a_sliding_window():
    window = speed_core.SlidingWindow(10.0)
    assert speed_core.latency_percentiles(window, now=0.0) == (None, None)
    old, recent = np.full(1000, 5000.0), np.arange(1, 1001, dtype=float)
    window.add(old, now=0.0)
    window.add(recent, now=8.0)
    p50, p99 = speed_core.latency_percentiles(window, now=9.0)
    assert (p50, p99) == tuple(np.percentile(np.concatenate([old, recent]), [50, 99]))
    p50, p99 = speed_core.latency_percentiles(window, now=12.0)  # the first batch fell out
    assert p50 == pytest.approx(500.5) and p99 == pytest.approx(np.percentile(recent, 99))
    window.add(np.array([]), now=30.0)  # a batch of dead letters only: no latency to report, no error
    assert speed_core.latency_percentiles(window, now=31.0) == (None, None)


def statistics_after_two_batches(sample_trips, tmp_path) -> tuple[speed_core.SpeedStatistics, pd.DataFrame]:
    records = sample_trips.head(20).to_dict("records")
    messages = [Message("t", i % 2, i // 2, 1_000, None, record_to_json(r)) for i, r in enumerate(records)]
    columns, _ = speed_core.validate_batch(messages)
    rows = speed_core.write_speed_files(tmp_path, columns, columns["trip_duration"] * 1.1, "v3")
    stats = speed_core.SpeedStatistics("one", "periscope-speed", "taxi-trips")
    stats.count_batch(len(messages) + 3, rows, ["invalid_json: x", "invalid_json: y", "pickup_outside_nyc"],
                      already_sent=1)
    stats.count_batch(2, rows.iloc[:0], ["empty_message", "empty_message"])
    return stats, rows


def test_statistics_make_the_status_file(sample_trips, tmp_path):
    stats, rows = statistics_after_two_batches(sample_trips, tmp_path / "speed")
    status = stats.status("running", "<stable>", {0: 10, 1: None}, {0: 4, 1: None}, "v3")
    assert (status.consumer_id, status.group, status.topic, status.state) == ("one", "periscope-speed",
                                                                              "taxi-trips", "running")
    assert status.assigned_partitions == [0, 1] and status.total_lag == 4
    totals = status.totals
    assert (totals.consumed, totals.valid, totals.dlq, totals.dlq_already_sent) == (25, len(rows), 5, 1)
    assert totals.dlq_by_reason == {"empty_message": 2, "invalid_json": 2, "pickup_outside_nyc": 1}
    assert sum(sum(minute["counts"].values()) for minute in status.dlq_history) == 5
    latency = (rows["visible_at_ms"] - rows["kafka_timestamp_ms"]).to_numpy()
    assert (status.latency_ms.p50, status.latency_ms.p99) == tuple(np.percentile(latency, [50, 99]))
    assert status.live_error.cumulative["rows"] == len(rows)
    assert status.live_error.cumulative["rmsle"] == pytest.approx(
        metrics(rows["trip_duration"].to_numpy(), rows["predicted_duration_s"].to_numpy())["rmsle"])
    assert status.rate_per_s > 0 and status.spark is None

    stats.publish(tmp_path / "speed", status)
    written = speed_view.read_statuses(tmp_path / "speed")
    assert written == [json.loads(json.dumps(status.to_json()))]
    assert SpeedStatus.from_json(written[0]) == status
    assert stats.status("stopped", "<stable>", {}, {}, "v3").rate_per_s == 0, "the rate counts from the publish"


def test_the_status_file_format(sample_trips, tmp_path):
    """The fields the dashboard reads, as both layers write them; a field a file lacks reads as its default."""
    stats, _ = statistics_after_two_batches(sample_trips, tmp_path)
    document = stats.status("running", "spark", {2: 7}, {2: 0}, "v3", spark={"batches": 2}).to_json()
    assert set(document) == {
        "consumer_id", "group", "topic", "pid", "host", "state", "member_state", "updated_at_ms", "uptime_s",
        "assigned_partitions", "positions", "lag", "total_lag", "totals", "dlq_history", "rate_per_s",
        "latency_ms", "live_error", "model_version", "spark"}
    assert set(document["totals"]) == {"consumed", "valid", "dlq", "dlq_already_sent", "dlq_by_reason"}
    assert set(document["latency_ms"]) == {"p50", "p99", "window_s"}
    assert set(document["live_error"]) == {"cumulative", "recent", "recent_window_s"}
    assert document["positions"] == {"2": 7} and document["lag"] == {"2": 0}
    assert "spark" not in stats.status("running", "<stable>", {}, {}, "v3").to_json()

    old = SpeedStatus.from_json({"consumer_id": "old", "lag": {"1": 5}, "totals": {"consumed": 9}})
    assert old.lag == {1: 5} and old.total_lag == 5 and old.totals.consumed == 9 and old.totals.dlq == 0
    assert old.latency_ms.p99 is None and old.state == "?" and old.dlq_history == []
    assert SpeedStatus.from_json({}).consumer_id == "?"


def test_the_shutdown_summary_of_each_layer(sample_trips, tmp_path):
    stats, rows = statistics_after_two_batches(sample_trips, tmp_path)
    plain, spark = stats.summary(), stats.summary(micro_batches=4)
    assert plain.startswith("stopped after 0 s: 25 trips consumed, ")
    assert spark.startswith("stopped after 0 s and 4 micro-batches: 25 messages, ")
    for line in (plain, spark):
        assert (f"{len(rows)} valid, 5 to the dead-letter topic (2 invalid_json, 2 empty_message, "
                f"1 pickup_outside_nyc), 1 of them there already (sent before a restart or a rebalance, "
                f"or by the other speed layer); live RMSLE ") in line
    quiet = speed_core.SpeedStatistics("q", "g", "t").summary()
    assert quiet == "stopped after 0 s: 0 trips consumed, 0 valid, 0 to the dead-letter topic; no valid trips"


def test_the_log_lines(sample_trips, tmp_path):
    stats, rows = statistics_after_two_batches(sample_trips, tmp_path)
    status = stats.status("running", "<stable>", {0: 10, 1: 10}, {0: 1200, 1: 34}, "v3")
    line = speed_core.status_line(status)
    assert line.startswith(f"consumed 25 valid {len(rows)} dlq 5 | ") and "| lag 1,234 | latency p50 " in line
    assert line.endswith("| model v3") and "(1 min " in line
    batch = speed_core.batch_line(7, 2000, 1990, 10, 0.5, stats.status("running", "spark", {0: 1}, {0: None}, "v3"))
    assert batch.startswith("batch 7: 2,000 messages (1,990 valid, 10 dlq) in 0.50 s, 4,000/s | lag ? | ")
    empty = speed_core.SpeedStatistics("q", "g", "t").status("running", "", {}, {}, "v0")
    assert "latency - | RMSLE - (1 min -)" in speed_core.status_line(empty)


# --- the model ---------------------------------------------------------------------------------------


def test_a_promoted_model_is_picked_up_and_a_broken_one_ignored(trained_model_dir, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(trained_model_dir, model_dir)

    class Watcher(speed_core.ModelWatcher):
        def switched(self, model):
            if model.version == "test-v3":
                raise RuntimeError("cannot broadcast")
            self.followed.append(model.version)

    watcher = Watcher(model_dir, check_every_s=0)
    watcher.followed = []
    assert watcher.current().version == "test-v1"

    for version, features in (("test-v2", None), ("test-broken", ["vendor_id"]), ("test-v3", None)):
        directory = model_dir / "versions" / version
        shutil.copytree(model_dir / "versions" / "test-v1", directory)
        metadata = json.loads((directory / "metadata.json").read_text())
        metadata.update(version=version, **({"features": features} if features else {}))
        (directory / "metadata.json").write_text(json.dumps(metadata))
        promote(model_dir, version)
        watcher.checked_at = 0.0
        assert watcher.current().version == "test-v2"  # the broken version is refused, v2 stays live
    assert watcher.followed == ["test-v2"], "a model whose switch fails (test-v3) never goes live"

    slow = speed_core.ModelWatcher(model_dir, check_every_s=3600)
    promote(model_dir, "test-v1")
    assert slow.current().version == "test-v3", "the pointer is checked at most every check_every_s"
    slow.checked_at = time.monotonic() - 3600
    assert slow.current().version == "test-v1"


# --- the shared command line -------------------------------------------------------------------------


def shared_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    speed_core.add_kafka_arguments(parser)
    speed_core.add_output_arguments(parser)
    speed_core.add_run_arguments(parser, "me", "status file name")
    return parser


def test_the_shared_options_and_their_checks(tmp_path, capsys):
    parser = shared_parser()
    args = parser.parse_args(["--speed-dir", str(tmp_path), "--stop-when-idle", "3"])
    speed_core.check_run_arguments(parser, args)
    assert (args.consumer_id, args.stop_when_idle, args.speed_dir) == ("me", 3.0, tmp_path)
    (tmp_path / "a-file").write_text("")
    for argv, message in ((["--stop-when-idle", "0"], "--stop-when-idle must be a positive number of seconds"),
                          (["--consumer-id", ".hidden"], "--consumer-id must be a plain file name"),
                          (["--consumer-id", ""], "--consumer-id must be a plain file name"),
                          (["--speed-dir", str(tmp_path / "a-file")], "exists and is not a directory")):
        parser = shared_parser()
        with pytest.raises(SystemExit) as exit_info:
            speed_core.check_run_arguments(parser, parser.parse_args(argv))
        assert exit_info.value.code == 2 and message in capsys.readouterr().err

