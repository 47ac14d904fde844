"""Ingestion: replay NYC taxi trips from a file into Kafka, as if they were happening.

This is where the Lambda architecture's stream begins. Every trip of a
Kaggle-layout file picked up at or after the cutoff (``--cutoff``, default
``config.CUTOFF`` = 2016-06-01) becomes one message on the ``taxi-trips``
topic: key = the trip id, value = the trip as UTF-8 JSON
(``periscope.schema.record_to_json``). The trips before the cutoff are the
batch layer's history (``batch_processor.py import`` takes them), so each trip
of the shipped sample reaches the system once: January-May 2016 as history,
June 2016 as the stream. ``--cutoff none`` replays the whole file. The speed
layer (``kafka_consumer.py``, ``spark_streaming.py``) and the batch layer
(``batch_processor.py``) read the topic back, each in its own consumer group.

Run it (a broker must be up: ``make kafka-up``)::

    python kafka_producer.py                                # June 2016 of the shipped sample, at once
    python kafka_producer.py --speedup 3600                 # one hour of 2016 per second
    python kafka_producer.py --rate 200 --retime --loop     # an endless live feed at 200 trips/s
    python kafka_producer.py --input trips.parquet --cutoff none --limit 10000

The steps, as ``replay`` below takes them:

1. Load the trips and order them by pickup (a stable sort: equal pickups keep
   file order). A trip's partition comes from its key, so the messages of a
   partition are in pickup-time order too.
2. Cut at the cutoff. ``--limit N``: the replay is the first N trips from
   there; ``--loop``: start over at the end, ids kept unique (pass 2 sends
   ``id2875421-2``, pass 3 ``id2875421-3``: ``schema.pass_suffix``).
3. Resume: read back the keys already on the topic (all partitions, up to the
   end offsets of now; 4-7 s per 500,000 messages here) and leave out every
   trip of the replay whose key is among them, later passes' suffixed ids
   included (``resuming after 5,982 trips already on taxi-trips``). The replay
   does not change (``--limit`` still counts the trips sent before), so a
   restart with the same arguments completes it. ``--from-start`` sends every
   trip again; the views still count each trip once (the trip id is its identity).
4. Plan the chunks: ``--rate N`` trips per second, ``--speedup X`` (the real
   gaps between pickups divided by X), or as fast as possible. Pacing starts
   with the first trip a run sends; a replay that falls behind catches up.
   ``--retime`` moves each pickup to the local time it is sent (dropoff =
   pickup + ``trip_duration``), keeping ``original_pickup_datetime`` and
   ``original_dropoff_datetime`` in the record (consumers ignore extra fields).
5. Send, a callback counting each delivery, with at most ``--max-in-flight``
   trips unacknowledged (kafka-python 3 has no ``buffer_memory`` bound); then
   flush. The Kafka timestamp is the time of production (CreateTime), so
   retention never deletes replayed 2016 trips and consumers can measure
   end-to-end latency; the event time is in the record (``pickup_datetime``).
6. Sum up.

Delivery semantics, where they happen:

* Within a run, at least once, with the broker dropping the repeats:
  ``acks=all`` and an idempotent producer (``periscope.stream.PRODUCER_CONFIG``).
  Every batch is retried for up to two minutes, so a broker that restarts for
  a few seconds loses nothing, and the broker drops retried batches it already
  has (by producer id and sequence number), so it duplicates nothing either.
  Each send's outcome is counted by a callback; the exit code is 0 only if
  every trip was delivered.
* Across runs (a crash, ``kill -9``, Ctrl-C), the resume makes each trip of
  the replay land on the topic once: what the broker acknowledged, or received
  and wrote before the restart read the topic, is skipped; what it never got
  is sent. Two cases still put a trip there twice: two producers replaying into
  the same topic at the same time, and a message the dead run had in flight
  that the broker makes visible only after the restart has read the end
  offsets (a replica lagging behind for longer than the restart takes). The
  batch layer and the serving merge count such a trip once.

Output: what the cutoff left out and what a resume skips, first; a progress
line per second (``--progress``) while reading the topic back and while
sending; a summary at the end. Ctrl-C (or SIGTERM) stops sending, waits for the
trips in flight, prints the summary and exits with 130. How a pure-Python
producer keeps up 30,000-40,000 trips/s: "hot-path tuning", below.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pandas as pd
from kafka import KafkaProducer
from kafka.errors import KafkaError

from periscope import cli, config
from periscope.partitioner import key_partitions
from periscope.replay import (Chunk, Pacer, ReplayResult, chunk_plan, pacing_text, positions_on_topic,
                              summary_lines, value_maker)
from periscope.schema import format_time, parse_cutoff, pass_suffix, trips_to_messages
from periscope.sources import CsvLayoutError, LoadReport, read_trips, read_trips_parquet
from periscope.stream import (DELIVERY_TIMEOUT_MS, PRODUCER_CONFIG, BrokerUnavailable, read_topic_keys,
                              topic_exists, wait_for_broker)

log = logging.getLogger("kafka_producer")

DEFAULT_MAX_IN_FLIGHT = 20_000
"""Trips sent but not yet acknowledged, at most: about 7 MB of JSON."""
MAX_ERROR_EXAMPLES = 5
EXIT_INTERRUPTED = 130


class Refused(Exception):
    """A step cannot go on; the message says why and what to do, ``code`` is the exit code."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


