"""TLC trip records through the stream: replayed by kafka_producer.py into both speed layers, imported
and replayed counted once, given their zones when they enter master data.

Expected values come from the tests' own readings: pandas over the shipped files
(``conftest.independent_tlc`` and its rules), a point-by-point shapely loop over
the polygons (``conftest.shapely_zones``).
"""
from __future__ import annotations

import json
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import batch_processor
import kafka_consumer
import kafka_producer
import spark_streaming
from periscope import kafka_local, serving, spark_session, speed_view, storage, stream, views
from periscope.model import load_model
from periscope.schema import NOT_RECORDED, parse_json, record_to_json, trips_to_messages, validate
from periscope.sources import read_trips
from tests.conftest import (CAB_FILES, SHARED_DATA, TLC_DIR, consumer_args, independent_tlc,
                            independent_tlc_rules, read_dlq, shapely_zones)

COORDINATES = TLC_DIR / "yellow_tripdata_2015-01_head.csv"
ZONE_ERA = TLC_DIR / "green_tripdata_2020-04_1000rows.csv"
ALSO_IN_A_SAMPLE = TLC_DIR / "yellow_tripdata_2020-04_1000rows.csv"
"""45 of its rows are in yellow_tripdata_sample_2020-04.csv.gz too (docs/DATA.md): one fact each."""
REPLAYED_TRIPS = 1000
REPLAYED = {path: REPLAYED_TRIPS for path in CAB_FILES}
"""What goes through the broker into both speed layers: every shipped cab file (each layout and
format: the 2009, 2010-2014 and 2015-2016 coordinates layouts, yellow zones quoted with .000000
times, snake_case in gzip, green zones in CSV and Parquet), each ``--limit``-ed to its first 1,000
trips in pickup order, so the test takes two minutes, not fifteen (every trip of every shipped
file becomes a message that parses back to it: checked above)."""
SAME_FACT = ("pickup", "dropoff", "vendor", "passengers", "plon", "plat", "dlon", "dlat", "pzone", "dzone",
             "fare", "tip", "total", "distance")


def expected_trips(paths: list[Path], limits: dict[Path, int | None] | None = None) -> pd.DataFrame:
    """Every distinct well-formed trip of ``paths`` (pandas), the first copy in file order, with the
    first cleaning rule it breaks ('' for none); of a file with a limit, its first trips by pickup."""
    frames = []
    for path in paths:
        raw, ok = independent_tlc(path)
        trips = raw[ok].copy()
        limit = (limits or {}).get(path)
        if limit:
            trips = trips.sort_values("pickup", kind="stable").head(limit)
        trips["rule"] = independent_tlc_rules(trips)
        frames.append(trips)
    trips = pd.concat(frames, ignore_index=True)
    for end in "pd":  # as recorded, else the zone of the exact coordinates (the speed layers give it)
        found = pd.Series(shapely_zones(trips[f"{end}lon"], trips[f"{end}lat"]), index=trips.index)
        trips[f"{end}zone_placed"] = pd.to_numeric(trips[f"{end}zone"]).fillna(found).astype(np.int64)
    for name in SAME_FACT[2:]:
        trips[name] = pd.to_numeric(trips[name]).astype(float).round(6)
    return trips.drop_duplicates(list(SAME_FACT)).reset_index(drop=True)


def as_speed_keys(pickup: pd.Series, dropoff: pd.Series, pzone: pd.Series, dzone: pd.Series) -> list[tuple]:
    """(pickup ms, duration s, pickup zone, dropoff zone) per trip, sorted: a multiset to compare."""
    return sorted(zip(pickup.tolist(), dropoff.tolist(), pzone.tolist(), dzone.tolist()))


def pandas_keys(trips: pd.DataFrame) -> list[tuple]:
    pickup = trips["pickup"].to_numpy(dtype="datetime64[ms]").astype(np.int64)
    duration = (trips["dropoff"] - trips["pickup"]).dt.total_seconds().astype(np.int64) // 1
    return as_speed_keys(pd.Series(pickup), duration, trips["pzone_placed"], trips["dzone_placed"])


