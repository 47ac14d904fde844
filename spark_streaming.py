"""The speed layer on Spark Structured Streaming: the same contract as kafka_consumer.py, on Spark.

``kafka_consumer.py`` is one Python process; this is the same speed layer as
a Spark job, which runs unchanged on ``local[*]`` or on a cluster
(``--master spark://host:7077`` or ``SPARK_MASTER``). It reads ``taxi-trips``
and writes the *same speed view* (``periscope.speed_view``), so the
dashboard and the Lambda merge take either speed layer's output. Both run the
same speed-layer core (``periscope.speed_core``); they differ in how they
consume and where the work runs. Two streaming queries run side by side:

1. **speed** (``foreachBatch``), the speed layer's steps, per micro-batch:
   **poll** - Spark's Kafka source (``format("kafka")``,
   ``spark-sql-kafka-0-10``; ``make spark-fetch`` puts it in place) hands
   over the next offset range; **validate** - on the executors, inside
   ``mapInPandas``, by the core's ``validate_batch`` (the same verdicts and
   reason codes as the plain consumer); **predict** - on the executors, a
   vectorised pandas UDF (``periscope.features`` + the model from
   ``--model-dir``, broadcast to them); then on the driver, the micro-batch
   collected: **dead-letter** - invalid messages go to ``taxi-trips-dlq``
   with the reason in their headers (``periscope.stream.dlq_headers``),
   unless they are there already;
   **write the speed files** - one per Kafka partition, named by offset
   range; **commit** - Spark marks the batch done in the checkpoint.
2. **windows** (memory sink): trips counted in 5-minute event-time windows
   per vendor, with a watermark of ``--lateness`` behind the latest pickup
   seen. A window is emitted once the watermark passes its end; a trip whose
   pickup is older than the watermark when it arrives is *dropped from these
   windows only* - it is still in the speed view (every valid trip is) and
   in the batch layer, which is where late data is made right.

Exactly once in the speed view, across crashes: Spark writes each batch's
offset range to the checkpoint (``--checkpoint-dir``) before running it and
marks it done after. A restarted job re-runs an unfinished batch with the same
offsets, so it rewrites the same speed files (a file's name is its offset
range: rewriting replaces it) and never writes a trip twice. A fresh
checkpoint starts at the earliest offset (``--starting-offsets``), or after
the last speed file of each partition when the speed view already holds some.

Exactly once on the dead-letter topic, across crashes and fresh checkpoints:
dead letters are sent by the driver with kafka-python and acknowledged
(``acks=all``) before the batch's speed files are written, as the plain
consumer does, with the same ``DeadLetterSender``. The topic is its own
record (``periscope.stream.DeadLetterLedger``): before the first dead letter
of a partition goes out it is read back, and a message whose source offset
is on it already (sent before a ``kill -9``, before the checkpoint was
deleted, or by the plain consumer) is not sent again. Each micro-batch
tells the ledger where its partitions start (``advance``): Spark runs a
batch only once the one before is committed, so what is below is never
read again and is forgotten.

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
import re
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pandas as pd
from kafka import KafkaConsumer, TopicPartition
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.functions import pandas_udf
from pyspark.sql.streaming import StreamingQuery
from pyspark.sql.types import (BinaryType, DoubleType, IntegerType, LongType, StringType, StructField, StructType,
                               TimestampType)

from periscope import cli, config, speed_core, speed_view
from periscope import speed_tuning as tuning
from periscope.consumer_group import DeadLetterSender, Warnings
from periscope.model import ModelMismatchError, ModelNotFoundError, TripDurationModel, load_model
from periscope.schema import FIELDS
from periscope.spark_session import SparkSetupError, get_session, trip_struct
from periscope.speed_core import Message, ModelWatcher, SpeedStatistics, next_offsets, write_speed_files
from periscope.speed_view import SpeedStatus
from periscope.sql_prompt import sql_prompt
from periscope.stream import BrokerUnavailable, wait_for_broker

log = logging.getLogger("spark_streaming")

COMPONENT = "spark_streaming"
WINDOWS_VIEW = "trips_by_vendor_5min"
DEFAULT_LATENESS = "10 minutes"
DEFAULT_WINDOW = "5 minutes"
DEFAULT_CHECKPOINT_DIR = config.STATE_DIR / "spark" / "checkpoint"
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
"""``speed_core.VALIDATED_COLUMNS`` in Spark types: the trip if valid, else the raw bytes and the reason."""


# --- the queries: what runs where ------------------------------------------------------------------


def kafka_messages(source: DataFrame) -> DataFrame:
    """Spark's Kafka rows -> the fields ``validate_batch`` reads, the Kafka timestamp as ms (exact: it is ms)."""
    return source.select("key", "value", "topic", "partition", "offset",
                         F.unix_millis("timestamp").alias("timestamp_ms"))


