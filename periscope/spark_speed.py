"""Machinery of the Spark speed layer (``spark_streaming.py``): what runs around its steps.

The script holds the layer's steps (read Kafka, validate, dead-letter,
predict, write the speed files, count windows) and starts its queries; this
module keeps, each behind a name:

- the schemas of Spark's Kafka rows and of a validated message
  (``KAFKA_SOURCE_SCHEMA``, ``VALIDATED_SCHEMA``);
- what the executors run per micro-batch: validation and prediction in one
  pass over Arrow batches (``validate_and_predict_batches``), with the model
  broadcast to them (``BroadcastModel``, which also runs it once per core at
  start, ``warm_up``, and on the driver for a small batch, ``on_driver``);
- what the driver does with the Arrow rows they hand back, without pandas:
  the offsets of the batch (``batch_offsets``) and the speed files
  (``write_speed_tables``);
- where a fresh checkpoint starts (``fresh_start``: after the speed view's
  files, within what Kafka holds, as ``startingOffsets`` JSON);
- what a failed query means (``explain_failure``: Kafka data loss);
- the running layer (``SparkSpeedLayer``): its Kafka clients (dead letters
  through ``consumer_group.DeadLetterSender``), the lag and the next batch's
  expected size from the query's progress (``expected_rows``), statistics,
  status file, the wait until it is stopped, idle or failed, and the stop.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from kafka import KafkaConsumer, TopicPartition
from pyspark.sql import SparkSession
from pyspark.sql import functions as F
from pyspark.sql.pandas.types import to_arrow_schema
from pyspark.sql.streaming import StreamingQuery
from pyspark.sql.types import (BinaryType, DoubleType, IntegerType, LongType, StringType, StructField, StructType,
                               TimestampType)

from periscope import speed_core, speed_view
from periscope import speed_tuning as tuning
from periscope.consumer_group import DeadLetterSender, Warnings
from periscope.model import TripDurationModel
from periscope.spark_session import trip_struct
from periscope.speed_core import Message, ModelWatcher, SpeedStatistics
from periscope.speed_view import SpeedStatus
from periscope.stream import BrokerUnavailable

RECONNECT_BACKOFF_MAX_MS = 1000

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
    *trip_struct(speed_core.TRIP_COLUMNS).fields,
])
"""``speed_core.VALIDATED_COLUMNS`` in Spark types: the trip if valid, else the raw bytes and the reason."""

SPEED_VIEW_SCHEMA = StructType([
    *(StructField(name, LongType()) for name in speed_view.META_COLUMNS), *trip_struct(speed_core.TRIP_COLUMNS).fields,
    StructField("predicted_duration_s", DoubleType()), StructField("model_version", StringType()),
])
"""A speed file (``speed_view.COLUMNS``) in Spark types, for Spark's file source."""

SPEED_ROWS_SCHEMA = StructType([*VALIDATED_SCHEMA.fields, StructField("predicted_duration_s", DoubleType())])
"""What the executors hand the driver per message: ``VALIDATED_SCHEMA`` and the predicted seconds (null if invalid)."""

ArrowBatches = Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]

WARM_UP_TRIP = (b'{"id":"warm-up","vendor_id":1,"pickup_datetime":"2016-06-01 00:12:05",'
                b'"dropoff_datetime":"2016-06-01 00:16:49","passenger_count":1,"pickup_longitude":-73.9918,'
                b'"pickup_latitude":40.7274,"dropoff_longitude":-73.9823,"dropoff_latitude":40.7278,'
                b'"store_and_fwd_flag":"N","trip_duration":284}')
"""A valid trip for ``BroadcastModel.warm_up``: it goes through validation and the model."""


# --- on the executors: validate and predict, in one pass ------------------------------------------


