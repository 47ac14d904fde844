"""Hot-path tuning of the two speed layers, in one place: what each knob does, why, what it buys.

None of it changes what a speed layer writes; all of it is about how fast, on
the project's two-core machine (figures from ``bench/bench_speed_layer.py``
and ``bench/bench_spark.py``, docs/BENCHMARKS.md). A reader of the layers can
skip this file; a reader tuning them starts here.
"""
from __future__ import annotations

import functools
import importlib.util
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from threadpoolctl import threadpool_limits

# --- hot-path tuning of kafka_consumer.py (measured: docs/BENCHMARKS.md, "Speed layer") -------------

MAX_RECORDS = 10_000
"""``--max-records``: big batches amortise what each batch costs whatever its size (one model call that
walks each of the model's 80 trees once, one file per partition, one commit). They only form when trips
queue up; at a steady rate a poll returns what has arrived."""

FETCH_MIN_BYTES, FETCH_MAX_WAIT_MS = 1 << 20, 250
"""The broker answers a fetch once 1 MB has arrived or after 250 ms: at low rates a few files per
partition per second rather than dozens (about 11 a second in all at 1,000 trips/s), for at most 250 ms
of the latency budget; it sets the floor of the latency (p50 180 ms at 1,000 trips/s)."""

POLL_TIMEOUT_MS = 1000
"""Poll returns as soon as records arrive; the long timeout lets a rebalance finish inside one poll
(kafka-python 3.0.12 can lose track of a join that completes between two polls and stall)."""

CHECK_CRCS = importlib.util.find_spec("crc32c") is not None
"""Verify record checksums only with the C package ``crc32c`` (pinned in requirements.txt):
kafka-python's pure-Python CRC costs more than all the rest of the speed layer (the producer, which
checksums too, makes 9,500 trips/s without the C package and 34,000 with it), and the broker checked
every batch when it was produced."""

CONSUMER_FETCH: dict[str, object] = {"fetch_min_bytes": FETCH_MIN_BYTES, "fetch_max_wait_ms": FETCH_MAX_WAIT_MS,
                                     "check_crcs": CHECK_CRCS}
"""The settings above, as ``KafkaConsumer`` keyword arguments."""

MODEL_THREADS = 1
"""One OpenMP thread for the trees, set once for the worker thread (OpenMP limits are per thread, and
setting them costs ~0.1 s): on a busy two-core machine OpenMP's threads wait on each other at every tree
(training: 1.9-23.6 s with two threads against 1.7-4.3 s with one, docs/BENCHMARKS.md). A speed layer
scales out with more processes in the group instead."""

GIL_SWITCH_INTERVAL_S = 0.0005
"""The worker thread takes the GIL back after each tree (80 times a batch); by default it may wait 5 ms
each time for the busy main thread to let go. With the first, 320-tree model 0.5 ms made the speed layer
15-30 % faster. With the shipped 80-tree model the gain is within the noise: 35,800 trips/s against
36,000 at the default 5 ms (medians of 11 alternating drains of 200,000 trips each), p99 590 against
647 ms at 5,000 trips/s (3 runs each; 2026-12-01, load 1.3-3.4). It stays for larger models."""


def one_model_thread() -> None:
    """The model worker thread's initializer: ``MODEL_THREADS`` OpenMP threads for its predictions."""
    threadpool_limits(MODEL_THREADS, "openmp")


def one_model_thread_here() -> None:
    """``one_model_thread`` for the calling thread, once: the Spark driver predicts on the thread
    Spark's ``foreachBatch`` calls it on, batch after batch."""
    _one_model_thread_in(threading.get_ident())


@functools.cache
def _one_model_thread_in(_thread: int) -> None:
    one_model_thread()


