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

What it sends, and why:

* The replay is the trips from the cutoff on, in pickup-time order (a stable
  sort, so equal pickups keep file order), the way they happened; ``--limit N``
  makes it the first N of them. A trip's partition is chosen from its key, so
  all messages of a partition are in pickup-time order too.
* The Kafka timestamp is left to the producer: it is the time of production
  (CreateTime). Broker retention therefore never deletes replayed 2016 trips,
  and a consumer can measure end-to-end latency. The event time is in the
  record (``pickup_datetime``).
* ``--retime`` makes the replay look live: each trip's pickup becomes the
  local wall-clock time at which it is sent (whole seconds, no time zone, like
  the Kaggle times), its dropoff that plus ``trip_duration``, and the original
  times travel along as ``original_pickup_datetime`` and
  ``original_dropoff_datetime`` (consumers ignore extra fields).
* ``--loop`` starts over at the end of the replay. Ids stay unique: the second
  pass sends ``id2875421-2``, the third ``id2875421-3``, and so on (the first
  pass sends the ids unchanged, ``schema.pass_suffix``), so no view counts a
  trip twice.

Resume: a restarted replay continues where the last one stopped. Before
sending, the producer reads the keys of every message already on the topic
(``periscope.stream.read_topic_keys``: all partitions, from the beginning to
the end offsets taken then; keys only) and leaves out every trip of the
replay whose key is among them, saying so first: ``resuming after 5,982 trips
already on taxi-trips``. The replay itself does not change: ``--limit`` still
means its first N trips, sent before or now, so a restart with the same
arguments completes the same replay, and with ``--loop`` the suffixed ids of
later passes are planned keys like any other. The skip is worked out once,
vectorised (``positions_on_topic``: the positions in the replay whose key is
on the topic), and applied a chunk at a time as a mask before encoding, so
the send loop does no extra work per trip. ``--from-start`` skips the
read-back and sends every trip again; the topic then holds them twice, and
the views still count each trip once (the trip id is its identity).

Pacing: ``--rate N`` sends N trips per second; ``--speedup X`` keeps the real
gaps between pickups, divided by X; neither sends as fast as possible. Pacing
starts with the first trip a run sends, so a resumed replay does not wait out
the part already sent. A replay that falls behind (a slow broker) catches up
as fast as it can, so the average pace holds.

Delivery semantics, where they happen:

* Within a run, at least once, with the broker dropping the repeats:
  ``acks=all`` and an idempotent producer. Every batch is retried for up to
  two minutes, so a broker that restarts for a few seconds loses nothing, and
  the broker drops retried batches it already has (by producer id and
  sequence number), so it duplicates nothing either. Each send's outcome is
  counted by a callback; the exit code is 0 only if every trip was delivered.
* Across runs (a crash, ``kill -9``, Ctrl-C), the resume makes each trip of
  the replay land on the topic once: what the broker acknowledged, or
  received and wrote before the restart read the topic, is skipped; what it
  never got is sent. Two cases still put a trip there twice: two producers
  replaying into the same topic at the same time, and a message the dead run
  had in flight that the broker makes visible only after the restart has
  read the end offsets (a replica lagging behind for longer than the restart
  takes). The batch layer and the serving merge count such a trip once.

kafka-python 3 has no ``buffer_memory`` bound, so the replay bounds the trips
in flight itself (``--max-in-flight``) and waits when the broker falls behind.
The input file is read whole, to sort it; messages are made a chunk at a time.
Reading the topic back keeps only its distinct keys (some 10-20 bytes each) and
takes 4-7 s per 500,000 messages on this project's 2-core machine (kafka-python
decodes every record).

Speed: kafka-python is pure Python, so the send loop does as little as
possible per trip. A chunk of trips at a time, values are encoded by
``schema.trips_to_messages`` (byte-identical to ``record_to_json``, 4x faster)
and partitions computed with a vectorised murmur2 (the hash of Kafka's
default partitioner); backpressure and progress are looked at once per chunk.
With ``--retime`` each value is made at send time by ``record_to_json``, which
costs about half the top rate. Install ``crc32c`` (``pip install
kafka-python[crc32c]``): without it kafka-python checksums every batch in pure
Python, which alone makes the producer two to three times slower.