def produce_files(bootstrap: str, topic: str, paths: list[Path],
                  limits: dict[Path, int | None] | None = None) -> None:
    for path in paths:
        limit = (limits or {}).get(path)
        assert kafka_producer.main(["--input", str(path), "--cutoff", "none", "--topic", topic, "--bootstrap",
                                    bootstrap, "--progress", "0",
                                    *(["--limit", str(limit)] if limit else [])]) == 0


def fresh_topics(bootstrap: str, name: str) -> tuple[str, str]:
    stem = f"{name}-{uuid.uuid4().hex[:6]}"
    kafka_local.ensure_topics(bootstrap, {f"trips-{stem}": 3, f"dlq-{stem}": 1, f"dlq-{stem}-spark": 1})
    return f"trips-{stem}", f"dlq-{stem}"


# --- messages: the unified schema, backward compatible --------------------------------------------


@pytest.mark.parametrize("path", CAB_FILES, ids=lambda p: p.name)
def test_every_trip_of_each_file_is_one_message_that_parses_back_to_the_trip(path):
    trips, _ = read_trips(path, tlc_layouts=True)
    keys, values = trips_to_messages(trips)
    assert values == [record_to_json(record) for record in trips.to_dict("records")]  # --retime's encoder
    assert keys == [trip_id.encode() for trip_id in trips["id"]]
    raw, ok = independent_tlc(path)
    raw = raw[ok].reset_index(drop=True)
    parsed = pd.DataFrame([parse_json(value) for value in values])
    pickups = raw["pickup"].to_numpy(dtype="datetime64[ms]").astype(np.int64)
    assert (parsed["pickup_datetime"].to_numpy() == pickups).all()
    for ours, theirs in (("pickup_longitude", "plon"), ("dropoff_latitude", "dlat"), ("fare_amount", "fare")):
        np.testing.assert_array_equal(parsed[ours].to_numpy(float),
                                      pd.to_numeric(raw[theirs]).to_numpy(float))
    zone = pd.to_numeric(raw["pzone"]).fillna(NOT_RECORDED).astype(np.int64)
    assert parsed["pickup_location_id"].tolist() == zone.tolist()
    message = json.loads(values[0])
    assert message["source_layout"] == trips["source_layout"][0] and message["id"].startswith("tlc_")


def test_kaggle_messages_parse_as_before_and_a_tlc_trip_needs_a_place(sample_trips):
    kaggle = json.loads(record_to_json(sample_trips.iloc[0].to_dict()))
    assert "source_layout" not in kaggle and len(kaggle) == 11  # a Kaggle message is what it was
    assert validate(json.dumps({**kaggle, "vendor_id": None}).encode())[1].startswith("wrong_type: vendor_id")
    zone_trip = {**kaggle, "pickup_longitude": None, "pickup_latitude": None, "source_layout": "yellow_zones",
                 "service": "yellow", "pickup_location_id": 161, "dropoff_location_id": None}
    assert validate(json.dumps(zone_trip).encode())[0]["pickup_location_id"] == 161
    lost = {**zone_trip, "pickup_location_id": None}
    assert validate(json.dumps(lost).encode())[1] == "missing_value: pickup: neither coordinates nor a zone"


def test_speed_files_written_before_the_zones_were_kept_still_read(tmp_path, sample_trips):
    old = pd.DataFrame({name: sample_trips[name].head(5) for name in sample_trips.columns})
    old.insert(0, "kafka_timestamp_ms", 1), old.insert(0, "offset", range(5)), old.insert(0, "partition", 0)
    old["visible_at_ms"], old["predicted_duration_s"], old["model_version"] = 2, 600.0, "v0"
    (tmp_path / "p000").mkdir()
    pq.write_table(pa.Table.from_pandas(old), speed_view.batch_path(tmp_path, 0, 0, 4))
    rows = speed_view.read_speed(tmp_path)
    assert rows["pickup_location_id"].tolist() == [NOT_RECORDED] * 5
    assert rows["fare_amount"].isna().all() and rows["total_amount"].dtype == np.float64
    assert rows["id"].tolist() == old["id"].tolist()


