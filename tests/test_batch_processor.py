"""batch_processor.py: CSV -> Avro master -> Parquet views on real data, idempotence, atomic publish."""
from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

import batch_processor
from periscope import config, storage, views
from periscope.schema import FIELDS, parse_cutoff


@pytest.fixture(scope="module")
def published(tmp_path_factory, sample_csv):
    """The whole real sample imported (no cutoff) and recomputed once for this module."""
    root = tmp_path_factory.mktemp("batch")
    master, views_dir = root / "master", root / "views"
    assert batch_processor.main(["--master-dir", str(master), "--views-dir", str(views_dir),
                                 "run", "--input", str(sample_csv), "--cutoff", "none"]) == 0
    return master, views_dir


def test_master_data_holds_every_well_formed_trip(published, sample_csv):
    master, _ = published
    files = storage.master_files(master)
    assert len(files) == 1
    meta = storage.avro_metadata(files[0])
    assert meta["kind"] == "csv" and meta["rows"] == "73177" and meta["cutoff"] == "none"
    assert meta["source_sha256"] == storage.file_sha256(sample_csv)
    records = list(storage.read_master_records(master))
    raw = pd.read_csv(sample_csv)
    assert len(records) == len(raw)
    assert sorted(r["id"] for r in records) == sorted(raw["id"])


def test_views_match_an_independent_pandas_computation(published, sample_csv, assert_views_match_pandas):
    _, views_dir = published
    batch, manifest = storage.read_version(views_dir)
    raw = pd.read_csv(sample_csv)
    clean = assert_views_match_pandas(batch, raw)
    assert manifest["rows"] == {"master": 73_177, "distinct": 73_177, "duplicates": 0, "clean": len(clean),
                                "views": {name: len(frame) for name, frame in batch.items()}}
    assert sum(manifest["cleaning"].values()) == 73_177 - len(clean)


def test_manifest_and_trip_index_describe_the_version(published, sample_csv):
    _, views_dir = published
    _, manifest = storage.read_version(views_dir)
    assert manifest["version"] == storage.current_version(views_dir) == "v000001"
    assert manifest["watermark"] == {}
    assert manifest["input_files"][0]["rows"] == 73_177 and manifest["input_files"][0]["duplicates"] == 0
    assert {"read", "drop_duplicates", "clean_and_aggregate", "merge", "write"} == set(manifest["timings_s"])
    assert set(manifest["cleaning"]) >= {"duration_too_short", "pickup_outside_nyc"}
    index = storage.read_trip_index(views_dir, "v000001")
    assert list(index) == sorted(set(pd.read_csv(sample_csv)["id"]))


def test_reimporting_the_same_file_adds_nothing(published, sample_csv, tmp_path, capsys):
    master, views_dir = published
    before = {p: p.read_bytes() for p in storage.master_files(master)}
    result = batch_processor.import_csv(sample_csv, master)
    assert not result.added and result.rows == 73_177
    assert {p: p.read_bytes() for p in storage.master_files(master)} == before
    copy = tmp_path / "same-content.csv.gz"
    copy.write_bytes(sample_csv.read_bytes())
    assert batch_processor.main(["--master-dir", str(master), "import", str(copy), "--cutoff", "none"]) == 0
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


def test_malformed_rows_are_rejected_and_counted(tmp_path, capsys, csv_lines):
    csv_path = tmp_path / "dirty.csv"
    good = csv_lines.good
    csv_path.write_text("\n".join([csv_lines.header, good, *csv_lines.bad.values(), good.replace("id1", "id9")]) + "\n")
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


# --- identifiable facts: duplicates, source order, the cutoff ------------------------


def shifted(rows: pd.DataFrame, hours: int) -> pd.DataFrame:
    """The same trips (same ids), picked up ``hours`` later: copies whose content differs."""
    moved = rows.copy()
    for column in ("pickup_datetime", "dropoff_datetime"):
        moved[column] = (pd.to_datetime(moved[column]) + pd.Timedelta(hours=hours)).dt.strftime("%Y-%m-%d %H:%M:%S")
    return moved


def recompute_version(master, views_dir, **kwargs):
    batch_processor.recompute(master, views_dir, workers=2, keep=3, progress=False, **kwargs)
    return storage.read_version(views_dir)


