"""Durable, atomic storage: the Avro master dataset and versioned Parquet views.

Two rules keep readers safe without any database:

* **Write aside, then rename.** Every file or directory is written under a
  temporary name in its final parent directory, flushed to disk, and moved
  into place with ``os.replace`` — atomic on POSIX. A reader sees the old
  state or the new one, never half of either.
* **Immutable once named.** A master file or a view version is never edited
  after its rename; new facts make new files, a recompute makes a new version.

Layout under ``data/``::

    master/csv/<24 hex digits of the source's sha256>[-before-<cutoff>]/part-00000.avro + import.json
                                                           history from CSV (``csv_import_dir``)
    master/stream/<topic>/p000/<first offset>-<last offset>.avro   events drained from Kafka
    views/v000007/<view>.parquet + manifest.json + index/trip_ids.parquet   one published batch version
    views/current.json                                     {"version": "v000007"}

A batch version is published in steps that ``batch_processor.publish`` spells
out with the primitives below: ``next_version``, ``staged_directory`` (write
aside, then rename), ``write_views``, ``write_trip_index``, ``write_manifest``,
``switch_current`` (the atomic switch readers follow), ``prune_versions``.

The master files have a *source order* (``master_files``): CSV imports in the
order they were made, then stream files by topic, partition and offset. When
the same trip id is in master data twice, the first copy in that order counts.
"""
from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from itertools import islice
from operator import itemgetter
from pathlib import Path
from typing import Any, NamedTuple

import fastavro
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import polars as pl

from periscope.batch_tuning import MASTER_CODEC
from periscope.schema import (AVRO_SCHEMA, KAGGLE_AVRO_SCHEMA, NOT_RECORDED, NULLABLE_FIELDS, RULE_NAMES,
                              SOURCE_FIELDS, TRIP_FIELDS, ZONE_FIELDS, ZONED_KAGGLE_AVRO_SCHEMA, avro_type,
                              format_time, from_tlc_source)

PARSED_SCHEMA = fastavro.parse_schema(AVRO_SCHEMA)
KAGGLE_SCHEMA = fastavro.parse_schema(KAGGLE_AVRO_SCHEMA)
"""What master files of Kaggle-field trips were written with before trips got their zones: the
eleven fields, none nullable. Such files still read (schema resolution, the zones null)."""
ZONED_KAGGLE_SCHEMA = fastavro.parse_schema(ZONED_KAGGLE_AVRO_SCHEMA)
"""What a master file of Kaggle-field trips is written with: the eleven fields and the two zones,
none nullable. polars reads it as fast as the eleven fields alone, and fastavro writes it 4x faster
than the same trips with ``AVRO_SCHEMA``'s unions (0.36 vs 1.5 s per 73,177 trips); schema
resolution reads it as ``AVRO_SCHEMA``, the other TLC fields null."""
_TLC_ONLY_FIELDS = tuple(name for name in SOURCE_FIELDS if name not in ZONE_FIELDS)
META_PREFIX = "periscope."
POINTER = "current.json"
MANIFEST = "manifest.json"
IMPORT_SUMMARY = "import.json"
KEEP_VERSIONS = 5
"""Published batch versions kept by default (``--keep``): the current one and a few to go back to."""
TRIP_INDEX = Path("index") / "trip_ids.parquet"
"""Inside a version: every distinct trip id of the master data it was computed from, sorted."""

_NUMPY_TYPES = {"int": np.int64, "long": np.int64, "double": np.float64, "boolean": np.bool_}
_COLUMN_DTYPES = {field["name"]: _NUMPY_TYPES[avro_type(field)] for field in AVRO_SCHEMA["fields"]
                  if avro_type(field) != "string"}
_STRING_FIELDS = tuple(field["name"] for field in AVRO_SCHEMA["fields"] if avro_type(field) == "string")


# --- atomic primitives --------------------------------------------------------


