"""Reading the master dataset fast: Avro master files into polars frames.

A recompute reads every master file, so decoding Avro used to be most of its
work. ``polars.read_avro`` decodes straight into columns (Rust) instead of
making a Python dict per record as fastavro does: 250,000 trips in 0.04 s
instead of 1.2 s. The master files stay the same Avro files, written by
fastavro. The fastavro decoder is kept (``decoder="fastavro"``) as the
reference the fast one is compared with, in the tests and in
``bench/bench_batch.py``.

Every frame has the trip columns its file was written with (the eleven
Kaggle fields of ``schema.KAGGLE_AVRO_SCHEMA``, with the zones since
``schema.ZONED_KAGGLE_AVRO_SCHEMA``, or every field of ``schema.AVRO_SCHEMA``
for TLC trips) with the Avro types (``int`` fields as
Int32, ``long`` as Int64), rows in file order. Frames are not widened to
``AVRO_SCHEMA``: nine columns of nulls per Kaggle trip would cost memory and
time for nothing. ``record_columns`` widens them to the record-form numpy
arrays that the cleaning rules and the views take (a null as
``NOT_RECORDED`` or NaN; a field the file lacks is simply absent, and the
rules and views read a trip without zone fields by its coordinates).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import polars as pl

from periscope.schema import AVRO_SCHEMA, FIELDS, NOT_RECORDED, NULLABLE_FIELDS, avro_type

DECODERS: tuple[str, ...] = ("polars", "fastavro")
_AVRO_TYPES = {"string": pl.String, "int": pl.Int32, "long": pl.Int64, "double": pl.Float64, "boolean": pl.Boolean}
_RECORD_DTYPES = {"int": np.int64, "long": np.int64, "double": np.float64, "boolean": np.bool_}
TRIP_SCHEMA: dict[str, pl.DataType] = {field["name"]: _AVRO_TYPES[avro_type(field)]
                                        for field in AVRO_SCHEMA["fields"]}
"""Column name -> polars dtype of a master frame, derived from the Avro schema."""


class UnreadableMasterFile(RuntimeError):
    """A master file could not be decoded (the message names the file and says why)."""


def _read_fastavro(path: Path) -> pl.DataFrame:
    from periscope.storage import iter_avro_columns

    chunks = [pl.DataFrame(columns) for columns in iter_avro_columns(path)]
    if not chunks:
        return pl.DataFrame(schema={name: TRIP_SCHEMA[name] for name in FIELDS})
    trips = pl.concat(chunks)
    present = [name for name in TRIP_SCHEMA if name in trips.columns]
    if "source_layout" in trips.columns:  # TLC trips: record form back to the nulls polars reads
        trips = trips.with_columns(
            [pl.when(pl.col(name) == NOT_RECORDED).then(None).otherwise(pl.col(name)).alias(name)
             if TRIP_SCHEMA[name] == pl.Int32 else pl.col(name).fill_nan(None)
             for name in NULLABLE_FIELDS if TRIP_SCHEMA[name] in (pl.Int32, pl.Float64)])
    return trips.select([pl.col(name).cast(TRIP_SCHEMA[name]) for name in present])


def read_file(path: Path, decoder: str = "polars") -> pl.DataFrame:
    """One master file as a frame of trips, in file order."""
    if decoder not in DECODERS:
        raise ValueError(f"unknown decoder {decoder!r}: choose one of {', '.join(DECODERS)}")
    try:
        return pl.read_avro(path) if decoder == "polars" else _read_fastavro(path)
    except (OSError, ValueError, pl.exceptions.PolarsError) as error:
        raise UnreadableMasterFile(f"master file {path} cannot be read ({type(error).__name__}: {error})") from None


def read_files(paths: Sequence[Path], decoder: str = "polars") -> Iterator[pl.DataFrame]:
    """Every file of ``paths`` as a frame, in the order given.

    One after the other: ``read_avro`` holds the GIL, so threads would not
    decode two files at once, and at 0.04 s per 250,000 trips a worker process
    would spend more time starting and sending its frame back than decoding.
    """
    for path in paths:
        yield read_file(path, decoder)


def record_columns(trips: pl.DataFrame) -> dict[str, np.ndarray]:
    """The numeric trip columns as record-form numpy arrays: what ``schema.first_broken_rule`` and
    ``views.aggregate`` take (integers widened to int64, so no product of them can overflow; a null
    as ``NOT_RECORDED``, NaN or False)."""
    columns = {}
    for field in AVRO_SCHEMA["fields"]:
        kind = avro_type(field)
        if kind == "string" or field["name"] not in trips.columns:
            continue
        column = trips[field["name"]]
        missing = {"double": float("nan"), "boolean": False}.get(kind, NOT_RECORDED)
        if column.null_count():
            column = column.fill_null(missing)
        columns[field["name"]] = column.to_numpy().astype(_RECORD_DTYPES[kind], copy=False)
    return columns
