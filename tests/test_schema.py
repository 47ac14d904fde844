"""The one trip schema: parsing, conversions, validation reasons, cleaning rules."""
from __future__ import annotations

import io
import json
from datetime import datetime, timezone

import fastavro
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from periscope.schema import (
    SOURCE_FIELDS,
    AVRO_SCHEMA,
    FIELDS,
    RULE_NAMES,
    InvalidTrip,
    check_rules,
    count_rules,
    first_broken_rule,
    format_time,
    parse_fields,
    parse_json,
    parse_time,
    record_to_json,
    trips_to_messages,
    validate,
)

CSV_ROW = {
    "id": "id2875421", "vendor_id": "2", "pickup_datetime": "2016-03-14 17:24:55",
    "dropoff_datetime": "2016-03-14 17:32:30", "passenger_count": "1",
    "pickup_longitude": "-73.982154846191406", "pickup_latitude": "40.767936706542969",
    "dropoff_longitude": "-73.964630126953125", "dropoff_latitude": "40.765602111816406",
    "store_and_fwd_flag": "N", "trip_duration": "455",
}


def good_record() -> dict:
    return parse_fields(CSV_ROW)


def test_csv_row_parses_to_record_form():
    record = good_record()
    assert record["vendor_id"] == 2 and record["trip_duration"] == 455
    as_if_utc = datetime(2016, 3, 14, 17, 24, 55, tzinfo=timezone.utc)  # record form: wall-clock ms
    expected_ms = int(as_if_utc.timestamp()) * 1000
    assert record["pickup_datetime"] == parse_time("2016-03-14 17:24:55", "x") == expected_ms
    assert record["store_and_fwd_flag"] is False
    assert record["pickup_longitude"] == pytest.approx(-73.982154846191406)
    assert check_rules(record) is None


def test_json_message_round_trip():
    record = good_record()
    message = record_to_json(record)
    assert json.loads(message)["pickup_datetime"] == "2016-03-14 17:24:55"
    assert parse_json(message) == record


def test_avro_round_trip():
    record = good_record()
    buffer = io.BytesIO()
    fastavro.writer(buffer, fastavro.parse_schema(AVRO_SCHEMA), [record])
    buffer.seek(0)
    assert list(fastavro.reader(buffer)) == [{**record, **{name: None for name in SOURCE_FIELDS}}]
    assert [f["name"] for f in AVRO_SCHEMA["fields"]] == list(FIELDS + SOURCE_FIELDS)


@pytest.mark.parametrize(
    "value, reason",
    [
        (b"", "empty_message"),
        (None, "empty_message"),
        (b"{not json", "invalid_json"),
        (b"\xff\xfe", "invalid_json"),
        (b"[1, 2]", "invalid_json"),
        (json.dumps({k: v for k, v in CSV_ROW.items() if k != "vendor_id"}).encode(), "missing_field"),
        (json.dumps({**CSV_ROW, "passenger_count": "two"}).encode(), "wrong_type"),
        (json.dumps({**CSV_ROW, "passenger_count": 1.5}).encode(), "wrong_type"),
        (json.dumps({**CSV_ROW, "trip_duration": True}).encode(), "wrong_type"),
        (json.dumps({**CSV_ROW, "pickup_longitude": None}).encode(), "wrong_type"),
        (json.dumps({**CSV_ROW, "pickup_longitude": [1]}).encode(), "wrong_type"),
        (json.dumps({**CSV_ROW, "pickup_datetime": "2016-02-30 10:00:00"}).encode(), "bad_datetime"),
        (json.dumps({**CSV_ROW, "pickup_datetime": 1457976295}).encode(), "wrong_type"),
        (json.dumps({**CSV_ROW, "pickup_datetime": "2016-03-14 17:24+01"}).encode(), "bad_datetime"),
        (json.dumps({**CSV_ROW, "pickup_datetime": "2016-03-14T17:24:55"}).encode(), "bad_datetime"),
        (json.dumps({**CSV_ROW, "vendor_id": 10**30}).encode(), "wrong_type"),
        (json.dumps({**CSV_ROW, "store_and_fwd_flag": "maybe"}).encode(), "wrong_type"),
        (json.dumps({**CSV_ROW, "id": ""}).encode(), "missing_value"),
        (json.dumps({**CSV_ROW, "trip_duration": ""}).encode(), "missing_value"),
    ],
)
def test_malformed_messages_name_their_reason(value, reason):
    with pytest.raises(InvalidTrip) as caught:
        parse_json(value)
    assert caught.value.reason == reason
    record, why = validate(value)
    assert record is None and why.startswith(reason + ":")