# --- every shipped file through the broker into both speed layers ----------------------------------


@pytest.fixture(scope="module")
def replayed(kafka_bootstrap, trained_model_dir, tmp_path_factory):
    """The ``REPLAYED`` files replayed into one topic, read by the plain consumer and by Spark."""
    topics = fresh_topics(kafka_bootstrap, "tlc-replayed")
    produce_files(kafka_bootstrap, topics[0], list(REPLAYED), REPLAYED)
    root = tmp_path_factory.mktemp("tlc-stream")
    assert kafka_consumer.main(consumer_args(kafka_bootstrap, topics, root / "plain", trained_model_dir)) == 0
    spark = spark_session.get_session(app_name="periscope-tests")
    args = spark_streaming.parse_args([
        "--bootstrap", kafka_bootstrap, "--topic", topics[0], "--dlq-topic", topics[1] + "-spark",
        "--speed-dir", str(root / "spark"), "--model-dir", str(trained_model_dir),
        "--checkpoint-dir", str(root / "checkpoint"), "--trigger", "100 milliseconds", "--no-windows"])
    layer = spark_streaming.start(spark, args)
    try:
        layer.process_all_available()
    finally:
        layer.stop()
    return topics, speed_view.read_speed(root / "plain"), speed_view.read_speed(root / "spark")


def test_a_file_of_each_layout_replays_into_both_speed_layers_as_pandas_expects(replayed, kafka_bootstrap):
    topics, plain, spark = replayed
    expected = expected_trips(list(REPLAYED), REPLAYED)
    clean = expected[expected["rule"] == ""]
    for rows in (plain, spark):
        assert rows["id"].is_unique and rows["id"].str.startswith("tlc_").all()
        got = as_speed_keys(rows["pickup_datetime"], rows["trip_duration"], rows["pickup_location_id"],
                            rows["dropoff_location_id"])
        assert got == pandas_keys(clean)
    pd.testing.assert_frame_equal(spark.drop(columns=["visible_at_ms", "predicted_duration_s"]),
                                  plain.drop(columns=["visible_at_ms", "predicted_duration_s"]))
    np.testing.assert_allclose(spark["predicted_duration_s"], plain["predicted_duration_s"], rtol=1e-9)
    broken = Counter(expected.loc[expected["rule"] != "", "rule"])
    for dlq in (topics[1], topics[1] + "-spark"):
        dead = read_dlq(kafka_bootstrap, dlq, sum(broken.values()))
        assert Counter(stream.header_value(m.headers, stream.REASON_HEADER) for m in dead) == broken


def test_zone_only_trips_are_predicted_by_their_zones(replayed, trained_model_dir):
    """The speed layers hand a zone-only trip to the model as it is (no coordinates, its zones): the
    model's zone features place it, as in training (docs/MODEL.md)."""
    _, plain, _ = replayed
    zone_only = plain[plain["pickup_longitude"].isna()].reset_index(drop=True)
    assert len(zone_only) > 10_000 and np.isfinite(plain["predicted_duration_s"]).all()
    columns = {name: zone_only[name].to_numpy() for name in zone_only.columns}
    expected = load_model(trained_model_dir).predict_seconds(columns)
    np.testing.assert_allclose(zone_only["predicted_duration_s"], expected, rtol=1e-9)
    by_pair = zone_only.groupby(["pickup_location_id", "dropoff_location_id"])["predicted_duration_s"].median()
    assert by_pair.nunique() > len(by_pair) // 2, "predictions follow the zones"


