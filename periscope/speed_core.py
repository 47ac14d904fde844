"""The speed-layer core: what both speed layers do, whichever engine runs them.

``kafka_consumer.py`` (one Python process in a consumer group) and
``spark_streaming.py`` (a Spark job) are the same speed layer. They differ in
how they consume Kafka and where the work runs; what they do with each batch
of messages is here, once, so both give the same verdicts, rows, files and
status:

- **validate and dead-letter reasons**: ``validate_batch`` (per message
  ``parse_json``, then the cleaning rules vectorised over the batch) and
  ``reason_code``;
- **per-trip speed rows and the speed files**: ``speed_rows`` and
  ``write_speed_files`` (one file per Kafka partition, ``periscope.speed_view``);
- **live statistics**: totals, dead letters by reason and per minute, latency,
  live error (``SpeedStatistics`` with ``LiveError``, ``SlidingWindow``,
  ``latency_percentiles``, ``error_metrics``), the status file they publish
  (its format: ``speed_view.SpeedStatus``), the shutdown summary and the log
  lines;
- **the model watcher** (``ModelWatcher``): a model promoted by
  ``train_model.py`` is picked up without a restart;
- **the command line both share**: the Kafka, output and run options, with
  their checks.

Spark's executors run the frame forms of the steps (``validate_frame``,
``predict_frame``, per Arrow batch), so they import ``periscope`` only: the Spark session ships
this package, never a script.

TLC trips (docs/STREAMING.md, "Messages") go through the same steps: a trip
carries its taxi zones (``TRIP_COLUMNS``) and the cleaning rules judge a trip
without coordinates by its zones, and the model's zone features place it
(``periscope.features``: the zones a trip records, or those of its coordinates).
"""
from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import time
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from periscope import config, speed_view, zones
from periscope.model import TripDurationModel, current_version, load_model
from periscope.schema import (FIELDS, FLOAT_FIELDS, INT_FIELDS, NOT_RECORDED, REVENUE_FIELDS, RULE_NAMES,
                              TIME_FIELDS, ZONE_FIELDS, InvalidTrip, first_broken_rule, parse_json)
from periscope.speed_view import SpeedStatus, StatusLatency, StatusLiveError, StatusTotals

log = logging.getLogger(__name__)

INT_COLUMNS = INT_FIELDS + TIME_FIELDS + ZONE_FIELDS
TRIP_COLUMNS: tuple[str, ...] = FIELDS + ZONE_FIELDS + REVENUE_FIELDS
"""The trip as the speed layer holds it: the Kaggle fields, the zones and the revenue (NaN where the
message has none), what the views read. A valid trip whose message has no zone (a Kaggle trip, a TLC
trip of the coordinates era) gets the zone of its coordinates, as the batch layer gives it in master
data (``NO_ZONE`` outside every zone), so the views keyed by zone merge exactly."""
POSITION_COLUMNS: tuple[str, ...] = ("partition", "offset", "kafka_timestamp_ms")
STATUS_INTERVAL_S = 1.0
MODEL_CHECK_INTERVAL_S = 10.0
LATENCY_WINDOW_S = 10.0
RECENT_ERROR_WINDOW_S = 60.0


# --- validate: the same verdicts in both speed layers ---------------------------------------------


class Message:
    """The fields of a Kafka message the speed layer reads (kafka-python's ``ConsumerRecord`` has them)."""

    __slots__ = ("topic", "partition", "offset", "timestamp", "key", "value")

    def __init__(self, topic: str, partition: int, offset: int, timestamp: int, key: bytes | None,
                 value: bytes | None):
        self.topic, self.partition, self.offset = topic, partition, offset
        self.timestamp, self.key, self.value = timestamp, key, value


