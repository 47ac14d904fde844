"""The NYC TLC trip-record layouts, as data, and how their rows become trips of the one schema.

The TLC has published yellow- and green-cab trips since 2009, and the layout
changed over the years: ``vendor_name``/``Trip_Pickup_DateTime``/``Start_Lon``
in 2009, ``pickup_longitude``... with vendor ``CMT``/``VTS`` and payment
``CSH``/``CRD`` until 2014, ``tpep_*`` times from 2015, taxi-zone ids
(``PULocationID``) instead of coordinates since mid-2016, green cabs with
``lpep_*`` times, and extracts that rename every column to snake_case
(``pickup_location_id``). ``LAYOUTS`` lists them: a name, the service and era,
and which source column holds each trip field. A file's layout is recognised
from its header (``recognise``), column names compared case-insensitively, so
``RatecodeID``/``RateCodeID`` or ``Airport_fee``/``airport_fee`` do not matter.

``parse`` turns a chunk of rows of a layout, CSV text or typed Parquet
columns alike, into a trip frame of ``schema.TRIP_FIELDS`` in record form,
with a reason for every row that cannot be a trip (``sources`` counts them).
A TLC row has no id: ``derived_ids`` gives it one from its content, so the
same row read from two files is the same fact.

For-hire-vehicle files (FHV, high-volume FHV) are recognised and refused
(``Layout.refused`` says why), and so is any other header: ``sources``
names the layouts known and the columns the closest one misses.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from periscope.schema import NOT_RECORDED, SERVICES, TRIP_FIELDS

KAGGLE = "kaggle"


@dataclass(frozen=True)
class Layout:
    """One file layout: its name, what it holds, and the source column of each trip field."""

    name: str
    service: str
    era: str
    columns: Mapping[str, str]
    """Trip field -> source column name, lower case; every one must be in the header."""
    codes: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    """Trip field -> text code -> number, for fields a layout records as text (``CMT``, ``CSH``)."""
    refused: str | None = None
    """Why files of this layout are not imported (None: they are)."""


VENDOR_NAMES = {"CMT": 1, "VTS": 2, "DDS": 3}
"""2009-2014 vendor codes as the numbers TLC uses since 2015 (1 Creative Mobile, 2 VeriFone);
DDS (Digital Dispatch Systems, 2009-2010 only) has no number there: 3."""
PAYMENT_NAMES = {"CRE": 1, "CRD": 1, "CREDIT": 1, "CAS": 2, "CSH": 2, "CASH": 2, "NOC": 3, "NO CHARGE": 3,
                 "DIS": 4, "DISPUTE": 4, "UNK": 5, "NA": 5, "VOI": 6}
"""2009-2014 payment types as TLC's numbers: 1 card, 2 cash, 3 no charge, 4 dispute, 5 unknown, 6 voided."""

_MONEY = {"trip_distance": "trip_distance", "fare_amount": "fare_amount", "tip_amount": "tip_amount",
          "total_amount": "total_amount", "payment_type": "payment_type"}
_COORDINATES = {"pickup_longitude": "pickup_longitude", "pickup_latitude": "pickup_latitude",
                "dropoff_longitude": "dropoff_longitude", "dropoff_latitude": "dropoff_latitude"}
_TPEP = {"pickup_datetime": "tpep_pickup_datetime", "dropoff_datetime": "tpep_dropoff_datetime"}
_LPEP = {"pickup_datetime": "lpep_pickup_datetime", "dropoff_datetime": "lpep_dropoff_datetime"}
_ZONES = {"pickup_location_id": "pulocationid", "dropoff_location_id": "dolocationid"}
_COMMON = {"vendor_id": "vendorid", "passenger_count": "passenger_count",
           "store_and_fwd_flag": "store_and_fwd_flag"}