@contextmanager
def quick_gil_handoff() -> Iterator[None]:
    """``GIL_SWITCH_INTERVAL_S`` while the speed layer runs; the interpreter's own interval after."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


# --- hot-path tuning of spark_streaming.py (measured: docs/BENCHMARKS.md, "Spark") ---------------------
#
# The hot path of a micro-batch, and why it is shaped so (spark_speed.py has the code):
# - one Python pass on the executors (``validate_and_predict_batches`` in ``mapInArrow``) instead of
#   ``mapInPandas`` for validation then a pandas UDF for the model: each message crosses from the JVM
#   to Python and back once, not twice;
# - the rows come to the driver as Arrow (``toArrow()``) and go to Parquet as Arrow
#   (``write_speed_tables``), not through ``toPandas()`` and a pandas frame per file;
# - lag from the speed query's progress (the end offsets Spark's Kafka source fetched to plan the
#   batch), not three broker calls of our own per batch;
# - the windows query reads the speed files (validated once), not the topic from ``earliest`` with
#   a second validation of every message on every start.
# Measured together (bench/bench_spark.py, old = the code before, alternated old/new on this machine,
# 2026-12-02, load average 3-21 from other sessions, so ratios only; docs/BENCHMARKS.md):
# throughput of 200,000 pre-produced trips 1,152 -> 1,687, 1,560 -> 3,058 and 4,367 -> 4,768 trips/s
# (1.5x, 2.0x, 1.1x: the gain shrinks as the load drops);
# CPU seconds of the whole process tree (driver, JVM, Python workers; Spark's start-up included)
# 93.7 -> 67.0, 75.4 -> 51.7 and 55.2 -> 43.4 (-28, -31, -21 %). Latency at 1,000 trips/s
# (~500 trips a batch): p99 10.4 -> 3.3 s at load 8-13, 2.2 -> 2.7 s at load 4-5, no gain to call:
# there Spark's fixed cost per micro-batch dominates, not the data path.
#
# Where a micro-batch's time went at 1,000 trips/s (~500-900 trips, query progress ``durationMs`` and
# timings in ``foreachBatch``, medians, load 5-7 with another Spark job beside it): triggerExecution
# 700-900 ms = addBatch 600-700 (the Spark job through a Python worker ~550, of which validation and
# prediction 10-30; speed files 35-55; dead letters ~10) + walCommit ~55 + commitOffsets ~65 +
# latestOffset and queryPlanning ~15 each. A trivial ``mapInArrow`` job costs 130 ms more than the same
# job without Python (on a quiet machine), the round trip through the worker, not the work. And the first
# batch took 4-5 s more than the others: Python workers starting, importing pandas and scikit-learn,
# loading the model. Hence ``DRIVER_BATCH_ROWS`` and ``BroadcastModel.warm_up`` (spark_speed.py), measured
# with bench/bench_spark.py, old = the code before, alternated on this machine (2026-12-02):
# latency at 1,000 trips/s, median of 4-5 runs each (load 0.1-6): p50 830 -> 512 ms, p99 1,731 -> 894 ms
# (the run at load 4-5: p99 4,363 -> 1,475 ms); throughput of 200,000 pre-produced trips, median of 4
# (load 0.1-6): 7,156 -> 15,626 trips/s in micro-batches, the process's wall time 53 -> 36 s (Spark's start
# 5-10 s longer for the warm-up, the first batch that much shorter). Tried and left out (in-process runs
# at 1,000 trips/s, load 6-8, so only large differences count): a 200 ms trigger (p50 672 against
# 653 ms at 500 ms, p99 2.2 against 2.3 s); the checkpoint on Hadoop's RawLocalFileSystem, no ``.crc``
# files (walCommit 49 -> 31 ms, commitOffsets 60 -> 46 ms, ~30 ms of ~600); ``spark.locality.wait`` 0
# (p50 896 against 747 ms); one task per small batch by ``coalesce`` (p50 1,523 -> 667 ms, p99 2.3 s
# against 1.65 s on the driver); one OpenMP thread in the Python workers (they predict a batch in 3-17
# ms already: Spark sets their ``OMP_NUM_THREADS`` to the task's cores; on the driver it matters: 173 trips
# took 159 ms with two threads against 2.4 ms with one, load 5; ``one_model_thread_here``).

MAX_OFFSETS_PER_TRIGGER = 20_000
"""``--max-offsets-per-trigger``: messages per micro-batch at most, so a catch-up of millions runs as many
bounded batches (each is collected to the driver, as Arrow). Spark's fixed cost per micro-batch (planning,
scheduling the tasks, the checkpoint's offset and commit files) is what limits the rate; bigger batches
amortise it."""

TRIGGER = "500 milliseconds"
"""``--trigger``: a new micro-batch at most twice a second; when idle, Spark asks the broker for new
offsets that often. A batch that takes longer starts the next one at once, so at a steady rate the
latency is about one trigger interval plus one batch."""

DRIVER_BATCH_ROWS = 5_000
"""A micro-batch expected to hold at most this many messages (the one before it did, and the broker held no
more behind it) is validated and predicted on the driver: collected as Spark's Kafka rows, it skips the
round trip through a Python worker (the JVM's Arrow to the worker, and back, then to the driver), which
costs more than the work for a few hundred trips. Bigger ones (a catch-up) run on the executors, so a
cluster's cores share them. At 5,000 the driver's pass takes ~0.15 s (validation ~20 us a message, the
model ~3 us, one thread), about the round trip it saves at load 5; the gain at 1,000 trips/s: above."""
