"""The speed layer in plain Python: consume trips, validate, predict, write the speed view.

In the Lambda architecture the batch layer is correct but late; the speed layer
covers the trips it has not reached yet. This process reads ``taxi-trips`` in
the consumer group ``periscope-speed`` and, for every poll batch:

1. **poll**: up to ``--max-records`` messages of the partitions it is assigned;
2. **validate and dead-letter**: each message is checked by the shared
   speed-layer core (``periscope.speed_core.validate_batch``: ``parse_json``
   per message, then the cleaning rules vectorised over the batch), and each
   invalid one goes to ``taxi-trips-dlq`` unless it is there already:
   original key and value bytes, the reason and the source offset in its
   headers (``periscope.stream``);
3. **predict** the duration of the valid trips in one call to the trained
   model (``periscope.features``: the same code path as training; a TLC
   trip known by its taxi zones only is placed by them);
4. **write the speed files**, once the dead letters are acknowledged: one per
   partition (``periscope.speed_view``: atomic, named by offset range);
5. **commit** the offsets.

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
  member of the group (or the Spark speed layer) sent it. One consumer per
  partition at a time is what makes that enough.

A broker restart is waited out (kafka-python reconnects; failed commits are
retried).

Steps 3-4 run on a worker thread while the main thread polls and validates
the next batch: model and Parquet code release Python's GIL, so the two
overlap. How that and the Kafka client are tuned is in one place,
``periscope/speed_tuning.py``.

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
``data/speed/_status/<consumer id>.json`` (``periscope.speed_view.SpeedStatus``).
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from kafka import KafkaAdminClient, KafkaConsumer, OffsetAndMetadata, TopicPartition
from kafka.errors import KafkaError
from kafka.structs import MemberState

from periscope import config, speed_core, speed_view
from periscope import speed_tuning as tuning
from periscope.model import ModelMismatchError, ModelNotFoundError, TripDurationModel
from periscope.speed_core import ModelWatcher, SpeedStatistics, next_offsets, validate_batch, write_speed_files
from periscope.consumer_group import DeadLetterSender, Rebalances, Warnings, assigned_progress, committed_offsets
from periscope.stream import BrokerUnavailable, wait_for_broker

log = logging.getLogger("kafka_consumer")

COMPONENT = "kafka_consumer"
SESSION_TIMEOUT_MS = 10_000
"""A process that dies without leaving the group hands its partitions on after 10 s (default 45 s)."""
RECONNECT_BACKOFF_MAX_MS = 1000
"""Reconnect within a second once a restarted broker is back (kafka-python backs off up to 30 s)."""
COMMIT_TIMEOUT_MS = 5000
RETRY_PAUSE_S = 1.0


@dataclass
class Batch:
    """One poll's messages on their way through the steps."""

    messages: list[Any]
    columns: dict[str, np.ndarray]
    invalid: list[tuple[Any, str]]
    dead_letters: list[tuple[Any, str, Any]]
    """(message, reason, send future) of the invalid messages this batch sends; future None once read back."""
    model: TripDurationModel
    predicted: np.ndarray | None = None
    rows: pd.DataFrame | None = None


