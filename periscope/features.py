"""Feature engineering for the trip-duration model: one code path for
training (``train_model.py``) and inference (both speed layers).

Only what is known when the passenger gets in is used: pickup time and place,
the destination they give, the vendor, the number of passengers and the day's
weather. Never the dropoff time, the duration, ``trip_distance`` (the meter
records it at dropoff) or ``store_and_fwd_flag`` (known when the record is
uploaded).

Every era of trip has the same features. A trip has a place at each end:
coordinates (Kaggle, TLC until mid-2016), a taxi zone (TLC since), or both.

* **Zone features**, for every trip: each end's zone, its centroid, borough,
  area and airport, the centroid-to-centroid distance and whether the trip
  stays in one zone. A trip with coordinates and no zone gets the zone that
  holds its point (``periscope.zones.zone_grid``: ``zone_of``'s answer by a
  raster lookup), so Kaggle messages on the stream have zone features too.
* **Coordinate features** (exact points, straight-line and grid distance,
  bearing, the points on Manhattan's grid axes) are NaN for a trip known by
  zones only; the gradient-boosting trees send NaN down a branch of its own.
* **Time**: hour, weekday, day of year, hour of week, and ``pickup_year``
  (fractional) for the long drift in speeds across the eras.
* **Weather** at Central Park on the pickup day (``periscope.weather``):
  rain, snowfall and snow on the ground; NaN for a day the table lacks.

The input is any mapping of record-form columns (a trip frame, or a dict of
numpy arrays): times as int64 ms of New York wall clock; the zone columns
(``pickup_location_id``, ``dropoff_location_id``) may be absent, as in a Kaggle
message. The output is a float32 matrix whose columns are ``FEATURES``, in that
order. Everything is plain numpy on whole columns (the zone of a point is a
vectorised spatial-index query), so one core turns hundreds of thousands of
trips per second into features.
"""
from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import numpy as np

from periscope import weather
from periscope.schema import ZONES, haversine_km
from periscope.zones import NO_ZONE, zone_grid, zone_table

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
    "pickup_avenue_axis",
    "pickup_street_axis",
    "dropoff_avenue_axis",
    "dropoff_street_axis",
    "pickup_zone",
    "dropoff_zone",
    "pickup_zone_longitude",
    "pickup_zone_latitude",
    "dropoff_zone_longitude",
    "dropoff_zone_latitude",
    "zone_distance_km",
    "zone_grid_distance_km",
    "zone_bearing_deg",
    "pickup_borough",
    "dropoff_borough",
    "pickup_airport",
    "dropoff_airport",
    "same_zone",
    "pickup_zone_area_km2",
    "dropoff_zone_area_km2",
    "pickup_hour",
    "pickup_weekday",
    "pickup_day_of_year",
    "pickup_hour_of_week",
    "pickup_year",
    "precipitation_in",
    "snowfall_in",
    "snow_depth_in",
)
"""Model inputs, in column order. A model trained on another list will not load."""

COORDINATE_COLUMNS = ("pickup_longitude", "pickup_latitude", "dropoff_longitude", "dropoff_latitude")
BOROUGHS: tuple[str, ...] = ("EWR", "Queens", "Bronx", "Manhattan", "Staten Island", "Brooklyn")
"""Borough codes (``pickup_borough`` = index + 1; 0: no known zone)."""
AIRPORTS: dict[int, int] = {132: 1, 138: 2, 1: 3}
"""Airport zone -> code: JFK 1, LaGuardia 2, Newark 3 (0: not an airport)."""

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
    """Calendar parts of wall-clock ms: fractional hour, weekday (Mon=0), day of year (1..366),
    the day (days since 1970-01-01) and the fractional year (2016.5 is mid-2016)."""
    pickup_ms = np.asarray(pickup_ms, dtype=np.int64)
    days = pickup_ms // _MS_PER_DAY
    dates = days.astype("datetime64[D]")
    years = dates.astype("datetime64[Y]")
    year_days = ((years + 1).astype("datetime64[D]") - years.astype("datetime64[D]")).astype(np.int64)
    day_of_year = (dates - years.astype("datetime64[D]")).astype(np.int64) + 1
    return {
        "hour": (pickup_ms % _MS_PER_DAY) / 3_600_000.0,
        "weekday": (days + 3) % 7,
        "day_of_year": day_of_year,
        "days": days,
        "year": years.astype(np.int64) + 1970 + (day_of_year - 1) / year_days,
    }


