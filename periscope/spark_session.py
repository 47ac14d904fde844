"""Spark for Periscope: one way to build the session, the trip schema in Spark, and two data sources.

Both Spark paths (``spark_streaming.py``, the speed layer, and
``batch_processor.py --engine spark``, the batch layer) start Spark through
``get_session``: on ``config.SPARK_MASTER`` (``local[*]`` unless the
environment variable ``SPARK_MASTER`` names a cluster such as
``spark://host:7077``), with small defaults for a two-core machine, quiet
logs, and the project's own code shipped to the executors, so the same call
works on a laptop and on a cluster.

Spark reads Kafka and the Avro master data here through two *Python data
sources* (Spark 4's ``pyspark.sql.datasource`` API), registered on the session:

``periscope_kafka`` (streaming)
    the ``taxi-trips`` topic, one Spark partition per Kafka partition and
    micro-batch, read with kafka-python. Offsets are plain JSON
    (``{"0": 1200, "1": 1187, "2": 1213}``: the next offset to read per
    partition) that Spark writes to the query's checkpoint before each batch,
    so a restarted query replays exactly the batch it had not committed.
    Options: ``bootstrap``, ``topic``, ``startingOffsets`` (``earliest``,
    ``latest`` or such a JSON), ``maxOffsetsPerTrigger``.
``periscope_avro`` (batch)
    the master dataset, one Spark partition per Avro file, decoded by the same
    ``storage.iter_avro_columns`` the python engine uses. The ``load`` path is
    the master directory; the option ``files`` (a JSON list of paths) fixes
    the list and its order, as ``file_index`` numbers them.

Why not Spark's own ``spark-sql-kafka-0-10`` and ``spark-avro`` jars: they must
match the Spark that runs them (4.3.0 here, from pyspark), and Maven Central,
as this project reaches it, has neither at 4.3.0; ``spark-token-provider-kafka``,
which the Kafka connector needs at run time, is missing at every version.
Older connector jars on a newer Spark are a gamble with Spark internals. The
Python sources need nothing beyond the project's requirements, on any master;
see docs/SPARK.md. ``python -m periscope.spark_session fetch`` (what
``make spark-fetch`` runs) therefore fetches nothing: it checks that Java and
pyspark are usable and says so.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from pyspark.sql import SparkSession
from pyspark.sql.datasource import DataSource, DataSourceReader, DataSourceStreamReader, InputPartition
from pyspark.sql.streaming.datasource import ReadAllAvailable, ReadLimit, ReadMaxRows
from pyspark.sql.types import (BinaryType, BooleanType, DataType, DoubleType, IntegerType, LongType, StringType,
                               StructField, StructType)

from periscope import config
from periscope.schema import FIELDS, FLOAT_FIELDS, INT_FIELDS, TIME_FIELDS

PROJECT_ROOT = config.PROJECT_ROOT
SHIPPED_SCRIPTS = ("spark_streaming.py", "kafka_consumer.py", "batch_processor.py")
"""Top-level scripts whose functions Spark may run on executors (shipped with ``periscope/``)."""

SPARK_DEFAULTS: dict[str, str] = {
    "spark.sql.shuffle.partitions": "4",
    "spark.default.parallelism": "4",
    "spark.driver.memory": "1g",
    "spark.executor.memory": "1g",
    "spark.sql.session.timeZone": "UTC",
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    "spark.sql.execution.arrow.maxRecordsPerBatch": "20000",
    "spark.ui.showConsoleProgress": "false",
    "spark.ui.enabled": "false",
    "spark.sql.streaming.noDataMicroBatches.enabled": "true",
}
"""Small for a shared 2-core machine: 4 shuffle partitions instead of 200, 1 GB heaps, no UI.
The session time zone is UTC so that trip times (New York wall clock with no zone attached,
see ``periscope.schema``) are shown as they are. Any of these can be overridden with
``get_session(conf={...})`` or spark-defaults.conf on a cluster."""

KAFKA_SOURCE, AVRO_SOURCE = "periscope_kafka", "periscope_avro"


class SparkSetupError(RuntimeError):
    """Spark cannot start here; the message says what to install or set."""


# --- the one trip schema, in Spark types ------------------------------------------------------------


def spark_type(field: str) -> DataType:
    """Spark type of a trip field in record form, read off ``periscope.schema``'s field groups."""
    if field in INT_FIELDS or field in TIME_FIELDS:
        return LongType()
    if field in FLOAT_FIELDS:
        return DoubleType()
    if field == "store_and_fwd_flag":
        return BooleanType()
    return StringType()


