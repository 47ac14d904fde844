"""The Lambda merge on real files: merge(batch(first part), speed(rest)) == batch(all distinct facts).

The trips are real (the shipped sample), laid out the way the layers lay them
out: history imported from a CSV file by ``batch_processor.import_csv``,
stream master files by ``batch_processor.write_stream_file`` up to each
partition's watermark, speed files by ``speed_view.write_batch`` for what the
speed layer has seen (only trips passing the cleaning rules: it sends the
others to the dead-letter topic). Expected values are a pandas computation
over the trips themselves: first copy of each id in source order (history,
then the stream by partition and offset), then the cleaning rules, then
``views.aggregate``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import batch_processor
from periscope import serving, speed_view, storage, views, zones
from periscope.dashboard import data
from periscope.schema import FIELDS, NOT_RECORDED, REVENUE_FIELDS, ZONE_FIELDS, first_broken_rule
from tests.conftest import views_as_the_batch_layer_holds_them

TOPIC = "taxi-trips"
PARTITIONS = 3
HISTORY, LATE_HISTORY, STREAM = "history", "late history", "stream"
"""Where a copy of a trip arrives: the first CSV import, a second one before the next batch run, Kafka."""
POOL_CLEAN, POOL_BROKEN = 150, 10


def broken_rule(trips: pd.DataFrame) -> np.ndarray:
    return first_broken_rule({name: trips[name].to_numpy() for name in FIELDS[1:]})


def with_speed_columns(trips: pd.DataFrame) -> pd.DataFrame:
    """Trips (with ``partition`` and ``offset``) as rows of a speed file."""
    rows = trips.copy()
    rows["kafka_timestamp_ms"] = 1_700_000_000_000 + rows["offset"] * 10
    rows["visible_at_ms"] = rows["kafka_timestamp_ms"] + 100
    rows["predicted_duration_s"] = 600.0
    rows["model_version"] = "test"
    rows = rows.reindex(columns=list(speed_view.COLUMNS), fill_value=NOT_RECORDED)
    rows[list(REVENUE_FIELDS)] = np.nan  # Kaggle trips record no fare
    for name in ZONE_FIELDS:  # Kaggle trips: the speed layer gives them the zones of their coordinates
        rows[name] = zones.zones_at(rows, name.split("_")[0])
    return rows


def distinct_facts(copies: pd.DataFrame) -> pd.DataFrame:
    """The independent recompute: first copy of each id in the given (source) order, then the cleaning rules."""
    first = copies.drop_duplicates("id", keep="first")
    return first[broken_rule(first) < 0]


def aggregate(trips: pd.DataFrame) -> dict[str, pd.DataFrame]:
    return views_as_the_batch_layer_holds_them(trips[list(FIELDS)])


@pytest.fixture(scope="module")
def stream(sample_trips) -> pd.DataFrame:
    """2,400 clean real trips laid out as if consumed from 3 partitions."""
    trips = sample_trips.iloc[:2500]
    trips = trips[broken_rule(trips) < 0].head(2400).copy()
    trips["partition"] = np.arange(len(trips)) % 3
    trips["offset"] = np.arange(len(trips)) // 3
    return with_speed_columns(trips).reset_index(drop=True)


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
    assert only_speed.speed_duplicates == 0 and not only_speed.index_missing

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


# --- any pattern of duplicates -----------------------------------------------------------------------


@dataclass(frozen=True)
class Pool:
    """Real trips to draw from (record form) and the same trips as lines of the shipped CSV."""

    trips: pd.DataFrame
    csv: pd.DataFrame


@pytest.fixture(scope="module")
def pool(sample_trips, sample_csv) -> Pool:
    """150 real trips passing the cleaning rules and 10 breaking one, with their original CSV lines."""
    raw = pd.read_csv(sample_csv, dtype=str, keep_default_na=False)
    assert (raw["id"].to_numpy() == sample_trips["id"].to_numpy()).all()
    broken = broken_rule(sample_trips)
    picked = np.concatenate([np.flatnonzero(broken < 0)[:POOL_CLEAN], np.flatnonzero(broken >= 0)[:POOL_BROKEN]])
    return Pool(sample_trips.iloc[picked].reset_index(drop=True), raw.iloc[picked].reset_index(drop=True))


@dataclass(frozen=True)
class Scenario:
    """Copies of trips and where they arrive; per partition, two batch watermarks and the speed layer's progress.

    ``copies``: (pool row, kind, partition). A trip's stream copies share its
    partition (Kafka partitions by key, the trip id); history copies carry the
    partition too, unused. ``first_cut <= second_cut``: the watermarks of the two
    batch runs (-1 = nothing of that partition in master data); ``seen``: the
    highest offset the speed layer has written.
    """

    copies: tuple[tuple[int, str, int], ...]
    order: tuple[int, ...]
    first_cut: dict[int, int]
    second_cut: dict[int, int]
    seen: dict[int, int]
    speed_file_rows: int
    master_file_rows: int


@st.composite
def scenarios(draw) -> Scenario:
    picked = draw(st.lists(st.integers(0, POOL_CLEAN + POOL_BROKEN - 1), min_size=1, max_size=25, unique=True))
    copies = []
    for trip in picked:
        partition = draw(st.integers(0, PARTITIONS - 1))
        for kind in draw(st.lists(st.sampled_from((HISTORY, LATE_HISTORY, STREAM, STREAM)), min_size=1, max_size=3)):
            copies.append((trip, kind, partition))
    order = tuple(draw(st.permutations(range(len(copies)))))
    first_cut, second_cut, seen = {}, {}, {}
    for partition in range(PARTITIONS):
        last = sum(1 for _, kind, p in copies if kind == STREAM and p == partition) - 1
        first_cut[partition] = draw(st.integers(-1, last))
        second_cut[partition] = draw(st.integers(first_cut[partition], last))
        seen[partition] = draw(st.integers(-1, last))
    return Scenario(tuple(copies), order, first_cut, second_cut, seen,
                    draw(st.integers(1, 5)), draw(st.integers(1, 5)))


def copies_frame(pool: Pool, scenario: Scenario) -> pd.DataFrame:
    """Every copy with its trip's fields, ``kind``, ``partition``, ``offset`` (stream only) and ``csv_row``."""
    rows, kinds, partitions = zip(*scenario.copies)
    copies = pool.trips.iloc[list(rows)].reset_index(drop=True)
    copies["csv_row"] = list(rows)
    copies["kind"], copies["partition"], copies["rank"] = kinds, partitions, scenario.order
    copies = copies.sort_values("rank", ignore_index=True)
    stream = copies["kind"] == STREAM
    copies["offset"] = -1
    copies.loc[stream, "offset"] = copies[stream].groupby("partition").cumcount()
    copies["clean"] = broken_rule(copies) < 0
    return copies


