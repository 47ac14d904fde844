"""TLC taxi zones: where a trip known only by its zone is placed.

Since mid-2016 TLC trip records name the taxi zone (1..263) of pickup and
dropoff instead of coordinates. The batch views need a point (the pickup
grid, the straight-line distance), so a trip without coordinates is placed
at its zone's centroid (``data/zones/taxi_zone_centroids.csv``, computed from
TLC's zone shapefile; ``data/README.md`` says how). That is an estimate, and
docs/DATA.md says what it means for the views: a trip inside one zone has a
distance of 0 m.
"""
from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import numpy as np
import pandas as pd

from periscope import config
from periscope.schema import ZONES

CENTROIDS_CSV = config.PROJECT_ROOT / "data" / "zones" / "taxi_zone_centroids.csv"


@lru_cache(maxsize=1)
def centroids() -> tuple[np.ndarray, np.ndarray]:
    """(longitude, latitude) of each zone's centroid, indexed by zone id; NaN for no known zone."""
    table = pd.read_csv(CENTROIDS_CSV)
    lon, lat = np.full(ZONES[1] + 1, np.nan), np.full(ZONES[1] + 1, np.nan)
    lon[table["location_id"]], lat[table["location_id"]] = table["centroid_longitude"], table["centroid_latitude"]
    return lon, lat


def place(trips: Mapping[str, Any], end: str) -> tuple[np.ndarray, np.ndarray]:
    """(longitude, latitude) of each trip's ``end`` ("pickup" or "dropoff"): its coordinates, or,
    where it has none, its zone's centroid (NaN when it has neither)."""
    lon = np.asarray(trips[f"{end}_longitude"], dtype=np.float64)
    lat = np.asarray(trips[f"{end}_latitude"], dtype=np.float64)
    zone = trips.get(f"{end}_location_id")
    missing = np.isnan(lon) | np.isnan(lat)
    if zone is None or not missing.any():
        return lon, lat
    zone = np.asarray(zone, dtype=np.int64)
    known = missing & (zone >= ZONES[0]) & (zone <= ZONES[1])
    zone_lon, zone_lat = centroids()
    lon, lat = lon.copy(), lat.copy()
    lon[known], lat[known] = zone_lon[zone[known]], zone_lat[zone[known]]
    return lon, lat
