"""The speed layer on Spark Structured Streaming: the same contract as kafka_consumer.py, on Spark.

``kafka_consumer.py`` is one Python process; this is the same speed layer as
a Spark job, which runs unchanged on ``local[*]`` or on a cluster
(``--master spark://host:7077`` or ``SPARK_MASTER``). It reads ``taxi-trips``
and writes the *same speed view* (``periscope.speed_view``), so the
dashboard and the Lambda merge take either speed layer's output. Two
streaming queries run side by side:

1. **speed** (``foreachBatch``): every micro-batch of messages from Spark's
   Kafka source (``format("kafka")``, ``spark-sql-kafka-0-10``; ``make
   spark-fetch`` puts it in place) is validated by the shared schema code
   (``kafka_consumer.validate_batch``: the same verdicts and reason codes as
   the plain consumer) inside ``mapInPandas``; the valid trips get a
   predicted duration from a vectorised pandas UDF (``periscope.features`` +
   the model from ``--model-dir``, broadcast to the executors); invalid
   messages go to ``taxi-trips-dlq`` with the reason in their headers
   (``periscope.stream.dlq_headers``); the trips are written as one speed
   file per Kafka partition, named by offset range.
2. **windows** (memory sink): trips counted in 5-minute event-time windows
   per vendor, with a watermark of ``--lateness`` behind the latest pickup
   seen. A window is emitted once the watermark passes its end; a trip whose
   pickup is older than the watermark when it arrives is *dropped from these
   windows only* - it is still in the speed view (every valid trip is) and
   in the batch layer, which is where late data is made right.

Exactly once, across crashes: Spark writes each batch's offset range to the
checkpoint (``--checkpoint-dir``) before running it and marks it done after.
A restarted job re-runs an unfinished batch with the same offsets, so it
rewrites the same speed files (a file's name is its offset range: rewriting
replaces it) and never writes a trip twice. Dead letters are sent by the
driver with kafka-python (acknowledged, ``acks=all``), and the last batch
whose dead letters were delivered is recorded beside the checkpoint, so a
re-run batch does not send them again. A fresh checkpoint starts at the
earliest offset (``--starting-offsets``), or after the last speed file of
each partition when the speed view already holds some.

Data loss is an error, not a skip: the Kafka source runs with
``failOnDataLoss=true``, so if Kafka no longer has offsets the checkpoint
needs (retention deleted trips before they were read, or the topic was
re-created), the query stops and says what to do, rather than silently
leaving a gap in the speed view.

Run it (a broker and a trained model first, as for kafka_consumer.py)::

    python spark_streaming.py                        # until Ctrl-C; one line per micro-batch
    python spark_streaming.py --stop-when-idle 10    # drain the topic, then exit
    python spark_streaming.py --sql                  # and type SQL at a prompt while it runs

Query the windows while it runs - the classroom point. With ``--sql`` the
terminal becomes a prompt (``spark.sql`` runs each line)::

    sql> SELECT * FROM trips_by_vendor_5min ORDER BY window_start DESC, vendor_id LIMIT 10
    sql> SELECT vendor_id, sum(trips) AS trips, avg(avg_duration_s) FROM trips_by_vendor_5min GROUP BY vendor_id

(``quit``, ``exit`` or Ctrl-D ends the prompt and stops the job; empty lines
are skipped; the per-batch lines and Spark's warnings are silenced while the
prompt is open, the status file still updates), or from Python, in a notebook
or ``python -i``::

    >>> import spark_streaming
    >>> layer = spark_streaming.start(spark_streaming.get_session(), spark_streaming.parse_args([]))
    >>> layer.spark.sql("SELECT vendor_id, sum(trips) FROM trips_by_vendor_5min GROUP BY vendor_id").show()
    >>> layer.stop()

Each micro-batch prints one line, and the status file
``data/speed/_status/spark.json`` (rates, lag, latency, live error) feeds the
dashboard like the plain consumer's::

    12:00:03 batch 7: 20,000 messages (19,846 valid, 154 dlq) in 1.42 s, 14,085/s | lag 61,200 |
             latency p50 1,310 ms p99 2,050 ms | RMSLE 0.301 | model 20261122T053109Z
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.functions import pandas_udf
from pyspark.sql.streaming import StreamingQuery
from pyspark.sql.types import (BinaryType, IntegerType, LongType, StringType, StructField, StructType,
                               TimestampType)

from kafka_consumer import (INT_COLUMNS, LiveError, SlidingWindow, latency_percentiles, reason_code, speed_rows,
                            validate_batch, wall_clock_ms)
from periscope import cli, config, speed_view
from periscope.model import ModelMismatchError, ModelNotFoundError, TripDurationModel, current_version, load_model
from periscope.schema import FIELDS, FLOAT_FIELDS
from periscope.spark_session import SparkSetupError, get_session, trip_struct
from periscope.storage import atomic_write_bytes
from periscope.stream import BrokerUnavailable, dlq_headers, wait_for_broker

log = logging.getLogger("spark_streaming")

COMPONENT = "spark_streaming"
WINDOWS_VIEW = "trips_by_vendor_5min"
DEFAULT_LATENESS = "10 minutes"
DEFAULT_WINDOW = "5 minutes"
DEFAULT_MAX_OFFSETS = 20_000
"""Messages per micro-batch at most: a catch-up of millions runs as many bounded batches."""
DEFAULT_TRIGGER = "500 milliseconds"
"""A new micro-batch at most twice a second: when idle, Spark asks the broker for new offsets that often."""
DEFAULT_CHECKPOINT_DIR = config.STATE_DIR / "spark" / "checkpoint"
STATUS_INTERVAL_S = 1.0
MODEL_CHECK_INTERVAL_S = 10.0
LATENCY_WINDOW_S = 10.0
RECENT_ERROR_WINDOW_S = 60.0
DLQ_TIMEOUT_S = 60.0
DLQ_MARKER = "dlq-delivered-batch.txt"
_INTERVAL = re.compile(r"^\s*\d+\s+(millisecond|second|minute|hour|day)s?\s*$")

KAFKA_SOURCE_SCHEMA = StructType([
    StructField("key", BinaryType()), StructField("value", BinaryType()), StructField("topic", StringType()),
    StructField("partition", IntegerType()), StructField("offset", LongType()),
    StructField("timestamp", TimestampType()), StructField("timestampType", IntegerType()),
])
"""The rows of Spark's Kafka source (``format("kafka")``), one per message."""