# --- the steps ------------------------------------------------------------------------------------


def load_trips(path: Path) -> tuple[pd.DataFrame, LoadReport]:
    """Every well-formed trip of a Kaggle-layout CSV (plain or gzip) or Parquet file."""
    return read_trips_parquet(path) if path.suffix.lower() in (".parquet", ".pq") else read_trips(path)


def load(path: Path, out: TextIO) -> tuple[pd.DataFrame, LoadReport]:
    """``load_trips``, saying what was read and what was malformed; refused without any trip."""
    began = time.monotonic()
    try:
        trips, report = load_trips(path)
    except (FileNotFoundError, CsvLayoutError) as error:
        raise Refused(str(error), code=2) from None
    for line in report.summary_lines():
        print(line, file=out)
    if len(trips) == 0:
        raise Refused(f"{path} has no well-formed trip to send")
    print(f"loaded {len(trips):,} trips in {time.monotonic() - began:.1f} s, pickups {pickup_range(trips)}",
          file=out)
    return trips, report


def pickup_range(trips: pd.DataFrame) -> str:
    return f"{format_time(trips['pickup_datetime'].min())} .. {format_time(trips['pickup_datetime'].max())}"


def replay_order(trips: pd.DataFrame) -> pd.DataFrame:
    """The trips in pickup-time order; trips with the same pickup keep their file order."""
    order = np.argsort(trips["pickup_datetime"].to_numpy(), kind="stable")
    return trips.iloc[order].reset_index(drop=True)


def from_cutoff(trips: pd.DataFrame, cutoff_ms: int | None) -> tuple[pd.DataFrame, int]:
    """The trips (in replay order) picked up at or after ``cutoff_ms`` (None: all), and how many before it."""
    if cutoff_ms is None:
        return trips, 0
    start = int(np.searchsorted(trips["pickup_datetime"].to_numpy(), cutoff_ms, side="left"))
    return trips.iloc[start:].reset_index(drop=True), start


def cut_at_the_cutoff(trips: pd.DataFrame, args: argparse.Namespace, out: TextIO) -> tuple[pd.DataFrame, int]:
    """``from_cutoff``, saying what it left out as history; refused if no trip is left."""
    kept, history = from_cutoff(trips, args.cutoff)
    if args.cutoff is None:
        print("no cutoff: replaying every trip of the file", file=out)
    elif len(kept) == 0:
        raise Refused(f"no trip of {args.input} was picked up at or after the cutoff {format_time(args.cutoff)} "
                      f"(its pickups run {pickup_range(trips)}); give an earlier --cutoff, or --cutoff none to "
                      "replay the whole file")
    else:
        print(f"cutoff {format_time(args.cutoff)}: replaying the {len(kept):,} trips picked up at or after it; "
              f"the {history:,} before it are history (batch_processor.py imports them)", file=out)
    if args.limit and not args.loop and args.limit > len(kept):
        print(f"note: --limit {args.limit:,} is more than the {len(kept):,} trips of the replay; "
              "add --loop to send more", file=out)
    return kept, history


def planned_total(trips: int, limit: int | None, loop: bool) -> int | None:
    """How many trips the replay plans: the file once, ``--limit`` of them, or None (``--loop`` forever)."""
    if loop:
        return limit
    return min(limit, trips) if limit is not None else trips


