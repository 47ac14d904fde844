"""The machinery under ``kafka_producer.py``'s replay: the chunk plan, pacing, progress, the summary.

``kafka_producer.py`` tells the ingestion layer's story (load, order, cut,
resume, send, sum up); what it leaves to this module is how a replay is cut
into chunks and timed, and what the send loop waits for and prints:

* ``from_cutoff`` and ``planned_total``: which trips the replay is made of
  (``pickup_range``: their first and last pickup);
* ``positions_on_topic``: which positions of the replay a resume leaves out,
  worked out once, vectorised, from the topic's keys (``key_reading_progress``:
  the progress line while they are read);
* ``chunk_plan``: the replay as chunks of consecutive trips (pass after pass
  with ``--loop``, up to ``--limit``), the resume's positions left out by a
  mask, and the time each trip is due (``--rate``, ``--speedup``);
* ``make_messages`` and ``value_maker``: a chunk's keys, partitions and
  values, pre-encoded or, with ``--retime``, made at send time from the trip
  moved to now (``retime``);
* ``Pacer``: waiting until a trip is due, waiting for room under
  ``--max-in-flight`` (backpressure), the progress line and the stall warning;
* ``ReplayResult`` and ``summary_lines``: what the end-of-run summary says;
* ``flag_problem``: the flag values the producer refuses, said before anything runs.

Nothing here talks to Kafka: the send loop (``periscope.send_loop``) does,
and the ``Pacer`` reads the delivery counts its callbacks keep. Why chunks
and pre-encoded values: ``periscope/producer_tuning.py``.
"""
from __future__ import annotations

import argparse
import itertools
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol, TextIO

import numpy as np
import pandas as pd

from periscope import config
from periscope.partitioner import key_partitions
from periscope.producer_tuning import DEFAULT_MAX_IN_FLIGHT
from periscope.schema import EPOCH, format_time, pass_suffix, record_to_json, trips_to_messages
from periscope.sources import LoadReport
from periscope.stream import DELIVERY_TIMEOUT_MS

log = logging.getLogger(__name__)

STALL_WARNING_S = 5.0
"""No acknowledgement for this long, with trips in flight: say the broker may be down."""


def pickup_range(trips: pd.DataFrame) -> str:
    """``first .. last`` pickup of the trips, for the lines that say what a file holds."""
    return f"{format_time(trips['pickup_datetime'].min())} .. {format_time(trips['pickup_datetime'].max())}"


def from_cutoff(trips: pd.DataFrame, cutoff_ms: int | None) -> tuple[pd.DataFrame, int]:
    """The trips (in replay order) picked up at or after ``cutoff_ms`` (None: all), and how many before it."""
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


def key_reading_progress(topic: str, out: TextIO) -> Callable[[int, int], None]:
    """The progress line while the resume reads the topic's keys back (``stream.read_topic_keys``)."""
    began = time.monotonic()

    def report(read: int, total: int) -> None:
        print(f"reading the keys already on {topic}: {read:,} of {total:,} messages "
              f"({time.monotonic() - began:.0f} s)", file=out, flush=True)

    return report


# --- the plan: which trips, in which chunk, due when -------------------------------------------


@dataclass
class Chunk:
    """Consecutive trips of the replay, ready to send once the producer has filled in the messages."""

    pass_number: int
    first_index: int  # how many trips this run sent before this chunk (skipped ones not counted)
    rows: slice | np.ndarray  # the chunk's rows of the trips table
    due_s: list[float] | None  # seconds after the start each trip is due; None = at once
    pickup_ms: list[int]  # event time of each trip (before --retime)
    keys: list[bytes] = field(default_factory=list)
    partitions: list[int] = field(default_factory=list)  # of each trip, from its key
    values: list[bytes] | None = None  # the JSON values, or None when they are made at send time (--retime)
    records: list[dict[str, Any]] | None = None  # with --retime: the trips, ids already suffixed


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


