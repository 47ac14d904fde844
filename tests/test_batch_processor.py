"""batch_processor.py: CSV -> Avro master -> Parquet views on real data, idempotence, atomic publish."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import batch_processor
from periscope import storage, views
from tests.test_sources import BAD_LINES, GOOD, HEADER, independent_clean_mask


@pytest.fixture(scope="module")
def published(tmp_path_factory, sample_csv):
    """The real sample imported and recomputed once for this module."""
    root = tmp_path_factory.mktemp("batch")
    master, views_dir = root / "master", root / "views"
    assert batch_processor.main(["--master-dir", str(master), "--views-dir", str(views_dir),
                                 "run", "--input", str(sample_csv)]) == 0
    return master, views_dir


def test_master_data_holds_every_well_formed_trip(published, sample_csv):
    master, _ = published
    files = storage.master_files(master)
    assert len(files) == 1
    meta = storage.avro_metadata(files[0])
    assert meta["kind"] == "csv" and meta["rows"] == "73177"
    assert meta["source_sha256"] == storage.file_sha256(sample_csv)
    records = list(storage.read_master_records(master))
    raw = pd.read_csv(sample_csv)
    assert len(records) == len(raw)
    assert sorted(r["id"] for r in records) == sorted(raw["id"])


def test_views_match_an_independent_pandas_computation(published, sample_csv):
    _, views_dir = published
    batch, manifest = storage.read_version(views_dir)
    raw = pd.read_csv(sample_csv)
    clean = raw[independent_clean_mask(raw)].copy()
    pickup = pd.to_datetime(clean["pickup_datetime"])
    clean["date"], clean["hour"] = pickup.dt.normalize(), pickup.dt.hour

    hourly = clean.groupby(["date", "hour"])["trip_duration"].agg(["count", "sum", "min", "max"]).reset_index()
    got = batch["hourly_stats"]
    np.testing.assert_array_equal(got["pickup_date"].to_numpy(), hourly["date"].to_numpy())
    np.testing.assert_array_equal(got["pickup_hour"], hourly["hour"])
    for ours, theirs in [("trips", "count"), ("duration_s_sum", "sum"), ("duration_s_min", "min"),
                         ("duration_s_max", "max")]:
        np.testing.assert_array_equal(got[ours], hourly[theirs])
    np.testing.assert_array_equal(got["duration_s_sumsq"], clean.groupby(["date", "hour"])["trip_duration"]
                                  .apply(lambda s: int((s.astype(np.int64) ** 2).sum())).to_numpy())

    vendor = clean.groupby("vendor_id")["trip_duration"].agg(["count", "sum"]).reset_index()
    np.testing.assert_array_equal(batch["vendor_stats"]["trips"], vendor["count"])
    np.testing.assert_array_equal(batch["vendor_stats"]["duration_s_sum"], vendor["sum"])
    daily = clean.groupby("date").size()
    np.testing.assert_array_equal(batch["daily_summary"]["trips"], daily.to_numpy())
    assert manifest["rows"] == {"master": 73_177, "clean": len(clean),
                                "views": {name: len(frame) for name, frame in batch.items()}}
    assert sum(manifest["cleaning"].values()) == 73_177 - len(clean)


def test_manifest_describes_the_version(published):
    _, views_dir = published
    _, manifest = storage.read_version(views_dir)
    assert manifest["version"] == storage.current_version(views_dir) == "v000001"
    assert manifest["watermark"] == {}
    assert manifest["input_files"][0]["rows"] == 73_177
    assert {"read_and_aggregate", "merge", "write"} <= set(manifest["timings_s"])
    assert set(manifest["cleaning"]) >= {"duration_too_short", "pickup_outside_nyc"}


def test_reimporting_the_same_file_adds_nothing(published, sample_csv, tmp_path, capsys):
    master, views_dir = published
    before = {p: p.read_bytes() for p in storage.master_files(master)}
    result = batch_processor.import_csv(sample_csv, master)
    assert not result.added and result.rows == 73_177
    assert {p: p.read_bytes() for p in storage.master_files(master)} == before
    copy = tmp_path / "same-content.csv.gz"
    copy.write_bytes(sample_csv.read_bytes())
    assert batch_processor.main(["--master-dir", str(master), "import", str(copy)]) == 0
    assert "nothing added" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in storage.master_files(master)} == before


def test_recompute_is_deterministic_and_parallel_equals_serial(published, tmp_path):
    master, views_dir = published
    serial = batch_processor.recompute(master, tmp_path / "serial", workers=1, keep=2, progress=False)
    parallel = batch_processor.recompute(master, tmp_path / "parallel", workers=2, keep=2, progress=False)
    a, _ = storage.read_version(tmp_path / "serial")
    b, _ = storage.read_version(tmp_path / "parallel")
    c, _ = storage.read_version(views_dir)
    assert views.views_equal(a, b) and views.views_equal(a, c)
    assert serial["rows"] == parallel["rows"]


def test_multi_part_import_gives_the_same_views(published, sample_csv, tmp_path):
    _, views_dir = published
    master = tmp_path / "master"
    batch_processor.import_csv(sample_csv, master, part_rows=20_000)
    assert len(storage.master_files(master)) == 4
    batch_processor.recompute(master, tmp_path / "views", workers=2, keep=1, progress=False)
    assert views.views_equal(storage.read_version(tmp_path / "views")[0], storage.read_version(views_dir)[0])


def test_only_the_last_versions_are_kept(published, tmp_path):
    master, _ = published
    out = tmp_path / "views"
    for _ in range(4):
        batch_processor.recompute(master, out, workers=1, keep=2, progress=False)
    assert [p.name for p in storage.version_dirs(out)] == ["v000003", "v000004"]
    assert storage.current_version(out) == "v000004"


def test_a_failed_publish_leaves_the_current_version_untouched(published, tmp_path, monkeypatch):
    master, _ = published
    out = tmp_path / "views"
    batch_processor.recompute(master, out, workers=1, keep=3, progress=False)
    written = []

    def failing_write(table, where):
        if len(written) == 2:
            raise OSError("disk full (injected)")
        written.append(where)
        where.write_bytes(b"partial")

    monkeypatch.setattr(storage.pq, "write_table", failing_write)
    with pytest.raises(OSError, match="disk full"):
        batch_processor.recompute(master, out, workers=1, keep=3, progress=False)
    assert storage.current_version(out) == "v000001"
    assert [p.name for p in out.iterdir() if p.name.startswith(".v")] == []
    assert [p.name for p in storage.version_dirs(out)] == ["v000001"]


def test_malformed_rows_are_rejected_and_counted(tmp_path, capsys):
    csv_path = tmp_path / "dirty.csv"
    csv_path.write_text("\n".join([HEADER, GOOD, *BAD_LINES.values(), GOOD.replace("id1", "id9")]) + "\n")
    assert batch_processor.main(["--master-dir", str(tmp_path / "m"), "--views-dir", str(tmp_path / "v"),
                                 "run", "--input", str(csv_path)]) == 0
    out = capsys.readouterr().out
    assert "imported 2 trips" in out and "3 malformed rows rejected" in out
    assert "line 3: bad_datetime in pickup_datetime" in out
    report = json.loads(next((tmp_path / "m" / "csv").iterdir()).joinpath("import.json").read_text())
    assert report["load_report"]["malformed"] == {"bad_datetime": 1, "missing_value": 1, "wrong_type": 1}


def test_wrong_header_fails_naming_the_columns(tmp_path, capsys):
    csv_path = tmp_path / "other.csv"
    csv_path.write_text("trip,start,end\n1,2,3\n")
    assert batch_processor.main(["--master-dir", str(tmp_path / "m"), "import", str(csv_path)]) == 2
    err = capsys.readouterr().err
    assert "missing column(s) id, vendor_id" in err and "expected the Kaggle layout" in err
    assert not (tmp_path / "m" / "csv").exists() or not any((tmp_path / "m" / "csv").iterdir())


def test_status_and_empty_state(tmp_path, capsys):
    assert batch_processor.main(["--master-dir", str(tmp_path / "m"), "--views-dir", str(tmp_path / "v"), "status"]) == 0
    assert "run `python batch_processor.py recompute`" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="python batch_processor.py"):
        storage.read_version(tmp_path / "v")


def test_bad_flag_values(capsys):
    with pytest.raises(SystemExit):
        batch_processor.main(["recompute", "--workers", "0"])
    assert "--workers must be at least 1, got 0" in capsys.readouterr().err


# --- stream ingestion against a real broker ------------------------------------------


def produce(bootstrap: str, topic: str, values: list[tuple[bytes, bytes | None]]) -> None:
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    for key, value in values:
        producer.send(topic, key=key, value=value)
    producer.flush()
    producer.close()


@pytest.mark.kafka
def test_ingest_drains_the_topic_into_offset_named_master_files(kafka_bootstrap, topics, sample_trips, tmp_path,
                                                                 capsys):
    from periscope.schema import record_to_json

    trips_topic, _ = topics
    records = sample_trips.head(600).to_dict("records")
    messages = [(r["id"].encode(), record_to_json(r)) for r in records]
    messages[100] = (b"broken-1", b"{not json")
    messages[200] = (b"broken-2", b"")
    produce(kafka_bootstrap, trips_topic, messages)
    master = tmp_path / "master"
    argv = ["--master-dir", str(master), "--views-dir", str(tmp_path / "views"), "--speed-dir", str(tmp_path / "speed")]

    assert batch_processor.main([*argv, "ingest", "--bootstrap", kafka_bootstrap, "--topic", trips_topic,
                                 "--group", "ingest-test"]) == 0
    assert "ingested 598 events" in capsys.readouterr().out
    files = storage.master_files(master)
    metas = [storage.avro_metadata(path) for path in files]
    assert {m["kafka_partition"] for m in metas} == {"0", "1", "2"}
    assert sum(int(m["kafka_last_offset"]) - int(m["kafka_first_offset"]) + 1 for m in metas) == 600
    assert sum(int(m["rows"]) for m in metas) == 598
    stored = sorted(r["id"] for r in storage.read_master_records(master))
    assert stored == sorted(r["id"] for i, r in enumerate(records) if i not in (100, 200))

    before = {p: p.read_bytes() for p in files}
    assert batch_processor.main([*argv, "ingest", "--bootstrap", kafka_bootstrap, "--topic", trips_topic,
                                 "--group", "ingest-test"]) == 0
    assert "no new events" in capsys.readouterr().out
    # A group that never committed (as after a crash between write and commit)
    # resumes from the offsets recorded in master data: nothing is added twice.
    batch_processor.ingest_stream(kafka_bootstrap, trips_topic, "never-committed", master)
    assert {p: p.read_bytes() for p in storage.master_files(master)} == before

    produce(kafka_bootstrap, trips_topic, [(r["id"].encode(), record_to_json(r))
                                           for r in sample_trips.iloc[600:700].to_dict("records")])
    assert batch_processor.main([*argv, "ingest", "--bootstrap", kafka_bootstrap, "--topic", trips_topic,
                                 "--group", "ingest-test"]) == 0
    assert len(list(storage.read_master_records(master))) == 698

    manifest = batch_processor.recompute(master, tmp_path / "views", workers=1, keep=2, progress=False)
    ends = {}
    for meta in (storage.avro_metadata(p) for p in storage.master_files(master)):
        ends[meta["kafka_partition"]] = max(ends.get(meta["kafka_partition"], -1), int(meta["kafka_last_offset"]))
    assert manifest["watermark"] == ends
    assert manifest["watermark_topics"] == [trips_topic]
    assert manifest["rows"]["master"] == 698


@pytest.mark.kafka
def test_ingest_from_a_missing_topic_or_broker_is_a_clear_error(kafka_bootstrap, tmp_path, capsys):
    argv = ["--master-dir", str(tmp_path / "m"), "ingest", "--bootstrap"]
    assert batch_processor.main([*argv, kafka_bootstrap, "--topic", "no-such-topic"]) == 2
    assert "topic 'no-such-topic' does not exist" in capsys.readouterr().err
    assert batch_processor.main([*argv, "127.0.0.1:1", "--wait", "0"]) == 2
    assert "no Kafka broker answered at 127.0.0.1:1" in capsys.readouterr().err
