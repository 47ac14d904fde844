"""Durable, atomic storage: the Avro master dataset and versioned Parquet views.

Two rules keep readers safe without any database:

* **Write aside, then rename.** Every file or directory is written under a
  temporary name in its final parent directory, flushed to disk, and moved
  into place with ``os.replace`` — atomic on POSIX. A reader sees the old
  state or the new one, never half of either.
* **Immutable once named.** A master file or a view version is never edited
  after its rename; new facts make new files, a recompute makes a new version.

Layout under ``data/``::

    master/csv/<sha256 of the source>[-before-<cutoff>]/part-00000.avro + import.json   history from CSV
    master/stream/<topic>/p000/<first offset>-<last offset>.avro   events drained from Kafka
    views/v000007/<view>.parquet + manifest.json + index/trip_ids.parquet   one published batch version
    views/current.json                                     {"version": "v000007"}

The master files have a *source order* (``master_files``): CSV imports in the
order they were made, then stream files by topic, partition and offset. When
the same trip id is in master data twice, the first copy in that order counts.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
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

from periscope.schema import AVRO_SCHEMA, FIELDS, RULE_NAMES

PARSED_SCHEMA = fastavro.parse_schema(AVRO_SCHEMA)
META_PREFIX = "periscope."
POINTER = "current.json"
MANIFEST = "manifest.json"
IMPORT_SUMMARY = "import.json"
MASTER_CODEC = "null"
"""Avro block compression of new master files: none. Deflate made them a quarter smaller (11.2 instead
of 15.0 MB per 250,000 trips) but took two thirds of the time to read them (0.13 instead of 0.04 s
with polars), and every recompute reads every file. Files written with deflate stay readable."""
TRIP_INDEX = Path("index") / "trip_ids.parquet"
"""Inside a version: every distinct trip id of the master data it was computed from, sorted."""

_COLUMN_DTYPES = {
    "vendor_id": np.int64,
    "pickup_datetime": np.int64,
    "dropoff_datetime": np.int64,
    "passenger_count": np.int64,
    "pickup_longitude": np.float64,
    "pickup_latitude": np.float64,
    "dropoff_longitude": np.float64,
    "dropoff_latitude": np.float64,
    "store_and_fwd_flag": np.bool_,
    "trip_duration": np.int64,
}


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


# --- master dataset (Avro) -----------------------------------------------------


def frame_to_records(frame: pd.DataFrame) -> Iterator[dict[str, Any]]:
    """Trip-frame rows as Avro records (plain Python values, fastavro's input)."""
    columns = [frame[name].tolist() for name in FIELDS]
    for values in zip(*columns):
        yield dict(zip(FIELDS, values))


def write_avro(path: Path, records: Iterator[dict[str, Any]], metadata: Mapping[str, Any]) -> None:
    """Write one master file; ``metadata`` goes into the Avro header as ``periscope.*``.

    Uncompressed (``MASTER_CODEC``). Not durable by itself: callers publish
    through ``atomic_path`` or ``publish_dir``, which fsync before the rename.
    """
    header = {META_PREFIX + key: str(value) for key, value in metadata.items()}
    with open(path, "wb") as handle:
        fastavro.writer(handle, PARSED_SCHEMA, records, codec=MASTER_CODEC, metadata=header, sync_interval=1 << 20)


def write_avro_atomic(path: Path, records: Iterator[dict[str, Any]], metadata: Mapping[str, Any]) -> None:
    """``write_avro`` under a temporary name, then renamed into place: all or nothing."""
    with atomic_path(path) as tmp:
        write_avro(tmp, records, metadata)


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
    ``id`` is an object array of str, the other fields int64, float64 or bool.
    """
    names = tuple(_COLUMN_DTYPES)
    getter = itemgetter(*names)
    with open(path, "rb") as handle:
        reader = fastavro.reader(handle)
        while rows := list(islice(reader, chunk_rows)):
            # One float64 matrix is the fastest way out of Python objects; every
            # value fits exactly (ms timestamps < 2**53, small ints, doubles).
            matrix = np.array(list(map(getter, rows)), dtype=np.float64)
            columns = {name: matrix[:, index].astype(_COLUMN_DTYPES[name]) for index, name in enumerate(names)}
            yield {"id": np.array([row["id"] for row in rows], dtype=object), **columns}


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
    """A computed batch version, not yet published: what ``write_version`` needs.

    ``trip_ids`` holds every distinct trip id of the master data the views were
    computed from (clean or not), sorted; it becomes the version's ``TRIP_INDEX``.
    """

    views: dict[str, pd.DataFrame]
    manifest: dict[str, Any]
    trip_ids: pl.Series


def write_version(
    views_dir: Path, views: Mapping[str, pd.DataFrame], manifest: dict[str, Any], keep: int,
    trip_ids: Sequence[str] | np.ndarray | pa.Array | pl.Series | None = None,
) -> dict[str, Any]:
    """Publish a new version: write aside, rename, switch ``current.json``, prune old ones.

    With ``trip_ids``, the version holds its trip index (``write_trip_index``),
    which the serving layer needs to count each trip once; ``batch_processor``
    always passes it. Returns the manifest as written, with ``version`` and the
    write time added. Readers following ``current.json`` see the previous
    version or this one, complete.
    """
    with locked(views_dir):
        existing = version_dirs(views_dir)
        number = int(existing[-1].name[1:]) + 1 if existing else 1
        version = f"v{number:06d}"
        staging = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=views_dir))
        try:
            started = time.perf_counter()
            for name, frame in views.items():
                pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), staging / f"{name}.parquet")
            if trip_ids is not None:
                write_trip_index(staging, trip_ids)
            timings = {**manifest.get("timings_s", {}), "write": round(time.perf_counter() - started, 3)}
            manifest = {**manifest, "version": version, "timings_s": timings}
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
            publish_dir(staging, views_dir / version)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        atomic_write_json(views_dir / POINTER, {"version": version})
        for old in version_dirs(views_dir)[:-keep]:
            shutil.rmtree(old)
    return manifest


def stream_watermark(metadata: Sequence[Mapping[str, str]]) -> dict[str, int]:
    """Highest Kafka offset per partition covered by stream master files (empty for CSV-only data)."""
    watermark: dict[str, int] = {}
    for meta in metadata:
        if meta.get("kind") == "stream":
            partition, last = meta["kafka_partition"], int(meta["kafka_last_offset"])
            watermark[partition] = max(last, watermark.get(partition, -1))
    return dict(sorted(watermark.items(), key=lambda item: int(item[0])))


def views_manifest(engine: str, master_dir: Path, files: Sequence[Path], metadata: Sequence[Mapping[str, str]],
                   file_rows: Sequence[int], file_duplicates: Sequence[int], clean_rows: int,
                   broken_rules: Mapping[str, int], views: Mapping[str, pd.DataFrame],
                   timings_s: Mapping[str, float]) -> dict[str, Any]:
    """What a batch version is made of, the same for every engine: ``write_version`` adds its name.

    ``files`` (in source order), ``metadata`` (their Avro headers),
    ``file_rows`` (trips read from each) and ``file_duplicates`` (how many of
    those were later copies of a trip already seen, left out) are parallel.
    The watermark is the highest offset per partition their stream files cover.
    ``rows``: ``master == distinct + duplicates`` and, as the cleaning rules
    apply to the distinct trips, ``distinct == clean + sum(cleaning)``.
    """
    master, duplicates = sum(file_rows), sum(file_duplicates)
    return {
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "engine": engine,
        "watermark": stream_watermark(metadata),
        "watermark_topics": sorted({meta["topic"] for meta in metadata if meta.get("kind") == "stream"}),
        "rows": {
            "master": master,
            "distinct": master - duplicates,
            "duplicates": duplicates,
            "clean": clean_rows,
            "views": {name: len(frame) for name, frame in views.items()},
        },
        "cleaning": {name: broken_rules.get(name, 0) for name in RULE_NAMES},
        "input_files": [{**meta, "path": str(path.relative_to(master_dir)), "rows": rows, "duplicates": dups}
                        for path, meta, rows, dups in zip(files, metadata, file_rows, file_duplicates)],
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
    views = {path.stem: pq.read_table(path).to_pandas() for path in sorted(directory.glob("*.parquet"))}
    return views, manifest