def test_duplicates_inside_one_csv_file_count_once_the_first_copy_wins(sample_csv, tmp_path, assert_views_match_pandas):
    raw = pd.read_csv(sample_csv).head(6000)
    copies = shifted(raw.sample(900, random_state=3), hours=5)  # some land before their original
    rows = pd.concat([raw.iloc[:4000], copies, raw.iloc[4000:], raw.iloc[100:150]], ignore_index=True)
    path = tmp_path / "with-duplicates.csv"
    rows.to_csv(path, index=False)
    master = tmp_path / "master"
    batch_processor.import_csv(path, master, part_rows=2500)  # the copies cross part files
    batch, manifest = recompute_version(master, tmp_path / "views")
    clean = assert_views_match_pandas(batch, rows)
    expected_duplicates = len(rows) - rows["id"].nunique()
    assert expected_duplicates == 950
    assert manifest["rows"]["master"] == len(rows) and manifest["rows"]["duplicates"] == expected_duplicates
    assert manifest["rows"]["distinct"] == rows["id"].nunique() == 6000
    assert manifest["rows"]["clean"] == len(clean)
    assert sum(f["duplicates"] for f in manifest["input_files"]) == expected_duplicates
    assert list(storage.read_trip_index(tmp_path / "views", manifest["version"])) == sorted(set(rows["id"]))


def test_the_same_trips_in_two_csv_files_count_once(sample_csv, tmp_path, capsys, assert_views_match_pandas):
    """The README flow's history import, then the whole file again: 73,177 distinct trips, views unchanged."""
    raw = pd.read_csv(sample_csv)
    before = pd.to_datetime(raw["pickup_datetime"]) < pd.Timestamp("2016-06-01")
    master, views_dir = tmp_path / "master", tmp_path / "views"
    argv = ["--master-dir", str(master), "--views-dir", str(views_dir)]
    assert batch_processor.main([*argv, "import", str(sample_csv), "--cutoff", "2016-06-01"]) == 0
    assert batch_processor.main([*argv, "import", str(sample_csv), "--cutoff", "none"]) == 0
    capsys.readouterr()
    batch, manifest = recompute_version(master, views_dir)
    assert manifest["rows"]["distinct"] == raw["id"].nunique() == 73_177
    assert manifest["rows"]["duplicates"] == int(before.sum())
    assert manifest["rows"]["master"] == int(before.sum()) + len(raw)
    assert_views_match_pandas(batch, pd.concat([raw[before], raw], ignore_index=True))
    alone = tmp_path / "alone"
    batch_processor.import_csv(sample_csv, alone)
    assert views.views_equal(batch, recompute_version(alone, tmp_path / "alone-views")[0])
    assert [f["duplicates"] for f in manifest["input_files"]] == [0, int(before.sum())]


def test_a_cutoff_import_takes_the_history_and_leaves_the_rest_for_the_stream(sample_csv, tmp_path, capsys):
    raw = pd.read_csv(sample_csv)
    pickup = pd.to_datetime(raw["pickup_datetime"])
    cutoff = pd.Timestamp("2016-03-15 12:00:00")
    master = tmp_path / "master"
    argv = ["--master-dir", str(master), "import", str(sample_csv), "--cutoff", "2016-03-15 12:00:00"]
    assert batch_processor.main(argv) == 0
    out = capsys.readouterr().out
    history, rest = int((pickup < cutoff).sum()), int((pickup >= cutoff).sum())
    assert f"imported {history:,} trips picked up before 2016-03-15 12:00:00" in out
    assert f"{rest:,} trips picked up from the cutoff on are left for the stream" in out
    (target,) = (master / "csv").iterdir()
    assert target.name == storage.file_sha256(sample_csv)[:24] + "-before-20160315T120000"
    summary = json.loads((target / "import.json").read_text())
    assert summary["rows"] == history and summary["left_for_stream"] == rest and summary["import_seq"] == 1
    assert summary["cutoff"] == "2016-03-15 12:00:00"
    assert summary["cutoff_ms"] == (cutoff - pd.Timestamp(0)) // pd.Timedelta(milliseconds=1)
    assert {storage.avro_metadata(p)["cutoff"] for p in storage.master_files(master)} == {"2016-03-15 12:00:00"}
    assert sorted(r["id"] for r in storage.read_master_records(master)) == sorted(raw.loc[pickup < cutoff, "id"])

    before = {p: p.read_bytes() for p in storage.master_files(master)}
    assert batch_processor.main(argv) == 0
    assert "nothing added" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in storage.master_files(master)} == before
    later = batch_processor.import_csv(sample_csv, master, cutoff_ms=parse_cutoff("2016-04-01"))
    assert later.added and later.rows == int((pickup < pd.Timestamp("2016-04-01")).sum())
    assert json.loads((later.target / "import.json").read_text())["import_seq"] == 2