def validate_batch(messages: Sequence[Any]) -> tuple[dict[str, np.ndarray], list[tuple[Any, str]]]:
    """Record-form columns of the valid trips, and ``(message, reason)`` of the others in stream order.

    ``messages`` need ``value``, ``partition``, ``offset`` and ``timestamp``
    (``Message``). Parsing is per message, as each can be broken its own way;
    the cleaning rules run once over whole columns, as numpy per record would
    cost more than the rest of the speed layer.
    """
    records, kept, invalid = [], [], []
    for index, message in enumerate(messages):
        try:
            records.append(parse_json(message.value))
            kept.append(index)
        except InvalidTrip as error:
            invalid.append((index, str(error)))
    columns = to_columns(records, [messages[index] for index in kept])
    broken = first_broken_rule(columns)
    invalid += [(kept[row], RULE_NAMES[broken[row]]) for row in np.flatnonzero(broken >= 0)]
    columns = {name: values[broken < 0] for name, values in columns.items()}
    for name in ZONE_FIELDS:  # as the batch layer gives them to the same trip in master data
        columns[name] = zones.zones_at(columns, name.split("_")[0], zones.zone_grid())
    return columns, [(messages[index], reason) for index, reason in sorted(invalid, key=lambda item: item[0])]


def to_columns(records: list[dict[str, Any]], messages: list[Any]) -> dict[str, np.ndarray]:
    """Parsed records and their messages as numpy columns: Kafka position, then the trip."""
    n = len(records)
    columns = {
        "partition": np.fromiter((m.partition for m in messages), np.int64, n),
        "offset": np.fromiter((m.offset for m in messages), np.int64, n),
        "kafka_timestamp_ms": np.fromiter((m.timestamp for m in messages), np.int64, n),
        "id": np.array([r["id"] for r in records], dtype=object),
        "store_and_fwd_flag": np.fromiter((bool(r["store_and_fwd_flag"]) for r in records), bool, n),
    }
    for name in INT_FIELDS + TIME_FIELDS:
        columns[name] = np.fromiter((r[name] for r in records), np.int64, n)
    for name in ZONE_FIELDS:
        columns[name] = np.fromiter((r.get(name, NOT_RECORDED) for r in records), np.int64, n)
    for name in FLOAT_FIELDS:
        columns[name] = np.fromiter((r[name] for r in records), np.float64, n)
    for name in REVENUE_FIELDS:
        columns[name] = np.fromiter((r.get(name, np.nan) for r in records), np.float64, n)
    return columns


def reason_code(reason: str) -> str:
    """``"invalid_json: Expecting value ..."`` -> ``"invalid_json"``; rule names stay as they are."""
    return reason.split(":", 1)[0]


def next_offsets(positions: Iterable[tuple[int, int]]) -> dict[int, int]:
    """Per partition, the offset after the last message handled, valid or not: ``(partition, offset)`` in."""
    result: dict[int, int] = {}
    for partition, offset in positions:
        result[int(partition)] = max(result.get(int(partition), 0), int(offset) + 1)
    return result


# --- the speed rows and the speed files -------------------------------------------------------------


def speed_rows(columns: dict[str, np.ndarray], predicted_s: np.ndarray, model_version: str) -> pd.DataFrame:
    """Speed-view rows (``speed_view.COLUMNS``); ``visible_at_ms`` is -1 until the writer stamps it."""
    rows = {name: columns[name] for name in POSITION_COLUMNS + TRIP_COLUMNS}
    rows["visible_at_ms"] = np.full(len(predicted_s), -1, dtype=np.int64)
    rows["predicted_duration_s"] = np.asarray(predicted_s, dtype=np.float64)
    rows["model_version"] = np.full(len(predicted_s), model_version, dtype=object)
    return pd.DataFrame(rows, columns=list(speed_view.COLUMNS))


