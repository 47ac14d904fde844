"""Feature engineering for the trip-duration model: one code path for
training (``train_model.py``) and inference (both speed layers).

Only what is known when the passenger gets in is used: pickup time and place,
the destination they give, the vendor and the number of passengers. Never the
dropoff time, the duration, or ``store_and_fwd_flag`` (which is only known
when the trip record is uploaded).

The input is any mapping of record-form columns (a trip frame, or a dict of
numpy arrays): times as int64 ms of New York wall clock. The output is a
float32 matrix whose columns are ``FEATURES``, in that order. Everything is
plain numpy on whole columns, so one core turns hundreds of thousands of
trips per second into features.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from periscope.schema import haversine_km

FEATURES: tuple[str, ...] = (
    "vendor_id",
    "passenger_count",
    "pickup_longitude",
    "pickup_latitude",
    "dropoff_longitude",
    "dropoff_latitude",
    "distance_km",
    "grid_distance_km",
    "bearing_deg",
    "pickup_hour",
    "pickup_weekday",
    "pickup_day_of_year",
    "pickup_hour_of_week",
    "pickup_avenue_axis",
    "pickup_street_axis",
    "dropoff_avenue_axis",
    "dropoff_street_axis",
)
"""Model inputs, in column order. A model trained on another list will not load."""

MANHATTAN_GRID_DEG = 29.0
"""Manhattan's street grid is rotated about 29 degrees from true north."""

_MS_PER_DAY = 86_400_000
_THETA = np.radians(MANHATTAN_GRID_DEG)
_KM_PER_DEG_LAT = 111.2


def _grid_axes(lon: np.ndarray, lat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates rotated onto Manhattan's avenues and streets."""
    return (
        lon * np.cos(_THETA) - lat * np.sin(_THETA),
        lon * np.sin(_THETA) + lat * np.cos(_THETA),
    )


def _bearing_deg(lat1: np.ndarray, lon1: np.ndarray, lat2: np.ndarray, lon2: np.ndarray) -> np.ndarray:
    lat1, lon1, lat2, lon2 = (np.radians(v) for v in (lat1, lon1, lat2, lon2))
    dlon = lon2 - lon1
    y = np.sin(dlon) * np.cos(lat2)
    x = np.cos(lat1) * np.sin(lat2) - np.sin(lat1) * np.cos(lat2) * np.cos(dlon)
    return np.degrees(np.arctan2(y, x))


def _grid_distance_km(lat1: np.ndarray, lon1: np.ndarray, lat2: np.ndarray, lon2: np.ndarray) -> np.ndarray:
    """Walking-the-blocks distance: |avenue leg| + |street leg| on the rotated grid."""
    north = (lat2 - lat1) * _KM_PER_DEG_LAT
    east = (lon2 - lon1) * _KM_PER_DEG_LAT * np.cos(np.radians((lat1 + lat2) / 2))
    along = east * np.cos(_THETA) - north * np.sin(_THETA)
    across = east * np.sin(_THETA) + north * np.cos(_THETA)
    return np.abs(along) + np.abs(across)


def time_parts(pickup_ms: np.ndarray) -> dict[str, np.ndarray]:
    """Calendar parts of wall-clock ms: fractional hour, weekday (Mon=0), day of year (1..366)."""
    pickup_ms = np.asarray(pickup_ms, dtype=np.int64)
    days = pickup_ms // _MS_PER_DAY
    dates = days.astype("datetime64[D]")
    return {
        "hour": (pickup_ms % _MS_PER_DAY) / 3_600_000.0,
        "weekday": (days + 3) % 7,
        "day_of_year": (dates - dates.astype("datetime64[Y]")).astype(np.int64) + 1,
    }


def build_features(trips: Mapping[str, Any]) -> np.ndarray:
    """The ``(n, len(FEATURES))`` float32 feature matrix for record-form trips."""
    col = {name: np.asarray(trips[name], dtype=np.float64) for name in
           ("pickup_longitude", "pickup_latitude", "dropoff_longitude", "dropoff_latitude")}
    plon, plat = col["pickup_longitude"], col["pickup_latitude"]
    dlon, dlat = col["dropoff_longitude"], col["dropoff_latitude"]
    when = time_parts(trips["pickup_datetime"])
    p_avenue, p_street = _grid_axes(plon, plat)
    d_avenue, d_street = _grid_axes(dlon, dlat)
    values = {
        "vendor_id": np.asarray(trips["vendor_id"]),
        "passenger_count": np.asarray(trips["passenger_count"]),
        "pickup_longitude": plon,
        "pickup_latitude": plat,
        "dropoff_longitude": dlon,
        "dropoff_latitude": dlat,
        "distance_km": haversine_km(plat, plon, dlat, dlon),
        "grid_distance_km": _grid_distance_km(plat, plon, dlat, dlon),
        "bearing_deg": _bearing_deg(plat, plon, dlat, dlon),
        "pickup_hour": when["hour"],
        "pickup_weekday": when["weekday"],
        "pickup_day_of_year": when["day_of_year"],
        "pickup_hour_of_week": when["weekday"] * 24 + np.floor(when["hour"]),
        "pickup_avenue_axis": p_avenue,
        "pickup_street_axis": p_street,
        "dropoff_avenue_axis": d_avenue,
        "dropoff_street_axis": d_street,
    }
    matrix = np.empty((len(plon), len(FEATURES)), dtype=np.float32)
    for index, name in enumerate(FEATURES):
        matrix[:, index] = values[name]
    return matrix


def target(trip_duration: Any) -> np.ndarray:
    """Training target: log(1 + seconds), so squared error is the Kaggle RMSLE."""
    return np.log1p(np.asarray(trip_duration, dtype=np.float64))


def duration_from_target(prediction: np.ndarray) -> np.ndarray:
    """Inverse of ``target``: predicted seconds, never negative."""
    return np.maximum(np.expm1(prediction), 0.0)
