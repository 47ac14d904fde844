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
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from periscope.schema import FIELDS, NOT_RECORDED, REVENUE_FIELDS, ZONE_FIELDS
from periscope.sources import empty_trip_frame
from periscope.storage import atomic_path, atomic_write_json

META_COLUMNS: tuple[str, ...] = ("partition", "offset", "kafka_timestamp_ms", "visible_at_ms")
RESULT_COLUMNS: tuple[str, ...] = ("predicted_duration_s", "model_version")
COLUMNS: tuple[str, ...] = META_COLUMNS + FIELDS + ZONE_FIELDS + REVENUE_FIELDS + RESULT_COLUMNS
"""A speed row: where the trip was in Kafka, the trip (its zones as the message recorded them, else
those of its coordinates, ``speed_core.validate_batch``; its fare, tip and total as recorded), the
prediction. Files written before the zones and the revenue were kept read with zones
``NOT_RECORDED`` and revenue NaN."""
STATUS_DIR = "_status"
HISTORY_MINUTES = 120
"""How many wall-clock minutes of per-minute counts a status file keeps (``MinuteCounts``)."""
_FILE = re.compile(r"^(\d{20})-(\d{20})\.parquet$")


def batch_path(speed_dir: Path, partition: int, first: int, last: int) -> Path:
    return Path(speed_dir) / f"p{partition:03d}" / f"{first:020d}-{last:020d}.parquet"


def write_batch(speed_dir: Path, partition: int, rows: pd.DataFrame) -> Path:
    """Atomically write one partition's results; the name is their offset range.

    ``rows`` must hold ``COLUMNS`` (the zones may be missing: ``NOT_RECORDED``; the revenue: NaN) and
    at least one row.
    Writing the same range again replaces the file with the same trips and predictions (only
    ``visible_at_ms``, the wall clock of the write, differs): never a second copy.
    """
    rows = rows.assign(**{name: NOT_RECORDED for name in ZONE_FIELDS if name not in rows},
                       **{name: np.nan for name in REVENUE_FIELDS if name not in rows})
    return write_batch_table(speed_dir, partition, pa.Table.from_pandas(rows[list(COLUMNS)], preserve_index=False))


def write_batch_table(speed_dir: Path, partition: int, table: pa.Table) -> Path:
    """``write_batch`` for rows that are an Arrow table already (the Spark speed layer's): ``COLUMNS``, in order."""
    offsets = pc.min_max(table["offset"])
    path = batch_path(speed_dir, partition, offsets["min"].as_py(), offsets["max"].as_py())
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
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
    rows = table.sort_by([("partition", "ascending"), ("offset", "ascending")]).to_pandas()
    for name in ZONE_FIELDS:  # files written before the zones were kept have none
        rows[name] = rows[name].fillna(NOT_RECORDED).astype("int64") if name in rows else NOT_RECORDED
    for name in REVENUE_FIELDS:  # nor the revenue
        rows[name] = rows[name].astype("float64") if name in rows else np.nan
    return rows


def empty_speed_frame() -> pd.DataFrame:
    """A zero-row speed view with the right columns and dtypes."""
    frame = empty_trip_frame()
    for name in META_COLUMNS + ZONE_FIELDS:
        frame[name] = pd.Series(dtype="int64")
    for name in REVENUE_FIELDS + ("predicted_duration_s",):
        frame[name] = pd.Series(dtype="float64")
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


# --- the status file: one definition of its format ----------------------------------------------


NO_TRIPS_ERROR: dict[str, float | None] = {"rmsle": None, "mae": None, "rmse": None, "rows": 0}
"""Live error before the first valid trip (``rows`` counts the trips the figures are over)."""


@dataclass
class StatusTotals:
    """What a process consumed since it started."""

    consumed: int = 0
    valid: int = 0
    dlq: int = 0
    """Invalid messages, each counted whether or not its dead letter had to be sent."""
    dlq_already_sent: int = 0
    """Of those, the ones whose dead letter was on the topic already (sent before a restart or a rebalance)."""
    dlq_by_reason: dict[str, int] = field(default_factory=dict)
    """Reason code (``invalid_json``, a cleaning-rule name, ...) -> invalid messages."""


