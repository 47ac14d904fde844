"""The Lambda merge: batch view + speed view = a full recompute over the distinct facts.

``combined_views`` is what the dashboard shows and what the tests check::

    combined = current batch version
             + aggregates of the speed rows that are
                 1. above that version's watermark for their partition (offset > W[p]),
                 2. of a trip the version does not hold (id not in its trip index), and
                 3. the first speed row of their trip (smallest (partition, offset))

Batch and speed views hold the same integer aggregates (``periscope.views``),
so the sum is exact. Why each distinct trip counts exactly once:

* A trip the batch version holds (any copy in the master data it was computed
  from) is counted by the batch layer, once: its recompute keeps the first copy
  in source order and applies the cleaning rules to it. The version's trip
  index lists every id of that master data, clean or not, so rule 2 leaves out
  every speed row of that trip, whichever side of the watermark it sits on.
* A trip the batch version does not hold is counted by the speed layer, once:
  rule 3 keeps only its earliest speed row. That is the copy the next batch
  recompute keeps too, because stream files follow (partition, offset) in
  source order and a trip's key puts all its copies in one Kafka partition.
* Rows at or below the watermark (rule 1) are in the batch version already.

Ids are compared exactly: the index is held as sorted byte strings and
looked up by binary search, then compared for equality; no hashing, no Bloom
filter, nothing that can drop a distinct trip. The index is read once per
version and kept (``trip_index``), so a refresh costs a search per speed row.
A version published before versions carried an index (``Combined.batch_index_trips``
is None) excludes no ids: its trips may count twice until the next batch run.

Two copies of a trip that *differ* count as the earliest one everywhere,
like the batch rule (the first copy in source order), with two exceptions
until the next batch run holds the trip: the speed layer sends a copy
breaking a cleaning rule to the dead-letter topic, so if that copy came
first, a later valid copy counts here; and copies of one id in two Kafka
partitions (which key partitioning never makes) follow (partition, offset)
here, while the batch version holds the one it has ingested.

The batch pointer is read before and after the speed files: if a new version
was published (and the speed view pruned) in between, the read is repeated,
so a reader never combines an old batch version with an already-pruned speed
view.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from periscope import speed_view, storage, views

INDEX_CACHE_VERSIONS = 2
"""Trip indexes kept in memory: the current version, and the previous one while readers switch."""
_TERMINATOR = "\x01"


@dataclass
class Combined:
    """The merged views and where each part came from.

    ``speed_rows`` holds only the speed rows that count (above the watermark,
    first of their trip, not in the batch version); the rows left out as
    copies of a trip counted elsewhere are counted in ``speed_duplicates_of_batch``
    and ``speed_duplicates_of_speed``.
    """

    views: dict[str, pd.DataFrame]
    batch_views: dict[str, pd.DataFrame]
    speed_views: dict[str, pd.DataFrame]
    speed_rows: pd.DataFrame
    batch_version: str | None = None
    watermark: dict[int, int] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)
    batch_index_trips: int | None = None
    """Distinct trip ids in the batch version's index; None when there is no version or it has no index."""
    speed_duplicates_of_batch: int = 0
    """Speed rows above the watermark left out because the batch version holds their trip."""
    speed_duplicates_of_speed: int = 0
    """Speed rows left out because an earlier speed row (smaller partition, offset) holds their trip."""

    @property
    def batch_trips(self) -> int:
        return int(self.batch_views["daily_summary"]["trips"].sum())

    @property
    def speed_trips(self) -> int:
        return len(self.speed_rows)

    @property
    def speed_duplicates(self) -> int:
        return self.speed_duplicates_of_batch + self.speed_duplicates_of_speed

    @property
    def index_missing(self) -> bool:
        """A batch version without a trip index: speed rows were not checked against it."""
        return self.batch_version is not None and self.batch_index_trips is None


class TripIndex:
    """A batch version's trip ids, for exact membership tests of many ids at once.

    The ids are held as one sorted array of fixed-width byte strings: UTF-8
    plus a terminator byte, so that numpy's stripping of trailing NUL bytes
    can never make two different ids equal. About (longest id + 1) bytes per
    trip: 16 MB for 1.5 M Kaggle-style ids, 110 MB for 10 M.
    """

    def __init__(self, keys: np.ndarray):
        if len(keys) > 1 and not bool(np.all(keys[1:] > keys[:-1])):
            keys = np.unique(keys)
        self.keys = keys

    @classmethod
    def of(cls, ids: np.ndarray) -> TripIndex:
        return cls(utf8_keys(ids))

    @classmethod
    def read(cls, path: Path) -> TripIndex:
        """Read a version's ``storage.TRIP_INDEX`` file as Arrow, without a Python object per id
        (10 M ids as Python strings would take ~1 GB for a moment)."""
        column = pq.read_table(path, columns=["id"]).column("id").combine_chunks()
        keys = arrow_keys(column)
        return cls(keys if keys is not None else utf8_keys(column.to_numpy(zero_copy_only=False)))

    def __len__(self) -> int:
        return len(self.keys)

    def contains(self, ids: np.ndarray) -> np.ndarray:
        """A boolean per id: is it one of the index's ids (compared byte for byte)."""
        if len(self.keys) == 0 or len(ids) == 0:
            return np.zeros(len(ids), dtype=bool)
        wanted = utf8_keys(ids)
        at = np.minimum(np.searchsorted(self.keys, wanted), len(self.keys) - 1)
        return self.keys[at] == wanted


