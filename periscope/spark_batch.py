"""The batch layer's Spark engine: the same batch views as the python engine, computed by Spark.

``python batch_processor.py recompute --engine spark`` calls ``compute_views``
here instead of its own process pool. The plan is the python engine's
map-reduce, with Spark as the cluster:

* **read**: ``spark.read.format("periscope_avro").load(master_dir)`` - one
  Spark partition per master file, decoded by ``storage.iter_avro_columns``
  (``periscope.spark_session``);
* **map** (``mapInPandas``, on the executors): each Arrow batch of trips goes
  through ``schema.first_broken_rule`` and ``views.aggregate``, exactly the
  functions the python engine runs, and leaves as one small row: the partial
  views and rule counts, pickled;
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
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
from pyspark.sql import SparkSession
from pyspark.sql.types import BinaryType, StructField, StructType

from periscope import views
from periscope.schema import RULE_NAMES, first_broken_rule
from periscope.spark_session import AVRO_COLUMNS, AVRO_SOURCE, get_session
from periscope.storage import avro_metadata, master_files

PARTIAL_SCHEMA = StructType([StructField("partial", BinaryType())])
READ_CHUNK_ROWS = 100_000


def summarise_batches(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
    """``mapInPandas`` function: per input batch, one row holding its partial views and counts (pickled).

    The counts are per master file (``file_index``), so the manifest can say
    how many trips each file held, as the python engine's does.
    """
    for trips in batches:
        columns = {name: trips[name].to_numpy() for name in AVRO_COLUMNS}
        broken = first_broken_rule(columns)
        keep = broken < 0
        partial = {
            "views": views.aggregate({name: values[keep] for name, values in columns.items()}),
            "rows_per_file": Counter({int(index): int(count) for index, count in
                                      zip(*np.unique(trips["file_index"].to_numpy(), return_counts=True))}),
            "clean": int(keep.sum()),
            "broken": Counter({RULE_NAMES[index]: int(count) for index, count in
                               zip(*np.unique(broken[~keep], return_counts=True))}),
        }
        yield pd.DataFrame({"partial": [pickle.dumps(partial, protocol=pickle.HIGHEST_PROTOCOL)]})


def stream_watermark(metadata: list[dict[str, str]]) -> dict[str, int]:
    """Highest Kafka offset per partition covered by stream files (as ``batch_processor.stream_watermark``)."""
    watermark: dict[str, int] = {}
    for meta in metadata:
        if meta.get("kind") == "stream":
            partition, last = meta["kafka_partition"], int(meta["kafka_last_offset"])
            watermark[partition] = max(last, watermark.get(partition, -1))
    return dict(sorted(watermark.items(), key=lambda item: int(item[0])))


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
    if files:
        partials = [pickle.loads(row["partial"]) for row in
                    spark.read.format(AVRO_SOURCE).option("chunkRows", str(READ_CHUNK_ROWS))
                    .option("files", json.dumps([str(path) for path in files])).load(str(master_dir))
                    .mapInPandas(summarise_batches, PARTIAL_SCHEMA).collect()]
    else:
        partials = []
    read_done = time.perf_counter()
    batch_views = views.merge(*(partial["views"] for partial in partials))
    merge_done = time.perf_counter()
    rows_per_file, rules = Counter(), Counter()
    for partial in partials:
        rows_per_file.update(partial["rows_per_file"])
        rules.update(partial["broken"])
    if progress:
        print(f"  read {len(files)} master files, {sum(rows_per_file.values()):,} trips, in "
              f"{len(partials)} Spark batches", flush=True)
    manifest = {
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "engine": "spark",
        "watermark": stream_watermark(metadata),
        "watermark_topics": sorted({meta["topic"] for meta in metadata if meta.get("kind") == "stream"}),
        "rows": {
            "master": sum(rows_per_file.values()),
            "clean": sum(partial["clean"] for partial in partials),
            "views": {name: len(frame) for name, frame in batch_views.items()},
        },
        "cleaning": {name: rules.get(name, 0) for name in RULE_NAMES},
        "input_files": [{**meta, "path": str(path.relative_to(master_dir)), "rows": rows_per_file.get(index, 0)}
                        for index, (path, meta) in enumerate(zip(files, metadata))],
        "timings_s": {
            "read_and_aggregate": round(read_done - started, 3),
            "merge": round(merge_done - read_done, 3),
        },
    }
    return batch_views, manifest
