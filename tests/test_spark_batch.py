"""batch_processor.py --engine spark (periscope.spark_batch): the python engine's views, exactly, with real Spark."""
from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import fastavro
import numpy as np
import pandas as pd
import polars as pl
import pyarrow.parquet as pq
import pytest

import batch_processor
from periscope import generate, spark_batch, spark_session, storage, views
from periscope.schema import AVRO_SCHEMA, FIELDS, avro_type, parse_cutoff
from periscope.storage import frame_to_records


@pytest.fixture(scope="module")
def spark():
    return spark_session.get_session(app_name="periscope-tests")


def assert_same_result(master_dir, spark, out_dir) -> dict:
    """Both engines on one master dataset: equal views, trip indexes and manifests but for engine,
    time and timings. The Spark engine's views and index are Parquet files Spark wrote in ``out_dir``,
    one per view, which read as the python engine's views (same columns, dtypes, rows in key order)."""
    python = batch_processor.compute_views(master_dir, workers=1, progress=False)
    with_spark = spark_batch.compute_views(master_dir, progress=False, spark=spark, out_dir=out_dir)
    assert with_spark.written == out_dir and with_spark.trip_ids is None
    assert storage.version_files(out_dir) == sorted(Path(f"{name}.parquet") for name in views.VIEWS) + [
        storage.TRIP_INDEX]
    for path in storage.version_files(out_dir):
        assert b"org.apache.spark.version" in pq.read_metadata(out_dir / path).metadata, path
    assert views.views_equal(python.views, with_spark.views)
    for name in views.VIEWS:
        from_file = storage.read_view(out_dir / f"{name}.parquet")
        assert list(from_file.dtypes) == list(python.views[name].dtypes) == list(with_spark.views[name].dtypes)
        pd.testing.assert_frame_equal(from_file, python.views[name].reset_index(drop=True))
    assert pl.read_parquet(out_dir / storage.TRIP_INDEX)["id"].equals(python.trip_ids)
    assert with_spark.manifest.keys() == python.manifest.keys()
    assert with_spark.manifest["engine"] == "spark" and python.manifest["engine"] == "python"
    for key in python.manifest.keys() - {"engine", "created_at", "timings_s"}:
        assert with_spark.manifest[key] == python.manifest[key], key
    return with_spark.manifest


def test_engine_parity_on_the_real_sample_imported_twice(spark, sample_csv, tmp_path):
    """The history before the cutoff, then the whole file: both engines leave out the same copies."""
    batch_processor.import_csv(sample_csv, tmp_path / "master", part_rows=20_000,
                               cutoff_ms=parse_cutoff("2016-06-01"))
    batch_processor.import_csv(sample_csv, tmp_path / "master", part_rows=20_000)
    manifest = assert_same_result(tmp_path / "master", spark, tmp_path / "spark")
    raw = pd.read_csv(sample_csv)
    history = int((pd.to_datetime(raw["pickup_datetime"]) < pd.Timestamp("2016-06-01")).sum())
    assert manifest["rows"]["master"] == 73_177 + history and len(manifest["input_files"]) == 8
    assert manifest["rows"]["duplicates"] == history and manifest["rows"]["distinct"] == 73_177
    assert 0 < sum(manifest["cleaning"].values()) < 1000


def test_engine_parity_on_generated_trips_and_stream_files(spark, sample_trips, tmp_path):
    master = tmp_path / "master"
    trips = next(generate.generate(sample_trips, 30_000, seed=11))
    for part, start in enumerate(range(0, 20_000, 7_000)):
        chunk = trips.iloc[start:min(start + 7_000, 20_000)]
        storage.write_avro_atomic(master / "csv" / "gen" / f"part-{part:05d}.avro", frame_to_records(chunk),
                                  {"kind": "csv", "source": "generated", "part": part, "rows": len(chunk)})
    stream = trips.iloc[20_000:].to_dict("records")
    for partition in range(3):
        batch = [(offset, record, None) for offset, record in enumerate(stream[partition::3])]
        batch.append((len(batch), None, "invalid_json: Expecting value"))
        batch_processor.write_stream_file(master, "taxi-trips", partition, batch)
    manifest = assert_same_result(master, spark, tmp_path / "spark")
    assert manifest["rows"]["master"] == 30_000 and manifest["rows"]["duplicates"] == 0
    assert manifest["watermark"] == {"0": 3334, "1": 3333, "2": 3333}
    assert manifest["watermark_topics"] == ["taxi-trips"]
    assert Counter(f["kind"] for f in manifest["input_files"]) == {"csv": 3, "stream": 3}