def wait_for_the_topic(args: argparse.Namespace) -> None:
    """Wait for the broker (``--wait``); refused if the topic does not exist (it is never auto-created)."""
    wait_for_broker(args.bootstrap, "replay trips", timeout_s=args.wait, log=log)
    if not topic_exists(args.bootstrap, args.topic):
        raise Refused(f"topic {args.topic} does not exist at {args.bootstrap}; create it with "
                      f"`python -m periscope.kafka_local create-topics --bootstrap {args.bootstrap}` "
                      "(`make kafka-up` creates taxi-trips), or choose another with --topic")


def already_on_topic(args: argparse.Namespace, trips: pd.DataFrame, planned: int | None,
                     out: TextIO) -> np.ndarray:
    """Resume: the positions in the replay whose key is on the topic already, sorted, saying how many.

    Trip ``row`` of pass ``k`` is position ``(k - 1) * len(trips) + row``, key ``id + pass_suffix(k)``.
    """
    began = time.monotonic()

    def report(read: int, total: int) -> None:
        print(f"reading the keys already on {args.topic}: {read:,} of {total:,} messages "
              f"({time.monotonic() - began:.0f} s)", file=out, flush=True)

    longest_key = int(trips["id"].str.len().max()) * 4 + 12  # the longest id in UTF-8, a pass suffix
    keys, _ = read_topic_keys(args.bootstrap, args.topic, max_key_bytes=longest_key,
                              report=report if args.progress > 0 else None, report_every_s=args.progress or 1.0)
    skip = positions_on_topic(trips["id"], keys, planned, args.loop)
    if len(skip):
        print(f"resuming after {len(skip):,} trips already on {args.topic} (--from-start sends them again)",
              file=out, flush=True)
    return skip


def plan_chunks(trips: pd.DataFrame, partitions: list[int], *, rate: float | None = None,
                speedup: float | None = None, limit: int | None = None, loop: bool = False,
                retime_trips: bool = False, skip: np.ndarray | None = None) -> Iterator[Chunk]:
    """The replay as a lazy sequence of chunks of messages: which trips, which keys and values, when.

    ``chunk_plan`` cuts the replay (``trips`` in replay order) into chunks, pass
    after pass, leaves out the ``skip`` positions and gives each trip its due
    time; ``make_messages`` then encodes one chunk at a time, so memory stays
    that of the input.
    """
    for chunk in chunk_plan(trips["pickup_datetime"].to_numpy(), CHUNK_TRIPS, rate=rate, speedup=speedup,
                            limit=limit, loop=loop, skip=skip):
        make_messages(chunk, trips.iloc[chunk.rows], partitions, retime_trips)
        yield chunk


@dataclass
class Deliveries:
    """What the broker answered for each sent trip, counted by the send's callbacks.

    The callbacks run on kafka-python's I/O thread, or on the sending thread
    when a send has completed before its callback was added: hence the lock.
    """

    delivered: int = 0
    failed: int = 0
    bytes: int = 0
    per_partition: Counter = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def on_delivered(self, metadata: Any) -> None:
        with self.lock:
            self.delivered += 1
            self.bytes += metadata.serialized_key_size + metadata.serialized_value_size
            self.per_partition[metadata.partition] += 1

    def on_failed(self, key: bytes, error: BaseException) -> None:
        with self.lock:
            self.failed += 1
            if len(self.errors) < MAX_ERROR_EXAMPLES:
                self.errors.append(f"{key.decode(errors='replace')}: {type(error).__name__}: {error}")


def send_chunks(producer: KafkaProducer, topic: str, chunks: Iterator[Chunk], deliveries: Deliveries,
                pacer: Pacer) -> str | None:
    """Send every trip, with callbacks counting its delivery; return why sending stopped early, or None.

    ``send()`` only queues a message; the producer's I/O thread sends it in a
    batch, and once every in-sync replica has it (acks=all) its callback runs.
    The pacer holds the loop back until each trip is due and until a chunk
    fits under ``--max-in-flight``. Ctrl-C propagates.
    """
    send, on_delivered, on_failed = producer.send, deliveries.on_delivered, deliveries.on_failed
    pacer.begin()
    elapsed = 0.0
    for chunk in chunks:
        pacer.wait_for_room(chunk)  # backpressure
        value_of, due, partitions, sent = value_maker(chunk), chunk.due_s, chunk.partitions, chunk.first_index
        try:
            for i, key in enumerate(chunk.keys):
                if due is not None and due[i] > elapsed:  # pacing
                    elapsed = pacer.wait_until(due[i], sent, chunk.pickup_ms[i - 1] if i else None)
                future = send(topic, value=value_of(i), key=key, partition=partitions[i])
                future.add_callback(on_delivered).add_errback(on_failed, key)
                sent += 1
        except KafkaError as error:
            return f"sending {key.decode(errors='replace')} failed: {type(error).__name__}: {error}"
        finally:
            pacer.sent = sent
        pacer.chunk_sent(chunk)  # a progress line once per --progress seconds
    return None