VALIDATED_SCHEMA = StructType([
    StructField("partition", LongType()), StructField("offset", LongType()),
    StructField("kafka_timestamp_ms", LongType()), StructField("key", BinaryType()),
    StructField("value", BinaryType()), StructField("reason", StringType()),
    *trip_struct().fields,
])
"""A validated message: its Kafka position; the trip (record form) if valid, else the raw bytes and the reason."""


# --- validation and prediction: what the executors run -----------------------------------------------


class Message:
    """The fields of a Kafka message that ``kafka_consumer.validate_batch`` reads."""

    __slots__ = ("topic", "partition", "offset", "timestamp", "key", "value")

    def __init__(self, topic: str, partition: int, offset: int, timestamp: int, key: bytes | None,
                 value: bytes | None):
        self.topic, self.partition, self.offset = topic, partition, offset
        self.timestamp, self.key, self.value = timestamp, key, value


def kafka_messages(source: DataFrame) -> DataFrame:
    """Spark's Kafka rows -> the fields ``validate_batch`` reads, the Kafka timestamp as ms (exact: it is ms)."""
    return source.select("key", "value", "topic", "partition", "offset",
                         F.unix_millis("timestamp").alias("timestamp_ms"))


def validated_frame(messages: pd.DataFrame) -> pd.DataFrame:
    """Messages (``kafka_messages`` columns) -> ``VALIDATED_SCHEMA`` rows, by the plain consumer's own code."""
    batch = [Message(*row) for row in zip(messages["topic"], messages["partition"].astype(int),
                                          messages["offset"].astype(int), messages["timestamp_ms"].astype(int),
                                          messages["key"], messages["value"])]
    columns, invalid = validate_batch(batch)
    nothing = np.full(len(columns["id"]), None, dtype=object)
    valid = pd.DataFrame({"partition": columns["partition"], "offset": columns["offset"],
                          "kafka_timestamp_ms": columns["kafka_timestamp_ms"], "key": nothing, "value": nothing,
                          "reason": nothing, **{name: columns[name] for name in FIELDS}})
    rejected = pd.DataFrame({"partition": [m.partition for m, _ in invalid], "offset": [m.offset for m, _ in invalid],
                             "kafka_timestamp_ms": [m.timestamp for m, _ in invalid],
                             "key": [m.key for m, _ in invalid], "value": [m.value for m, _ in invalid],
                             "reason": [reason for _, reason in invalid]})
    frame = pd.concat([valid, rejected], ignore_index=True) if len(rejected) else valid
    return frame.reindex(columns=VALIDATED_SCHEMA.fieldNames())


