"""Mergeable view aggregates: what the batch and speed layers both compute.

A view is a small table: key columns (for example pickup date and hour) and,
per key, the trip count plus sum, sum of squares, min and max of each
measure, and the revenue the source recorded (fare, tip, total: how many
trips recorded each and the sum of their cents; a Kaggle trip records none).
Those aggregates *add up*: the view of two sets of trips is the merge of
their views, exactly, because every measure is an integer (seconds, metres,
cents). That is the property the Lambda architecture rests on — the serving
layer adds the speed layer's view of recent trips to the batch view of
everything older and gets what a full recompute would give. Averages and
standard deviations are derived at the end (``finalise``), never stored.

Everything is keyed by the trip's *event time* (pickup), never by when it
was processed.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import Any

import numpy as np
import pandas as pd
import polars as pl

from periscope import zones
from periscope.expressions import Expr, bucket, evaluate, field, floor, isnan, rint, to_int, where
from periscope.schema import great_circle_km

MEASURES: tuple[str, ...] = ("duration_s", "distance_m")
STATS: tuple[str, ...] = ("sum", "sumsq", "min", "max")
REVENUE: dict[str, str] = {"fare": "fare_amount", "tip": "tip_amount", "total": "total_amount"}
"""Revenue aggregate -> the trip field (dollars, nullable) it sums."""
SUMS: dict[str, str] = {aggregate: fact for name in REVENUE
                        for aggregate, fact in ((f"{name}_trips", f"{name}_recorded"),
                                                (f"{name}_cents_sum", f"{name}_cents"))}
"""Aggregates that are plain sums of a per-trip fact: how many trips recorded each revenue field
(``<name>_recorded`` is 1 or 0), and the sum of its cents over them (``<name>_cents``, 0 if not)."""
AGGREGATES: tuple[str, ...] = ("trips",) + tuple(f"{m}_{s}" for m in MEASURES for s in STATS) + tuple(SUMS)

MS_PER_DAY = 86_400_000
NS_PER_DAY = MS_PER_DAY * 1_000_000

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
    "zone_daily": ("pickup_date", "pickup_zone"),
    "borough_flows": ("pickup_date", "pickup_borough", "dropoff_borough"),
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
    "pickup_zone": "int64",
    "pickup_borough": "int64",
    "dropoff_borough": "int64",
}


@lru_cache(maxsize=1)
def fact_expressions() -> dict[str, Expr]:
    """Per-trip keys and integer measures of a clean trip, as expressions (``periscope.expressions``)
    that the python engine evaluates with numpy and the Spark engine as Spark columns.

    ``pickup_date`` is a day number here (days since 1970-01-01); the views turn
    it into a date once, after grouping. A trip known by its taxi zones only is
    placed at their centroids (``zones.place_of``; the zone table is read on first use). Zones
    and boroughs are ``zones.zone_key`` and ``zones.borough_of``: 0 for a trip with no zone.
    """
    pickup = field("pickup_datetime")
    days = pickup // MS_PER_DAY
    lon, lat = zones.place_of("pickup")
    dropoff_lon, dropoff_lat = zones.place_of("dropoff")
    km = great_circle_km(lat, lon, dropoff_lat, dropoff_lon)
    pickup_zone = zones.zone_key("pickup")
    revenue: dict[str, Expr] = {}
    for name, source in REVENUE.items():
        dollars = field(source, missing=float("nan"))
        revenue[f"{name}_recorded"] = where(isnan(dollars), 0, 1)
        revenue[f"{name}_cents"] = where(isnan(dollars), 0, to_int(rint(dollars * 100)))
    return {
        "pickup_date": days,
        "pickup_hour": pickup % MS_PER_DAY // 3_600_000,
        "pickup_weekday": (days + 3) % 7,
        "vendor_id": field("vendor_id"),
        "distance_band": bucket(km, DISTANCE_BANDS_KM),
        "grid_lat": to_int(floor(lat / GRID_DEG)),
        "grid_lon": to_int(floor(lon / GRID_DEG)),
        "duration_s": field("trip_duration"),
        "distance_m": to_int(rint(km * 1000)),
        "pickup_zone": pickup_zone,
        "pickup_borough": zones.borough_of(pickup_zone),
        "dropoff_borough": zones.borough_of(zones.zone_key("dropoff")),
        **revenue,
    }


def trip_facts(trips: Mapping[str, Any]) -> pl.DataFrame:
    """``fact_expressions()`` of clean record-form trips, with the squares of the measures."""
    cache: dict[int, Any] = {}
    rows = len(trips["trip_duration"])  # a fact of a field the trips lack is one value for them all
    facts = {name: np.broadcast_to(np.asarray(evaluate(expr, trips, cache), dtype=np.int64), rows)
             for name, expr in fact_expressions().items()}
    for measure in MEASURES:
        facts[f"{measure}_sq"] = facts[measure] * facts[measure]
    return pl.DataFrame(facts)


def empty_view(name: str) -> pd.DataFrame:
    """A zero-row view with the right columns and dtypes."""
    columns = {key: pd.Series(dtype=KEY_DTYPES[key]) for key in VIEWS[name]}
    columns.update({agg: pd.Series(dtype="int64") for agg in AGGREGATES})
    return pd.DataFrame(columns)


def _to_pandas(name: str, frame: pl.DataFrame) -> pd.DataFrame:
    """A grouped polars view as the pandas view every layer reads (day numbers become dates).

    Column by column through numpy: for frames this small, ten times faster than ``to_pandas``.
    """
    columns = {column: frame[column].to_numpy().astype(np.int64, copy=False) for column in frame.columns}
    if "pickup_date" in columns:
        columns["pickup_date"] = (columns["pickup_date"] * NS_PER_DAY).astype("datetime64[ns]")
    return pd.DataFrame({column: columns[column] for column in (*VIEWS[name], *AGGREGATES)})


def _from_pandas(view: pd.DataFrame) -> pl.DataFrame:
    columns = {column: view[column].to_numpy() for column in view.columns}
    if "pickup_date" in columns:
        columns["pickup_date"] = columns["pickup_date"].astype("datetime64[ns]").astype(np.int64) // NS_PER_DAY
    return pl.DataFrame({column: values.astype(np.int64, copy=False) for column, values in columns.items()})


_AGGREGATIONS = [pl.len().cast(pl.Int64).alias("trips")] + [
    expression for measure in MEASURES for expression in (
        pl.col(measure).sum().alias(f"{measure}_sum"), pl.col(f"{measure}_sq").sum().alias(f"{measure}_sumsq"),
        pl.col(measure).min().alias(f"{measure}_min"), pl.col(measure).max().alias(f"{measure}_max"))] + [
    pl.col(fact).sum().alias(aggregate) for aggregate, fact in SUMS.items()]
_MERGES = [pl.col(agg).min() if agg.endswith("_min") else pl.col(agg).max() if agg.endswith("_max")
           else pl.col(agg).sum() for agg in AGGREGATES]


def aggregate(trips: Mapping[str, Any]) -> dict[str, pd.DataFrame]:
    """Every view of a set of clean trips (record-form columns), keys in ascending order."""
    if len(trips["trip_duration"]) == 0:
        return {name: empty_view(name) for name in VIEWS}
    facts = trip_facts(trips).lazy()
    grouped = pl.collect_all([facts.group_by(keys).agg(_AGGREGATIONS).sort(keys) for keys in VIEWS.values()])
    return {name: _to_pandas(name, frame) for name, frame in zip(VIEWS, grouped)}


def merge_view(name: str, parts: Iterable[pd.DataFrame]) -> pd.DataFrame:
    """Add up several versions of one view: counts and sums add, min/max combine."""
    frames = [_from_pandas(part) for part in parts if len(part)]
    if not frames:
        return empty_view(name)
    keys = list(VIEWS[name])
    return _to_pandas(name, pl.concat(frames).group_by(keys).agg(_MERGES).sort(keys))


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
    for name in REVENUE:
        dollars = out[f"{name}_cents_sum"].to_numpy(dtype=np.float64) / 100
        recorded = out[f"{name}_trips"].to_numpy(dtype=np.float64)
        out[f"{name}_usd"] = dollars
        with np.errstate(invalid="ignore", divide="ignore"):
            out[f"{name}_usd_mean"] = np.where(recorded > 0, dollars / recorded, np.nan)
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
