"""periscope.simulation: the simulated trips API's timeline, and publishing each interval exactly once."""
from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
import pytest

import kafka_producer
from periscope import simulation
from periscope.schema import parse_json, record_to_json
from periscope.storage import atomic_write_json, read_json

HOUR_MS = 3_600_000
START = datetime(2026, 1, 5, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def replay(sample_trips):
    trips = kafka_producer.replay_order(sample_trips)
    return trips, simulation.make_timeline(trips["pickup_datetime"].to_numpy(), simulation.to_ms(START))


def test_the_timeline_keeps_weekdays_and_fills_whole_weeks(replay):
    trips, timeline = replay
    assert timeline.cycle_ms == 26 * simulation.WEEK_MS  # 1 January - 30 June 2016
    assert timeline.anchor_ms <= simulation.to_ms(START) < timeline.anchor_ms + simulation.WEEK_MS
    origin_day, anchor_day = timeline.origin_ms // simulation.DAY_MS, timeline.anchor_ms // simulation.DAY_MS
    assert (anchor_day - origin_day) % 7 == 0
    assert timeline.shift_ms(1) - timeline.shift_ms(0) == timeline.cycle_ms
    assert trips["pickup_datetime"].min() >= timeline.origin_ms
    assert trips["pickup_datetime"].max() < timeline.origin_ms + timeline.cycle_ms


def test_consecutive_intervals_hold_every_trip_once_per_cycle(replay):
    """Intervals over one and a half cycles: no trip twice, none skipped, each in its own interval."""
    trips, timeline = replay
    begin = timeline.anchor_ms
    cycle_hours = timeline.cycle_ms // HOUR_MS
    bounds = [begin] + [begin + h * HOUR_MS for h in range(7, cycle_hours + cycle_hours // 2, 7)]
    parts = [simulation.select_interval(trips, timeline, lo, hi) for lo, hi in zip(bounds, bounds[1:])]
    for (lo, hi), part in zip(zip(bounds, bounds[1:]), parts):
        assert ((part["pickup_datetime"] >= lo) & (part["pickup_datetime"] < hi)).all()
        assert part["pickup_datetime"].is_monotonic_increasing
    ids = np.concatenate([part["id"].to_numpy() for part in parts])
    assert len(ids) == len(set(ids))
    first_cycle = set(trips["id"])
    assert {i.removesuffix("-sim1") for i in ids if i.endswith("-sim1")} == first_cycle
    assert not first_cycle & set(ids), "simulated trips are new facts with ids of their own"
    second = {i.removesuffix("-sim2") for i in ids if i.endswith("-sim2")}
    assert second < first_cycle and len(second) > 0.4 * len(first_cycle)


def test_retimed_trips_keep_weekday_hour_duration_and_their_original_times(replay):
    trips, timeline = replay
    lo = timeline.anchor_ms + timeline.cycle_ms + 40 * HOUR_MS  # cycle 1
    part = simulation.select_interval(trips, timeline, lo, lo + 5 * HOUR_MS)
    assert len(part) > 20 and part["id"].str.endswith("-sim2").all()
    shift = part["pickup_datetime"] - part["original_pickup_datetime"]
    assert (shift == timeline.shift_ms(1)).all() and (shift % simulation.WEEK_MS == 0).all()
    assert (part["dropoff_datetime"] - part["pickup_datetime"]
            == part["original_dropoff_datetime"] - part["original_pickup_datetime"]).all()
    original = trips.set_index("id").loc[part["id"].str.removesuffix("-sim2")]
    assert (original["pickup_datetime"].to_numpy() == part["original_pickup_datetime"].to_numpy()).all()


def test_messages_are_the_producers_encoding_with_original_times(replay):
    trips, timeline = replay
    lo = simulation.to_ms(datetime(2026, 1, 5, 12, tzinfo=timezone.utc))
    part = simulation.select_interval(trips, timeline, lo, lo + HOUR_MS)
    messages = simulation.to_messages(part)
    assert len(messages) == len(part) > 0
    key, value = messages[0]
    record = parse_json(value)
    assert key == record["id"].encode() and record["pickup_datetime"] == part["pickup_datetime"].iloc[0]
    assert value.startswith(record_to_json(record)[:-1])
    assert b'"original_pickup_datetime":"2016-01-04 ' in value  # the same Monday of 2016


def test_bad_intervals_are_refused_with_the_reason(replay):
    trips, timeline = replay
    with pytest.raises(ValueError, match="before the simulation's first week"):
        simulation.select_interval(trips, timeline, timeline.anchor_ms - HOUR_MS, timeline.anchor_ms)
    with pytest.raises(ValueError, match="empty interval"):
        simulation.select_interval(trips, timeline, timeline.anchor_ms, timeline.anchor_ms)
    with pytest.raises(ValueError, match="no time zone"):
        simulation.to_ms(datetime(2026, 1, 5))


def read_back(bootstrap, topic):
    return [(m.key, m.value) for m in simulation.read_topic(bootstrap, topic, {})]


@pytest.mark.kafka
def test_publishing_an_interval_twice_sends_it_once(kafka_bootstrap, topics, replay, tmp_path):
    trips, timeline = replay
    topic, _ = topics
    lo = simulation.to_ms(datetime(2026, 1, 6, 17, tzinfo=timezone.utc))
    expected = simulation.to_messages(simulation.select_interval(trips, timeline, lo, lo + HOUR_MS))
    first = simulation.publish_interval(trips, timeline, lo, lo + HOUR_MS, kafka_bootstrap, topic, tmp_path)
    assert (first.planned, first.sent, first.skipped_as_published) == (len(expected), len(expected), False)
    again = simulation.publish_interval(trips, timeline, lo, lo + HOUR_MS, kafka_bootstrap, topic, tmp_path)
    assert (again.sent, again.skipped_as_published) == (0, True)
    assert sorted(read_back(kafka_bootstrap, topic)) == sorted(expected)
    ledger = read_json(first.ledger)
    assert ledger["status"] == "published" and ledger["ids"] == [k.decode() for k, _ in expected]
    assert len(ledger["placed_by_last_attempt"]) == len(expected)


@pytest.mark.kafka
def test_an_attempt_that_died_after_sending_part_is_completed_without_duplicates(kafka_bootstrap, topics, replay,
                                                                                 tmp_path):
    """The crash window: a pending ledger, some trips already in the topic, the final ledger never written."""
    trips, timeline = replay
    topic, _ = topics
    lo = simulation.to_ms(datetime(2026, 1, 7, 8, tzinfo=timezone.utc))
    planned = simulation.to_messages(simulation.select_interval(trips, timeline, lo, lo + 2 * HOUR_MS))
    assert len(planned) > 40
    path = simulation.ledger_path(tmp_path, topic, lo, lo + 2 * HOUR_MS)
    atomic_write_json(path, {"status": "pending", "topic": topic, "trips": len(planned),
                             "ids": [k.decode() for k, _ in planned],
                             "end_offsets_before": simulation.end_offsets(kafka_bootstrap, topic)})
    simulation.send(kafka_bootstrap, topic, planned[::3])  # what the dead attempt got out
    simulation.send(kafka_bootstrap, topic, [(b"someone-else", b"{}")])  # another producer meanwhile

    outcome = simulation.publish_interval(trips, timeline, lo, lo + 2 * HOUR_MS, kafka_bootstrap, topic, tmp_path)
    assert outcome.already_in_topic == len(planned[::3])
    assert outcome.sent == len(planned) - len(planned[::3])
    landed = [m for m in read_back(kafka_bootstrap, topic) if m[0] != b"someone-else"]
    assert sorted(landed) == sorted(planned)
    assert read_json(path)["status"] == "published"


def test_a_run_without_a_logical_date_takes_the_hour_before_its_trigger():
    triggered = simulation.to_ms(datetime(2026, 11, 22, 7, 54, 1, 736333, tzinfo=timezone.utc))
    start, end = simulation.last_whole_hour(triggered)
    assert (start, end) == (simulation.to_ms(datetime(2026, 11, 22, 6, tzinfo=timezone.utc)),
                            simulation.to_ms(datetime(2026, 11, 22, 7, tzinfo=timezone.utc)))
    assert simulation.last_whole_hour(end) == (start, end)
