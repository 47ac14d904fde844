"""batch_processor.py --engine spark (periscope.spark_batch): the python engine's views, exactly, with real Spark."""
from __future__ import annotations

from collections import Counter

import pytest

import batch_processor
from periscope import generate, spark_batch, spark_session, storage, views
from periscope.storage import frame_to_records


@pytest.fixture(scope="module")
def spark():
    return spark_session.get_session(app_name="periscope-tests")


def assert_same_result(master_dir, spark) -> dict:
    """Both engines on one master dataset: equal views, equal manifests but for engine, time and timings."""
    python_views, python_manifest = batch_processor.compute_views(master_dir, workers=1, progress=False)
    spark_views, spark_manifest = spark_batch.compute_views(master_dir, progress=False, spark=spark)
    assert views.views_equal(python_views, spark_views)
    for name in views.VIEWS:
        assert list(spark_views[name].dtypes) == list(python_views[name].dtypes)
    assert spark_manifest.keys() == python_manifest.keys()
    assert spark_manifest["timings_s"].keys() == python_manifest["timings_s"].keys()
    assert spark_manifest["engine"] == "spark" and python_manifest["engine"] == "python"
    for key in python_manifest.keys() - {"engine", "created_at", "timings_s"}:
        assert spark_manifest[key] == python_manifest[key], key
    return spark_manifest


def test_engine_parity_on_the_real_sample(spark, sample_csv, tmp_path):
    batch_processor.import_csv(sample_csv, tmp_path / "master", part_rows=20_000)
    manifest = assert_same_result(tmp_path / "master", spark)
    assert manifest["rows"]["master"] == 73_177 and len(manifest["input_files"]) == 4
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
    assert manifest["rows"]["master"] == 30_000
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