def write_speed_files(speed_dir: Path, columns: dict[str, np.ndarray], predicted_s: np.ndarray,
                      model_version: str) -> pd.DataFrame:
    """One speed file per Kafka partition of the batch, each stamped with the time it became visible.

    A file is named by its offset range and appears atomically, so writing a
    batch again (after a crash, a replayed micro-batch) replaces its files:
    the output is idempotent. Returns the rows as written.
    """
    rows = speed_rows(columns, predicted_s, model_version)
    for partition in np.unique(columns["partition"]):
        mine = columns["partition"] == partition
        rows.loc[mine, "visible_at_ms"] = wall_clock_ms()
        speed_view.write_batch(speed_dir, int(partition), rows[mine])
    return rows


# --- the same steps over pandas frames: what Spark's executors run ----------------------------------


VALIDATED_COLUMNS: tuple[str, ...] = POSITION_COLUMNS + ("key", "value", "reason") + TRIP_COLUMNS
"""A validated message: its Kafka position; the trip (record form) if valid, else the raw bytes and the reason."""


def validate_frame(messages: pd.DataFrame) -> pd.DataFrame:
    """Messages (``key value topic partition offset timestamp_ms``) -> ``VALIDATED_COLUMNS`` rows, by
    ``validate_batch``: the valid trips first, then the invalid messages."""
    batch = [Message(*row) for row in zip(messages["topic"], messages["partition"].astype(int),
                                          messages["offset"].astype(int), messages["timestamp_ms"].astype(int),
                                          messages["key"], messages["value"])]
    columns, invalid = validate_batch(batch)
    nothing = np.full(len(columns["id"]), None, dtype=object)
    valid = pd.DataFrame({**{name: columns[name] for name in POSITION_COLUMNS}, "key": nothing, "value": nothing,
                          "reason": nothing, **{name: columns[name] for name in TRIP_COLUMNS}})
    rejected = pd.DataFrame({"partition": [m.partition for m, _ in invalid], "offset": [m.offset for m, _ in invalid],
                             "kafka_timestamp_ms": [m.timestamp for m, _ in invalid],
                             "key": [m.key for m, _ in invalid], "value": [m.value for m, _ in invalid],
                             "reason": [reason for _, reason in invalid]})
    frame = pd.concat([valid, rejected], ignore_index=True) if len(rejected) else valid
    return frame.reindex(columns=list(VALIDATED_COLUMNS))


