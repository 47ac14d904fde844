"""The trip-duration model artifact: versions, metadata, loading, metrics, the live pointer.

A model lives in its own version directory and never changes afterwards::

    model/versions/20261122T051400Z/model.joblib    the fitted estimator
    model/versions/20261122T051400Z/metadata.json   what it is and how good
    model/current.json                              {"version": "..."}: the live one

``metadata.json`` says everything needed to trust or reject the model: its
version, the feature list it was trained on, the training-data fingerprint,
hold-out metrics and library versions. ``load_model`` refuses a model whose
feature list differs from ``periscope.features.FEATURES`` — a silent
training/serving skew is worse than a clear error. ``promote`` switches
``current.json`` atomically; the speed layers pick the switch up while running.
"""
from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import joblib
import numpy as np

from periscope.features import FEATURES, build_features, duration_from_target
from periscope.schema import FIELDS, first_broken_rule
from periscope.storage import atomic_write_json, read_json

POINTER = "current.json"
ZONE_FIELDS = ("pickup_location_id", "dropoff_location_id")
"""Where a trip has them, the cleaning rules place a trip without coordinates by its zones."""


class ModelNotFoundError(FileNotFoundError):
    """No trained model yet (the message says which command makes one)."""


class ModelMismatchError(RuntimeError):
    """The model was trained on other features than this code computes."""


@dataclass
class TripDurationModel:
    """A fitted estimator plus its metadata; predicts seconds from record-form trips."""

    estimator: Any
    metadata: dict[str, Any]

    @property
    def version(self) -> str:
        return self.metadata["version"]

    def predict_seconds(self, trips: Any) -> np.ndarray:
        """Predicted trip durations in seconds (float64), one per trip."""
        if len(trips["pickup_datetime"]) == 0:
            return np.empty(0)
        return duration_from_target(self.estimator.predict(build_features(trips)))


def metrics(actual_s: np.ndarray, predicted_s: np.ndarray) -> dict[str, float]:
    """RMSLE (the Kaggle metric), MAE and RMSE in seconds, and the row count."""
    actual = np.asarray(actual_s, dtype=np.float64)
    predicted = np.asarray(predicted_s, dtype=np.float64)
    if len(actual) == 0:
        return {"rmsle": float("nan"), "mae": float("nan"), "rmse": float("nan"), "rows": 0}
    error = predicted - actual
    log_error = np.log1p(predicted) - np.log1p(actual)
    return {
        "rmsle": float(np.sqrt(np.mean(log_error**2))),
        "mae": float(np.mean(np.abs(error))),
        "rmse": float(np.sqrt(np.mean(error**2))),
        "rows": int(len(actual)),
    }


def labelled_metrics(model: TripDurationModel, trips: Any,
                     groups: Any = None) -> dict[str, Any]:
    """``metrics`` over every labelled trip (the Kaggle definition), and, suffixed ``_clean``, over
    those passing the cleaning rules: a model's hold-out metrics and ``--evaluate``.

    With ``groups`` (one label per trip, e.g. its service and era), the same
    metrics per label come under ``"by_group"``, labels in sorted order.
    """
    keep = (trips["trip_duration"] >= 0).to_numpy()
    labelled = trips[keep]
    actual, predicted = labelled["trip_duration"].to_numpy(), model.predict_seconds(labelled)
    rule_inputs = [name for name in FIELDS[1:] + ZONE_FIELDS if name in labelled]
    clean = first_broken_rule({name: labelled[name].to_numpy() for name in rule_inputs}) < 0
    result: dict[str, Any] = _with_clean(actual, predicted, clean)
    if groups is not None:
        labels = np.asarray(groups, dtype=object)[keep]
        result["by_group"] = {str(label): _with_clean(actual[labels == label], predicted[labels == label],
                                                      clean[labels == label])
                              for label in sorted(set(labels))}
    return result


def _with_clean(actual: np.ndarray, predicted: np.ndarray, clean: np.ndarray) -> dict[str, float]:
    result = metrics(actual, predicted)
    for name, value in metrics(actual[clean], predicted[clean]).items():
        result[f"{name}_clean"] = value
    return result


def library_versions() -> dict[str, str]:
    """The versions an artifact records, to explain a model that behaves differently elsewhere."""
    import pandas
    import sklearn

    return {
        "python": platform.python_version(),
        "scikit-learn": sklearn.__version__,
        "numpy": np.__version__,
        "pandas": pandas.__version__,
        "joblib": joblib.__version__,
    }


def version_dir(model_dir: Path, version: str) -> Path:
    return Path(model_dir) / "versions" / version


def list_versions(model_dir: Path) -> list[str]:
    """Every saved model version, oldest first."""
    root = Path(model_dir) / "versions"
    return sorted(path.name for path in root.iterdir() if (path / "metadata.json").exists()) if root.exists() else []


def current_version(model_dir: Path) -> str | None:
    pointer = Path(model_dir) / POINTER
    return read_json(pointer)["version"] if pointer.exists() else None


def save_model(estimator: Any, metadata: dict[str, Any], model_dir: Path) -> Path:
    """Write a new version directory: estimator first, metadata last (it marks the version
    complete). A version never changes: an existing one is refused."""
    directory = version_dir(model_dir, metadata["version"])
    if directory.exists():
        raise FileExistsError(f"model version {metadata['version']!r} already exists in "
                              f"{model_dir}: a version never changes, choose another name")
    directory.mkdir(parents=True)
    joblib.dump(estimator, directory / "model.joblib", compress=3)
    metadata = {**metadata, "model_bytes": (directory / "model.joblib").stat().st_size}
    atomic_write_json(directory / "metadata.json", metadata)
    return directory


def promote(model_dir: Path, version: str) -> None:
    """Make ``version`` the live model: an atomic switch of ``current.json``."""
    if not (version_dir(model_dir, version) / "metadata.json").exists():
        raise ModelNotFoundError(f"no model version {version!r} in {model_dir}")
    atomic_write_json(Path(model_dir) / POINTER, {"version": version})


def read_metadata(model_dir: Path, version: str | None = None) -> dict[str, Any]:
    version = version or current_version(model_dir)
    if version is None:
        raise ModelNotFoundError(f"no trained model in {model_dir}: run `python train_model.py`")
    return read_json(version_dir(model_dir, version) / "metadata.json")


def load_model(model_dir: Path, version: str | None = None) -> TripDurationModel:
    """Load the live model (or ``version``), checking its features against this code."""
    metadata = read_metadata(model_dir, version)
    trained_on = list(metadata.get("features", []))
    if trained_on != list(FEATURES):
        missing = [name for name in FEATURES if name not in trained_on]
        extra = [name for name in trained_on if name not in FEATURES]
        raise ModelMismatchError(
            f"model {metadata.get('version')} in {model_dir} was trained on other features than "
            f"periscope.features computes (missing from the model: {missing or 'none'}; "
            f"unknown to the code: {extra or 'none'}; order differs: {not missing and not extra}). "
            "Retrain it with `python train_model.py`."
        )
    estimator = joblib.load(version_dir(model_dir, metadata["version"]) / "model.joblib")
    return TripDurationModel(estimator=estimator, metadata=metadata)