def chunk_plan(pickups: np.ndarray, chunk_trips: int, *, rate: float | None = None,
               speedup: float | None = None, limit: int | None = None, loop: bool = False,
               skip: np.ndarray | None = None) -> Iterator[Chunk]:
    """The replay of trips with these pickups (sorted) as a lazy sequence of chunks: which rows, when.

    ``limit`` counts positions in the replay, sent or skipped; ``skip`` holds
    the sorted positions not to send (``positions_on_topic``): a resumed
    replay is the same replay with those trips left out, a chunk at a time by
    a boolean mask. Pacing starts with the first trip this run sends. Nothing
    here reads a clock or a socket.
    """
    n = len(pickups)
    if n == 0:
        return
    event_s = (pickups - pickups[0]) / 1000.0
    span_s = float(event_s[-1])
    skip = skip if skip is not None and len(skip) else None
    planned = sent = 0
    origin_s: float | None = None
    for pass_number in itertools.count(1) if loop else (1,):
        for begin in range(0, n, chunk_trips):
            count = min(chunk_trips, n - begin)
            if limit is not None:
                count = min(count, limit - planned)
            if count <= 0:
                return
            rows: slice | np.ndarray = slice(begin, begin + count)
            first, planned = planned, planned + count
            if skip is not None:
                low, high = np.searchsorted(skip, [first, first + count])
                if high > low:
                    keep = np.ones(count, dtype=bool)
                    keep[skip[low:high] - first] = False
                    rows = np.flatnonzero(keep) + begin
                    count = len(rows)
                    if count == 0:
                        continue
            if rate is not None:
                due = rate_schedule(sent, count, rate).tolist()
            elif speedup is not None:
                due_s = speedup_schedule(event_s[rows], pass_number, span_s, speedup)
                origin_s = due_s[0] if origin_s is None else origin_s
                due = (due_s - origin_s).tolist()
            else:
                due = None
            yield Chunk(pass_number, sent, rows, due, pickups[rows].tolist())
            sent += count


# --- the values of a chunk: pre-encoded, or made at send time (--retime) -----------------------


def retime(record: dict[str, Any], now_ms: int) -> tuple[dict[str, Any], dict[str, str]]:
    """A trip moved to pickup at ``now_ms`` (whole seconds), and its original times (``--retime``).

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
    return (datetime.now().replace(microsecond=0) - EPOCH) // timedelta(milliseconds=1)


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


def value_maker(chunk: Chunk) -> Callable[[int], bytes]:
    """value_of(i): the pre-encoded JSON, or with --retime the trip re-timed to this very second."""
    if chunk.values is not None:
        return chunk.values.__getitem__
    records = chunk.records

    def retimed_value(i: int) -> bytes:
        moved, original = retime(records[i], local_now_ms())
        return record_to_json(moved, **original)

    return retimed_value


# --- the send loop's waiting and printing ------------------------------------------------------


class Deliveries(Protocol):
    """What the Pacer and the result read of the delivery callbacks' counts (``send_loop.Deliveries``)."""

    delivered: int
    failed: int
    bytes: int
    per_partition: Mapping[int, int]
    errors: list[str]


