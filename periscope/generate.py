"""Scale data: realistic NYC taxi trips, as many as you ask for, from the real sample.

The shipped 73k-trip Kaggle sample is too small to show how the batch layer
behaves on a year of data. This tool makes bigger files that still look like
the real thing, for scale tests and the benchmarks in ``bench/``. It is not a
layer of the architecture: its output is an ordinary Kaggle-layout CSV that
``batch_processor.py import``, ``kafka_producer.py`` or ``train_model.py``
take like any other (with ``--layout yellow_zones``, a TLC zone-era CSV: the
import and the producer take it; training needs coordinates).

Each generated trip is a real trip drawn at random (with replacement), then
nudged so no two copies are identical:

* pickup and dropoff points each move independently by about 50 m (gaussian);
* the pickup time moves by up to 30 minutes either way, staying in the
  January-June 2016 period of the data;
* the duration is scaled by a small random factor (lognormal, about 5 %) and
  the dropoff time is recomputed from it, so the ``duration_mismatch`` rule
  still holds;
* vendor, passenger count and ``store_and_fwd_flag`` are copied from the
  drawn trip, so their joint distribution with place, time and duration is
  kept.

Outliers are drawn too (the source is read with every well-formed row, dirty
ones included), so the cleaning rules reject about the same share of a
generated file as of the real sample. Ids are fresh: ``g`` and a 9-digit
number, unique in the file and never clashing with Kaggle's ``id...`` ids.

With ``--layout yellow_zones`` the same trips are written as a TLC yellow-cab
file of the zone era (``tpep_*`` times, ``PULocationID``/``DOLocationID``, no
coordinates; ``periscope.tlc`` reads it as the ``yellow_zones`` layout): each
point becomes the taxi zone holding it (``zones.zone_of``), 264 (TLC's
"unknown") where none does; distance, payment and fares are left empty, as the
Kaggle sample has none. Such a file has no ids: readers derive them from the
content, as for every TLC file. It is what benchmarks of zone-only trips
(placed at zone centroids by the views, predicted from their zones) run on.

The same seed, row count and input give byte-identical output, plain or
gzip (a different ``--rows`` gives different trips, not a longer prefix).
Trips are made and written in chunks of 500,000, so ten million trips take the
memory of one chunk.

Run it::

    python -m periscope.generate --rows 1500000 --seed 7
    python -m periscope.generate --rows 10000000 --out data/generated/trips-10m.csv.gz
    python -m periscope.generate --rows 1500000 --layout yellow_zones   # TLC zone era
"""
from __future__ import annotations

import argparse
import gzip
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pa_csv

from periscope import cli, config, zones
from periscope.schema import FIELDS, FLOAT_FIELDS, count_rules, first_broken_rule, parse_time
from periscope.sources import CsvLayoutError, read_trips

CHUNK_ROWS = 500_000
"""Trips made and written at a time. Part of the recipe: changing it changes the output."""

ID_PREFIX = "g"
ID_DIGITS = 9
MAX_ROWS = 10**ID_DIGITS - 1

JITTER_M = 50.0
"""Standard deviation of the move of each pickup and dropoff point, in metres."""

TIME_JITTER_S = 30 * 60
"""Pickup times move by a whole number of seconds, uniform in +-30 minutes."""

DURATION_SIGMA = 0.05
"""Sigma of the lognormal factor on durations: about +-5 %."""

FIRST_PICKUP_MS = parse_time("2016-01-01 00:00:00", "first pickup")
LAST_PICKUP_MS = parse_time("2016-06-30 23:59:59", "last pickup")
"""Jittered pickups stay within the period the Kaggle data covers."""

METRES_PER_DEG_LAT = 111_200.0
NYC_LATITUDE_DEG = 40.75
LAT_SIGMA_DEG = JITTER_M / METRES_PER_DEG_LAT
LON_SIGMA_DEG = JITTER_M / (METRES_PER_DEG_LAT * math.cos(math.radians(NYC_LATITUDE_DEG)))