LAYOUTS: tuple[Layout, ...] = (
    Layout(KAGGLE, "yellow", "Kaggle NYC Taxi Trip Duration, 2016", {name: name for name in (
        "id", "vendor_id", "pickup_datetime", "dropoff_datetime", "passenger_count", "pickup_longitude",
        "pickup_latitude", "dropoff_longitude", "dropoff_latitude", "store_and_fwd_flag", "trip_duration")}),
    Layout("yellow_2009", "yellow", "2009, coordinates", {
        "vendor_id": "vendor_name", "pickup_datetime": "trip_pickup_datetime",
        "dropoff_datetime": "trip_dropoff_datetime", "passenger_count": "passenger_count",
        "pickup_longitude": "start_lon", "pickup_latitude": "start_lat", "dropoff_longitude": "end_lon",
        "dropoff_latitude": "end_lat", "store_and_fwd_flag": "store_and_forward",
        "trip_distance": "trip_distance", "fare_amount": "fare_amt", "tip_amount": "tip_amt",
        "total_amount": "total_amt", "payment_type": "payment_type"},
        codes={"vendor_id": VENDOR_NAMES, "payment_type": PAYMENT_NAMES}),
    Layout("yellow_2010", "yellow", "2010-2014, coordinates", {
        "vendor_id": "vendor_id", "pickup_datetime": "pickup_datetime", "dropoff_datetime": "dropoff_datetime",
        "passenger_count": "passenger_count", **_COORDINATES, "store_and_fwd_flag": "store_and_fwd_flag",
        **_MONEY}, codes={"vendor_id": VENDOR_NAMES, "payment_type": PAYMENT_NAMES}),
    Layout("yellow_tpep_coordinates", "yellow", "2015 to mid-2016, coordinates",
           {**_COMMON, **_TPEP, **_COORDINATES, **_MONEY}),
    Layout("yellow_zones", "yellow", "mid-2016 on, taxi zones", {**_COMMON, **_TPEP, **_ZONES, **_MONEY}),
    Layout("yellow_zones_snake_case", "yellow", "mid-2016 on, taxi zones, columns renamed to snake_case", {
        "vendor_id": "vendor_id", "pickup_datetime": "pickup_datetime", "dropoff_datetime": "dropoff_datetime",
        "passenger_count": "passenger_count", "store_and_fwd_flag": "store_and_fwd_flag",
        "pickup_location_id": "pickup_location_id", "dropoff_location_id": "dropoff_location_id", **_MONEY}),
    Layout("green_coordinates", "green", "2013 to mid-2016, coordinates", {**_COMMON, **_LPEP, **_COORDINATES,
                                                                            **_MONEY}),
    Layout("green_zones", "green", "mid-2016 on, taxi zones", {**_COMMON, **_LPEP, **_ZONES, **_MONEY}),
    Layout("fhvhv", "fhvhv", "high-volume for-hire vehicles (Uber, Lyft...), 2019 on", {
        "hvfhs_license_num": "hvfhs_license_num", "pickup_datetime": "pickup_datetime",
        "dropoff_datetime": "dropoff_datetime", **_ZONES, "trip_distance": "trip_miles"},
        refused="high-volume for-hire (Uber, Lyft...) trips have no vendor, passenger count, fare or "
                "payment type, so every cleaning rule of a cab trip would reject them"),
    Layout("fhv", "fhv", "for-hire vehicles, 2015 on", {
        "dispatching_base_num": "dispatching_base_num", "pickup_datetime": "pickup_datetime",
        "dropoff_datetime": "dropoff_datetime", **_ZONES},
        refused="for-hire-vehicle trips record only times and zones (no vendor, passengers, distance or "
                "fare), so every cleaning rule of a cab trip would reject them"),
)
"""Every layout known, in the order they are tried: the first whose columns are all there wins."""


def normalise(column: str) -> str:
    """A header name as the table spells it: lower case, no spaces, quotes or byte-order mark."""
    return column.strip().strip('"').lstrip("\ufeff").strip().lower()


def recognise(columns: Iterable[str]) -> Layout | None:
    """The first layout whose every column is in ``columns``, or None."""
    present = {normalise(column) for column in columns}
    return next((layout for layout in LAYOUTS if set(layout.columns.values()) <= present), None)


def closest(columns: Iterable[str]) -> tuple[Layout, list[str]]:
    """The imported layout missing the fewest columns (the first in ``LAYOUTS`` on a tie), and those."""
    present = {normalise(column) for column in columns}
    misses = [(layout, [c for c in layout.columns.values() if c not in present])
              for layout in LAYOUTS if layout.refused is None]
    return min(misses, key=lambda item: len(item[1]))


def source_columns(layout: Layout, columns: Iterable[str]) -> dict[str, str]:
    """Trip field -> the column of this header holding it, in the header's own spelling."""
    spelled = {normalise(column): column for column in columns}
    return {name: spelled[source] for name, source in layout.columns.items()}


