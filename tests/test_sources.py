"""The Kaggle CSV loader: real sample, malformed rows, wrong headers, cleaning counts."""
from __future__ import annotations

import csv
import gzip
import io
import shutil

import numpy as np
import pandas as pd
import pytest

from periscope.schema import InvalidTrip, parse_fields
from periscope.sources import CsvLayoutError, LoadReport, iter_trip_chunks, read_trips

def write(tmp_path, lines, name="trips.csv"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def test_real_sample_loads_completely(sample_csv, sample_raw):
    trips, report = read_trips(sample_csv)
    assert report.rows_read == len(trips) == len(sample_raw)
    assert report.rows_malformed == 0
    assert trips["id"].is_unique and list(trips["id"]) == list(sample_raw["id"])
    assert trips["pickup_datetime"].dtype == np.int64 and trips["store_and_fwd_flag"].dtype == bool
    stored_and_forwarded = int((sample_raw["store_and_fwd_flag"] == "Y").sum())
    assert int(trips["store_and_fwd_flag"].sum()) == stored_and_forwarded > 0


def test_cleaning_counts_match_an_independent_computation(sample_csv, sample_raw, independent_clean_mask):
    raw = sample_raw
    expected = independent_clean_mask(raw)
    clean, report = read_trips(sample_csv, clean=True)
    assert report.rows_clean == len(clean) == int(expected.sum())
    assert sorted(clean["id"]) == sorted(raw.loc[expected, "id"])
    assert sum(report.broken_rules.values()) == len(raw) - int(expected.sum())
    assert report.broken_rules["duration_too_short"] == int((raw["trip_duration"] < 60).sum())
    assert any("duration_too_short" in line for line in report.summary_lines())


def test_malformed_rows_are_counted_with_line_numbers(tmp_path, csv_lines):
    header, good, bad = csv_lines.header, csv_lines.good, csv_lines.bad
    lines = [header, good, *bad.values(), good.replace("id1", "id5") + ",extra", good.replace("id1", "id6")]
    trips, report = read_trips(write(tmp_path, lines))
    assert list(trips["id"]) == ["id1", "id6"]
    assert report.rows_read == 6 and report.rows_malformed == 4
    assert report.malformed == {"bad_datetime": 1, "wrong_type": 1, "missing_value": 1, "wrong_field_count": 1}
    assert "line 3: bad_datetime in pickup_datetime" in report.examples
    assert "line 4: wrong_type in vendor_id" in report.examples
    assert "line 5: missing_value in passenger_count" in report.examples
    assert "line 6: wrong_field_count" in report.examples


def test_vectorised_reasons_match_the_per_record_parser(tmp_path, csv_lines):
    header, good, bad = csv_lines.header, csv_lines.good, csv_lines.bad
    rows = [good, *bad.values(),
            good.replace(",486", ",4.5"), good.replace(",N,", ",Q,"), good.replace("id1", ""),
            good.replace("-73.98", "nan", 1), good.replace("2016-02-28 02:31:08", "yesterday")]
    path = write(tmp_path, [header, *rows])
    report = LoadReport(source="x")
    kept = pd.concat(list(iter_trip_chunks(path, report, chunk_rows=2)))
    expected = {}
    for row in csv.DictReader(io.StringIO("\n".join([header, *rows]))):
        try:
            parse_fields(row)
        except InvalidTrip as error:
            expected[error.reason] = expected.get(error.reason, 0) + 1
    assert dict(report.malformed) == expected
    assert len(kept) == 1


def test_wrong_header_names_the_missing_columns(tmp_path):
    path = write(tmp_path, ["id,vendor,pickup_datetime", "id1,1,2016-01-01 00:00:00"])
    with pytest.raises(CsvLayoutError, match="missing column\\(s\\) vendor_id, dropoff_datetime"):
        read_trips(path)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_trips(tmp_path / "nope.csv")


def test_gzip_plain_and_chunked_reads_agree(tmp_path, sample_csv, sample_raw):
    plain = tmp_path / "sample.csv"
    with gzip.open(sample_csv, "rb") as source, open(plain, "wb") as target:
        shutil.copyfileobj(source, target)
    whole, _ = read_trips(sample_csv)
    from_plain, _ = read_trips(plain)
    report = LoadReport(source="chunks")
    chunked = pd.concat(list(iter_trip_chunks(plain, report, chunk_rows=10_000)), ignore_index=True)
    pd.testing.assert_frame_equal(whole, from_plain)
    pd.testing.assert_frame_equal(whole, chunked)
    assert report.rows_read == len(sample_raw)