def frame_columns(frame: pd.DataFrame, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Columns of a frame in the dtypes ``validate_batch`` gives them (Arrow hands nullable ones over)."""
    columns = {name: frame[name].to_numpy() for name in names}
    for name in names:
        if name in POSITION_COLUMNS or name in INT_COLUMNS:
            columns[name] = columns[name].astype(np.int64)
        elif name in FLOAT_FIELDS or name in REVENUE_FIELDS:
            columns[name] = columns[name].astype(np.float64)
        elif name == "store_and_fwd_flag":
            columns[name] = columns[name].astype(bool)
        else:
            columns[name] = columns[name].astype(object)
    return columns


def predict_frame(model: TripDurationModel, trips: pd.DataFrame) -> pd.Series:
    """Predicted seconds for the valid rows of ``trips`` (NaN for invalid rows, whose fields are null)."""
    predicted = np.full(len(trips), np.nan)
    known = trips["trip_duration"].notna().to_numpy()
    if known.any():
        predicted[known] = model.predict_seconds(frame_columns(trips[known], list(trips.columns)))
    return pd.Series(predicted)


# --- live statistics ----------------------------------------------------------------------------


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class SlidingWindow:
    """Items stamped with a time; those older than ``seconds`` fall out."""

    def __init__(self, seconds: float):
        self.seconds, self.items = seconds, deque()

    def add(self, item: Any, now: float) -> None:
        self.items.append((now, item))

    def values(self, now: float) -> list[Any]:
        while self.items and self.items[0][0] < now - self.seconds:
            self.items.popleft()
        return [item for _, item in self.items]


class LiveError:
    """The model's error against the actual durations in the stream: since start and recently.

    It keeps sums (rows, |error|, error², log-error²), which add up across
    batches, so MAE, RMSE and RMSLE come out as ``periscope.model.metrics``.
    """

    def __init__(self, window_s: float = RECENT_ERROR_WINDOW_S):
        self.total, self.window = np.zeros(4), SlidingWindow(window_s)

    def add(self, actual_s: np.ndarray, predicted_s: np.ndarray, now: float) -> None:
        actual, predicted = np.asarray(actual_s, np.float64), np.asarray(predicted_s, np.float64)
        error, log_error = predicted - actual, np.log1p(predicted) - np.log1p(actual)
        sums = np.array([len(actual), np.abs(error).sum(), (error**2).sum(), (log_error**2).sum()])
        self.total += sums
        self.window.add(sums, now)

    def cumulative(self) -> dict[str, float | None]:
        return error_metrics(self.total)

    def recent(self, now: float) -> dict[str, float | None]:
        return error_metrics(sum(self.window.values(now), np.zeros(4)))


def error_metrics(sums: np.ndarray) -> dict[str, float | None]:
    """RMSLE, MAE and RMSE (seconds) from ``LiveError`` sums; None before the first trip."""
    rows = int(sums[0])
    if rows == 0:
        return dict(speed_view.NO_TRIPS_ERROR)
    return {"rmsle": float(np.sqrt(sums[3] / rows)), "mae": float(sums[1] / rows),
            "rmse": float(np.sqrt(sums[2] / rows)), "rows": rows}


def latency_percentiles(window: SlidingWindow, now: float) -> tuple[float | None, float | None]:
    """p50 and p99 (ms) of the end-to-end latencies in the window; None when it holds none."""
    samples = [sample for sample in window.values(now) if len(sample)]
    if not samples:
        return None, None
    p50, p99 = np.percentile(np.concatenate(samples), [50, 99])
    return float(p50), float(p99)


class SpeedStatistics:
    """What one speed-layer process has done since it started: its status file and its summary."""

    def __init__(self, consumer_id: str, group: str, topic: str):
        self.consumer_id, self.group, self.topic = consumer_id, group, topic
        self.totals, self.dlq_reasons, self.dlq_history = Counter(), Counter(), speed_view.MinuteCounts()
        self.errors, self.latency = LiveError(RECENT_ERROR_WINDOW_S), SlidingWindow(LATENCY_WINDOW_S)
        self.started = self.last_activity = self.last_status = time.monotonic()
        self.consumed_at_status = 0

    def count_batch(self, consumed: int, rows: pd.DataFrame, reasons: Sequence[str], already_sent: int = 0) -> None:
        """A batch is written: ``consumed`` messages, these speed ``rows``, dead letters for ``reasons``."""
        now = time.monotonic()
        self.totals.update(consumed=consumed, valid=len(rows), dlq=len(reasons), dlq_already_sent=already_sent)
        codes = [reason_code(reason) for reason in reasons]
        self.dlq_reasons.update(codes)
        self.dlq_history.add(codes, wall_clock_ms())
        if len(rows):
            self.latency.add((rows["visible_at_ms"] - rows["kafka_timestamp_ms"]).to_numpy(), now)
            self.errors.add(rows["trip_duration"].to_numpy(), rows["predicted_duration_s"].to_numpy(), now)
        if consumed:
            self.last_activity = now

    def status_due(self) -> bool:
        return time.monotonic() - self.last_status >= STATUS_INTERVAL_S

    def status(self, state: str, member_state: str, positions: dict[int, int | None], lag: dict[int, int | None],
               model_version: str, spark: dict[str, Any] | None = None) -> SpeedStatus:
        """The status file now; the rate is over the time since the last ``publish``."""
        now = time.monotonic()
        p50, p99 = latency_percentiles(self.latency, now)
        rate = (self.totals["consumed"] - self.consumed_at_status) / max(now - self.last_status, 1e-6)
        return SpeedStatus(
            consumer_id=self.consumer_id, group=self.group, topic=self.topic, pid=os.getpid(),
            host=socket.gethostname(), state=state, member_state=member_state, updated_at_ms=wall_clock_ms(),
            uptime_s=round(now - self.started, 1), assigned_partitions=sorted(lag or positions),
            positions=dict(positions), lag=dict(lag),
            totals=StatusTotals(self.totals["consumed"], self.totals["valid"], self.totals["dlq"],
                                self.totals["dlq_already_sent"], dict(sorted(self.dlq_reasons.items()))),
            dlq_history=self.dlq_history.as_status(), rate_per_s=round(rate, 1),
            latency_ms=StatusLatency(p50, p99, LATENCY_WINDOW_S),
            live_error=StatusLiveError(self.errors.cumulative(), self.errors.recent(now), RECENT_ERROR_WINDOW_S),
            model_version=model_version, spark=spark)

    def publish(self, speed_dir: Path, status: SpeedStatus) -> None:
        """Write the status file; the next rate counts from here."""
        speed_view.write_status(speed_dir, status)
        self.last_status, self.consumed_at_status = time.monotonic(), self.totals["consumed"]

    def summary(self, micro_batches: int | None = None) -> str:
        """The line a process logs when it stops: what it consumed, dead-lettered, and the live error."""
        elapsed, error, totals = time.monotonic() - self.started, self.errors.cumulative(), self.totals
        quality = f"live RMSLE {error['rmsle']:.3f}, MAE {error['mae']:.0f} s" if error["rows"] else "no valid trips"
        reasons = f" ({', '.join(f'{n:,} {r}' for r, n in self.dlq_reasons.most_common())})" if self.dlq_reasons else ""
        already = totals["dlq_already_sent"]
        there = (f", {already:,} of them there already (sent before a restart or a rebalance, or by the other "
                 "speed layer)") if already else ""
        run, consumed = ((f"{elapsed:.0f} s", "trips consumed") if micro_batches is None
                         else (f"{elapsed:.0f} s and {micro_batches} micro-batches", "messages"))
        return (f"stopped after {run}: {totals['consumed']:,} {consumed}, {totals['valid']:,} valid, "
                f"{totals['dlq']:,} to the dead-letter topic{reasons}{there}; {quality}")


# --- the model ----------------------------------------------------------------------------------


class ModelWatcher:
    """The live model, reloaded when ``current.json`` names another version (checked every 10 s).

    A version that fails to load is logged and the running model kept: a bad
    promotion must not stop the stream. ``switched`` is what else has to
    follow a new model (the Spark speed layer broadcasts it to its executors).
    """

    def __init__(self, model_dir: Path, check_every_s: float = MODEL_CHECK_INTERVAL_S,
                 logger: logging.Logger = log):
        self.model_dir, self.check_every_s, self.log = model_dir, check_every_s, logger
        self.model: TripDurationModel = load_model(model_dir)
        self.checked_at = time.monotonic()

    def current(self) -> TripDurationModel:
        if time.monotonic() - self.checked_at >= self.check_every_s:
            self.checked_at = time.monotonic()
            try:
                version = current_version(self.model_dir)
                if version and version != self.model.version:
                    model = load_model(self.model_dir, version)
                    self.switched(model)
                    previous, self.model = self.model.version, model
                    self.log.info("model switched from %s to %s (promoted in %s)", previous, version, self.model_dir)
            except Exception as error:  # noqa: BLE001 -- whatever is wrong with the new model, keep the old one
                self.log.error("cannot load the promoted model, keeping %s: %r", self.model.version, error)
        return self.model

    def switched(self, model: TripDurationModel) -> None:
        """Called with a newly loaded model before it goes live; raising keeps the old one."""


# --- the command line both speed layers share ---------------------------------------------------------


def add_kafka_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the trips come from and the dead letters go."""
    parser.add_argument("--bootstrap", default=config.KAFKA_BOOTSTRAP_SERVERS,
                        help="Kafka bootstrap servers, host:port[,host:port] (env KAFKA_BOOTSTRAP_SERVERS)")
    parser.add_argument("--topic", default=config.TRIPS_TOPIC, help="trips topic (env PERISCOPE_TRIPS_TOPIC)")
    parser.add_argument("--dlq-topic", default=config.DLQ_TOPIC,
                        help="dead-letter topic for invalid messages (env PERISCOPE_DLQ_TOPIC)")


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the speed view goes, and which model predicts."""
    parser.add_argument("--speed-dir", type=Path, default=config.SPEED_DIR,
                        help="speed view and status files, one dir per topic (env PERISCOPE_SPEED_DIR)")
    parser.add_argument("--model-dir", type=Path, default=config.MODEL_DIR,
                        help="trained model versions; current.json names the live one (env PERISCOPE_MODEL_DIR)")


def add_run_arguments(parser: argparse.ArgumentParser, consumer_id: str, consumer_id_help: str) -> None:
    """How long to run, and the name of the status file."""
    parser.add_argument("--stop-when-idle", type=float, metavar="SECONDS",
                        help="exit after this long without new trips and with zero lag (default: run forever)")
    parser.add_argument("--consumer-id", default=consumer_id, help=consumer_id_help)
    parser.add_argument("--broker-timeout", type=float, metavar="SECONDS",
                        help="give up if no broker answers at start within this long (default: wait forever)")


def check_run_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The checks of the shared options; ``parser.error`` (exit 2) names the option and what it must be."""
    if args.stop_when_idle is not None and args.stop_when_idle <= 0:
        parser.error(f"--stop-when-idle must be a positive number of seconds, got {args.stop_when_idle:g}")
    if not args.consumer_id or "/" in args.consumer_id or args.consumer_id.startswith("."):
        parser.error(f"--consumer-id must be a plain file name (no '/', not starting with '.'), got "
                     f"{args.consumer_id!r}")
    if args.speed_dir.exists() and not args.speed_dir.is_dir():
        parser.error(f"--speed-dir {args.speed_dir} exists and is not a directory")


def log_to_stdout() -> None:
    """One timestamped line per event on stdout; kafka-python reconnects by itself, so its own lines are muted."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout)
    logging.getLogger("kafka").setLevel(logging.CRITICAL)


# --- what both speed layers log ----------------------------------------------------------------------


def status_line(status: SpeedStatus) -> str:
    """The once-a-second line of ``kafka_consumer.py``."""
    lag, timing = _lag_text(status), _latency_text(status.latency_ms)
    error = status.live_error
    rmsle = ["-" if e["rmsle"] is None else f"{e['rmsle']:.3f}" for e in (error.cumulative, error.recent)]
    return (f"consumed {status.totals.consumed:,} valid {status.totals.valid:,} dlq {status.totals.dlq:,} | "
            f"{status.rate_per_s:,.0f}/s | lag {lag} | latency {timing} | RMSLE {rmsle[0]} (1 min {rmsle[1]}) | "
            f"model {status.model_version}")


def batch_line(batch_id: int, consumed: int, valid: int, dlq: int, seconds: float, status: SpeedStatus) -> str:
    """The line per micro-batch of ``spark_streaming.py``."""
    error = status.live_error.cumulative
    rmsle = "-" if error["rmsle"] is None else f"{error['rmsle']:.3f}"
    return (f"batch {batch_id}: {consumed:,} messages ({valid:,} valid, {dlq:,} dlq) in {seconds:.2f} s, "
            f"{consumed / max(seconds, 1e-6):,.0f}/s | lag {_lag_text(status)} | "
            f"latency {_latency_text(status.latency_ms, ',')} | RMSLE {rmsle} | model {status.model_version}")


def _lag_text(status: SpeedStatus) -> str:
    return "?" if None in status.lag.values() else f"{status.total_lag:,}"


def _latency_text(latency: StatusLatency, thousands: str = "") -> str:
    if latency.p50 is None:
        return "-"
    return f"p50 {latency.p50:{thousands}.0f} ms p99 {latency.p99:{thousands}.0f} ms"