# --- imported and replayed: one fact ---------------------------------------------------------------


def test_a_tlc_trip_replayed_and_imported_counts_once_in_the_merged_view(kafka_bootstrap, trained_model_dir,
                                                                         tmp_path):
    """Replay three files; import two of them; the merged view equals the batch view of all three, before
    and after the stream is drained into master data too (which then holds two copies of a trip)."""
    files = [COORDINATES, ZONE_ERA, ALSO_IN_A_SAMPLE]
    topics = fresh_topics(kafka_bootstrap, "tlc-once")
    produce_files(kafka_bootstrap, topics[0], files)
    speed, master, views_dir = tmp_path / "speed", tmp_path / "master", tmp_path / "views"
    assert kafka_consumer.main(consumer_args(kafka_bootstrap, topics, speed, trained_model_dir)) == 0
    dirs = ["--master-dir", str(master), "--views-dir", str(views_dir), "--speed-dir", str(speed)]
    imported = [COORDINATES, ALSO_IN_A_SAMPLE]
    assert batch_processor.main([*dirs, "import", "--cutoff", "none", *map(str, imported)]) == 0
    assert batch_processor.main([*dirs, "recompute"]) == 0

    reference = tmp_path / "all-imported"
    assert batch_processor.main(["--master-dir", str(reference), "import", "--cutoff", "none",
                                 *map(str, files)]) == 0
    everything = batch_processor.compute_views(reference, workers=1, progress=False).views
    expected = expected_trips(files)
    assert int(everything["daily_summary"]["trips"].sum()) == int((expected["rule"] == "").sum())

    merged = serving.combined_views(views_dir, speed)
    assert views.views_equal(merged.views, everything)
    replayed_only = expected_trips([ZONE_ERA])
    assert merged.speed_trips == int((replayed_only["rule"] == "").sum())
    assert merged.speed_duplicates_of_batch == len(expected_trips(imported).query("rule == ''"))

    assert batch_processor.main([*dirs, "ingest", "--bootstrap", kafka_bootstrap, "--topic", topics[0],
                                 "--group", "batch-" + topics[0]]) == 0
    assert batch_processor.main([*dirs, "recompute"]) == 0
    merged = serving.combined_views(views_dir, speed)
    assert views.views_equal(merged.views, everything) and merged.speed_trips == 0
    records: dict[str, list[dict]] = {}
    for record in storage.read_master_records(master):
        records.setdefault(record["id"], []).append(record)
    both = [copies for copies in records.values() if len(copies) == 2]
    assert len(both) == len(expected_trips(imported))  # imported and replayed
    assert all(a == b for a, b in both)  # the same fact, field by field, zones included


# --- zones at import ----------------------------------------------------------------------------------


def test_imported_trips_get_the_zones_shapely_finds_or_keep_the_recorded_ones(tmp_path):
    coordinates = [TLC_DIR / name for name in ("yellow_tripdata_2013-01_head.csv",
                                               "yellow_tripdata_2009-01_head1KB.csv")]
    assert batch_processor.main(["--master-dir", str(tmp_path), "import", "--cutoff", "none",
                                 *map(str, coordinates), str(ZONE_ERA)]) == 0
    master = pd.DataFrame(list(storage.read_master_records(tmp_path)))
    with_coordinates = master[master["pickup_longitude"].notna()].sample(300, random_state=7)
    for end in ("pickup", "dropoff"):
        assert with_coordinates[f"{end}_location_id"].tolist() == shapely_zones(
            with_coordinates[f"{end}_longitude"], with_coordinates[f"{end}_latitude"])
    raw, ok = independent_tlc(ZONE_ERA)
    zone_era = master[master["source_layout"] == "green_zones"]
    assert zone_era["pickup_location_id"].tolist() == raw.loc[ok, "pzone"].astype(int).tolist()
    assert master["pickup_location_id"].notna().all() and master["dropoff_location_id"].notna().all()
