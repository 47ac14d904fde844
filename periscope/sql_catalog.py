"""SQL for the class: the master data and the current batch version as tables of a Spark SQL catalog.

``python batch_processor.py sql`` opens a prompt over them (``make sql``);
``python batch_processor.py sql -e "SELECT ..."`` runs statements and prints
their results, for scripts. The catalog is Hive-style and persistent: its
metastore is an embedded Derby database in ``var/spark/metastore_db`` and its
warehouse ``var/spark/warehouse``, so tables and views a class creates in the
``periscope`` database are still there next time. Periscope keeps these in it:

* ``periscope.master``: every Avro master file, every copy of a trip (the
  master data is append-only; ``count(DISTINCT id)`` is the trips the batch
  layer counts, before cleaning);
* ``periscope.<view>`` (``hourly_stats``, ``daily_summary``, ``hour_of_week``,
  ...): the views of the current batch version;
* ``periscope.speed``: the speed view, one row per trip the speed layer wrote
  and the batch layer has not pruned yet;
* ``periscope.batch_trip_ids``: the id of every trip the version holds;
* ``periscope.batch_version``: which version the views are, and its watermark.

**The views follow each publish.** A batch run publishes a version by
switching ``current.json``; it does not open the catalog (an embedded Derby
metastore admits one process at a time, and the python engine has no Spark).
Instead, before each statement, the session compares ``current.json`` with
the version the catalog points at and, when a newer one was published,
re-points every view with ``CREATE OR REPLACE VIEW`` (one metastore
transaction per view) and refreshes the file listings. So every statement
reads one complete version, the newest published before it started.
"""
from __future__ import annotations

import fcntl
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from periscope import config, storage
from periscope.spark_session import JIT_HUGE_METHODS, MASTER_AVRO_OPTIONS, SparkSetupError, get_session
from periscope.sql_prompt import quiet_query_errors, sql_prompt

DATABASE = "periscope"
CATALOG_DIR = config.STATE_DIR / "spark"
EXAMPLE = "SELECT pickup_weekday, pickup_hour, trips FROM periscope.hour_of_week ORDER BY trips DESC LIMIT 5"


class CatalogBusy(SparkSetupError):
    """Another process holds the embedded metastore."""


class StatementFailed(ValueError):
    """A statement given with ``-e`` failed; the message is Spark's first line."""


@dataclass(frozen=True)
class Sources:
    """Where the tables' files are."""

    master_dir: Path
    views_dir: Path
    speed_dir: Path


def catalog_conf(catalog_dir: Path) -> dict[str, str]:
    """Spark settings for a Hive-style catalog whose metastore and warehouse live in ``catalog_dir``."""
    metastore = (catalog_dir / "metastore_db").resolve()
    return {
        "spark.sql.catalogImplementation": "hive",
        "spark.sql.warehouse.dir": str((catalog_dir / "warehouse").resolve()),
        "spark.hadoop.javax.jdo.option.ConnectionURL": f"jdbc:derby:;databaseName={metastore};create=true",
        "spark.driver.extraJavaOptions": f"{JIT_HUGE_METHODS} -Dderby.system.home={catalog_dir.resolve()}",
        "spark.sql.files.ignoreMissingFiles": "true",  # a speed file pruned between listing and reading
        "spark.sql.legacy.parquet.nanosAsLong": "true",  # the views' pandas timestamps: see _columns
    }


def _escaped(text: str) -> str:
    return text.replace("'", "\\'")


def _quoted(path: Path) -> str:
    return _escaped(str(path.resolve()))


def _columns(path: Path) -> list[str]:
    """The view's columns, its dates as timestamps whichever engine wrote them: nanoseconds (pandas'
    unit, which Spark reads as longs; the python engine) or microseconds without a time zone (Spark)."""
    schema = pq.read_schema(path)
    return [(f"timestamp_micros({name} DIV 1000) AS {name}" if kind.unit == "ns" else
             f"CAST({name} AS TIMESTAMP) AS {name}") if pa.types.is_timestamp(kind) else name
            for name, kind in zip(schema.names, schema.types)]


def view_statements(views_dir: Path, version: str) -> list[str]:
    """``CREATE OR REPLACE VIEW`` for each view of ``version``, its trip ids and the ``batch_version`` view."""
    directory = views_dir / version
    manifest = storage.read_json(directory / storage.MANIFEST)
    statements = [f"CREATE OR REPLACE VIEW {DATABASE}.{path.stem} AS "
                  f"SELECT {', '.join(_columns(path))} FROM parquet.`{_quoted(path)}`"
                  for path in sorted(directory.glob("*.parquet"))]
    index = directory / storage.TRIP_INDEX
    if index.exists():
        statements.append(f"CREATE OR REPLACE VIEW {DATABASE}.batch_trip_ids AS "
                          f"SELECT id FROM parquet.`{_quoted(index)}`")
    watermark = json.dumps(manifest.get("watermark", {}), sort_keys=True).replace("'", "\\'")
    statements.append(f"CREATE OR REPLACE VIEW {DATABASE}.batch_version AS SELECT '{version}' AS version, "
                      f"'{manifest.get('created_at', '')}' AS created_at, '{watermark}' AS watermark")
    return statements