def file_sha256(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Content fingerprint: the identity of an imported source and of training data."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` durably.

    Whatever the block writes there appears all at once under the final name
    (fsync, rename, fsync of the directory); on error it is removed and
    ``path`` is untouched.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        tmp.chmod(0o644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that readers see old or new, never half."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: Path, value: Any) -> None:
    atomic_write_bytes(path, (json.dumps(value, indent=2, sort_keys=True, default=str) + "\n").encode())


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


@contextmanager
def locked(directory: Path) -> Iterator[None]:
    """An exclusive lock on ``directory`` so two writers never publish at once."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def publish_dir(staging: Path, final: Path) -> None:
    """Move a fully written staging directory (subdirectories included) to its final name, durably."""
    for child in sorted(staging.rglob("*"), reverse=True):  # files before the directories holding them
        if child.is_dir():
            fsync_dir(child)
            continue
        with open(child, "rb") as handle:
            os.fsync(handle.fileno())
    staging.chmod(0o755)
    os.replace(staging, final)
    fsync_dir(final.parent)


@contextmanager
def staged_directory(final: Path) -> Iterator[Path]:
    """Yield an empty hidden directory beside ``final``; when the block ends it becomes ``final``.

    Everything written there appears at once under the final name, durably
    (``publish_dir``); if the block fails, the staging directory is removed
    and ``final`` never appears.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield staging
        publish_dir(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


# --- master dataset (Avro) -----------------------------------------------------


def csv_import_dir(master_dir: Path, sha256: str, cutoff_ms: int | None) -> Path:
    """Where a CSV import lives; its name is its identity: the file's content and where its history ends.

    ``csv/<sha256[:24]>`` for the whole file, ``csv/<sha256[:24]>-before-20160601T000000``
    for the trips picked up before a cutoff: another import of the same file.
    """
    if cutoff_ms is None:
        return master_dir / "csv" / sha256[:24]
    stamp = format_time(cutoff_ms).replace("-", "").replace(":", "").replace(" ", "T")
    return master_dir / "csv" / f"{sha256[:24]}-before-{stamp}"


def stream_file(master_dir: Path, topic: str, partition: int, first: int, last: int) -> Path:
    """Where the events of one partition's offset range live: the name is the range."""
    return master_dir / "stream" / topic / f"p{partition:03d}" / f"{first:020d}-{last:020d}.avro"


def last_stream_offsets(master_dir: Path, topic: str) -> dict[int, int]:
    """The last Kafka offset in master data, per partition of ``topic``, read from the file names."""
    offsets: dict[int, int] = {}
    for path in (master_dir / "stream" / topic).glob("p[0-9][0-9][0-9]/*.avro"):
        if not path.name.startswith("."):
            partition, last = int(path.parent.name[1:]), int(path.stem.split("-")[1])
            offsets[partition] = max(last, offsets.get(partition, -1))
    return offsets


def in_parts(frames: Iterable[pd.DataFrame], part_rows: int) -> Iterator[pd.DataFrame]:
    """The rows of ``frames``, in order, regrouped into parts of ``part_rows`` rows (the last one smaller)."""
    pending: list[pd.DataFrame] = []
    held = 0
    for frame in frames:
        pending.append(frame)
        held += len(frame)
        while held >= part_rows:
            rows = pd.concat(pending, ignore_index=True)
            yield rows.iloc[:part_rows]
            pending, held = [rows.iloc[part_rows:]], len(rows) - part_rows
    if held:
        yield pd.concat(pending, ignore_index=True)


def master_schema(fields: Iterable[str]) -> dict[str, Any]:
    """The parsed schema a master file of trips with these fields is written with: ``PARSED_SCHEMA``
    for TLC trips (any TLC field but the zones), ``ZONED_KAGGLE_SCHEMA`` for Kaggle trips with their
    zones, ``KAGGLE_SCHEMA`` for the eleven Kaggle fields alone."""
    names = set(fields)
    if names & set(_TLC_ONLY_FIELDS):
        return PARSED_SCHEMA
    return ZONED_KAGGLE_SCHEMA if names >= set(ZONE_FIELDS) else KAGGLE_SCHEMA


def record_to_avro(record: Mapping[str, Any]) -> dict[str, Any]:
    """A record as an Avro record: a TLC record's values not recorded (``NOT_RECORDED``, NaN) as null."""
    if not from_tlc_source(record):
        return dict(record)
    return {name: None if name in NULLABLE_FIELDS and (value is None or value is pd.NA or (
        isinstance(value, float) and value != value) or (type(value) is int and value == NOT_RECORDED))
            else value for name, value in record.items()}


def frame_to_records(frame: pd.DataFrame) -> Iterator[dict[str, Any]]:
    """Trip-frame rows as Avro records (plain Python values, fastavro's input).

    A Kaggle frame gives the eleven Kaggle fields (and the zones, once
    assigned); a TLC frame every field of ``TRIP_FIELDS``, a value not
    recorded (``NOT_RECORDED``, NaN, NA) as null.
    """
    names = [name for name in TRIP_FIELDS if name in frame]
    tlc_trips = any(name in frame for name in _TLC_ONLY_FIELDS)
    columns = []
    for name in names:
        values = frame[name]
        if tlc_trips and name in NULLABLE_FIELDS:
            absent = values.isna().to_numpy()
            if pd.api.types.is_integer_dtype(values.dtype):
                absent |= values.to_numpy() == NOT_RECORDED
            if absent.any():
                values = values.astype(object).where(~absent, None)
        columns.append(values.tolist())
    for row in zip(*columns):
        yield dict(zip(names, row))


def write_avro(path: Path, records: Iterator[dict[str, Any]], metadata: Mapping[str, Any],
               schema: dict[str, Any] | None = None) -> None:
    """Write one master file; ``metadata`` goes into the Avro header as ``periscope.*``.

    With the ``schema`` given (fields a record lacks are null), else the one
    ``master_schema`` gives the first record's fields (a file holds one kind).
    Uncompressed (``batch_tuning.MASTER_CODEC``). Not durable by itself: callers
    publish through ``atomic_path`` or ``staged_directory``, which fsync before the rename.
    """
    header = {META_PREFIX + key: str(value) for key, value in metadata.items()}
    first = next(records, None)
    schema = schema or master_schema(first or ())
    with open(path, "wb") as handle:
        fastavro.writer(handle, schema, itertools.chain([] if first is None else [first], records),
                        codec=MASTER_CODEC, metadata=header, sync_interval=1 << 20)


def write_avro_atomic(path: Path, records: Iterator[dict[str, Any]], metadata: Mapping[str, Any],
                      schema: dict[str, Any] | None = None) -> None:
    """``write_avro`` under a temporary name, then renamed into place: all or nothing."""
    with atomic_path(path) as tmp:
        write_avro(tmp, records, metadata, schema)


def avro_metadata(path: Path) -> dict[str, str]:
    """The ``periscope.*`` header entries of a master file: what it holds."""
    with open(path, "rb") as handle:
        header = fastavro.reader(handle).metadata
    return {key[len(META_PREFIX):]: value for key, value in header.items() if key.startswith(META_PREFIX)}


def csv_import_order(import_dir: Path) -> tuple[bool, int, str, str]:
    """Where a CSV import stands in source order: by its ``import_seq``; imports made before imports
    were numbered come first, by ``imported_at``, then by directory name."""
    summary = import_dir / IMPORT_SUMMARY
    info = read_json(summary) if summary.exists() else {}
    seq = info.get("import_seq")
    return seq is not None, int(seq or 0), str(info.get("imported_at", "")), import_dir.name


def csv_imports(master_dir: Path) -> list[Path]:
    """The published CSV import directories (``master/csv/*``), in import order."""
    root = master_dir / "csv"
    if not root.exists():
        return []
    return sorted((path for path in root.iterdir() if path.is_dir() and not path.name.startswith(".")),
                  key=csv_import_order)


def _stream_order(relative: Path) -> tuple[str, int, int, str]:
    """``stream/<topic>/p001/<first>-<last>.avro`` -> (topic, 1, first offset, name)."""
    _, topic, partition, *_ = relative.parts
    first = relative.stem.split("-")[0]
    return (topic, int(partition[1:]) if partition[1:].isdigit() else -1,
            int(first) if first.isdigit() else -1, relative.name)


def master_files(master_dir: Path) -> list[Path]:
    """Every published master file in *source order* (temporary names skipped).

    Source order decides which copy of a trip counts when master data holds it
    twice (the first): CSV imports in import order (``csv_imports``), each
    import's parts in name order; then stream files by (topic, partition,
    first offset); then any other Avro file under ``master_dir``, by path.
    """
    if not master_dir.exists():
        return []
    csv, stream, other = [], [], []
    for path in master_dir.rglob("*.avro"):
        relative = path.relative_to(master_dir)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if relative.parts[0] == "csv" and len(relative.parts) >= 3:
            csv.append(relative)
        elif relative.parts[0] == "stream" and len(relative.parts) == 4:
            stream.append(relative)
        else:
            other.append(relative)
    import_rank = {path.name: rank for rank, path in enumerate(csv_imports(master_dir))}
    csv.sort(key=lambda relative: (import_rank[relative.parts[1]], relative.parts[2:]))
    stream.sort(key=_stream_order)
    return [master_dir / relative for relative in csv + stream + sorted(other)]


def iter_avro_columns(path: Path, chunk_rows: int = 100_000) -> Iterator[dict[str, np.ndarray]]:
    """A master file as record-form column arrays through fastavro, ``chunk_rows`` records at a time.

    The batch layer reads master files with ``periscope.master_reader`` (polars,
    several times faster); this decoder stays as the reference it is compared
    with (``batch_processor.py recompute --decoder fastavro``, ``bench/bench_batch.py``).
    The fields are the file's own (a Kaggle file has the eleven Kaggle ones),
    strings as object arrays (None for null), the others int64, float64 or
    bool, with a null as ``NOT_RECORDED``, NaN or False.
    """
    with open(path, "rb") as handle:
        reader = fastavro.reader(handle)
        written = {field["name"] for field in reader.writer_schema["fields"]}
        names = tuple(name for name in _COLUMN_DTYPES if name in written)
        strings = tuple(name for name in _STRING_FIELDS if name in written)
        getter = itemgetter(*names)
        while rows := list(islice(reader, chunk_rows)):
            # One float64 matrix is the fastest way out of Python objects; every
            # value fits exactly (ms timestamps < 2**53, small ints, doubles); null becomes NaN.
            matrix = np.array(list(map(getter, rows)), dtype=np.float64)
            columns = {name: np.array([row[name] for row in rows], dtype=object) for name in strings}
            for index, name in enumerate(names):
                values, dtype = matrix[:, index], _COLUMN_DTYPES[name]
                if dtype is np.int64:
                    values = np.where(np.isnan(values), NOT_RECORDED, values)
                elif dtype is np.bool_:
                    values = np.nan_to_num(values, nan=0.0)
                columns[name] = values.astype(dtype)
            yield columns


def read_master_records(master_dir: Path) -> Iterator[dict[str, Any]]:
    """Every master record (for tests and small tools; the batch layer reads columns)."""
    for path in master_files(master_dir):
        with open(path, "rb") as handle:
            yield from fastavro.reader(handle)


# --- batch view versions (Parquet) -----------------------------------------------


def current_version(views_dir: Path) -> str | None:
    """Name of the published batch version, or None before the first publish."""
    pointer = views_dir / POINTER
    return read_json(pointer)["version"] if pointer.exists() else None


def version_dirs(views_dir: Path) -> list[Path]:
    """Published version directories, oldest first."""
    if not views_dir.exists():
        return []
    return sorted(path for path in views_dir.glob("v[0-9]*") if path.is_dir())


class BatchVersion(NamedTuple):
    """A computed batch version, not yet published: views, manifest and trip ids.

    ``trip_ids`` holds every distinct trip id of the master data the views were
    computed from (clean or not), sorted; it becomes the version's ``TRIP_INDEX``.
    """

    views: dict[str, pd.DataFrame]
    manifest: dict[str, Any]
    trip_ids: pl.Series | None
    """None when the index is a file of ``written`` only (the Spark engine keeps the ids off the driver)."""
    written: Path | None = None
    """A directory that already holds the views and the trip index as files, in a version's layout
    (the Spark engine writes them there): publishing links those files in instead of writing."""


def next_version(views_dir: Path) -> str:
    """The name the next published version gets: one more than the newest (``v000001`` first).

    Take it under ``locked(views_dir)``, so that two publishers never pick the same name.
    """
    existing = version_dirs(views_dir)
    return f"v{int(existing[-1].name[1:]) + 1 if existing else 1:06d}"


def write_views(directory: Path, views: Mapping[str, pd.DataFrame]) -> None:
    """Each view as ``<name>.parquet`` in ``directory`` (a staging directory: not durable by itself)."""
    for name, frame in views.items():
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), directory / f"{name}.parquet")


def read_view(path: Path) -> pd.DataFrame:
    """A view file as the pandas frame every layer reads: dates as ``datetime64[ns]``, whichever
    engine wrote it (pandas writes nanoseconds, Spark microseconds)."""
    return pq.read_table(path).to_pandas(coerce_temporal_nanoseconds=True)


def version_files(directory: Path) -> list[Path]:
    """The files of a version's views and trip index in ``directory``, relative to it."""
    paths = sorted(path.relative_to(directory) for path in directory.glob("*.parquet"))
    return paths + ([TRIP_INDEX] if (directory / TRIP_INDEX).exists() else [])


def link_version_files(source: Path, target: Path) -> None:
    """Put the views and trip index files of ``source`` into ``target`` (a staging directory) as
    hard links, or copies where ``source`` is on another file system; ``source`` is left as it is."""
    for relative in version_files(source):
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source / relative, target / relative)
        except OSError:
            shutil.copy2(source / relative, target / relative)


