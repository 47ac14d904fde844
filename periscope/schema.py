"""The one trip schema: fields, Avro schema, parsing, validation rules.

Every layer speaks about a trip in the same three shapes, converted here and
nowhere else:

* a **CSV row** in the Kaggle "NYC Taxi Trip Duration" layout (all strings),
  or a row of a TLC trip-record file (``periscope.tlc`` maps its layouts onto
  ``TRIP_FIELDS``: the Kaggle fields plus ``SOURCE_FIELDS``, the zones,
  distance and fares TLC records);
* a **JSON message** on the ``taxi-trips`` topic: the same eleven fields with
  JSON types, times as ``"YYYY-MM-DD HH:MM:SS"`` (New York wall-clock time,
  as in the Kaggle data), ``store_and_fwd_flag`` as ``"Y"``/``"N"``; a TLC
  trip's message adds ``SOURCE_FIELDS``, null where its file recorded nothing
  (``from_tlc_source``; docs/STREAMING.md, "Messages");
* an **Avro record** in the master dataset, which is also the in-memory
  "record" form: times as integer milliseconds since 1970-01-01 00:00 of the
  same wall clock (no time zone is attached to the data, so none is invented),
  the flag as a boolean. A value the source did not record is null in Avro
  and, in record form, ``NOT_RECORDED`` (-1) in an integer field, NaN in a
  float one. A trip has a place at each end: coordinates, a taxi zone, or both.

``record_to_json`` encodes one record; ``trips_to_messages`` encodes a whole
trip frame to the same bytes, vectorised, for the producer's hot loop.

Validation has two stages, and every failure has a reason code:

1. *parsing* (``InvalidTrip``): the value cannot be a trip at all — invalid
   JSON, a missing field, text where a number belongs, an impossible date;
2. *cleaning rules* (``RULES``): the trip is well formed but not plausible —
   a one-second trip, a pickup in the Atlantic, zero passengers.

The master dataset keeps every well-formed trip (raw facts are immutable;
rules may change and views are recomputed). Views, the model's live error and
the speed layer apply the rules, counting each rejection under the first rule
it breaks. The rules are written once, as expressions that work on numpy
arrays and on plain scalars alike, so the batch layer (vectorised over
millions of rows) and the speed layer (record by record) cannot disagree.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd

from periscope.expressions import (Expr, arcsin, cos, evaluate, field, isnan, maximum, radians, sin, sqrt,
                                   square, where)

FIELDS: tuple[str, ...] = (
    "id",
    "vendor_id",
    "pickup_datetime",
    "dropoff_datetime",
    "passenger_count",
    "pickup_longitude",
    "pickup_latitude",
    "dropoff_longitude",
    "dropoff_latitude",
    "store_and_fwd_flag",
    "trip_duration",
)
"""The Kaggle columns, in file order. Every CSV must have all of them."""

INT_FIELDS = ("vendor_id", "passenger_count", "trip_duration")
FLOAT_FIELDS = ("pickup_longitude", "pickup_latitude", "dropoff_longitude", "dropoff_latitude")
TIME_FIELDS = ("pickup_datetime", "dropoff_datetime")
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
EPOCH = datetime(1970, 1, 1)
_MS = timedelta(milliseconds=1)
_TIME_PATTERN = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}")

NOT_RECORDED = -1
"""An integer field the source did not record, in record form (null in Avro; NaN for a float)."""

SERVICES: tuple[str, ...] = ("yellow", "green")
"""The services a trip can come from (``service``): yellow and green cabs."""

SOURCE_FIELDS: tuple[str, ...] = (
    "service",
    "source_layout",
    "pickup_location_id",
    "dropoff_location_id",
    "trip_distance",
    "fare_amount",
    "tip_amount",
    "total_amount",
    "payment_type",
)
"""What TLC files add to the Kaggle fields, all nullable (a Kaggle trip has only its zones, from its coordinates)."""

ZONE_FIELDS: tuple[str, ...] = ("pickup_location_id", "dropoff_location_id")
"""The taxi zone of each end: recorded by zone-era TLC files, given from the coordinates to every other
trip when it enters master data (``periscope.zones.assign_zones``)."""

REVENUE_FIELDS: tuple[str, ...] = ("fare_amount", "tip_amount", "total_amount")
"""What a trip cost, in dollars, as its source recorded it (NaN in record form where it did not: every
Kaggle trip). The views sum them (``periscope.views``), so the speed rows carry them too."""

TRIP_FIELDS: tuple[str, ...] = FIELDS + SOURCE_FIELDS
"""Every field of a trip in master data: the Kaggle fields, then ``SOURCE_FIELDS``."""

NULLABLE_FIELDS: tuple[str, ...] = ("vendor_id", "passenger_count", "pickup_longitude", "pickup_latitude",
                                    "dropoff_longitude", "dropoff_latitude", "store_and_fwd_flag") + SOURCE_FIELDS
"""Fields a trip may lack: TLC files leave vendor and passengers empty, have coordinates or zones."""


def _nullable(field: dict[str, Any]) -> dict[str, Any]:
    return {**field, "type": ["null", field["type"]], "default": None}


_KAGGLE_AVRO_FIELDS: list[dict[str, Any]] = [
    {"name": "id", "type": "string",
     "doc": "Trip id, e.g. id2875421, or tlc_ + a hash of the row for a source without ids; the Kafka key."},
    {"name": "vendor_id", "type": "int", "doc": "Technology provider: 1 Creative Mobile, 2 VeriFone (Curb)."},
    {
        "name": "pickup_datetime",
        "type": "long",
        "doc": "Event time: New York wall-clock pickup time, ms since 1970-01-01 00:00.",
    },
    {"name": "dropoff_datetime", "type": "long", "doc": "Same clock as pickup_datetime."},
    {"name": "passenger_count", "type": "int"},
    {"name": "pickup_longitude", "type": "double"},
    {"name": "pickup_latitude", "type": "double"},
    {"name": "dropoff_longitude", "type": "double"},
    {"name": "dropoff_latitude", "type": "double"},
    {"name": "store_and_fwd_flag", "type": "boolean", "doc": "Y in the source: held in the car, sent later."},
    {"name": "trip_duration", "type": "int", "doc": "Seconds; the label the model predicts."},
]
_SOURCE_AVRO_FIELDS: list[dict[str, Any]] = [
    {"name": "service", "type": "string", "doc": "yellow or green; null in files written before it was kept "
                                                  "(Kaggle trips: yellow)."},
    {"name": "source_layout", "type": "string", "doc": "The layout of the file the trip came from "
                                                        "(periscope.tlc.LAYOUTS); null: kaggle."},
    {"name": "pickup_location_id", "type": "int", "doc": "TLC taxi zone 1..263 (264, 265: unknown)."},
    {"name": "dropoff_location_id", "type": "int"},
    {"name": "trip_distance", "type": "double", "doc": "Miles, as the taximeter recorded it (at dropoff)."},
    {"name": "fare_amount", "type": "double", "doc": "Dollars, as recorded."},
    {"name": "tip_amount", "type": "double"},
    {"name": "total_amount", "type": "double"},
    {"name": "payment_type", "type": "int", "doc": "1 card, 2 cash, 3 no charge, 4 dispute, 5 unknown, 6 voided."},
]

KAGGLE_AVRO_SCHEMA: dict[str, Any] = {
    "type": "record",
    "name": "Trip",
    "namespace": "periscope",
    "doc": "One NYC yellow-cab trip, as in the Kaggle NYC Taxi Trip Duration data.",
    "fields": _KAGGLE_AVRO_FIELDS,
}
"""The schema master files of Kaggle-field trips had before every trip got its zones."""

ZONED_KAGGLE_AVRO_SCHEMA: dict[str, Any] = {
    **KAGGLE_AVRO_SCHEMA,
    "fields": _KAGGLE_AVRO_FIELDS + [
        {"name": "pickup_location_id", "type": "int",
         "doc": "TLC taxi zone holding the pickup point, 0 for none (periscope.zones.zone_of)."},
        {"name": "dropoff_location_id", "type": "int", "doc": "The same for the dropoff point."}],
}
"""What master files of Kaggle-field trips are written with since every trip gets its zones: the
Kaggle fields and the two zones, none nullable (every Kaggle trip has coordinates, so a zone, 0 for
none). Schema resolution reads it, like ``KAGGLE_AVRO_SCHEMA``, as ``AVRO_SCHEMA``."""

AVRO_SCHEMA: dict[str, Any] = {
    "type": "record",
    "name": "Trip",
    "namespace": "periscope",
    "doc": "One NYC taxi trip: the Kaggle NYC Taxi Trip Duration fields, then what TLC trip records add.",
    "fields": [_nullable(f) if f["name"] in NULLABLE_FIELDS else f
               for f in _KAGGLE_AVRO_FIELDS + _SOURCE_AVRO_FIELDS],
}
"""The master dataset's schema, evolved compatibly from ``KAGGLE_AVRO_SCHEMA``: the fields added
are nullable with default null, and the Kaggle fields TLC files may lack became unions with null,
so every master file written before, and every one written now with ``ZONED_KAGGLE_AVRO_SCHEMA``,
reads with this schema (Avro schema resolution; ``tests/test_tlc.py`` checks it)."""


def avro_type(field: Mapping[str, Any]) -> str:
    """The non-null type of an Avro field: ``"int"`` for ``["null", "int"]``."""
    kind = field["type"]
    return next(t for t in kind if t != "null") if isinstance(kind, list) else kind


# --- cleaning rules ----------------------------------------------------------

MIN_DURATION_S = 60
MAX_DURATION_S = 6 * 3600
MAX_SPEED_KMH = 120.0
NYC_LONGITUDE = (-74.3, -73.7)
NYC_LATITUDE = (40.5, 41.0)
VENDORS = (1, 2)
PASSENGERS = (1, 6)
ZONES = (1, 263)
"""TLC taxi zones of a known place; 264 and 265 mean unknown."""
EARTH_RADIUS_KM = 6371.0088


def great_circle_km(lat1: Expr, lon1: Expr, lat2: Expr, lon2: Expr) -> Expr:
    """Great-circle distance in km (haversine), as an expression (``periscope.expressions``)."""
    lat1, lon1, lat2, lon2 = (radians(v) for v in (lat1, lon1, lat2, lon2))
    a = square(sin((lat2 - lat1) / 2)) + cos(lat1) * cos(lat2) * square(sin((lon2 - lon1) / 2))
    return 2 * EARTH_RADIUS_KM * arcsin(sqrt(a))


_HAVERSINE = great_circle_km(field("lat1"), field("lon1"), field("lat2"), field("lon2"))


def haversine_km(lat1: Any, lon1: Any, lat2: Any, lon2: Any) -> Any:
    """Great-circle distance in km; works on scalars and numpy arrays (``great_circle_km``, evaluated)."""
    return evaluate(_HAVERSINE, {"lat1": lat1, "lon1": lon1, "lat2": lat2, "lon2": lon2})


def _inside(value: Expr, bounds: tuple[float, float]) -> Expr:
    return (value >= bounds[0]) & (value <= bounds[1])


def _in_nyc(lon: Expr, lat: Expr) -> Expr:
    return _inside(lon, NYC_LONGITUDE) & _inside(lat, NYC_LATITUDE)


def _placed_in_nyc(end: str) -> Expr:
    """Coordinates inside the NYC box; a trip without coordinates (NaN) needs a known zone instead.

    Records without zone fields (the Kaggle fields only, as the speed layers
    hold them) have no known zone (``NOT_RECORDED``), so they are judged by
    their coordinates alone.
    """
    lon, lat = field(f"{end}_longitude"), field(f"{end}_latitude")
    zone = field(f"{end}_location_id", missing=NOT_RECORDED)
    return where(isnan(lon) | isnan(lat), _inside(zone, ZONES), _in_nyc(lon, lat))


def _speed_ok() -> Expr:
    """Straight-line speed within bounds; a trip without coordinates has none to judge, and passes."""
    km = great_circle_km(field("pickup_latitude"), field("pickup_longitude"),
                         field("dropoff_latitude"), field("dropoff_longitude"))
    hours = maximum(field("trip_duration"), 1) / 3600.0
    return ~(km / hours > MAX_SPEED_KMH)


@dataclass(frozen=True)
class Rule:
    """A cleaning rule: ``keep`` is True for trips that pass, an expression over the record's fields
    that numpy (``first_broken_rule``, ``check_rules``) and Spark (``periscope.spark_batch``) evaluate."""

    name: str
    description: str
    keep: Expr


_VENDOR, _DURATION = field("vendor_id"), field("trip_duration")
RULES: tuple[Rule, ...] = (
    Rule("unknown_vendor", f"vendor_id is not one of {VENDORS}",
         (_VENDOR == VENDORS[0]) | (_VENDOR == VENDORS[1])),
    Rule("duration_too_short", f"trip_duration below {MIN_DURATION_S} s (meter glitch or cancelled trip)",
         _DURATION >= MIN_DURATION_S),
    Rule("duration_too_long", f"trip_duration above {MAX_DURATION_S // 3600} h (meter left running)",
         _DURATION <= MAX_DURATION_S),
    Rule("duration_mismatch", "trip_duration differs from dropoff minus pickup by more than 1 s",
         abs(field("dropoff_datetime") - field("pickup_datetime") - _DURATION * 1000) <= 1000),
    Rule("passenger_count_out_of_range", f"passenger_count outside {PASSENGERS[0]}..{PASSENGERS[1]}",
         _inside(field("passenger_count"), PASSENGERS)),
    Rule("pickup_outside_nyc", f"pickup outside lon {NYC_LONGITUDE}, lat {NYC_LATITUDE}, or, without "
                               f"coordinates, in no known zone {ZONES[0]}..{ZONES[1]}",
         _placed_in_nyc("pickup")),
    Rule("dropoff_outside_nyc", f"dropoff outside the same box, or, without coordinates, in no known zone",
         _placed_in_nyc("dropoff")),
    Rule("implausible_speed", f"straight-line speed above {MAX_SPEED_KMH:.0f} km/h (GPS error)",
         _speed_ok()),
)
"""The cleaning rules, in the order a rejection is attributed (the first broken rule counts)."""
RULE_NAMES: tuple[str, ...] = tuple(rule.name for rule in RULES)


def first_broken_rule(columns: Mapping[str, np.ndarray]) -> np.ndarray:
    """Index into ``RULES`` of the first rule each trip breaks, or -1 if it passes.

    ``columns`` maps field names to equal-length arrays in record form
    (times in ms). Attributing each rejection to one rule makes the per-rule
    counts add up to the number of rejected trips.
    """
    n = len(columns["trip_duration"])
    broken = np.full(n, -1, dtype=np.int8)
    cache: dict[int, Any] = {}
    for index, rule in enumerate(RULES):
        fails = ~np.asarray(evaluate(rule.keep, columns, cache), dtype=bool) & (broken < 0)
        broken[fails] = index
    return broken


def check_rules(record: Mapping[str, Any]) -> str | None:
    """Name of the first cleaning rule a single record breaks, or None."""
    cache: dict[int, Any] = {}
    for rule in RULES:
        if not bool(evaluate(rule.keep, record, cache)):
            return rule.name
    return None


def count_rules(broken: np.ndarray) -> dict[str, int]:
    """Per-rule rejection counts from ``first_broken_rule`` output (every rule listed)."""
    counts = np.bincount(broken[broken >= 0], minlength=len(RULES))
    return {name: int(count) for name, count in zip(RULE_NAMES, counts)}


# --- parsing -----------------------------------------------------------------


class InvalidTrip(ValueError):
    """A value that cannot be a trip; ``reason`` is a stable code, ``detail`` says why."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def parse_time(value: Any, field: str) -> int:
    """``"YYYY-MM-DD HH:MM:SS"`` wall-clock text to ms since 1970-01-01 00:00."""
    if not isinstance(value, str):
        raise InvalidTrip("wrong_type", f"{field}: expected text like '2016-03-14 17:24:55', got {type(value).__name__}")
    if not value.strip():
        raise InvalidTrip("missing_value", f"{field} is empty")
    text = value.strip()
    try:
        if not _TIME_PATTERN.fullmatch(text):
            raise ValueError(text)
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidTrip("bad_datetime", f"{field}: {value!r} is not a time like '2016-03-14 17:24:55'") from None
    return (moment - EPOCH) // _MS


