"""Shared fixtures: the real shipped sample, a model trained once per session."""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from periscope.sources import read_trips  # noqa: E402

SAMPLE_CSV = ROOT / "data" / "nyc_taxi_trip_duration_sample.csv.gz"


@pytest.fixture(scope="session")
def sample_csv() -> Path:
    return SAMPLE_CSV


@pytest.fixture(scope="session")
def sample_trips() -> pd.DataFrame:
    """Every well-formed trip of the real sample, in record form."""
    trips, report = read_trips(SAMPLE_CSV)
    assert report.rows_malformed == 0
    return trips


@pytest.fixture(scope="session")
def trained_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model trained for real on the shipped sample, once per test session."""
    import train_model

    model_dir = tmp_path_factory.mktemp("model")
    assert train_model.main(["--model-dir", str(model_dir), "--version", "test-v1"]) == 0
    return model_dir
