"""The batch layer's Spark engine: the python engine's batch views, computed by Spark SQL in the JVM.

``python batch_processor.py recompute --engine spark`` calls ``compute_views``
here instead of its own pipeline. Every step is a Spark DataFrame operation;
no Python code runs on the executors and no trip reaches the driver:

* **read**: ``spark.read.format("avro")`` (Spark's ``spark-avro`` connector)
  of the master files, with the trip schema as the reader schema
  (``spark_session.MASTER_AVRO_OPTIONS``, as the SQL catalog's master table),
  so Kaggle-era files of eleven fields and TLC files with nullable fields read
  alike. The fields the rules and the facts read are put in the python
  engine's record form (``record_column``: a null integer is ``NOT_RECORDED``,
  a null double stays null, which the expressions treat as NaN). Each row
  carries its place in *source order*: the rank of its file in
  ``storage.master_files``, the start of the file split it was read from
  (``_metadata.file_block_start``) and ``monotonically_increasing_id()``,
  which grows with the row order inside a Spark partition; a split is read in
  file order by one task, so the three together order the rows exactly as the
  python engine reads them. The file's rank is looked up by the name Spark
  gives it (``input_file_name()``, as ``DataFrame.inputFiles`` lists it), on
  the driver, with no job;
* **drop duplicates**: a window over each trip id numbers its copies by their
  place (``row_number``), so the first copy in source order counts, whatever
  the copies hold: the python engine's rule (``periscope.dedupe``). Later
  copies are marked ``DUPLICATE``, counted with the rest, and aggregated nowhere;
* **clean**: the first broken rule of each distinct trip, a Spark column
  generated from ``schema.RULES`` (``expressions.to_spark``), the very
  definitions numpy evaluates in the python engine; then the facts of each
  clean trip, generated the same way from ``views.fact_expressions``. The
  result (id, file, broken rule or ``DUPLICATE``, facts) is kept on the
  executors, and one job counts its rows per file and broken rule;
* **aggregate and write**: every view in one aggregation of the clean trips
  (``GROUPING SETS``, one set of keys per view) with count, sum, sum of
  squares, min and max: one pass over the trips instead of one per view. Each
  view, the rows of its set, is written by Spark as one Parquet file, rows
  sorted by key, with the columns and types of the python engine's
  (``pickup_date`` a timestamp without time zone, the rest 64-bit integers);
  the trip index likewise (the sorted distinct ids). Only the views, read
  back from their files, and the small count (rows per file and broken rule)
  reach the driver.

The files land in a scratch directory (``out_dir``) in the version's layout;
``batch_processor.publish`` links them into the version it publishes. So the
cleaning rules, the facts and the duplicate rule have one definition, and the
result equals the python engine's, view for view and duplicate for duplicate
(``tests/test_spark_batch.py``). The manifest has the same keys, with
``"engine": "spark"``; the watermark and the input files come from the Avro
file headers (``storage.avro_metadata``), read on the driver.

It runs on ``config.SPARK_MASTER`` (``local[*]`` by default). On a cluster
the master directory and the scratch directory must be on storage every
executor can reach (NFS, a mounted bucket), as for any Spark file source.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from urllib.parse import unquote, urlparse

from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F  # noqa: N812

from periscope import config, views
from periscope.expressions import fields, to_spark
from periscope.schema import AVRO_SCHEMA, NOT_RECORDED, RULE_NAMES, RULES, avro_type
from periscope.spark_session import MASTER_AVRO_OPTIONS, get_session
from periscope.storage import (TRIP_INDEX, BatchVersion, InputFile, avro_metadata, master_files, read_view,
                               views_manifest)

FILE_COLUMN = "file_path"
DUPLICATE = -2
"""``broken`` of a later copy of a trip: counted as a row of its file, and nothing else."""
CLEAN = -1
"""``broken`` of a distinct trip that breaks no rule: the trips the views aggregate."""
VIEW_KEYS = tuple(dict.fromkeys(key for keys in views.VIEWS.values() for key in keys))
"""Every view's key columns, once each: the columns of the one grouping-sets aggregation."""
SOURCE_ORDER = ("file_rank", "file_block_start", "row_in_split")
"""A row's place in source order: its file's rank, the split it was read from, its place in the split."""
SESSION_CONF = {"spark.driver.memory": "2g"}
"""On ``local[*]`` the driver is the only executor, and its two tasks share its heap with the kept
trips. At 10 M trips the grouping-sets aggregation ran out of a 1 GB heap (the kept trips held the
memory its hash map needed); with 2 GB it took 102 s. On a cluster the executors do the work, each
with its ``spark.executor.memory``."""
SCRATCH_DIR = config.STATE_DIR / "spark" / "batch-views"
"""Where ``compute_views`` makes its output directory unless given one."""
_SPARK_TYPES = {"int": "long", "long": "long", "double": "double", "boolean": "boolean", "string": "string"}
_FIELD_TYPES = {field["name"]: avro_type(field) for field in AVRO_SCHEMA["fields"]}


