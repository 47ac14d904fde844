"""The speed layer on Spark Structured Streaming: the same contract as kafka_consumer.py, on Spark.

``kafka_consumer.py`` is one Python process; this is the same speed layer as
a Spark job, which runs unchanged on ``local[*]`` or on a cluster
(``--master spark://host:7077`` or ``SPARK_MASTER``). It reads ``taxi-trips``
and writes the *same speed view* (``periscope.speed_view``), so the
dashboard and the Lambda merge take either speed layer's output. Both run the
same speed-layer core (``periscope.speed_core``); they differ in how they
consume and where the work runs. Two streaming queries run side by side:

1. **speed**, the speed layer's steps per micro-batch: **read Kafka**
   (Spark's Kafka source, ``spark-sql-kafka-0-10``: ``make spark-fetch``),
   **validate and predict** on the executors in one pass (a small batch, as
   at a steady rate, on the driver), then on the driver,
   with the rows as Arrow (never pandas), **dead-letter** the invalid
   messages and **write the speed files** (``foreachBatch``); Spark commits
   the batch in its checkpoint.
2. **windows**: the speed view's trips (its files, as they appear) per vendor
   in 5-minute event-time windows behind a ``--lateness`` watermark, a
   temporary view for SQL while the job runs.

Exactly once, across ``kill -9``: in the speed view, because Spark records a
batch's offsets in the checkpoint (``--checkpoint-dir``) before running it
and a re-run batch rewrites the same files (named by offset range); on the
dead-letter topic, because the topic read back says which dead letters are
there already (``dead_letter``). A fresh checkpoint starts after the speed
view's last files, or at ``--starting-offsets`` when it is empty. Data loss
is an error, not a skip: if Kafka no longer has offsets the checkpoint needs,
the query stops and says what to do (``failOnDataLoss=true``).
Machinery (the executors' pass, the broadcast model, the Arrow speed files,
the status file, lag from Spark's progress, the run loop) is in
``periscope/spark_speed.py``; its hot-path settings in ``periscope/speed_tuning.py``.

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
import functools
import logging
import re
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from periscope import cli, config, speed_core
from periscope import speed_tuning as tuning
from periscope.model import ModelMismatchError, ModelNotFoundError, load_model
from periscope.spark_session import SparkSetupError, get_session
from periscope.spark_speed import (SPEED_ROWS_SCHEMA, SPEED_VIEW_SCHEMA, BroadcastModel, SparkSpeedLayer,
                                   batch_offsets, check_topics, write_speed_tables)
from periscope.sql_prompt import sql_prompt
from periscope.stream import BrokerUnavailable, wait_for_broker

log = logging.getLogger("spark_streaming")

COMPONENT = "spark_streaming"
WINDOWS_VIEW = "trips_by_vendor_5min"
DEFAULT_LATENESS = "10 minutes"
DEFAULT_WINDOW = "5 minutes"
DEFAULT_CHECKPOINT_DIR = config.STATE_DIR / "spark" / "checkpoint"
_INTERVAL = re.compile(r"^\s*\d+\s+(millisecond|second|minute|hour|day)s?\s*$")


# --- the steps ------------------------------------------------------------------------------------


def read_kafka(spark: SparkSession, args: argparse.Namespace, starting: str) -> DataFrame:
    """1. The trips topic as a stream, through Spark's Kafka source, from ``startingOffsets`` ``starting``.

    ``failOnDataLoss``: a gap in the offsets (retention, a re-created topic) fails the query.
    """
    return kafka_messages(
        spark.readStream.format("kafka").option("kafka.bootstrap.servers", args.bootstrap)
        .option("subscribe", args.topic).option("startingOffsets", starting)
        .option("maxOffsetsPerTrigger", str(args.max_offsets_per_trigger))
        .option("failOnDataLoss", "true").load())


def kafka_messages(source: DataFrame) -> DataFrame:
    """Spark's Kafka rows -> the fields ``validate_batch`` reads, the Kafka timestamp as ms (exact: it is ms)."""
    return source.select("key", "value", "topic", "partition", "offset",
                         F.unix_millis("timestamp").alias("timestamp_ms"))


def validate_and_predict(messages: DataFrame, models: BroadcastModel, expected_rows: int | None) -> pa.Table:
    """2-3. Each message checked by the core's ``validate_frame``, and each valid trip's seconds predicted by
    the broadcast model, in one ``mapInArrow`` pass on the executors: the plain consumer's verdicts, reason
    codes and predictions; the raw bytes and the reason of an invalid message. The rows as Arrow, on the
    driver.

    A micro-batch expected to be small (``speed_tuning.DRIVER_BATCH_ROWS``) comes to the driver as it is
    and the same function runs there: its rows come to the driver anyway.
    """
    if expected_rows is not None and expected_rows <= tuning.DRIVER_BATCH_ROWS:
        return models.on_driver(messages.toArrow())
    return messages.mapInArrow(models.speed_rows, SPEED_ROWS_SCHEMA).toArrow()


