"""The speed view: per-trip results of the speed layer, on disk, keyed by Kafka offset.

Both speed layers (``kafka_consumer.py`` and ``spark_streaming.py``) write it
in exactly this format, so either can feed the dashboard and the merge::

    data/speed/p000/00000000000000000000-00000000000000000499.parquet
    data/speed/p001/...                      one file per partition per batch
    data/speed/_status/<consumer>.json       liveness, lag, throughput, live error

A file's name is the offset range it holds, and it appears atomically (written
aside, fsynced, renamed). Its last offset is therefore a durable record of
progress: a restarted consumer resumes after the highest offset on disk (or
the group's committed offset, whichever is further), so re-processing after a
crash rewrites nothing twice. Each row carries the trip in record form plus
``partition``, ``offset``, the Kafka timestamp (production time), the time it
became visible, the predicted duration and the model version.

After the batch layer publishes a version with watermark ``W``, files whose
last offset is at or below ``W[partition]`` are pruned; readers always filter
``offset > W[partition]`` anyway, so a file straddling ``W`` is harmless.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from periscope.schema import FIELDS
from periscope.sources import empty_trip_frame
from periscope.storage import atomic_path, atomic_write_json

META_COLUMNS: tuple[str, ...] = ("partition", "offset", "kafka_timestamp_ms", "visible_at_ms")
RESULT_COLUMNS: tuple[str, ...] = ("predicted_duration_s", "model_version")
COLUMNS: tuple[str, ...] = META_COLUMNS + FIELDS + RESULT_COLUMNS
STATUS_DIR = "_status"
HISTORY_MINUTES = 120
"""How many wall-clock minutes of per-minute counts a status file keeps (``MinuteCounts``)."""
_FILE = re.compile(r"^(\d{20})-(\d{20})\.parquet$")


def batch_path(speed_dir: Path, partition: int, first: int, last: int) -> Path:
    return Path(speed_dir) / f"p{partition:03d}" / f"{first:020d}-{last:020d}.parquet"


def write_batch(speed_dir: Path, partition: int, rows: pd.DataFrame) -> Path:
    """Atomically write one partition's results; the name is their offset range.

    ``rows`` must hold ``COLUMNS`` and at least one row. Writing the same
    range again replaces the file with identical content (idempotent).
    """
    first, last = int(rows["offset"].min()), int(rows["offset"].max())
    path = batch_path(speed_dir, partition, first, last)
    with atomic_path(path) as tmp:
        pq.write_table(pa.Table.from_pandas(rows[list(COLUMNS)], preserve_index=False), tmp)
    return path


def batch_files(speed_dir: Path) -> list[tuple[int, int, int, Path]]:
    """``(partition, first, last, path)`` of every published speed file, in offset order."""
    found = []
    for folder in sorted(Path(speed_dir).glob("p[0-9][0-9][0-9]")):
        partition = int(folder.name[1:])
        for path in folder.iterdir():
            match = _FILE.match(path.name)
            if match:
                found.append((partition, int(match[1]), int(match[2]), path))
    return sorted(found)


def last_offsets(speed_dir: Path) -> dict[int, int]:
    """Highest offset on disk per partition: where a restarted consumer resumes from."""
    result: dict[int, int] = {}
    for partition, _, last, _ in batch_files(speed_dir):
        result[partition] = max(last, result.get(partition, -1))
    return result


def normalise_watermark(watermark: Mapping[Any, int] | None) -> dict[int, int]:
    """Watermarks are stored with string keys in JSON; use ints in code."""
    return {int(partition): int(offset) for partition, offset in (watermark or {}).items()}


def read_speed(speed_dir: Path, watermark: Mapping[Any, int] | None = None) -> pd.DataFrame:
    """Every speed row with ``offset > watermark[partition]`` (all rows without a watermark),
    in (partition, offset) order: the serving layer's merge keeps the first row of a trip in that order.

    The files are read and filtered as Arrow tables and become one DataFrame at the end: a refresh
    of the dashboard reads ~100 of them, and one conversion instead of one per file is 3x faster.
    """
    above = normalise_watermark(watermark)
    tables = []
    for partition, _, last, path in batch_files(speed_dir):
        floor = above.get(partition, -1)
        if last <= floor:
            continue
        try:
            with pq.ParquetFile(path) as handle:
                table = handle.read()
        except FileNotFoundError:
            continue
        tables.append(table.filter(pc.greater(table["offset"], floor)) if floor >= 0 else table)
    if not tables:
        return empty_speed_frame()
    table = pa.concat_tables(tables, promote_options="permissive")
    return table.sort_by([("partition", "ascending"), ("offset", "ascending")]).to_pandas()


def empty_speed_frame() -> pd.DataFrame:
    """A zero-row speed view with the right columns and dtypes."""
    frame = empty_trip_frame()
    for name in META_COLUMNS:
        frame[name] = pd.Series(dtype="int64")
    frame["predicted_duration_s"] = pd.Series(dtype="float64")
    frame["model_version"] = pd.Series(dtype=object)
    return frame[list(COLUMNS)]


def prune(speed_dir: Path, watermark: Mapping[Any, int]) -> int:
    """Delete speed files wholly at or below the batch watermark; returns how many."""
    limits = normalise_watermark(watermark)
    removed = 0
    for partition, _, last, path in batch_files(speed_dir):
        if partition in limits and last <= limits[partition]:
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def write_status(speed_dir: Path, consumer: str, status: Mapping[str, Any]) -> None:
    """Publish a consumer's heartbeat (lag, rates, live error) for the dashboard."""
    atomic_write_json(Path(speed_dir) / STATUS_DIR / f"{consumer}.json", dict(status))


def read_statuses(speed_dir: Path) -> list[dict[str, Any]]:
    folder = Path(speed_dir) / STATUS_DIR
    statuses = []
    for path in sorted(folder.glob("*.json")) if folder.exists() else []:
        try:
            statuses.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
    return statuses


class MinuteCounts:
    """Counts per wall-clock minute and key (e.g. dead letters by reason), the last ``keep_minutes`` only.

    A status file is rewritten every second, so it carries a bounded history:
    enough for the dashboard to draw the last two hours, never growing with uptime.
    """

    def __init__(self, keep_minutes: int = HISTORY_MINUTES):
        self.keep_minutes, self.minutes = keep_minutes, {}

    def add(self, keys: Iterable[str], now_ms: int) -> None:
        counts = Counter(keys)
        if not counts:
            return
        self.minutes.setdefault(now_ms // 60_000 * 60_000, Counter()).update(counts)
        for old in sorted(self.minutes)[:-self.keep_minutes]:
            del self.minutes[old]

    def as_status(self) -> list[dict[str, Any]]:
        """``[{"minute_ms": start of the minute, "counts": {key: n}}]``, oldest first (JSON-ready)."""
        return [{"minute_ms": minute, "counts": dict(sorted(counts.items()))}
                for minute, counts in sorted(self.minutes.items())]
