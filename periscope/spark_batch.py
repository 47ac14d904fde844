"""The batch layer's Spark engine: the same batch views as the python engine, computed by Spark.

``python batch_processor.py recompute --engine spark`` calls ``compute_views``
here instead of its own process pool. The plan is the python engine's
map-reduce, with Spark as the cluster:

* **read**: ``spark.read.format("avro")`` (Spark's ``spark-avro`` connector,
  ``periscope.spark_session``) of the master files, with the trip schema
  ``schema.AVRO_SCHEMA`` given as the reader schema; each column is cast to
  the dtype ``storage.iter_avro_columns`` gives the python engine (``int``
  fields to 64-bit, ``long`` times stay ms, the flag a boolean), and each row
  carries the file it came from (``_metadata.file_path``);
* **map** (``mapInPandas``, on the executors): each Arrow batch of trips goes
  through ``schema.first_broken_rule`` and ``views.aggregate``, exactly the
  functions the python engine runs; a Spark partition's partial views and rule
  counts are merged as they come and leave as one small row, pickled;
* **reduce** (on the driver): ``views.merge`` of the partials, which is exact
  because every aggregate is an integer count, sum, min or max.

So the cleaning rules and the aggregates have one definition, and the result
equals the python engine's, view for view (``tests/test_spark_batch.py``
checks it on the real sample and on generated data). The manifest has the
same keys, with ``"engine": "spark"``; the watermark and the input files come
from the Avro file headers (``storage.avro_metadata``), read on the driver.

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
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import BinaryType, StructField, StructType

from periscope import views
from periscope.schema import AVRO_SCHEMA, RULE_NAMES, first_broken_rule
from periscope.spark_session import AVRO_COLUMNS, get_session, spark_type
from periscope.storage import avro_metadata, master_files, views_manifest

PARTIAL_SCHEMA = StructType([StructField("partial", BinaryType())])
FILE_COLUMN = "file_path"


def read_master(spark: SparkSession, files: list[Path]) -> DataFrame:
    """The master files through spark-avro, as the python engine sees them: its columns and dtypes, and the file."""
    trips = spark.read.format("avro").option("avroSchema", json.dumps(AVRO_SCHEMA)).load([str(p) for p in files])
    return trips.select(*(F.col(name).cast(spark_type(name)) for name in AVRO_COLUMNS),
                        F.col("_metadata.file_path").alias(FILE_COLUMN))


def summarise_batches(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
    """``mapInPandas`` function: one row per Spark partition, its partial views and counts (pickled).

    The views of the partition's Arrow batches are merged here (the merge is
    exact), so the driver collects one small row per partition. The trips are counted
    per master file, so the manifest can say how many each file held, as the
    python engine's does.
    """
    parts, partial = [], {"rows_per_file": Counter(), "clean": 0, "broken": Counter()}
    for trips in batches:
        columns = {name: trips[name].to_numpy() for name in AVRO_COLUMNS}
        broken = first_broken_rule(columns)
        keep = broken < 0
        parts.append(views.aggregate({name: values[keep] for name, values in columns.items()}))
        partial["rows_per_file"].update(trips[FILE_COLUMN].value_counts().to_dict())
        partial["clean"] += int(keep.sum())
        partial["broken"].update({RULE_NAMES[index]: int(count) for index, count in
                                  zip(*np.unique(broken[~keep], return_counts=True))})
    partial["views"] = views.merge(*parts)
    yield pd.DataFrame({"partial": [pickle.dumps(partial, protocol=pickle.HIGHEST_PROTOCOL)]})


def local_path(uri: str) -> Path:
    """``file:///data/master/a%20b.avro`` (Spark's ``_metadata.file_path``) -> the real path of that file."""
    parsed = urlparse(uri)
    return Path(unquote(parsed.path) if parsed.scheme in ("file", "") else uri).resolve()


def compute_views(master_dir: Path, progress: bool = True,
                  spark: SparkSession | None = None) -> tuple[dict[str, pd.DataFrame], dict]:
    """Every batch view from the whole master dataset, with Spark, and the manifest (nothing published)."""
    began = time.perf_counter()
    spark = spark or get_session(app_name="periscope-batch")
    files = master_files(master_dir)
    if progress:
        print(f"recomputing batch views from {len(files)} master files with Spark on {spark.sparkContext.master} "
              f"(session ready in {time.perf_counter() - began:.1f} s)", flush=True)
    started = time.perf_counter()
    metadata = [avro_metadata(path) for path in files]
    partials = [pickle.loads(row["partial"]) for row in
                read_master(spark, files).mapInPandas(summarise_batches, PARTIAL_SCHEMA).collect()] if files else []
    read_done = time.perf_counter()
    batch_views = views.merge(*(partial["views"] for partial in partials))
    merge_done = time.perf_counter()
    rows_per_path, rules = Counter(), Counter()
    for partial in partials:
        rows_per_path.update({local_path(uri): rows for uri, rows in partial["rows_per_file"].items()})
        rules.update(partial["broken"])
    index_of = {path.resolve(): index for index, path in enumerate(files)}
    strangers = set(rows_per_path) - set(index_of)
    if strangers:
        raise RuntimeError(f"Spark read files that are not master files of {master_dir}: {sorted(strangers)[:3]}")
    rows_per_file = Counter({index_of[path]: rows for path, rows in rows_per_path.items()})
    if progress:
        print(f"  read {len(files)} master files, {sum(rows_per_file.values()):,} trips, in "
              f"{len(partials)} Spark partitions", flush=True)
    manifest = views_manifest(
        "spark", master_dir, files, metadata, [rows_per_file.get(index, 0) for index in range(len(files))],
        sum(partial["clean"] for partial in partials), rules, batch_views,
        {"read_and_aggregate": read_done - started, "merge": merge_done - read_done},
    )
    return batch_views, manifest
