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

``assign_zones`` gives every trip entering master data its zones: the zone
its source recorded, else the zone of its coordinates (``NO_ZONE`` outside
every zone). The batch layer calls it on every import and every drain of the
stream, so every trip in master data has both zones.

``place`` gives a trip known only by its zones a point for the views that need
one (the pickup grid, the straight-line distance): its zone's centroid. That is
an estimate, and docs/DATA.md says what it means for the views: a trip inside
one zone has a distance of 0 m.
"""
from __future__ import annotations

import gzip
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import shapely
from shapely.geometry import shape

from periscope.config import shipped_data
from periscope.expressions import Expr, evaluate, field, isnan, lookup, to_int, where
from periscope.schema import NOT_RECORDED, ZONE_FIELDS, ZONES

ZONES_DIR = shipped_data("zones")
CENTROIDS = "taxi_zone_centroids.csv"
POLYGONS = "taxi_zones.geojson.gz"
NO_ZONE = 0
"""``zone_of`` for a point in no zone (TLC ids start at 1)."""
BOROUGHS: tuple[str, ...] = ("no zone", "Bronx", "Brooklyn", "EWR", "Manhattan", "Queens", "Staten Island")
"""The borough codes of the views (``borough_of``): 0 for a trip with no zone (outside every zone,
a TLC "unknown" zone, or a master file written before zones were kept)."""


@dataclass(frozen=True)
class Zones:
    """The zones as a table (indexed by location_id) and as a spatial index over their polygons."""

    table: pd.DataFrame
    polygon_ids: np.ndarray
    tree: shapely.STRtree


@lru_cache(maxsize=4)
def zone_table(directory: Path = ZONES_DIR) -> pd.DataFrame:
    """The shipped zone table, indexed by location_id (read once per process)."""
    with (directory / CENTROIDS).open("rb") as handle:
        return pd.read_csv(handle).set_index("location_id").sort_index()


@lru_cache(maxsize=4)
def zone_geojson(directory: Path = ZONES_DIR) -> dict[str, Any]:
    """The shipped zone polygons as GeoJSON (a FeatureCollection, ``properties.location_id`` each; read
    once per process): what ``load_zones`` indexes and the dashboard's zone map draws. Do not modify it."""
    with (directory / POLYGONS).open("rb") as packed, gzip.open(packed, "rt", encoding="utf-8") as handle:
        return json.load(handle)


@lru_cache(maxsize=4)
def load_zones(directory: Path = ZONES_DIR) -> Zones:
    """The shipped zones with their polygons (read once per process)."""
    table = zone_table(directory)
    features = zone_geojson(directory)["features"]
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


def zones_at(trips: Mapping[str, Any], end: str, zones: Zones | ZoneGrid | None = None) -> np.ndarray:
    """The zone of each trip's ``end`` ("pickup" or "dropoff"): as recorded if it was, else the zone of
    its coordinates (``zone_of``, or the same answer from a ``ZoneGrid``; ``NO_ZONE`` outside every
    zone)."""
    lon = np.asarray(trips[f"{end}_longitude"], dtype=np.float64)
    recorded = trips.get(f"{end}_location_id")
    result = np.full(lon.shape, NOT_RECORDED, np.int64) if recorded is None else \
        np.array(recorded, dtype=np.int64)
    unknown = np.flatnonzero(result == NOT_RECORDED)
    if len(unknown):
        lat = np.asarray(trips[f"{end}_latitude"], dtype=np.float64)
        result[unknown] = zones.zone_of(lon[unknown], lat[unknown]) if isinstance(zones, ZoneGrid) else \
            zone_of(lon[unknown], lat[unknown], zones)
    return result


def assign_zones(trips: pd.DataFrame, zones: Zones | None = None) -> pd.DataFrame:
    """A trip frame with both zones of every trip (``zones_at``), int64, after its other columns."""
    return trips.assign(**{f"{end}_location_id": zones_at(trips, end, zones) for end in ("pickup", "dropoff")})