COORDINATE_DECIMALS = 6
"""About 0.1 m: finer than GPS, and keeps the file small."""

CSV_OPTIONS = pa_csv.WriteOptions(include_header=False, quoting_style="none")

GZIP_LEVEL = 1
"""Fastest gzip: level 6 makes a 20 % smaller file at less than half the speed."""

OUT_TEMPLATE = str(config.DATA_DIR / "generated" / "trips-{rows}-seed{seed}.csv")
"""Default output; the benchmarks find (and reuse) generated files by this name."""
ZONES_OUT_TEMPLATE = str(config.DATA_DIR / "generated" / "yellow-zones-{rows}-seed{seed}.csv")
"""Default output with ``--layout yellow_zones``."""

LAYOUTS: tuple[str, ...] = ("kaggle", "yellow_zones")
ZONE_ERA_COLUMNS: tuple[str, ...] = (
    "VendorID", "tpep_pickup_datetime", "tpep_dropoff_datetime", "passenger_count", "trip_distance",
    "store_and_fwd_flag", "PULocationID", "DOLocationID", "payment_type", "fare_amount", "tip_amount",
    "total_amount")
"""The header of a ``yellow_zones`` file (TLC's 2017-2018 yellow layout, the columns Periscope reads)."""
UNKNOWN_ZONE = 264
"""What TLC records for a place in no zone."""


def out_path(template: str, rows: int, seed: int) -> Path:
    """The output file: ``{rows}`` and ``{seed}`` in ``template`` filled in."""
    return Path(template.format(rows=rows, seed=seed))


def trip_ids(first: int, count: int) -> np.ndarray:
    """``count`` ids ``g000000001``-style, numbered from ``first``."""
    numbers = pd.Series(np.arange(first, first + count)).astype(str).str.zfill(ID_DIGITS)
    return (ID_PREFIX + numbers).to_numpy(dtype=object)


def resample(source: pd.DataFrame, rows: int, rng: np.random.Generator, first_id: int = 1) -> pd.DataFrame:
    """``rows`` new trips drawn from ``source`` (a record-form trip frame) and jittered.

    The draws always come in the same order, so a generator seeded the same
    way gives the same trips.
    """
    pick = rng.integers(0, len(source), size=rows)
    column = {name: source[name].to_numpy()[pick] for name in FIELDS[1:]}

    shift_ms = rng.integers(-TIME_JITTER_S, TIME_JITTER_S + 1, size=rows) * 1000
    pickup = np.clip(column["pickup_datetime"] + shift_ms, FIRST_PICKUP_MS, LAST_PICKUP_MS)
    factor = rng.lognormal(0.0, DURATION_SIGMA, size=rows)
    duration = np.maximum(np.rint(column["trip_duration"] * factor), 1).astype(np.int64)

    trips = {
        "id": trip_ids(first_id, rows),
        "vendor_id": column["vendor_id"],
        "pickup_datetime": pickup,
        "dropoff_datetime": pickup + duration * 1000,
        "passenger_count": column["passenger_count"],
    }
    for name in FLOAT_FIELDS:
        sigma = LAT_SIGMA_DEG if name.endswith("latitude") else LON_SIGMA_DEG
        trips[name] = column[name] + rng.normal(0.0, sigma, size=rows)
    trips["store_and_fwd_flag"] = column["store_and_fwd_flag"]
    trips["trip_duration"] = duration
    return pd.DataFrame(trips, columns=list(FIELDS))


def generate(source: pd.DataFrame, rows: int, seed: int, chunk_rows: int = CHUNK_ROWS) -> Iterator[pd.DataFrame]:
    """All ``rows`` trips as successive trip frames of ``chunk_rows`` (the last may be shorter)."""
    rng = np.random.default_rng(seed)
    for start in range(0, rows, chunk_rows):
        yield resample(source, min(chunk_rows, rows - start), rng, first_id=start + 1)