def trip_struct(fields: Sequence[str] = FIELDS) -> StructType:
    """The trip as a Spark row (record form: times as ms, the flag as boolean): derived, never hand-written.

    Integer fields are 64-bit, as in the speed view's Parquet files.
    """
    return StructType([StructField(name, spark_type(name), nullable=True) for name in fields])


KAFKA_SCHEMA = StructType([
    StructField("key", BinaryType()), StructField("value", BinaryType()), StructField("topic", StringType()),
    StructField("partition", IntegerType()), StructField("offset", LongType()),
    StructField("timestamp_ms", LongType()),
])
"""What ``periscope_kafka`` gives per message: Spark's Kafka source columns, the time as ms."""

AVRO_COLUMNS: tuple[str, ...] = tuple(name for name in FIELDS if name != "id")
AVRO_SCHEMA = StructType(trip_struct(AVRO_COLUMNS).fields + [StructField("file_index", IntegerType())])
"""What ``periscope_avro`` gives: the trip fields the views need (``storage.iter_avro_columns``) and
the index of the master file in ``storage.master_files`` order."""


# --- periscope_kafka: the trips topic as a streaming source ------------------------------------------


class KafkaRange(InputPartition):
    """One Kafka partition's offsets ``[start, end)`` in one micro-batch."""

    def __init__(self, partition: int, start: int, end: int):
        super().__init__((partition, start, end))
        self.partition, self.start, self.end = partition, start, end


def parse_starting_offsets(text: str) -> str | dict[str, int]:
    """``earliest``, ``latest`` or a JSON object partition -> next offset; ValueError says what is wrong."""
    if text in ("earliest", "latest"):
        return text
    try:
        offsets = json.loads(text)
        return {str(int(partition)): int(offset) for partition, offset in offsets.items()}
    except (ValueError, AttributeError, TypeError):
        raise ValueError(f"startingOffsets must be 'earliest', 'latest' or JSON like {{\"0\": 42}}, got {text!r}") \
            from None