def utf8_keys(ids: np.ndarray) -> np.ndarray:
    """Ids as fixed-width bytes (UTF-8 + terminator), ordered as the ids are (when they hold no NUL)."""
    terminated = pd.Series(ids, dtype=object) + _TERMINATOR
    try:
        return terminated.to_numpy().astype(np.bytes_)
    except UnicodeEncodeError:
        return terminated.str.encode("utf-8").to_numpy().astype(np.bytes_)


def arrow_keys(ids: pa.Array) -> np.ndarray | None:
    """``utf8_keys`` of an Arrow string array, computed in Arrow; None unless every id is ASCII text."""
    if not (pa.types.is_string(ids.type) or pa.types.is_large_string(ids.type)) or ids.null_count:
        return None
    if len(ids) == 0:
        return np.array([], dtype="S1")
    if not pc.all(pc.string_is_ascii(ids)).as_py():
        return None
    if pa.types.is_large_string(ids.type):  # polars writes large strings; the kernels below want one type
        ids = ids.cast(pa.string())
    terminated = pc.binary_join_element_wise(ids, pa.scalar(_TERMINATOR, ids.type), "")
    width = pc.max(pc.binary_length(terminated)).as_py()
    padded = pc.utf8_rpad(terminated, width=width, padding="\x00")
    offset_type = np.int64 if pa.types.is_large_string(padded.type) else np.int32
    start = int(np.frombuffer(padded.buffers()[1], dtype=offset_type, count=1,
                              offset=padded.offset * np.dtype(offset_type).itemsize)[0])
    return np.frombuffer(padded.buffers()[2], dtype=f"S{width}", count=len(padded), offset=start).copy()


_index_cache: OrderedDict[tuple, TripIndex] = OrderedDict()
_index_lock = threading.Lock()


def trip_index(views_dir: Path, version: str) -> TripIndex | None:
    """The trip index of ``version``, read once and kept; None for a version without one.

    The cache key includes the file's identity (inode, size, mtime), so a
    directory rebuilt under the same version name is read again.
    """
    path = Path(views_dir) / version / storage.TRIP_INDEX
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    key = (str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    with _index_lock:
        if key in _index_cache:
            _index_cache.move_to_end(key)
            return _index_cache[key]
    try:
        index = TripIndex.read(path)
    except FileNotFoundError:
        return None
    with _index_lock:
        _index_cache[key] = index
        while len(_index_cache) > INDEX_CACHE_VERSIONS:
            _index_cache.popitem(last=False)
    return index


def clear_index_cache() -> None:
    """Forget every trip index read so far (benchmarks time the first read of a version with it)."""
    with _index_lock:
        _index_cache.clear()


def count_once(rows: pd.DataFrame, index: TripIndex | None) -> tuple[pd.DataFrame, int, int]:
    """The speed rows that count, and how many were left out as copies of the batch / of earlier rows.

    ``rows`` must be in (partition, offset) order, as ``speed_view.read_speed`` returns them.
    """
    if len(rows) == 0:
        return rows, 0, 0
    ids = rows["id"].to_numpy(dtype=object)
    in_batch = index.contains(ids) if index is not None else np.zeros(len(rows), dtype=bool)
    repeated = pd.Series(ids).duplicated(keep="first").to_numpy() & ~in_batch
    keep = ~(in_batch | repeated)
    counted = rows if keep.all() else rows[keep].reset_index(drop=True)
    return counted, int(in_batch.sum()), int(repeated.sum())


def empty_views() -> dict[str, pd.DataFrame]:
    return {name: views.empty_view(name) for name in views.VIEWS}


def speed_aggregates(rows: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The speed layer's rows as mergeable views (the same code as the batch layer)."""
    return views.aggregate({name: rows[name].to_numpy() for name in rows.columns})


def combined_views(views_dir: Path, speed_dir: Path, attempts: int = 5) -> Combined:
    """Current batch version + the speed rows above its watermark that count, merged view by view."""
    for _ in range(attempts):
        version = storage.current_version(views_dir)
        index = None
        if version is None:
            batch, manifest = empty_views(), {}
        else:
            try:
                batch, manifest = storage.read_version(views_dir, version)
                index = trip_index(views_dir, version)
            except FileNotFoundError:
                continue
        watermark = speed_view.normalise_watermark(manifest.get("watermark"))
        rows = speed_view.read_speed(speed_dir, watermark)
        if storage.current_version(views_dir) == version:
            counted, of_batch, of_speed = count_once(rows, index)
            speed = speed_aggregates(counted)
            batch = {name: batch.get(name, views.empty_view(name)) for name in views.VIEWS}
            return Combined(views.merge(batch, speed), batch, speed, counted, version, watermark, manifest,
                            batch_index_trips=None if index is None else len(index),
                            speed_duplicates_of_batch=of_batch, speed_duplicates_of_speed=of_speed)
    raise RuntimeError(f"batch versions in {views_dir} changed {attempts} times while reading; try again")
