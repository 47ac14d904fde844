"""NYC taxi zones: the TLC's 263 zones, their boroughs, centroids and polygons, and the zone of a point.

The TLC's trip records place a trip by coordinates until mid-2016 and by
taxi-zone id (``PULocationID``, 1..263; 264 and 265 mean unknown) since. So
that every trip has a zone whichever era it comes from, a trip with
coordinates gets the zone whose polygon holds the point (``zone_of``), and a
zone gives a trip without coordinates a place to stand (its centroid).

The files are shipped in ``data/zones/`` (see data/README.md for their
provenance): ``taxi_zone_centroids.csv`` (location_id, zone, borough,
centroid_longitude, centroid_latitude, area_km2) and
``taxi_zones.geojson.gz`` (the polygons, simplified to about 18 m).

``zone_of`` is vectorised: shapely's STRtree finds, for all points at once,
the polygons whose bounding box holds each point, then tests containment.
A point on the border of two zones gets the lower id; a point in no zone
(the sea, New Jersey, a GPS glitch at 0, 0) or without coordinates gets 0.

``place`` gives a trip known only by its zones a point for the views that need
one (the pickup grid, the straight-line distance): its zone's centroid. That is
an estimate, and docs/DATA.md says what it means for the views: a trip inside
one zone has a distance of 0 m.
"""
from __future__ import annotations

import gzip
import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import shapely
from shapely.geometry import shape

from periscope.config import PROJECT_ROOT
from periscope.expressions import Expr, evaluate, field, isnan, lookup, where
from periscope.schema import NOT_RECORDED, ZONES

ZONES_DIR = PROJECT_ROOT / "data" / "zones"
CENTROIDS = "taxi_zone_centroids.csv"
POLYGONS = "taxi_zones.geojson.gz"
NO_ZONE = 0
"""``zone_of`` for a point in no zone (TLC ids start at 1)."""


@dataclass(frozen=True)
class Zones:
    """The zones as a table (indexed by location_id) and as a spatial index over their polygons."""

    table: pd.DataFrame
    polygon_ids: np.ndarray
    tree: shapely.STRtree


@lru_cache(maxsize=4)
def zone_table(directory: Path = ZONES_DIR) -> pd.DataFrame:
    """The shipped zone table, indexed by location_id (read once per process)."""
    return pd.read_csv(directory / CENTROIDS).set_index("location_id").sort_index()


@lru_cache(maxsize=4)
def load_zones(directory: Path = ZONES_DIR) -> Zones:
    """The shipped zones with their polygons (read once per process)."""
    table = zone_table(directory)
    with gzip.open(directory / POLYGONS, "rt", encoding="utf-8") as handle:
        features = json.load(handle)["features"]
    polygons = [shape(feature["geometry"]) for feature in features]
    ids = np.array([feature["properties"]["location_id"] for feature in features], dtype=np.int64)
    return Zones(table=table, polygon_ids=ids, tree=shapely.STRtree(polygons))


def zone_of(longitude: np.ndarray | pd.Series, latitude: np.ndarray | pd.Series,
            zones: Zones | None = None) -> np.ndarray:
    """The zone id (int64) holding each point; ``NO_ZONE`` where none does or a coordinate is missing."""
    zones = zones or load_zones()
    lon = np.asarray(longitude, dtype=np.float64)
    lat = np.asarray(latitude, dtype=np.float64)
    result = np.full(lon.shape, NO_ZONE, dtype=np.int64)
    located = np.flatnonzero(np.isfinite(lon) & np.isfinite(lat))
    if len(located) == 0:
        return result
    point, polygon = zones.tree.query(shapely.points(lon[located], lat[located]), predicate="intersects")
    found = zones.polygon_ids[polygon]
    order = np.lexsort((found, point))  # per point, the lowest zone id first
    first = np.unique(point[order], return_index=True)[1]
    result[located[point[order][first]]] = found[order][first]
    return result


@lru_cache(maxsize=1)
def centroids() -> tuple[np.ndarray, np.ndarray]:
    """(longitude, latitude) of each zone's centroid, indexed by zone id; NaN for no known zone."""
    table = zone_table()
    lon, lat = np.full(ZONES[1] + 1, np.nan), np.full(ZONES[1] + 1, np.nan)
    lon[table.index], lat[table.index] = table["centroid_longitude"], table["centroid_latitude"]
    return lon, lat


def place_of(end: str) -> tuple[Expr, Expr]:
    """(longitude, latitude) of a trip's ``end`` ("pickup" or "dropoff"), as expressions
    (``periscope.expressions``): its coordinates, or, where it has none, its zone's centroid (NaN
    when it has neither)."""
    lon, lat = field(f"{end}_longitude"), field(f"{end}_latitude")
    zone = field(f"{end}_location_id", missing=NOT_RECORDED)
    by_zone = (isnan(lon) | isnan(lat)) & (zone >= ZONES[0]) & (zone <= ZONES[1])
    zone_lon, zone_lat = centroids()
    return where(by_zone, lookup(zone_lon, zone), lon), where(by_zone, lookup(zone_lat, zone), lat)


def place(trips: Mapping[str, Any], end: str) -> tuple[np.ndarray, np.ndarray]:
    """``place_of(end)`` evaluated over record-form ``trips``."""
    cache: dict[int, Any] = {}
    return tuple(np.asarray(evaluate(expr, trips, cache), dtype=np.float64) for expr in place_of(end))
