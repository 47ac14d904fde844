"""TLC trip records in every shipped layout: reading, identity, master data, views, bad files.

Expected values come from plain pandas/pyarrow readings of the shipped files
(``independent``), with this test's own column names and rules, never from
the readers under test.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import fastavro
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import batch_processor
import kafka_producer
import train_model
from periscope import storage, zones
from periscope.master_reader import read_file, record_columns
from periscope.model import read_metadata
from periscope.sources import TripFileError, read_trips

from tests.conftest import MASTER_BEFORE_TLC as BEFORE_TLC
from tests.conftest import SHARED_DATA as SHIPPED
from tests.conftest import CAB_FILES, TLC_DIR, shapely_zones
from tests.conftest import independent_tlc as independent
from tests.conftest import independent_tlc_rules as independent_rules

assert len(CAB_FILES) == 23, f"expected the 23 shipped TLC cab files in {TLC_DIR} (PERISCOPE_SHARED_DATA)"


@pytest.mark.parametrize("path", CAB_FILES, ids=lambda p: p.name)
def test_each_shipped_file_reads_as_pandas_does(path):
    raw, ok = independent(path)
    trips, report = read_trips(path, tlc_layouts=True)
    assert report.rows_read == len(raw)
    assert report.rows_malformed == int((~ok).sum()) and len(trips) == int(ok.sum())
    good = raw[ok].reset_index(drop=True)
    np.testing.assert_array_equal(trips["pickup_datetime"], good["pickup"].to_numpy("datetime64[ms]").astype(np.int64))
    np.testing.assert_array_equal(trips["fare_amount"], good["fare"].astype(float))
    np.testing.assert_array_equal(trips["pickup_location_id"], good["pzone"].fillna(-1).astype(np.int64))
    np.testing.assert_array_equal(trips["pickup_longitude"], good["plon"].astype(float))
    np.testing.assert_array_equal(trips["passenger_count"], good["passengers"].fillna(-1).astype(np.int64))
    assert set(trips["service"]) == {"green" if path.name.startswith("green") else "yellow"}
    assert trips["id"].str.fullmatch(r"tlc_[0-9a-f]{20}").all()
    again, _ = read_trips(path, tlc_layouts=True)
    assert list(again["id"]) == list(trips["id"])


@pytest.mark.parametrize("path", CAB_FILES, ids=lambda p: p.name)
def test_rejections_by_the_cleaning_rules_match_pandas(path):
    raw, ok = independent(path)
    expected = independent_rules(raw[ok]).value_counts().drop("", errors="ignore").to_dict()
    clean, report = read_trips(path, clean=True, tlc_layouts=True)
    assert {k: v for k, v in report.broken_rules.items() if v} == expected
    assert len(clean) == int(ok.sum()) - sum(expected.values())


def test_the_same_row_in_csv_and_parquet_is_the_same_fact(tmp_path):
    source = TLC_DIR / "yellow_tripdata_2020-04_1000rows.csv"
    raw = pd.read_csv(source)
    for column in ("tpep_pickup_datetime", "tpep_dropoff_datetime"):
        raw[column] = pd.to_datetime(raw[column])
    raw = raw.rename(columns={"airport_fee": "Airport_fee", "RatecodeID": "RateCodeID"})
    parquet = tmp_path / "same.parquet"
    pq.write_table(pa.Table.from_pandas(raw.astype({"passenger_count": "float64"})), parquet)
    from_csv, _ = read_trips(source, tlc_layouts=True)
    from_parquet, report = read_trips(parquet, tlc_layouts=True)
    assert report.layout == "yellow_zones"
    assert list(from_parquet["id"]) == list(from_csv["id"])


def test_rows_identical_in_every_field_are_one_fact_as_docs_data_counts():
    """No shipped file repeats a row; two files of April 2020 in other layouts share rows, which pandas
    finds identical in every column both have: they get the same ids, and docs/DATA.md says how many."""
    for path in CAB_FILES:
        raw = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path, low_memory=False)
        trips, _ = read_trips(path, tlc_layouts=True)
        assert int(trips["id"].duplicated().sum()) == int(raw.duplicated().sum()) == 0
    extract = pd.read_csv(TLC_DIR / "yellow_tripdata_2020-04_1000rows.csv").rename(columns={
        "VendorID": "vendor_id", "tpep_pickup_datetime": "pickup_datetime", "tpep_dropoff_datetime": "dropoff_datetime",
        "RatecodeID": "rate_code_id", "PULocationID": "pickup_location_id", "DOLocationID": "dropoff_location_id"})
    sample = pd.read_csv(TLC_DIR / "yellow_tripdata_sample_2020-04.csv.gz")
    for frame in (extract, sample):
        for column in ("pickup_datetime", "dropoff_datetime"):
            frame[column] = pd.to_datetime(frame[column])
    common = [column for column in sample.columns if column in extract.columns]
    assert len(common) == len(sample.columns)
    shared = len(extract.merge(sample, on=common))
    ids = [set(read_trips(TLC_DIR / name, tlc_layouts=True)[0]["id"]) for name in
           ("yellow_tripdata_2020-04_1000rows.csv", "yellow_tripdata_sample_2020-04.csv.gz")]
    assert len(ids[0] & ids[1]) == shared > 0
    assert f"{shared} rows" in (Path(__file__).resolve().parent.parent / "docs" / "DATA.md").read_text()


@pytest.mark.parametrize("name, reason", [("fhv_tripdata_2020-04_1000rows.csv", "for-hire-vehicle"),
                                          ("fhvhv_tripdata_2020-04_1000rows.csv", "high-volume for-hire")])
def test_for_hire_files_are_recognised_and_refused_with_the_reason(name, reason):
    with pytest.raises(TripFileError, match=reason):
        read_trips(TLC_DIR / name, tlc_layouts=True)


def test_an_unknown_layout_names_the_layouts_known_and_the_columns_missed(tmp_path):
    path = tmp_path / "odd.csv"
    path.write_text("VendorID,tpep_pickup_datetime,tpep_dropoff_datetime,PULocationID,fare\n1,2,3,4,5\n")
    with pytest.raises(TripFileError) as error:
        read_trips(path, tlc_layouts=True)
    message = str(error.value)
    assert "\n" not in message and str(path) in message
    missed = message.split("missing column(s) ")[1].split(";")[0].split(", ")
    assert sorted(missed) == sorted(["passenger_count", "store_and_fwd_flag", "dolocationid", "trip_distance",
                                     "fare_amount", "tip_amount", "total_amount", "payment_type"])
    assert "expected the yellow_zones layout" in message
    assert all(name in message for name in ("kaggle", "yellow_2009", "yellow_2010", "green_zones"))


def test_commands_that_take_kaggle_only_refuse_a_tlc_file_by_name():
    with pytest.raises(TripFileError, match="yellow_zones layout.*batch_processor.py import"):
        read_trips(TLC_DIR / "yellow_tripdata_2020-04_1000rows.csv")


# --- master data: old files still read, TLC imports, views ---------------------------------------


def test_master_files_written_before_the_tlc_fields_still_read():
    part = next(BEFORE_TLC.glob("csv/*/part-00000.avro"))
    source = pd.read_csv(BEFORE_TLC / "source_300_trips.csv", float_precision="round_trip")
    with open(part, "rb") as handle:  # Avro schema resolution: the evolved schema reads the old file
        records = list(fastavro.reader(handle, reader_schema=storage.PARSED_SCHEMA))
    assert [r["id"] for r in records] == list(source["id"])
    assert {r["service"] for r in records} == {None} and {r["pickup_location_id"] for r in records} == {None}
    for decoder in ("polars", "fastavro"):
        frame = read_file(part, decoder)
        assert list(frame["id"]) == list(source["id"]) and "service" not in frame.columns
        columns = record_columns(frame)
        np.testing.assert_array_equal(columns["trip_duration"], source["trip_duration"])
        np.testing.assert_array_equal(columns["pickup_longitude"], source["pickup_longitude"])


def test_kaggle_trips_are_written_as_before_with_their_zones_and_tlc_trips_with_every_field(tmp_path, capsys):
    source = BEFORE_TLC / "source_300_trips.csv"
    tlc_file = TLC_DIR / "yellow_tripdata_sample_2020-05.csv.gz"
    assert batch_processor.main(["--master-dir", str(tmp_path), "import", "--cutoff", "none", str(source),
                                 str(tlc_file)]) == 0
    kaggle_part, tlc_part = storage.master_files(tmp_path)
    written = []
    for part in (kaggle_part, next(BEFORE_TLC.glob("csv/*/part-00000.avro"))):
        with open(part, "rb") as handle:
            reader = fastavro.reader(handle)
            fields = [(field["name"], field["type"]) for field in reader.writer_schema["fields"]]
            written.append((fields, list(reader)))
    zones = [("pickup_location_id", "int"), ("dropoff_location_id", "int")]
    assert written[0][0] == written[1][0] + zones  # the fields and types the code before TLC wrote, and the zones
    assert [{k: v for k, v in r.items() if "location" not in k} for r in written[0][1]] == written[1][1]
    raw = pd.read_csv(source)
    for end in ("pickup", "dropoff"):
        assert [r[f"{end}_location_id"] for r in written[0][1]] == shapely_zones(raw[f"{end}_longitude"],
                                                                                   raw[f"{end}_latitude"])
    frame = read_file(tlc_part)
    raw = pd.read_csv(tlc_file)
    assert frame["vendor_id"].null_count() == int(raw["vendor_id"].isna().sum()) > 0
    assert frame["pickup_longitude"].null_count() == len(raw) and set(frame["source_layout"]) == {
        "yellow_zones_snake_case"}


def test_old_and_new_master_files_recompute_together(tmp_path, independent_clean_mask):
    master = tmp_path / "master"
    shutil.copytree(BEFORE_TLC / "csv", master / "csv")
    zone_file = TLC_DIR / "yellow_tripdata_2020-04_1000rows.csv"
    assert batch_processor.main(["--master-dir", str(master), "import", "--cutoff", "none", str(zone_file)]) == 0
    version = batch_processor.compute_views(master, workers=1, progress=False)
    kaggle = pd.read_csv(BEFORE_TLC / "source_300_trips.csv")
    raw, ok = independent(zone_file)
    expected = int(independent_clean_mask(kaggle).sum()) + int((independent_rules(raw[ok]) == "").sum())
    assert version.manifest["rows"]["clean"] == expected == int(version.views["daily_summary"]["trips"].sum())


def test_reimporting_a_tlc_file_adds_nothing(tmp_path, capsys):
    path = TLC_DIR / "green_tripdata_2023-03.parquet"
    copy = tmp_path / "renamed.parquet"
    shutil.copy(path, copy)
    master = ["--master-dir", str(tmp_path / "m"), "import", "--cutoff", "none"]
    assert batch_processor.main([*master, str(path)]) == 0
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "m").rglob("*.avro"))
    assert batch_processor.main([*master, str(path), str(copy)]) == 0
    assert "nothing added" in capsys.readouterr().out
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "m").rglob("*.avro")) == before


def centroids() -> pd.DataFrame:
    return pd.read_csv(SHIPPED / "zones" / "taxi_zone_centroids.csv").set_index("location_id")


def test_views_over_kaggle_and_tlc_files_equal_pandas(sample_csv, tmp_path, independent_clean_mask):
    tlc_files = [TLC_DIR / name for name in (
        "yellow_tripdata_2013-01_head.csv", "yellow_tripdata_2015-01_head.csv", "yellow_tripdata_2021-01_head.csv.gz",
        "yellow_tripdata_sample_2020-05.csv.gz", "green_tripdata_2023-03.parquet", "green_tripdata_2020-04_1000rows.csv")]
    copy = tmp_path / "green_same_rows_again.csv"
    shutil.copy(tlc_files[-1], copy)
    copy.write_text(copy.read_text() + "\n")  # other bytes, the same rows: another import, the same facts
    master = tmp_path / "master"
    assert batch_processor.main(["--master-dir", str(master), "import", "--cutoff", "none", str(sample_csv),
                                 *map(str, tlc_files), str(copy)]) == 0
    version = batch_processor.compute_views(master, workers=2, progress=False)

    kaggle = pd.read_csv(sample_csv)
    kaggle = kaggle[independent_clean_mask(kaggle)]
    parts = [pd.DataFrame({"pickup": pd.to_datetime(kaggle["pickup_datetime"]), "duration": kaggle["trip_duration"],
                           "vendor": kaggle["vendor_id"], "lat": kaggle["pickup_latitude"],
                           "lon": kaggle["pickup_longitude"],
                           "pzone": shapely_zones(kaggle["pickup_longitude"], kaggle["pickup_latitude"]),
                           "dzone": shapely_zones(kaggle["dropoff_longitude"], kaggle["dropoff_latitude"]),
                           "fare": np.nan, "tip": np.nan, "total": np.nan})]
    tlc_rows = []
    for path in [*tlc_files, copy]:
        raw, ok = independent(path)
        raw = raw[ok].copy()
        raw["service"] = "green" if path.name.startswith("green") else "yellow"
        tlc_rows.append(raw)
    facts = ["service", "vendor", "pickup", "dropoff", "passengers", "plon", "plat", "dlon", "dlat", "pzone",
             "dzone", "distance", "fare", "tip", "total"]
    tlc = pd.concat(tlc_rows, ignore_index=True)
    tlc = tlc[~tlc[facts].astype(str).duplicated()]  # the same content is the same fact
    tlc = tlc[independent_rules(tlc) == ""]
    zone = centroids()
    by_zone = tlc["plat"].isna()
    parts.append(pd.DataFrame({
        "pickup": tlc["pickup"], "duration": (tlc["dropoff"] - tlc["pickup"]).dt.total_seconds() // 1,
        "vendor": tlc["vendor"].astype(int),
        "lat": np.where(by_zone, zone["centroid_latitude"].reindex(tlc["pzone"]).to_numpy(), tlc["plat"]),
        "lon": np.where(by_zone, zone["centroid_longitude"].reindex(tlc["pzone"]).to_numpy(), tlc["plon"]),
        **{f"{end}zone": tlc[f"{end}zone"].where(tlc[f"{end}zone"].notna(),
                                                 pd.Series(shapely_zones(tlc[f"{end}lon"], tlc[f"{end}lat"]),
                                                           index=tlc.index))
           for end in "pd"},
        "fare": tlc["fare"], "tip": tlc["tip"], "total": tlc["total"]}))
    trips = pd.concat(parts, ignore_index=True)
    assert version.manifest["rows"]["clean"] == len(trips)

    trips["date"], trips["hour"] = trips["pickup"].dt.normalize(), trips["pickup"].dt.hour
    hourly = trips.groupby(["date", "hour"])["duration"].agg(["count", "sum", "min", "max"]).reset_index()
    got = version.views["hourly_stats"]
    np.testing.assert_array_equal(got["pickup_date"].to_numpy(), hourly["date"].to_numpy())
    for ours, theirs in [("trips", "count"), ("duration_s_sum", "sum"), ("duration_s_min", "min"),
                         ("duration_s_max", "max")]:
        np.testing.assert_array_equal(got[ours], hourly[theirs])
    vendor = trips.groupby("vendor")["duration"].agg(["count", "sum"]).reset_index()
    np.testing.assert_array_equal(version.views["vendor_stats"]["trips"], vendor["count"])
    np.testing.assert_array_equal(version.views["vendor_stats"]["duration_s_sum"], vendor["sum"])
    grid = trips.groupby([np.floor(trips["lat"] / 0.005), np.floor(trips["lon"] / 0.005)]).size()
    np.testing.assert_array_equal(version.views["pickup_grid"]["trips"], grid.to_numpy())

    for end in "pd":  # a zone outside 1..263 (TLC's "unknown" ones) is no zone
        trips[f"{end}key"] = trips[f"{end}zone"].where(trips[f"{end}zone"].between(1, 263), 0).astype(int)
        trips[f"{end}borough"] = trips[f"{end}key"].map(zone["borough"]).fillna("no zone")
    revenue = {f"{name}_cents": (trips[name] * 100).round() for name in ("fare", "tip", "total")}
    trips = trips.assign(**revenue)
    sums = {"trips": ("duration", "count"), "duration_s_sum": ("duration", "sum"),
            **{f"{name}_trips": (name, "count") for name in ("fare", "tip", "total")},
            **{f"{name}_cents_sum": (f"{name}_cents", "sum") for name in ("fare", "tip", "total")}}
    by_zone = trips.groupby(["date", "pkey"]).agg(**sums).reset_index()
    got = version.views["zone_daily"]
    np.testing.assert_array_equal(got["pickup_date"].to_numpy(), by_zone["date"].to_numpy())
    np.testing.assert_array_equal(got["pickup_zone"], by_zone["pkey"])
    for column in sums:
        np.testing.assert_array_equal(got[column], by_zone[column], err_msg=column)
    assert got["fare_trips"].sum() == trips["fare"].notna().sum() > 0

    flows = trips.groupby(["date", "pborough", "dborough"]).agg(**sums).reset_index()
    got = version.views["borough_flows"].assign(
        pborough=lambda v: [zones.BOROUGHS[code] for code in v["pickup_borough"]],
        dborough=lambda v: [zones.BOROUGHS[code] for code in v["dropoff_borough"]])
    got = got.sort_values(["pickup_date", "pborough", "dborough"]).reset_index(drop=True)
    np.testing.assert_array_equal(got["pickup_date"].to_numpy(), flows["date"].to_numpy())
    np.testing.assert_array_equal(got[["pborough", "dborough"]], flows[["pborough", "dborough"]])
    for column in sums:
        np.testing.assert_array_equal(got[column], flows[column], err_msg=column)


def test_evaluate_scores_tlc_files_with_coordinates_and_zone_only_ones(tmp_path, sample_csv, capsys):
    model_dir = tmp_path / "model"
    assert train_model.main(["--input", str(sample_csv), "--model-dir", str(model_dir), "--threads", "1",
                             "--no-save-holdout"]) == 0
    capsys.readouterr()
    assert train_model.main(["--model-dir", str(model_dir), "--json",
                             "--evaluate", str(TLC_DIR / "yellow_tripdata_2015-01_head.csv")]) == 0
    assert '"rows": 999' in capsys.readouterr().out
    zone_file = TLC_DIR / "yellow_tripdata_2021-01_head.csv.gz"
    assert train_model.main(["--model-dir", str(model_dir), "--json", "--evaluate", str(zone_file)]) == 0
    result = json.loads(capsys.readouterr().out)
    raw = pd.read_csv(zone_file, on_bad_lines="skip")
    times = {end: pd.to_datetime(raw[f"tpep_{end}_datetime"], format="%Y-%m-%d %H:%M:%S", errors="coerce")
             for end in ("pickup", "dropoff")}  # the cut last line has no dropoff time
    seconds = (times["dropoff"] - times["pickup"]).dt.total_seconds()
    assert result["rows"] == int((seconds >= 0).sum())
    assert set(result["by_era"]) == {f"yellow {year} zones" for year in times["pickup"][seconds >= 0].dt.year}


# --- bad files: one line, exit 2, nothing written, for every command that reads a file ------------

KAGGLE_HEADER = ("id,vendor_id,pickup_datetime,dropoff_datetime,passenger_count,pickup_longitude,pickup_latitude,"
                 "dropoff_longitude,dropoff_latitude,store_and_fwd_flag,trip_duration\n")


def bad_file(tmp_path: Path, case: str, sample_csv: Path) -> tuple[Path, str]:
    """A bad input file and a word its error line must hold."""
    if case == "empty":
        path, word = tmp_path / "empty.csv", "empty"
        path.write_bytes(b"")
    elif case == "binary":
        path, word = tmp_path / "garbage.csv", "binary"
        path.write_bytes(bytes(range(256)) * 64)
    elif case == "truncated_gzip":
        path, word = tmp_path / "cut.csv.gz", "gzip"
        whole = sample_csv.read_bytes()
        path.write_bytes(whole[: len(whole) // 2])
    elif case == "not_parquet":
        path, word = tmp_path / "trips.parquet", "not a Parquet file"
        path.write_text(KAGGLE_HEADER)
    elif case == "header_only":
        path, word = tmp_path / "header.csv", "no rows"
        path.write_text(KAGGLE_HEADER)
    elif case == "unknown_layout":
        path, word = tmp_path / "other.csv", "missing column(s)"
        path.write_text("trip,start,end\n1,2,3\n")
    else:
        path, word = TLC_DIR / "fhvhv_tripdata_2020-04_1000rows.csv", "fhvhv"
    return path, word


BAD_CASES = ("empty", "binary", "truncated_gzip", "not_parquet", "header_only", "unknown_layout", "for_hire")


def run_command(command: str, path: Path, tmp_path: Path) -> int:
    if command == "import":
        return batch_processor.main(["--master-dir", str(tmp_path / "m"), "import", "--cutoff", "none", str(path)])
    if command == "train":
        return train_model.main(["--input", str(path), "--model-dir", str(tmp_path / "model")])
    if command == "evaluate":
        return train_model.main(["--evaluate", str(path), "--model-dir", str(tmp_path / "model")])
    return kafka_producer.main(["--input", str(path), "--bootstrap", "127.0.0.1:9", "--topic", "none"])


@pytest.mark.parametrize("command", ("import", "train", "evaluate", "produce"))
@pytest.mark.parametrize("case", BAD_CASES)
def test_a_bad_file_is_one_line_exit_2_and_nothing_written(case, command, tmp_path, sample_csv, capsys):
    path, word = bad_file(tmp_path, case, sample_csv)
    assert run_command(command, path, tmp_path) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and word in lines[0], captured.err
    assert "Traceback" not in captured.err + captured.out
    assert not list((tmp_path / "m").rglob("*.avro")) and not (tmp_path / "model" / "versions").exists()
    assert storage.master_files(tmp_path / "m") == []


def test_retraining_on_master_data_with_tlc_trips_learns_every_era(tmp_path, capsys):
    kaggle, coordinates = BEFORE_TLC / "source_300_trips.csv", TLC_DIR / "yellow_tripdata_2015-01_head.csv"
    zones = TLC_DIR / "green_tripdata_2020-04_1000rows.csv"
    assert batch_processor.main(["--master-dir", str(tmp_path / "m"), "import", "--cutoff", "none",
                                 *map(str, (kaggle, coordinates, zones))]) == 0
    assert train_model.main(["--from-master", str(tmp_path / "m"), "--split", "id", "--threads", "1",
                             "--model-dir", str(tmp_path / "model"), "--no-save-holdout"]) == 0
    expected = len(pd.read_csv(kaggle)) + len(pd.read_csv(coordinates)) + len(pd.read_csv(zones))
    assert f"{expected:,} trips in 3 master files ({len(pd.read_csv(zones)):,} of them known by zones only)" \
        in capsys.readouterr().out
    eras = read_metadata(tmp_path / "model")["training_data"]["trips_by_era"]
    assert "green 2020 zones" in eras and "yellow 2015 coordinates" in eras