# --- rows of a layout -> trips ------------------------------------------------------------------

_TIMES = ("pickup_datetime", "dropoff_datetime")
_INTEGERS = ("vendor_id", "passenger_count", "pickup_location_id", "dropoff_location_id", "payment_type")
_FLOATS = ("pickup_longitude", "pickup_latitude", "dropoff_longitude", "dropoff_latitude", "trip_distance",
           "fare_amount", "tip_amount", "total_amount")
_INT32 = 2**31


class _Reasons:
    """The first reason each row cannot be a trip, and the field to blame (empty: none yet)."""

    def __init__(self, rows: int):
        self.reason = np.full(rows, "", dtype=object)
        self.culprit = np.full(rows, "", dtype=object)

    def flag(self, bad: np.ndarray, code: str, name: str) -> None:
        new = np.asarray(bad, dtype=bool) & (self.reason == "")
        self.reason[new] = code
        self.culprit[new] = name


def _blank(values: pd.Series) -> np.ndarray:
    """Null, or text that is empty once stripped."""
    blank = values.isna().to_numpy()
    if values.dtype == object:
        blank |= (values.astype(str).str.strip() == "").to_numpy()
    return blank


def _times(values: pd.Series, name: str, reasons: _Reasons) -> np.ndarray:
    blank = _blank(values)
    reasons.flag(blank, "missing_value", name)
    if pd.api.types.is_datetime64_any_dtype(values):
        if getattr(values.dt, "tz", None) is not None:
            values = values.dt.tz_localize(None)  # the wall-clock time the data was written in
        moments = values
    else:
        moments = pd.to_datetime(values.where(~blank, None), format="ISO8601", errors="coerce")
    bad = moments.isna().to_numpy() & ~blank
    reasons.flag(bad, "bad_datetime", name)
    return np.where(moments.isna(), 0, moments.to_numpy(dtype="datetime64[ms]").astype(np.int64))