Output: what the cutoff left out and what a resume skips, first; one progress
line per second (``--progress``), while reading the topic back and while
sending; a summary at the end. Ctrl-C (or SIGTERM) stops sending, waits for the
trips in flight, prints the summary and exits with 130.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import itertools
import logging
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pandas as pd
from kafka import KafkaAdminClient, KafkaProducer
from kafka.errors import KafkaError

from periscope import config
from periscope.schema import EPOCH, format_time, parse_cutoff, pass_suffix, record_to_json, trips_to_messages
from periscope.sources import CsvLayoutError, LoadReport, read_trips, read_trips_parquet
from periscope.stream import BrokerUnavailable, read_topic_keys, wait_for_broker

log = logging.getLogger("kafka_producer")

CHUNK_TRIPS = 1_000
"""Trips encoded, checked for room and checked for progress at a time."""

DEFAULT_MAX_IN_FLIGHT = 20_000
"""Trips sent but not yet acknowledged, at most: about 7 MB of JSON."""

DELIVERY_TIMEOUT_MS = 120_000
"""How long each batch is retried; a broker restart takes a few seconds."""

PRODUCER_CONFIG: dict[str, Any] = {
    "client_id": "periscope-producer",
    "acks": "all",  # written to every in-sync replica before it counts as delivered
    "enable_idempotence": True,  # retries never duplicate, order within a partition holds
    "delivery_timeout_ms": DELIVERY_TIMEOUT_MS,
    "request_timeout_ms": 30_000,
    "linger_ms": 10,  # wait up to 10 ms to fill a batch: far fewer requests, no visible delay
    "batch_size": 128 * 1024,  # about 400 trips per partition and request
    "reconnect_backoff_max_ms": 1_000,  # a restarted broker is found again within a second
    "max_block_ms": 10_000,  # send() blocks only while topic metadata is missing
    "allow_auto_create_topics": False,
}

MURMUR2_SEED, MURMUR2_M = 0x9747B28C, np.uint32(0x5BD1E995)
PARQUET_SUFFIXES = (".parquet", ".pq")
MAX_ERROR_EXAMPLES = 5
STALL_WARNING_S = 5.0
EXIT_INTERRUPTED = 130
_MS = timedelta(milliseconds=1)

# --- pure functions: what to send, in which order, when ---------------------------------------


def replay_order(trips: pd.DataFrame) -> pd.DataFrame:
    """The trips in pickup-time order; trips with the same pickup keep their file order."""
    order = np.argsort(trips["pickup_datetime"].to_numpy(), kind="stable")
    return trips.iloc[order].reset_index(drop=True)


def from_cutoff(trips: pd.DataFrame, cutoff_ms: int | None) -> tuple[pd.DataFrame, int]:
    """The trips (in replay order) picked up at or after ``cutoff_ms``, and how many were before it.

    The batch layer imports the trips before the cutoff as history; the stream
    continues where the history ends. ``None`` keeps every trip.
    """
    if cutoff_ms is None:
        return trips, 0
    start = int(np.searchsorted(trips["pickup_datetime"].to_numpy(), cutoff_ms, side="left"))
    return trips.iloc[start:].reset_index(drop=True), start


def planned_total(trips: int, limit: int | None, loop: bool) -> int | None:
    """How many trips the replay plans: the file once, ``--limit`` of them, or None (``--loop`` forever)."""
    if loop:
        return limit
    return min(limit, trips) if limit is not None else trips