def source_order(copies: pd.DataFrame, published: tuple[str, ...], upto: dict[int, int]) -> pd.DataFrame:
    """The copies a batch over ``published`` imports plus stream offsets ``<= upto[p]``, in source order."""
    history = [copies[copies["kind"] == kind] for kind in published]
    stream = copies[(copies["kind"] == STREAM) & (copies["offset"] <= copies["partition"].map(upto).fillna(-1))]
    return pd.concat([*history, stream.sort_values(["partition", "offset"])], ignore_index=True)


def import_history(master: Path, pool: Pool, copies: pd.DataFrame, kind: str, root: Path) -> None:
    lines = pool.csv.iloc[copies.loc[copies["kind"] == kind, "csv_row"]]
    if len(lines):
        path = root / f"{kind.replace(' ', '-')}.csv"
        lines.to_csv(path, index=False)
        batch_processor.import_csv(path, master)


def write_speed(speed: Path, copies: pd.DataFrame, seen: dict[int, int], file_rows: int) -> None:
    """What the speed layer writes: the clean copies up to its progress, ``file_rows`` per file."""
    valid = copies[(copies["kind"] == STREAM) & copies["clean"]]
    for partition, rows in valid.groupby("partition"):
        rows = rows[rows["offset"] <= seen[partition]]
        for start in range(0, len(rows), file_rows):
            speed_view.write_batch(speed, int(partition), with_speed_columns(rows.iloc[start:start + file_rows]))