def test_an_empty_master_dataset_gives_empty_views(spark, tmp_path):
    assert_same_result(tmp_path / "nothing", spark, tmp_path / "spark")


def test_recompute_with_the_spark_engine_publishes_a_version(spark, sample_csv, tmp_path, capsys):
    master, views_dir = tmp_path / "master", tmp_path / "views"
    assert batch_processor.main(["--master-dir", str(master), "--views-dir", str(views_dir), "--speed-dir",
                                 str(tmp_path / "speed"), "run", "--input", str(sample_csv), "--engine", "spark"]) == 0
    published, manifest = storage.read_version(views_dir)
    assert manifest["engine"] == "spark" and manifest["version"] == "v000001"
    assert published["vendor_stats"]["trips"].sum() == manifest["rows"]["clean"]
    assert "with Spark on local" in capsys.readouterr().out
    for path in storage.version_files(views_dir / "v000001"):  # Spark's files, linked into the version
        assert b"org.apache.spark.version" in pq.read_metadata(views_dir / "v000001" / path).metadata
    assert len(storage.read_trip_index(views_dir, "v000001")) == manifest["rows"]["distinct"]


def write_master_file(path, trips, sync_interval=16_384, **metadata):
    """A master file as ``storage.write_avro`` writes it, but in small Avro blocks, so that Spark
    splits it into several partitions (with a small ``maxPartitionBytes``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {storage.META_PREFIX + k: str(v) for k, v in {"kind": "csv", "rows": len(trips), **metadata}.items()}
    with open(path, "wb") as handle:
        fastavro.writer(handle, storage.PARSED_SCHEMA, frame_to_records(trips), codec=storage.MASTER_CODEC,
                        metadata=header, sync_interval=sync_interval)


def test_both_engines_keep_the_first_copy_in_source_order_when_copies_differ(spark, sample_trips, tmp_path,
                                                                              as_csv_rows, assert_views_match_pandas):
    """Copies of a trip inside a file (in different Spark splits), across CSV imports and in stream files,
    each copy different: both engines keep the first in source order, as pandas does over the rows in order."""
    trips = sample_trips.iloc[:24_000].reset_index(drop=True)
    rng = np.random.default_rng(5)

    def copies(rows: pd.DataFrame, seconds: int) -> pd.DataFrame:
        changed = rows.copy()
        changed["trip_duration"] += seconds
        changed["dropoff_datetime"] += seconds * 1000
        changed["pickup_longitude"] += 0.01
        return changed

    first_file = pd.concat([trips.iloc[:12_000], copies(trips.iloc[rng.choice(12_000, 800, replace=False)], 120),
                            trips.iloc[12_000:16_000]], ignore_index=True)
    second_file = pd.concat([copies(trips.iloc[rng.choice(24_000, 1_500, replace=False)], 300),
                             trips.iloc[16_000:]], ignore_index=True)
    stream = copies(trips.iloc[rng.choice(24_000, 900, replace=False)], 600)
    master = tmp_path / "master"
    write_master_file(master / "csv" / "b-first" / "part-00000.avro", first_file)
    write_master_file(master / "csv" / "a-second" / "part-00000.avro", second_file)
    for directory, seq in (("b-first", 1), ("a-second", 2)):
        (master / "csv" / directory / "import.json").write_text(json.dumps({"import_seq": seq, "rows": 0}))
    for partition in range(2):
        batch = [(offset, record, None) for offset, record in
                 enumerate(stream.iloc[partition::2][list(FIELDS)].to_dict("records"))]
        batch_processor.write_stream_file(master, "taxi-trips", partition, batch)
    files = storage.master_files(master)
    assert [f.parent.name for f in files][:2] == ["b-first", "a-second"]

    spark.conf.set("spark.sql.files.maxPartitionBytes", "200000")
    try:
        assert spark_batch.read_master(spark, files).rdd.getNumPartitions() > len(files)
        manifest = assert_same_result(master, spark, tmp_path / "spark")
    finally:
        spark.conf.unset("spark.sql.files.maxPartitionBytes")

    in_order = pd.concat([first_file, second_file, stream.iloc[0::2], stream.iloc[1::2]], ignore_index=True)
    distinct = in_order.drop_duplicates("id", keep="first")
    assert manifest["rows"]["duplicates"] == len(in_order) - len(distinct) > 3000
    assert manifest["rows"]["distinct"] == len(distinct) == 24_000
    assert_views_match_pandas(batch_processor.compute_views(master, workers=2, progress=False).views,
                              as_csv_rows(in_order))


def test_engine_parity_on_tlc_files_and_master_data_written_before_them(spark, sample_csv, tmp_path):
    """Zone-only trips, null vendors and passengers, coordinates of 2013/2015, green Parquet, and a
    master file of the code before TLC fields: both engines count and reject the same trips."""
    from tests.conftest import MASTER_BEFORE_TLC, TLC_DIR

    master = tmp_path / "master"
    shutil.copytree(MASTER_BEFORE_TLC / "csv", master / "csv")
    for name in ("yellow_tripdata_2013-01_head.csv", "yellow_tripdata_2015-01_head.csv",
                 "yellow_tripdata_sample_2020-05.csv.gz", "yellow_tripdata_2020-04_1000rows.csv",
                 "yellow_tripdata_sample_2020-04.csv.gz", "green_tripdata_2023-12.parquet"):
        batch_processor.import_csv(TLC_DIR / name, master, part_rows=20_000)
    manifest = assert_same_result(master, spark, tmp_path / "spark")
    assert manifest["rows"]["duplicates"] == 45
    assert manifest["cleaning"]["pickup_outside_nyc"] > 0 and manifest["cleaning"]["unknown_vendor"] > 0


def pandas_first_broken_rule(trips: pd.DataFrame) -> pd.Series:
    """The cleaning rules re-derived with plain pandas over record-form master rows (times in ms, a
    missing value NaN): the name of the first rule each trip breaks, None where it breaks none."""
    def placed(end: str) -> pd.Series:
        lon, lat, zone = trips[f"{end}_longitude"], trips[f"{end}_latitude"], trips[f"{end}_location_id"]
        in_box = lon.between(-74.3, -73.7) & lat.between(40.5, 41.0)
        return in_box.where(lon.notna() & lat.notna(), zone.between(1, 263))

    lat1, lon1, lat2, lon2 = (np.radians(trips[c]) for c in
                              ("pickup_latitude", "pickup_longitude", "dropoff_latitude", "dropoff_longitude"))
    h = np.sin((lat2 - lat1) / 2) ** 2 + np.cos(lat1) * np.cos(lat2) * np.sin((lon2 - lon1) / 2) ** 2
    kmh = 2 * 6371.0088 * np.arcsin(np.sqrt(h)) / (trips["trip_duration"].clip(lower=1) / 3600)
    duration = trips["trip_duration"]
    rules = {
        "unknown_vendor": trips["vendor_id"].isin([1, 2]),
        "duration_too_short": duration >= 60,
        "duration_too_long": duration <= 6 * 3600,
        "duration_mismatch": (trips["dropoff_datetime"] - trips["pickup_datetime"] - duration * 1000).abs() <= 1000,
        "passenger_count_out_of_range": trips["passenger_count"].between(1, 6),
        "pickup_outside_nyc": placed("pickup"),
        "dropoff_outside_nyc": placed("dropoff"),
        "implausible_speed": ~(kmh > 120),
    }
    broken = pd.Series([None] * len(trips), index=trips.index, dtype=object)
    for name, keep in rules.items():
        broken = broken.where(broken.notna() | keep.fillna(False).astype(bool), name)
    return broken


def test_spark_engine_on_kaggle_era_and_tlc_files_with_copies_matches_pandas(spark, sample_trips, tmp_path,
                                                                              as_csv_rows):
    """A master file of the 11-field Kaggle schema, TLC imports (coordinates with vendors; zones only,
    some vendors and passengers missing), a Kaggle import with rule failures, and a TLC-schema stream
    file of changed copies of trips of every earlier file: the Spark engine's counts and views are what
    plain pandas computes over the master records (read with fastavro) in source order."""
    from tests.conftest import MASTER_BEFORE_TLC, TLC_DIR

    master = tmp_path / "master"
    shutil.copytree(MASTER_BEFORE_TLC / "csv", master / "csv")
    for name in ("yellow_tripdata_2015-01_head.csv", "yellow_tripdata_2020-04_1000rows.csv"):
        batch_processor.import_csv(TLC_DIR / name, master, part_rows=20_000)
    kaggle = sample_trips.iloc[:6_000].reset_index(drop=True)
    kaggle.loc[1000:1039, "trip_duration"] = 30  # duration_too_short (and a mismatch, counted under the first)
    kaggle.loc[1040:1069, "dropoff_latitude"] = 42.0  # dropoff_outside_nyc
    kaggle.loc[1070:1089, "passenger_count"] = 0
    kaggle.loc[1090:1099, "vendor_id"] = 3
    as_csv_rows(kaggle).to_csv(tmp_path / "kaggle.csv", index=False)
    batch_processor.import_csv(tmp_path / "kaggle.csv", master, part_rows=2_500)

    def records(path) -> pd.DataFrame:
        with open(path, "rb") as handle:
            return pd.DataFrame.from_records(list(fastavro.reader(handle)))

    before = [records(path) for path in storage.master_files(master)]
    rng = np.random.default_rng(3)
    copies = pd.concat([frame.iloc[rng.choice(len(frame), min(40, len(frame)), replace=False)] for frame in before])
    copies = copies.assign(trip_duration=copies["trip_duration"] + 7, service="yellow")
    integers = {f["name"] for f in AVRO_SCHEMA["fields"] if avro_type(f) in ("int", "long")}
    stream = [(offset, {k: None if pd.isna(v) else int(v) if k in integers else v for k, v in row.items()}, None)
              for offset, row in enumerate(copies.to_dict("records"))]
    batch_processor.write_stream_file(master, "taxi-trips", 0, stream)
    files = storage.master_files(master)
    assert len(files) == len(before) + 1 and "location_id" not in " ".join(records(files[0]).columns)

    manifest = assert_same_result(master, spark, tmp_path / "spark")
    with_spark = spark_batch.compute_views(master, progress=False, spark=spark, out_dir=tmp_path / "again")

    rows = pd.concat([records(path) for path in files], ignore_index=True)
    for column in ("vendor_id", "passenger_count", "pickup_location_id", "dropoff_location_id"):
        rows[column] = pd.to_numeric(rows.get(column), errors="coerce")
    for column in ("pickup_longitude", "pickup_latitude", "dropoff_longitude", "dropoff_latitude"):
        rows[column] = rows[column].astype(float)
    distinct = rows.drop_duplicates("id", keep="first").reset_index(drop=True)
    broken = pandas_first_broken_rule(distinct)
    clean = distinct[broken.isna()]
    assert manifest == with_spark.manifest | {"created_at": manifest["created_at"], "timings_s": manifest["timings_s"]}
    assert manifest["rows"]["master"] == len(rows) and manifest["rows"]["duplicates"] == len(rows) - len(distinct) > 0
    assert manifest["rows"]["clean"] == len(clean)
    assert {k: v for k, v in manifest["cleaning"].items() if v} == broken.value_counts().to_dict()
    assert {"unknown_vendor", "duration_too_short", "dropoff_outside_nyc",
            "passenger_count_out_of_range"} <= set(broken.dropna())

    pickup = pd.to_datetime(clean["pickup_datetime"], unit="ms")
    hourly = clean.groupby([pickup.dt.normalize(), pickup.dt.hour])["trip_duration"].agg(["count", "sum", "max"])
    got = with_spark.views["hourly_stats"]
    np.testing.assert_array_equal(got["pickup_date"], hourly.index.get_level_values(0))
    np.testing.assert_array_equal(got["pickup_hour"], hourly.index.get_level_values(1))
    for ours, theirs in (("trips", "count"), ("duration_s_sum", "sum"), ("duration_s_max", "max")):
        np.testing.assert_array_equal(got[ours], hourly[theirs])
    vendors = clean.groupby("vendor_id").size()
    np.testing.assert_array_equal(with_spark.views["vendor_stats"]["vendor_id"], vendors.index)
    np.testing.assert_array_equal(with_spark.views["vendor_stats"]["trips"], vendors)
    assert pl.read_parquet(tmp_path / "again" / storage.TRIP_INDEX)["id"].to_list() == sorted(distinct["id"])