def test_the_cutoff_defaults_to_config_and_none_takes_everything(sample_csv, tmp_path):
    args = batch_processor.parse_args(["import", str(sample_csv)])
    assert args.cutoff == parse_cutoff(config.CUTOFF)
    assert batch_processor.parse_args(["run", "--cutoff", "none"]).cutoff is None
    assert batch_processor.parse_args([]).command == "run"
    assert batch_processor.parse_args([]).cutoff == parse_cutoff(config.CUTOFF)


@pytest.mark.parametrize("value", ["2016-13-01", "tomorrow", "2016-06-01T00:00"])
def test_a_bad_cutoff_is_a_one_line_error(value, sample_csv, capsys):
    with pytest.raises(SystemExit) as stopped:
        batch_processor.main(["import", str(sample_csv), "--cutoff", value])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].endswith(
        f" import: error: argument --cutoff: {value!r} is not a cutoff: give a pickup time like "
        "2016-06-01 or '2016-06-01 12:00:00' (New York wall clock), or none")


def test_stream_copies_of_history_trips_count_once_as_in_history(sample_csv, sample_trips, tmp_path, as_csv_rows,
                                                                  assert_views_match_pandas):
    """A trip imported as history and replayed into Kafka: the CSV copy comes first in source order."""
    master = tmp_path / "master"
    batch_processor.import_csv(sample_csv, master)
    replayed = sample_trips.iloc[:1500].copy()
    replayed["trip_duration"] += 7  # the replayed copies even differ: the history's copy still counts
    replayed["dropoff_datetime"] += 7000
    new = sample_trips.iloc[1500:1800].assign(id=lambda t: t["id"] + "-new")
    stream = pd.concat([replayed, new, replayed.iloc[:100]], ignore_index=True)
    for partition in range(3):
        part = stream.iloc[partition::3]
        batch_processor.write_stream_file(master, "taxi-trips", partition,
                                          [(o, r, None) for o, r in enumerate(part[list(FIELDS)].to_dict("records"))])
    batch, manifest = recompute_version(master, tmp_path / "views")
    raw = pd.read_csv(sample_csv)
    rows = pd.concat([raw, *(as_csv_rows(stream.iloc[p::3]) for p in range(3))], ignore_index=True)
    assert_views_match_pandas(batch, rows)
    assert manifest["rows"]["duplicates"] == 1600 and manifest["rows"]["distinct"] == 73_177 + 300
    assert manifest["watermark"] == {str(p): len(stream.iloc[p::3]) - 1 for p in range(3)}
    assert [f["kind"] for f in manifest["input_files"]] == ["csv", "stream", "stream", "stream"]


def test_source_order_is_import_order_whatever_the_names(sample_csv, tmp_path, assert_views_match_pandas):
    raw = pd.read_csv(sample_csv).head(3000)
    early, late = tmp_path / "early.csv", tmp_path / "late.csv"
    raw.to_csv(early, index=False)
    shifted(raw, hours=3).to_csv(late, index=False)
    results = {}
    for order in ((early, late), (late, early)):
        master = tmp_path / f"master-{order[0].stem}"
        for path in order:
            batch_processor.import_csv(path, master)
        files = storage.master_files(master)
        assert [storage.avro_metadata(f)["source"] for f in files] == [p.name for p in order]
        results[order[0].stem] = recompute_version(master, tmp_path / f"views-{order[0].stem}")[0]
        assert_views_match_pandas(results[order[0].stem], pd.read_csv(order[0]))
    assert not views.views_equal(results["early"], results["late"])


