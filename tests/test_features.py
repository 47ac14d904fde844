"""Feature engineering: known values, no leakage of the label, one shape for all layers."""
from __future__ import annotations

import numpy as np
import pytest

from periscope.features import FEATURES, build_features, duration_from_target, target, time_parts
from periscope.schema import parse_time


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


def test_real_sample_features_are_finite(sample_trips):
    m = build_features(sample_trips)
    assert m.shape == (len(sample_trips), len(FEATURES))
    assert np.isfinite(m).all()


def test_target_round_trip():
    seconds = np.array([0, 1, 661, 3434, 86400])
    np.testing.assert_allclose(duration_from_target(target(seconds)), seconds, rtol=1e-12, atol=1e-9)
    assert duration_from_target(np.array([-5.0]))[0] == 0.0