@lru_cache(maxsize=1)
def zone_attributes() -> dict[str, np.ndarray]:
    """Per zone id (index 0..265; NaN or 0 for ``NO_ZONE`` and the unknown 264/265): centroid,
    borough code, area, airport code; and per pair of zones (index ``pickup * 266 + dropoff``)
    the centroid-to-centroid distance, grid distance and bearing, so a batch looks them up
    instead of computing trigonometry per trip."""
    table = zone_table()
    size = ZONES[1] + 3
    columns = {name: np.full(size, np.nan) for name in ("longitude", "latitude", "borough", "area_km2")}
    columns["airport"] = np.zeros(size)
    ids = table.index.to_numpy()
    columns["longitude"][ids] = table["centroid_longitude"]
    columns["latitude"][ids] = table["centroid_latitude"]
    columns["area_km2"][ids] = table["area_km2"]
    columns["borough"][ids] = [BOROUGHS.index(name) + 1 for name in table["borough"]]
    columns["borough"][NO_ZONE] = 0
    for zone, code in AIRPORTS.items():
        columns["airport"][zone] = code
    p_lon, d_lon = np.repeat(columns["longitude"], size), np.tile(columns["longitude"], size)
    p_lat, d_lat = np.repeat(columns["latitude"], size), np.tile(columns["latitude"], size)
    columns["pair_distance_km"] = haversine_km(p_lat, p_lon, d_lat, d_lon)
    columns["pair_grid_distance_km"] = _grid_distance_km(p_lat, p_lon, d_lat, d_lon)
    columns["pair_bearing_deg"] = _bearing_deg(p_lat, p_lon, d_lat, d_lon)
    return columns


def trip_zones(trips: Mapping[str, Any], end: str) -> np.ndarray:
    """Each trip's zone at ``end`` ("pickup" or "dropoff"), int64: the recorded one when it is
    1..263, else the zone holding its coordinates, else ``NO_ZONE``."""
    lon = np.asarray(trips[f"{end}_longitude"], dtype=np.float64)
    recorded = trips.get(f"{end}_location_id")
    if recorded is None:
        zone = np.full(len(lon), NO_ZONE, dtype=np.int64)
    else:
        zone = np.asarray(recorded, dtype=np.int64).copy()
        zone[(zone < ZONES[0]) | (zone > ZONES[1])] = NO_ZONE
    lookup = np.flatnonzero(zone == NO_ZONE)
    if len(lookup):
        lat = np.asarray(trips[f"{end}_latitude"], dtype=np.float64)
        zone[lookup] = zone_grid().zone_of(lon[lookup], lat[lookup])
    return zone


def build_features(trips: Mapping[str, Any]) -> np.ndarray:
    """The ``(n, len(FEATURES))`` float32 feature matrix for record-form trips."""
    col = {name: np.asarray(trips[name], dtype=np.float64) for name in COORDINATE_COLUMNS}
    plon, plat = col["pickup_longitude"], col["pickup_latitude"]
    dlon, dlat = col["dropoff_longitude"], col["dropoff_latitude"]
    when = time_parts(trips["pickup_datetime"])
    p_avenue, p_street = _grid_axes(plon, plat)
    d_avenue, d_street = _grid_axes(dlon, dlat)
    zone = zone_attributes()
    p_zone, d_zone = trip_zones(trips, "pickup"), trip_zones(trips, "dropoff")
    pz_lon, pz_lat = zone["longitude"][p_zone], zone["latitude"][p_zone]
    dz_lon, dz_lat = zone["longitude"][d_zone], zone["latitude"][d_zone]
    pair = p_zone * len(zone["longitude"]) + d_zone
    day = weather.on_days(when["days"])
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
        "pickup_avenue_axis": p_avenue,
        "pickup_street_axis": p_street,
        "dropoff_avenue_axis": d_avenue,
        "dropoff_street_axis": d_street,
        "pickup_zone": p_zone,
        "dropoff_zone": d_zone,
        "pickup_zone_longitude": pz_lon,
        "pickup_zone_latitude": pz_lat,
        "dropoff_zone_longitude": dz_lon,
        "dropoff_zone_latitude": dz_lat,
        "zone_distance_km": zone["pair_distance_km"][pair],
        "zone_grid_distance_km": zone["pair_grid_distance_km"][pair],
        "zone_bearing_deg": zone["pair_bearing_deg"][pair],
        "pickup_borough": zone["borough"][p_zone],
        "dropoff_borough": zone["borough"][d_zone],
        "pickup_airport": zone["airport"][p_zone],
        "dropoff_airport": zone["airport"][d_zone],
        "same_zone": np.where((p_zone == d_zone) & (p_zone != NO_ZONE), 1.0, 0.0),
        "pickup_zone_area_km2": zone["area_km2"][p_zone],
        "dropoff_zone_area_km2": zone["area_km2"][d_zone],
        "pickup_hour": when["hour"],
        "pickup_weekday": when["weekday"],
        "pickup_day_of_year": when["day_of_year"],
        "pickup_hour_of_week": when["weekday"] * 24 + np.floor(when["hour"]),
        "pickup_year": when["year"],
        "precipitation_in": day["precipitation_in"],
        "snowfall_in": day["snowfall_in"],
        "snow_depth_in": day["snow_depth_in"],
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
