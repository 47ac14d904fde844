"""Machinery of the Spark speed layer (``spark_streaming.py``): what runs around its steps.

The script holds the layer's steps (read Kafka, validate, dead-letter,
predict, write the speed files, count windows) and starts its queries; this
module keeps, each behind a name:

- the schemas of Spark's Kafka rows and of a validated message
  (``KAFKA_SOURCE_SCHEMA``, ``VALIDATED_SCHEMA``);
- the model broadcast to the executors and its pandas UDF
  (``BroadcastModel``, ``prediction_udf``);
- where a fresh checkpoint starts (``fresh_start``: after the speed view's
  files, within what Kafka holds, as ``startingOffsets`` JSON);
- what a failed query means (``explain_failure``: Kafka data loss);
- the running layer (``SparkSpeedLayer``): its Kafka clients (dead letters
  through ``consumer_group.DeadLetterSender``, lag), statistics, status file,
  the wait until it is stopped, idle or failed, and the stop.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
from kafka import KafkaConsumer, TopicPartition
from pyspark.sql import SparkSession
from pyspark.sql.functions import pandas_udf
from pyspark.sql.streaming import StreamingQuery
from pyspark.sql.types import (BinaryType, DoubleType, IntegerType, LongType, StringType, StructField, StructType,
                               TimestampType)

from periscope import speed_core, speed_view
from periscope.consumer_group import DeadLetterSender, Warnings
from periscope.model import TripDurationModel
from periscope.spark_session import trip_struct
from periscope.speed_core import Message, ModelWatcher, SpeedStatistics, next_offsets
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


# --- the model on the executors -----------------------------------------------------------------------


def prediction_udf(model_broadcast: Any) -> Any:
    """A vectorised (pandas) UDF: trips as a struct column in, predicted seconds out, with a broadcast model."""

    @pandas_udf(DoubleType())
    def predicted_duration_s(trips: pd.DataFrame) -> pd.Series:
        return speed_core.predict_frame(model_broadcast.value, trips)

    return predicted_duration_s


class BroadcastModel(ModelWatcher):
    """The live model, broadcast to the executors; a promoted one is broadcast anew and the old copy dropped."""

    def __init__(self, spark: SparkSession, model_dir: Path, logger: logging.Logger):
        self.spark = spark
        super().__init__(model_dir, logger=logger)
        self.broadcast = spark.sparkContext.broadcast(self.model)
        self.udf = prediction_udf(self.broadcast)

    def switched(self, model: TripDurationModel) -> None:
        old, self.broadcast = self.broadcast, self.spark.sparkContext.broadcast(model)
        self.udf = prediction_udf(self.broadcast)
        old.unpersist()


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
        self.dead_letters = DeadLetterSender(args.bootstrap, args.dlq_topic, args.topic, component, args.consumer_id,
                                             lambda: self.stopping, log, Warnings(log),
                                             reconnect_backoff_max_ms=RECONNECT_BACKOFF_MAX_MS)
        self.probe = KafkaConsumer(bootstrap_servers=args.bootstrap, enable_auto_commit=False,
                                   reconnect_backoff_max_ms=RECONNECT_BACKOFF_MAX_MS)
        self.queries: list[StreamingQuery] = []
        self.windows_checkpoint = Path(tempfile.mkdtemp(prefix="periscope-spark-windows-"))
        self.stats = SpeedStatistics(args.consumer_id, f"spark:{args.checkpoint_dir}", args.topic)
        self.positions: dict[int, int] = {}
        self.lag: dict[int, int | None] = {}
        self.batches, self.busy_s = 0, 0.0
        self.stopping = False

    def starting_offsets(self) -> str:
        """Where the speed query starts without a checkpoint (``fresh_start``)."""
        return fresh_start(self.probe, self.args.topic, self.args.speed_dir, self.args.starting_offsets, self.log)

    def send_dead_letters(self, frame: pd.DataFrame, invalid: pd.DataFrame, batch_id: int) -> int:
        """The invalid messages of a micro-batch to the DLQ topic, but none that is there already; how many were.

        The ledger learns where each partition of the batch starts (``DeadLetterLedger.advance``).
        Blocks until every dead letter is acknowledged; told to stop first, it raises, so that the
        batch fails and Spark does not commit it: a restart runs it again.
        """
        for partition, first in frame.groupby("partition")["offset"].min().items():
            self.dead_letters.ledger.advance(int(partition), int(first))
        messages = [(Message(self.args.topic, int(partition), int(offset), int(timestamp), key, value), reason)
                    for partition, offset, timestamp, key, value, reason in
                    zip(invalid["partition"], invalid["offset"], invalid["kafka_timestamp_ms"], invalid["key"],
                        invalid["value"], invalid["reason"])]
        sent = self.dead_letters.send(messages)
        if sent is None or not self.dead_letters.delivered(sent):
            raise RuntimeError(f"stopped before the dead letters of batch {batch_id} were delivered to "
                               f"{self.args.dlq_topic}; the batch is run again on restart")
        return len(messages) - len(sent)

    def count(self, frame: pd.DataFrame, rows: pd.DataFrame, invalid: pd.DataFrame, already_sent: int,
              seconds: float, batch_id: int) -> None:
        """A micro-batch in the statistics, and its line in the log."""
        self.batches, self.busy_s = self.batches + 1, self.busy_s + seconds
        self.positions.update(next_offsets(zip(frame["partition"], frame["offset"])))
        self.stats.count_batch(len(frame), rows, list(invalid["reason"]), already_sent)
        self.lag = self.measure_lag()
        self.log.info(speed_core.batch_line(batch_id, len(frame), len(rows), len(invalid), seconds, self.status()))

    # --- lag, status, running and stopping ------------------------------------------------------------

    def measure_lag(self) -> dict[int, int | None]:
        """Per partition: messages on the broker not yet processed (None: the broker did not answer)."""
        try:
            partitions = self.probe.partitions_for_topic(self.args.topic) or set()
            tps = [TopicPartition(self.args.topic, p) for p in sorted(partitions)]
            ends = self.probe.end_offsets(tps) if tps else {}
        except Exception as error:  # noqa: BLE001 -- a status figure must never stop the stream
            self.log.warning("cannot read the end offsets (%r)", error)
            return dict.fromkeys(self.positions, None)
        begins = self.probe.beginning_offsets(tps) if tps else {}
        return {tp.partition: max(ends[tp] - self.positions.get(tp.partition, begins[tp]), 0) for tp in tps}

    def status(self) -> SpeedStatus:
        spark = {"master": self.spark.sparkContext.master, "batches": self.batches, "busy_s": round(self.busy_s, 3),
                 "checkpoint": str(self.args.checkpoint_dir)}
        return self.stats.status("stopped" if self.stopping else "running", "spark", self.positions, self.lag,
                                 self.models.model.version, spark)

    def publish_status(self, force: bool = False) -> None:
        if force or self.stats.status_due():
            if not self.lag:
                self.lag = self.measure_lag()
            self.stats.publish(self.args.speed_dir, self.status())

    def failed(self) -> Exception | None:
        for query in self.queries:
            if not query.isActive and query.exception() is not None:
                return query.exception()
        return None

    def idle(self) -> bool:
        """Quiet for ``--stop-when-idle`` seconds with nothing left on the broker, windows included."""
        quiet = time.monotonic() - self.stats.last_activity >= self.args.stop_when_idle
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
                self.log.info("%d batches done (--max-batches): stopping", self.batches)
                break
            if self.args.stop_when_idle is not None and time.monotonic() - self.stats.last_status < 0.3:
                self.lag = self.measure_lag()
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
        self.lag = self.measure_lag()

    def stop(self) -> None:
        """Stop the queries (an unfinished batch is re-run on restart), publish the last status, summarise."""
        self.stopping = True
        for query in self.queries:
            query.stop()
        self.publish_status(force=True)
        self.log.info(self.stats.summary(micro_batches=self.batches))
        self.dead_letters.close()
        self.probe.close()
