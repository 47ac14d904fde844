"""The Lambda merge on real files: merge(batch(first part), speed(rest)) == batch(all)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import batch_processor
from periscope import serving, speed_view, storage, views
from periscope.schema import FIELDS, first_broken_rule

TOPIC = "taxi-trips"


@pytest.fixture(scope="module")
def stream(sample_trips) -> pd.DataFrame:
    """2,400 clean real trips laid out as if consumed from 3 partitions."""
    trips = sample_trips.iloc[:2500]
    trips = trips[first_broken_rule({n: trips[n].to_numpy() for n in FIELDS[1:]}) < 0].head(2400).copy()
    trips["partition"] = np.arange(len(trips)) % 3
    trips["offset"] = np.arange(len(trips)) // 3
    trips["kafka_timestamp_ms"] = 1_700_000_000_000
    trips["visible_at_ms"] = 1_700_000_000_100
    trips["predicted_duration_s"] = 600.0
    trips["model_version"] = "test"
    return trips.reset_index(drop=True)


def lay_out(stream: pd.DataFrame, cut: dict[int, int], root) -> tuple:
    """Master data up to ``cut[p]`` (inclusive) per partition; the speed layer has seen everything."""
    master, views_dir, speed = root / "master", root / "views", root / "speed"
    for partition, rows in stream.groupby("partition"):
        batch_rows = rows[rows["offset"] <= cut[partition]]
        if len(batch_rows):
            batch = [(int(r["offset"]), {n: r[n] for n in FIELDS}, None) for r in batch_rows.to_dict("records")]
            batch_processor.write_stream_file(master, TOPIC, partition, batch)
        for start in range(0, len(rows), 150):
            speed_view.write_batch(speed, partition, rows.iloc[start:start + 150])
    return master, views_dir, speed


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cuts=st.tuples(*(st.integers(-1, 799) for _ in range(3))))
def test_batch_of_a_prefix_plus_speed_of_the_rest_equals_batch_of_all(stream, tmp_path_factory, cuts):
    root = tmp_path_factory.mktemp("lambda")
    cut = dict(enumerate(cuts))
    master, views_dir, speed = lay_out(stream, cut, root)
    if storage.master_files(master):
        batch_processor.recompute(master, views_dir, workers=1, keep=2, progress=False)
    expected = views.aggregate(stream)

    combined = serving.combined_views(views_dir, speed)
    assert views.views_equal(combined.views, expected)
    assert combined.batch_trips + combined.speed_trips == len(stream)
    above = {p: c for p, c in cut.items() if c >= 0}
    assert combined.watermark == above

    if storage.master_files(master):
        batch_processor.recompute(master, views_dir, workers=1, keep=2, progress=False, speed_dir=speed)
    after_prune = serving.combined_views(views_dir, speed)
    assert views.views_equal(after_prune.views, expected)
    for partition, _, last, _ in speed_view.batch_files(speed):
        assert last > above.get(partition, -1), "speed files wholly below the watermark are pruned"


def test_only_speed_data_and_only_batch_data(stream, tmp_path):
    _, views_dir, speed = lay_out(stream, {0: -1, 1: -1, 2: -1}, tmp_path)
    only_speed = serving.combined_views(views_dir, speed)
    assert only_speed.batch_version is None and only_speed.speed_trips == len(stream)
    assert views.views_equal(only_speed.views, views.aggregate(stream))

    nothing = serving.combined_views(tmp_path / "no-views", tmp_path / "no-speed")
    assert nothing.batch_trips == nothing.speed_trips == 0
    assert all(len(frame) == 0 for frame in nothing.views.values())


def test_rewriting_the_same_offsets_replaces_instead_of_adding(stream, tmp_path):
    rows = stream[stream["partition"] == 0].head(100)
    first = speed_view.write_batch(tmp_path, 0, rows)
    again = speed_view.write_batch(tmp_path, 0, rows)
    assert first == again and len(speed_view.batch_files(tmp_path)) == 1
    assert len(speed_view.read_speed(tmp_path)) == 100
    assert speed_view.last_offsets(tmp_path) == {0: int(rows["offset"].max())}
