"""The batch layer's hot-path tuning, in one place (measured with ``bench/bench_batch.py``).

A recompute reads every trip ever stored, so its cost grows with the master
dataset. ``batch_processor.py`` is written as the layer's steps; the choices
that make those steps fast are made here, each with what it buys, measured on
the project's shared 2-core machine (1.5 M master trips, 10 % of them copies:
about 2 s from start to exit, 1.7 CPU-s, 500 MB peak RSS; docs/BENCHMARKS.md):

* **Columnar decoding** (``DECODER``): ``polars.read_avro`` decodes a master
  file straight into columns (Rust): 250,000 trips in 0.04 s, against 1.2 s
  through fastavro's one Python dict per record (``periscope.master_reader``;
  ``--decoder fastavro`` keeps that reference decoder to compare with). As no
  Python object is made per trip, the garbage collector has nothing to chase
  and is left alone: the ``gc.disable()`` of the fastavro days went with it.
* **Uncompressed master files** (``MASTER_CODEC``): deflate made them a
  quarter smaller (11.2 instead of 15.0 MB per 250,000 trips) but reading
  them took three times as long (0.13 instead of 0.04 s with polars), and
  every recompute reads every file. Files written with deflate stay readable.
* **The map on threads, not processes** (``map_master_files``, ``WORKERS``):
  the worker processes this replaced cost about 1 CPU-s each to start (they
  imported pandas, pyarrow and fastavro) and pickled every result back;
  threads share the decoded frames, and polars and numpy release the GIL.
  ``--workers 2`` is measured no faster than ``--workers 1`` here (clean and
  aggregate 0.56 against 0.53 s, whole recompute 2.11 against 2.18 s, medians
  of 14 alternated runs; 30 MB more peak RSS): polars already runs each
  file's group-bys (one per view) on every core. One worker per core stays
  the default, so a bigger machine gets the parallel map without a flag.
* **Parts of ``PART_ROWS`` trips**: a master file is what the map hands out;
  250,000 trips (15 MB) make six files for 1.5 M trips, enough to keep the
  workers busy (other sizes not measured).

Smaller tunings stay where they act, each explained there:
``views._to_pandas`` (column by column, ten times faster than ``to_pandas``
for view-sized frames), ``views.aggregate`` (every view in one
``polars.collect_all``), ``dedupe.drop_duplicates`` (one
``is_first_distinct`` over all ids, no copy of them),
``storage.write_trip_index`` (no sort when the ids are sorted already).
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np
import polars as pl

DECODER = "polars"
"""How the python engine decodes master files by default (``master_reader.DECODERS``)."""

MASTER_CODEC = "null"
"""Avro block compression of new master files: none (see above)."""

WORKERS = os.cpu_count() or 1
"""Master files cleaned and aggregated at a time by default (``--workers``): one per core."""

PART_ROWS = 250_000
"""Trips per master file, for CSV imports (``--part-rows``) and stream ingests (``--file-rows``) alike."""

Result = TypeVar("Result")


def map_master_files(function: Callable[[Path, pl.DataFrame, np.ndarray], Result], files: list[Path],
                     frames: list[pl.DataFrame], masks: list[np.ndarray], workers: int) -> Iterator[Result]:
    """``function(file, frame, mask)`` for each master file, ``workers`` files at a time on threads,
    the results in the order of ``files``."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        yield from pool.map(function, files, frames, masks)