def wait_for_deliveries(producer: KafkaProducer, stopped: str | None) -> str | None:
    """Flush: wait for every trip in flight (a second Ctrl-C gives up) and close; return ``stopped``, updated."""
    timeout_s = DELIVERY_TIMEOUT_MS / 1000 + 5
    try:
        producer.flush(timeout=timeout_s)
        producer.close(timeout=timeout_s)
    except KeyboardInterrupt:
        stopped = f"{stopped or 'interrupted'}; interrupted again while waiting for deliveries"
        producer.close(timeout=0)
    except KafkaError as error:
        stopped = "; ".join(filter(None, [stopped, f"waiting for deliveries failed: {error}"]))
        producer.close(timeout=0)
    return stopped


def sum_up(result: ReplayResult, args: argparse.Namespace, report: LoadReport, out: TextIO) -> int:
    """Print the summary; the exit code: 0 if every trip sent was delivered, 130 if interrupted, else 1."""
    for line in summary_lines(result, args.topic, args.bootstrap, report):
        print(line, file=out)
    out.flush()
    if result.stopped and result.stopped.startswith("interrupted"):
        return EXIT_INTERRUPTED
    if not result.ok:
        why = result.errors[0] if result.errors else result.stopped
        print(f"error: {result.sent - result.delivered:,} of {result.sent:,} trips were not delivered "
              f"(e.g. {why})", file=sys.stderr)
        return 1
    return 0


# --- the layer, step by step ----------------------------------------------------------------------


def replay(args: argparse.Namespace, out: TextIO | None = None) -> tuple[ReplayResult | None, int]:
    """The steps in order; the result (None if refused before sending) and the exit code.

    Progress and summary go to ``out`` (standard output unless given), errors to standard error.
    """
    out = out or sys.stdout
    warn_without_crc32c()
    try:
        # 1. Load the trips and order them by pickup: the replay is the order they happened in.
        trips, report = load(args.input, out)
        trips = replay_order(trips)
        # 2. Cut at the cutoff: the trips before it are the batch layer's history.
        trips, history = cut_at_the_cutoff(trips, args, out)
        planned = planned_total(len(trips), args.limit, args.loop)
        # 3. Skip what is already on the topic (resume), unless --from-start.
        wait_for_the_topic(args)
        skip = np.empty(0, dtype=np.int64) if args.from_start else already_on_topic(args, trips, planned, out)
        counts = {"skipped": len(skip), "history": history, "cutoff_ms": args.cutoff}
        if planned is not None and len(skip) == planned:
            print(f"nothing left to send: all {planned:,} trips of the replay are already on {args.topic}",
                  file=out)
            return ReplayResult(0, 0, 0, 0.0, 0, {}, [], 1, None, **counts), 0
        producer = KafkaProducer(bootstrap_servers=args.bootstrap, **PRODUCER_CONFIG)  # acks=all, idempotent
    except Refused as refusal:
        out.flush()
        print(f"error: {refusal}", file=sys.stderr)
        return None, refusal.code
    except BrokerUnavailable as error:
        print(f"error: {error}", file=sys.stderr)
        return None, 1
    except KafkaError as error:
        print(f"error: cannot talk to Kafka at {args.bootstrap}: {type(error).__name__}: {error}. "
              "Is it running? `make kafka-up` starts the local broker.", file=sys.stderr)
        return None, 1

    # 4. Plan the chunks: which trips, keyed and encoded, due when (--rate, --speedup).
    partitions = sorted(producer.partitions_for(args.topic))
    to_send = f"{planned - len(skip):,} trips" if planned is not None else "trips without end (Ctrl-C stops)"
    print(f"replaying {to_send} to {args.topic} ({len(partitions)} partitions) at {args.bootstrap}, "
          f"{pacing_text(args.rate, args.speedup)}{', retimed to now' if args.retime else ''}", file=out, flush=True)
    chunks = plan_chunks(trips, partitions, rate=args.rate, speedup=args.speedup, limit=args.limit, loop=args.loop,
                         retime_trips=args.retime, skip=skip)

    # 5. Send, a callback counting each delivery; then flush: wait for every trip in flight.
    deliveries = Deliveries()
    pacer = Pacer(deliveries, max_in_flight=args.max_in_flight, progress_s=args.progress,
                  bootstrap=args.bootstrap, out=out)
    try:
        stopped = send_chunks(producer, args.topic, chunks, deliveries, pacer)
    except KeyboardInterrupt:
        stopped = "interrupted"
        print(f"\ninterrupted: waiting for the {pacer.in_flight():,} trips in flight "
              "(interrupt again to give up)", file=out, flush=True)
    stopped = wait_for_deliveries(producer, stopped)

    # 6. Sum up: exit code 0 only if every trip sent was delivered.
    d = deliveries
    result = ReplayResult(pacer.sent, d.delivered, d.failed, pacer.elapsed_s(), d.bytes, dict(d.per_partition),
                          list(d.errors), max(pacer.passes, 1), stopped, **counts)
    return result, sum_up(result, args, report, out)