def write_master_stream(master: Path, copies: pd.DataFrame, after: dict[int, int], upto: dict[int, int],
                        file_rows: int) -> None:
    """What the batch layer ingests: every copy (clean or not) with ``after[p] < offset <= upto[p]``."""
    for partition, rows in copies[copies["kind"] == STREAM].groupby("partition"):
        rows = rows[(rows["offset"] > after[partition]) & (rows["offset"] <= upto[partition])]
        records = [(int(r["offset"]), {n: r[n] for n in FIELDS}, None) for r in rows.to_dict("records")]
        for start in range(0, len(records), file_rows):
            batch_processor.write_stream_file(master, TOPIC, int(partition), records[start:start + file_rows])


def check_merge(combined: serving.Combined, copies: pd.DataFrame, published: tuple[str, ...],
                watermark: dict[int, int], seen: dict[int, int]) -> None:
    """merged == the independent recompute over what the version and the speed layer cover; duplicates counted."""
    cover = {p: max(watermark.get(p, -1), seen[p]) for p in range(PARTITIONS)}
    facts = distinct_facts(source_order(copies, published, cover))
    assert views.views_equal(combined.views, aggregate(facts))
    assert combined.batch_trips + combined.speed_trips == len(facts)
    assert combined.watermark == watermark
    assert not combined.index_missing

    in_version = set(source_order(copies, published, watermark)["id"])
    above = copies[(copies["kind"] == STREAM) & copies["clean"]
                   & (copies["offset"] > copies["partition"].map(watermark).fillna(-1))
                   & (copies["offset"] <= copies["partition"].map(seen))].sort_values(["partition", "offset"])
    of_batch = above["id"].isin(in_version)
    of_speed = above.loc[~of_batch, "id"].duplicated()
    assert (combined.speed_duplicates_of_batch, combined.speed_duplicates_of_speed) == (of_batch.sum(), of_speed.sum())
    assert combined.speed_rows["id"].is_unique and not combined.speed_rows["id"].isin(in_version).any()


@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(scenario=scenarios())
def test_merged_equals_a_recompute_over_the_distinct_facts_for_any_duplicates(pool, tmp_path_factory, scenario):
    """History, stream and two batch runs with a prune; copies within the stream, history vs stream,
    across the watermark and across a publish."""
    root = tmp_path_factory.mktemp("dupes")
    master, views_dir, speed = root / "master", root / "views", root / "speed"
    copies = copies_frame(pool, scenario)
    nothing = {p: -1 for p in range(PARTITIONS)}
    first = {p: cut for p, cut in scenario.first_cut.items() if cut >= 0}
    second = {p: cut for p, cut in scenario.second_cut.items() if cut >= 0}

    import_history(master, pool, copies, HISTORY, root)
    write_speed(speed, copies, scenario.seen, scenario.speed_file_rows)
    check_merge(serving.combined_views(views_dir, speed), copies, (), {}, scenario.seen)

    write_master_stream(master, copies, nothing, scenario.first_cut, scenario.master_file_rows)
    published: tuple[str, ...] = ()
    if storage.master_files(master):
        batch_processor.recompute(master, views_dir, workers=1, keep=2, progress=False, speed_dir=speed)
        published = (HISTORY,)
    check_merge(serving.combined_views(views_dir, speed), copies, published, first if published else {},
                scenario.seen)

    import_history(master, pool, copies, LATE_HISTORY, root)
    write_master_stream(master, copies, scenario.first_cut, scenario.second_cut, scenario.master_file_rows)
    check_merge(serving.combined_views(views_dir, speed), copies, published, first if published else {},
                scenario.seen)

    if storage.master_files(master):
        batch_processor.recompute(master, views_dir, workers=1, keep=2, progress=False, speed_dir=speed)
        published = (HISTORY, LATE_HISTORY)
    check_merge(serving.combined_views(views_dir, speed), copies, published, second if published else {},
                scenario.seen)
    for partition, _, last, _ in speed_view.batch_files(speed):
        assert last > second.get(partition, -1), "speed files wholly below the watermark are pruned"


