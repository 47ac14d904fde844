"""Mergeable view aggregates: what the batch and speed layers both compute.

A view is a small table: key columns (for example pickup date and hour) and,
per key, the trip count plus sum, sum of squares, min and max of each
measure. Those aggregates *add up*: the view of two sets of trips is the
merge of their views, exactly, because every measure is an integer (seconds,
metres). That is the property the Lambda architecture rests on — the serving
layer adds the speed layer's view of recent trips to the batch view of
everything older and gets what a full recompute would give. Averages and
standard deviations are derived at the end (``finalise``), never stored.

Everything is keyed by the trip's *event time* (pickup), never by when it
was processed.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd

from periscope.features import time_parts
from periscope.schema import haversine_km

MEASURES: tuple[str, ...] = ("duration_s", "distance_m")
STATS: tuple[str, ...] = ("sum", "sumsq", "min", "max")
AGGREGATES: tuple[str, ...] = ("trips",) + tuple(f"{m}_{s}" for m in MEASURES for s in STATS)

GRID_DEG = 0.005
"""Pickup-density cell size: about 560 m north-south, 420 m east-west in NYC."""

DISTANCE_BANDS_KM: tuple[float, ...] = (1, 2, 5, 10, 20)
DISTANCE_BAND_LABELS: tuple[str, ...] = ("<1 km", "1-2 km", "2-5 km", "5-10 km", "10-20 km", "20+ km")

VIEWS: dict[str, tuple[str, ...]] = {
    "hourly_stats": ("pickup_date", "pickup_hour"),
    "daily_summary": ("pickup_date",),
    "vendor_stats": ("vendor_id",),
    "hour_of_week": ("pickup_weekday", "pickup_hour"),
    "distance_bands": ("distance_band",),
    "pickup_grid": ("grid_lat", "grid_lon"),
}
"""View name -> key columns. Every view holds ``AGGREGATES`` per key."""

KEY_DTYPES: dict[str, str] = {
    "pickup_date": "datetime64[ns]",
    "pickup_hour": "int64",
    "pickup_weekday": "int64",
    "vendor_id": "int64",
    "distance_band": "int64",
    "grid_lat": "int64",
    "grid_lon": "int64",
}


def trip_facts(trips: Mapping[str, Any]) -> pd.DataFrame:
    """Per-trip keys and integer measures, from clean record-form trips."""
    pickup = np.asarray(trips["pickup_datetime"], dtype=np.int64)
    when = time_parts(pickup)
    lat, lon = np.asarray(trips["pickup_latitude"]), np.asarray(trips["pickup_longitude"])
    km = haversine_km(lat, lon, np.asarray(trips["dropoff_latitude"]), np.asarray(trips["dropoff_longitude"]))
    duration = np.asarray(trips["trip_duration"], dtype=np.int64)
    distance = np.rint(km * 1000).astype(np.int64)
    return pd.DataFrame(
        {
            "pickup_date": (pickup // 86_400_000).astype("datetime64[D]").astype("datetime64[ns]"),
            "pickup_hour": when["hour"].astype(np.int64),
            "pickup_weekday": when["weekday"].astype(np.int64),
            "vendor_id": np.asarray(trips["vendor_id"], dtype=np.int64),
            "distance_band": np.searchsorted(DISTANCE_BANDS_KM, km, side="right").astype(np.int64),
            "grid_lat": np.floor(lat / GRID_DEG).astype(np.int64),
            "grid_lon": np.floor(lon / GRID_DEG).astype(np.int64),
            "duration_s": duration,
            "duration_s_sq": duration * duration,
            "distance_m": distance,
            "distance_m_sq": distance * distance,
        }
    )


def empty_view(name: str) -> pd.DataFrame:
    """A zero-row view with the right columns and dtypes."""
    columns = {key: pd.Series(dtype=KEY_DTYPES[key]) for key in VIEWS[name]}
    columns.update({agg: pd.Series(dtype="int64") for agg in AGGREGATES})
    return pd.DataFrame(columns)


def _aggregate_view(facts: pd.DataFrame, keys: tuple[str, ...]) -> pd.DataFrame:
    spec: dict[str, tuple[str, str]] = {"trips": ("duration_s", "size")}
    for measure in MEASURES:
        spec[f"{measure}_sum"] = (measure, "sum")
        spec[f"{measure}_sumsq"] = (f"{measure}_sq", "sum")
        spec[f"{measure}_min"] = (measure, "min")
        spec[f"{measure}_max"] = (measure, "max")
    view = facts.groupby(list(keys), sort=True).agg(**spec).reset_index()
    return view.astype({agg: "int64" for agg in AGGREGATES})


def aggregate(trips: Mapping[str, Any]) -> dict[str, pd.DataFrame]:
    """Every view of a set of clean trips (record-form columns)."""
    if len(trips["trip_duration"]) == 0:
        return {name: empty_view(name) for name in VIEWS}
    facts = trip_facts(trips)
    return {name: _aggregate_view(facts, keys) for name, keys in VIEWS.items()}


def merge_view(name: str, parts: Iterable[pd.DataFrame]) -> pd.DataFrame:
    """Add up several versions of one view: counts and sums add, min/max combine."""
    frames = [part for part in parts if len(part)]
    if not frames:
        return empty_view(name)
    keys = list(VIEWS[name])
    how = {agg: ("min" if agg.endswith("_min") else "max" if agg.endswith("_max") else "sum") for agg in AGGREGATES}
    merged = pd.concat(frames, ignore_index=True).groupby(keys, sort=True).agg(how).reset_index()
    return merged.astype({**{key: KEY_DTYPES[key] for key in keys}, **{agg: "int64" for agg in AGGREGATES}})


def merge(*view_sets: Mapping[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """Merge whole sets of views (for example batch + speed), view by view."""
    return {name: merge_view(name, (views[name] for views in view_sets if name in views)) for name in VIEWS}


def finalise(view: pd.DataFrame) -> pd.DataFrame:
    """Add mean and sample standard deviation of each measure, for display."""
    out = view.copy()
    trips = out["trips"].to_numpy(dtype=np.float64)
    for measure in MEASURES:
        total = out[f"{measure}_sum"].to_numpy(dtype=np.float64)
        squares = out[f"{measure}_sumsq"].to_numpy(dtype=np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[f"{measure}_mean"] = total / trips
            variance = (squares - total * total / trips) / (trips - 1)
        out[f"{measure}_std"] = np.where(trips > 1, np.sqrt(np.maximum(variance, 0.0)), np.nan)
    if "distance_band" in out:
        out["distance_band_label"] = [DISTANCE_BAND_LABELS[band] for band in out["distance_band"]]
    if "grid_lat" in out:
        out["latitude"] = (out["grid_lat"] + 0.5) * GRID_DEG
        out["longitude"] = (out["grid_lon"] + 0.5) * GRID_DEG
    return out


def views_equal(left: Mapping[str, pd.DataFrame], right: Mapping[str, pd.DataFrame]) -> bool:
    """Exact equality of two view sets (same keys, same integer aggregates)."""
    for name in VIEWS:
        a = left[name].reset_index(drop=True)
        b = right[name].reset_index(drop=True)
        if not a.equals(b):
            return False
    return True
