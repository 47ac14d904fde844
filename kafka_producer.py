"""Ingestion: replay NYC taxi trips from a file into Kafka, as if they were happening.

This is where the Lambda architecture's stream begins. Every trip of a trip
file (the Kaggle layout, or TLC trip records in any layout
``batch_processor.py import`` takes) picked up at or after the cutoff
(``--cutoff``, default ``config.CUTOFF`` = 2016-06-01) becomes one message on
the ``taxi-trips`` topic: key = the trip id (a TLC trip's is derived from its
content, the same as on import), value = the trip as UTF-8 JSON
(``schema.record_to_json``; a TLC trip adds its zones, distance and fares, null
where the file recorded nothing). The trips before it are the batch layer's history
(``batch_processor.py import``), so each trip of the shipped sample reaches the
system once: January-May 2016 as history, June 2016 as the stream. The speed
layer (``kafka_consumer.py``, ``spark_streaming.py``) and the batch layer read
the topic back, each in its own consumer group. A broker must be up (``make kafka-up``):
the producer waits up to ``--wait`` seconds for it, at the start and whenever it goes
away during start-up, saying so; the step it broke (the topic check, reading the keys
back, connecting, asking for the partitions) then runs again, whole, so the resume
still sees every key::

    python kafka_producer.py                              # June 2016 of the shipped sample, at once
    python kafka_producer.py --rate 200 --retime --loop   # an endless live feed at 200 trips/s
    python kafka_producer.py --input yellow_tripdata_2021-01.parquet --cutoff none   # TLC records

The steps (``replay``): load the trips; order them by pickup (stable; a trip's
partition comes from its key, so each partition is in pickup order too); cut at
the cutoff (``--limit N``: the replay is the first N trips from there;
``--loop``: start over at the end, pass k >= 2 sending ids with the suffix
``-k``, ``id2875421-2``, so ids stay unique); resume after what is on the topic;
plan the chunks (pacing by ``--rate`` or ``--speedup`` starts with the first
trip a run sends; a replay that falls behind catches up); send; wait for the
deliveries; sum up. The Kafka timestamp is the time of production, so retention
never deletes replayed 2016 trips and consumers can measure end-to-end latency;
the event time is in the record.

Delivery semantics, where they happen:

* Within a run (``send``), at least once, the broker dropping the repeats:
  ``acks=all`` and an idempotent producer (``stream.PRODUCER_CONFIG``). Each
  batch is retried for up to two minutes, so a broker restarting for a few
  seconds loses nothing, and the broker drops retried batches it already has
  (by producer id and sequence number), so it duplicates nothing either. The
  exit code is 0 only if every trip was delivered (``sum_up``).
* Across runs (a crash, ``kill -9``, Ctrl-C), the resume (``already_on_topic``)
  puts each trip of the replay on the topic once: what the broker acknowledged,
  or received and wrote before the restart read the topic, is skipped; what it
  never got is sent. A trip lands there twice only with two producers replaying
  into one topic at the same time, or when the broker makes a message the dead
  run had in flight visible only after the restart has read the end offsets (a
  replica lagging for longer than the restart takes); the batch layer and the
  serving merge count such a trip once.

Output: what the cutoff left out and what a resume skips; a progress line per
``--progress`` seconds; a summary. Ctrl-C (or SIGTERM) stops sending, waits for
the trips in flight, prints the summary and exits with 130. Speed (30,000-40,000
trips/s in pure Python): ``periscope/producer_tuning.py``.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import numpy as np
import pandas as pd
from kafka import KafkaProducer
from kafka.errors import KafkaError

from periscope import cli, config
from periscope.cli import Refused
from periscope.producer_tuning import CHUNK_TRIPS, DEFAULT_MAX_IN_FLIGHT, warn_without_crc32c
from periscope.replay import (Chunk, Pacer, ReplayResult, chunk_plan, flag_problem, from_cutoff,
                              key_reading_progress, make_messages, pacing_text, pickup_range, planned_total,
                              positions_on_topic, summary_lines)
from periscope.schema import format_time, parse_cutoff
from periscope.send_loop import Deliveries, send_chunks, topic_partitions
from periscope.sources import CsvLayoutError, LoadReport, read_trips
from periscope.stream import (DELIVERY_TIMEOUT_MS, PRODUCER_CONFIG, BrokerUnavailable, read_topic_keys,
                              through_broker_restarts, topic_exists, wait_for_broker)

log = logging.getLogger("kafka_producer")
EXIT_INTERRUPTED = 130
PURPOSE = "replay trips"


# --- the steps ------------------------------------------------------------------------------------


def load_trips(path: Path, out: TextIO) -> tuple[pd.DataFrame, LoadReport]:
    """Every well-formed trip of a trip file (Kaggle or TLC layout; CSV, plain or gzip, or Parquet),
    saying what was read and what was malformed; refused without any trip."""
    began = time.monotonic()
    try:
        trips, report = read_trips(path, tlc_layouts=True)
    except (FileNotFoundError, CsvLayoutError) as error:
        raise Refused(str(error), code=2) from None
    for line in report.summary_lines():
        print(line, file=out)
    if len(trips) == 0:
        raise Refused(f"{path} has no well-formed trip to send")
    print(f"loaded {len(trips):,} trips in {time.monotonic() - began:.1f} s, pickups {pickup_range(trips)}",
          file=out)
    return trips, report


def replay_order(trips: pd.DataFrame) -> pd.DataFrame:
    """The trips in pickup-time order; trips with the same pickup keep their file order."""
    order = np.argsort(trips["pickup_datetime"].to_numpy(), kind="stable")
    return trips.iloc[order].reset_index(drop=True)


def cut_at_the_cutoff(trips: pd.DataFrame, args: argparse.Namespace, out: TextIO) -> tuple[pd.DataFrame, int]:
    """The trips picked up at or after ``--cutoff`` (``from_cutoff``), and how many before it (history),
    saying so; refused if no trip is left."""
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


def wait_for_the_topic(args: argparse.Namespace) -> None:
    """Wait for the broker (``--wait``); refused if the topic does not exist (it is never auto-created)."""
    wait_for_broker(args.bootstrap, PURPOSE, timeout_s=args.wait, log=log)
    if not through_broker_restarts(lambda: topic_exists(args.bootstrap, args.topic), args.bootstrap, PURPOSE,
                                   args.wait, log):
        raise Refused(f"topic {args.topic} does not exist at {args.bootstrap}; create it with "
                      f"`python -m periscope.kafka_local create-topics --bootstrap {args.bootstrap}` "
                      "(`make kafka-up` creates taxi-trips), or choose another with --topic")


def already_on_topic(args: argparse.Namespace, trips: pd.DataFrame, planned: int | None,
                     out: TextIO) -> np.ndarray:
    """Resume: the positions in the replay whose key is on the topic already, sorted, saying how many.

    The keys are read back from every partition up to the end offsets of now (4-7 s per 500,000
    messages here). The replay itself does not change (``--limit`` still counts the trips sent
    before), so a restart with the same arguments completes it.
    """
    print(f"resume: reading back the keys already on {args.topic} (--from-start skips this)", file=out, flush=True)
    report = key_reading_progress(args.topic, out) if args.progress > 0 else None
    longest_key = int(trips["id"].str.len().max()) * 4 + 12  # the longest id in UTF-8, a pass suffix
    keys, _ = through_broker_restarts(  # a broker restart meanwhile: the keys are read again, all of them
        lambda: read_topic_keys(args.bootstrap, args.topic, max_key_bytes=longest_key, report=report,
                                report_every_s=args.progress or 1.0), args.bootstrap, PURPOSE, args.wait, log)
    skip = positions_on_topic(trips["id"], keys, planned, args.loop)
    if len(skip):
        print(f"resuming after {len(skip):,} trips already on {args.topic} (--from-start sends them again)",
              file=out, flush=True)
    return skip


def plan_chunks(trips: pd.DataFrame, partitions: list[int], *, rate: float | None = None,
                speedup: float | None = None, limit: int | None = None, loop: bool = False,
                retime_trips: bool = False, skip: np.ndarray | None = None) -> Iterator[Chunk]:
    """The replay as a lazy sequence of chunks of messages: which trips, which keys and values, when.

    ``chunk_plan`` cuts the replay (``trips`` in replay order) into chunks, pass after pass, without
    the ``skip`` positions, each trip due at its time; ``make_messages`` encodes a chunk at a time
    (``--retime``: each value at send time, original times kept), so memory stays that of the input.
    """
    for chunk in chunk_plan(trips["pickup_datetime"].to_numpy(), CHUNK_TRIPS, rate=rate, speedup=speedup,
                            limit=limit, loop=loop, skip=skip):
        make_messages(chunk, trips.iloc[chunk.rows], partitions, retime_trips)
        yield chunk


def send(producer: KafkaProducer, chunks: Iterator[Chunk], args: argparse.Namespace,
         out: TextIO) -> tuple[Pacer, str | None]:
    """Send every trip when it is due, at most ``--max-in-flight`` unacknowledged, a callback counting
    each delivery; the pacer and why sending stopped early (Ctrl-C, SIGTERM: "interrupted")."""
    deliveries = Deliveries()
    pacer = Pacer(deliveries, max_in_flight=args.max_in_flight, progress_s=args.progress,
                  bootstrap=args.bootstrap, out=out)
    try:
        return pacer, send_chunks(producer, args.topic, chunks, deliveries, pacer)
    except KeyboardInterrupt:
        print(f"\ninterrupted: waiting for the {pacer.in_flight():,} trips in flight "
              "(interrupt again to give up)", file=out, flush=True)
        return pacer, "interrupted"


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


def replay(args: argparse.Namespace, out: TextIO | None = None) -> tuple[ReplayResult | None, int]:
    """The steps in order: the result (None if refused before sending) and the exit code. Progress
    and summary go to ``out`` (standard output unless given), errors to standard error."""
    out = out or sys.stdout
    warn_without_crc32c(log)
    try:
        trips, report = load_trips(args.input, out)
        trips = replay_order(trips)  # the replay is the order the trips happened in
        trips, history = cut_at_the_cutoff(trips, args, out)  # the trips before it are history
        planned = planned_total(len(trips), args.limit, args.loop)
        wait_for_the_topic(args)
        skip = np.empty(0, dtype=np.int64) if args.from_start else already_on_topic(args, trips, planned, out)
        counts = {"skipped": len(skip), "history": history, "cutoff_ms": args.cutoff}
        if planned is not None and len(skip) == planned:
            print(f"nothing left to send: all {planned:,} trips of the replay are already on {args.topic}",
                  file=out)
            return ReplayResult(0, 0, 0, 0.0, 0, {}, [], 1, None, **counts), 0
        producer = through_broker_restarts(  # acks=all, idempotent
            lambda: KafkaProducer(bootstrap_servers=args.bootstrap, **PRODUCER_CONFIG), args.bootstrap, PURPOSE,
            args.wait, log)
        partitions = topic_partitions(producer, args.topic, args.wait)  # the broker may restart meanwhile
    except (Refused, BrokerUnavailable) as refusal:
        out.flush()
        print(f"error: {refusal}", file=sys.stderr)
        return None, refusal.code if isinstance(refusal, Refused) else 1
    except KafkaError as error:
        print(f"error: cannot talk to Kafka at {args.bootstrap}: {type(error).__name__}: {error}. "
              "Is it running? `make kafka-up` starts the local broker.", file=sys.stderr)
        return None, 1

    to_send = f"{planned - len(skip):,} trips" if planned is not None else "trips without end (Ctrl-C stops)"
    print(f"replaying {to_send} to {args.topic} ({len(partitions)} partitions) at {args.bootstrap}, "
          f"{pacing_text(args.rate, args.speedup)}{', retimed to now' if args.retime else ''}", file=out, flush=True)
    chunks = plan_chunks(trips, partitions, rate=args.rate, speedup=args.speedup, limit=args.limit, loop=args.loop,
                         retime_trips=args.retime, skip=skip)
    pacer, stopped = send(producer, chunks, args, out)
    stopped = wait_for_deliveries(producer, stopped)
    result = ReplayResult.of(pacer, stopped, **counts)
    return result, sum_up(result, args, report, out)


# --- command line ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Replay NYC taxi trips from a trip file (Kaggle or TLC) into Kafka, in pickup-time order, "
                    "from the cutoff on; restarted, it resumes after the trips already on the topic.",
        formatter_class=cli.HelpFormatter,
    )
    parser.add_argument("--input", type=Path, default=config.SAMPLE_CSV, metavar="FILE",
                        help="trips in the Kaggle NYC Taxi Trip Duration layout, or NYC TLC trip records "
                             "(yellow/green, 2009 on): CSV (plain or .gz) or Parquet "
                             "(default: %(default)s, env PERISCOPE_SAMPLE_CSV)")
    parser.add_argument("--cutoff", type=cli.argument_type(parse_cutoff), default=config.CUTOFF, metavar="TIME",
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
                        help="how long to wait for the broker to answer before giving up, at the start and "
                             "whenever it goes away during start-up, 0 = do not wait (default: %(default)g)")
    parser.add_argument("--max-in-flight", type=int, default=DEFAULT_MAX_IN_FLIGHT, metavar="N",
                        help="trips sent but not yet acknowledged, at most; the replay waits for the broker "
                             "beyond that, so memory stays bounded")
    parser.add_argument("--progress", type=float, default=1.0, metavar="SECONDS",
                        help="print a progress line this often, 0 = only the summary (default: %(default)g)")
    args = parser.parse_args(argv)
    problem = flag_problem(args)
    if problem:
        parser.error(problem)
    return args


def main(argv: list[str] | None = None) -> int:
    """Parse the flags, then replay; SIGTERM stops it the way Ctrl-C does."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("kafka").setLevel(logging.CRITICAL)  # our own lines say what went wrong, once
    with cli.sigterm_as_ctrl_c():  # `kill` and schedulers stop it as Ctrl-C does
        try:
            return replay(args)[1]
        except KeyboardInterrupt:
            print("interrupted before sending began", file=sys.stderr)
            return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