def parse_cutoff(text: str) -> int | None:
    """A ``--cutoff`` value: ``"2016-06-01"`` or ``"2016-06-01 12:00:00"`` to ms, ``"none"`` to None.

    Raises ``ValueError`` with a message that says what would be right.
    """
    value = text.strip()
    if value.lower() in ("none", ""):
        return None
    try:
        return parse_time(value if " " in value else f"{value} 00:00:00", "cutoff")
    except InvalidTrip:
        raise ValueError(f"{text!r} is not a cutoff: give a pickup time like 2016-06-01 or "
                         "'2016-06-01 12:00:00' (New York wall clock), or none") from None


def format_time(ms: int) -> str:
    """Inverse of ``parse_time``."""
    return (EPOCH + int(ms) * _MS).isoformat(sep=" ", timespec="seconds")


def _number(value: Any, field: str, kind: type) -> int | float:
    if isinstance(value, bool) or value is None:
        raise InvalidTrip("wrong_type", f"{field}: expected a number, got {type(value).__name__}")
    if isinstance(value, str):
        text = value.strip()
        if not text:
            raise InvalidTrip("missing_value", f"{field} is empty")
        try:
            value = float(text)
        except ValueError:
            raise InvalidTrip("wrong_type", f"{field}: {value!r} is not a number") from None
    if not isinstance(value, (int, float)):
        raise InvalidTrip("wrong_type", f"{field}: expected a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise InvalidTrip("wrong_type", f"{field}: {value!r} is not a finite number")
    if kind is int:
        if value != int(value):
            raise InvalidTrip("wrong_type", f"{field}: {value!r} is not a whole number")
        return int(value)
    return float(value)


def _flag(value: Any) -> bool:
    if value in ("Y", "N"):
        return value == "Y"
    if isinstance(value, bool):
        return value
    raise InvalidTrip("wrong_type", f"store_and_fwd_flag: {value!r} is not 'Y' or 'N'")


SOURCE_INT_FIELDS = ("pickup_location_id", "dropoff_location_id", "payment_type")
SOURCE_FLOAT_FIELDS = ("trip_distance", *REVENUE_FIELDS)


def from_tlc_source(fields: Mapping[str, Any]) -> bool:
    """Does a message or record come from a TLC file (a ``source_layout`` other than kaggle)?"""
    layout = fields.get("source_layout")
    return isinstance(layout, str) and layout not in ("", "kaggle")


def _not_recorded(name: str) -> Any:
    """A field's value in record form when the source recorded nothing."""
    if name in INT_FIELDS or name in SOURCE_INT_FIELDS:
        return NOT_RECORDED
    return math.nan if name in FLOAT_FIELDS or name in SOURCE_FLOAT_FIELDS else None


def _source_value(value: Any, name: str) -> Any:
    if value is None:
        return _not_recorded(name)
    if name in SOURCE_INT_FIELDS:
        return _number(value, name, int)
    if name in SOURCE_FLOAT_FIELDS:
        return _number(value, name, float)
    if not isinstance(value, str):
        raise InvalidTrip("wrong_type", f"{name}: expected text, got {type(value).__name__}")
    return value


def parse_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """A mapping of the eleven fields (CSV text or JSON types) to a record.

    Raises ``InvalidTrip`` naming the first field that is missing or malformed.
    ``SOURCE_FIELDS`` given (null or absent: not recorded) are parsed too. A
    trip from a TLC file (``from_tlc_source``) may have null in the Kaggle
    fields TLC files lack (``NULLABLE_FIELDS``), but needs at each end
    coordinates or a zone; a Kaggle message is parsed as it always was. Other
    keys (for example the original times a retimed replay carries) are ignored.
    """
    missing = [name for name in FIELDS if name not in fields]
    if missing:
        raise InvalidTrip("missing_field", f"missing {', '.join(missing)}")
    trip_id = fields["id"]
    if not isinstance(trip_id, str) or not trip_id.strip():
        raise InvalidTrip("missing_value", "id must be non-empty text")
    record: dict[str, Any] = {"id": trip_id.strip()}
    tlc_trip = from_tlc_source(fields)
    for name in FIELDS[1:]:
        value = fields[name]
        if value is None and tlc_trip and name in NULLABLE_FIELDS:
            record[name] = _not_recorded(name)
        elif name in TIME_FIELDS:
            record[name] = parse_time(value, name)
        elif name in INT_FIELDS:
            record[name] = _number(value, name, int)
        elif name in FLOAT_FIELDS:
            record[name] = _number(value, name, float)
        else:
            record[name] = _flag(value)
    record.update({name: _source_value(fields[name], name) for name in SOURCE_FIELDS if name in fields})
    for name in INT_FIELDS + SOURCE_INT_FIELDS:
        if name in record and not -(2**31) <= record[name] < 2**31:
            raise InvalidTrip("wrong_type", f"{name} does not fit a 32-bit integer")
    if tlc_trip:
        for end in ("pickup", "dropoff"):
            if (math.isnan(record[f"{end}_longitude"]) or math.isnan(record[f"{end}_latitude"])) and \
                    record.get(f"{end}_location_id", NOT_RECORDED) == NOT_RECORDED:
                raise InvalidTrip("missing_value", f"{end}: neither coordinates nor a zone")
    return record


def parse_json(value: bytes | None) -> dict[str, Any]:
    """A Kafka message value to a record, or ``InvalidTrip`` with the reason."""
    if not value:
        raise InvalidTrip("empty_message", "the message value is empty")
    try:
        fields = json.loads(value)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InvalidTrip("invalid_json", str(error)) from None
    if not isinstance(fields, dict):
        raise InvalidTrip("invalid_json", f"expected a JSON object, got {type(fields).__name__}")
    return parse_fields(fields)


def validate(value: bytes | None) -> tuple[dict[str, Any] | None, str | None]:
    """Parse and apply the cleaning rules: ``(record, None)`` or ``(None, reason)``.

    The reason is ``"<code>: <detail>"`` for parse failures and the rule name
    for rule violations — what the dead-letter topic carries.
    """
    try:
        record = parse_json(value)
    except InvalidTrip as error:
        return None, str(error)
    broken = check_rules(record)
    return (None, broken) if broken else (record, None)


def _recorded(value: Any) -> bool:
    """Not ``NOT_RECORDED``, NaN or NA: what a TLC record holds where its source recorded nothing."""
    if value is None or value is pd.NA:
        return False
    if isinstance(value, float):
        return not math.isnan(value)
    return not (isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value == NOT_RECORDED)


def record_to_message(record: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    """A record as the JSON-ready dict sent to Kafka (Kaggle field types), then the ``SOURCE_FIELDS``
    it has; a TLC record's values not recorded are null (docs/STREAMING.md, "Messages")."""
    names = FIELDS + tuple(name for name in SOURCE_FIELDS if name in record)
    nullable = NULLABLE_FIELDS if from_tlc_source(record) else SOURCE_FIELDS
    message = {name: record[name] if name not in nullable or _recorded(record[name]) else None
               for name in names}
    message["pickup_datetime"] = format_time(record["pickup_datetime"])
    message["dropoff_datetime"] = format_time(record["dropoff_datetime"])
    if message["store_and_fwd_flag"] is not None:
        message["store_and_fwd_flag"] = "Y" if record["store_and_fwd_flag"] else "N"
    message.update(extra)
    return message


def record_to_json(record: Mapping[str, Any], **extra: Any) -> bytes:
    """A record as the UTF-8 JSON value of a ``taxi-trips`` message."""
    return json.dumps(record_to_message(record, **extra), separators=(",", ":")).encode()


_JSON_TEMPLATE = (
    '{"id":%s,"vendor_id":%d,"pickup_datetime":"%s","dropoff_datetime":"%s","passenger_count":%d,'
    '"pickup_longitude":%r,"pickup_latitude":%r,"dropoff_longitude":%r,"dropoff_latitude":%r,'
    '"store_and_fwd_flag":"%s","trip_duration":%d}'
)
"""``record_to_json`` spelled as one ``%`` template: fields in schema order, floats
as ``repr`` (what ``json.dumps`` writes), the id quoted by ``json.dumps``."""


def format_times(ms: np.ndarray) -> list[str]:
    """``format_time`` for a whole array at once."""
    seconds = np.asarray(ms, dtype=np.int64).astype("datetime64[ms]").astype("datetime64[s]")
    return [text.replace("T", " ") for text in np.datetime_as_string(seconds, unit="s").tolist()]


def pass_suffix(pass_number: int) -> str:
    """The id suffix of replay pass ``pass_number`` (1-based): nothing, -2, -3, ...

    Whoever sends the same trips again as new events (``kafka_producer.py
    --loop``, the simulated trips API's later cycles) appends it, so every id
    in the topic stays unique.
    """
    return "" if pass_number == 1 else f"-{pass_number}"


def trips_to_messages(trips: pd.DataFrame, id_suffix: str = "") -> tuple[list[bytes], list[bytes]]:
    """Kafka keys and JSON values of a whole trip frame: the bytes ``record_to_json`` gives, 4x faster.

    ``id_suffix`` is appended to every id (``kafka_producer.py --loop`` keeps ids unique that way).
    TLC trips (a ``source_layout`` column) have nulls, so each is a dict through ``json.dumps``.
    """
    ids = [trip_id + id_suffix for trip_id in trips["id"].tolist()]
    if "source_layout" in trips:
        return [trip_id.encode() for trip_id in ids], _tlc_values(trips, ids)
    columns = (
        [json.dumps(trip_id) for trip_id in ids],
        trips["vendor_id"].tolist(),
        format_times(trips["pickup_datetime"].to_numpy()),
        format_times(trips["dropoff_datetime"].to_numpy()),
        trips["passenger_count"].tolist(),
        trips["pickup_longitude"].tolist(),
        trips["pickup_latitude"].tolist(),
        trips["dropoff_longitude"].tolist(),
        trips["dropoff_latitude"].tolist(),
        np.where(trips["store_and_fwd_flag"].to_numpy(dtype=bool), "Y", "N").tolist(),
        trips["trip_duration"].tolist(),
    )
    values = [(_JSON_TEMPLATE % row).encode() for row in zip(*columns)]
    return [trip_id.encode() for trip_id in ids], values


def _tlc_values(trips: pd.DataFrame, ids: list[str]) -> list[bytes]:
    """``record_to_json`` of each TLC trip of a frame, a column at a time: what was not recorded as null."""
    names = FIELDS + tuple(name for name in SOURCE_FIELDS if name in trips)
    columns: list[list[Any]] = []
    for name in names:
        values = trips[name]
        if name == "id":
            columns.append(ids)
        elif name in TIME_FIELDS:
            columns.append(format_times(values.to_numpy()))
        elif name == "store_and_fwd_flag":
            flag = values.astype("boolean")
            text = np.where(flag.fillna(False).to_numpy(dtype=bool), "Y", "N").astype(object)
            text[flag.isna().to_numpy()] = None
            columns.append(text.tolist())
        elif name in NULLABLE_FIELDS and pd.api.types.is_numeric_dtype(values.dtype):
            number = values.to_numpy()
            absent = np.isnan(number) if number.dtype.kind == "f" else number == NOT_RECORDED
            column = values.astype(object).to_numpy()
            column[absent] = None
            columns.append(column.tolist())
        else:
            columns.append(values.tolist())
    return [json.dumps(dict(zip(names, row)), separators=(",", ":")).encode() for row in zip(*columns)]