def assign_zones_to_records(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``assign_zones`` for records (dicts in record form), vectorised over them all."""
    if not records:
        return []
    columns = {name: [NOT_RECORDED if record.get(name) is None else record[name] for record in records]
               for name in ZONE_FIELDS}
    for end in ("pickup", "dropoff"):
        for axis in ("longitude", "latitude"):
            columns[f"{end}_{axis}"] = [record[f"{end}_{axis}"] for record in records]
    found = {name: zones_at(columns, name.split("_")[0]).tolist() for name in ZONE_FIELDS}
    return [{**record, **{name: found[name][row] for name in ZONE_FIELDS}} for row, record in enumerate(records)]


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


def zone_key(end: str) -> Expr:
    """The zone of a trip's ``end`` as the views key it: its zone 1..263, or ``NO_ZONE`` (0)."""
    zone = field(f"{end}_location_id", missing=NOT_RECORDED)
    return where((zone >= ZONES[0]) & (zone <= ZONES[1]), zone, NO_ZONE)


@lru_cache(maxsize=1)
def borough_codes() -> np.ndarray:
    """The borough code (an index into ``BOROUGHS``) of each zone id 0..263; 0 for ``NO_ZONE``."""
    table = zone_table()
    codes = np.zeros(ZONES[1] + 1, dtype=np.int64)
    codes[table.index] = [BOROUGHS.index(borough) for borough in table["borough"]]
    return codes


def borough_of(zone: Expr) -> Expr:
    """The borough code (``BOROUGHS``) of a ``zone_key``, as an expression."""
    return to_int(lookup(borough_codes(), zone))


GRID_BOX = ((-74.3, -73.7), (40.5, 41.0))
"""Where ``zone_grid`` precomputes zones: the NYC box of the cleaning rules (lon, lat)."""
GRID_CELL_DEG = (0.01, 0.01 / 32)
"""Coarsest and finest cell of ``zone_grid``: cells on a zone border are split down to the finest."""
_UNRESOLVED = -1


@dataclass(frozen=True)
class ZoneGrid:
    """``zone_of`` as a raster lookup, for hot paths (the model's features on the speed layers).

    Each cell of a fine raster over ``GRID_BOX`` holds the one zone every
    point of it is in, ``NO_ZONE`` if it touches none, or "unresolved" if it
    touches a border; a point in an unresolved cell or outside the box is
    looked up exactly (``zone_of``). So the answer is ``zone_of``'s, point for
    point, at one array index for most points (the tests compare both).
    """

    zones: Zones
    cells: np.ndarray
    cell_deg: float

    def zone_of(self, longitude: np.ndarray | pd.Series, latitude: np.ndarray | pd.Series) -> np.ndarray:
        """The zone id (int64) of each point, as ``zone_of`` gives it."""
        lon = np.asarray(longitude, dtype=np.float64)
        lat = np.asarray(latitude, dtype=np.float64)
        with np.errstate(invalid="ignore"):
            x = np.floor((lon - GRID_BOX[0][0]) / self.cell_deg)
            y = np.floor((lat - GRID_BOX[1][0]) / self.cell_deg)
            inside = (x >= 0) & (x < self.cells.shape[0]) & (y >= 0) & (y < self.cells.shape[1])
        result = np.full(lon.shape, _UNRESOLVED, dtype=np.int64)
        result[inside] = self.cells[x[inside].astype(np.int64), y[inside].astype(np.int64)]
        exact = np.flatnonzero(result == _UNRESOLVED)
        if len(exact):
            result[exact] = zone_of(lon[exact], lat[exact], self.zones)
        return result


def _resolve_cells(zones: Zones, borders: shapely.STRtree, x: np.ndarray, y: np.ndarray,
                   deg: float) -> np.ndarray:
    """For cells (x, y) of size ``deg``: the zone of every point of each, or unresolved.

    A cell that touches no zone border lies in the same zones all over, so the
    zone of its centre is the zone of each of its points.
    """
    west, south = GRID_BOX[0][0] + x * deg, GRID_BOX[1][0] + y * deg
    on_border = np.zeros(len(x), dtype=bool)
    on_border[borders.query(shapely.box(west, south, west + deg, south + deg), predicate="intersects")[0]] = True
    result = np.full(len(x), _UNRESOLVED, dtype=np.int64)
    inner = np.flatnonzero(~on_border)
    result[inner] = zone_of(west[inner] + deg / 2, south[inner] + deg / 2, zones)
    return result


@lru_cache(maxsize=2)
def zone_grid(directory: Path = ZONES_DIR) -> ZoneGrid:
    """The zones as a ``ZoneGrid`` (built once per process, in about a second).

    Cells start at ``GRID_CELL_DEG[0]``; a cell on a border is split in four,
    down to ``GRID_CELL_DEG[1]`` (about 30 m).
    """
    zones = load_zones(directory)
    borders = shapely.STRtree(shapely.boundary(zones.tree.geometries))
    coarse, fine = GRID_CELL_DEG
    factor = int(round(coarse / fine))
    shape = (int(round((GRID_BOX[0][1] - GRID_BOX[0][0]) / coarse)),
             int(round((GRID_BOX[1][1] - GRID_BOX[1][0]) / coarse)))
    cells = np.full((shape[0] * factor, shape[1] * factor), _UNRESOLVED, dtype=np.int16)
    x, y = (axis.ravel() for axis in np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij"))
    deg, scale = coarse, factor
    while True:
        resolved = _resolve_cells(zones, borders, x, y, deg)
        done = resolved != _UNRESOLVED
        if scale == 1:
            cells[x[done], y[done]] = resolved[done]
            break
        for cx, cy, zone in zip(x[done], y[done], resolved[done]):
            cells[cx * scale:(cx + 1) * scale, cy * scale:(cy + 1) * scale] = zone
        x, y = x[~done], y[~done]
        x = np.concatenate([2 * x, 2 * x + 1, 2 * x, 2 * x + 1])
        y = np.concatenate([2 * y, 2 * y, 2 * y + 1, 2 * y + 1])
        deg, scale = deg / 2, scale // 2
    return ZoneGrid(zones=zones, cells=cells, cell_deg=fine)