def rule_and_fact_fields() -> list[str]:
    """The trip fields the cleaning rules and the view facts read."""
    return fields(*(rule.keep for rule in RULES), *views.fact_expressions().values())


def record_column(name: str) -> Column:
    """A master field in the python engine's record form (``master_reader.record_columns``):
    integers 64-bit with a null as ``NOT_RECORDED``, a null flag False, doubles as read."""
    kind = _FIELD_TYPES[name]
    column = F.col(name).cast(_SPARK_TYPES[kind])
    if kind in ("int", "long"):
        column = F.coalesce(column, F.lit(NOT_RECORDED).cast("long"))
    elif kind == "boolean":
        column = F.coalesce(column, F.lit(False))
    return column.alias(name)


# --- read ---------------------------------------------------------------------------------------------


def read_master(spark: SparkSession, files: list[Path]) -> DataFrame:
    """The master files through spark-avro: the id, the fields the rules and facts read (record
    form), and where each row comes from (the file, the split, the row's place in it)."""
    trips = spark.read.format("avro").options(**MASTER_AVRO_OPTIONS).load([str(p) for p in files])
    return trips.select(F.col("id"), *(record_column(name) for name in rule_and_fact_fields()),
                        F.input_file_name().alias(FILE_COLUMN),
                        F.col("_metadata.file_block_start").alias("file_block_start"),
                        F.monotonically_increasing_id().alias("row_in_split"))


def no_trips(spark: SparkSession) -> DataFrame:
    """An empty master dataset, with the columns ``read_master`` and ``rank_files`` give."""
    columns = ", ".join(f"{name} {_SPARK_TYPES[_FIELD_TYPES[name]]}" for name in rule_and_fact_fields())
    return spark.createDataFrame([], f"id string, {columns}, file_block_start long, row_in_split long, "
                                     "file_rank int")


def local_path(uri: str) -> Path:
    """``file:///data/master/a%20b.avro`` (Spark's name of a file) -> the real path of that file."""
    parsed = urlparse(uri)
    return Path(unquote(parsed.path) if parsed.scheme in ("file", "") else uri).resolve()


def file_ranks(trips: DataFrame, files: list[Path], master_dir: Path) -> dict[str, int]:
    """Spark's name of each file it reads (``inputFiles``, no job) -> the file's rank in source order."""
    index_of = {path.resolve(): index for index, path in enumerate(files)}
    names = trips.inputFiles()
    strangers = sorted(str(local_path(uri)) for uri in names if local_path(uri) not in index_of)
    if strangers:
        raise RuntimeError(f"Spark read files that are not master files of {master_dir}: {strangers[:3]}")
    return {uri: index_of[local_path(uri)] for uri in names}


def rank_files(spark: SparkSession, trips: DataFrame, ranks: dict[str, int]) -> DataFrame:
    """Each row with its file's rank in source order (``ranks``: Spark's file URI -> rank)."""
    table = spark.createDataFrame(list(ranks.items()), f"{FILE_COLUMN} string, file_rank int")
    return trips.join(F.broadcast(table), FILE_COLUMN).drop(FILE_COLUMN)


# --- drop duplicates, clean --------------------------------------------------------------------------