def positions_on_topic(ids: pd.Series, keys: np.ndarray, planned: int | None, loop: bool) -> np.ndarray:
    """The positions in the replay whose key is already on the topic, sorted: the trips a resume skips.

    Position ``(k - 1) * len(ids) + row`` is trip ``row`` of pass ``k``, whose
    key is ``ids[row] + pass_suffix(k)``; ``planned`` bounds the positions
    (None = without end). ``keys`` are the topic's distinct keys, sorted
    (``periscope.stream.read_topic_keys``). Only the passes some key can
    belong to are compared, pass 1 and pass k when a key ends in ``-k``, so
    the work grows with the topic, not with an endless ``--loop``. Everything
    is vectorised: a binary search of each planned key among the topic's.
    """
    n = len(ids)
    if n == 0 or len(keys) == 0 or planned == 0:
        return np.empty(0, dtype=np.int64)
    passes = {1}
    if loop:
        head, separator, tail = np.strings.rpartition(keys, b"-")
        numbered = ((separator == b"-") & (np.strings.str_len(head) > 0) & (np.strings.str_len(tail) <= 9)
                    & np.strings.isdigit(tail))
        passes.update(number for number in np.unique(tail[numbered].astype(np.int64)).tolist() if number >= 2)
    last_pass = None if planned is None else -(-planned // n)
    trip_keys = np.strings.encode(np.asarray(ids, dtype=str), "utf-8")
    found = [np.empty(0, dtype=np.int64)]
    for number in sorted(passes):
        if last_pass is not None and number > last_pass:
            break
        planned_keys = trip_keys if number == 1 else np.strings.add(trip_keys, pass_suffix(number).encode())
        at = np.minimum(np.searchsorted(keys, planned_keys), len(keys) - 1)
        found.append(np.flatnonzero(keys[at] == planned_keys).astype(np.int64) + (number - 1) * n)
    positions = np.concatenate(found)
    return positions[positions < planned] if planned is not None else positions


def murmur2(keys: list[bytes]) -> np.ndarray:
    """Kafka's murmur2 hash of each key (as ``Utils.murmur2`` in the Java client), vectorised.

    Keys of the same length are hashed together, four bytes at a time, in
    uint32 arithmetic that wraps around exactly as Java's int does.
    """
    hashes = np.empty(len(keys), dtype=np.uint32)
    lengths = np.fromiter(map(len, keys), dtype=np.int64, count=len(keys))
    for length in np.unique(lengths).tolist():
        rows = np.flatnonzero(lengths == length)
        data = np.frombuffer(b"".join([keys[row] for row in rows]), dtype=np.uint8).reshape(len(rows), length)
        whole = length // 4
        words = data[:, :whole * 4].copy().view("<u4")
        h = np.full(len(rows), MURMUR2_SEED ^ length, dtype=np.uint32)
        with np.errstate(over="ignore"):
            for column in range(whole):
                k = words[:, column] * MURMUR2_M
                k ^= k >> np.uint32(24)
                k *= MURMUR2_M
                h *= MURMUR2_M
                h ^= k
            if length % 4:
                for byte in range(length % 4 - 1, -1, -1):
                    h ^= data[:, whole * 4 + byte].astype(np.uint32) << np.uint32(8 * byte)
                h *= MURMUR2_M
            h ^= h >> np.uint32(13)
            h *= MURMUR2_M
            h ^= h >> np.uint32(15)
        hashes[rows] = h
    return hashes


def key_partitions(keys: list[bytes], partitions: list[int]) -> list[int]:
    """The partition Kafka's default partitioner picks for each key (Java and kafka-python alike).

    Computing it here, a chunk at a time, spares kafka-python a pure-Python
    hash and partition lookup per message: about a third less CPU per trip.
    """
    positive = murmur2(keys).astype(np.int64) & 0x7FFFFFFF
    return np.asarray(sorted(partitions))[positive % len(partitions)].tolist()


def retime(record: dict[str, Any], now_ms: int) -> tuple[dict[str, Any], dict[str, str]]:
    """A trip moved to pickup at ``now_ms`` (whole seconds), and its original times.

    Returns ``(moved record, extra JSON fields)``: dropoff = new pickup +
    ``trip_duration``; the extras are ``original_pickup_datetime`` and
    ``original_dropoff_datetime`` as Kaggle text, for ``record_to_json(moved, **extras)``.
    """
    pickup = now_ms - now_ms % 1000
    moved = dict(record, pickup_datetime=pickup, dropoff_datetime=pickup + record["trip_duration"] * 1000)
    original = {
        "original_pickup_datetime": format_time(record["pickup_datetime"]),
        "original_dropoff_datetime": format_time(record["dropoff_datetime"]),
    }
    return moved, original


def local_now_ms() -> int:
    """Now on the local wall clock, in the schema's time form (whole seconds, no time zone)."""
    return (datetime.now().replace(microsecond=0) - EPOCH) // _MS


def rate_schedule(first_index: int, count: int, rate: float) -> np.ndarray:
    """Seconds after the start at which trips ``first_index ...`` are due at ``rate`` trips/s."""
    return np.arange(first_index, first_index + count, dtype=np.float64) / rate


def speedup_schedule(event_s: np.ndarray, pass_number: int, span_s: float, speedup: float) -> np.ndarray:
    """Seconds after the start at which trips are due, ``speedup`` times faster than real time.

    ``event_s`` is each trip's pickup in seconds after the file's first pickup,
    ``span_s`` the file's first-to-last pickup span; pass 2 of ``--loop`` begins
    where pass 1 ends.
    """
    return ((pass_number - 1) * span_s + np.asarray(event_s, dtype=np.float64)) / speedup


@dataclass
class Chunk:
    """Up to ``CHUNK_TRIPS`` consecutive trips, ready to send."""

    pass_number: int
    first_index: int  # how many trips this run sent before this chunk (skipped ones not counted)
    keys: list[bytes]
    partitions: list[int]  # of each trip, from its key
    values: list[bytes] | None  # the JSON values, or None when they are made at send time (--retime)
    records: list[dict[str, Any]] | None  # with --retime: the trips, ids already suffixed
    due_s: list[float] | None  # seconds after the start each trip is due; None = at once
    pickup_ms: list[int]  # event time of each trip (before --retime)


def plan_chunks(trips: pd.DataFrame, partitions: list[int], *, rate: float | None = None, speedup: float | None = None,
                limit: int | None = None, loop: bool = False, retime_trips: bool = False,
                skip: np.ndarray | None = None, chunk_trips: int = CHUNK_TRIPS) -> Iterator[Chunk]:
    """The replay as a lazy sequence of chunks: which trips, which keys and values, when.

    ``trips`` must be in replay order, ``partitions`` are the topic's. ``limit``
    counts positions in the replay, sent or skipped; ``skip`` holds the sorted
    positions not to send (``positions_on_topic``): a resumed replay is the
    same replay with those trips left out, a chunk at a time by a boolean mask,
    before anything is encoded. Pacing starts with the first trip this run
    sends. Nothing here reads a clock or a socket; encoding happens one chunk
    at a time, so memory stays that of the input.
    """
    n = len(trips)
    if n == 0:
        return
    pickups = trips["pickup_datetime"].to_numpy()
    event_s = (pickups - pickups[0]) / 1000.0
    span_s = float(event_s[-1])
    skip = skip if skip is not None and len(skip) else None
    planned = sent = 0
    origin_s: float | None = None
    for pass_number in itertools.count(1) if loop else (1,):
        suffix = pass_suffix(pass_number)
        for begin in range(0, n, chunk_trips):
            count = min(chunk_trips, n - begin)
            if limit is not None:
                count = min(count, limit - planned)
            if count <= 0:
                return
            rows = slice(begin, begin + count)
            first, planned = planned, planned + count
            if skip is not None:
                low, high = np.searchsorted(skip, [first, first + count])
                if high > low:
                    keep = np.ones(count, dtype=bool)
                    keep[skip[low:high] - first] = False
                    rows = np.flatnonzero(keep) + begin
                    if len(rows) == 0:
                        continue
            chunk = trips.iloc[rows]
            count = len(chunk)
            if rate is not None:
                due = rate_schedule(sent, count, rate).tolist()
            elif speedup is not None:
                due_s = speedup_schedule(event_s[rows], pass_number, span_s, speedup)
                origin_s = due_s[0] if origin_s is None else origin_s
                due = (due_s - origin_s).tolist()
            else:
                due = None
            if retime_trips:
                records = chunk.to_dict("records")
                for record in records:
                    record["id"] += suffix
                keys, values = [record["id"].encode() for record in records], None
            else:
                records = None
                keys, values = trips_to_messages(chunk, suffix)
            yield Chunk(pass_number, sent, keys, key_partitions(keys, partitions), values, records, due,
                        pickups[rows].tolist())
            sent += count


# --- pure functions: what the user reads -----------------------------------------------------


def progress_line(elapsed_s: float, sent: int, delivered: int, failed: int, rate: float,
                  event_ms: int | None) -> str:
    """One line of the per-second progress report."""
    event = f"  event time {format_time(event_ms)}" if event_ms is not None else ""
    return (f"{elapsed_s:7.1f} s  sent {sent:>11,}  delivered {delivered:>11,}  failed {failed:,}  "
            f"{rate:>9,.0f} trips/s  in flight {sent - delivered - failed:>7,}{event}")


def pacing_text(rate: float | None, speedup: float | None) -> str:
    if rate is not None:
        return f"at {rate:,g} trips/s"
    if speedup is not None:
        return f"{speedup:,g}x faster than real time"
    return "as fast as possible"


@dataclass
class Deliveries:
    """What the broker answered for each sent trip.

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


@dataclass
class ReplayResult:
    """Everything the summary says, for callers such as the benchmark."""

    sent: int
    delivered: int
    failed: int
    elapsed_s: float
    bytes: int
    per_partition: dict[int, int]
    errors: list[str]
    passes: int
    stopped: str | None  # why sending stopped early: "interrupted", a send error; None if it completed
    skipped: int = 0  # planned trips already on the topic, not sent again (resume)
    history: int = 0  # trips of the file picked up before the cutoff, left out
    cutoff_ms: int | None = None

    @property
    def rate(self) -> float:
        return self.delivered / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def ok(self) -> bool:
        return self.stopped is None and self.failed == 0 and self.delivered == self.sent


def summary_lines(result: ReplayResult, topic: str, bootstrap: str, report: LoadReport) -> list[str]:
    """The end-of-run summary: counts, time, rate, partitions, and what was not sent or delivered."""
    mb_s = result.bytes / 1e6 / result.elapsed_s if result.elapsed_s > 0 else 0.0
    passes = f" in {result.passes} passes" if result.passes > 1 else ""
    lines = [
        f"summary: sent {result.sent:,} trips{passes} to {topic} at {bootstrap} in {result.elapsed_s:.2f} s",
        f"  delivered {result.delivered:,}, failed {result.failed:,}; "
        f"{result.rate:,.0f} trips/s, {mb_s:.1f} MB/s on average",
    ]
    if result.per_partition:
        lines.append("  per partition: " + "  ".join(f"{partition}: {count:,}"
                                                      for partition, count in sorted(result.per_partition.items())))
    unconfirmed = result.sent - result.delivered - result.failed
    if unconfirmed:
        lines.append(f"  {unconfirmed:,} trips were still in flight when the producer was closed: "
                     "they may or may not be in the topic")
    lines += [f"  failed e.g. {error}" for error in result.errors]
    if result.skipped:
        lines.append(f"  skipped {result.skipped:,} trips already on {topic} "
                     "(resumed; --from-start sends them again)")
    if result.history:
        lines.append(f"  left out {result.history:,} trips picked up before the cutoff "
                     f"{format_time(result.cutoff_ms)} (history, for batch_processor.py)")
    if report.rows_malformed:
        lines.append(f"  not sent: {report.rows_malformed:,} malformed rows of {report.source} "
                     f"({', '.join(f'{reason} {count:,}' for reason, count in sorted(report.malformed.items()))})")
    if result.stopped:
        lines.append(f"  stopped early: {result.stopped}")
    return lines


# --- I/O: reading the input, talking to Kafka ----------------------------------------------


def load_trips(path: Path) -> tuple[pd.DataFrame, LoadReport]:
    """Every well-formed trip of a Kaggle-layout CSV (plain or gzip) or Parquet file."""
    if path.suffix.lower() in PARQUET_SUFFIXES:
        return read_trips_parquet(path)
    return read_trips(path)


def topic_exists(bootstrap: str, topic: str) -> bool:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="periscope-producer-check")
    try:
        return topic in admin.list_topics()
    finally:
        admin.close()


class Replay:
    """The send loop: pacing, backpressure, delivery counting, progress lines."""

    def __init__(self, producer: KafkaProducer, topic: str, args: argparse.Namespace, out: TextIO):
        self.producer, self.topic, self.args, self.out = producer, topic, args, out
        self.deliveries = Deliveries()
        self.sent = 0
        self.passes = 0
        self.event_ms: int | None = None
        self.start = self.last_report = time.monotonic()
        self.sent_at_last_report = 0
        self.last_delivered, self.last_delivery_change, self.stall_warned = 0, self.start, False

    def run(self, chunks: Iterator[Chunk]) -> str | None:
        """Send every chunk; return why sending stopped early, or None. Ctrl-C propagates."""
        self.start = self.last_report = self.last_delivery_change = time.monotonic()
        send, topic = self.producer.send, self.topic
        on_delivered, on_failed = self.deliveries.on_delivered, self.deliveries.on_failed
        elapsed = 0.0
        for chunk in chunks:
            self.passes = chunk.pass_number
            self.wait_for_room(len(chunk.keys))
            value_of = self.value_maker(chunk)
            due, partitions = chunk.due_s, chunk.partitions
            sent = chunk.first_index
            try:
                for i, key in enumerate(chunk.keys):
                    if due is not None and due[i] > elapsed:
                        elapsed = self.wait_until(due[i], sent, chunk.pickup_ms[i - 1] if i else self.event_ms)
                    future = send(topic, value=value_of(i), key=key, partition=partitions[i])
                    future.add_callback(on_delivered).add_errback(on_failed, key)
                    sent += 1
            except KafkaError as error:
                self.sent = sent
                return f"sending {key.decode(errors='replace')} failed: {type(error).__name__}: {error}"
            except KeyboardInterrupt:
                self.sent = sent
                raise
            self.sent = sent
            self.event_ms = chunk.pickup_ms[-1]
            self.maybe_report(time.monotonic())
        return None

    @staticmethod
    def value_maker(chunk: Chunk) -> Callable[[int], bytes]:
        """value_of(i): the pre-encoded JSON, or with --retime the trip re-timed to this very second."""
        if chunk.values is not None:
            return chunk.values.__getitem__
        records = chunk.records

        def retimed_value(i: int) -> bytes:
            moved, original = retime(records[i], local_now_ms())
            return record_to_json(moved, **original)

        return retimed_value

    def in_flight(self) -> int:
        return self.sent - self.deliveries.delivered - self.deliveries.failed

    def wait_for_room(self, count: int) -> None:
        """Backpressure: block until ``count`` more trips fit under ``--max-in-flight``."""
        while self.in_flight() + count > self.args.max_in_flight and self.in_flight() > 0:
            time.sleep(0.002)
            self.maybe_report(time.monotonic())

    def wait_until(self, due_s: float, sent: int, event_ms: int | None) -> float:
        """Pacing: sleep until ``due_s`` after the start, still reporting; return the elapsed time."""
        self.sent, self.event_ms = sent, event_ms
        while True:
            now = time.monotonic()
            elapsed = now - self.start
            if elapsed >= due_s:
                return elapsed
            self.maybe_report(now)
            time.sleep(min(due_s - elapsed, 0.1))

    def maybe_report(self, now: float) -> None:
        """Print a progress line once per ``--progress`` seconds; warn when deliveries stall."""
        delivered = self.deliveries.delivered
        if delivered != self.last_delivered or self.in_flight() == 0:
            self.last_delivered, self.last_delivery_change, self.stall_warned = delivered, now, False
        elif now - self.last_delivery_change >= STALL_WARNING_S and not self.stall_warned:
            self.stall_warned = True
            log.warning("no delivery acknowledged for %.0f s with %d trips in flight: is the broker at %s "
                        "down? Each batch is retried for up to %d s.", now - self.last_delivery_change,
                        self.in_flight(), self.args.bootstrap, DELIVERY_TIMEOUT_MS // 1000)
        interval = self.args.progress
        if interval <= 0 or now - self.last_report < interval:
            return
        rate = (self.sent - self.sent_at_last_report) / (now - self.last_report)
        print(progress_line(now - self.start, self.sent, delivered, self.deliveries.failed, rate, self.event_ms),
              file=self.out, flush=True)
        self.last_report, self.sent_at_last_report = now, self.sent

    def finish(self, stopped: str | None) -> ReplayResult:
        """Wait for every trip in flight (a second Ctrl-C gives up), close, and sum up."""
        timeout_s = DELIVERY_TIMEOUT_MS / 1000 + 5
        try:
            self.producer.flush(timeout=timeout_s)
            self.producer.close(timeout=timeout_s)
        except KeyboardInterrupt:
            stopped = f"{stopped or 'interrupted'}; interrupted again while waiting for deliveries"
            self.producer.close(timeout=0)
        except KafkaError as error:
            stopped = "; ".join(filter(None, [stopped, f"waiting for deliveries failed: {error}"]))
            self.producer.close(timeout=0)
        d = self.deliveries
        return ReplayResult(self.sent, d.delivered, d.failed, time.monotonic() - self.start, d.bytes,
                            dict(d.per_partition), list(d.errors), max(self.passes, 1), stopped)


def keys_on_topic(bootstrap: str, topic: str, longest_key: int, progress_s: float, out: TextIO) -> np.ndarray:
    """The distinct keys already on the topic, printing a progress line per ``progress_s`` while reading."""
    began = time.monotonic()

    def report(read: int, total: int) -> None:
        print(f"reading the keys already on {topic}: {read:,} of {total:,} messages "
              f"({time.monotonic() - began:.0f} s)", file=out, flush=True)

    keys, _ = read_topic_keys(bootstrap, topic, max_key_bytes=longest_key,
                              report=report if progress_s > 0 else None, report_every_s=progress_s or 1.0)
    return keys


def replay(args: argparse.Namespace, out: TextIO | None = None) -> tuple[ReplayResult | None, int]:
    """Load, cut, wait for the broker, find where to resume, send, sum up; return the result and the exit code.

    Progress and summary go to ``out`` (standard output unless given), errors to standard error.
    """
    out = out or sys.stdout
    if importlib.util.find_spec("crc32c") is None:
        log.warning("the crc32c package is not installed, so kafka-python checksums every batch in pure "
                    "Python (2-3x slower): pip install 'kafka-python[crc32c]'")
    began = time.monotonic()
    try:
        trips, report = load_trips(args.input)
    except (FileNotFoundError, CsvLayoutError) as error:
        print(f"error: {error}", file=sys.stderr)
        return None, 2
    for line in report.summary_lines():
        print(line, file=out)
    if len(trips) == 0:
        print(f"error: {args.input} has no well-formed trip to send", file=sys.stderr)
        return None, 1
    trips = replay_order(trips)
    pickups = f"{format_time(trips['pickup_datetime'].iloc[0])} .. {format_time(trips['pickup_datetime'].iloc[-1])}"
    print(f"loaded {len(trips):,} trips in {time.monotonic() - began:.1f} s, pickups {pickups}", file=out)
    trips, history = from_cutoff(trips, args.cutoff)
    if args.cutoff is None:
        print("no cutoff: replaying every trip of the file", file=out)
    elif len(trips) == 0:
        out.flush()
        print(f"error: no trip of {args.input} was picked up at or after the cutoff {format_time(args.cutoff)} "
              f"(its pickups run {pickups}); give an earlier --cutoff, or --cutoff none to replay the whole file",
              file=sys.stderr)
        return None, 1
    else:
        print(f"cutoff {format_time(args.cutoff)}: replaying the {len(trips):,} trips picked up at or after it; "
              f"the {history:,} before it are history (batch_processor.py imports them)", file=out)
    planned = planned_total(len(trips), args.limit, args.loop)
    if args.limit and not args.loop and args.limit > len(trips):
        print(f"note: --limit {args.limit:,} is more than the {len(trips):,} trips of the replay; "
              "add --loop to send more", file=out)

    try:
        wait_for_broker(args.bootstrap, "replay trips", timeout_s=args.wait, log=log)
        if not topic_exists(args.bootstrap, args.topic):
            print(f"error: topic {args.topic} does not exist at {args.bootstrap}; create it with "
                  f"`python -m periscope.kafka_local create-topics --bootstrap {args.bootstrap}` "
                  "(`make kafka-up` creates taxi-trips), or choose another with --topic", file=sys.stderr)
            return None, 1
        skip = np.empty(0, dtype=np.int64)
        if not args.from_start:
            longest_key = int(trips["id"].str.len().max()) * 4 + 12  # the longest id in UTF-8, a pass suffix
            keys = keys_on_topic(args.bootstrap, args.topic, longest_key, args.progress, out)
            skip = positions_on_topic(trips["id"], keys, planned, args.loop)
        producer = KafkaProducer(bootstrap_servers=args.bootstrap, **PRODUCER_CONFIG)
    except BrokerUnavailable as error:
        print(f"error: {error}", file=sys.stderr)
        return None, 1
    except KafkaError as error:
        print(f"error: cannot talk to Kafka at {args.bootstrap}: {type(error).__name__}: {error}. "
              "Is it running? `make kafka-up` starts the local broker.", file=sys.stderr)
        return None, 1

    extra = {"skipped": len(skip), "history": history, "cutoff_ms": args.cutoff}
    if len(skip):
        print(f"resuming after {len(skip):,} trips already on {args.topic} (--from-start sends them again)",
              file=out, flush=True)
    if planned is not None and len(skip) == planned:
        producer.close(timeout=5)
        print(f"nothing left to send: all {planned:,} trips of the replay are already on {args.topic}", file=out)
        return ReplayResult(0, 0, 0, 0.0, 0, {}, [], 1, None, **extra), 0
    to_send = f"{planned - len(skip):,} trips" if planned is not None else "trips without end (Ctrl-C stops)"
    partitions = sorted(producer.partitions_for(args.topic))
    print(f"replaying {to_send} to {args.topic} ({len(partitions)} partitions) at {args.bootstrap}, "
          f"{pacing_text(args.rate, args.speedup)}{', retimed to now' if args.retime else ''}", file=out, flush=True)
    sender = Replay(producer, args.topic, args, out)
    chunks = plan_chunks(trips, partitions, rate=args.rate, speedup=args.speedup, limit=args.limit, loop=args.loop,
                         retime_trips=args.retime, skip=skip)
    try:
        stopped = sender.run(chunks)
    except KeyboardInterrupt:
        stopped = "interrupted"
        print(f"\ninterrupted: waiting for the {sender.in_flight():,} trips in flight "
              "(interrupt again to give up)", file=out, flush=True)
    result = dataclasses.replace(sender.finish(stopped), **extra)
    for line in summary_lines(result, args.topic, args.bootstrap, report):
        print(line, file=out)
    out.flush()
    if result.stopped and result.stopped.startswith("interrupted"):
        return result, EXIT_INTERRUPTED
    if not result.ok:
        why = result.errors[0] if result.errors else result.stopped
        print(f"error: {result.sent - result.delivered:,} of {result.sent:,} trips were not delivered "
              f"(e.g. {why})", file=sys.stderr)
        return result, 1
    return result, 0


# --- command line -------------------------------------------------------------------------


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
                             "beyond that, so memory stays bounded (default: %(default)s)")
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