def discard_written(version: BatchVersion) -> None:
    """Remove the directory a computed version's files were written to (after publishing them)."""
    if version.written is not None:
        shutil.rmtree(version.written, ignore_errors=True)


def write_manifest(directory: Path, manifest: Mapping[str, Any]) -> None:
    """``manifest.json`` in ``directory`` (a staging directory: not durable by itself)."""
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))


def switch_current(views_dir: Path, version: str) -> None:
    """Point ``current.json`` at ``version`` with one atomic rename: the moment readers move to it."""
    atomic_write_json(views_dir / POINTER, {"version": version})


def prune_versions(views_dir: Path, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` versions; returns the names deleted."""
    old = version_dirs(views_dir)[:-keep]
    for directory in old:
        shutil.rmtree(directory)
    return [directory.name for directory in old]


def write_version(
    views_dir: Path, views: Mapping[str, pd.DataFrame], manifest: dict[str, Any], keep: int,
    trip_ids: Sequence[str] | np.ndarray | pa.Array | pl.Series | None = None,
) -> dict[str, Any]:
    """Publish views that were not computed by the batch layer (tests, ``bench/bench_app.py``).

    The same steps as ``batch_processor.publish``, which is where the batch
    layer spells them out; without ``trip_ids`` the version has no trip index.
    Returns the manifest as written, with ``version`` and the write time added.
    """
    with locked(views_dir):
        version = next_version(views_dir)
        with staged_directory(views_dir / version) as staging:
            started = time.perf_counter()
            write_views(staging, views)
            if trip_ids is not None:
                write_trip_index(staging, trip_ids)
            timings = {**manifest.get("timings_s", {}), "write": round(time.perf_counter() - started, 3)}
            manifest = {**manifest, "version": version, "timings_s": timings}
            write_manifest(staging, manifest)
        switch_current(views_dir, version)
        prune_versions(views_dir, keep)
    return manifest


@dataclass(frozen=True)
class InputFile:
    """One master file as a version's manifest lists it (``input_files``)."""

    path: str
    """Relative to the master directory."""
    header: Mapping[str, str]
    """Its ``periscope.*`` Avro header entries (``avro_metadata``): what the file says it holds."""
    rows: int
    """Trips read from it."""
    duplicates: int
    """How many of those were later copies of a trip already seen, left out."""


def stream_watermark(headers: Iterable[Mapping[str, str]]) -> dict[str, int]:
    """Highest Kafka offset per partition covered by stream master files (empty for CSV-only data)."""
    watermark: dict[str, int] = {}
    for meta in headers:
        if meta.get("kind") == "stream":
            partition, last = meta["kafka_partition"], int(meta["kafka_last_offset"])
            watermark[partition] = max(last, watermark.get(partition, -1))
    return dict(sorted(watermark.items(), key=lambda item: int(item[0])))


def views_manifest(*, engine: str, inputs: Sequence[InputFile], clean: int, broken_rules: Mapping[str, int],
                   views: Mapping[str, pd.DataFrame], timings_s: Mapping[str, float]) -> dict[str, Any]:
    """What a batch version is made of, the same for every engine (publishing adds its name).

    ``inputs``: the master files read, in source order; ``clean``: the distinct
    trips that pass the cleaning rules; ``broken_rules``: how many distinct
    trips each rule removed. The watermark is the highest offset per partition
    the stream files cover. ``rows``: ``master == distinct + duplicates`` and,
    as the cleaning rules apply to the distinct trips, ``distinct == clean + sum(cleaning)``.
    """
    master, duplicates = sum(f.rows for f in inputs), sum(f.duplicates for f in inputs)
    return {
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "engine": engine,
        "watermark": stream_watermark(f.header for f in inputs),
        "watermark_topics": sorted({f.header["topic"] for f in inputs if f.header.get("kind") == "stream"}),
        "rows": {
            "master": master,
            "distinct": master - duplicates,
            "duplicates": duplicates,
            "clean": clean,
            "views": {name: len(frame) for name, frame in views.items()},
        },
        "cleaning": {name: broken_rules.get(name, 0) for name in RULE_NAMES},
        "input_files": [{**f.header, "path": f.path, "rows": f.rows, "duplicates": f.duplicates} for f in inputs],
        "timings_s": {name: round(value, 3) for name, value in timings_s.items()},
    }


def write_trip_index(version_dir: Path, ids: Sequence[str] | np.ndarray | pa.Array | pl.Series) -> Path:
    """Write the trip ids a batch version covers (``TRIP_INDEX``), sorted and distinct.

    Every id of the master data counts, clean or not: the serving layer uses
    the index to leave out speed rows whose trip the batch version already
    holds, so that a trip is never counted twice (``periscope.serving``).
    Not durable by itself: it is written into a version's staging directory.
    Written with polars, which sorts on several threads when the ids are not sorted yet.
    """
    series = (ids if isinstance(ids, pl.Series) else pl.Series(values=ids, dtype=pl.String)).rename("id")
    if not series.is_sorted() or (series == series.shift(1)).any():
        series = series.unique().sort()
    path = version_dir / TRIP_INDEX
    path.parent.mkdir(parents=True, exist_ok=True)
    series.to_frame().write_parquet(path)
    return path


def read_trip_index(views_dir: Path, version: str) -> np.ndarray | None:
    """The sorted, distinct trip ids of ``version`` (an object array of str), or None for a
    version published before versions carried an index."""
    path = views_dir / version / TRIP_INDEX
    if not path.exists():
        return None
    return pq.read_table(path).column("id").to_numpy()


def read_version(views_dir: Path, version: str | None = None) -> tuple[dict[str, pd.DataFrame], dict[str, Any]]:
    """Views and manifest of ``version`` (default: the current one)."""
    version = version or current_version(views_dir)
    if version is None:
        raise FileNotFoundError(f"no batch version in {views_dir} yet: run `python batch_processor.py`")
    directory = views_dir / version
    manifest = read_json(directory / MANIFEST)
    views = {path.stem: read_view(path) for path in sorted(directory.glob("*.parquet"))}
    return views, manifest