def file_table_statements(sources: Sources) -> list[str]:
    """The master and speed tables, made anew each session: external tables over the files where they are
    now (``--master-dir``, ``--speed-dir``). Master files are read with the one trip schema as the reader
    schema, as the Spark batch engine reads them: files written without the TLC fields read them as null."""
    statements = [f"CREATE DATABASE IF NOT EXISTS {DATABASE} COMMENT 'Periscope: master data and batch views'",
                  f"DROP TABLE IF EXISTS {DATABASE}.master", f"DROP TABLE IF EXISTS {DATABASE}.speed"]
    if storage.master_files(sources.master_dir):  # external tables: dropping one leaves its files alone
        reader = ", ".join(f"{key} '{_escaped(value)}'" for key, value in MASTER_AVRO_OPTIONS.items())
        statements.append(f"CREATE TABLE {DATABASE}.master USING avro OPTIONS "
                          f"(path '{_quoted(sources.master_dir)}', recursiveFileLookup 'true', "
                          f"pathGlobFilter '*.avro', {reader})")
    if any(sources.speed_dir.glob("p*/*.parquet")):
        statements.append(f"CREATE TABLE {DATABASE}.speed USING parquet OPTIONS "
                          f"(path '{_quoted(sources.speed_dir)}', recursiveFileLookup 'true', "
                          "pathGlobFilter '*.parquet')")
    return statements


class Catalog:
    """A Spark session on the persistent catalog, whose views follow ``current.json``."""

    def __init__(self, spark, sources: Sources) -> None:  # noqa: ANN001 -- pyspark's SparkSession
        self.spark, self.sources, self.version = spark, sources, None
        for statement in file_table_statements(sources):
            spark.sql(statement)

    def follow_current(self) -> str | None:
        """Re-point the views if a newer version was published; refresh the file tables."""
        current = storage.current_version(self.sources.views_dir)
        if current is not None and current != self.version:
            for statement in view_statements(self.sources.views_dir, current):
                self.spark.sql(statement)
            self.version = current
        for table in ("master", "speed"):
            if self.spark.catalog.tableExists(f"{DATABASE}.{table}"):
                self.spark.catalog.refreshTable(f"{DATABASE}.{table}")
        return self.version

    def tables(self) -> list[str]:
        return sorted(table.name for table in self.spark.catalog.listTables(DATABASE))


@contextmanager
def open_catalog(sources: Sources, master: str | None = None,
                 catalog_dir: Path = CATALOG_DIR) -> Iterator[Catalog]:
    """The catalog on a Spark session of its own; raises CatalogBusy if another session holds it."""
    catalog_dir.mkdir(parents=True, exist_ok=True)
    if _derby_in_use(catalog_dir):
        raise CatalogBusy(f"another `batch_processor.py sql` holds the catalog in {catalog_dir}/metastore_db "
                          "(an embedded metastore admits one process): close that prompt first")
    spark = get_session(master, "periscope-sql", conf=catalog_conf(catalog_dir))
    spark.sparkContext.setLogLevel("ERROR")
    quiet_query_errors()
    try:
        try:
            catalog = Catalog(spark, sources)
            catalog.follow_current()
        except Exception as error:  # pyspark's AnalysisException: a master or view file Spark cannot read
            raise StatementFailed(f"registering the tables: {str(error).splitlines()[0]}") from None
        yield catalog
    finally:
        spark.stop()


def _derby_in_use(catalog_dir: Path) -> bool:
    """Whether a live process holds Derby's lock (a crashed one leaves the file, not the lock)."""
    lock = catalog_dir / "metastore_db" / "dbex.lck"
    if not lock.exists():
        return False
    with open(lock, "r+b") as handle:
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.lockf(handle, fcntl.LOCK_UN)
    return False


def run_statements(catalog: Catalog, statements: Sequence[str], rows: int = 20) -> None:
    """Run each statement on the current version and show its first ``rows`` rows."""
    for statement in statements:
        catalog.follow_current()
        try:
            result = catalog.spark.sql(statement)
        except Exception as error:  # pyspark's AnalysisException, ParseException, ...
            raise StatementFailed(f"{statement!r}: {str(error).splitlines()[0]}") from None
        result.show(rows, truncate=False)


def prompt(catalog: Catalog) -> None:
    """The interactive prompt; each statement first follows a newer published version."""
    sql_prompt(catalog.spark, EXAMPLE, over=f"the {DATABASE} database ({', '.join(catalog.tables())})",
               ends="ends the prompt", before=catalog.follow_current)