def limit_offsets(start: Mapping[str, int], latest: Mapping[str, int], max_rows: int | None) -> dict[str, int]:
    """The end offsets of the next batch: everything up to ``latest``, or ``max_rows`` shared fairly.

    Each partition gets an equal share of the budget; what a short partition
    leaves unused goes to the others, so a batch is never smaller than needed.
    """
    end = {partition: max(int(latest[partition]), int(start.get(partition, 0))) for partition in latest}
    if max_rows is None:
        return end
    position = {partition: int(start.get(partition, 0)) for partition in latest}
    budget = max_rows
    waiting = sorted(p for p in latest if end[p] > position[p])
    while budget > 0 and waiting:
        share = max(budget // len(waiting), 1)
        for partition in list(waiting):
            take = min(share, end[partition] - position[partition], budget)
            position[partition] += take
            budget -= take
            if position[partition] >= end[partition]:
                waiting.remove(partition)
            if budget == 0:
                break
    return position


class KafkaStreamReader(DataSourceStreamReader):
    """Offsets from the broker on the driver side; messages read by the tasks, one per Kafka partition."""

    def __init__(self, options: Mapping[str, str]):
        self.bootstrap, self.topic = options["bootstrap"], options["topic"]
        self.starting = parse_starting_offsets(options.get("startingOffsets", "earliest"))
        max_rows = options.get("maxOffsetsPerTrigger")
        self.max_rows = int(max_rows) if max_rows else None
        self.consumer = None

    def _offsets(self) -> tuple[dict[str, int], dict[str, int]]:
        """Beginning and end offset of every partition of the topic, as the broker says now."""
        from kafka import KafkaConsumer, TopicPartition

        if self.consumer is None:
            self.consumer = KafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False,
                                          request_timeout_ms=30_000, reconnect_backoff_max_ms=1000)
        partitions = self.consumer.partitions_for_topic(self.topic)
        if not partitions:
            raise RuntimeError(f"topic {self.topic!r} does not exist at {self.bootstrap}: create it with "
                               f"`python -m periscope.kafka_local create-topics --bootstrap {self.bootstrap}`")
        tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
        begin, end = self.consumer.beginning_offsets(tps), self.consumer.end_offsets(tps)
        return ({str(tp.partition): begin[tp] for tp in tps}, {str(tp.partition): end[tp] for tp in tps})

    def initialOffset(self) -> dict:
        begin, end = self._offsets()
        if self.starting == "earliest":
            return begin
        if self.starting == "latest":
            return end
        return {p: max(begin[p], min(self.starting.get(p, begin[p]), end[p])) for p in begin}

    def getDefaultReadLimit(self) -> ReadLimit:
        return ReadMaxRows(self.max_rows) if self.max_rows else ReadAllAvailable()

    def latestOffset(self, start: dict, limit: ReadLimit) -> dict:
        _, end = self._offsets()
        max_rows = limit.max_rows if isinstance(limit, ReadMaxRows) else None
        return limit_offsets(start, end, max_rows)

    def reportLatestOffset(self) -> dict | None:
        return self._offsets()[1]

    def partitions(self, start: dict, end: dict) -> Sequence[InputPartition]:
        return [KafkaRange(int(p), int(start.get(p, 0)), int(end[p]))
                for p in sorted(end, key=int) if int(end[p]) > int(start.get(p, 0))]

    def read(self, partition: KafkaRange) -> Iterator[Any]:
        """Every message of ``[start, end)`` of one partition, as Arrow batches (runs in a Spark task)."""
        import pyarrow as pa
        from kafka import KafkaConsumer, TopicPartition

        tp = TopicPartition(self.topic, partition.partition)
        consumer = KafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False,
                                 max_poll_records=10_000, fetch_max_bytes=64 << 20, reconnect_backoff_max_ms=1000)
        try:
            consumer.assign([tp])
            consumer.seek(tp, partition.start)
            while consumer.position(tp) < partition.end:
                messages = [m for m in consumer.poll(timeout_ms=1000).get(tp, []) if m.offset < partition.end]
                if messages:
                    yield pa.RecordBatch.from_pydict({
                        "key": [m.key for m in messages], "value": [m.value for m in messages],
                        "topic": [self.topic] * len(messages),
                        "partition": pa.array([partition.partition] * len(messages), pa.int32()),
                        "offset": pa.array([m.offset for m in messages], pa.int64()),
                        "timestamp_ms": pa.array([m.timestamp for m in messages], pa.int64()),
                    })
        finally:
            consumer.close()

    def commit(self, end: dict) -> None:
        """Nothing to do: the checkpoint holds the offsets, the speed files the results."""

    def stop(self) -> None:
        if self.consumer is not None:
            self.consumer.close()
            self.consumer = None


class KafkaTripsSource(DataSource):
    """``spark.readStream.format("periscope_kafka").option("bootstrap", ...).option("topic", ...).load()``."""

    @classmethod
    def name(cls) -> str:
        return KAFKA_SOURCE

    def schema(self) -> StructType:
        return KAFKA_SCHEMA

    def streamReader(self, schema: StructType) -> DataSourceStreamReader:
        for option in ("bootstrap", "topic"):
            if not self.options.get(option):
                raise ValueError(f"the {KAFKA_SOURCE} source needs .option({option!r}, ...)")
        return KafkaStreamReader(self.options)


# --- periscope_avro: the master dataset as a batch source --------------------------------------------


class MasterFile(InputPartition):
    def __init__(self, index: int, path: str):
        super().__init__((index, path))
        self.index, self.path = index, path


class MasterAvroReader(DataSourceReader):
    def __init__(self, master_dir: str, files: list[str] | None, chunk_rows: int):
        self.master_dir, self.files, self.chunk_rows = master_dir, files, chunk_rows

    def partitions(self) -> Sequence[InputPartition]:
        from periscope.storage import master_files

        files = self.files if self.files is not None else [str(p) for p in master_files(Path(self.master_dir))]
        return [MasterFile(index, path) for index, path in enumerate(files)]

    def read(self, partition: MasterFile) -> Iterator[Any]:
        """One master file, chunk by chunk, decoded exactly as the python engine decodes it."""
        import pyarrow as pa

        from periscope.storage import iter_avro_columns

        for columns in iter_avro_columns(Path(partition.path), self.chunk_rows):
            rows = len(columns["trip_duration"])
            arrays = {name: columns[name] for name in AVRO_COLUMNS}
            arrays["file_index"] = pa.array([partition.index] * rows, pa.int32())
            yield pa.RecordBatch.from_pydict(arrays, schema=arrow_schema(AVRO_SCHEMA))