# --- copies that differ ---------------------------------------------------------------------------------


def changed(trip: pd.Series, extra_s: int) -> pd.Series:
    """The same trip id with a longer duration (and the dropoff to match): a copy that differs."""
    other = trip.copy()
    other["trip_duration"] += extra_s
    other["dropoff_datetime"] += extra_s * 1000
    return other


@pytest.mark.parametrize("layout", ["both in the speed view", "first in the batch, second above the watermark",
                                    "both in the batch", "history copy, stream copy above the watermark"])
@pytest.mark.parametrize("extra_s", [300, -200], ids=["longer second", "shorter second"])
def test_of_two_different_copies_the_earliest_counts(pool, tmp_path, layout, extra_s):
    """Partition 0 holds 20 trips, trip X at offsets 5 and 12 (second copy's duration differs): the merge
    counts the copy at offset 5 (or the history copy), as the batch rule does."""
    master, views_dir, speed = tmp_path / "master", tmp_path / "views", tmp_path / "speed"
    clean = pool.trips[broken_rule(pool.trips) < 0]
    at = int(np.flatnonzero(clean["trip_duration"].between(1000, 3000))[0])
    x, late = clean.iloc[at], changed(clean.iloc[at], extra_s)
    others = clean.drop(index=clean.index[at]).iloc[:18]
    stream = pd.concat([others.iloc[:5], x.to_frame().T, others.iloc[5:11], late.to_frame().T, others.iloc[11:]],
                       ignore_index=True).astype(pool.trips.dtypes.to_dict())
    stream["partition"], stream["offset"] = 0, np.arange(len(stream))
    history = []
    if layout == "history copy, stream copy above the watermark":
        pool.csv.loc[[clean.index[at]]].to_csv(tmp_path / "history.csv", index=False)
        batch_processor.import_csv(tmp_path / "history.csv", master)
        history = [x.to_frame().T.astype(pool.trips.dtypes.to_dict())]
        stream.loc[5, list(FIELDS)] = changed(x, 2 * extra_s)  # a third version, in the stream: it counts not
    assert (broken_rule(stream) < 0).all(), "every copy passes the cleaning rules: the speed layer keeps them all"
    watermark = {"both in the speed view": -1, "first in the batch, second above the watermark": 8,
                 "both in the batch": 15, "history copy, stream copy above the watermark": -1}[layout]
    speed_view.write_batch(speed, 0, with_speed_columns(stream))
    if watermark >= 0:
        write_master_stream(master, stream.assign(kind=STREAM), {0: -1}, {0: watermark}, 100)
    if storage.master_files(master):
        batch_processor.recompute(master, views_dir, workers=1, keep=2, progress=False, speed_dir=speed)

    combined = serving.combined_views(views_dir, speed)
    facts = distinct_facts(pd.concat([*history, stream[list(FIELDS)]], ignore_index=True))
    assert views.views_equal(combined.views, aggregate(facts))
    counted = x["trip_duration"]
    total = int(others["trip_duration"].sum()) + counted
    assert combined.views["daily_summary"]["duration_s_sum"].sum() == total
    assert combined.batch_trips + combined.speed_trips == len(others) + 1
    left_out = 2 if layout.startswith("history") else 1 if layout != "both in the batch" else 0
    assert combined.speed_duplicates == left_out


# --- the trip index: read once per version, missing in old versions ------------------------------------


