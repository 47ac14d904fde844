"""The batch layer's Spark engine: the same batch views as the python engine, computed by Spark.

``python batch_processor.py recompute --engine spark`` calls ``compute_views``
here instead of its own pipeline. The plan is the python engine's, with
Spark as the cluster:

* **read**: ``spark.read.format("avro")`` (Spark's ``spark-avro`` connector,
  ``periscope.spark_session``) of the master files, with the trip schema
  ``schema.AVRO_SCHEMA`` given as the reader schema (so files written before
  the TLC fields existed read them as null); each column the views need is
  cast to the dtype the python engine computes with (``int`` fields and the
  taxi zones to 64-bit, ``long`` times stay ms, the flag a boolean; a null as
  the python engine's record form has it, ``record_form``). Each row carries its place in
  *source order*: the rank of its file in ``storage.master_files``, the start
  of the file split it was read from (``_metadata.file_block_start``) and
  ``monotonically_increasing_id()``, which grows with the row order inside a
  Spark partition; a split is read in file order by one task, so the three
  together order the rows exactly as the python engine reads them;
* **drop duplicates**: ``groupBy("id")`` keeps the row with the smallest
  place (``min`` of a struct that starts with it), so the first copy in
  source order counts, whatever the copies hold: the python engine's rule;
* **clean and aggregate** (``mapInPandas``, on the executors): each Arrow batch
  of distinct trips goes through ``schema.first_broken_rule`` and
  ``views.aggregate``, exactly the functions the python engine runs; a Spark
  partition's partial views, counts and trip ids are merged as they come and
  leave as one small row, pickled (no master row is collected to the driver);
* **merge** (on the driver): ``views.merge`` of the partials, which is exact
  because every aggregate is an integer count, sum, min or max.

The rows each file holds are counted by a first, light Spark job. So the
cleaning rules, the aggregates and the duplicate rule have one definition, and
the result equals the python engine's, view for view and duplicate for
duplicate (``tests/test_spark_batch.py``). The manifest has the same keys, with
``"engine": "spark"``; the watermark and the input files come from the Avro
file headers (``storage.avro_metadata``), read on the driver.

It runs on ``config.SPARK_MASTER`` (``local[*]`` by default). On a cluster
the master directory must be on storage every executor can read (NFS, a
mounted bucket), as it would be for any Spark file source.
"""
from __future__ import annotations

import json
import pickle
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import BinaryType, StructField, StructType

from periscope import views
from periscope.schema import AVRO_SCHEMA, NOT_RECORDED, RULE_NAMES, first_broken_rule
from periscope.spark_session import AVRO_COLUMNS, get_session, spark_type
from periscope.storage import BatchVersion, InputFile, avro_metadata, master_files, views_manifest

PARTIAL_SCHEMA = StructType([StructField("partial", BinaryType())])
FILE_COLUMN = "file_path"
ZONE_COLUMNS = ("pickup_location_id", "dropoff_location_id")
VIEW_COLUMNS = AVRO_COLUMNS + ZONE_COLUMNS
"""What the rules and the views read: the Kaggle fields and the taxi zones (a TLC trip may have
zones instead of coordinates)."""
INTEGER_COLUMNS = tuple(name for name in VIEW_COLUMNS
                        if name in ZONE_COLUMNS or spark_type(name).typeName() == "long")
"""The 64-bit integer columns: fields the schema groups as integers or times, and the zones."""
SOURCE_ORDER = ("file_rank", "file_block_start", "row_in_split")
"""A row's place in source order: its file's rank, the split it was read from, its place in the split."""


def read_master(spark: SparkSession, files: list[Path]) -> DataFrame:
    """The master files through spark-avro, as the python engine sees them: its columns and dtypes,
    and where each row comes from (the file, the split, the row's place in it)."""
    trips = spark.read.format("avro").option("avroSchema", json.dumps(AVRO_SCHEMA)).load([str(p) for p in files])
    return trips.select(F.col("id"), *(F.col(name).cast(spark_type(name)) for name in AVRO_COLUMNS),
                        *(F.col(name).cast("long") for name in ZONE_COLUMNS),
                        F.col("_metadata.file_path").alias(FILE_COLUMN),
                        F.col("_metadata.file_block_start").alias("file_block_start"),
                        F.monotonically_increasing_id().alias("row_in_split"))


def rank_files(spark: SparkSession, trips: DataFrame, ranks: dict[str, int]) -> DataFrame:
    """Each row with its file's rank in source order (``ranks``: Spark's file URI -> rank)."""
    table = spark.createDataFrame(list(ranks.items()), f"{FILE_COLUMN} string, file_rank int")
    return trips.join(F.broadcast(table), FILE_COLUMN)


def drop_duplicates(trips: DataFrame) -> DataFrame:
    """One row per trip id: the first copy in source order (the smallest ``SOURCE_ORDER``)."""
    first = F.min(F.struct(*SOURCE_ORDER, *VIEW_COLUMNS)).alias("first")
    return trips.groupBy("id").agg(first).select("id", "first.file_rank", *(f"first.{c}" for c in VIEW_COLUMNS))