class Pacer:
    """What the send loop waits for and prints: the due time, room in flight, progress, stalls.

    The send loop keeps ``sent`` up to date (at each wait and after each
    chunk); ``deliveries`` are the counts its delivery callbacks keep. Every
    wait also prints the progress line when it is time, so the line keeps
    coming while the replay waits for the pace or for the broker.
    """

    def __init__(self, deliveries: Deliveries, *, max_in_flight: int, progress_s: float, bootstrap: str,
                 out: TextIO):
        self.deliveries, self.max_in_flight, self.progress_s = deliveries, max_in_flight, progress_s
        self.bootstrap, self.out = bootstrap, out
        self.sent = self.passes = self.sent_at_last_report = self.last_delivered = 0
        self.event_ms: int | None = None
        self.stall_warned = False
        self.begin()

    def begin(self) -> None:
        """Start the clock: pacing and the elapsed time count from here."""
        self.start = self.last_report = self.last_delivery_change = time.monotonic()

    def elapsed_s(self) -> float:
        return time.monotonic() - self.start

    def in_flight(self) -> int:
        return self.sent - self.deliveries.delivered - self.deliveries.failed

    def wait_for_room(self, chunk: Chunk) -> None:
        """Backpressure: block until the chunk fits under ``max_in_flight`` (noting its pass)."""
        self.passes = chunk.pass_number
        while self.in_flight() + len(chunk.keys) > self.max_in_flight and self.in_flight() > 0:
            time.sleep(0.002)
            self.maybe_report(time.monotonic())

    def wait_until(self, due_s: float, sent: int, event_ms: int | None) -> float:
        """Pacing: sleep until ``due_s`` after the start, still reporting; return the elapsed time.

        ``event_ms`` is the pickup of the last trip sent (None: the last one of the previous chunk).
        """
        self.sent = sent
        self.event_ms = event_ms if event_ms is not None else self.event_ms
        while True:
            now = time.monotonic()
            elapsed = now - self.start
            if elapsed >= due_s:
                return elapsed
            self.maybe_report(now)
            time.sleep(min(due_s - elapsed, 0.1))

    def chunk_sent(self, chunk: Chunk) -> None:
        """After a chunk: its last pickup is the event time reached; a progress line if it is time."""
        self.event_ms = chunk.pickup_ms[-1]
        self.maybe_report(time.monotonic())

    def maybe_report(self, now: float) -> None:
        """Print a progress line once per ``progress_s`` seconds; warn when deliveries stall."""
        delivered = self.deliveries.delivered
        if delivered != self.last_delivered or self.in_flight() == 0:
            self.last_delivered, self.last_delivery_change, self.stall_warned = delivered, now, False
        elif now - self.last_delivery_change >= STALL_WARNING_S and not self.stall_warned:
            self.stall_warned = True
            log.warning("no delivery acknowledged for %.0f s with %d trips in flight: is the broker at %s "
                        "down? Each batch is retried for up to %d s.", now - self.last_delivery_change,
                        self.in_flight(), self.bootstrap, DELIVERY_TIMEOUT_MS // 1000)
        if self.progress_s <= 0 or now - self.last_report < self.progress_s:
            return
        rate = (self.sent - self.sent_at_last_report) / (now - self.last_report)
        print(progress_line(now - self.start, self.sent, delivered, self.deliveries.failed, rate, self.event_ms),
              file=self.out, flush=True)
        self.last_report, self.sent_at_last_report = now, self.sent


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


# --- the summary --------------------------------------------------------------------------------


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

    @classmethod
    def of(cls, pacer: Pacer, stopped: str | None, **counts: Any) -> ReplayResult:
        """The result of a run that sent through ``pacer``: its counts and its deliveries'."""
        d = pacer.deliveries
        return cls(pacer.sent, d.delivered, d.failed, pacer.elapsed_s(), d.bytes, dict(d.per_partition),
                   list(d.errors), max(pacer.passes, 1), stopped, **counts)

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


# --- the flags ------------------------------------------------------------------------------------


def flag_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the producer's flags, as the line to print (the first problem), or None."""
    if args.rate is not None and args.speedup is not None:
        return ("--rate and --speedup are alternatives: give --rate N for N trips per second, or "
                "--speedup X to replay X times faster than the trips happened (neither = as fast as possible)")
    if args.rate is not None and not (args.rate > 0 and np.isfinite(args.rate)):
        return f"--rate must be a positive number of trips per second, e.g. --rate 500; got {args.rate:g}"
    if args.speedup is not None and not (args.speedup > 0 and np.isfinite(args.speedup)):
        return ("--speedup must be a positive factor, e.g. --speedup 3600 for an hour per second; "
                f"got {args.speedup:g}")
    if args.limit is not None and args.limit < 1:
        return f"--limit must be at least 1 trip; got {args.limit} (leave it out to send the whole file)"
    if not args.input.is_file():
        return (f"--input {args.input}: no such file; give a Kaggle-layout CSV or Parquet file "
                f"(the shipped sample is {config.SAMPLE_CSV})")
    if args.wait < 0:
        return f"--wait must be 0 (fail at once) or a number of seconds; got {args.wait:g}"
    if args.max_in_flight < 1:
        return f"--max-in-flight must be at least 1, e.g. {DEFAULT_MAX_IN_FLIGHT}; got {args.max_in_flight}"
    if args.progress < 0:
        return f"--progress must be 0 (off) or a number of seconds; got {args.progress:g}"
    return None