def _numbers(values: pd.Series, name: str, reasons: _Reasons, codes: Mapping[str, int] | None) -> np.ndarray:
    """float64 with NaN where the source has nothing; text that is no number is a ``wrong_type``."""
    blank = _blank(values)
    if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
        return values.to_numpy(dtype=np.float64, na_value=np.nan)
    text = values.astype(object).where(~blank, None)
    number = pd.to_numeric(text, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    numeric = np.isfinite(number)  # then exactly float(text): pandas' parser may miss by the last bit
    number[numeric] = text[numeric].astype(np.float64)
    if codes:
        coded = text.astype(str).str.strip().str.upper().map(codes).to_numpy(dtype=np.float64, na_value=np.nan)
        number = np.where(np.isnan(number), coded, number)
    reasons.flag(np.isnan(number) & ~blank, "wrong_type", name)
    return number


def _integers(number: np.ndarray, name: str, reasons: _Reasons) -> np.ndarray:
    """Whole numbers (``1.0`` from a float column included) as int64, ``NOT_RECORDED`` for nothing."""
    absent = np.isnan(number)
    with np.errstate(invalid="ignore"):
        bad = ~absent & ((number != np.round(number)) | (np.abs(number) >= _INT32) | (number < 0))
    reasons.flag(bad, "wrong_type", name)
    return np.where(absent | bad, NOT_RECORDED, np.nan_to_num(number)).astype(np.int64)


def _flags(values: pd.Series, reasons: _Reasons) -> pd.Series:
    """``Y``/``N`` (or ``1``/``0``) as a nullable boolean: NA where the source has nothing."""
    blank = _blank(values)
    text = values.astype(object).where(~blank, "").astype(str).str.strip().str.upper()
    known = text.isin(["Y", "N", "1", "0", "TRUE", "FALSE"]).to_numpy()
    reasons.flag(~known & ~blank, "wrong_type", "store_and_fwd_flag")
    flag = pd.Series(text.isin(["Y", "1", "TRUE"]).to_numpy(), dtype="boolean")
    flag[blank | ~known] = pd.NA
    return flag


def parse(raw: pd.DataFrame, layout: Layout, columns: Mapping[str, str],
          truncated: np.ndarray | None = None) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Rows of ``layout`` (CSV text or typed Parquet columns) -> (trip frame of every row, reason, culprit).

    ``columns`` is ``source_columns(layout, header)``; ``truncated`` marks rows
    that ended before their last field (a line cut part-way): a
    ``wrong_field_count``. A row with a non-empty reason is no trip; the caller
    drops and counts it. A field the layout lacks, or a row leaves empty, is
    not recorded: ``NOT_RECORDED`` for integers, NaN for floats, NA for the flag.
    A trip must have both times and, at each end, coordinates or a zone.
    """
    n = len(raw)
    reasons = _Reasons(n)
    if truncated is not None:
        reasons.flag(truncated, "wrong_field_count", "")
    out: dict[str, object] = {}
    for name in _TIMES:
        out[name] = _times(raw[columns[name]], name, reasons)
    for name in _INTEGERS + _FLOATS:
        if name not in columns:
            out[name] = np.full(n, NOT_RECORDED if name in _INTEGERS else np.nan,
                                dtype=np.int64 if name in _INTEGERS else np.float64)
            continue
        number = _numbers(raw[columns[name]], name, reasons, layout.codes.get(name))
        out[name] = _integers(number, name, reasons) if name in _INTEGERS else number
    for end in ("pickup", "dropoff"):
        placed = ~np.isnan(out[f"{end}_longitude"]) & ~np.isnan(out[f"{end}_latitude"])
        placed |= out[f"{end}_location_id"] != NOT_RECORDED
        reasons.flag(~placed, "missing_value", f"{end} location (coordinates or zone)")
    duration = (out["dropoff_datetime"] - out["pickup_datetime"]) // 1000
    reasons.flag(np.abs(duration) >= _INT32, "wrong_type", "trip_duration")
    out["trip_duration"] = duration
    out["store_and_fwd_flag"] = (_flags(raw[columns["store_and_fwd_flag"]], reasons)
                                 if "store_and_fwd_flag" in columns else pd.Series(pd.NA, index=range(n),
                                                                                   dtype="boolean"))
    out["service"] = np.full(n, layout.service, dtype=object)
    out["source_layout"] = np.full(n, layout.name, dtype=object)
    frame = pd.DataFrame({name: out[name] for name in TRIP_FIELDS if name != "id"})
    frame.insert(0, "id", derived_ids(frame))
    return frame, reasons.reason, reasons.culprit


# --- identity ------------------------------------------------------------------------------------

DERIVED_ID_PREFIX = "tlc_"
"""Ids made from a row's content start with it (an underscore: a ``-2`` suffix stays a replay's)."""
_HASHED = tuple(name for name in TRIP_FIELDS if name not in ("id", "source_layout", "trip_duration"))
_NULL = np.iinfo(np.int64).min


def _canonical(frame: pd.DataFrame, name: str) -> np.ndarray:
    """A column as int64, the same whatever file or layout it came from (floats to 1e-6)."""
    values = frame[name]
    if name == "service":
        return np.asarray([SERVICES.index(s) if s in SERVICES else -1 for s in values], dtype=np.int64)
    if name == "store_and_fwd_flag":
        return values.astype("Int64").fillna(-1).to_numpy(dtype=np.int64)
    if name in _FLOATS:
        number = values.to_numpy(dtype=np.float64)
        return np.where(np.isnan(number), _NULL, np.round(np.nan_to_num(number) * 1e6)).astype(np.int64)
    return values.to_numpy(dtype=np.int64)


def derived_ids(frame: pd.DataFrame) -> np.ndarray:
    """``tlc_`` + 20 hex digits of BLAKE2b over every field of the trip but its source layout.

    Deterministic: the same trip read from a CSV and from a Parquet file, or
    from a sample and from the full month, gets the same id, so it is one fact.
    Two rows identical in every field are one fact too (docs/DATA.md).
    80 bits: a collision among 10 million trips has odds of about 4e-11.
    """
    if len(frame) == 0:
        return np.empty(0, dtype=object)
    matrix = np.ascontiguousarray(np.column_stack([_canonical(frame, name) for name in _HASHED]).astype("<i8"))
    rows = matrix.view(np.dtype((np.void, matrix.shape[1] * 8))).ravel()
    return np.asarray([DERIVED_ID_PREFIX + hashlib.blake2b(row.tobytes(), digest_size=10).hexdigest()
                       for row in rows], dtype=object)