def number_copies(trips: DataFrame) -> DataFrame:
    """Every row with ``copy``, its place among the rows of its trip id in source order
    (``row_number`` over ``SOURCE_ORDER``, which no two rows share). Copy 1 is the trip, the
    python engine's rule (``periscope.dedupe``) in one line; ``clean`` marks the rest ``DUPLICATE``,
    so that they are counted, and dropped."""
    first_in_source_order = Window.partitionBy("id").orderBy(*SOURCE_ORDER)
    return (trips.withColumn("copy", F.row_number().over(first_in_source_order))
            .select("id", "file_rank", "copy", *rule_and_fact_fields()))


def clean(copies: DataFrame) -> DataFrame:
    """Each row's first broken rule (``broken``, an index into ``RULE_NAMES``, ``CLEAN`` for a clean
    trip, ``DUPLICATE`` for a later copy) and its facts: Spark columns generated from
    ``schema.RULES`` and ``views.fact_expressions`` (a broken trip's or a copy's facts may be
    anything; only clean trips are aggregated)."""
    names = rule_and_fact_fields()
    columns = {name: F.col(name) for name in names}
    floats = frozenset(name for name in names if _FIELD_TYPES[name] == "double")
    broken = F.lit(CLEAN)
    for index in reversed(range(len(RULES))):  # the first rule broken wins
        broken = F.when(~to_spark(RULES[index].keep, columns, floats), F.lit(index)).otherwise(broken)
    broken = F.when(F.col("copy") > 1, F.lit(DUPLICATE)).otherwise(broken)
    shared: dict[int, Column] = {}
    facts = [to_spark(expr, columns, floats, shared).cast("long").alias(name)
             for name, expr in views.fact_expressions().items()]
    return copies.select("id", "file_rank", broken.alias("broken"), *facts)


# --- aggregate and write ------------------------------------------------------------------------------


def aggregate_all(classified: DataFrame) -> DataFrame:
    """Every view of the clean trips in one aggregation: a grouping set per view (its keys), per key
    ``views.AGGREGATES``, and ``grouping_id`` saying which set a row belongs to (``view_rows``)."""
    measures = [aggregate for measure in views.MEASURES for aggregate in (
        F.sum(measure).alias(f"{measure}_sum"),
        F.sum(F.col(measure) * F.col(measure)).alias(f"{measure}_sumsq"),
        F.min(measure).alias(f"{measure}_min"), F.max(measure).alias(f"{measure}_max"))]
    sums = [F.sum(fact).alias(aggregate) for aggregate, fact in views.SUMS.items()]
    return (classified.where(F.col("broken") == CLEAN)
            .groupingSets([list(keys) for keys in views.VIEWS.values()], *VIEW_KEYS)
            .agg(F.grouping_id().alias("grouping_id"), F.count(F.lit(1)).alias("trips"), *measures, *sums))


def view_rows(grouped: DataFrame, name: str) -> DataFrame:
    """One view's rows of ``aggregate_all``, with its keys (as the python engine's types) and
    ``views.AGGREGATES``. Spark's ``grouping_id`` has a bit per column of ``VIEW_KEYS``, the first
    column the highest, set where the column is not a key of the set."""
    keys = views.VIEWS[name]
    grouping_id = sum(1 << (len(VIEW_KEYS) - 1 - i) for i, key in enumerate(VIEW_KEYS) if key not in keys)
    key_columns = [F.date_from_unix_date(F.col(key).cast("int")).cast("timestamp_ntz").alias(key)
                   if views.KEY_DTYPES[key].startswith("datetime64") else F.col(key) for key in keys]
    return grouped.where(F.col("grouping_id") == grouping_id).select(*key_columns, *views.AGGREGATES)


def write_one_file(frame: DataFrame, sort_by: tuple[str, ...], target: Path) -> Path:
    """``frame`` written by Spark as the single Parquet file ``target``, rows sorted by ``sort_by``."""
    spark_dir = target.parent / f"_spark-{target.stem}"
    frame.repartition(1).sortWithinPartitions(*sort_by).write.mode("overwrite").parquet(str(spark_dir))
    parts = sorted(spark_dir.glob("part-*.parquet"))
    if len(parts) != 1:
        raise RuntimeError(f"Spark wrote {len(parts)} Parquet files for {target.name} in {spark_dir}, "
                           "not one")
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(parts[0], target)
    shutil.rmtree(spark_dir)
    return target