def validate_messages(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
    """``mapInPandas`` function: every Arrow batch of messages, validated."""
    for messages in batches:
        yield validated_frame(messages)


def predict_frame(model: TripDurationModel, trips: pd.DataFrame) -> pd.Series:
    """Predicted seconds for the valid rows of ``trips`` (NaN for invalid rows, whose fields are null)."""
    predicted = np.full(len(trips), np.nan)
    known = trips["trip_duration"].notna().to_numpy()
    if known.any():
        columns = {name: trips[name].to_numpy()[known] for name in trips.columns}
        columns.update({name: columns[name].astype(np.int64) for name in INT_COLUMNS})
        columns.update({name: columns[name].astype(np.float64) for name in FLOAT_FIELDS})
        predicted[known] = model.predict_seconds(columns)
    return pd.Series(predicted)


def prediction_udf(model_broadcast: Any) -> Any:
    """A vectorised (pandas) UDF: trips as a struct column in, predicted seconds out, with a broadcast model."""

    @pandas_udf("double")
    def predicted_duration_s(trips: pd.DataFrame) -> pd.Series:
        return predict_frame(model_broadcast.value, trips)

    return predicted_duration_s


def valid_trips(messages: DataFrame) -> DataFrame:
    """The valid trips of a message stream, with their event time as a Spark timestamp (for windows)."""
    return (messages.mapInPandas(validate_messages, VALIDATED_SCHEMA).where(F.col("reason").isNull())
            .withColumn("pickup_time", F.timestamp_millis("pickup_datetime")))


def vendor_windows(trips: DataFrame, lateness: str, window: str) -> DataFrame:
    """Trips per event-time window and vendor; the watermark lets Spark close windows and drop late trips."""
    return (trips.withWatermark("pickup_time", lateness)
            .groupBy(F.window("pickup_time", window), "vendor_id")
            .agg(F.count("*").alias("trips"), F.avg("trip_duration").alias("avg_duration_s"),
                 F.max("trip_duration").alias("max_duration_s"))
            .select(F.col("window.start").alias("window_start"), F.col("window.end").alias("window_end"),
                    "vendor_id", "trips", "avg_duration_s", "max_duration_s"))


# --- pure helpers ------------------------------------------------------------------------------------------


def next_offsets(frame: pd.DataFrame) -> dict[int, int]:
    """Per partition, the offset after the last message of a batch (valid or not)."""
    if frame.empty:
        return {}
    return {int(p): int(o) + 1 for p, o in frame.groupby("partition")["offset"].max().items()}


def resume_offsets(on_disk: dict[int, int], begin: dict[int, int], end: dict[int, int]) -> dict[int, int]:
    """Where a fresh checkpoint starts when the speed view holds trips: after its last file, within what Kafka has.

    ``on_disk`` is the last offset in the speed files per partition; ``begin``
    and ``end`` are the topic's offsets now. Spark's Kafka source wants every
    partition named; a partition without speed files starts at its beginning.
    """
    return {partition: min(max(on_disk[partition] + 1, begin[partition]), end[partition])
            if partition in on_disk else begin[partition] for partition in begin}


def offsets_json(topic: str, offsets: dict[int, int]) -> str:
    """``startingOffsets`` for Spark's Kafka source: ``{"taxi-trips": {"0": 1200, "1": 1187}}``."""
    return json.dumps({topic: {str(partition): offset for partition, offset in sorted(offsets.items())}})


def explain_failure(error: str) -> str:
    """A failed query's message, with what to do when it is Kafka data loss (Spark's ``failOnDataLoss``)."""
    if "failOnDataLoss" not in error and "OffsetOutOfRange" not in error:
        return error
    return (f"{error.strip().splitlines()[0]}\n"
            "Kafka no longer has offsets the checkpoint needs (retention deleted them before they were read, or the "
            "topic was deleted and re-created). Those trips are lost to the speed layer; the batch layer has them "
            "only if its own consumer read them in time. To go on from what Kafka still has, delete the checkpoint "
            "(--checkpoint-dir): a fresh one starts after the speed view's last files, or at the earliest offset "
            "Kafka keeps, and says so.")


def progress_line(batch_id: int, consumed: int, valid: int, dlq: int, seconds: float, status: dict[str, Any]) -> str:
    """The one line per micro-batch."""
    latency, error = status["latency_ms"], status["live_error"]["cumulative"]
    timing = "-" if latency["p50"] is None else f"p50 {latency['p50']:,.0f} ms p99 {latency['p99']:,.0f} ms"
    lag = "?" if None in status["lag"].values() else f"{status['total_lag']:,}"
    rmsle = "-" if error["rmsle"] is None else f"{error['rmsle']:.3f}"
    return (f"batch {batch_id}: {consumed:,} messages ({valid:,} valid, {dlq:,} dlq) in {seconds:.2f} s, "
            f"{consumed / max(seconds, 1e-6):,.0f}/s | lag {lag} | latency {timing} | RMSLE {rmsle} | "
            f"model {status['model_version']}")


# --- the driver side ---------------------------------------------------------------------------------------


class BroadcastModel:
    """The live model, broadcast to the executors; reloaded when ``current.json`` names another version."""

    def __init__(self, spark: SparkSession, model_dir: Path):
        self.spark, self.model_dir = spark, model_dir
        self.model = load_model(model_dir)
        self.broadcast = spark.sparkContext.broadcast(self.model)
        self.udf = prediction_udf(self.broadcast)
        self.checked_at = time.monotonic()

    def current(self) -> TripDurationModel:
        if time.monotonic() - self.checked_at >= MODEL_CHECK_INTERVAL_S:
            self.checked_at = time.monotonic()
            try:
                version = current_version(self.model_dir)
                if version and version != self.model.version:
                    previous, self.model = self.model.version, load_model(self.model_dir, version)
                    old, self.broadcast = self.broadcast, self.spark.sparkContext.broadcast(self.model)
                    self.udf = prediction_udf(self.broadcast)
                    old.unpersist()
                    log.info("model switched from %s to %s (promoted in %s)", previous, version, self.model_dir)
            except Exception as error:  # noqa: BLE001 -- whatever is wrong with the new model, keep the old one
                log.error("cannot load the promoted model, keeping %s: %r", self.model.version, error)
        return self.model


class SparkSpeedLayer:
    """The two streaming queries, the ``foreachBatch`` sink of the speed view, and the live statistics."""

    def __init__(self, spark: SparkSession, args: argparse.Namespace):
        self.spark, self.args = spark, args
        self.models = BroadcastModel(spark, args.model_dir)
        self.producer = KafkaProducer(bootstrap_servers=args.bootstrap, client_id=f"{args.consumer_id}-dlq",
                                      acks="all", linger_ms=5, reconnect_backoff_max_ms=1000)
        self.probe = KafkaConsumer(bootstrap_servers=args.bootstrap, enable_auto_commit=False,
                                   reconnect_backoff_max_ms=1000)
        self.dlq_marker = args.checkpoint_dir / DLQ_MARKER
        self.queries: list[StreamingQuery] = []
        self.windows_checkpoint = Path(tempfile.mkdtemp(prefix="periscope-spark-windows-"))
        self.totals, self.dlq_reasons, self.dlq_history = Counter(), Counter(), speed_view.MinuteCounts()
        self.errors, self.latency = LiveError(RECENT_ERROR_WINDOW_S), SlidingWindow(LATENCY_WINDOW_S)
        self.positions: dict[int, int] = {}
        self.lag: dict[int, int | None] = {}
        self.batches, self.busy_s = 0, 0.0
        self.started = self.last_activity = self.last_status = time.monotonic()
        self.consumed_at_status = 0
        self.stopping = False

    # the queries

    def messages(self, starting: str) -> DataFrame:
        """The trips topic through Spark's Kafka source; a gap in the offsets fails the query (see the docstring)."""
        return kafka_messages(
            self.spark.readStream.format("kafka").option("kafka.bootstrap.servers", self.args.bootstrap)
            .option("subscribe", self.args.topic).option("startingOffsets", starting)
            .option("maxOffsetsPerTrigger", str(self.args.max_offsets_per_trigger))
            .option("failOnDataLoss", "true").load())

    def starting_offsets(self) -> str:
        """``--starting-offsets``, unless the speed view already holds trips: then after its last files."""
        on_disk = speed_view.last_offsets(self.args.speed_dir)
        if not on_disk:
            return self.args.starting_offsets
        tps = [TopicPartition(self.args.topic, p) for p in sorted(self.probe.partitions_for_topic(self.args.topic))]
        begin = {tp.partition: offset for tp, offset in self.probe.beginning_offsets(tps).items()}
        end = {tp.partition: offset for tp, offset in self.probe.end_offsets(tps).items()}
        offsets = resume_offsets(on_disk, begin, end)
        for partition, last in sorted(on_disk.items()):
            if offsets.get(partition) != last + 1:
                log.warning("partition %d: the speed view ends at offset %d but Kafka holds %s..%s now: starting at %s",
                            partition, last, begin.get(partition), end.get(partition), offsets.get(partition))
        return offsets_json(self.args.topic, offsets)

    def start(self) -> None:
        """Start the speed query (checkpointed) and, unless ``--no-windows``, the windows query."""
        starting = self.starting_offsets()
        self.queries.append(
            self.messages(starting).writeStream.queryName("speed").foreachBatch(self.process_batch)
            .option("checkpointLocation", str(self.args.checkpoint_dir / "speed"))
            .trigger(processingTime=self.args.trigger).start())
        if not self.args.no_windows:
            windows = vendor_windows(valid_trips(self.messages("earliest")), self.args.lateness, self.args.window)
            self.queries.append(
                windows.writeStream.queryName(WINDOWS_VIEW).format("memory").outputMode("append")
                .option("checkpointLocation", str(self.windows_checkpoint))
                .trigger(processingTime=self.args.trigger).start())

    # one micro-batch of the speed query

    def process_batch(self, messages: DataFrame, batch_id: int) -> None:
        """Validate, predict, dead-letter, write: idempotent, so a replayed ``batch_id`` rewrites the same files."""
        began = time.perf_counter()
        model = self.models.current()
        scored = (messages.mapInPandas(validate_messages, VALIDATED_SCHEMA)
                  .withColumn("predicted_duration_s", self.models.udf(F.struct(*FIELDS))))
        frame = scored.toPandas()
        invalid = frame[frame["reason"].notna()]
        valid = frame[frame["reason"].isna()].sort_values(["partition", "offset"])
        self.send_dead_letters(invalid, batch_id)
        rows = self.write_speed_files(valid, model.version)
        self.account(frame, invalid, rows, time.perf_counter() - began, batch_id)

    def send_dead_letters(self, invalid: pd.DataFrame, batch_id: int) -> None:
        """Every invalid message to the DLQ topic, acknowledged, unless this batch's were delivered already.

        Sent from the driver with kafka-python, not with Spark's Kafka sink
        (``write.format("kafka")``): the batch is on the driver anyway (the
        speed files are written there) and dead letters are few; here each is
        sent once per batch run and every acknowledgement is awaited before the
        batch is recorded as delivered, whereas the sink sends from tasks, so a
        retried task re-sends its dead letters even when nothing crashed.
        """
        if invalid.empty or batch_id <= self.delivered_batch():
            return
        futures = [self.producer.send(self.args.dlq_topic, key=key, value=value,
                                      headers=dlq_headers(reason, self.args.topic, int(partition), int(offset),
                                                          COMPONENT))
                   for key, value, reason, partition, offset in
                   zip(invalid["key"], invalid["value"], invalid["reason"], invalid["partition"], invalid["offset"])]
        self.producer.flush(timeout=DLQ_TIMEOUT_S)
        failed = [future for future in futures if not future.succeeded()]
        if failed:
            raise RuntimeError(f"{len(failed)} dead letters of batch {batch_id} were not delivered to "
                               f"{self.args.dlq_topic} ({failed[0].exception!r}); the batch will be re-run")
        atomic_write_bytes(self.dlq_marker, f"{batch_id}\n".encode())

    def delivered_batch(self) -> int:
        try:
            return int(self.dlq_marker.read_text().strip())
        except (OSError, ValueError):
            return -1

    def write_speed_files(self, valid: pd.DataFrame, model_version: str) -> pd.DataFrame:
        """One speed file per Kafka partition, rows as kafka_consumer.py writes them."""
        columns = {name: valid[name].to_numpy() for name in ("partition", "offset", "kafka_timestamp_ms") + FIELDS}
        columns.update({name: columns[name].astype(np.int64) for name in ("partition", "offset", "kafka_timestamp_ms")
                        + INT_COLUMNS})
        columns["store_and_fwd_flag"] = columns["store_and_fwd_flag"].astype(bool)
        columns["id"] = columns["id"].astype(object)
        rows = speed_rows(columns, valid["predicted_duration_s"].to_numpy(np.float64), model_version)
        for partition in np.unique(columns["partition"]):
            mine = columns["partition"] == partition
            rows.loc[mine, "visible_at_ms"] = wall_clock_ms()
            speed_view.write_batch(self.args.speed_dir, int(partition), rows[mine])
        return rows

    def account(self, frame: pd.DataFrame, invalid: pd.DataFrame, rows: pd.DataFrame, seconds: float,
                batch_id: int) -> None:
        now = time.monotonic()
        self.batches += 1
        self.busy_s += seconds
        self.positions.update(next_offsets(frame))
        self.totals.update(consumed=len(frame), valid=len(rows), dlq=len(invalid))
        codes = [reason_code(reason) for reason in invalid["reason"]]
        self.dlq_reasons.update(codes)
        self.dlq_history.add(codes, wall_clock_ms())
        if len(rows):
            self.latency.add((rows["visible_at_ms"] - rows["kafka_timestamp_ms"]).to_numpy(), now)
            self.errors.add(rows["trip_duration"].to_numpy(), rows["predicted_duration_s"].to_numpy(), now)
        if len(frame):
            self.last_activity = now
        self.lag = self.measure_lag()
        log.info(progress_line(batch_id, len(frame), len(rows), len(invalid), seconds, self.status(now)))

    # statistics and status

    def measure_lag(self) -> dict[int, int | None]:
        """Per partition: messages on the broker not yet processed (None: the broker did not answer)."""
        try:
            partitions = self.probe.partitions_for_topic(self.args.topic) or set()
            tps = [TopicPartition(self.args.topic, p) for p in sorted(partitions)]
            ends = self.probe.end_offsets(tps) if tps else {}
        except Exception as error:  # noqa: BLE001 -- a status figure must never stop the stream
            log.warning("cannot read the end offsets (%r)", error)
            return dict.fromkeys(self.positions, None)
        begins = self.probe.beginning_offsets(tps) if tps else {}
        return {tp.partition: max(ends[tp] - self.positions.get(tp.partition, begins[tp]), 0) for tp in tps}

    def status(self, now: float) -> dict[str, Any]:
        """The status file, in the shape of kafka_consumer.py's (the dashboard reads both)."""
        p50, p99 = latency_percentiles(self.latency, now)
        elapsed = max(now - self.last_status, 1e-6)
        return {
            "consumer_id": self.args.consumer_id, "group": f"spark:{self.args.checkpoint_dir}",
            "topic": self.args.topic, "pid": os.getpid(), "host": socket.gethostname(),
            "state": "stopped" if self.stopping else "running", "member_state": "spark",
            "updated_at_ms": wall_clock_ms(), "uptime_s": round(now - self.started, 1),
            "assigned_partitions": sorted(self.lag or self.positions),
            "positions": {str(p): offset for p, offset in sorted(self.positions.items())},
            "lag": {str(p): lag for p, lag in sorted(self.lag.items())},
            "total_lag": sum(lag for lag in self.lag.values() if lag is not None),
            "totals": {**{name: self.totals[name] for name in ("consumed", "valid", "dlq")},
                       "dlq_by_reason": dict(sorted(self.dlq_reasons.items()))},
            "dlq_history": self.dlq_history.as_status(),
            "rate_per_s": round((self.totals["consumed"] - self.consumed_at_status) / elapsed, 1),
            "latency_ms": {"p50": p50, "p99": p99, "window_s": LATENCY_WINDOW_S},
            "live_error": {"cumulative": self.errors.cumulative(), "recent": self.errors.recent(now),
                           "recent_window_s": RECENT_ERROR_WINDOW_S},
            "model_version": self.models.model.version,
            "spark": {"master": self.spark.sparkContext.master, "batches": self.batches,
                      "busy_s": round(self.busy_s, 3), "checkpoint": str(self.args.checkpoint_dir)},
        }

    def publish_status(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.last_status >= STATUS_INTERVAL_S:
            if not self.lag:
                self.lag = self.measure_lag()
            speed_view.write_status(self.args.speed_dir, self.args.consumer_id, self.status(now))
            self.last_status, self.consumed_at_status = now, self.totals["consumed"]

    # running and stopping

    def failed(self) -> Exception | None:
        for query in self.queries:
            if not query.isActive and query.exception() is not None:
                return query.exception()
        return None

    def idle(self) -> bool:
        """Quiet for ``--stop-when-idle`` seconds with nothing left on the broker, windows included."""
        quiet = time.monotonic() - self.last_activity >= self.args.stop_when_idle
        caught_up = bool(self.lag) and all(lag == 0 for lag in self.lag.values())
        windows_done = all(not q.status["isDataAvailable"] for q in self.queries[1:])
        return quiet and caught_up and windows_done

    def run(self) -> None:
        """Wait for the queries: status every second; stop when told, idle, done, or a query failed."""
        while not self.stopping:
            time.sleep(0.2)
            error = self.failed()
            if error is not None:
                raise RuntimeError(f"a streaming query failed: {explain_failure(str(error))}")
            self.publish_status()
            if self.args.max_batches is not None and self.batches >= self.args.max_batches:
                log.info("%d batches done (--max-batches): stopping", self.batches)
                break
            if self.args.stop_when_idle is not None and time.monotonic() - self.last_status < 0.3:
                self.lag = self.measure_lag()
                if self.idle():
                    log.info("no new trips for %.0f s and no lag: stopping", self.args.stop_when_idle)
                    break

    def process_all_available(self) -> None:
        """Block until every query has processed everything on the broker now (for tests and notebooks)."""
        for query in self.queries:
            query.processAllAvailable()
        self.lag = self.measure_lag()

    def stop(self) -> None:
        """Stop the queries (an unfinished batch is re-run on restart), publish the last status, summarise."""
        self.stopping = True
        for query in self.queries:
            query.stop()
        self.publish_status(force=True)
        elapsed, error = time.monotonic() - self.started, self.errors.cumulative()
        quality = f"live RMSLE {error['rmsle']:.3f}, MAE {error['mae']:.0f} s" if error["rows"] else "no valid trips"
        reasons = f" ({', '.join(f'{n:,} {r}' for r, n in self.dlq_reasons.most_common())})" if self.dlq_reasons else ""
        log.info("stopped after %.0f s and %d micro-batches: %s messages, %s valid, %s to the dead-letter topic%s; %s",
                 elapsed, self.batches, f"{self.totals['consumed']:,}", f"{self.totals['valid']:,}",
                 f"{self.totals['dlq']:,}", reasons, quality)
        self.producer.close(timeout=10)
        self.probe.close()


QUIT_WORDS = ("quit", "exit")


def sql_prompt(spark: SparkSession) -> None:
    """Read SQL lines from the terminal and show their result, until ``quit``, ``exit`` or Ctrl-D.

    Empty lines are skipped. Spark's own WARN lines are held back while the
    prompt is open (log level ERROR), so they do not mix into what is typed.
    """
    spark.sparkContext.setLogLevel("ERROR")
    print(f"SQL over the running streams: e.g. SELECT * FROM {WINDOWS_VIEW} ORDER BY window_start DESC LIMIT 10 "
          "(quit, exit or Ctrl-D ends the prompt and stops the speed layer)")
    while True:
        try:
            line = input("sql> ").strip().rstrip(";")
        except EOFError:
            return
        if line.lower() in QUIT_WORDS:
            return
        if not line:
            continue
        try:
            spark.sql(line).show(20, truncate=False)
        except Exception as error:  # noqa: BLE001 -- a typo in a query must not stop the stream
            print(f"error: {str(error).splitlines()[0]}")


# --- command line ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Speed layer on Spark Structured Streaming: validate, predict, write the speed view; "
                    "windowed aggregates as temporary views.",
        formatter_class=cli.HelpFormatter)
    parser.add_argument("--master", default=config.SPARK_MASTER,
                        help="Spark master: local[*] or a cluster URL like spark://host:7077 (env SPARK_MASTER)")
    parser.add_argument("--bootstrap", default=config.KAFKA_BOOTSTRAP_SERVERS,
                        help="Kafka bootstrap servers, host:port[,host:port] (env KAFKA_BOOTSTRAP_SERVERS)")
    parser.add_argument("--topic", default=config.TRIPS_TOPIC, help="trips topic (env PERISCOPE_TRIPS_TOPIC)")
    parser.add_argument("--dlq-topic", default=config.DLQ_TOPIC,
                        help="dead-letter topic for invalid messages (env PERISCOPE_DLQ_TOPIC)")
    parser.add_argument("--speed-dir", type=Path, default=config.SPEED_DIR,
                        help="speed view and status files (env PERISCOPE_SPEED_DIR)")
    parser.add_argument("--model-dir", type=Path, default=config.MODEL_DIR,
                        help="trained model versions; current.json names the live one (env PERISCOPE_MODEL_DIR)")
    parser.add_argument("--checkpoint-dir", type=Path, default=DEFAULT_CHECKPOINT_DIR,
                        help="Spark checkpoint of the speed query: offsets per batch; delete it to start over "
                             "(env PERISCOPE_STATE_DIR moves the default)")
    parser.add_argument("--starting-offsets", choices=("earliest", "latest"), default="earliest",
                        help="where a fresh checkpoint starts when the speed view is empty (a checkpoint, or "
                             "speed files, say where to resume otherwise)")
    parser.add_argument("--lateness", default=DEFAULT_LATENESS,
                        help="watermark delay: trips older than the latest pickup minus this are left out of "
                             "the windowed aggregates (still in the speed view)")
    parser.add_argument("--window", default=DEFAULT_WINDOW, help=f"event-time window length of {WINDOWS_VIEW}")
    parser.add_argument("--trigger", default=DEFAULT_TRIGGER, help="start a micro-batch at most this often")
    parser.add_argument("--max-offsets-per-trigger", type=int, default=DEFAULT_MAX_OFFSETS,
                        help="messages per micro-batch at most")
    parser.add_argument("--no-windows", action="store_true",
                        help="run only the speed query (halves the work; no windowed views)")
    parser.add_argument("--sql", action="store_true", help="an SQL prompt over the temporary views while it runs; quit, exit or Ctrl-D ends "
                             "it and stops the speed layer")
    parser.add_argument("--stop-when-idle", type=float, metavar="SECONDS",
                        help="exit after this long without new trips and with zero lag (default: run forever)")
    parser.add_argument("--max-batches", type=int, metavar="N", help="exit after N micro-batches with data")
    parser.add_argument("--consumer-id", default="spark", help="name of the status file in <speed dir>/_status")
    parser.add_argument("--broker-timeout", type=float, metavar="SECONDS",
                        help="give up if no broker answers at start within this long (default: wait forever)")
    args = parser.parse_args(argv)
    for flag in ("lateness", "window", "trigger"):
        if not _INTERVAL.match(getattr(args, flag)):
            parser.error(f"--{flag} must be a number and a unit, like '10 minutes' or '30 seconds', "
                         f"got {getattr(args, flag)!r}")
    if args.max_offsets_per_trigger < 1:
        parser.error(f"--max-offsets-per-trigger must be at least 1, got {args.max_offsets_per_trigger}")
    if args.stop_when_idle is not None and args.stop_when_idle <= 0:
        parser.error(f"--stop-when-idle must be a positive number of seconds, got {args.stop_when_idle:g}")
    if args.max_batches is not None and args.max_batches < 1:
        parser.error(f"--max-batches must be at least 1, got {args.max_batches}")
    if not args.consumer_id or "/" in args.consumer_id or args.consumer_id.startswith("."):
        parser.error(f"--consumer-id must be a plain file name (no '/', not starting with '.'), got "
                     f"{args.consumer_id!r}")
    if args.speed_dir.exists() and not args.speed_dir.is_dir():
        parser.error(f"--speed-dir {args.speed_dir} exists and is not a directory")
    return args


def start(spark: SparkSession, args: argparse.Namespace) -> SparkSpeedLayer:
    """Start both queries on ``spark`` and return the running layer (tests and notebooks call this)."""
    args.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    layer = SparkSpeedLayer(spark, args)
    layer.start()
    return layer


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    logging.getLogger("py4j").setLevel(logging.WARNING)
    try:
        load_model(args.model_dir)
        wait_for_broker(args.bootstrap, f"stream {args.topic} into Spark", args.broker_timeout, log)
        topics = set(KafkaConsumer(bootstrap_servers=args.bootstrap).topics())
        missing = [topic for topic in (args.topic, args.dlq_topic) if topic not in topics]
        if missing:
            raise BrokerUnavailable(f"topic(s) {', '.join(missing)} do not exist at {args.bootstrap}; create them "
                                    f"with `python -m periscope.kafka_local create-topics --bootstrap {args.bootstrap}`")
        spark = get_session(args.master, "periscope-speed-layer")
    except (ModelNotFoundError, ModelMismatchError, BrokerUnavailable, SparkSetupError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    layer = start(spark, args)

    def stop(signum: int, _frame: Any) -> None:
        log.info("%s received: stopping the queries", signal.Signals(signum).name)
        layer.stopping = True

    previous = signal.signal(signal.SIGTERM, stop)
    log.info("Spark speed layer on %s: %s -> %s (checkpoint %s, model %s, dead letters to %s, windows %s)",
             spark.sparkContext.master, args.topic, args.speed_dir, args.checkpoint_dir, layer.models.model.version,
             args.dlq_topic, "off" if args.no_windows else f"in view {WINDOWS_VIEW}")
    try:
        if args.sql:
            log.setLevel(logging.WARNING)
            threading.Thread(target=layer.run, name="status", daemon=True).start()
            sql_prompt(spark)
        else:
            layer.run()
    except KeyboardInterrupt:
        log.info("Ctrl-C: stopping the queries")
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        layer.stop()
        signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
