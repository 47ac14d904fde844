"""Taxi zones: the shipped table and polygons, and the zone of a point (``periscope.zones``)."""
from __future__ import annotations

import gzip
import json

import numpy as np
import pandas as pd
import shapely
from shapely.geometry import shape

from periscope import zones


def _features() -> list[dict]:
    with gzip.open(zones.ZONES_DIR / zones.POLYGONS, "rt", encoding="utf-8") as handle:
        return json.load(handle)["features"]


def test_the_table_holds_every_zone_of_the_polygons_once():
    table = zones.load_zones().table
    ids = sorted(feature["properties"]["location_id"] for feature in _features())
    assert list(table.index) == ids == list(range(1, len(ids) + 1))
    boroughs = {feature["properties"]["location_id"]: feature["properties"]["borough"] for feature in _features()}
    assert table["borough"].to_dict() == boroughs


def test_a_point_inside_a_zone_gets_that_zone():
    """A point that shapely guarantees to be inside each polygon; where polygons share it, the lower id."""
    features = _features()
    polygons = [shape(feature["geometry"]) for feature in features]
    inside = [polygon.representative_point() for polygon in polygons]
    expected = [min(feature["properties"]["location_id"] for feature, polygon in zip(features, polygons)
                    if polygon.intersects(point)) for point in inside]
    got = zones.zone_of([p.x for p in inside], [p.y for p in inside])
    assert got.tolist() == expected
    assert len(set(expected)) == len(features)


def test_most_centroids_lie_in_their_own_zone():
    """The centroid file comes from the original shapefile; a concave zone's centroid may lie outside it."""
    table = zones.load_zones().table
    got = zones.zone_of(table["centroid_longitude"], table["centroid_latitude"])
    assert (got == table.index.to_numpy()).mean() > 0.95


def test_points_in_no_zone_or_without_coordinates_get_no_zone():
    lon = np.array([0.0, -74.0, np.nan, -73.9857, -80.0])
    lat = np.array([0.0, np.nan, 40.7, 40.7484, 40.7])
    got = zones.zone_of(lon, lat)
    assert got[[0, 1, 2, 4]].tolist() == [zones.NO_ZONE] * 4
    polygons = [(shape(f["geometry"]), f["properties"]["location_id"]) for f in _features()]
    empire_state = shapely.Point(-73.9857, 40.7484)
    assert got[3] == min(zone for polygon, zone in polygons if polygon.intersects(empire_state))


def test_real_pickups_get_the_zone_a_plain_loop_finds(sample_raw):
    """The vectorised lookup equals a point-by-point loop over the polygons, on 2,000 real pickups."""
    trips = sample_raw.sample(2000, random_state=3)
    polygons = [(shape(f["geometry"]), f["properties"]["location_id"]) for f in _features()]
    expected = []
    for lon, lat in zip(trips["pickup_longitude"], trips["pickup_latitude"]):
        point = shapely.Point(lon, lat)
        holding = [zone for polygon, zone in polygons if polygon.intersects(point)]
        expected.append(min(holding) if holding else zones.NO_ZONE)
    got = zones.zone_of(trips["pickup_longitude"], trips["pickup_latitude"])
    assert got.tolist() == expected
    assert pd.Series(expected).ne(zones.NO_ZONE).mean() > 0.98


def test_the_zone_grid_answers_as_zone_of_for_every_point(sample_raw):
    """The raster lookup of the model's hot path must give ``zone_of``'s zone, point for point:
    real pickups and dropoffs, random points over the box, borders, outside the box, NaN."""
    grid = zones.zone_grid()
    rng = np.random.default_rng(3)
    (west, east), (south, north) = zones.GRID_BOX
    lon = np.concatenate([sample_raw["pickup_longitude"], sample_raw["dropoff_longitude"],
                          rng.uniform(west - 0.1, east + 0.1, 200_000), [np.nan, -73.98, 0.0]])
    lat = np.concatenate([sample_raw["pickup_latitude"], sample_raw["dropoff_latitude"],
                          rng.uniform(south - 0.1, north + 0.1, 200_000), [40.75, np.nan, 0.0]])
    border = np.concatenate([np.asarray(polygon.exterior.coords) for polygon in
                             (shape(feature["geometry"]) for feature in _features()[:40])
                             if polygon.geom_type == "Polygon"])
    lon, lat = np.concatenate([lon, border[:, 0]]), np.concatenate([lat, border[:, 1]])
    np.testing.assert_array_equal(grid.zone_of(lon, lat), zones.zone_of(lon, lat))