# --- hot-path tuning (measured: bench/bench_producer.py, docs/BENCHMARKS.md "Producer") -----------
# kafka-python is pure Python, so one core's interpreter sets the ceiling, not Kafka; the send
# loop does nothing per trip but send() and its callbacks, the rest is done a chunk at a time:
# * CHUNK_TRIPS trips per chunk: encoding, partitioning, the room check and the progress check run
#   once per chunk, not once per trip.
# * Values pre-encoded by schema.trips_to_messages (one string template, byte-identical to
#   record_to_json, a test checks it): 4x faster. With --retime each value is made at send time by
#   record_to_json instead (periscope.replay.value_maker): 13,000-21,000 trips/s.
# * Partitions precomputed by periscope.partitioner.key_partitions (the partition Kafka's default
#   partitioner picks, murmur2 vectorised) and passed to send(): about a third less CPU per trip.
# * Batching (periscope.stream.PRODUCER_CONFIG, shared with the API-simulation DAG): linger_ms=10
#   and batch_size=128 KiB, about 400 trips per partition and request, no visible delay.
# * The C crc32c package: without it kafka-python checksums every batch in pure Python, 2-3x
#   slower (about 9,500 trips/s against 30,000-40,000).

CHUNK_TRIPS = 1_000
"""Trips encoded, checked for room and checked for progress at a time."""


def make_messages(chunk: Chunk, rows: pd.DataFrame, partitions: list[int], retime_trips: bool) -> None:
    """Fill in the chunk's keys (ids with the pass suffix), partitions and values (or, --retime, records)."""
    suffix = pass_suffix(chunk.pass_number)
    if retime_trips:
        chunk.records = rows.to_dict("records")
        for record in chunk.records:
            record["id"] += suffix
        chunk.keys = [record["id"].encode() for record in chunk.records]
    else:
        chunk.keys, chunk.values = trips_to_messages(rows, suffix)
    chunk.partitions = key_partitions(chunk.keys, partitions)


def warn_without_crc32c() -> None:
    if importlib.util.find_spec("crc32c") is None:
        log.warning("the crc32c package is not installed, so kafka-python checksums every batch in pure "
                    "Python (2-3x slower): pip install 'kafka-python[crc32c]'")


# --- command line ---------------------------------------------------------------------------------


