"""The speed layer in plain Python: consume trips, validate, predict, write the speed view.

In the Lambda architecture the batch layer is correct but late; the speed layer
covers the trips it has not reached yet. This process reads ``taxi-trips`` in
the consumer group ``periscope-speed`` and, for every poll batch:

1. validates each message with the shared schema (``parse_json`` per message,
   then the cleaning rules vectorised over the whole batch) and sends every
   invalid one to ``taxi-trips-dlq`` unless it is there already: original key
   and value bytes, the reason and the source offset in its headers
   (``periscope.stream``);
2. predicts the duration of the valid trips in one call to the trained model
   (``periscope.features``: the same code path as training);
3. waits until the dead letters are acknowledged, then writes one speed file
   per partition (``periscope.speed_view``: atomic, named by offset range);
4. commits the offsets.

Reading is at-least-once (offsets are committed after the files are
written); what the speed layer writes is exactly once, even after ``kill -9``
at any moment:

- **trips:** the speed files are the durable record of progress. An assigned
  partition resumes at max(committed offset, last offset on disk + 1), so a
  crash between a write and its commit re-reads those messages but never
  writes them twice;
- **dead letters:** they are sent before the file that moves the resume point
  past them, so a crash in between re-reads their messages. The dead-letter
  topic is its own record (``periscope.stream.DeadLetterLedger``): after every
  assignment, before the next dead letter goes out, the topic is read back
  (whole for newly assigned partitions: ~1.3 s per 100,000 dead letters) and
  a message whose source offset is on it already is not sent again, whichever
  member of the group sent it. One consumer per partition at a time is what
  makes that enough.

A broker restart is waited out (kafka-python reconnects; failed commits are
retried).

Stages 2-3 run on a worker thread while the main thread decodes and validates
the next batch: model and Parquet code release Python's GIL, so the two overlap.

A promoted model (``train_model.py`` switches ``model/current.json``) is
picked up without a restart: the pointer is checked every 10 s, the switch is
logged, and every row records the version that predicted it.

Run it (a broker and a trained model first)::

    python -m periscope.kafka_local start && python train_model.py
    python kafka_consumer.py                        # until Ctrl-C / SIGTERM (finishes the batch first)
    python kafka_consumer.py --stop-when-idle 10    # drain the topic, then exit

More processes with the same ``--group`` share the partitions. You should see
one line per second::

    12:00:01 consumed 40,000 valid 39,680 dlq 320 | 4,990/s | lag 0 | latency p50 280 ms p99 540 ms |
             RMSLE 0.291 (1 min 0.288) | model 20261122T053109Z           (one line in the log)

Rows land in ``data/speed/p<partition>/<first>-<last>.parquet``; lag, rates,
latency, live error and dead letters per minute by reason in
``data/speed/_status/<consumer id>.json``.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import signal
import socket
import sys
import time
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from kafka import (ConsumerRebalanceListener, KafkaAdminClient, KafkaConsumer, KafkaProducer, OffsetAndMetadata,
                   TopicPartition)
from kafka.errors import KafkaError
from kafka.structs import MemberState
from threadpoolctl import threadpool_limits

from periscope import config, speed_view
from periscope.model import ModelMismatchError, ModelNotFoundError, TripDurationModel, current_version, load_model
from periscope.schema import (FIELDS, FLOAT_FIELDS, INT_FIELDS, RULE_NAMES, TIME_FIELDS, InvalidTrip,
                              first_broken_rule, parse_json)
from periscope.stream import BrokerUnavailable, DeadLetterLedger, dlq_headers, wait_for_broker

log = logging.getLogger("kafka_consumer")

COMPONENT = "kafka_consumer"
INT_COLUMNS = INT_FIELDS + TIME_FIELDS
DEFAULT_MAX_RECORDS = 10_000
"""Big batches amortise what each batch costs whatever its size: ~300 tree calls, a file per partition,
a commit. They only form when trips queue up; at a steady rate a poll returns what has arrived."""
FETCH_MIN_BYTES, FETCH_MAX_WAIT_MS = 1 << 20, 250
"""The broker answers a fetch once 1 MB has arrived or after 250 ms: at low rates, a few files per
partition per second rather than dozens, for at most 250 ms of the latency budget."""
POLL_TIMEOUT_MS = 1000
"""Poll returns as soon as records arrive; the long timeout lets a rebalance finish inside one poll
(kafka-python 3.0.12 can lose track of a join that completes between two polls and stall)."""
SESSION_TIMEOUT_MS = 10_000
"""A process that dies without leaving the group hands its partitions on after 10 s (default 45 s)."""
RECONNECT_BACKOFF_MAX_MS = 1000
"""Reconnect within a second once a restarted broker is back (kafka-python backs off up to 30 s)."""
COMMIT_TIMEOUT_MS = 5000
CHECK_CRCS = importlib.util.find_spec("crc32c") is not None
"""Verify record checksums only with the C package ``crc32c``: kafka-python's pure-Python CRC costs
more than all the rest of the speed layer, and the broker checked every batch when it was produced."""
MODEL_THREADS = 1
"""One OpenMP thread for the trees, set once for the worker thread (OpenMP limits are per thread, and
setting them costs ~0.1 s): on a busy machine more threads made prediction ten times slower.
A speed layer scales out with more processes in the group instead."""
GIL_SWITCH_INTERVAL_S = 0.0005
"""The worker thread takes the GIL back once per tree (~300 times a batch); by default each time it
may wait 5 ms for the busy main thread to let go. 0.5 ms made the speed layer 15-30 % faster."""
STATUS_INTERVAL_S = 1.0
MODEL_CHECK_INTERVAL_S = 10.0
LATENCY_WINDOW_S = 10.0
RECENT_ERROR_WINDOW_S = 60.0
RETRY_PAUSE_S = 1.0
WARNING_INTERVAL_S = 10.0


# --- validation and rows: pure functions --------------------------------------------------------


def validate_batch(messages: Sequence[Any]) -> tuple[dict[str, np.ndarray], list[tuple[Any, str]]]:
    """Record-form columns of the valid trips, and ``(message, reason)`` of the others in stream order.

    ``messages`` need ``value``, ``partition``, ``offset`` and ``timestamp``
    (kafka-python's ``ConsumerRecord``). Parsing is per message, as each can be
    broken its own way; the cleaning rules run once over whole columns, as
    numpy per record would cost more than the rest of the speed layer.
    """
    records, kept, invalid = [], [], []
    for index, message in enumerate(messages):
        try:
            records.append(parse_json(message.value))
            kept.append(index)
        except InvalidTrip as error:
            invalid.append((index, str(error)))
    columns = to_columns(records, [messages[index] for index in kept])
    broken = first_broken_rule(columns)
    invalid += [(kept[row], RULE_NAMES[broken[row]]) for row in np.flatnonzero(broken >= 0)]
    columns = {name: values[broken < 0] for name, values in columns.items()}
    return columns, [(messages[index], reason) for index, reason in sorted(invalid, key=lambda item: item[0])]


def to_columns(records: list[dict[str, Any]], messages: list[Any]) -> dict[str, np.ndarray]:
    """Parsed records and their messages as numpy columns: Kafka position, then the trip."""
    n = len(records)
    columns = {
        "partition": np.fromiter((m.partition for m in messages), np.int64, n),
        "offset": np.fromiter((m.offset for m in messages), np.int64, n),
        "kafka_timestamp_ms": np.fromiter((m.timestamp for m in messages), np.int64, n),
        "id": np.array([r["id"] for r in records], dtype=object),
        "store_and_fwd_flag": np.fromiter((r["store_and_fwd_flag"] for r in records), bool, n),
    }
    for name in INT_COLUMNS:
        columns[name] = np.fromiter((r[name] for r in records), np.int64, n)
    for name in FLOAT_FIELDS:
        columns[name] = np.fromiter((r[name] for r in records), np.float64, n)
    return columns


def speed_rows(columns: dict[str, np.ndarray], predicted_s: np.ndarray, model_version: str) -> pd.DataFrame:
    """Speed-view rows (``speed_view.COLUMNS``); ``visible_at_ms`` is -1 until the writer stamps it."""
    rows = {name: columns[name] for name in ("partition", "offset", "kafka_timestamp_ms") + FIELDS}
    rows["visible_at_ms"] = np.full(len(predicted_s), -1, dtype=np.int64)
    rows["predicted_duration_s"] = np.asarray(predicted_s, dtype=np.float64)
    rows["model_version"] = np.full(len(predicted_s), model_version, dtype=object)
    return pd.DataFrame(rows, columns=list(speed_view.COLUMNS))


def next_offsets(messages: Iterable[Any]) -> dict[int, int]:
    """Per partition, the offset to commit: the last one handled + 1, valid or not."""
    result: dict[int, int] = {}
    for message in messages:
        result[message.partition] = max(result.get(message.partition, 0), message.offset + 1)
    return result


def resume_offset(committed: int | None, last_on_disk: int | None) -> int | None:
    """Where an assigned partition resumes: past its commit and past its speed files (None: no history)."""
    candidates = [committed, None if last_on_disk is None else last_on_disk + 1]
    return max((offset for offset in candidates if offset is not None), default=None)


def reason_code(reason: str) -> str:
    """``"invalid_json: Expecting value ..."`` -> ``"invalid_json"``; rule names stay as they are."""
    return reason.split(":", 1)[0]


# --- live statistics ----------------------------------------------------------------------------


class SlidingWindow:
    """Items stamped with a time; those older than ``seconds`` fall out."""

    def __init__(self, seconds: float):
        self.seconds, self.items = seconds, deque()

    def add(self, item: Any, now: float) -> None:
        self.items.append((now, item))

    def values(self, now: float) -> list[Any]:
        while self.items and self.items[0][0] < now - self.seconds:
            self.items.popleft()
        return [item for _, item in self.items]


class LiveError:
    """The model's error against the actual durations in the stream: since start and recently.

    It keeps sums (rows, |error|, error², log-error²), which add up across
    batches, so MAE, RMSE and RMSLE come out as ``periscope.model.metrics``.
    """

    def __init__(self, window_s: float = RECENT_ERROR_WINDOW_S):
        self.total, self.window = np.zeros(4), SlidingWindow(window_s)

    def add(self, actual_s: np.ndarray, predicted_s: np.ndarray, now: float) -> None:
        actual, predicted = np.asarray(actual_s, np.float64), np.asarray(predicted_s, np.float64)
        error, log_error = predicted - actual, np.log1p(predicted) - np.log1p(actual)
        sums = np.array([len(actual), np.abs(error).sum(), (error**2).sum(), (log_error**2).sum()])
        self.total += sums
        self.window.add(sums, now)

    def cumulative(self) -> dict[str, float | None]:
        return error_metrics(self.total)

    def recent(self, now: float) -> dict[str, float | None]:
        return error_metrics(sum(self.window.values(now), np.zeros(4)))


def error_metrics(sums: np.ndarray) -> dict[str, float | None]:
    """RMSLE, MAE and RMSE (seconds) from ``LiveError`` sums; None before the first trip."""
    rows = int(sums[0])
    if rows == 0:
        return {"rmsle": None, "mae": None, "rmse": None, "rows": 0}
    return {"rmsle": float(np.sqrt(sums[3] / rows)), "mae": float(sums[1] / rows),
            "rmse": float(np.sqrt(sums[2] / rows)), "rows": rows}


def latency_percentiles(window: SlidingWindow, now: float) -> tuple[float | None, float | None]:
    """p50 and p99 (ms) of the end-to-end latencies in the window; None when it is empty."""
    samples = window.values(now)
    if not samples:
        return None, None
    p50, p99 = np.percentile(np.concatenate(samples), [50, 99])
    return float(p50), float(p99)


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


# --- the model and the group --------------------------------------------------------------------


class ModelWatcher:
    """The live model, reloaded when ``current.json`` names another version (checked every 10 s).

    A version that fails to load is logged and the running model kept: a bad
    promotion must not stop the stream.
    """

    def __init__(self, model_dir: Path, check_every_s: float = MODEL_CHECK_INTERVAL_S):
        self.model_dir, self.check_every_s = model_dir, check_every_s
        self.model: TripDurationModel = load_model(model_dir)
        self.checked_at = time.monotonic()

    def current(self) -> TripDurationModel:
        if time.monotonic() - self.checked_at >= self.check_every_s:
            self.checked_at = time.monotonic()
            try:
                version = current_version(self.model_dir)
                if version and version != self.model.version:
                    previous, self.model = self.model.version, load_model(self.model_dir, version)
                    log.info("model switched from %s to %s (promoted in %s)", previous, version, self.model_dir)
            except Exception as error:  # noqa: BLE001 -- whatever is wrong with the new model, keep the old one
                log.error("cannot load the promoted model, keeping %s: %r", self.model.version, error)
        return self.model


class ResumeAfterSpeedFiles(ConsumerRebalanceListener):
    """Where partitions resume after a rebalance, and what must be finished before they move.

    On assignment each partition is sought to max(committed offset, last offset
    in its speed files + 1), and the dead-letter ledger is told so (it is read
    back before the next dead letter). The next owner of a revoked partition
    resumes after the speed files and reads back the dead letters sent before,
    so the batch being written (and its dead letters) is finished first. kafka-python
    runs this on its IO thread, which refuses the consumer's own blocking calls
    (``committed()``); ``SpeedLayer.committed`` reads them with an admin client.
    """

    def __init__(self, layer: SpeedLayer):
        self.layer = layer

    def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        self.layer.wait_for_writer()
        for tp in revoked:
            self.layer.ledger.release(tp.partition)

    def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        self.layer.seek_past_written(sorted(assigned))


@dataclass
class Batch:
    """One poll's messages on their way through the two stages."""

    messages: list[Any]
    columns: dict[str, np.ndarray]
    invalid: list[tuple[Any, str]]
    dead_letters: list[tuple[Any, str, Any]]
    """(message, reason, send future) of the invalid messages this batch sends; future None once read back."""
    model: TripDurationModel
    predicted: np.ndarray | None = None
    rows: pd.DataFrame | None = None


class SpeedLayer:
    """One consumer process: poll -> validate -> (worker: predict -> write) -> commit, and its statistics.

    Batch k is committed after its files are written and before batch k+1 goes
    to the worker, so files appear in offset order and a commit never runs
    ahead of the files.
    """

    def __init__(self, args: argparse.Namespace, models: ModelWatcher):
        self.args, self.models = args, models
        self.consumer = KafkaConsumer(
            bootstrap_servers=args.bootstrap, group_id=args.group, client_id=args.consumer_id,
            enable_auto_commit=False, auto_offset_reset="earliest", max_poll_records=args.max_records,
            fetch_min_bytes=FETCH_MIN_BYTES, fetch_max_wait_ms=FETCH_MAX_WAIT_MS, session_timeout_ms=SESSION_TIMEOUT_MS,
            reconnect_backoff_max_ms=RECONNECT_BACKOFF_MAX_MS, check_crcs=CHECK_CRCS)
        self.producer = KafkaProducer(bootstrap_servers=args.bootstrap, client_id=f"{args.consumer_id}-dlq",
                                      acks="all", linger_ms=5, reconnect_backoff_max_ms=RECONNECT_BACKOFF_MAX_MS)
        self.admin = KafkaAdminClient(bootstrap_servers=args.bootstrap, client_id=f"{args.consumer_id}-admin",
                                      request_timeout_ms=COMMIT_TIMEOUT_MS,
                                      reconnect_backoff_max_ms=RECONNECT_BACKOFF_MAX_MS)
        self.ledger = DeadLetterLedger(args.bootstrap, args.dlq_topic, args.topic, COMPONENT,
                                       client_id=f"{args.consumer_id}-dlq-reader",
                                       reconnect_backoff_max_ms=RECONNECT_BACKOFF_MAX_MS, check_crcs=CHECK_CRCS)
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="speed-writer",
                                         initializer=threadpool_limits, initargs=(MODEL_THREADS, "openmp"))
        self.in_flight: Future | None = None
        self.stopping = False
        self.uncommitted: dict[TopicPartition, int] = {}
        self.totals, self.dlq_reasons, self.dlq_history = Counter(), Counter(), speed_view.MinuteCounts()
        self.errors, self.latency = LiveError(), SlidingWindow(LATENCY_WINDOW_S)
        self.started = self.last_activity = self.last_tick = time.monotonic()
        self.consumed_at_tick, self.last_warning = 0, -WARNING_INTERVAL_S
        self.positions: dict[int, int | None] = {}
        self.lag: dict[int, int | None] = {}

    def subscribe(self) -> list[str]:
        """Join the topic's group; return the topics that do not exist (the broker does not create them).

        Listing the topics after subscribing also gives the group leader fresh metadata for its first
        assignment, which spares a second rebalance right after the start.
        """
        self.consumer.subscribe([self.args.topic], listener=ResumeAfterSpeedFiles(self))
        existing = self.consumer.topics()
        return [topic for topic in (self.args.topic, self.args.dlq_topic) if topic not in existing]

    def run(self) -> None:
        while not self.stopping:
            try:
                polled = self.consumer.poll(timeout_ms=POLL_TIMEOUT_MS)
            except KafkaError as error:
                self.warn(f"poll failed ({error!r}); retrying")
                time.sleep(RETRY_PAUSE_S)
                continue
            messages = [message for batch in polled.values() for message in batch]
            batch = self.validate(messages) if messages else None
            if self.finish_in_flight() and batch is not None:
                self.in_flight = self.writer.submit(self.predict_and_write, batch)
            self.tick()
            if self.args.stop_when_idle is not None and self.idle():
                log.info("no new trips for %.0f s and no lag: stopping", self.args.stop_when_idle)
                break
        self.finish_in_flight()

    def seek_past_written(self, assigned: list[TopicPartition]) -> None:
        """Seek newly assigned partitions past their commit and past their speed files (listener, IO thread)."""
        on_disk, committed = speed_view.last_offsets(self.args.speed_dir), self.committed(assigned)
        for tp in assigned:
            start = resume_offset(committed.get(tp), on_disk.get(tp.partition))
            if start is not None:
                self.consumer.seek(tp, start)
            self.ledger.resume(tp.partition, start)
            log.info("partition %d assigned: resuming at %s", tp.partition,
                     "the earliest offset" if start is None else f"offset {start:,}")
        self.last_activity = time.monotonic()

    def committed(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        """The group's committed offsets; none if they cannot be read (the speed files still prevent duplicates)."""
        try:
            found = self.admin.list_group_offsets({self.args.group: partitions})[self.args.group]
        except KafkaError as error:
            log.warning("cannot read the committed offsets (%r); resuming after the speed files only", error)
            return {}
        return {tp: meta.offset for tp, meta in found.items() if meta.offset >= 0}

    def validate(self, messages: list[Any]) -> Batch | None:
        """Stage 1 (main thread): parse and check every message, start sending the dead letters.

        Exactly once: a dead letter goes out only if the ledger (the DLQ topic read back after
        the last assignment, plus what this process sent since) has none for its offset. None if
        told to stop while the ledger could not be read: nothing of the batch is sent or written.
        """
        columns, invalid = validate_batch(messages)
        if invalid and not self.read_back_dead_letters():
            return None
        dead_letters = []
        for message, reason in invalid:
            if not self.ledger.has(message.partition, message.offset):
                self.ledger.add_sent(message.partition, message.offset)
                dead_letters.append((message, reason, self.send_dead_letter(message, reason)))
        return Batch(messages, columns, invalid, dead_letters, self.models.current())

    def read_back_dead_letters(self) -> bool:
        """After an assignment: read the DLQ topic back, retrying while it cannot be; False if told to stop."""
        while self.ledger.stale:
            started = time.monotonic()
            try:
                known = self.ledger.catch_up()
            except KafkaError as error:
                if self.stopping:
                    return False
                self.warn(f"cannot read the dead-letter topic back ({error!r}); retrying before sending any")
                time.sleep(RETRY_PAUSE_S)
                continue
            log.info("dead letters read back from %s in %.2f s: %s at or after the resume offsets, not sent again",
                     self.args.dlq_topic, time.monotonic() - started, f"{known:,}")
        return True

    def send_dead_letter(self, message: Any, reason: str) -> Any:
        headers = dlq_headers(reason, message.topic, message.partition, message.offset, COMPONENT)
        return self.producer.send(self.args.dlq_topic, key=message.key, value=message.value, headers=headers)

    def predict_and_write(self, batch: Batch) -> Batch:
        """Stage 2 (worker thread): predict, wait for the dead letters, write one file per partition.

        Dead letters are acknowledged first, because a file moves the resume
        point past every message of its batch, valid or not.
        """
        batch.predicted = batch.model.predict_seconds(batch.columns)
        if not self.dead_letters_delivered(batch):
            return batch
        rows = speed_rows(batch.columns, batch.predicted, batch.model.version)
        for partition in np.unique(batch.columns["partition"]):
            mine = batch.columns["partition"] == partition
            rows.loc[mine, "visible_at_ms"] = wall_clock_ms()
            speed_view.write_batch(self.args.speed_dir, int(partition), rows[mine])
        batch.rows = rows
        return batch

    def dead_letters_delivered(self, batch: Batch) -> bool:
        """Block until every dead letter is acknowledged, re-sending failures; False if told to stop first.

        A failed send may have landed all the same (only its acknowledgement lost), so the DLQ
        topic is read back first and only what is not on it is sent again.
        """
        while True:
            self.producer.flush()
            failed = [index for index, (_, _, future) in enumerate(batch.dead_letters)
                      if future is not None and future.failed()]
            if not failed:
                return True
            if self.stopping:
                log.error("%d dead letters undelivered at shutdown: their batch is neither written nor "
                          "committed, and will be read again on restart", len(failed))
                return False
            self.warn(f"{len(failed)} dead letters not delivered ({batch.dead_letters[failed[0]][2].exception!r}); "
                      "retrying")
            time.sleep(RETRY_PAUSE_S)
            try:
                self.ledger.catch_up()
            except KafkaError:
                continue
            for index in failed:
                message, reason, _ = batch.dead_letters[index]
                landed = self.ledger.on_topic(message.partition, message.offset)
                batch.dead_letters[index] = (message, reason,
                                             None if landed else self.send_dead_letter(message, reason))

    def finish_in_flight(self) -> bool:
        """Wait for the worker's batch, commit and count it; False if it could not be written."""
        if self.in_flight is None:
            return True
        batch, self.in_flight = self.in_flight.result(), None
        if batch.rows is None:
            self.stopping = True
            return False
        for partition, offset in next_offsets(batch.messages).items():
            self.uncommitted[TopicPartition(self.args.topic, partition)] = offset
        self.commit()
        self.last_activity = now = time.monotonic()
        self.latency.add((batch.rows["visible_at_ms"] - batch.rows["kafka_timestamp_ms"]).to_numpy(), now)
        self.errors.add(batch.columns["trip_duration"], batch.predicted, now)
        self.totals.update(consumed=len(batch.messages), valid=len(batch.rows), dlq=len(batch.invalid),
                           dlq_already_sent=len(batch.invalid) - len(batch.dead_letters))
        self.dlq_reasons.update(reason_code(reason) for _, reason in batch.invalid)
        self.dlq_history.add((reason_code(reason) for _, reason in batch.invalid), wall_clock_ms())
        return True

    def wait_for_writer(self) -> None:
        if self.in_flight is not None:
            futures_wait([self.in_flight])

    def commit(self) -> None:
        """Commit what is written; after a failure (broker down, rebalance) the next commit includes it.

        Committing after the files are written gives at-least-once reading: a crash before the
        commit re-reads the batch. The speed files and the dead-letter topic record what the
        batch produced, so it is not produced twice: nothing depends on a commit succeeding.
        A committed offset is never read again, so the ledger forgets the dead letters below it.
        """
        assigned = self.consumer.assignment()
        self.uncommitted = {tp: offset for tp, offset in self.uncommitted.items() if tp in assigned}
        if not self.uncommitted or not self.in_group():
            return  # during a rebalance the broker refuses commits; retrying would hold up the join
        try:
            self.consumer.commit({tp: OffsetAndMetadata(offset, "", -1) for tp, offset in self.uncommitted.items()},
                                 timeout_ms=COMMIT_TIMEOUT_MS)
            for tp, offset in self.uncommitted.items():
                self.ledger.forget_below(tp.partition, offset)
            self.uncommitted = {}
        except KafkaError as error:
            self.warn(f"offset commit failed ({error!r}); retrying with the next commit")

    def in_group(self) -> bool:
        """A settled member of the group (not joining or rebalancing)."""
        return self.consumer.group_metadata().state == MemberState.STABLE

    def idle(self) -> bool:
        """Quiet for ``--stop-when-idle`` seconds, settled in the group, and known to be caught up."""
        quiet = time.monotonic() - self.last_activity >= self.args.stop_when_idle
        return quiet and self.in_group() and all(lag == 0 for lag in self.lag.values())

    def tick(self, force: bool = False) -> None:
        """Once a second: refresh lag, retry a failed commit, publish the status file, log the rate line."""
        now = time.monotonic()
        if not force and now - self.last_tick < STATUS_INTERVAL_S:
            return
        self.positions, self.lag = self.progress()
        if None in self.lag.values():
            self.last_activity = now  # cut off from the broker is not the same as caught up
        if self.uncommitted:
            self.commit()
        rate = (self.totals["consumed"] - self.consumed_at_tick) / max(now - self.last_tick, 1e-6)
        self.last_tick, self.consumed_at_tick = now, self.totals["consumed"]
        status = self.status(rate, now)
        speed_view.write_status(self.args.speed_dir, self.args.consumer_id, status)
        log.info(format_status(status))

    def progress(self) -> tuple[dict[int, int | None], dict[int, int | None]]:
        """Per assigned partition: the next offset to read and the lag behind the log end (None: unknown).

        The log end is asked of the broker every time, so while it is
        unreachable the lag is unknown, never a stale zero.
        """
        assigned = sorted(self.consumer.assignment())
        try:
            ends = self.consumer.end_offsets(assigned, timeout_ms=1000) if assigned else {}
            positions = {tp.partition: self.consumer.position(tp, timeout_ms=1000) for tp in assigned}
        except KafkaError as error:
            self.warn(f"cannot reach the broker ({error!r}); kafka-python keeps reconnecting")
            return {tp.partition: self.positions.get(tp.partition) for tp in assigned}, dict.fromkeys(
                (tp.partition for tp in assigned), None)
        ends = {tp.partition: end for tp, end in ends.items()}
        lag = {p: None if positions[p] is None or p not in ends else max(ends[p] - positions[p], 0) for p in positions}
        return positions, lag

    def status(self, rate: float, now: float) -> dict[str, Any]:
        p50, p99 = latency_percentiles(self.latency, now)
        return {
            "consumer_id": self.args.consumer_id, "group": self.args.group, "topic": self.args.topic,
            "pid": os.getpid(), "host": socket.gethostname(), "state": "stopped" if self.stopping else "running",
            "member_state": self.consumer.group_metadata().state, "updated_at_ms": wall_clock_ms(),
            "uptime_s": round(now - self.started, 1), "assigned_partitions": sorted(self.positions),
            "positions": {str(p): offset for p, offset in self.positions.items()},
            "lag": {str(p): lag for p, lag in self.lag.items()},
            "total_lag": sum(lag for lag in self.lag.values() if lag is not None),
            "totals": {**{name: self.totals[name] for name in ("consumed", "valid", "dlq", "dlq_already_sent")},
                       "dlq_by_reason": dict(sorted(self.dlq_reasons.items()))},
            "dlq_history": self.dlq_history.as_status(),
            "rate_per_s": round(rate, 1),
            "latency_ms": {"p50": p50, "p99": p99, "window_s": LATENCY_WINDOW_S},
            "live_error": {"cumulative": self.errors.cumulative(), "recent": self.errors.recent(now),
                           "recent_window_s": RECENT_ERROR_WINDOW_S},
            "model_version": self.models.model.version,
        }

    def warn(self, message: str) -> None:
        """A warning at most every 10 s, so that an outage does not flood the log."""
        if time.monotonic() - self.last_warning >= WARNING_INTERVAL_S:
            self.last_warning = time.monotonic()
            log.warning(message)

    def close(self) -> None:
        """Last commit, last status, a summary; then leave the group."""
        self.stopping = True
        self.commit()
        self.tick(force=True)
        elapsed, error = time.monotonic() - self.started, self.errors.cumulative()
        quality = f"live RMSLE {error['rmsle']:.3f}, MAE {error['mae']:.0f} s" if error["rows"] else "no valid trips"
        reasons = f" ({', '.join(f'{n:,} {r}' for r, n in self.dlq_reasons.most_common())})" if self.dlq_reasons else ""
        already = self.totals["dlq_already_sent"]
        there = f", {already:,} of them there already (sent before a restart or a rebalance)" if already else ""
        log.info("stopped after %.0f s: %s trips consumed, %s valid, %s to the dead-letter topic%s%s; %s",
                 elapsed, f"{self.totals['consumed']:,}", f"{self.totals['valid']:,}", f"{self.totals['dlq']:,}",
                 reasons, there, quality)
        self.disconnect()

    def disconnect(self) -> None:
        self.writer.shutdown(wait=True)
        self.producer.close(timeout=10)
        self.consumer.close(autocommit=False, timeout_ms=10_000)
        self.admin.close()
        self.ledger.close()


def format_status(status: dict[str, Any]) -> str:
    """The once-a-second log line."""
    totals, latency, error = status["totals"], status["latency_ms"], status["live_error"]
    lag = "?" if None in status["lag"].values() else f"{status['total_lag']:,}"
    timing = "-" if latency["p50"] is None else f"p50 {latency['p50']:.0f} ms p99 {latency['p99']:.0f} ms"
    rmsle = ["-" if e["rmsle"] is None else f"{e['rmsle']:.3f}" for e in (error["cumulative"], error["recent"])]
    return (f"consumed {totals['consumed']:,} valid {totals['valid']:,} dlq {totals['dlq']:,} | "
            f"{status['rate_per_s']:,.0f}/s | lag {lag} | latency {timing} | RMSLE {rmsle[0]} (1 min {rmsle[1]}) | "
            f"model {status['model_version']}")


# --- command line -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Speed layer: consume trips from Kafka, validate, predict durations, write the speed view.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--bootstrap", default=config.KAFKA_BOOTSTRAP_SERVERS,
                        help="Kafka bootstrap servers, host:port[,host:port] (env KAFKA_BOOTSTRAP_SERVERS)")
    parser.add_argument("--topic", default=config.TRIPS_TOPIC, help="trips topic (env PERISCOPE_TRIPS_TOPIC)")
    parser.add_argument("--dlq-topic", default=config.DLQ_TOPIC,
                        help="dead-letter topic for invalid messages (env PERISCOPE_DLQ_TOPIC)")
    parser.add_argument("--group", default=config.SPEED_GROUP,
                        help="consumer group; processes in one group split the partitions (env PERISCOPE_SPEED_GROUP)")
    parser.add_argument("--speed-dir", type=Path, default=config.SPEED_DIR,
                        help="speed view and status files, one dir per topic (env PERISCOPE_SPEED_DIR)")
    parser.add_argument("--model-dir", type=Path, default=config.MODEL_DIR,
                        help="trained model versions; current.json names the live one (env PERISCOPE_MODEL_DIR)")
    parser.add_argument("--max-records", type=int, default=DEFAULT_MAX_RECORDS,
                        help="most messages per poll batch: bigger is faster, smaller writes sooner")
    parser.add_argument("--stop-when-idle", type=float, metavar="SECONDS",
                        help="exit after this long without new trips and with zero lag (default: run forever)")
    parser.add_argument("--consumer-id", default=f"{socket.gethostname()}-{os.getpid()}",
                        help="this process's client id in Kafka and the name of its status file")
    parser.add_argument("--broker-timeout", type=float, metavar="SECONDS",
                        help="give up if no broker answers at start within this long (default: wait forever)")
    args = parser.parse_args(argv)
    if args.max_records < 1:
        parser.error(f"--max-records must be at least 1, got {args.max_records}")
    if args.stop_when_idle is not None and args.stop_when_idle <= 0:
        parser.error(f"--stop-when-idle must be a positive number of seconds, got {args.stop_when_idle:g}")
    if not args.consumer_id or "/" in args.consumer_id or args.consumer_id.startswith("."):
        parser.error(f"--consumer-id must be a plain file name (no '/', not starting with '.'), got "
                     f"{args.consumer_id!r}")
    if args.speed_dir.exists() and not args.speed_dir.is_dir():
        parser.error(f"--speed-dir {args.speed_dir} exists and is not a directory")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)
    logging.getLogger("kafka").setLevel(logging.CRITICAL)  # it reconnects by itself; our own lines say what matters
    try:
        models = ModelWatcher(args.model_dir)
        wait_for_broker(args.bootstrap, f"consume {args.topic}", args.broker_timeout, log)
    except (ModelNotFoundError, ModelMismatchError, BrokerUnavailable) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    layer = SpeedLayer(args, models)
    missing = layer.subscribe()
    if missing:
        layer.disconnect()
        print(f"error: topic(s) {', '.join(missing)} do not exist at {args.bootstrap}; create them with "
              f"`python -m periscope.kafka_local create-topics --bootstrap {args.bootstrap}`", file=sys.stderr)
        return 2

    def stop(signum: int, _frame: Any) -> None:
        log.info("%s received: finishing the current batch", signal.Signals(signum).name)
        layer.stopping = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    previous_interval = sys.getswitchinterval()
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    log.info("speed layer %s: %s -> %s (group %s, model %s, dead letters to %s)", args.consumer_id, args.topic,
             args.speed_dir, args.group, models.model.version, args.dlq_topic)
    try:
        layer.run()
    finally:
        layer.close()
        sys.setswitchinterval(previous_interval)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