def to_kaggle_table(trips: pd.DataFrame) -> pa.Table:
    """Record-form trips as an Arrow table whose CSV text is the Kaggle layout.

    Arrow writes timestamps in seconds as ``YYYY-MM-DD HH:MM:SS`` and floats
    in their shortest exact form, ten times faster than pandas' ``to_csv``.
    """
    columns: dict[str, pa.Array] = {}
    for name in FIELDS:
        values = trips[name].to_numpy()
        if name in ("pickup_datetime", "dropoff_datetime"):
            columns[name] = pa.array(values.astype("datetime64[ms]")).cast(pa.timestamp("s"))
        elif name in FLOAT_FIELDS:
            columns[name] = pa.array(np.round(values, COORDINATE_DECIMALS))
        elif name == "store_and_fwd_flag":
            columns[name] = pa.array(np.where(values, "Y", "N"))
        else:
            columns[name] = pa.array(values)
    return pa.table(columns)


def in_zones(trips: pd.DataFrame) -> pd.DataFrame:
    """Record-form trips as a zone-era file holds them: the zone of each point as written (rounded,
    ``UNKNOWN_ZONE`` for none), coordinates not recorded."""
    placed = trips.copy()
    for end in ("pickup", "dropoff"):
        lon, lat = (np.round(trips[f"{end}_{axis}"].to_numpy(), COORDINATE_DECIMALS)
                    for axis in ("longitude", "latitude"))
        zone = zones.zone_of(lon, lat)
        placed[f"{end}_location_id"] = np.where(zone == zones.NO_ZONE, UNKNOWN_ZONE, zone)
        placed[f"{end}_longitude"] = placed[f"{end}_latitude"] = np.nan
    return placed


def to_zone_era_table(trips: pd.DataFrame) -> pa.Table:
    """Record-form trips (``in_zones``) as an Arrow table whose CSV text is the ``yellow_zones`` layout."""
    table = to_kaggle_table(trips)
    given = {"VendorID": table["vendor_id"], "tpep_pickup_datetime": table["pickup_datetime"],
             "tpep_dropoff_datetime": table["dropoff_datetime"], "passenger_count": table["passenger_count"],
             "store_and_fwd_flag": table["store_and_fwd_flag"],
             "PULocationID": pa.array(trips["pickup_location_id"].to_numpy()),
             "DOLocationID": pa.array(trips["dropoff_location_id"].to_numpy())}
    return pa.table({name: given.get(name, pa.nulls(len(trips), pa.float64())) for name in ZONE_ERA_COLUMNS})


def rule_counts(trips: pd.DataFrame) -> Counter:
    """How many trips each cleaning rule would reject (first broken rule only)."""
    columns = {name: trips[name].to_numpy() for name in trips.columns if name not in ("id", "store_and_fwd_flag")}
    return Counter(count_rules(first_broken_rule(columns)))


def write_csv(chunks: Iterator[pd.DataFrame], handle: BinaryIO, rows: int, progress: bool = True,
              layout: str = "kaggle") -> tuple[int, Counter]:
    """Write the header and every chunk to ``handle``; returns rows written and rule counts.

    The rule counts let the summary show that the generated file is as dirty
    as the real sample.
    """
    header = FIELDS if layout == "kaggle" else ZONE_ERA_COLUMNS
    handle.write((",".join(header) + "\n").encode())
    written, rejected = 0, Counter()
    started = last_print = time.monotonic()
    for trips in chunks:
        if layout != "kaggle":
            trips = in_zones(trips)
        pa_csv.write_csv(to_kaggle_table(trips) if layout == "kaggle" else to_zone_era_table(trips), handle,
                         CSV_OPTIONS)
        written += len(trips)
        rejected.update(rule_counts(trips))
        now = time.monotonic()
        if progress and now - last_print >= 1.0:
            print(f"  wrote {written:,} of {rows:,} trips ({written / (now - started):,.0f} trips/s)", flush=True)
            last_print = now
    return written, rejected