def prediction_udf(model_broadcast: Any) -> Any:
    """A vectorised (pandas) UDF: trips as a struct column in, predicted seconds out, with a broadcast model."""

    @pandas_udf(DoubleType())
    def predicted_duration_s(trips: pd.DataFrame) -> pd.Series:
        return speed_core.predict_frame(model_broadcast.value, trips)

    return predicted_duration_s


def validate_and_predict(messages: DataFrame, udf: Any) -> DataFrame:
    """Validate (``mapInPandas``) and predict (the pandas UDF): the executors' part of a micro-batch."""
    return (messages.mapInPandas(speed_core.validate_frames, VALIDATED_SCHEMA)
            .withColumn("predicted_duration_s", udf(F.struct(*FIELDS))))


def valid_trips(messages: DataFrame) -> DataFrame:
    """The valid trips of a message stream, with their event time as a Spark timestamp (for windows)."""
    return (messages.mapInPandas(speed_core.validate_frames, VALIDATED_SCHEMA).where(F.col("reason").isNull())
            .withColumn("pickup_time", F.timestamp_millis("pickup_datetime")))


def vendor_windows(trips: DataFrame, lateness: str, window: str) -> DataFrame:
    """Trips per event-time window and vendor; the watermark lets Spark close windows and drop late trips."""
    return (trips.withWatermark("pickup_time", lateness)
            .groupBy(F.window("pickup_time", window), "vendor_id")
            .agg(F.count("*").alias("trips"), F.avg("trip_duration").alias("avg_duration_s"),
                 F.max("trip_duration").alias("max_duration_s"))
            .select(F.col("window.start").alias("window_start"), F.col("window.end").alias("window_end"),
                    "vendor_id", "trips", "avg_duration_s", "max_duration_s"))


class BroadcastModel(ModelWatcher):
    """The live model, broadcast to the executors; a promoted one is broadcast anew and the old copy dropped."""

    def __init__(self, spark: SparkSession, model_dir: Path):
        self.spark = spark
        super().__init__(model_dir, logger=log)
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


# --- the driver ------------------------------------------------------------------------------------