def dead_letter(layer: SparkSpeedLayer, rows: pa.Table, offsets: dict[int, tuple[int, int]],
                batch_id: int) -> tuple[list[str], int]:
    """2. (driver) Invalid messages to ``taxi-trips-dlq``, acknowledged; their reasons, and how many were there
    already.

    Exactly once, across ``kill -9``, a deleted checkpoint and the other speed layer: the
    dead-letter topic is read back (``periscope.stream.DeadLetterLedger``) before the first dead
    letter of a partition, and one whose source offset is on it already is not sent again. Sent
    with kafka-python from the driver, not Spark's Kafka sink, whose retried tasks re-send.
    """
    return layer.send_dead_letters(rows, offsets, batch_id)


def write_speed_batch(layer: SparkSpeedLayer, messages: DataFrame, batch_id: int) -> None:
    """4. (driver, ``foreachBatch``) A micro-batch through the steps, and its speed files: idempotent.

    Spark recorded the batch's offsets in the checkpoint before calling this and commits it when
    it returns: a crash in between runs it again with the same offsets, which rewrites the same
    files (a file's name is its offset range) and sends no dead letter twice.
    """
    began = time.perf_counter()
    model = layer.models.current()
    # 2-3. validate and predict (on the executors, unless the batch is small); the rows as Arrow, not pandas
    rows = validate_and_predict(messages, layer.models, layer.next_batch_rows())
    offsets = batch_offsets(rows)
    # 2. dead letters first: a speed file moves the resume point past every message of its batch
    reasons, already_sent = dead_letter(layer, rows, offsets, batch_id)
    # 4. the speed files: one per Kafka partition of the batch
    written = write_speed_tables(layer.args.speed_dir, rows.filter(pc.is_null(rows["reason"])), model.version)
    layer.count(offsets, len(rows), written, reasons, already_sent, time.perf_counter() - began, batch_id)


def read_speed_view(spark: SparkSession, speed_dir: Path) -> DataFrame:
    """5. The speed view's trips as a stream (Spark's file source): each speed file once, as it appears.

    Validated and predicted already, so the windows cost neither a second read of the topic nor
    a second validation; at start they are those of the trips in the speed view, i.e. since the
    batch layer's last watermark. A file the batch layer prunes meanwhile is skipped.
    """
    speed_dir.mkdir(parents=True, exist_ok=True)
    return (spark.readStream.schema(SPEED_VIEW_SCHEMA).option("ignoreMissingFiles", "true")
            .parquet(str(speed_dir / "p[0-9][0-9][0-9]" / "*.parquet")))


def vendor_windows(trips: DataFrame, lateness: str, window: str) -> DataFrame:
    """6. Valid trips per event-time window and vendor; the watermark lets Spark close windows.

    A trip whose pickup is older than the watermark when it arrives is left out of the windows
    only: it is in the speed view, and the batch layer is where late data is made right.
    """
    return (trips.withColumn("pickup_time", F.timestamp_millis("pickup_datetime"))
            .withWatermark("pickup_time", lateness)
            .groupBy(F.window("pickup_time", window), "vendor_id")
            .agg(F.count("*").alias("trips"), F.avg("trip_duration").alias("avg_duration_s"),
                 F.max("trip_duration").alias("max_duration_s"))
            .select(F.col("window.start").alias("window_start"), F.col("window.end").alias("window_end"),
                    "vendor_id", "trips", "avg_duration_s", "max_duration_s"))


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
    parser.add_argument("--no-windows", action="store_true", help="run only the speed query (no windowed views)")
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
    layer = SparkSpeedLayer(spark, args, COMPONENT, log)
    # The stream of messages from Kafka, from the checkpoint or after the speed view's last files
    messages = read_kafka(spark, args, layer.starting_offsets())
    # Validate, predict, dead-letter and write the speed files, per micro-batch
    layer.queries.append(
        messages.writeStream.queryName("speed").foreachBatch(functools.partial(write_speed_batch, layer))
        .option("checkpointLocation", str(args.checkpoint_dir / "speed"))
        .trigger(processingTime=args.trigger).start())
    # Count the speed view's trips per vendor in event-time windows, a temporary view
    if not args.no_windows:
        windows = vendor_windows(read_speed_view(spark, args.speed_dir), args.lateness, args.window)
        layer.queries.append(
            windows.writeStream.queryName(WINDOWS_VIEW).format("memory").outputMode("append")
            .option("checkpointLocation", str(layer.windows_checkpoint))
            .trigger(processingTime=args.trigger).start())
    return layer


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    speed_core.log_to_stdout()
    logging.getLogger("py4j").setLevel(logging.WARNING)
    try:
        # What the job needs before Spark starts: the model, the broker, the topics
        load_model(args.model_dir)
        wait_for_broker(args.bootstrap, f"stream {args.topic} into Spark", args.broker_timeout, log)
        check_topics(args.bootstrap, (args.topic, args.dlq_topic))
        spark = get_session(args.master, "periscope-speed-layer")
    except (ModelNotFoundError, ModelMismatchError, BrokerUnavailable, SparkSetupError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    # Start the speed and windows queries
    layer = start(spark, args)
    log.info("Spark speed layer on %s: %s -> %s (checkpoint %s, model %s, dead letters to %s, windows %s)",
             spark.sparkContext.master, args.topic, args.speed_dir, args.checkpoint_dir, layer.models.model.version,
             args.dlq_topic, "off" if args.no_windows else f"in view {WINDOWS_VIEW}")
    # Wait: status every second; until Ctrl-C, SIGTERM, idle, --max-batches, the prompt's end, or a failure
    with layer.stopped_by_sigterm():
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