def test_missing_field_message_names_the_fields():
    with pytest.raises(InvalidTrip, match="missing vendor_id, trip_duration"):
        parse_fields({k: v for k, v in CSV_ROW.items() if k not in ("vendor_id", "trip_duration")})


@pytest.mark.parametrize(
    "change, rule",
    [
        ({"vendor_id": "3"}, "unknown_vendor"),
        ({"trip_duration": "1", "dropoff_datetime": "2016-03-14 17:24:56"}, "duration_too_short"),
        ({"trip_duration": "86400", "dropoff_datetime": "2016-03-15 17:24:55"}, "duration_too_long"),
        ({"trip_duration": "900"}, "duration_mismatch"),
        ({"passenger_count": "0"}, "passenger_count_out_of_range"),
        ({"passenger_count": "9"}, "passenger_count_out_of_range"),
        ({"pickup_longitude": "0", "pickup_latitude": "0"}, "pickup_outside_nyc"),
        ({"dropoff_latitude": "41.5"}, "dropoff_outside_nyc"),
        ({"dropoff_longitude": "-73.75", "dropoff_latitude": "40.9"}, "implausible_speed"),
    ],
)
def test_each_cleaning_rule_has_a_reason(change, rule):
    record = parse_fields({**CSV_ROW, **change})
    assert check_rules(record) == rule
    assert validate(record_to_json(record)) == (None, rule)
    broken = first_broken_rule({k: np.array([v]) for k, v in record.items() if k != "id"})
    assert RULE_NAMES[broken[0]] == rule


def test_vectorised_and_per_record_rules_agree_on_the_real_sample(sample_trips):
    columns = {name: sample_trips[name].to_numpy() for name in FIELDS[1:]}
    broken = first_broken_rule(columns)
    per_record = [check_rules(r) for r in sample_trips.head(20_000).to_dict("records")]
    vectorised = [RULE_NAMES[i] if i >= 0 else None for i in broken[:20_000]]
    assert per_record == vectorised
    counts = count_rules(broken)
    assert set(counts) == set(RULE_NAMES)
    assert sum(counts.values()) == int((broken >= 0).sum()) > 0


times = st.integers(min_value=1_420_070_400_000, max_value=1_500_000_000_000).map(lambda ms: ms // 1000 * 1000)
records = st.fixed_dictionaries({
    "id": st.text(alphabet="abcdefghij0123456789", min_size=1, max_size=12),
    "vendor_id": st.integers(-5, 5),
    "pickup_datetime": times,
    "dropoff_datetime": times,
    "passenger_count": st.integers(0, 9),
    "pickup_longitude": st.floats(-180, 180),
    "pickup_latitude": st.floats(-90, 90),
    "dropoff_longitude": st.floats(-180, 180),
    "dropoff_latitude": st.floats(-90, 90),
    "store_and_fwd_flag": st.booleans(),
    "trip_duration": st.integers(-100, 10**6),
})


@settings(max_examples=200, deadline=None)
@given(records)
def test_any_record_survives_json_and_is_judged_like_the_vectorised_rules(record):
    assert parse_json(record_to_json(record)) == record
    assert format_time(record["pickup_datetime"]) == record_to_json(record).decode().split('"pickup_datetime":"')[1][:19]
    broken = first_broken_rule({k: np.array([v]) for k, v in record.items() if k != "id"})[0]
    assert check_rules(record) == (RULE_NAMES[broken] if broken >= 0 else None)


def test_vectorised_messages_are_exactly_what_record_to_json_makes(sample_trips):
    for suffix, trips in (("", sample_trips), ("-3", sample_trips.iloc[::10])):
        keys, values = trips_to_messages(trips, suffix)
        records = trips.to_dict("records")
        assert keys == [(record["id"] + suffix).encode() for record in records]
        assert values == [record_to_json(dict(record, id=record["id"] + suffix)) for record in records]


def test_pass_suffix_keeps_replayed_ids_unique():
    from periscope.schema import pass_suffix

    assert [pass_suffix(n) for n in (1, 2, 3, 10)] == ["", "-2", "-3", "-10"]