class SparkSpeedLayer:
    """The two streaming queries, the ``foreachBatch`` sink of the speed view, and the live statistics."""

    def __init__(self, spark: SparkSession, args: argparse.Namespace):
        self.spark, self.args = spark, args
        self.models = BroadcastModel(spark, args.model_dir)
        self.dead_letters = DeadLetterSender(args.bootstrap, args.dlq_topic, args.topic, COMPONENT, args.consumer_id,
                                             lambda: self.stopping, log, Warnings(log), reconnect_backoff_max_ms=1000)
        self.probe = KafkaConsumer(bootstrap_servers=args.bootstrap, enable_auto_commit=False,
                                   reconnect_backoff_max_ms=1000)
        self.queries: list[StreamingQuery] = []
        self.windows_checkpoint = Path(tempfile.mkdtemp(prefix="periscope-spark-windows-"))
        self.stats = SpeedStatistics(args.consumer_id, f"spark:{args.checkpoint_dir}", args.topic)
        self.positions: dict[int, int] = {}
        self.lag: dict[int, int | None] = {}
        self.batches, self.busy_s = 0, 0.0
        self.stopping = False

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
        self.queries.append(
            self.messages(self.starting_offsets()).writeStream.queryName("speed").foreachBatch(self.process_batch)
            .option("checkpointLocation", str(self.args.checkpoint_dir / "speed"))
            .trigger(processingTime=self.args.trigger).start())
        if not self.args.no_windows:
            windows = vendor_windows(valid_trips(self.messages("earliest")), self.args.lateness, self.args.window)
            self.queries.append(
                windows.writeStream.queryName(WINDOWS_VIEW).format("memory").outputMode("append")
                .option("checkpointLocation", str(self.windows_checkpoint))
                .trigger(processingTime=self.args.trigger).start())

    def process_batch(self, messages: DataFrame, batch_id: int) -> None:
        """One micro-batch of the speed query: idempotent, so a replayed ``batch_id`` rewrites the same files.

        Spark recorded the batch's offsets in the checkpoint before calling this (1. poll) and marks
        it done when it returns (5. commit): a crash in between re-runs it with the same offsets.
        """
        began = time.perf_counter()
        model = self.models.current()
        # 2-3. validate and predict on the executors; the micro-batch comes back to the driver
        frame = validate_and_predict(messages, self.models.udf).toPandas()
        invalid = frame[frame["reason"].notna()]
        valid = frame[frame["reason"].isna()].sort_values(["partition", "offset"])
        # 2. dead letters, acknowledged before the files; exactly once: none that is on the topic already
        already_sent = self.send_dead_letters(frame, invalid, batch_id)
        # 4. the speed files: a replayed batch rewrites the same ones (named by offset range)
        columns = speed_core.frame_columns(valid, speed_core.POSITION_COLUMNS + FIELDS)
        rows = write_speed_files(self.args.speed_dir, columns, valid["predicted_duration_s"].to_numpy(float),
                                 model.version)
        self.count(frame, rows, invalid, already_sent, time.perf_counter() - began, batch_id)

    def send_dead_letters(self, frame: pd.DataFrame, invalid: pd.DataFrame, batch_id: int) -> int:
        """Every invalid message not on the DLQ topic yet, sent and acknowledged; how many were there already.

        Sent from the driver with kafka-python, not with Spark's Kafka sink
        (``write.format("kafka")``): the batch is on the driver anyway (the
        speed files are written there) and dead letters are few; here the
        ledger is asked first and every acknowledgement is awaited before the
        files are written, whereas the sink sends from tasks, so a retried task
        re-sends its dead letters even when nothing crashed. Told to stop
        before they are delivered, the batch fails: Spark does not commit it,
        and a restart runs it again.
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
        """The batch in the statistics, and its line in the log."""
        self.batches, self.busy_s = self.batches + 1, self.busy_s + seconds
        self.positions.update(next_offsets(zip(frame["partition"], frame["offset"])))
        self.stats.count_batch(len(frame), rows, list(invalid["reason"]), already_sent)
        self.lag = self.measure_lag()
        log.info(speed_core.batch_line(batch_id, len(frame), len(rows), len(invalid), seconds, self.status()))

    # --- lag, status, running and stopping ------------------------------------------------------------

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
                log.info("%d batches done (--max-batches): stopping", self.batches)
                break
            if self.args.stop_when_idle is not None and time.monotonic() - self.stats.last_status < 0.3:
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
        log.info(self.stats.summary(micro_batches=self.batches))
        self.dead_letters.close()
        self.probe.close()


# --- command line ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Speed layer on Spark Structured Streaming: validate, predict, write the speed view; "
                    "windowed aggregates as temporary views.",
        formatter_class=cli.HelpFormatter)
    parser.add_argument("--master", default=config.SPARK_MASTER,
                        help="Spark master: local[*] or a cluster URL like spark://host:7077 (env SPARK_MASTER)")
    speed_core.add_kafka_arguments(parser)
    speed_core.add_output_arguments(parser)
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
    parser.add_argument("--trigger", default=tuning.TRIGGER, help="start a micro-batch at most this often")
    parser.add_argument("--max-offsets-per-trigger", type=int, default=tuning.MAX_OFFSETS_PER_TRIGGER,
                        help="messages per micro-batch at most")
    parser.add_argument("--no-windows", action="store_true",
                        help="run only the speed query (halves the work; no windowed views)")
    parser.add_argument("--sql", action="store_true", help="an SQL prompt over the temporary views while it runs; "
                                                           "quit, exit or Ctrl-D ends it and stops the speed layer")
    parser.add_argument("--max-batches", type=int, metavar="N", help="exit after N micro-batches with data")
    speed_core.add_run_arguments(parser, "spark", "name of the status file in <speed dir>/_status")
    args = parser.parse_args(argv)
    for flag in ("lateness", "window", "trigger"):
        if not _INTERVAL.match(getattr(args, flag)):
            parser.error(f"--{flag} must be a number and a unit, like '10 minutes' or '30 seconds', "
                         f"got {getattr(args, flag)!r}")
    if args.max_offsets_per_trigger < 1:
        parser.error(f"--max-offsets-per-trigger must be at least 1, got {args.max_offsets_per_trigger}")
    if args.max_batches is not None and args.max_batches < 1:
        parser.error(f"--max-batches must be at least 1, got {args.max_batches}")
    speed_core.check_run_arguments(parser, args)
    return args


def start(spark: SparkSession, args: argparse.Namespace) -> SparkSpeedLayer:
    """Start both queries on ``spark`` and return the running layer (tests and notebooks call this)."""
    args.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    layer = SparkSpeedLayer(spark, args)
    layer.start()
    return layer


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    speed_core.log_to_stdout()
    logging.getLogger("py4j").setLevel(logging.WARNING)
    try:
        load_model(args.model_dir)
        wait_for_broker(args.bootstrap, f"stream {args.topic} into Spark", args.broker_timeout, log)
        topics = set(KafkaConsumer(bootstrap_servers=args.bootstrap).topics())
        missing = [topic for topic in (args.topic, args.dlq_topic) if topic not in topics]
        if missing:
            raise BrokerUnavailable(f"topic(s) {', '.join(missing)} do not exist at {args.bootstrap}; create them "
                                    "with `python -m periscope.kafka_local create-topics --bootstrap "
                                    f"{args.bootstrap}`")
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
            sql_prompt(spark, f"SELECT * FROM {WINDOWS_VIEW} ORDER BY window_start DESC LIMIT 10")
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