class SpeedLayer:
    """One consumer process: its Kafka clients, the steps of a batch, and what it has done so far."""

    def __init__(self, args: argparse.Namespace, models: ModelWatcher):
        self.args, self.models = args, models
        self.consumer = KafkaConsumer(
            bootstrap_servers=args.bootstrap, group_id=args.group, client_id=args.consumer_id,
            enable_auto_commit=False, auto_offset_reset="earliest", max_poll_records=args.max_records,
            session_timeout_ms=SESSION_TIMEOUT_MS, reconnect_backoff_max_ms=RECONNECT_BACKOFF_MAX_MS,
            **tuning.CONSUMER_FETCH)
        self.admin = KafkaAdminClient(bootstrap_servers=args.bootstrap, client_id=f"{args.consumer_id}-admin",
                                      request_timeout_ms=COMMIT_TIMEOUT_MS,
                                      reconnect_backoff_max_ms=RECONNECT_BACKOFF_MAX_MS)
        self.warn = Warnings(log)
        self.dead_letters = DeadLetterSender(args.bootstrap, args.dlq_topic, args.topic, COMPONENT, args.consumer_id,
                                             lambda: self.stopping, log, self.warn,
                                             reconnect_backoff_max_ms=RECONNECT_BACKOFF_MAX_MS,
                                             check_crcs=tuning.CHECK_CRCS)
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="speed-writer",
                                         initializer=tuning.one_model_thread)
        self.in_flight: Future | None = None
        self.stopping = False
        self.uncommitted: dict[TopicPartition, int] = {}
        self.stats = SpeedStatistics(args.consumer_id, args.group, args.topic)
        self.positions: dict[int, int | None] = {}
        self.lag: dict[int, int | None] = {}

    def subscribe(self) -> list[str]:
        """Join the topic's group; return the topics that do not exist (the broker does not create them).

        Listing the topics after subscribing also gives the group leader fresh metadata for its first
        assignment, which spares a second rebalance right after the start.
        """
        self.consumer.subscribe([self.args.topic], listener=Rebalances(self.hand_over, self.seek_past_written))
        existing = self.consumer.topics()
        return [topic for topic in (self.args.topic, self.args.dlq_topic) if topic not in existing]

    # --- the steps of a batch -----------------------------------------------------------------------

    def poll(self) -> list[Any]:
        """1. The next messages of the assigned partitions (none while the broker is away: it retries)."""
        try:
            polled = self.consumer.poll(timeout_ms=tuning.POLL_TIMEOUT_MS)
        except KafkaError as error:
            self.warn(f"poll failed ({error!r}); retrying")
            time.sleep(RETRY_PAUSE_S)
            return []
        return [message for batch in polled.values() for message in batch]

    def validate_and_dead_letter(self, messages: list[Any]) -> Batch | None:
        """2. (main thread) Check every message; start sending the invalid ones to the DLQ topic.

        Exactly once: a dead letter goes out only if the dead-letter topic, read back after the
        last assignment, and what this process sent since hold none for its offset. None if told
        to stop while the topic could not be read back: nothing of the batch is sent or written.
        """
        if not messages:
            return None
        columns, invalid = validate_batch(messages)
        dead_letters = self.dead_letters.send(invalid)
        return None if dead_letters is None else Batch(messages, columns, invalid, dead_letters,
                                                       self.models.current())

    def predict_and_write(self, batch: Batch) -> Batch:
        """3-4. (worker thread) Predict; once the dead letters are acknowledged, write the speed files.

        The dead letters come first because a file moves the resume point past every message of
        its batch, valid or not. Told to stop before they are delivered, the batch is neither
        written nor committed (``rows`` stays None) and is read again on restart.
        """
        batch.predicted = batch.model.predict_seconds(batch.columns)
        if self.dead_letters.delivered(batch.dead_letters):
            batch.rows = write_speed_files(self.args.speed_dir, batch.columns, batch.predicted, batch.model.version)
        return batch

    def finish_previous(self) -> bool:
        """Wait for the worker's batch, then 5. commit it and count it; False if it could not be written."""
        if self.in_flight is None:
            return True
        batch, self.in_flight = self.in_flight.result(), None
        if batch.rows is None:
            self.stopping = True
            return False
        for partition, offset in next_offsets((m.partition, m.offset) for m in batch.messages).items():
            self.uncommitted[TopicPartition(self.args.topic, partition)] = offset
        self.commit()
        self.stats.count_batch(len(batch.messages), batch.rows, [reason for _, reason in batch.invalid],
                               already_sent=len(batch.invalid) - len(batch.dead_letters))
        return True

    def commit(self) -> None:
        """5. Commit what is written; after a failure (broker down, rebalance) the next commit includes it.

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
                self.dead_letters.ledger.forget_below(tp.partition, offset)
            self.uncommitted = {}
        except KafkaError as error:
            self.warn(f"offset commit failed ({error!r}); retrying with the next commit")

    # --- where an assigned partition resumes ------------------------------------------------------------

    def seek_past_written(self, assigned: list[TopicPartition]) -> None:
        """Seek newly assigned partitions past their commit and past their speed files.

        The dead-letter ledger is told where each resumes: it is read back before the next dead
        letter goes out. Runs on kafka-python's IO thread, which refuses the consumer's own blocking
        calls (``committed()``), so the committed offsets come from the admin client; if they cannot
        be read, the speed files alone still prevent duplicates.
        """
        on_disk = speed_view.last_offsets(self.args.speed_dir)
        try:
            committed = committed_offsets(self.admin, self.args.group, assigned)
        except KafkaError as error:
            log.warning("cannot read the committed offsets (%r); resuming after the speed files only", error)
            committed = {}
        for tp in assigned:
            start = resume_offset(committed.get(tp), on_disk.get(tp.partition))
            if start is not None:
                self.consumer.seek(tp, start)
            self.dead_letters.ledger.resume(tp.partition, start)
            log.info("partition %d assigned: resuming at %s", tp.partition,
                     "the earliest offset" if start is None else f"offset {start:,}")
        self.stats.last_activity = time.monotonic()

    def hand_over(self, revoked: list[TopicPartition]) -> None:
        """Before revoked partitions move on: finish the batch being written, forget their dead letters.

        Their next owner resumes after the speed files and reads back the dead letters sent before,
        so the batch on the worker (and its dead letters) must be complete first.
        """
        if self.in_flight is not None:
            futures_wait([self.in_flight])
        for tp in revoked:
            self.dead_letters.ledger.release(tp.partition)

    # --- progress, status, stopping -------------------------------------------------------------------

    def in_group(self) -> bool:
        """A settled member of the group (not joining or rebalancing)."""
        return self.consumer.group_metadata().state == MemberState.STABLE

    def idle(self) -> bool:
        """Quiet for ``--stop-when-idle`` seconds, settled in the group, and known to be caught up."""
        if self.args.stop_when_idle is None:
            return False
        quiet = time.monotonic() - self.stats.last_activity >= self.args.stop_when_idle
        return quiet and self.in_group() and all(lag == 0 for lag in self.lag.values())

    def publish_status(self, force: bool = False) -> None:
        """Once a second: refresh lag, retry a failed commit, write the status file, log the rate line."""
        if not force and not self.stats.status_due():
            return
        self.positions, self.lag = self.progress()
        if None in self.lag.values():
            self.stats.last_activity = time.monotonic()  # cut off from the broker is not the same as caught up
        if self.uncommitted:
            self.commit()
        status = self.stats.status("stopped" if self.stopping else "running", self.consumer.group_metadata().state,
                                   self.positions, self.lag, self.models.model.version)
        self.stats.publish(self.args.speed_dir, status)
        log.info(speed_core.status_line(status))

    def progress(self) -> tuple[dict[int, int | None], dict[int, int | None]]:
        """Per assigned partition: the next offset to read and the lag (None: unknown while the broker is away)."""
        try:
            return assigned_progress(self.consumer)
        except KafkaError as error:
            self.warn(f"cannot reach the broker ({error!r}); kafka-python keeps reconnecting")
            positions = {tp.partition: self.positions.get(tp.partition) for tp in sorted(self.consumer.assignment())}
            return positions, dict.fromkeys(positions, None)

    def close(self) -> None:
        """Last commit, last status, a summary; then leave the group."""
        self.stopping = True
        self.commit()
        self.publish_status(force=True)
        log.info(self.stats.summary())
        self.disconnect()

    def disconnect(self) -> None:
        self.worker.shutdown(wait=True)
        self.dead_letters.close()
        self.consumer.close(autocommit=False, timeout_ms=10_000)
        self.admin.close()


def resume_offset(committed: int | None, last_on_disk: int | None) -> int | None:
    """Where an assigned partition resumes: past its commit and past its speed files (None: no history)."""
    candidates = [committed, None if last_on_disk is None else last_on_disk + 1]
    return max((offset for offset in candidates if offset is not None), default=None)


# --- command line -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Speed layer: consume trips from Kafka, validate, predict durations, write the speed view.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    speed_core.add_kafka_arguments(parser)
    parser.add_argument("--group", default=config.SPEED_GROUP,
                        help="consumer group; processes in one group split the partitions (env PERISCOPE_SPEED_GROUP)")
    speed_core.add_output_arguments(parser)
    parser.add_argument("--max-records", type=int, default=tuning.MAX_RECORDS,
                        help="most messages per poll batch: bigger is faster, smaller writes sooner")
    speed_core.add_run_arguments(parser, f"{socket.gethostname()}-{os.getpid()}",
                                 "this process's client id in Kafka and the name of its status file")
    args = parser.parse_args(argv)
    if args.max_records < 1:
        parser.error(f"--max-records must be at least 1, got {args.max_records}")
    speed_core.check_run_arguments(parser, args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    speed_core.log_to_stdout()
    try:
        models = ModelWatcher(args.model_dir, logger=log)
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
    log.info("speed layer %s: %s -> %s (group %s, model %s, dead letters to %s)", args.consumer_id, args.topic,
             args.speed_dir, args.group, models.model.version, args.dlq_topic)
    try:
        with tuning.quick_gil_handoff():
            # Batch k+1 is polled and validated here while the worker thread predicts and writes batch k;
            # k is committed before k+1 goes to the worker, so a commit never runs ahead of the files.
            while not layer.stopping:
                messages = layer.poll()                                # 1. poll
                batch = layer.validate_and_dead_letter(messages)       # 2. dead letters: exactly once
                if layer.finish_previous() and batch is not None:      # 5. commit k: at least once + idempotent
                    layer.in_flight = layer.worker.submit(layer.predict_and_write, batch)  # 3. predict, 4. write
                layer.publish_status()
                if layer.idle():
                    log.info("no new trips for %.0f s and no lag: stopping", args.stop_when_idle)
                    break
            layer.finish_previous()
    finally:
        layer.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