def test_the_index_is_read_once_per_version_and_a_rebuilt_version_is_read_again(stream, tmp_path):
    master, views_dir, speed = lay_out(stream, {0: 99, 1: 99, 2: 99}, tmp_path)
    published = batch_processor.recompute(master, views_dir, workers=1, keep=2, progress=False)
    version = published["version"]
    index = serving.trip_index(views_dir, version)
    assert index is not None and len(index) == 300
    assert serving.trip_index(views_dir, version) is index, "cached: a refresh does not read it again"
    inside, outside = stream["id"].iloc[:300].to_numpy(), stream["id"].iloc[300:].to_numpy()
    assert index.contains(inside).all() and not index.contains(outside).any()

    storage.write_trip_index(views_dir / version, stream["id"].iloc[:10].to_numpy())
    assert len(serving.trip_index(views_dir, version)) == 10, "a file rewritten under the same name is read again"
    assert serving.trip_index(views_dir, "v999999") is None


def test_ids_are_compared_exactly_byte_for_byte():
    ids = np.array(["id1", "id1\x00", "id10", "é", "e", "id2", "ïd"], dtype=object)
    index = serving.TripIndex.of(ids[[0, 3, 5]])
    assert index.contains(ids).tolist() == [True, False, False, True, False, True, False]
    unsorted = serving.TripIndex.of(np.array(["b", "a", "b", "c"], dtype=object))
    assert len(unsorted) == 3 and unsorted.contains(np.array(["a", "c", "d"], dtype=object)).tolist() == [
        True, True, False]


@pytest.mark.parametrize("ids", [["g3", "g1", "g22", "a\x00", "a", "a\x00b", "b"], ["id2", "é", "id10", "e\x00"]],
                         ids=["ascii (read in Arrow)", "not ascii"])
def test_an_index_read_from_its_file_finds_exactly_its_ids(tmp_path, ids):
    storage.write_trip_index(tmp_path, np.array(ids, dtype=object))
    index = serving.TripIndex.read(tmp_path / storage.TRIP_INDEX)
    asked = np.array([*ids, "a\x00\x00", "g2", "id1", "e", "", "b\x01"], dtype=object)
    assert index.contains(asked).tolist() == [True] * len(ids) + [False] * 6
    assert len(index) == len(ids) and (index.keys == serving.TripIndex.of(np.array(ids, dtype=object)).keys).all()


def test_a_version_without_an_index_excludes_no_ids_and_says_so(stream, tmp_path):
    """Versions published before issue 11 carry no index: speed duplicates of the batch count twice."""
    master, views_dir, speed = lay_out(stream, {0: 399, 1: 399, 2: 399}, tmp_path)
    batch_views = aggregate(stream.iloc[:300])
    storage.write_version(views_dir, batch_views, {"watermark": {"0": 99, "1": 99, "2": 99}}, keep=2)
    again = stream.iloc[:30].assign(partition=0, offset=np.arange(800, 830))
    speed_view.write_batch(speed, 0, again)

    combined = serving.combined_views(views_dir, speed)
    assert combined.index_missing and combined.batch_index_trips is None
    assert combined.speed_trips == len(stream) - 300 + len(again), "the copies of batch trips count twice"
    assert combined.speed_duplicates == 0
    sentence = data.coverage_sentence(data.coverage(combined))
    assert "has no trip index" in sentence


def test_the_coverage_sentence_counts_the_speed_rows_left_out(stream, tmp_path):
    master, views_dir, speed = lay_out(stream, {0: 99, 1: 99, 2: 99}, tmp_path)
    batch_processor.recompute(master, views_dir, workers=1, keep=2, progress=False, speed_dir=speed)
    in_batch = stream.iloc[:12].assign(partition=1, offset=np.arange(900, 912))
    in_speed = stream.iloc[1500:1507].assign(partition=2, offset=np.arange(900, 907))
    speed_view.write_batch(speed, 1, in_batch)
    speed_view.write_batch(speed, 2, in_speed)

    combined = serving.combined_views(views_dir, speed)
    assert (combined.speed_duplicates_of_batch, combined.speed_duplicates_of_speed) == (12, 7)
    assert combined.batch_index_trips == 300 and combined.speed_trips == len(stream) - 300
    cover = data.coverage(combined)
    assert (cover.speed_duplicates_of_batch, cover.speed_duplicates_of_speed) == (12, 7)
    assert "19 speed rows left out as copies (12 of trips in the batch, 7 of earlier speed rows)" in \
        data.coverage_sentence(cover)