def write_file(chunks: Iterator[pd.DataFrame], out: Path, rows: int, progress: bool = True,
               layout: str = "kaggle") -> tuple[int, Counter]:
    """Write to a temporary name beside ``out``, then rename: a file at ``out`` is always complete.

    A ``.gz`` name is gzip-compressed with a blank name and time in the gzip
    header, which would otherwise make every run's bytes different.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.{os.getpid()}.partial")
    try:
        with open(partial, "wb") as raw:
            if out.suffix == ".gz":
                with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=GZIP_LEVEL) as handle:
                    result = write_csv(chunks, handle, rows, progress, layout)
            else:
                result = write_csv(chunks, raw, rows, progress, layout)
        os.replace(partial, out)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m periscope.generate",
        description="Generate realistic NYC taxi trips in the Kaggle CSV layout (or a TLC zone-era one) by "
                    "resampling the real sample.",
        formatter_class=cli.HelpFormatter,
    )
    parser.add_argument("--rows", type=int, default=1_500_000,
                        help=f"trips to generate, 1..{MAX_ROWS:,} (the full Kaggle training set has 1,458,644)")
    parser.add_argument("--seed", type=int, default=7,
                        help="random seed; the same seed, --rows and input give byte-identical output")
    parser.add_argument("--input", type=Path, default=config.SAMPLE_CSV,
                        help="real trips to resample, Kaggle layout, plain or .gz (env PERISCOPE_SAMPLE_CSV)")
    parser.add_argument("--out", default=None,
                        help="output CSV, gzip-compressed if it ends in .gz; {rows} and {seed} are filled in "
                             f"(default: {OUT_TEMPLATE}; with --layout yellow_zones: {ZONES_OUT_TEMPLATE})")
    parser.add_argument("--layout", choices=LAYOUTS, default="kaggle",
                        help="kaggle: the Kaggle CSV layout; yellow_zones: a TLC yellow-cab file of the zone era "
                             "(taxi zones instead of coordinates, no ids, empty fares)")
    parser.add_argument("--quiet", action="store_true", help="print only the summary line, no progress")
    args = parser.parse_args(argv)
    if not 1 <= args.rows <= MAX_ROWS:
        parser.error(f"--rows must be between 1 and {MAX_ROWS:,} ({ID_DIGITS}-digit ids), got {args.rows:,}")
    if args.seed < 0:
        parser.error(f"--seed must be zero or positive, got {args.seed}")
    if args.out is None:
        args.out = OUT_TEMPLATE if args.layout == "kaggle" else ZONES_OUT_TEMPLATE
    try:
        args.out = out_path(args.out, args.rows, args.seed)
    except (KeyError, IndexError, ValueError):
        parser.error(f"--out {args.out!r}: only {{rows}} and {{seed}} may appear in braces")
    if args.out.is_dir():
        parser.error(f"--out {args.out} is a directory; give a file name such as trips.csv or trips.csv.gz")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    try:
        source, report = read_trips(args.input)
    except (FileNotFoundError, CsvLayoutError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if len(source) == 0:
        print(f"error: {args.input} has no well-formed trips to resample", file=sys.stderr)
        return 2
    source_share = sum(rule_counts(source).values()) / len(source)
    if not args.quiet:
        print(f"resampling {len(source):,} well-formed trips from {args.input} "
              f"({report.rows_malformed:,} malformed rows skipped); seed {args.seed}", flush=True)

    written, rejected = write_file(generate(source, args.rows, args.seed), args.out, args.rows, not args.quiet,
                                   args.layout)
    seconds = time.perf_counter() - started
    size_mb = args.out.stat().st_size / 1e6
    print(f"wrote {written:,} trips to {args.out} ({size_mb:,.1f} MB) in {seconds:.1f} s "
          f"({written / seconds:,.0f} trips/s); cleaning rules would reject "
          f"{sum(rejected.values()) / written:.2%} of them (the source: {source_share:.2%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
