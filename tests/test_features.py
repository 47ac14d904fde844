"""Feature engineering: known values, no leakage of the label, one shape for all layers."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from periscope import zones
from periscope.features import (BOROUGHS, COORDINATE_COLUMNS, FEATURES, build_features,
                                duration_from_target, target, time_parts)
from periscope.schema import haversine_km, parse_time
from periscope.sources import read_trips
from periscope.weather import WEATHER_CSV
from tests.conftest import TLC_DIR

CENTROIDS = pd.read_csv(zones.ZONES_DIR / zones.CENTROIDS).set_index("location_id")
"""The shipped zone table as plain pandas reads it: the expected zone features."""
WEATHER = pd.read_csv(WEATHER_CSV, parse_dates=["DATE"]).set_index("DATE")


def one_trip(**change):
    trip = {
        "vendor_id": [2], "passenger_count": [1],
        "pickup_datetime": [parse_time("2016-01-01 18:30:00", "t")],
        "dropoff_datetime": [parse_time("2016-01-01 19:00:00", "t")],
        "pickup_longitude": [-73.9855], "pickup_latitude": [40.7580],     # Times Square
        "dropoff_longitude": [-73.7781], "dropoff_latitude": [40.6413],   # JFK
        "store_and_fwd_flag": [False], "trip_duration": [1800],
    }
    trip.update({k: [v] for k, v in change.items()})
    return {k: np.array(v) for k, v in trip.items()}


def feature(matrix, name):
    return matrix[0, FEATURES.index(name)]


def test_known_values():
    m = build_features(one_trip())
    assert m.shape == (1, len(FEATURES)) and m.dtype == np.float32
    assert feature(m, "distance_km") == pytest.approx(21.8, abs=0.3)
    assert feature(m, "grid_distance_km") > feature(m, "distance_km")
    assert feature(m, "pickup_hour") == pytest.approx(18.5)
    assert feature(m, "pickup_weekday") == 4            # 2016-01-01 was a Friday
    assert feature(m, "pickup_day_of_year") == 1
    assert feature(m, "pickup_hour_of_week") == 4 * 24 + 18
    assert 90 < feature(m, "bearing_deg") < 180          # heading south-east


def test_calendar_parts_on_a_leap_year():
    parts = time_parts(np.array([parse_time("2016-12-31 23:59:59", "t"), parse_time("2016-02-29 00:00:00", "t")]))
    assert list(parts["day_of_year"]) == [366, 60]
    assert list(parts["weekday"]) == [5, 0]


def test_the_label_and_upload_flag_never_leak_into_features():
    base = build_features(one_trip())
    leaked = build_features(one_trip(trip_duration=99999, store_and_fwd_flag=True,
                                     dropoff_datetime=parse_time("2016-01-05 00:00:00", "t")))
    np.testing.assert_array_equal(base, leaked)
    assert not {"trip_duration", "dropoff_datetime", "store_and_fwd_flag"} & set(FEATURES)


def test_real_sample_features_are_finite_except_zones_of_points_in_no_zone(sample_trips):
    m = build_features(sample_trips)
    assert m.shape == (len(sample_trips), len(FEATURES))
    zone_columns = [i for i, name in enumerate(FEATURES) if "zone_" in name]
    other = [i for i in range(len(FEATURES)) if i not in zone_columns]
    assert np.isfinite(m[:, other]).all()
    in_no_zone = (zones.zone_of(sample_trips["pickup_longitude"], sample_trips["pickup_latitude"]) == 0) | (
        zones.zone_of(sample_trips["dropoff_longitude"], sample_trips["dropoff_latitude"]) == 0)
    np.testing.assert_array_equal(~np.isfinite(m[:, zone_columns]).all(axis=1), in_no_zone)


def test_a_trip_with_coordinates_gets_the_zones_of_its_points(sample_trips):
    """Kaggle messages carry coordinates only: their zone features come from ``zone_of``."""
    trips = sample_trips.head(3000)
    columns = {name: trips[name].to_numpy() for name in trips.columns}  # no zone columns at all
    m = build_features(columns)
    for end in ("pickup", "dropoff"):
        expected = zones.zone_of(trips[f"{end}_longitude"], trips[f"{end}_latitude"])
        np.testing.assert_array_equal(m[:, FEATURES.index(f"{end}_zone")], expected)
        known = expected > 0
        np.testing.assert_allclose(m[known, FEATURES.index(f"{end}_zone_longitude")],
                                   CENTROIDS.loc[expected[known], "centroid_longitude"], rtol=1e-6)


def test_a_trip_known_by_its_zones_only_has_zone_features_and_no_coordinates():
    """What a TLC trip since mid-2016 has: zones, no coordinates (also as a stream message)."""
    pickup, dropoff = (CENTROIDS.index[CENTROIDS["zone"] == name][0] for name in ("Times Sq/Theatre District",
                                                                                "JFK Airport"))
    trip = one_trip(pickup_longitude=np.nan, pickup_latitude=np.nan, dropoff_longitude=np.nan,
                    dropoff_latitude=np.nan)
    trip["pickup_location_id"], trip["dropoff_location_id"] = np.array([pickup]), np.array([dropoff])
    m = build_features(trip)
    p, d = CENTROIDS.loc[pickup], CENTROIDS.loc[dropoff]
    assert feature(m, "pickup_zone") == pickup and feature(m, "dropoff_zone") == dropoff
    assert feature(m, "zone_distance_km") == pytest.approx(
        haversine_km(p.centroid_latitude, p.centroid_longitude, d.centroid_latitude, d.centroid_longitude),
        rel=1e-5)
    assert feature(m, "pickup_borough") == BOROUGHS.index(p.borough) + 1
    assert feature(m, "dropoff_borough") == BOROUGHS.index(d.borough) + 1
    assert d.zone == "JFK Airport" and feature(m, "dropoff_airport") > 0 == feature(m, "pickup_airport")
    assert feature(m, "dropoff_zone_area_km2") == pytest.approx(d.area_km2, rel=1e-6)
    assert feature(m, "same_zone") == 0
    for name in COORDINATE_COLUMNS + ("distance_km", "grid_distance_km", "bearing_deg"):
        assert np.isnan(feature(m, name)), name
    same = dict(trip, dropoff_location_id=np.array([pickup]))
    assert feature(build_features(same), "same_zone") == 1
    assert feature(build_features(same), "zone_distance_km") == 0


def test_unknown_zones_264_265_and_no_place_give_nan_zone_features():
    trip = one_trip(pickup_longitude=np.nan, pickup_latitude=np.nan)
    trip["pickup_location_id"] = np.array([264])
    trip["dropoff_location_id"] = np.array([-1])
    m = build_features(trip)
    assert feature(m, "pickup_zone") == 0 and np.isnan(feature(m, "pickup_zone_latitude"))
    assert feature(m, "pickup_borough") == 0
    assert feature(m, "dropoff_zone") == zones.zone_of([-73.7781], [40.6413])[0]  # from its point


def test_weather_of_the_pickup_day_and_unknown_outside_the_table():
    days = ["2016-01-23 10:00:00", "2016-06-01 08:00:00", "2026-12-02 03:00:00", "2008-12-31 23:00:00"]
    m = build_features({name: np.repeat(values, len(days)) for name, values in one_trip().items()}
                       | {"pickup_datetime": np.array([parse_time(d, "t") for d in days])})
    for row, day in enumerate(days[:2]):
        noaa = WEATHER.loc[pd.Timestamp(day[:10])]
        assert m[row, FEATURES.index("precipitation_in")] == pytest.approx(noaa.PRCP)
        assert m[row, FEATURES.index("snowfall_in")] == pytest.approx(noaa.SNOW)
        assert m[row, FEATURES.index("snow_depth_in")] == pytest.approx(noaa.SNWD)
    assert np.isnan(m[2:, FEATURES.index("precipitation_in")]).all()
    assert m[0, FEATURES.index("pickup_year")] == pytest.approx(2016 + 22 / 366, abs=2e-4)  # by the day


def test_trip_distance_recorded_at_dropoff_is_never_a_feature():
    trips = read_trips(TLC_DIR / "yellow_tripdata_sample_2020-01.csv.gz", tlc_layouts=True)[0].head(50)
    assert trips["trip_distance"].notna().all()
    changed = trips.assign(trip_distance=trips["trip_distance"] * 10 + 1, fare_amount=0.0)
    np.testing.assert_array_equal(build_features(trips), build_features(changed))
    assert not {"trip_distance", "fare_amount", "tip_amount", "total_amount"} & set(FEATURES)

def test_target_round_trip():
    seconds = np.array([0, 1, 661, 3434, 86400])
    np.testing.assert_allclose(duration_from_target(target(seconds)), seconds, rtol=1e-12, atol=1e-9)
    assert duration_from_target(np.array([-5.0]))[0] == 0.0