def keep(frame: DataFrame, spark: SparkSession) -> DataFrame:
    """``frame`` kept for the jobs that read it. On ``local[*]`` a local checkpoint, cut from its plan
    (measured far cheaper than ``persist`` here); on a cluster, which may lose an executor, persisted
    with its plan, so Spark recomputes the partitions a lost executor held (a local checkpoint cannot)."""
    if spark.sparkContext.master.startswith("local"):
        return frame.localCheckpoint(eager=False)
    return frame.persist(StorageLevel.MEMORY_AND_DISK)


def compute_views(master_dir: Path, progress: bool = True, spark: SparkSession | None = None,
                  out_dir: Path | None = None) -> BatchVersion:
    """Every batch view from the whole master dataset, with Spark, and its manifest; the views and
    the trip index written into ``out_dir`` (a new directory under ``SCRATCH_DIR`` by default),
    nothing published."""
    began = time.perf_counter()
    spark = spark or get_session(app_name="periscope-batch", conf=SESSION_CONF)
    files = master_files(master_dir)
    if out_dir is None:
        SCRATCH_DIR.mkdir(parents=True, exist_ok=True)
        out_dir = Path(tempfile.mkdtemp(prefix="views-", dir=SCRATCH_DIR))
    out_dir.mkdir(parents=True, exist_ok=True)
    if progress:
        print(f"recomputing batch views from {len(files)} master files with Spark on "
              f"{spark.sparkContext.master} (session ready in {time.perf_counter() - began:.1f} s)", flush=True)
    started = time.perf_counter()
    metadata = [avro_metadata(path) for path in files]
    if files:
        trips = read_master(spark, files)
        ranked = rank_files(spark, trips, file_ranks(trips, files, master_dir))
    else:
        ranked = no_trips(spark)

    # Kept on the executors: the jobs below read it, and each would otherwise plan, and compile,
    # the whole read, dedupe and rules again.
    classified = keep(clean(number_copies(ranked)), spark)
    file_rows, duplicates, rules = Counter(), Counter(), Counter()
    for row in classified.groupBy("file_rank", "broken").count().collect():
        file_rows[row["file_rank"]] += row["count"]
        if row["broken"] == DUPLICATE:
            duplicates[row["file_rank"]] += row["count"]
        else:
            rules[RULE_NAMES[row["broken"]] if row["broken"] != CLEAN else "clean"] += row["count"]
    cleaned = time.perf_counter()

    grouped = aggregate_all(classified).persist(StorageLevel.MEMORY_AND_DISK)  # small: the views' rows
    for name, keys in views.VIEWS.items():
        write_one_file(view_rows(grouped, name), keys, out_dir / f"{name}.parquet")
    grouped.unpersist()
    write_one_file(classified.where(F.col("broken") != DUPLICATE).select("id"), ("id",), out_dir / TRIP_INDEX)
    written = time.perf_counter()

    batch_views = {name: read_view(out_dir / f"{name}.parquet") for name in views.VIEWS}
    distinct = sum(file_rows.values()) - sum(duplicates.values())
    if progress:
        print(f"  read {len(files)} master files, {sum(file_rows.values()):,} trips, {distinct:,} distinct",
              flush=True)
    manifest = views_manifest(
        engine="spark",
        inputs=[InputFile(str(path.relative_to(master_dir)), meta, file_rows[index], duplicates[index])
                for index, (path, meta) in enumerate(zip(files, metadata))],
        clean=rules.pop("clean", 0),
        broken_rules=rules,
        views=batch_views,
        timings_s={"drop_duplicates_and_clean": cleaned - started,
                   "aggregate_and_write": written - cleaned, "read_views": time.perf_counter() - written},
    )
    return BatchVersion(batch_views, manifest, None, written=out_dir)