def test_imports_made_before_they_were_numbered_come_first(sample_csv, tmp_path):
    master = tmp_path / "master"
    raw = pd.read_csv(sample_csv).head(500)
    for index in range(3):
        path = tmp_path / f"f{index}.csv"
        raw.iloc[index * 100:(index + 1) * 100].to_csv(path, index=False)
        batch_processor.import_csv(path, master)
    old = storage.csv_imports(master)
    legacy = old[2]  # pretend the third import was made by a version that did not number imports
    summary = json.loads((legacy / "import.json").read_text())
    del summary["import_seq"]
    (legacy / "import.json").write_text(json.dumps(summary))
    assert storage.csv_imports(master) == [legacy, old[0], old[1]]


def test_options_work_after_the_command_too(published, capsys):
    master, views_dir = published
    assert batch_processor.main(["status", "--master-dir", str(master), "--views-dir", str(views_dir)]) == 0
    out = capsys.readouterr().out
    assert f"master data: 1 files under {master}" in out and "current version v000001" in out
    assert "of 73,177 distinct (0 later copies left out)" in out


def test_without_a_command_it_runs_and_a_mistyped_command_is_refused(published, tmp_path, capsys):
    master, _ = published
    args = batch_processor.parse_args(["--master-dir", str(master), "--from-stream", "--engine", "spark"])
    assert args.command == "run" and args.from_stream and args.engine == "spark" and args.master_dir == master
    assert batch_processor.parse_args(["--views-dir=x", "--workers", "1"]).command == "run"
    with pytest.raises(SystemExit):
        batch_processor.parse_args(["recompte"])
    assert "invalid choice: 'recompte'" in capsys.readouterr().err


def test_the_top_level_help_names_every_command_and_its_flags(capsys):
    with pytest.raises(SystemExit):
        batch_processor.parse_args(["--help"])
    out = capsys.readouterr().out
    assert "no command: run" in out
    listed: dict[str, str] = {}
    for line in out[out.index("commands and their flags"):].splitlines()[1:]:
        if line.startswith("  ") and not line.startswith("   "):
            command = line.split()[0]
            listed[command] = line
        elif line.strip():
            listed[command] += line
    assert set(listed) == {"run", "import", "ingest", "recompute", "status", "sql"}
    for command, flags in {"run": ["--input", "--cutoff", "--from-stream", "--engine", "--workers", "--file-rows"],
                           "import": ["FILE ...", "--cutoff", "--part-rows"],
                           "ingest": ["--bootstrap", "--topic", "--group", "--wait"],
                           "recompute": ["--engine", "--decoder", "--keep", "--workers"],
                           "sql": ["--execute", "--master"]}.items():
        assert all(flag in listed[command] for flag in flags), listed[command]


def test_the_fastavro_decoder_gives_the_same_version(published):
    master, _ = published
    fast = batch_processor.compute_views(master, workers=1, progress=False)
    reference = batch_processor.compute_views(master, workers=1, progress=False, decoder="fastavro")
    assert views.views_equal(fast.views, reference.views)
    assert fast.manifest["rows"] == reference.manifest["rows"] and fast.trip_ids.equals(reference.trip_ids)


def test_an_unreadable_master_file_is_a_one_line_error(published, tmp_path, capsys):
    master, _ = published
    broken = tmp_path / "master"
    shutil.copytree(master, broken)
    (part,) = storage.master_files(broken)
    part.write_bytes(part.read_bytes()[:5000])  # cut off, as by a full disk
    assert batch_processor.main(["--master-dir", str(broken), "--views-dir", str(tmp_path / "v"), "recompute"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: master file {part} cannot be read") and len(err.strip().splitlines()) == 1


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


def test_the_spark_engine_without_its_jars_is_a_one_line_error_naming_the_fix(published, tmp_path):
    import os
    import subprocess
    import sys

    empty = tmp_path / "no-jars"
    empty.mkdir()
    result = subprocess.run(
        [sys.executable, "batch_processor.py", "--master-dir", str(published[0]), "--views-dir",
         str(tmp_path / "views"), "recompute", "--engine", "spark"],
        cwd=config.PROJECT_ROOT, env={**os.environ, "PERISCOPE_SPARK_JARS_DIR": str(empty)},
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "make spark-fetch" in lines[0], result.stderr