def record_form(column: pd.Series, name: str) -> np.ndarray:
    """A column of an Arrow batch as the python engine's record form (``master_reader.record_columns``):
    a null integer (NaN once Arrow made the column float) as ``NOT_RECORDED``, a null flag as False."""
    if name == "store_and_fwd_flag":
        return column.fillna(False).to_numpy(dtype=np.bool_)
    if name in INTEGER_COLUMNS:
        return column.fillna(NOT_RECORDED).to_numpy(dtype=np.int64)
    return column.to_numpy(dtype=np.float64)


def summarise_batches(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
    """``mapInPandas`` function: one row per Spark partition of distinct trips, its partial views,
    counts and trip ids (pickled).

    The views of the partition's Arrow batches are merged here (the merge is
    exact), so the driver collects one small row per partition. Distinct
    trips are counted per file (by rank), so the manifest can say how many
    duplicates each file held, as the python engine's does.
    """
    parts, ids = [], []
    partial = {"distinct_per_file": Counter(), "clean": 0, "broken": Counter()}
    for trips in batches:
        columns = {name: record_form(trips[name], name) for name in VIEW_COLUMNS}
        broken = first_broken_rule(columns)
        keep = broken < 0
        parts.append(views.aggregate({name: values[keep] for name, values in columns.items()}))
        ids.append(pa.array(trips["id"], type=pa.string()))
        partial["distinct_per_file"].update(trips["file_rank"].value_counts().to_dict())
        partial["clean"] += int(keep.sum())
        partial["broken"].update({RULE_NAMES[index]: int(count) for index, count in
                                  zip(*np.unique(broken[~keep], return_counts=True))})
    partial["views"] = views.merge(*parts)
    partial["ids"] = pa.chunked_array(ids, type=pa.string()).combine_chunks()
    yield pd.DataFrame({"partial": [pickle.dumps(partial, protocol=pickle.HIGHEST_PROTOCOL)]})


def local_path(uri: str) -> Path:
    """``file:///data/master/a%20b.avro`` (Spark's ``_metadata.file_path``) -> the real path of that file."""
    parsed = urlparse(uri)
    return Path(unquote(parsed.path) if parsed.scheme in ("file", "") else uri).resolve()


def compute_views(master_dir: Path, progress: bool = True, spark: SparkSession | None = None) -> BatchVersion:
    """Every batch view from the whole master dataset, with Spark, its manifest and trip index
    (nothing published)."""
    began = time.perf_counter()
    spark = spark or get_session(app_name="periscope-batch")
    files = master_files(master_dir)
    if progress:
        print(f"recomputing batch views from {len(files)} master files with Spark on {spark.sparkContext.master} "
              f"(session ready in {time.perf_counter() - began:.1f} s)", flush=True)
    started = time.perf_counter()
    metadata = [avro_metadata(path) for path in files]
    rows_per_file, partials = Counter(), []
    if files:
        trips = read_master(spark, files)
        rows_per_uri = {row[FILE_COLUMN]: row["count"] for row in trips.groupBy(FILE_COLUMN).count().collect()}
        index_of = {path.resolve(): index for index, path in enumerate(files)}
        strangers = sorted(str(local_path(uri)) for uri in rows_per_uri if local_path(uri) not in index_of)
        if strangers:
            raise RuntimeError(f"Spark read files that are not master files of {master_dir}: {strangers[:3]}")
        ranks = {uri: index_of[local_path(uri)] for uri in rows_per_uri}
        rows_per_file = Counter({ranks[uri]: rows for uri, rows in rows_per_uri.items()})
        counted = time.perf_counter()
        distinct = drop_duplicates(rank_files(spark, trips, ranks))
        partials = [pickle.loads(row["partial"]) for row in
                    distinct.mapInPandas(summarise_batches, PARTIAL_SCHEMA).collect()]
    else:
        counted = started
    spark_done = time.perf_counter()
    batch_views = views.merge(*(partial["views"] for partial in partials))
    trip_ids = pl.concat([pl.Series("id", partial["ids"]) for partial in partials] or
                         [pl.Series("id", [], dtype=pl.String)]).sort()
    merge_done = time.perf_counter()
    distinct_per_file, rules = Counter(), Counter()
    for partial in partials:
        distinct_per_file.update(partial["distinct_per_file"])
        rules.update(partial["broken"])
    file_rows = [rows_per_file.get(index, 0) for index in range(len(files))]
    if progress:
        print(f"  read {len(files)} master files, {sum(file_rows):,} trips, {len(trip_ids):,} distinct, in "
              f"{len(partials)} Spark partitions", flush=True)
    manifest = views_manifest(
        engine="spark",
        inputs=[InputFile(str(path.relative_to(master_dir)), meta, rows, rows - distinct_per_file.get(index, 0))
                for index, (path, meta, rows) in enumerate(zip(files, metadata, file_rows))],
        clean=sum(partial["clean"] for partial in partials),
        broken_rules=rules,
        views=batch_views,
        timings_s={"count_rows": counted - started, "read_drop_duplicates_clean_and_aggregate": spark_done - counted,
                   "merge": merge_done - spark_done},
    )
    return BatchVersion(batch_views, manifest, trip_ids)
