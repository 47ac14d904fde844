"""The scale-data generator: reproducible, well formed, and as realistic as the sample.

The benchmarks trust generated files to behave like real data at scale, so
these tests compare a generated file with the real sample it was drawn from:
the mix of vendors and passengers, typical durations and distances, and how
many trips the cleaning rules reject.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from periscope import config, generate
from periscope.schema import FIELDS, RULE_NAMES, haversine_km
from periscope.sources import read_trips
from tests.conftest import shapely_zones

ROWS = 60_000


@pytest.fixture(scope="module")
def sample() -> pd.DataFrame:
    trips, report = read_trips(config.SAMPLE_CSV)
    assert report.rows_malformed == 0
    return trips


@pytest.fixture(scope="module")
def generated_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("generated") / "trips.csv"
    assert generate.main(["--rows", str(ROWS), "--seed", "7", "--out", str(out), "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def generated(generated_file: Path) -> pd.DataFrame:
    trips, report = read_trips(generated_file)
    assert report.rows_malformed == 0, report.summary_lines()
    return trips


def distance_km(trips: pd.DataFrame) -> np.ndarray:
    return haversine_km(trips["pickup_latitude"], trips["pickup_longitude"],
                        trips["dropoff_latitude"], trips["dropoff_longitude"]).to_numpy()


def rejected_share(trips: pd.DataFrame) -> dict[str, float]:
    counts = generate.rule_counts(trips)
    return {"total": sum(counts.values()) / len(trips), **{name: counts[name] / len(trips) for name in RULE_NAMES}}


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(tmp_path: Path, generated_file: Path) -> None:
    again, other = tmp_path / "again.csv", tmp_path / "other.csv"
    assert generate.main(["--rows", str(ROWS), "--seed", "7", "--out", str(again), "--quiet"]) == 0
    assert generate.main(["--rows", str(ROWS), "--seed", "8", "--out", str(other), "--quiet"]) == 0
    assert again.read_bytes() == generated_file.read_bytes()
    assert other.read_bytes() != generated_file.read_bytes()


def test_gzip_output_is_reproducible_and_holds_the_same_csv(tmp_path: Path, sample: pd.DataFrame) -> None:
    """The command line and the pure functions agree, and gzip adds no time stamp."""
    by_cli, by_functions, plain = tmp_path / "a.csv.gz", tmp_path / "b.csv.gz", tmp_path / "c.csv"
    assert generate.main(["--rows", "2000", "--seed", "3", "--out", str(by_cli), "--quiet"]) == 0
    for out in (by_functions, plain):
        generate.write_file(generate.generate(sample, 2000, 3), out, 2000, progress=False)
    assert by_cli.read_bytes() == by_functions.read_bytes()
    assert gzip.decompress(by_cli.read_bytes()) == plain.read_bytes()


def test_output_is_the_kaggle_layout_with_every_row_well_formed(generated_file: Path, generated: pd.DataFrame) -> None:
    with open(generated_file) as handle:
        assert handle.readline().rstrip("\n") == ",".join(FIELDS)
        first = handle.readline().rstrip("\n").split(",")
    assert len(first) == len(FIELDS)
    assert first[FIELDS.index("store_and_fwd_flag")] in ("Y", "N")
    assert len(first[FIELDS.index("pickup_datetime")]) == len("2016-01-01 00:00:00")
    assert len(generated) == ROWS


def test_ids_are_fresh_and_unique(generated: pd.DataFrame) -> None:
    ids = generated["id"]
    assert ids.is_unique
    assert ids.iloc[0] == "g000000001" and ids.iloc[-1] == f"g{ROWS:09d}"


def test_times_stay_in_2016_h1_and_durations_match_the_clock(generated: pd.DataFrame) -> None:
    pickup = generated["pickup_datetime"]
    assert pickup.min() >= generate.FIRST_PICKUP_MS and pickup.max() <= generate.LAST_PICKUP_MS
    assert (generated["dropoff_datetime"] - pickup == generated["trip_duration"] * 1000).all()
    assert (generated["trip_duration"] >= 1).all()


def test_vendor_and_passenger_mix_match_the_sample(sample: pd.DataFrame, generated: pd.DataFrame) -> None:
    assert generated["vendor_id"].eq(2).mean() == pytest.approx(sample["vendor_id"].eq(2).mean(), abs=0.01)
    real = sample["passenger_count"].value_counts(normalize=True)
    made = generated["passenger_count"].value_counts(normalize=True).reindex(real.index, fill_value=0.0)
    assert np.abs(made - real).max() < 0.01
    flag_real, flag_made = sample["store_and_fwd_flag"].mean(), generated["store_and_fwd_flag"].mean()
    assert flag_made == pytest.approx(flag_real, abs=0.003)


def test_typical_duration_and_distance_match_the_sample(sample: pd.DataFrame, generated: pd.DataFrame) -> None:
    assert generated["trip_duration"].median() == pytest.approx(sample["trip_duration"].median(), rel=0.03)
    assert np.median(distance_km(generated)) == pytest.approx(np.median(distance_km(sample)), rel=0.03)
    vendor_medians = [frame.groupby("vendor_id")["trip_duration"].median() for frame in (sample, generated)]
    assert np.allclose(vendor_medians[1], vendor_medians[0], rtol=0.04)


def test_cleaning_rules_reject_the_same_share_as_in_the_sample(sample: pd.DataFrame, generated: pd.DataFrame) -> None:
    real, made = rejected_share(sample), rejected_share(generated)
    assert made["total"] == pytest.approx(real["total"], abs=0.0025)
    assert made["duration_too_short"] == pytest.approx(real["duration_too_short"], abs=0.002)
    assert made["duration_too_long"] == pytest.approx(real["duration_too_long"], abs=0.001)
    assert made["duration_mismatch"] == real["duration_mismatch"] == 0


def test_chunks_number_ids_across_the_whole_file(sample: pd.DataFrame) -> None:
    chunks = list(generate.generate(sample, rows=25, seed=1, chunk_rows=10))
    assert [len(chunk) for chunk in chunks] == [10, 10, 5]
    ids = pd.concat(chunks)["id"]
    assert list(ids) == [f"g{n:09d}" for n in range(1, 26)]
    again = list(generate.generate(sample, rows=25, seed=1, chunk_rows=10))
    assert all(a.equals(b) for a, b in zip(chunks, again))


def test_resample_returns_a_record_form_trip_frame(sample: pd.DataFrame) -> None:
    trips = generate.resample(sample, 100, np.random.default_rng(0))
    assert list(trips.columns) == list(FIELDS)
    assert trips.dtypes.drop("id").equals(sample.dtypes.drop("id"))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--rows", "0"], "--rows must be between 1 and"),
        (["--rows", "1000000000"], "--rows must be between 1 and"),
        (["--seed", "-1"], "--seed must be zero or positive"),
        (["--out", "trips-{day}.csv"], "only {rows} and {seed}"),
    ],
)
def test_bad_flags_give_a_clear_error(argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        generate.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_a_missing_input_is_reported_not_raised(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = generate.main(["--rows", "10", "--input", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "x.csv")])
    assert code == 2
    assert "no such file" in capsys.readouterr().err
    assert not (tmp_path / "x.csv").exists()


# --- the TLC zone era: the same trips in taxi zones ------------------------------------------------


def test_the_zone_era_layout_holds_the_same_trips_in_the_zones_shapely_finds(tmp_path: Path,
                                                                             generated_file: Path) -> None:
    out = tmp_path / "zones.csv.gz"
    assert generate.main(["--rows", str(ROWS), "--seed", "7", "--out", str(out), "--quiet",
                          "--layout", "yellow_zones"]) == 0
    raw = pd.read_csv(out)
    assert list(raw.columns) == list(generate.ZONE_ERA_COLUMNS) and len(raw) == ROWS
    assert raw[["trip_distance", "fare_amount", "payment_type"]].isna().all().all()
    twin = pd.read_csv(generated_file)  # the same seed and rows in the Kaggle layout: the same trips
    assert (raw["tpep_pickup_datetime"] == twin["pickup_datetime"]).all()
    assert (raw["VendorID"] == twin["vendor_id"]).all() and (raw["passenger_count"] == twin["passenger_count"]).all()
    rows = twin.sample(200, random_state=5).index
    for end, column in (("pickup", "PULocationID"), ("dropoff", "DOLocationID")):
        expected = [zone or generate.UNKNOWN_ZONE for zone in shapely_zones(twin.loc[rows, f"{end}_longitude"],
                                                                              twin.loc[rows, f"{end}_latitude"])]
        assert raw.loc[rows, column].tolist() == expected
    trips, report = read_trips(out, tlc_layouts=True)
    assert report.layout == "yellow_zones" and report.rows_malformed == 0 and len(trips) == ROWS
    assert trips["pickup_longitude"].isna().all() and trips["id"].str.startswith("tlc_").all()
    outside = (raw["PULocationID"] == generate.UNKNOWN_ZONE).mean()
    assert 0 < outside < 0.02  # as few as the sample's pickups outside every zone (0.7 %)