def validate_and_predict_batches(model_broadcast: Any) -> ArrowBatches:
    """The ``mapInArrow`` function of the speed query: each Arrow batch of Kafka messages through the core's
    ``validate_frame`` and ``predict_frame``, with the broadcast model; ``SPEED_ROWS_SCHEMA`` out.

    One Python pass per task: the messages cross from the JVM to Python and back once (the hot
    path's shape and what it bought: ``periscope/speed_tuning.py``, Spark section).
    """
    schema = to_arrow_schema(SPEED_ROWS_SCHEMA)

    def validated_and_predicted(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        model = model_broadcast.value
        for batch in batches:
            frame = speed_core.validate_frame(batch.to_pandas())
            frame["predicted_duration_s"] = speed_core.predict_frame(model, frame[list(speed_core.TRIP_COLUMNS)]).to_numpy()
            yield pa.RecordBatch.from_pandas(frame, schema=schema, preserve_index=False)

    return validated_and_predicted


class BroadcastModel(ModelWatcher):
    """The live model, broadcast to the executors; a promoted one is broadcast anew and the old copy dropped.

    ``speed_rows`` is the executors' function (``validate_and_predict_batches``) with the live copy.
    """

    def __init__(self, spark: SparkSession, model_dir: Path, logger: logging.Logger):
        self.spark = spark
        super().__init__(model_dir, logger=logger)
        self.broadcast = spark.sparkContext.broadcast(self.model)
        self.speed_rows = validate_and_predict_batches(self.broadcast)

    def warm_up(self) -> float:
        """Run the executors' function once per core on a made-up trip; the seconds it took.

        Each Python worker starts, imports pandas and scikit-learn and loads the broadcast model
        once; done here, before the speed query starts, that costs no micro-batch (the first one
        took 4-5 s more than the next ones without it). Spark reuses its Python workers after.
        """
        began = time.perf_counter()
        tasks = self.spark.sparkContext.defaultParallelism
        trips = self.spark.range(tasks, numPartitions=tasks).select(
            F.lit(b"warm-up").alias("key"), F.lit(WARM_UP_TRIP).alias("value"),
            F.lit("warm-up").alias("topic"), F.col("id").cast("int").alias("partition"),
            F.lit(0).cast("long").alias("offset"), F.lit(0).cast("long").alias("timestamp_ms"))
        trips.mapInArrow(self.speed_rows, SPEED_ROWS_SCHEMA).collect()
        return time.perf_counter() - began

    def on_driver(self, messages: pa.Table) -> pa.Table:
        """The executors' function (``speed_rows``) run here, over a micro-batch's messages collected as they
        are: for a batch too small to pay a Python worker's round trip (``speed_tuning.DRIVER_BATCH_ROWS``)."""
        tuning.one_model_thread_here()
        return pa.Table.from_batches(list(self.speed_rows(iter(messages.to_batches()))),
                                     to_arrow_schema(SPEED_ROWS_SCHEMA))

    def switched(self, model: TripDurationModel) -> None:
        old, self.broadcast = self.broadcast, self.spark.sparkContext.broadcast(model)
        self.speed_rows = validate_and_predict_batches(self.broadcast)
        old.unpersist()


# --- on the driver: the Arrow rows of a micro-batch ---------------------------------------------------


def batch_offsets(rows: pa.Table) -> dict[int, tuple[int, int]]:
    """Per Kafka partition of a micro-batch (``SPEED_ROWS_SCHEMA`` rows): its first and last offset."""
    grouped = rows.group_by("partition").aggregate([("offset", "min"), ("offset", "max")])
    return {partition: (first, last) for partition, first, last in
            zip(*(grouped[name].to_pylist() for name in ("partition", "offset_min", "offset_max")))}


def write_speed_tables(speed_dir: Path, valid: pa.Table, model_version: str) -> pa.Table:
    """``speed_core.write_speed_files`` for valid rows that came as Arrow: one speed file per Kafka partition,
    in offset order, each stamped with the time it became visible. Returns the rows as written.

    The rows stay Arrow from the executors to the file (``speed_view.write_batch_table``).
    """
    def stamped(rows: pa.Table) -> pa.Table:
        version = pa.repeat(pa.scalar(model_version, pa.string()), len(rows))
        visible = pa.array(np.full(len(rows), speed_core.wall_clock_ms(), dtype=np.int64))
        return rows.append_column("model_version", version).append_column("visible_at_ms", visible).select(
            list(speed_view.COLUMNS))

    written = []
    for partition in sorted(pc.unique(valid["partition"]).to_pylist()):
        written.append(stamped(valid.filter(pc.equal(valid["partition"], partition)).sort_by("offset")))
        speed_view.write_batch_table(speed_dir, partition, written[-1])
    return pa.concat_tables(written) if written else stamped(valid.slice(0, 0))


def progress_offsets(progress: Any, topic: str) -> tuple[dict[int, int], dict[int, int]] | None:
    """From a speed query's progress: per partition, where the batch ended and the broker's end then.

    Spark's Kafka source asks the broker for its end offsets to plan each micro-batch and reports
    them (``latestOffset``) beside the batch's own end (``endOffset``): the lag, with no call of
    our own. None if the progress has neither.
    """
    for source in (progress or {}).get("sources", []):
        ends = [json.loads(text) if isinstance(text, str) else text
                for text in (source.get("endOffset"), source.get("latestOffset"))]
        if all(isinstance(end, dict) and topic in end for end in ends):
            end, latest = ({int(partition): int(offset) for partition, offset in end[topic].items()} for end in ends)
            return end, latest
    return None


def expected_rows(progress: Any, topic: str) -> int:
    """The size of the next micro-batch as a speed query's last progress tells it: the messages of the
    batch before (the rate it read at), or those the broker held beyond it (a backlog), the larger."""
    offsets = progress_offsets(progress, topic)
    backlog = sum(max(offset - offsets[0].get(partition, offset), 0)
                  for partition, offset in offsets[1].items()) if offsets else 0
    return max(int((progress or {}).get("numInputRows") or 0), backlog)


# --- where a fresh checkpoint starts, and what a failure means -----------------------------------


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


def fresh_start(probe: KafkaConsumer, topic: str, speed_dir: Path, default: str, log: logging.Logger) -> str:
    """``startingOffsets`` of the speed query: ``default``, or after the speed view's trips if it holds any.

    (A checkpoint, where there is one, overrides it: Spark resumes from there.)
    """
    on_disk = speed_view.last_offsets(speed_dir)
    if not on_disk:
        return default
    tps = [TopicPartition(topic, p) for p in sorted(probe.partitions_for_topic(topic))]
    begin = {tp.partition: offset for tp, offset in probe.beginning_offsets(tps).items()}
    end = {tp.partition: offset for tp, offset in probe.end_offsets(tps).items()}
    offsets = resume_offsets(on_disk, begin, end)
    for partition, last in sorted(on_disk.items()):
        if offsets.get(partition) != last + 1:
            log.warning("partition %d: the speed view ends at offset %d but Kafka holds %s..%s now: starting at %s",
                        partition, last, begin.get(partition), end.get(partition), offsets.get(partition))
    return offsets_json(topic, offsets)


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


def check_topics(bootstrap: str, topics: tuple[str, ...]) -> None:
    """Raise ``BrokerUnavailable`` naming the command that creates them if any of ``topics`` is missing."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        existing = set(consumer.topics())
    finally:
        consumer.close()
    missing = [topic for topic in topics if topic not in existing]
    if missing:
        raise BrokerUnavailable(f"topic(s) {', '.join(missing)} do not exist at {bootstrap}; create them with "
                                f"`python -m periscope.kafka_local create-topics --bootstrap {bootstrap}`")


# --- the running layer ------------------------------------------------------------------------------


class SparkSpeedLayer:
    """The running Spark speed layer: its queries, Kafka clients, live statistics and status file.

    ``args`` are ``spark_streaming.py``'s; ``component`` names it in the dead letters' headers.
    """

    def __init__(self, spark: SparkSession, args: argparse.Namespace, component: str, log: logging.Logger):
        self.spark, self.args, self.log = spark, args, log
        self.models = BroadcastModel(spark, args.model_dir, log)
        log.info("Python workers ready in %.1f s", self.models.warm_up())  # before the idle clock starts
        self.dead_letters = DeadLetterSender(args.bootstrap, args.dlq_topic, args.topic, component, args.consumer_id,
                                             lambda: self.stopping, log, Warnings(log),
                                             reconnect_backoff_max_ms=RECONNECT_BACKOFF_MAX_MS)
        self.probe = KafkaConsumer(bootstrap_servers=args.bootstrap, enable_auto_commit=False,
                                   reconnect_backoff_max_ms=RECONNECT_BACKOFF_MAX_MS)
        self.queries: list[StreamingQuery] = []
        self.windows_checkpoint = Path(tempfile.mkdtemp(prefix="periscope-spark-windows-"))
        self.stats = SpeedStatistics(args.consumer_id, f"spark:{args.checkpoint_dir}", args.topic)
        self.positions: dict[int, int] = {}
        self.latest: dict[int, int] = {}
        """The broker's end offset per partition, as last seen (Spark's progress, or ``measure_lag``)."""
        self.lag: dict[int, int | None] = {}
        self.batches, self.busy_s = 0, 0.0
        self.stopping = False
        self.measure_lag()  # the broker's end offsets at start: the first batch's lag

    def starting_offsets(self) -> str:
        """Where the speed query starts without a checkpoint (``fresh_start``)."""
        return fresh_start(self.probe, self.args.topic, self.args.speed_dir, self.args.starting_offsets, self.log)

    def send_dead_letters(self, rows: pa.Table, offsets: dict[int, tuple[int, int]], batch_id: int) -> tuple[
            list[str], int]:
        """The invalid messages of a micro-batch to the DLQ topic, but none that is there already: their
        reasons, and how many were there already.

        The ledger learns where each partition of the batch starts (``DeadLetterLedger.advance``).
        Blocks until every dead letter is acknowledged; told to stop first, it raises, so that the
        batch fails and Spark does not commit it: a restart runs it again.
        """
        for partition, (first, _) in offsets.items():
            self.dead_letters.ledger.advance(partition, first)
        invalid = rows.filter(pc.is_valid(rows["reason"]))
        columns = (invalid[name].to_pylist() for name in ("partition", "offset", "kafka_timestamp_ms", "key", "value",
                                                           "reason"))
        messages = [(Message(self.args.topic, partition, offset, timestamp, key, value), reason)
                    for partition, offset, timestamp, key, value, reason in zip(*columns)]
        sent = self.dead_letters.send(messages)
        if sent is None or not self.dead_letters.delivered(sent):
            raise RuntimeError(f"stopped before the dead letters of batch {batch_id} were delivered to "
                               f"{self.args.dlq_topic}; the batch is run again on restart")
        return [reason for _, reason in messages], len(messages) - len(sent)

    def count(self, offsets: dict[int, tuple[int, int]], consumed: int, written: pa.Table, reasons: list[str],
              already_sent: int, seconds: float, batch_id: int) -> None:
        """A micro-batch in the statistics, and its line in the log (the lag as of Spark's last progress)."""
        self.batches, self.busy_s = self.batches + 1, self.busy_s + seconds
        self.positions.update({partition: last + 1 for partition, (_, last) in offsets.items()})
        statistics = written.select(["kafka_timestamp_ms", "visible_at_ms", "trip_duration", "predicted_duration_s"])
        self.stats.count_batch(consumed, statistics.to_pandas(), reasons, already_sent)
        self.lag = self.known_lag()
        self.log.info(speed_core.batch_line(batch_id, consumed, len(written), len(reasons), seconds, self.status()))

    # --- lag, status, running and stopping ------------------------------------------------------------

    def follow_progress(self) -> None:
        """Positions and the broker's end offsets from the speed query's last progress (no broker call)."""
        offsets = progress_offsets(self.queries[0].lastProgress, self.args.topic) if self.queries else None
        if offsets is not None:
            ends, latest = offsets
            for partition, end in ends.items():
                self.positions[partition] = max(self.positions.get(partition, end), end)
            self.latest.update({partition: max(self.latest.get(partition, end), end)
                                for partition, end in latest.items()})
        self.lag = self.known_lag()

    def next_batch_rows(self) -> int | None:
        """How many messages the micro-batch about to run holds, as far as the speed query's last progress
        tells (``expected_rows``); None before its first progress."""
        progress = self.queries[0].lastProgress if self.queries else None
        return None if progress is None else expected_rows(progress, self.args.topic)

    def known_lag(self) -> dict[int, int | None]:
        """Per partition with a position: the broker's end as last known minus it (None: end not known yet)."""
        return {partition: max(self.latest[partition] - position, 0) if partition in self.latest else None
                for partition, position in sorted(self.positions.items())}

    def measure_lag(self) -> dict[int, int | None]:
        """The lag against the broker's end offsets now, every partition: asked only to tell that the layer
        is idle (a partition not read yet counts from its beginning; None: the broker did not answer)."""
        try:
            partitions = self.probe.partitions_for_topic(self.args.topic) or set()
            tps = [TopicPartition(self.args.topic, p) for p in sorted(partitions)]
            ends = self.probe.end_offsets(tps) if tps else {}
            unread = [tp for tp in tps if tp.partition not in self.positions]
            begins = self.probe.beginning_offsets(unread) if unread else {}
        except Exception as error:  # noqa: BLE001 -- a status figure must never stop the stream
            self.log.warning("cannot read the end offsets (%r)", error)
            return dict.fromkeys(self.positions, None)
        self.latest.update({tp.partition: end for tp, end in ends.items()})
        return {tp.partition: max(ends[tp] - self.positions.get(tp.partition, begins.get(tp, 0)), 0) for tp in tps}

    def status(self) -> SpeedStatus:
        spark = {"master": self.spark.sparkContext.master, "batches": self.batches, "busy_s": round(self.busy_s, 3),
                 "checkpoint": str(self.args.checkpoint_dir)}
        return self.stats.status("stopped" if self.stopping else "running", "spark", self.positions, self.lag,
                                 self.models.model.version, spark)

    def publish_status(self, force: bool = False) -> None:
        if force or self.stats.status_due():
            self.follow_progress()
            self.stats.publish(self.args.speed_dir, self.status())

    def failed(self) -> Exception | None:
        for query in self.queries:
            if not query.isActive and query.exception() is not None:
                return query.exception()
        return None

    def idle(self) -> bool:
        """Quiet for ``--stop-when-idle`` seconds with nothing left on the broker, windows included."""
        if time.monotonic() - self.stats.last_activity < self.args.stop_when_idle:
            return False
        self.lag = self.measure_lag()
        caught_up = bool(self.lag) and all(lag == 0 for lag in self.lag.values())
        return caught_up and all(not q.status["isDataAvailable"] for q in self.queries[1:])

    def run(self) -> None:
        """Wait for the queries: status every second; stop when told, idle, done, or a query failed."""
        while not self.stopping:
            time.sleep(0.2)
            error = self.failed()
            if error is not None:
                raise RuntimeError(f"a streaming query failed: {explain_failure(str(error))}")
            self.publish_status()
            if self.args.max_batches is not None and self.batches >= self.args.max_batches:
                self.log.info("%d batches done (--max-batches): stopping", self.batches)
                break
            if self.args.stop_when_idle is not None and time.monotonic() - self.stats.last_status < 0.3:
                if self.idle():
                    self.log.info("no new trips for %.0f s and no lag: stopping", self.args.stop_when_idle)
                    break

    @contextlib.contextmanager
    def stopped_by_sigterm(self) -> Iterator[None]:
        """While inside: SIGTERM stops the layer as Ctrl-C does (the queries stop, the status says so)."""

        def stop(signum: int, _frame: Any) -> None:
            self.log.info("%s received: stopping the queries", signal.Signals(signum).name)
            self.stopping = True

        previous = signal.signal(signal.SIGTERM, stop)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)

    def process_all_available(self) -> None:
        """Block until every query has processed everything on the broker now (for tests and notebooks)."""
        for query in self.queries:
            query.processAllAvailable()
        self.follow_progress()

    def stop(self) -> None:
        """Stop the queries (an unfinished batch is re-run on restart), publish the last status, summarise."""
        self.stopping = True
        for query in self.queries:
            query.stop()
        self.publish_status(force=True)
        self.log.info(self.stats.summary(micro_batches=self.batches))
        self.dead_letters.close()
        self.probe.close()
