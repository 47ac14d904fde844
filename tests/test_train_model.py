"""train_model.py: a real model on real data, its metadata, --evaluate, clear errors."""
from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest

import train_model
from periscope import training_data
from periscope.features import FEATURES
from periscope.model import ModelMismatchError, ModelNotFoundError, current_version, load_model, read_metadata
from periscope.storage import atomic_write_json


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
