"""Mergeable views: the Lambda property and the finalised statistics."""
from __future__ import annotations

import numpy as np
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from periscope import views
from periscope.schema import FIELDS, first_broken_rule


def clean(trips: pd.DataFrame) -> pd.DataFrame:
    return trips[first_broken_rule({n: trips[n].to_numpy() for n in FIELDS[1:]}) < 0].reset_index(drop=True)


def test_every_view_has_keys_and_integer_aggregates(sample_trips):
    result = views.aggregate(clean(sample_trips))
    assert set(result) == set(views.VIEWS)
    for name, frame in result.items():
        assert list(frame.columns) == list(views.VIEWS[name]) + list(views.AGGREGATES)
        assert all(frame[a].dtype == np.int64 for a in views.AGGREGATES)
        assert frame["trips"].sum() == len(clean(sample_trips))
        assert not frame.duplicated(list(views.VIEWS[name])).any()


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_merge_of_any_split_equals_the_view_of_the_whole(sample_trips, data):
    trips = clean(sample_trips).iloc[: data.draw(st.integers(0, 3000), label="n")]
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    parts = data.draw(st.integers(1, 4), label="parts")
    assignment = np.random.default_rng(seed).integers(0, parts, len(trips))
    pieces = [views.aggregate(trips[assignment == p]) for p in range(parts)]
    assert views.views_equal(views.merge(*pieces), views.aggregate(trips))


def test_merge_with_nothing_is_identity(sample_trips):
    whole = views.aggregate(clean(sample_trips).head(500))
    empty = views.aggregate(clean(sample_trips).head(0))
    assert views.views_equal(views.merge(whole, empty), whole)
    assert views.views_equal(views.merge(empty, whole), whole)
    assert views.views_equal(views.merge(), {name: views.empty_view(name) for name in views.VIEWS})


def test_finalised_statistics_match_pandas(sample_trips):
    trips = clean(sample_trips)
    daily = views.finalise(views.aggregate(trips)["daily_summary"])
    date = pd.to_datetime(trips["pickup_datetime"], unit="ms").dt.normalize()
    expected = trips.groupby(date)["trip_duration"].agg(["count", "mean", "std", "min", "max"])
    np.testing.assert_array_equal(daily["trips"], expected["count"])
    np.testing.assert_allclose(daily["duration_s_mean"], expected["mean"], rtol=1e-12)
    np.testing.assert_allclose(daily["duration_s_std"], expected["std"], rtol=1e-9)
    np.testing.assert_array_equal(daily["duration_s_min"], expected["min"])
    np.testing.assert_array_equal(daily["duration_s_max"], expected["max"])
    bands = views.finalise(views.aggregate(trips)["distance_bands"])
    assert list(bands["distance_band_label"]) == list(views.DISTANCE_BAND_LABELS)
    grid = views.finalise(views.aggregate(trips)["pickup_grid"])
    assert grid["latitude"].between(40.5, 41.0).all() and grid["longitude"].between(-74.3, -73.7).all()