@dataclass
class StatusLatency:
    """End-to-end latency (Kafka timestamp -> speed file visible) over the last ``window_s`` seconds, ms."""

    p50: float | None = None
    p99: float | None = None
    window_s: float = 10.0


@dataclass
class StatusLiveError:
    """The model against the actual durations: since start and over the last ``recent_window_s`` seconds."""

    cumulative: dict[str, float | None] = field(default_factory=lambda: dict(NO_TRIPS_ERROR))
    recent: dict[str, float | None] = field(default_factory=lambda: dict(NO_TRIPS_ERROR))
    recent_window_s: float = 60.0


@dataclass
class SpeedStatus:
    """A speed-layer process's status file, ``<speed dir>/_status/<consumer_id>.json``.

    The one definition of the format: both speed layers write it
    (``write_status``), the dashboard reads it (``from_json``), and the tests
    build theirs with it. Each process rewrites its own file about once a second;
    the file of a stopped or killed process stays, with its last state. A
    field missing from a file reads as its default here.
    """

    consumer_id: str = "?"
    group: str = ""
    """Kafka consumer group; ``spark:<checkpoint dir>`` for the Spark speed layer."""
    topic: str = ""
    pid: int = 0
    host: str = ""
    state: str = "?"
    """``running``, or ``stopped`` once the process shut down cleanly (a killed one stays ``running``)."""
    member_state: str = ""
    """kafka-python's group membership (``<stable>`` when settled); ``spark`` for the Spark speed layer."""
    updated_at_ms: int = 0
    uptime_s: float = 0.0
    assigned_partitions: list[int] = field(default_factory=list)
    positions: dict[int, int | None] = field(default_factory=dict)
    """Per assigned partition: the next offset to read (None: unknown)."""
    lag: dict[int, int | None] = field(default_factory=dict)
    """Per assigned partition: messages behind the end of the log (None: the broker did not answer)."""
    totals: StatusTotals = field(default_factory=StatusTotals)
    dlq_history: list[dict[str, Any]] = field(default_factory=list)
    """Dead letters per wall-clock minute and reason (``MinuteCounts.as_status``)."""
    rate_per_s: float = 0.0
    """Messages consumed per second since the previous status."""
    latency_ms: StatusLatency = field(default_factory=StatusLatency)
    live_error: StatusLiveError = field(default_factory=StatusLiveError)
    model_version: str | None = None
    spark: dict[str, Any] | None = None
    """The Spark speed layer only: ``master``, ``batches``, ``busy_s``, ``checkpoint``."""

    @property
    def total_lag(self) -> int:
        """The lag summed over the partitions whose lag is known."""
        return sum(lag for lag in self.lag.values() if lag is not None)

    def to_json(self) -> dict[str, Any]:
        """The file's content: these fields, ``total_lag``, partitions as string keys; no ``spark`` if None."""
        document = asdict(self)
        document["positions"] = {str(p): offset for p, offset in sorted(self.positions.items())}
        document["lag"] = {str(p): lag for p, lag in sorted(self.lag.items())}
        document["total_lag"] = self.total_lag
        if self.spark is None:
            del document["spark"]
        return document

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> SpeedStatus:
        """A status as read from a file; what it lacks (an older writer, a field added since) is the default."""
        known = {name: document[name] for name in _STATUS_FIELDS if name in document}
        for name in ("positions", "lag"):
            known[name] = {int(p): value for p, value in known.get(name, {}).items()}
        for name, kind in (("totals", StatusTotals), ("latency_ms", StatusLatency), ("live_error", StatusLiveError)):
            part = known.get(name, {})
            known[name] = kind(**{key: part[key] for key in _fields_of(kind) if key in part})
        return cls(**known)


def _fields_of(kind: type) -> tuple[str, ...]:
    return tuple(item.name for item in fields(kind))


_STATUS_FIELDS = _fields_of(SpeedStatus)


def write_status(speed_dir: Path, status: SpeedStatus) -> None:
    """Publish a process's status (atomically: the dashboard never reads half a file)."""
    atomic_write_json(Path(speed_dir) / STATUS_DIR / f"{status.consumer_id}.json", status.to_json())


def read_statuses(speed_dir: Path) -> list[dict[str, Any]]:
    """Every status file's content as written (``SpeedStatus.from_json`` reads one); unreadable ones skipped."""
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
