"""train_model.py: a real model on real data, its metadata, --evaluate, clear errors."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import train_model
from periscope import training_data
from periscope.features import FEATURES
from periscope.model import ModelMismatchError, ModelNotFoundError, current_version, load_model, read_metadata
from periscope.schema import first_broken_rule
from periscope.storage import atomic_write_json
from tests.conftest import TLC_DIR

ZONE_MONTHS = sorted(TLC_DIR.glob("yellow_tripdata_sample_20*.csv.gz"))
HELD_OUT_MONTHS = [path for path in ZONE_MONTHS if path.name[-9:-7] in ("02", "04", "06", "08", "10", "12")]
"""Zone-era yellow months a mix model never sees: the even months of 2020 (the odd ones, January
2018 and the head of January 2021 train it)."""
TRAINED_MONTHS = [path for path in ZONE_MONTHS if path not in HELD_OUT_MONTHS]


@pytest.fixture(scope="module")
def mix_model_dir(tmp_path_factory, sample_csv) -> Path:
    """A model trained on a mix of eras: the Kaggle sample, zone-era yellow months (a glob and
    files), and coordinate-era TLC heads."""
    model_dir = tmp_path_factory.mktemp("mix-model")
    argv = ["--model-dir", str(model_dir), "--version", "mix", "--input", str(sample_csv),
            "--input", str(TLC_DIR / "yellow_tripdata_sample_2020-*[13579].csv.gz"),
            "--input", str(TLC_DIR / "yellow_tripdata_sample_2018-01.csv.gz"),
            "--input", str(TLC_DIR / "yellow_tripdata_2021-01_head.csv.gz"),
            "--input", str(TLC_DIR / "yellow_tripdata_2015-01_head.csv"),
            "--input", str(TLC_DIR / "green_tripdata_2020-04_1000rows.csv")]
    assert train_model.main(argv) == 0
    return model_dir


def _raw_trips(path: Path) -> pd.DataFrame:
    """A shipped TLC zone-era CSV as plain pandas reads it: times, zones, duration in seconds."""
    raw = pd.read_csv(path)
    raw.columns = [c.lower() for c in raw.columns]
    times = {"pickup": next(c for c in raw if "pickup_datetime" in c),
             "dropoff": next(c for c in raw if "dropoff_datetime" in c)}
    pickup, dropoff = (pd.to_datetime(raw[times[end]], format="%Y-%m-%d %H:%M:%S", errors="coerce")
                       for end in ("pickup", "dropoff"))  # NaT: a last line cut part-way
    return raw.assign(duration=(dropoff - pickup).dt.total_seconds(), year=pickup.dt.year)


def test_training_writes_a_live_model_with_metadata(trained_model_dir, sample_csv, sample_raw):
    assert current_version(trained_model_dir) == "test-v1"
    meta = read_metadata(trained_model_dir)
    assert meta["features"] == list(FEATURES)
    assert meta["training_data"]["rows_read"] == len(sample_raw)
    assert meta["training_data"]["sha256"] == hashlib.sha256(sample_csv.read_bytes()).hexdigest()
    assert meta["training_data"]["split"] == "random"
    assert {"scikit-learn", "numpy", "pandas", "python"} <= set(meta["libraries"])
    holdout = meta["holdout_metrics"]
    assert holdout["rows"] == meta["training_data"]["holdout_rows"] == round(len(sample_raw) * 0.2)
    assert meta["training_data"]["train_rows"] == len(sample_raw) - holdout["rows"]
    assert holdout["rmsle"] <= 0.42, "quality bar: RMSLE <= 0.42 on held-out real trips"
    assert holdout["rmsle_clean"] < holdout["rmsle"]
    assert meta["model_bytes"] <= 50e6


def test_evaluate_json_on_the_held_out_real_trips(trained_model_dir, capsys):
    holdout_csv = trained_model_dir / "versions" / "test-v1" / "holdout.csv.gz"
    assert train_model.main(["--model-dir", str(trained_model_dir), "--evaluate", str(holdout_csv), "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert {"rmsle", "mae", "rmse", "rows"} <= set(result)
    meta = read_metadata(trained_model_dir)["holdout_metrics"]
    assert result["rows"] == meta["rows"]
    assert result["rmsle"] == pytest.approx(meta["rmsle"], rel=1e-6)
    assert result["rmsle"] <= 0.42


def test_model_predicts_plausible_durations(trained_model_dir, sample_trips):
    model = load_model(trained_model_dir)
    predicted = model.predict_seconds(sample_trips.head(1000))
    assert predicted.shape == (1000,)
    assert 300 < np.median(predicted) < 1200
    assert model.predict_seconds(sample_trips.head(0)).shape == (0,)


def test_a_model_with_other_features_refuses_to_load(trained_model_dir, tmp_path, capsys):
    model_dir = tmp_path / "model"
    shutil.copytree(trained_model_dir, model_dir)
    meta_path = model_dir / "versions" / "test-v1" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["features"] = meta["features"][:-1] + ["surge_multiplier"]
    atomic_write_json(meta_path, meta)
    with pytest.raises(ModelMismatchError, match="surge_multiplier.*Retrain"):
        load_model(model_dir)
    assert train_model.main(["--model-dir", str(model_dir), "--evaluate", str(model_dir / "versions/test-v1/holdout.csv.gz")]) == 2
    assert "trained on other features" in capsys.readouterr().err


def test_no_model_yet_says_which_command_makes_one(tmp_path, sample_csv, capsys):
    with pytest.raises(ModelNotFoundError, match="python train_model.py"):
        load_model(tmp_path)
    assert train_model.main(["--model-dir", str(tmp_path), "--evaluate", str(sample_csv)]) == 2
    assert "run `python train_model.py`" in capsys.readouterr().err


def test_no_promote_keeps_the_live_version(trained_model_dir, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(trained_model_dir, model_dir)
    small = model_dir / "versions" / "test-v1" / "holdout.csv.gz"
    assert train_model.main(["--model-dir", str(model_dir), "--input", str(small), "--version", "candidate",
                             "--no-promote", "--model", "random-forest", "--no-save-holdout"]) == 0
    assert current_version(model_dir) == "test-v1"
    assert read_metadata(model_dir, "candidate")["model"] == "random-forest"


@pytest.mark.parametrize("argv, message", [
    (["--holdout-fraction", "0"], "--holdout-fraction must be in (0, 0.9]"),
    (["--json"], "--json only applies to --evaluate"),
    (["--model", "xgboost"], "invalid choice: 'xgboost'"),
    (["--zone-only-share", "1"], "--zone-only-share must be in [0, 1)"),
    (["--input", "a.csv", "--from-master", "m"], "choose one"),
])
def test_bad_flags_say_what_would_be_right(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        train_model.main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_retraining_on_master_data_promotes_only_if_better(trained_model_dir, tmp_path, capsys):
    """--from-master --split id --promote-if-better: both models scored on trips neither trained on."""
    import batch_processor

    model_dir, master = tmp_path / "model", tmp_path / "master"
    shutil.copytree(trained_model_dir, model_dir)
    batch_processor.import_csv(model_dir / "versions" / "test-v1" / "holdout.csv.gz", master)
    argv = ["--model-dir", str(model_dir), "--from-master", str(master), "--split", "id", "--promote-if-better"]
    assert train_model.main([*argv, "--version", "small"]) == 0
    decision = json.loads((model_dir / "versions" / "small" / "decision.json").read_text())
    assert decision["previous_live"] == "test-v1" and decision["candidate"] == "small"
    assert "seen by neither" in decision["holdout"]
    assert decision["scores"]["small"]["rows"] == decision["scores"]["test-v1"]["rows"] == decision["holdout_rows"]
    better = decision["scores"]["small"]["rmsle"] < decision["scores"]["test-v1"]["rmsle"]
    assert decision["promoted"] == better and current_version(model_dir) == decision["live"]
    assert decision["live"] == ("small" if better else "test-v1")
    assert "why: hold-out RMSLE" in capsys.readouterr().out
    meta = read_metadata(model_dir, "small")["training_data"]
    assert meta["split"] == "id" and meta["master_files"] == 1 and len(meta["sha256"]) == 64

    assert train_model.main([*argv, "--version", "same-split", "--min-improvement", "0.5"]) == 0
    again = json.loads((model_dir / "versions" / "same-split" / "decision.json").read_text())
    if decision["promoted"]:  # both trained with --split id: the live model held out the same trips
        assert again["holdout"].startswith("the candidate's hold-out (the live model held out the same")
    assert not again["promoted"] and "not better by more than 0.5" in again["reason"]


def test_the_id_split_keeps_replayed_copies_together_and_is_stable():
    ids = [f"id{n}" for n in range(2000)]
    held = training_data.id_holdout_mask(ids + [i + "-2" for i in ids], 0.2, seed=42)
    assert (held[:2000] == held[2000:]).all()
    assert 0.15 < held[:2000].mean() < 0.25
    assert (training_data.id_holdout_mask(ids[:500], 0.2, seed=42) == held[:500]).all()
    assert training_data.base_id("id12-3") == "id12" and training_data.base_id("id12") == "id12"


def test_retraining_flags_that_contradict_are_refused(capsys):
    with pytest.raises(SystemExit):
        train_model.main(["--promote-if-better", "--no-promote"])
    assert "contradict" in capsys.readouterr().err
    assert train_model.main(["--from-master", "/nonexistent/master"]) == 2
    assert "no master data in /nonexistent/master" in capsys.readouterr().err


def test_training_on_a_mix_of_eras_counts_every_file_and_era(mix_model_dir, sample_raw):
    meta = read_metadata(mix_model_dir)["training_data"]
    files = [Path(entry["file"]).name for entry in meta["files"]]
    expected_files = ["nyc_taxi_trip_duration_sample.csv.gz"] + [p.name for p in TRAINED_MONTHS
                                                                   if p.name != "yellow_tripdata_sample_2018-01.csv.gz"]
    assert files[:len(expected_files)] == expected_files  # the glob, sorted, after the Kaggle file
    assert files[len(expected_files):] == ["yellow_tripdata_sample_2018-01.csv.gz", "yellow_tripdata_2021-01_head.csv.gz",
                                           "yellow_tripdata_2015-01_head.csv", "green_tripdata_2020-04_1000rows.csv"]
    eras = meta["trips_by_era"]
    assert eras["yellow 2016 coordinates"] == len(sample_raw)
    head = TLC_DIR / "yellow_tripdata_2021-01_head.csv.gz"  # some of its trips began in 2020
    raw = pd.concat([_raw_trips(p) for p in TRAINED_MONTHS + [head]], ignore_index=True)
    raw = raw[raw["duration"] >= 0]
    assert eras["yellow 2020 zones"] == int((raw["year"] == 2020).sum())
    assert eras["yellow 2018 zones"] == int((raw["year"] == 2018).sum())
    coordinates = pd.read_csv(TLC_DIR / "yellow_tripdata_2015-01_head.csv").dropna(how="all")
    assert eras["yellow 2015 coordinates"] == len(coordinates)
    assert sum(eras.values()) == meta["train_rows"] + meta["holdout_rows"]


def test_the_hold_out_of_a_mix_is_scored_per_era_and_written_per_kind(mix_model_dir, capsys):
    version = mix_model_dir / "versions" / "mix"
    metrics = read_metadata(mix_model_dir)["holdout_metrics"]
    assert {"yellow 2016 coordinates", "yellow 2020 zones", "green 2020 zones"} <= set(metrics["by_group"])
    assert sum(m["rows"] for m in metrics["by_group"].values()) == metrics["rows"]
    zone_rows = 0
    for name in ("holdout_yellow_zones.csv.gz", "holdout_green_zones.csv.gz"):
        assert train_model.main(["--model-dir", str(mix_model_dir), "--evaluate", str(version / name),
                                 "--json"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert all(era.endswith(" zones") for era in result["by_era"])
        for era, m in result["by_era"].items():
            assert m["rows"] == metrics["by_group"][era]["rows"]
            assert m["rmsle"] == pytest.approx(metrics["by_group"][era]["rmsle"], rel=1e-5)
        zone_rows += result["rows"]
    assert zone_rows == sum(m["rows"] for era, m in metrics["by_group"].items() if era.endswith(" zones"))


def test_the_quality_bars_hold_on_months_and_trips_the_model_never_saw(mix_model_dir, capsys):
    """Zone era: RMSLE <= 0.45 over the clean trips of every held-out yellow month; Kaggle:
    RMSLE <= 0.42 over the held-out Kaggle trips."""
    for path in HELD_OUT_MONTHS:
        assert train_model.main(["--model-dir", str(mix_model_dir), "--evaluate", str(path), "--json"]) == 0
        result = json.loads(capsys.readouterr().out)
        raw = _raw_trips(path)
        assert result["rows"] == int((raw["duration"] >= 0).sum())
        assert list(result["by_era"]) == [f"yellow {y} zones" for y in sorted(raw["year"].unique())]
        assert result["rmsle_clean"] <= 0.45, f"{path.name}: RMSLE {result['rmsle_clean']:.4f} on clean trips"
    kaggle = read_metadata(mix_model_dir)["holdout_metrics"]["by_group"]["yellow 2016 coordinates"]
    assert kaggle["rmsle"] <= 0.42


def test_the_default_model_also_predicts_trips_known_by_zones_only(trained_model_dir, capsys):
    """Trained on the Kaggle sample alone, a fifth of it learnt by zones only: zone-only trips of
    2018 (two years on, before the pandemic) still come out close to the Kaggle bar."""
    path = TLC_DIR / "yellow_tripdata_sample_2018-01.csv.gz"
    assert train_model.main(["--model-dir", str(trained_model_dir), "--evaluate", str(path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    raw = _raw_trips(path)
    rules = {"vendor_id": raw["vendor_id"].fillna(-1).to_numpy(), "passenger_count":
             raw["passenger_count"].fillna(-1).to_numpy(), "trip_duration": raw["duration"].to_numpy(),
             "pickup_datetime": pd.to_datetime(raw["pickup_datetime"]).astype("int64").to_numpy() // 10**6,
             "dropoff_datetime": pd.to_datetime(raw["dropoff_datetime"]).astype("int64").to_numpy() // 10**6,
             "pickup_location_id": raw["pickup_location_id"].to_numpy(),
             "dropoff_location_id": raw["dropoff_location_id"].to_numpy()}
    rules.update({f"{end}_{axis}": np.full(len(raw), np.nan) for end in ("pickup", "dropoff")
                  for axis in ("longitude", "latitude")})
    assert result["rows_clean"] == int((first_broken_rule(rules) < 0).sum())
    assert result["rmsle_clean"] <= 0.45
    assert not np.isnan(result["rmsle"])


def test_input_globs_expand_sorted_each_file_once_and_an_empty_glob_is_one_line(tmp_path, capsys):
    for name in ("b.csv", "a.csv", "c.txt"):
        (tmp_path / name).write_text("x\n")
    named = training_data.input_files([str(tmp_path / "*.csv"), str(tmp_path / "a.csv")])
    assert named == sorted(p for p in tmp_path.iterdir() if p.suffix == ".csv")
    assert train_model.main(["--input", str(tmp_path / "none-*.csv"), "--model-dir", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "none-*.csv: no file matches" in err[0]
    assert not (tmp_path / "m").exists()