def arrow_schema(struct: StructType) -> Any:
    """The Arrow schema of a flat Spark schema of the types used here."""
    import pyarrow as pa

    kinds = {LongType: pa.int64(), DoubleType: pa.float64(), BooleanType: pa.bool_(), IntegerType: pa.int32(),
             StringType: pa.string(), BinaryType: pa.binary()}
    return pa.schema([(field.name, kinds[type(field.dataType)]) for field in struct.fields])


class MasterAvroSource(DataSource):
    """``spark.read.format("periscope_avro").load(master_dir)``: every master file, in parallel."""

    @classmethod
    def name(cls) -> str:
        return AVRO_SOURCE

    def schema(self) -> StructType:
        return AVRO_SCHEMA

    def reader(self, schema: StructType) -> DataSourceReader:
        path = self.options.get("path")
        if not path:
            raise ValueError(f"the {AVRO_SOURCE} source needs the master directory: .load('data/master')")
        files = json.loads(self.options["files"]) if self.options.get("files") else None
        return MasterAvroReader(path, files, int(self.options.get("chunkRows", 100_000)))


# --- the session ---------------------------------------------------------------------------------------


def java_problem() -> str | None:
    """What is wrong with Java for Spark 4 (17 or newer), or None."""
    java = Path(os.environ["JAVA_HOME"]) / "bin" / "java" if os.environ.get("JAVA_HOME") else shutil.which("java")
    if java is None or not Path(java).exists():
        return ("Spark needs Java 17 or newer, and no `java` is on PATH (Debian/Ubuntu: apt-get install "
                "openjdk-17-jre-headless; macOS: brew install openjdk@17), or set JAVA_HOME")
    result = subprocess.run([str(java), "-version"], capture_output=True, text=True)
    text = result.stderr + result.stdout
    try:
        major = int(text.split('"')[1].split(".")[0])
    except (IndexError, ValueError):
        return None
    if major < 17:
        return f"Spark 4 needs Java 17 or newer; {java} is Java {major}. Install 17+ or point JAVA_HOME at one"
    return None


def project_zip(directory: Path) -> Path:
    """``periscope/`` and the scripts Spark runs functions of, zipped for ``addPyFile`` (executors import them)."""
    target = directory / "periscope-code.zip"
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted((PROJECT_ROOT / "periscope").rglob("*.py")):
            archive.write(path, path.relative_to(PROJECT_ROOT).as_posix())
        for name in SHIPPED_SCRIPTS:
            if (PROJECT_ROOT / name).exists():
                archive.write(PROJECT_ROOT / name, name)
    return target


def get_session(master: str | None = None, app_name: str = "periscope",
                conf: Mapping[str, str] | None = None) -> SparkSession:
    """The Spark session of this process (created once): on ``master``, with Periscope's sources and code.

    On a cluster, the executors need the project's Python requirements (the
    same ``requirements.txt``); the project's own code is shipped with the job.
    """
    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    problem = java_problem()
    if problem:
        raise SparkSetupError(problem)
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    paths = [str(PROJECT_ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))  # local mode: workers import periscope
    master = master or config.SPARK_MASTER
    builder = SparkSession.builder.master(master).appName(app_name)
    if master.startswith("local"):
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
        builder = builder.config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
    for key, value in {**SPARK_DEFAULTS, **(conf or {})}.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    spark.sparkContext.addPyFile(str(project_zip(Path(tempfile.mkdtemp(prefix="periscope-spark-")))))
    spark.dataSource.register(KafkaTripsSource)
    spark.dataSource.register(MasterAvroSource)
    return spark


# --- command line ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m periscope.spark_session",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("fetch", help="check that Spark can run here (no connector jars are needed; see the docstring)")
    start = commands.add_parser("start", help="start a session on --master and run a one-line job")
    start.add_argument("--master", default=config.SPARK_MASTER, help="Spark master URL (env SPARK_MASTER)")
    args = parser.parse_args(argv)
    import pyspark

    problem = java_problem()
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    if args.command == "fetch":
        print(f"Spark {pyspark.__version__} (pyspark) and Java are ready. Periscope reads Kafka and its Avro master "
              f"data through its own Python data sources ({KAFKA_SOURCE}, {AVRO_SOURCE}), so there are no "
              "connector jars to fetch (docs/SPARK.md says why).")
        return 0
    spark = get_session(args.master, "periscope-check")
    rows = spark.range(1000).selectExpr("sum(id) AS total").collect()[0]["total"]
    print(f"Spark {spark.version} on {spark.sparkContext.master}: sum(0..999) = {rows}")
    spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