def cutoff_value(text: str) -> int | None:
    """``--cutoff`` as ms since 1970 (New York wall clock), or None for ``none``."""
    try:
        return parse_cutoff(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Replay NYC taxi trips from a Kaggle-layout file into Kafka, in pickup-time order, from the "
                    "cutoff on; restarted, it resumes after the trips already on the topic.",
        formatter_class=cli.HelpFormatter,
    )
    parser.add_argument("--input", type=Path, default=config.SAMPLE_CSV, metavar="FILE",
                        help="trips in the Kaggle NYC Taxi Trip Duration layout: CSV (plain or .gz) or "
                             ".parquet with the same columns (default: %(default)s, env PERISCOPE_SAMPLE_CSV)")
    parser.add_argument("--cutoff", type=cutoff_value, default=config.CUTOFF, metavar="TIME",
                        help="replay only the trips picked up at or after this New York wall-clock time, "
                             "2016-06-01 or '2016-06-01 12:00:00'; the ones before it are the batch layer's "
                             f"history; none = every trip (default: {config.CUTOFF}, env PERISCOPE_CUTOFF)")
    parser.add_argument("--topic", default=config.TRIPS_TOPIC,
                        help="topic to send to (default: %(default)s, env PERISCOPE_TRIPS_TOPIC)")
    parser.add_argument("--bootstrap", default=config.KAFKA_BOOTSTRAP_SERVERS, metavar="HOST:PORT[,...]",
                        help="Kafka bootstrap servers (default: %(default)s, env KAFKA_BOOTSTRAP_SERVERS)")
    pacing = parser.add_argument_group("pacing (give at most one; neither = as fast as possible)")
    pacing.add_argument("--rate", type=float, metavar="TRIPS_PER_S",
                        help="send this many trips per second (default: no pacing)")
    pacing.add_argument("--speedup", type=float, metavar="X",
                        help="keep the real gaps between pickups, divided by X (3600 = an hour per second) "
                             "(default: no pacing)")
    parser.add_argument("--limit", type=int, metavar="N",
                        help="the replay is its first N trips (pickup order, from the cutoff on), those already "
                             "on the topic included (default: all, once; forever with --loop)")
    parser.add_argument("--loop", action="store_true",
                        help="start over at the end of the file; pass k >= 2 sends ids with the suffix -k "
                             "(id2875421-2) so every id stays unique (default: one pass)")
    parser.add_argument("--retime", action="store_true",
                        help="pickup = the local time of sending (whole seconds), dropoff = pickup + trip_duration; "
                             "the record keeps original_pickup_datetime and original_dropoff_datetime "
                             "(default: the trips' own times)")
    parser.add_argument("--from-start", action="store_true",
                        help="send every trip of the replay, even those already on the topic, which then holds "
                             "them twice; the views still count each trip once (default: read the topic's keys "
                             "back and resume after the trips already on it)")
    parser.add_argument("--wait", type=float, default=60.0, metavar="SECONDS",
                        help="how long to wait for the broker to answer before giving up, 0 = do not wait "
                             "(default: %(default)g)")
    parser.add_argument("--max-in-flight", type=int, default=DEFAULT_MAX_IN_FLIGHT, metavar="N",
                        help="trips sent but not yet acknowledged, at most; the replay waits for the broker "
                             "beyond that, so memory stays bounded")
    parser.add_argument("--progress", type=float, default=1.0, metavar="SECONDS",
                        help="print a progress line this often, 0 = only the summary (default: %(default)g)")
    args = parser.parse_args(argv)
    if args.rate is not None and args.speedup is not None:
        parser.error("--rate and --speedup are alternatives: give --rate N for N trips per second, or "
                     "--speedup X to replay X times faster than the trips happened (neither = as fast as possible)")
    if args.rate is not None and not (args.rate > 0 and np.isfinite(args.rate)):
        parser.error(f"--rate must be a positive number of trips per second, e.g. --rate 500; got {args.rate:g}")
    if args.speedup is not None and not (args.speedup > 0 and np.isfinite(args.speedup)):
        parser.error(f"--speedup must be a positive factor, e.g. --speedup 3600 for an hour per second; "
                     f"got {args.speedup:g}")
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be at least 1 trip; got {args.limit} (leave it out to send the whole file)")
    if not args.input.is_file():
        parser.error(f"--input {args.input}: no such file; give a Kaggle-layout CSV or Parquet file "
                     f"(the shipped sample is {config.SAMPLE_CSV})")
    if args.wait < 0:
        parser.error(f"--wait must be 0 (fail at once) or a number of seconds; got {args.wait:g}")
    if args.max_in_flight < 1:
        parser.error(f"--max-in-flight must be at least 1, e.g. {DEFAULT_MAX_IN_FLIGHT}; got {args.max_in_flight}")
    if args.progress < 0:
        parser.error(f"--progress must be 0 (off) or a number of seconds; got {args.progress:g}")
    return args


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Parse the flags, then replay; SIGTERM stops it the way Ctrl-C does."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("kafka").setLevel(logging.CRITICAL)  # our own lines say what went wrong, once
    previous = signal.signal(signal.SIGTERM, _interrupt)  # `kill` and schedulers stop it as Ctrl-C does
    try:
        _, code = replay(args)
    except KeyboardInterrupt:
        print("interrupted before sending began", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGTERM, previous)
    return code


if __name__ == "__main__":
    sys.exit(main())
