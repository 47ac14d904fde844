"""batch_processor.py --engine spark (periscope.spark_batch): the python engine's views, exactly, with real Spark."""
from __future__ import annotations

import json
from collections import Counter

import fastavro
import numpy as np
import pandas as pd
import pytest

import batch_processor
from periscope import generate, spark_batch, spark_session, storage, views
from periscope.schema import FIELDS, parse_cutoff
from periscope.storage import frame_to_records


@pytest.fixture(scope="module")
def spark():
    return spark_session.get_session(app_name="periscope-tests")


def assert_same_result(master_dir, spark) -> dict:
    """Both engines on one master dataset: equal views, trip indexes and manifests but for engine,
    time and timings."""
    python = batch_processor.compute_views(master_dir, workers=1, progress=False)
    with_spark = spark_batch.compute_views(master_dir, progress=False, spark=spark)
    assert views.views_equal(python.views, with_spark.views)
    for name in views.VIEWS:
        assert list(with_spark.views[name].dtypes) == list(python.views[name].dtypes)
    assert with_spark.trip_ids.equals(python.trip_ids)
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
    manifest = assert_same_result(tmp_path / "master", spark)
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
    manifest = assert_same_result(master, spark)
    assert manifest["rows"]["master"] == 30_000 and manifest["rows"]["duplicates"] == 0
    assert manifest["watermark"] == {"0": 3334, "1": 3333, "2": 3333}
    assert manifest["watermark_topics"] == ["taxi-trips"]
    assert Counter(f["kind"] for f in manifest["input_files"]) == {"csv": 3, "stream": 3}


def test_an_empty_master_dataset_gives_empty_views(spark, tmp_path):
    assert_same_result(tmp_path / "nothing", spark)


def test_recompute_with_the_spark_engine_publishes_a_version(spark, sample_csv, tmp_path, capsys):
    master, views_dir = tmp_path / "master", tmp_path / "views"
    assert batch_processor.main(["--master-dir", str(master), "--views-dir", str(views_dir), "--speed-dir",
                                 str(tmp_path / "speed"), "run", "--input", str(sample_csv), "--engine", "spark"]) == 0
    published, manifest = storage.read_version(views_dir)
    assert manifest["engine"] == "spark" and manifest["version"] == "v000001"
    assert published["vendor_stats"]["trips"].sum() == manifest["rows"]["clean"]
    assert "with Spark on local" in capsys.readouterr().out


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
        manifest = assert_same_result(master, spark)
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
    import shutil

    from tests.conftest import MASTER_BEFORE_TLC, TLC_DIR

    master = tmp_path / "master"
    shutil.copytree(MASTER_BEFORE_TLC / "csv", master / "csv")
    for name in ("yellow_tripdata_2013-01_head.csv", "yellow_tripdata_2015-01_head.csv",
                 "yellow_tripdata_sample_2020-05.csv.gz", "yellow_tripdata_2020-04_1000rows.csv",
                 "yellow_tripdata_sample_2020-04.csv.gz", "green_tripdata_2023-12.parquet"):
        batch_processor.import_csv(TLC_DIR / name, master, part_rows=20_000)
    manifest = assert_same_result(master, spark)
    assert manifest["rows"]["duplicates"] == 45
    assert manifest["cleaning"]["pickup_outside_nyc"] > 0 and manifest["cleaning"]["unknown_vendor"] > 0
